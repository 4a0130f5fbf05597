"""Assignment 2: exact sparse attention with an online softmax (online_softmax.sparse_attention_online),
checked against msa_ref.sparse_attention and, when every block is selected, against dense causal attention.
The selections are drawn at random (conftest.random_block_idx): any valid block_idx must work."""
import math

import pytest
import torch
import torch.nn.functional as F

import msa_ref
from conftest import assert_close, random_block_idx
from online_softmax import sparse_attention_online


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def inputs(B, Hq, Hkv, T, D, bs=4, K=3, seed=0, dtype=torch.float64):
    q, k, v = rand(B, Hq, T, D, seed=seed, dtype=dtype), rand(B, Hkv, T, D, seed=seed + 1, dtype=dtype), rand(B, Hkv, T, D, seed=seed + 2, dtype=dtype)
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=seed + 3)
    return q, k, v, block_idx


@pytest.mark.parametrize("B, Hq, Hkv, T, D, bs, K", [(1, 1, 1, 1, 8, 4, 2), (2, 4, 2, 37, 16, 4, 3), (1, 3, 1, 20, 8, 8, 1),
                                                     (1, 2, 2, 33, 4, 5, 2), (2, 6, 3, 16, 8, 4, 4)])
def test_matches_reference(B, Hq, Hkv, T, D, bs, K):
    q, k, v, block_idx = inputs(B, Hq, Hkv, T, D, bs=bs, K=K)
    out, lse = sparse_attention_online(q, k, v, block_idx, bs)
    want_out, want_lse = msa_ref.sparse_attention(q, k, v, block_idx, bs)
    assert_close(out, want_out, what="out")
    assert_close(lse.double(), want_lse.double(), what="lse")


def test_equals_dense_when_every_block_is_chosen():
    B, Hq, Hkv, T, D, bs = 2, 4, 2, 29, 16, 4
    q, k, v, block_idx = inputs(B, Hq, Hkv, T, D, bs=bs, K=math.ceil(29 / 4))
    out, lse = sparse_attention_online(q, k, v, block_idx, bs)
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1), is_causal=True)
    assert_close(out, dense, what="out")
    s = q @ k.repeat_interleave(Hq // Hkv, 1).transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    assert_close(lse.double(), s.logsumexp(-1), what="lse")


def test_float32_any_order_and_padding():
    """fp32 inputs, blocks in any order, -1 padding anywhere, and a row with nothing to read (out 0, lse -inf)."""
    q, k, v, block_idx = inputs(1, 2, 1, 24, 8, bs=4, K=3, dtype=torch.float32)
    block_idx = block_idx.flip(-1).contiguous()                  # padding first, local block first
    block_idx[0, 0, 5] = -1                                      # token 5 reads nothing
    out, lse = sparse_attention_online(q, k, v, block_idx, 4)
    want_out, want_lse = msa_ref.sparse_attention(q, k, v, block_idx, 4)
    assert_close(out, want_out, atol=1e-5, rtol=1e-5, what="out")
    assert_close(lse, want_lse, atol=1e-5, rtol=1e-5, what="lse")
    assert torch.all(out[0, :, 5] == 0) and torch.all(lse[0, :, 5] == float("-inf"))


def test_large_scores_do_not_overflow():
    """exp(1000) is inf: the running max must be subtracted before exponentiating."""
    q, k, v, block_idx = inputs(1, 2, 1, 17, 8, bs=4, K=2)
    out, lse = sparse_attention_online(q * 300, k, v, block_idx, 4)
    want_out, want_lse = msa_ref.sparse_attention(q * 300, k, v, block_idx, 4)
    assert torch.isfinite(out).all()
    assert_close(out, want_out, what="out")
    assert_close(lse.double(), want_lse.double(), what="lse")


def test_gradients_match_reference():
    q, k, v, block_idx = inputs(1, 2, 1, 13, 4, bs=4, K=2)
    for t in (q, k, v):
        t.requires_grad_(True)
    w = rand(1, 2, 13, 4, seed=9)
    (sparse_attention_online(q, k, v, block_idx, 4)[0] * w).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (msa_ref.sparse_attention(q, k, v, block_idx, 4)[0] * w).sum().backward()
    for a, t, name in zip(got, (q, k, v), ("dq", "dk", "dv")):
        assert_close(a, t.grad, what=name)


def test_bad_input_is_a_value_error():
    q, k, v, block_idx = inputs(1, 2, 1, 8, 4)
    with pytest.raises(ValueError, match="block_idx"):
        sparse_attention_online(q, k, v, block_idx[:, :, :5], 4)
