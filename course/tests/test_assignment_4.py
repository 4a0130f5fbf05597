"""Assignment 4: the inner loop of the query-outer Triton forward kernel (query_forward._fwd_query_kernel),
run through query_forward.attention_forward_query_outer and compared with msa_ref.sparse_attention on random
selections (conftest.random_block_idx).
Without a GPU, Triton runs in its interpreter (conftest.py sets TRITON_INTERPRET=1): tiny shapes, fp32 and
fp16 only (the interpreter's bf16 matrix product is wrong). The bf16 test needs a CUDA GPU (optional)."""
import pytest
import torch

import msa_ref
from conftest import assert_close, random_block_idx
from query_forward import attention_forward_query_outer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(B, Hq, Hkv, T, D, bs, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(s, generator=g).to(DEVICE, dtype)
    q, k, v = r(B, Hq, T, D), r(B, Hkv, T, D), r(B, Hkv, T, D)
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=seed, device=DEVICE)
    return q, k, v, block_idx


def check(q, k, v, block_idx, bs, tol):
    out, lse = attention_forward_query_outer(q, k, v, block_idx, bs)
    want_out, want_lse = msa_ref.sparse_attention(q.float(), k.float(), v.float(), block_idx, bs)
    assert_close(out.float(), want_out.float(), atol=tol, rtol=tol, what="out")
    finite = torch.isfinite(want_lse)
    assert_close(torch.isfinite(lse), finite, what="finite lse")
    assert_close(lse[finite], want_lse[finite], atol=tol, rtol=tol, what="lse")


@pytest.mark.parametrize("B, Hq, Hkv, T, D, bs, K", [(1, 2, 1, 21, 16, 8, 2), (2, 2, 2, 9, 16, 4, 2), (1, 1, 1, 1, 16, 16, 1)])
def test_fp32(B, Hq, Hkv, T, D, bs, K):
    """Several blocks per query (the online softmax must rescale), T not a multiple of bs, G = 1 and 2, B > 1, T = 1."""
    check(*inputs(B, Hq, Hkv, T, D, bs, K), bs, 1e-4)


def test_fp16_padding_and_empty_rows():
    q, k, v, block_idx = inputs(1, 3, 1, 17, 16, 4, 3, dtype=torch.float16, seed=1)
    block_idx = block_idx.flip(-1).contiguous()          # -1 padding first, the local block first
    block_idx[0, 0, 6] = -1                              # token 6 reads nothing: out 0, lse -inf
    check(q, k, v, block_idx, 4, 2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="optional: needs a CUDA GPU (bf16, compiled kernels)")
def test_bf16_gpu():
    check(*inputs(2, 8, 2, 1000, 64, 64, 4, dtype=torch.bfloat16, seed=2), 64, 3e-2)
