"""
Tests of msa_triton.sparse_decode (msa_triton/decode.py) against msa_ref: its block selection must be exactly what
index_topk gives the new token's position, and its output must equal that position's row of
sparse_attention (and msa_ref.sparse_decode). On CI this runs in the Triton interpreter (fp32, tiny
shapes); on a GPU the compiled kernels also run in bf16 at the M3 head shape and inside a CUDA graph.
"""
import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton is imported (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import msa_ref
from msa_triton import decode as dec
from conftest import DEVICE, rand_inputs, requires_cuda


def make_case(B, Hq, Hkv, Tmax, D, Di, lens, dtype=torch.float32, seed=0):
    """A prefill of Tmax tokens whose K/V/ki serve as the caches; row b decodes the token at lens[b]-1.
    Returns (q, qi, k, v, ki, cache_lens, qs, qis) with qs (B, Hq, Tmax, D), qis (B, Hkv, Tmax, Di) the
    whole sequences, so that the new token's row of the prefill is the expected answer."""
    qs, k, v, qis, ki = rand_inputs(B, Hq, Hkv, Tmax, D, Di, dtype=dtype, seed=seed)
    cache_lens = torch.tensor(lens, device=DEVICE)
    rows = torch.arange(B, device=DEVICE)
    q = qs[rows, :, cache_lens - 1]                          # (B, Hq, D) the new token's query
    qi = qis[rows, :, cache_lens - 1]                        # (B, Hkv, Di)
    return q, qi, k, v, ki, cache_lens, qs, qis


def prefill_rows(qs, k, v, qis, ki, cache_lens, bs, K):
    """The new tokens' rows of the prefill: block_idx (B, Hkv, K) and out (B, Hq, D), float32."""
    f = torch.float32
    idx = msa_ref.index_topk(qis.to(f), ki.to(f), bs, K)                          # (B, Hkv, T, K)
    out, _ = msa_ref.sparse_attention(qs.to(f), k.to(f), v.to(f), idx, bs)        # (B, Hq, T, D)
    rows = torch.arange(qs.shape[0], device=qs.device)
    return idx[rows, :, cache_lens - 1], out[rows, :, cache_lens - 1]


def select(q, qi, k, v, ki, cache_lens, bs, K):
    """The blocks sparse_decode chose, block_idx (B, Hkv, K) (written by its attention pass)."""
    return dec._decode(q, qi, k, v, ki, cache_lens, bs, K)[1]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# (B, Hq, Hkv, Tmax, D, Di, bs, K, lens): ragged rows, T not a multiple of bs, K above the visible
# blocks, G = 1, K = 1, a row with one cached token, head dims that are not powers of two
CASES = [
    (3, 4, 2, 37, 16, 16, 4, 3, [37, 13, 1]),                # ragged, Tmax % bs != 0, cache_lens = 1
    (2, 2, 2, 21, 24, 8, 5, 8, [21, 9]),                     # G = 1, K > visible blocks, D = 24, bs = 5
    (1, 3, 1, 40, 16, 32, 8, 1, [40]),                       # Hkv = 1 (G = 3), K = 1: local block only
    (2, 8, 2, 64, 32, 16, 16, 2, [64, 33]),                  # full cache, lengths on a block border + 1
]


@pytest.mark.parametrize("B,Hq,Hkv,Tmax,D,Di,bs,K,lens", CASES)
def test_matches_prefill_row_and_reference(B, Hq, Hkv, Tmax, D, Di, bs, K, lens):
    q, qi, k, v, ki, cache_lens, qs, qis = make_case(B, Hq, Hkv, Tmax, D, Di, lens)
    want_idx, want_out = prefill_rows(qs, k, v, qis, ki, cache_lens, bs, K)
    idx = select(q, qi, k, v, ki, cache_lens, bs, K)
    assert torch.equal(idx.cpu(), want_idx.cpu()), "selection differs from index_topk"
    out = dec.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    assert rel_err(out, want_out) < 1e-5
    assert rel_err(out, msa_ref.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)) < 1e-5


