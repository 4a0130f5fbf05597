"""Assignment 3: the KL alignment loss (msa_ref.kl_loss), compared with a loop over (b, g, t) written from
DESIGN.md's formula, and its gradient: it reaches qi and ki only, as (r - p) / (B * Hkv * T) on the support.
The selections are drawn at random (conftest.random_block_idx): the loss is defined for any valid block_idx."""
import math

import pytest
import torch

import msa_ref
from conftest import assert_close, random_block_idx


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def inputs(B, Hq, Hkv, T, D, Di, bs, K, seed=0):
    q, k = rand(B, Hq, T, D, seed=seed), rand(B, Hkv, T, D, seed=seed + 1)
    qi, ki = rand(B, Hkv, T, Di, seed=seed + 2), rand(B, T, Di, seed=seed + 3)
    return q, k, qi, ki, random_block_idx(B, Hkv, T, bs, K, seed=seed + 4)


def brute(q, k, qi, ki, block_idx, bs):
    """-> kl (scalar), and the (r - p) / (B Hkv T) of every (b, g, t) on its support, as {(b, g, t): (support, r - p)}."""
    B, Hq, T, D = q.shape
    Hkv, Di = k.shape[1], qi.shape[3]
    G = Hq // Hkv
    total, diffs = 0.0, {}
    for b in range(B):
        for g in range(Hkv):
            for t in range(T):
                sup = [j for j in range(t + 1) if j // bs in block_idx[b, g, t].tolist()]
                js = torch.tensor(sup)
                p = sum(torch.softmax(q[b, g * G + h, t] @ k[b, g, js].T / math.sqrt(D), 0) for h in range(G)) / G
                r = torch.softmax(qi[b, g, t] @ ki[b, js].T / math.sqrt(Di), 0)
                total += float((p * (p.log() - r.log())).sum())
                diffs[b, g, t] = (js, (r - p) / (B * Hkv * T))
    return total / (B * Hkv * T), diffs


@pytest.mark.parametrize("B, Hq, Hkv, T, D, Di, bs, K", [(1, 1, 1, 1, 4, 4, 4, 2), (2, 4, 2, 19, 8, 4, 4, 2),
                                                         (1, 3, 1, 17, 4, 6, 3, 1), (1, 2, 2, 12, 4, 4, 4, 8)])
def test_value(B, Hq, Hkv, T, D, Di, bs, K):
    q, k, qi, ki, block_idx = inputs(B, Hq, Hkv, T, D, Di, bs, K)
    got = msa_ref.kl_loss(q, k, qi, ki, block_idx, bs)
    want, _ = brute(q, k, qi, ki, block_idx, bs)
    assert got.dim() == 0
    assert abs(float(got) - want) < 1e-9 * max(1.0, abs(want))


def test_gradient_reaches_the_index_branch_only():
    B, Hq, Hkv, T, D, Di, bs = 2, 4, 2, 14, 4, 4, 4
    q, k, qi, ki, block_idx = inputs(B, Hq, Hkv, T, D, Di, bs, 2, seed=3)
    for t in (q, k, qi, ki):
        t.requires_grad_(True)
    msa_ref.kl_loss(q, k, qi, ki, block_idx, bs).backward()
    assert q.grad is None and k.grad is None, "the teacher p is a target: no gradient may reach q or k"
    _, diffs = brute(q.detach(), k.detach(), qi.detach(), ki.detach(), block_idx, bs)
    dqi, dki = torch.zeros_like(qi), torch.zeros_like(ki)
    for (b, g, t), (js, d) in diffs.items():                     # d kl / d s_tj = (r - p) / (B Hkv T), s = qi.ki / sqrt(Di)
        dqi[b, g, t] += d @ ki.detach()[b, js] / math.sqrt(Di)
        dki[b, js] += d[:, None] * qi.detach()[b, g, t] / math.sqrt(Di)
    assert_close(qi.grad, dqi, what="d kl / d qi")
    assert_close(ki.grad, dki, what="d kl / d ki")


def test_zero_when_the_index_branch_copies_the_main_branch():
    """G = 1 and qi = q, ki = k: the student's distribution is the teacher's, so the KL is 0 (and never negative)."""
    q, k, _, _, _ = inputs(1, 2, 2, 21, 8, 8, 4, 3, seed=5)
    ki = k[:, 0]                                                  # (B, T, D): one key shared by both groups...
    k = ki.unsqueeze(1).expand(-1, 2, -1, -1)                     # ...so the main branch uses it too
    block_idx = random_block_idx(1, 2, 21, 4, 3, seed=5)
    kl = msa_ref.kl_loss(q, k, q, ki, block_idx, 4)
    assert abs(float(kl)) < 1e-12
    q2, k2, qi2, ki2, b2 = inputs(1, 2, 1, 21, 8, 8, 4, 3, seed=6)
    assert float(msa_ref.kl_loss(q2, k2, qi2, ki2, b2, 4)) > 0


def test_lse_argument_and_dense_variant():
    """Passing sparse_attention's lse gives the same loss; kl_loss_dense is the same formula on every visible token."""
    q, k, qi, ki, block_idx = inputs(1, 4, 2, 18, 4, 4, 4, 2, seed=7)
    _, lse = msa_ref.sparse_attention(q, k, torch.randn_like(k), block_idx, 4)
    a = msa_ref.kl_loss(q, k, qi, ki, block_idx, 4)
    assert_close(msa_ref.kl_loss(q, k, qi, ki, block_idx, 4, lse=lse), a, what="kl_loss with lse")
    want, _ = brute(q, k, qi, ki, msa_ref.dense_block_idx(1, 2, 18, 4), 4)
    assert abs(float(msa_ref.kl_loss_dense(q, k, qi, ki, 4)) - want) < 1e-9


def test_float32_inputs():
    q, k, qi, ki, block_idx = inputs(1, 2, 1, 16, 8, 4, 4, 2, seed=8)
    got = msa_ref.kl_loss(q.float(), k.float(), qi.float(), ki.float(), block_idx, 4)
    want, _ = brute(q, k, qi, ki, block_idx, 4)
    assert got.dtype == torch.float32 and abs(float(got) - want) < 1e-5


def test_bad_input_is_a_value_error():
    q, k, qi, ki, block_idx = inputs(1, 2, 1, 8, 4, 4, 4, 2)
    with pytest.raises(ValueError, match="ki"):
        msa_ref.kl_loss(q, k, qi, ki[:, :5], block_idx, 4)