@pytest.mark.parametrize("case", [0, 1, 2], ids=["ragged", "G=1", "K=1"])
def test_fp16_caches(case):
    """fp16 caches: products of fp16 operands accumulated in fp32, as on a GPU (the interpreter computes fp16 tl.dot
    right, unlike bf16). The selection is msa_ref's on the same fp16 numbers; the output within fp16's rounding."""
    B, Hq, Hkv, Tmax, D, Di, bs, K, lens = CASES[case]
    q, qi, k, v, ki, cache_lens, qs, qis = make_case(B, Hq, Hkv, Tmax, D, Di, lens, dtype=torch.float16, seed=5)
    want_idx, want_out = prefill_rows(qs, k, v, qis, ki, cache_lens, bs, K)
    assert torch.equal(select(q, qi, k, v, ki, cache_lens, bs, K).cpu(), want_idx.cpu())
    out = dec.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)
    assert out.dtype == torch.float16 and rel_err(out, want_out) < 2e-3


def test_ties_go_to_the_lower_block():
    # qi = 0 makes every block score exactly 0: the earlier blocks must come out in index order,
    # then the local block, then padding (msa_ref.select_blocks' stable sort)
    q, qi, k, v, ki, cache_lens, qs, qis = make_case(2, 2, 2, 30, 16, 16, [30, 11], seed=1)
    qi = torch.zeros_like(qi)
    idx = select(q, qi, k, v, ki, cache_lens, 4, 5).cpu()
    assert idx[0, 0].tolist() == [0, 1, 2, 3, 7] and idx[1, 1].tolist() == [0, 1, 2, -1, -1]
    q_pos = (cache_lens - 1).view(2, 1, 1)
    S = msa_ref.block_scores(qi.unsqueeze(2), ki, 4, q_pos)
    assert torch.equal(idx, msa_ref.select_blocks(S, q_pos, 4, 5).squeeze(2).cpu())
    # ties across the top-k's rounds (it takes 4 blocks per round): K - 1 = 9 tied blocks in index order
    assert select(q, qi, k, v, ki, cache_lens, 3, 10)[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("lens, Ks", [([70, 40, 7], (1, 2, 5, 6, 9, 10, 13)),   # 24, 14 and 3 blocks visible
                                       ([16, 10, 7], (10,))],                   # K past every row's blocks
                         ids=["K-1-to-13", "K-past-all"])
def test_topk_rounds_with_ties_and_few_blocks(lens, Ks):
    # scores with many exact ties (rounded) and K from 1 to past the visible blocks: the top-k takes 4 blocks
    # per reduction round, so K - 1 = 4, 5, 8, 9 probe the round boundaries; vs msa_ref's stable sort
    B, Hq, Hkv, Tmax, D, Di, bs = 3, 2, 2, 70, 16, 16, 3
    q, qi, k, v, ki, cache_lens, qs, qis = make_case(B, Hq, Hkv, Tmax, D, Di, lens, seed=8)
    qi, ki = qi.round(), (ki * 0.5).round()                  # integer products: many equal block scores
    q_pos = (cache_lens - 1).view(B, 1, 1)
    S = msa_ref.block_scores(qi.unsqueeze(2), ki, bs, q_pos)
    for K in Ks:
        want = msa_ref.select_blocks(S, q_pos, bs, K).squeeze(2)
        assert torch.equal(select(q, qi, k, v, ki, cache_lens, bs, K).cpu(), want.cpu()), K


def test_non_contiguous_caches():
    # caches stored token-major (B, Tmax, Hkv, D) and seen through a transpose, q a strided slice
    B, Hq, Hkv, Tmax, D, Di, bs, K = 2, 4, 2, 19, 16, 16, 4, 2
    q, qi, k, v, ki, cache_lens, qs, qis = make_case(B, Hq, Hkv, Tmax, D, Di, [19, 6], seed=2)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_t = v.transpose(1, 2).contiguous().transpose(1, 2)
    ki_big = torch.cat([ki, ki], dim=-1)[..., :Di]           # row stride 2 * Di
    q_s = torch.stack([q, -q], dim=-1)[..., 0]              # stride 2 along D
    assert not (k_t.is_contiguous() or ki_big.is_contiguous() or q_s.is_contiguous())
    want = msa_ref.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)
    assert rel_err(dec.sparse_decode(q_s, qi, k_t, v_t, ki_big, cache_lens, bs, K), want) < 1e-5
    lens_view = torch.stack([cache_lens, torch.full_like(cache_lens, 3)], dim=1)[:, 0]   # (B,), stride 2
    assert lens_view.stride() == (2,)
    assert rel_err(dec.sparse_decode(q, qi, k, v, ki, lens_view, bs, K), want) < 1e-5


def test_scores_that_round_together_tie():
    """Two block maxima one float apart that are equal once scaled by 1 / sqrt(Di), as msa_ref and index_topk scale
    the scores: a tie, so the lower block wins in sparse_decode too (ranking unscaled scores picks the other)."""
    Di, bs, Tmax = 32, 16, 48
    x = torch.arange(1.0, 5.0, 1e-4)
    x_next = torch.nextafter(x, torch.tensor(float("inf")))
    c = 1 / math.sqrt(Di)
    lo, hi = [v[(x * c) == (x_next * c)][0].item() for v in (x, x_next)]
    assert lo < hi
    qi = torch.zeros(1, 1, Di, device=DEVICE)
    qi[..., 0] = 1
    ki = torch.zeros(1, Tmax, Di, device=DEVICE)
    ki[:, :16, 0], ki[:, 16:32, 0], ki[:, 32:, 0] = lo, hi, -100.0             # blocks 0 and 1 tie, 2 is local
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).to(DEVICE) for shape in ((1, 1, 16), (1, 1, Tmax, 16), (1, 1, Tmax, 16)))
    lens = torch.tensor([Tmax], device=DEVICE)
    assert select(q, qi, k, v, ki, lens, bs, 2).tolist() == [[[0, 2]]]
    assert msa_ref.index_topk(qi[:, :, None].expand(1, 1, Tmax, Di), ki, bs, 2)[0, 0, -1].tolist() == [0, 2]
    assert rel_err(dec.sparse_decode(q, qi, k, v, ki, lens, bs, 2), msa_ref.sparse_decode(q, qi, k, v, ki, lens, bs, 2)) < 1e-5


def test_bad_input_raises():
    q, qi, k, v, ki, cache_lens, _, _ = make_case(2, 4, 2, 12, 16, 16, [12, 5])
    ok = dict(q=q, qi=qi, k_cache=k, v_cache=v, ki_cache=ki, cache_lens=cache_lens, block_size=4, topk=2)
    bad = [                                                  # (change, the start of the one line it gets)
        (dict(q=q[:, :3]), "Hq must be a multiple of Hkv=2, got q with Hq=3"),
        (dict(q=q[:, :, :8]), r"q must be \[B=2, Hq, D=16\] like the caches, got \(2, 4, 8\)"),
        (dict(qi=qi[:1]), r"qi must be \[B=2, Hkv=2, Di\], got \(1, 2, 16\)"),
        (dict(qi=qi[0]), r"qi must be \[B, Hkv, Di\], got \(2, 16\)"),
        (dict(v_cache=v[:, :, :5]), r"v_cache must have k_cache's shape \(2, 2, 12, 16\), got \(2, 2, 5, 16\)"),
        (dict(ki_cache=ki[:, :, :8]), r"ki_cache must be \[B=2, Tmax=12, Di=16\], got \(2, 12, 8\)"),
        (dict(cache_lens=torch.tensor([13, 5], device=DEVICE)), r"cache_lens must lie in \[1, Tmax=12\], got \[13, 5\]"),
        (dict(cache_lens=torch.tensor([0, 5], device=DEVICE)), r"cache_lens must lie in \[1, Tmax=12\], got \[0, 5\]"),
        (dict(cache_lens=cache_lens.float()), r"cache_lens must be int \[B=2\], got torch.float32"),
        (dict(cache_lens=cache_lens[:1]), r"cache_lens must be int \[B=2\], got torch.int64 \(1,\)"),
        (dict(k_cache=k.double(), v_cache=v.double()), "k_cache and v_cache must have q's dtype torch.float32"),
        (dict(block_size=0), "block_size must be an int >= 1, got 0"),
        (dict(topk=0), "topk must be an int >= 1, got 0"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match="^" + message):
            dec.sparse_decode(**{**ok, **change})
        with pytest.raises(ValueError, match="^" + message):                 # the same line from the reference
            msa_ref.sparse_decode(**{**ok, **change})


@requires_cuda
@pytest.mark.parametrize("lens", [[4096, 1000, 129, 1], [300]])
def test_bf16_m3_heads_on_gpu(lens):
    # the M3 head shape (G = 16, D = Di = 128, bs = 128), bf16 caches, ragged rows; compared with the
    # fp32 reference on the same bf16 numbers
    B, Hq, Hkv, Tmax, D, Di, bs, K = len(lens), 64, 4, 4096, 128, 128, 128, 16
    q, qi, k, v, ki, cache_lens, qs, qis = make_case(B, Hq, Hkv, Tmax, D, Di, lens, dtype=torch.bfloat16, seed=3)
    want_idx, want_out = prefill_rows(qs, k, v, qis, ki, cache_lens, bs, K)
    assert torch.equal(select(q, qi, k, v, ki, cache_lens, bs, K), want_idx)
    out = dec.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)
    assert out.dtype == torch.bfloat16 and rel_err(out, want_out) < 1e-2


@requires_cuda
@pytest.mark.parametrize("Hq,Hkv,Tmax,D,Di,bs,K,lens", [(64, 4, 4096, 128, 128, 128, 16, [4096, 1000, 129, 1]),
                                                       (64, 4, 4096, 128, 128, 128, 16, [300]),
                                                       (4, 2, 37, 16, 16, 4, 3, [37, 13, 1])])  # Di < 32, Tmax % bs
def test_fp8_index_cache_selects_as_index_topk_fp8(Hq, Hkv, Tmax, D, Di, bs, K, lens):
    # an fp8 index-key cache (the M3 head shape; a tiny one): the selection is msa_ref.index_topk(fp8=True)'s at
    # each row's position, exactly (this pass's small fp8 products accumulate in fp32, unlike the prefill
    # kernel's large ones), and the output sparse_attention's row with that selection
    B = len(lens)
    q, qi, k, v, ki, cache_lens, qs, qis = make_case(B, Hq, Hkv, Tmax, D, Di, lens, dtype=torch.bfloat16, seed=9)
    ki8, ks = msa_ref.fp8_quantize(ki)
    rows = torch.arange(B, device=DEVICE)
    want_idx = msa_ref.index_topk(qis, ki, bs, K, fp8=True)[rows, :, cache_lens - 1]      # (B, Hkv, K)
    assert torch.equal(dec._decode(q, qi, k, v, ki8, cache_lens, bs, K, ks)[1], want_idx)
    out = dec.sparse_decode(q, qi, k, v, ki8, cache_lens, bs, K, ki_scale=ks)
    assert rel_err(out, msa_ref.sparse_decode(q, qi, k, v, ki8, cache_lens, bs, K, ki_scale=ks)) < 1e-2
    g = torch.cuda.CUDAGraph()                               # still one capturable step
    with torch.cuda.graph(g):
        again = dec.sparse_decode(q, qi, k, v, ki8, cache_lens, bs, K, ki_scale=ks)
    g.replay()
    assert torch.equal(again, out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer: fp8 decoding needs a GPU")
def test_fp8_index_cache_needs_a_gpu():
    # the interpreter rounds float32 -> e4m3 differently from the GPU and from torch, so the Triton fp8 path
    # refuses CPU tensors (msa_ref.sparse_decode serves them)
    q, qi, k, v, ki, cache_lens, _, _ = make_case(2, 4, 2, 12, 16, 16, [12, 5])
    ki8, ks = msa_ref.fp8_quantize(ki)
    with pytest.raises(ValueError, match="needs CUDA"):
        dec.sparse_decode(q, qi, k, v, ki8, cache_lens, 4, 2, ki_scale=ks)


def written_elsewhere(ki, cache_lens, seed=5):
    """A copy of the cache ki (B, Tmax, Di) with each row's entry at cache_lens - 1 replaced by garbage, and the new
    keys (B, Di) that were there: what sparse_decode(..., ki_new=) gets, and what it must write back."""
    rows, at = torch.arange(ki.shape[0], device=ki.device), cache_lens.long() - 1
    stale = ki.clone()
    stale[rows, at] = torch.randn(stale[rows, at].shape, generator=torch.Generator().manual_seed(seed)).to(ki)
    return stale, ki[rows, at].clone()


@pytest.mark.parametrize("B,Hq,Hkv,Tmax,D,Di,bs,K,lens", CASES[:2])
def test_new_index_key_written_by_the_call(B, Hq, Hkv, Tmax, D, Di, bs, K, lens):
    # ki_new: the scoring launch writes the new token's index key at cache_lens - 1, then decodes as if it had
    # been there (it is never scored: it sits in the local block); msa_ref.sparse_decode does the same
    q, qi, k, v, ki, cache_lens, _, _ = make_case(B, Hq, Hkv, Tmax, D, Di, lens)
    want = dec.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)
    for decode in (dec.sparse_decode, msa_ref.sparse_decode):
        stale, new = written_elsewhere(ki, cache_lens)
        out = decode(q, qi, k, v, stale, cache_lens, bs, K, ki_new=new)
        assert torch.equal(stale, ki), decode.__module__
        assert rel_err(out, want) < 1e-6
    with pytest.raises(ValueError, match=r"ki_new must be \[B=%d, Di=%d\]" % (B, Di)):
        dec.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K, ki_new=new[:, :-1])


def test_reference_writes_an_fp8_key_as_fp8_quantize():
    # msa_ref's fp8 write (the CPU's decode step of an fp8 index): the e4m3 bytes and the scale of fp8_quantize,
    # an all-zero key included (scale 2^-8, as frexp(0) gives e = 0)
    q, qi, k, v, ki, cache_lens, _, _ = make_case(3, 4, 2, 12, 16, 16, [12, 5, 1])
    ki[1, 4] = 0
    ki8, ks = msa_ref.fp8_quantize(ki)
    stale8, new = written_elsewhere(ki, cache_lens)
    stale8, stale_s = msa_ref.fp8_quantize(stale8)
    out = msa_ref.sparse_decode(q, qi, k, v, stale8, cache_lens, 4, 2, ki_scale=stale_s, ki_new=new)
    assert torch.equal(stale8.view(torch.uint8), ki8.view(torch.uint8)) and torch.equal(stale_s, ks)
    assert ks[1, 4] == 2.0 ** -8
    assert torch.equal(out, msa_ref.sparse_decode(q, qi, k, v, ki8, cache_lens, 4, 2, ki_scale=ks))


@requires_cuda
@pytest.mark.parametrize("Tmax,bs,lens", [(4096, 64, [4096, 1000, 129, 1]), (37, 4, [37, 13, 2])])
def test_fp8_new_index_key_written_by_the_call(Tmax, bs, lens):
    # on the GPU, an fp8 cache: the scoring launch quantizes ki_new exactly as fp8_quantize (the bytes, the scale;
    # an all-zero key too), into the cache's bytes as KVCache holds them, also inside a CUDA graph
    B, K = len(lens), 4
    q, qi, k, v, ki, cache_lens, _, _ = make_case(B, 8, 2, Tmax, 64, 64, lens, dtype=torch.bfloat16, seed=3)
    ki[0, lens[0] - 1] = 0
    ki8, ks = msa_ref.fp8_quantize(ki)
    want = dec.sparse_decode(q, qi, k, v, ki8, cache_lens, bs, K, ki_scale=ks)
    stale, new = written_elsewhere(ki, cache_lens)
    held, stale_s = msa_ref.fp8_quantize(stale)
    held = held.view(torch.uint8)                            # the bytes, seen as e4m3 (KVCache's form)
    out = dec.sparse_decode(q, qi, k, v, held.view(torch.float8_e4m3fn), cache_lens, bs, K, ki_scale=stale_s,
                            ki_new=new)
    assert torch.equal(held, ki8.view(torch.uint8)) and torch.equal(stale_s, ks)
    assert torch.equal(out, want)
    held.zero_(), stale_s.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        dec.sparse_decode(q, qi, k, v, held.view(torch.float8_e4m3fn), cache_lens, bs, K, ki_scale=stale_s, ki_new=new)
    g.replay()
    rows, at = torch.arange(B, device=DEVICE), cache_lens.long() - 1
    assert torch.equal(held[rows, at], ki8.view(torch.uint8)[rows, at]) and torch.equal(stale_s[rows, at], ks[rows, at])


def test_strided_new_index_key():
    # ki_new read through its strides (here every other element of a wider row)
    B, Hq, Hkv, Tmax, D, Di, bs, K, lens = CASES[0]
    q, qi, k, v, ki, cache_lens, _, _ = make_case(B, Hq, Hkv, Tmax, D, Di, lens)
    want = dec.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)
    stale, new = written_elsewhere(ki, cache_lens)
    new_s = torch.stack([new, -new], dim=-1)[..., 0]          # (B, Di), stride 2 along Di
    assert new_s.stride() == (2 * Di, 2)
    out = dec.sparse_decode(q, qi, k, v, stale, cache_lens, bs, K, ki_new=new_s)
    assert torch.equal(stale, ki) and rel_err(out, want) < 1e-6


@requires_cuda
def test_fp8_scale_read_and_written_through_its_strides():
    # an fp8 cache whose ki_scale is a strided view (every other element of a wider tensor): read as it is, and the
    # new key's scale written into it in place, both as with a contiguous ki_scale
    B, K, bs, lens = 3, 4, 64, [4096, 1000, 129]
    q, qi, k, v, ki, cache_lens, _, _ = make_case(B, 8, 2, 4096, 64, 64, lens, dtype=torch.bfloat16, seed=4)
    ki8, ks = msa_ref.fp8_quantize(ki)
    want = dec.sparse_decode(q, qi, k, v, ki8, cache_lens, bs, K, ki_scale=ks)
    wide = torch.stack([ks, -ks], dim=-1)                    # (B, Tmax, 2)
    assert torch.equal(dec.sparse_decode(q, qi, k, v, ki8, cache_lens, bs, K, ki_scale=wide[..., 0]), want)
    stale, new = written_elsewhere(ki, cache_lens)
    held, stale_s = msa_ref.fp8_quantize(stale)
    wide = torch.stack([stale_s, -stale_s], dim=-1)
    out = dec.sparse_decode(q, qi, k, v, held, cache_lens, bs, K, ki_scale=wide[..., 0], ki_new=new)
    assert torch.equal(out, want) and torch.equal(wide[..., 0], ks) and torch.equal(wide[..., 1], -stale_s)
    assert torch.equal(held.view(torch.uint8), ki8.view(torch.uint8))


@requires_cuda
def test_cuda_graph_replay_follows_new_lengths():
    # captured once, replayed after the lengths and the query change in place: no host sync inside
    B, Hq, Hkv, Tmax, D, Di, bs, K = 3, 16, 2, 2048, 64, 64, 64, 4
    q, qi, k, v, ki, cache_lens, qs, qis = make_case(B, Hq, Hkv, Tmax, D, Di, [2048, 700, 65],
                                                     dtype=torch.bfloat16, seed=4)
    dec.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)    # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = dec.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)
    for lens in ([1500, 64, 2048], [1, 2, 3]):
        cache_lens.copy_(torch.tensor(lens))
        rows = torch.arange(B, device=DEVICE)
        q.copy_(qs[rows, :, cache_lens - 1])
        qi.copy_(qis[rows, :, cache_lens - 1])
        g.replay()
        want = msa_ref.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)
        assert rel_err(out, want) < 1e-2


@pytest.mark.parametrize("block_n,items", [(16, 1), (16, 3), (32, 2)])
def test_split_and_multi_item_programs(monkeypatch, block_n, items):
    # the split-K pass cut differently: blocks in several pieces (BLOCK_N < bs), several pieces per
    # program (ITEMS > 1, the last program partly empty); the answer must not change
    monkeypatch.setattr(dec, "_attend_config", lambda B, Hkv, K, bs: (block_n, items, 4, 2))
    B, Hq, Hkv, Tmax, D, Di, bs, K = 2, 4, 2, 150, 16, 16, 40, 3
    q, qi, k, v, ki, cache_lens, qs, qis = make_case(B, Hq, Hkv, Tmax, D, Di, [150, 45], seed=5)
    want = msa_ref.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K)
    assert rel_err(dec.sparse_decode(q, qi, k, v, ki, cache_lens, bs, K), want) < 1e-5


def test_several_blocks_per_scoring_program(monkeypatch):
    # the scoring pass with 3 blocks per program (the last program partly past the cache)
    monkeypatch.setattr(dec, "_score_config", lambda fp8: (3, 4))
    q, qi, k, v, ki, cache_lens, qs, qis = make_case(2, 4, 2, 45, 16, 16, [45, 22], seed=6)
    want_idx, _ = prefill_rows(qs, k, v, qis, ki, cache_lens, 4, 4)
    assert torch.equal(select(q, qi, k, v, ki, cache_lens, 4, 4).cpu(), want_idx.cpu())


@requires_cuda  # the interpreter runs a program as one thread whatever num_warps says: only a GPU changes the layouts
@pytest.mark.parametrize("warps", [1, 2])
def test_topk_warps(monkeypatch, warps):
    # the attention pass (whose programs run the top-k) with other warp counts, so other reduction
    # layouts: the same blocks in the same order
    monkeypatch.setattr(dec, "_attend_config", lambda B, Hkv, K, bs: (16, 1, warps, 2))
    for lens, K in (([45, 22, 3], 4), ([45, 30, 9], 16)):
        q, qi, k, v, ki, cache_lens, qs, qis = make_case(3, 4, 2, 45, 16, 16, lens, seed=7)
        want_idx, _ = prefill_rows(qs, k, v, qis, ki, cache_lens, 4, K)
        assert torch.equal(select(q, qi, k, v, ki, cache_lens, 4, K).cpu(), want_idx.cpu())


def test_attend_config_choices():
    # M3 shape: halves of blocks at batch 1, several pipelined pieces per program at batch 32
    assert dec._attend_config(1, 4, 16, 128) == (64, 1, 4, 2)
    assert dec._attend_config(32, 4, 16, 128) == (128, 8, 4, 3)
    assert dec._attend_config(1, 1, 1, 5) == (16, 1, 4, 2)
