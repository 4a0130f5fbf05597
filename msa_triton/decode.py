"""
MSA decoding in Triton: one new token per sequence against KV and index-key caches. Shapes and naming:
common.py.

sparse_decode(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk) -> out computes exactly
msa_ref.sparse_decode (same selection as index_topk, same output as sparse_attention's row) in three
launches, none of which waits on the host, so the whole step can be captured in a CUDA graph:

  1. _score_kernel   index scores of the new token's Hkv index queries against every cached index key
                     of the earlier blocks, max-pooled per block -> S (B, Hkv, nb) float32. This pass
                     reads the whole index-key cache (Di values per token): at long context it is most
                     of the bytes of a step, so it is a plain streaming pass, one block per program.
                     An fp8 cache (e4m3 keys and a power-of-two scale per token, msa_ref.fp8_quantize)
                     halves those bytes; qi is rounded in the kernel the same way (msa_ref's fp8 selection).
                     Given ki_new, one program of each row first writes the new token's key into the cache
                     (quantized, for fp8): a decode step then needs no launch of its own for that.
  2. _attend_kernel  split-K ("flash-decoding"): one program per (row, group, piece of the selection).
                     Each program first runs the top-k of its (row, group) from S (_select_blocks: the
                     K-1 best earlier blocks, ties -> lower index, then the local block, then -1, the
                     order of msa_ref.select_blocks); then the G query heads of the group are the rows of
                     one matrix product against the piece's keys; writes a partial (out, lse) per piece.
  3. _merge_kernel   per (row, query head): combine the partials with their log-sum-exps.
The top-k runs inside the attention pass rather than as a launch of its own, and the merge is a launch
of its own rather than the last program of each group: a batch-1 step is short enough that each launch
and each dependent round trip to memory shows (DESIGN.md section 4).

Rows may have different lengths: cache_lens stays on the device and every kernel reads it, so grids
depend only on (B, Hkv, Tmax, K), never on the lengths. Lengths outside [1, Tmax] are clamped in
the kernels (no out-of-bounds access); sparse_decode rejects them with a ValueError only in the checking
mode (common.checks: on for CPU tensors, off on CUDA by default), since reading them is a host sync.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from msa_checks import check_cache_lens, check_decode_inputs
from .common import (INT64_MIN, LOG2E, _cdiv, _checking, _fp8_rows, _fp8_scale, _key_block, _op, _pdl, _pdl_wait, _pow2,
                     _prec, _softmax_finish, _softmax_rescale, _sortable_key, _strides)


# ---------------------------------------------------------------------------------------------
# 1. index scores, max-pooled per block

@triton.jit
def _score_kernel(qi_ptr, ki_ptr, ks_ptr, lens_ptr, sc_ptr, kn_ptr,
                  s_qib, s_qih, s_qid, s_kib, s_kit, s_kid, s_ksb, s_kst, s_scb, s_sch, s_knb, s_knd,
                  Tmax, scale_i, HKV: tl.constexpr, DI: tl.constexpr, BS: tl.constexpr,
                  HKV_P: tl.constexpr, DI_P: tl.constexpr, BS_P: tl.constexpr, BLOCKS: tl.constexpr,
                  PREC: tl.constexpr, FP8: tl.constexpr, WRITE: tl.constexpr, PDL: tl.constexpr):
    _pdl_wait(PDL)
    first = tl.program_id(0) * BLOCKS                        # BLOCKS consecutive blocks of BS cached tokens
    b = tl.program_id(1).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 1), Tmax)
    local = (n - 1) // BS                                    # the new token's block, always selected
    # only the blocks before the local one compete, and all their tokens are visible: no causal mask,
    # and blocks from the local one on read no key (tok < local * BS <=> blk < local). Masks are built
    # from vector comparisons only (the interpreter mishandles scalar & vector masks).
    h = tl.arange(0, HKV_P)
    d = tl.arange(0, DI_P)
    t = tl.arange(0, BS_P)
    if WRITE:                # the new token's index key, into the cache at n - 1 (the local block: no program reads it)
        if tl.program_id(0) == 0:
            kn = tl.load(kn_ptr + b * s_knb + d[None, :] * s_knd, mask=d[None, :] < DI,
                         other=0.0).to(tl.float32)                                                # (1, DI_P)
            at = ki_ptr + b * s_kib + (n - 1) * s_kit + d[None, :] * s_kid
            if FP8:          # e4m3 and a power-of-two scale, msa_ref.fp8_quantize's
                tl.store(at, _fp8_rows(kn), mask=d[None, :] < DI)
                one = tl.arange(0, 1)
                tl.store(ks_ptr + b * s_ksb + (n - 1) * s_kst + one, _fp8_scale(kn))
            else:
                tl.store(at, kn.to(ki_ptr.dtype.element_ty), mask=d[None, :] < DI)
    qi = tl.load(qi_ptr + b * s_qib + h[:, None] * s_qih + d[None, :] * s_qid,
                 mask=(h[:, None] < HKV) & (d[None, :] < DI), other=0.0)                 # (HKV_P, DI_P)
    if FP8:                                                  # e4m3 keys (half the bytes): round qi the same way
        qi = _fp8_rows(qi.to(tl.float32))
    for i in tl.static_range(BLOCKS):                        # unrolled: the loads of all blocks in flight
        blk = first + i
        tok = blk * BS + t                                                               # (BS_P,)
        seen = (t < BS) & (tok < local * BS)                                             # (BS_P,)
        ki = tl.load(ki_ptr + b * s_kib + tok[:, None] * s_kit + d[None, :] * s_kid,
                     mask=seen[:, None] & (d[None, :] < DI), other=0.0)
        # scores without fp8 qi's scale (a power of two: it changes no order, no tie); the max times 1 / sqrt(Di)
        # as index_topk scales it, so that two maxima that round to one score tie here as they do there
        if FP8:                                              # times each key's scale, a power of two
            s = tl.dot(qi, tl.trans(ki)) * tl.load(ks_ptr + b * s_ksb + tok * s_kst, mask=seen, other=0.0)[None, :]
        else:
            s = tl.dot(qi, tl.trans(ki), input_precision=PREC)                           # (HKV_P, BS_P) fp32
        s = tl.where(t[None, :] < BS, s, float("-inf"))
        tl.store(sc_ptr + b * s_scb + h * s_sch + blk, tl.max(s, axis=1) * scale_i,
                 mask=(h < HKV) & (h * 0 + blk < local))


# ---------------------------------------------------------------------------------------------
# 2a. top-k with the local block forced (run by every program of the attention pass)

@triton.jit
def _best4(a0, a1, a2, a3, b0, b1, b2, b3):
    # two lists of 4 keys, each best first -> the best 4 of the 8, best first. a0..a3, b3..b0 is bitonic,
    # so the larger of each pair (a_i, b_3-i) are the best 4; two compare-exchange stages sort them
    c0 = tl.maximum(a0, b3)
    c1 = tl.maximum(a1, b2)
    c2 = tl.maximum(a2, b1)
    c3 = tl.maximum(a3, b0)
    d0, d2 = tl.maximum(c0, c2), tl.minimum(c0, c2)
    d1, d3 = tl.maximum(c1, c3), tl.minimum(c1, c3)
    return tl.maximum(d0, d1), tl.minimum(d0, d1), tl.maximum(d2, d3), tl.minimum(d2, d3)


@triton.jit
def _put(out, slot, i: tl.constexpr, key, n_far):
    # the block of `key` into slot i, if i is one of the n_far slots of earlier blocks
    return tl.where((slot == i) & (slot < n_far), _key_block(key), out)


@triton.jit
def _select_blocks(sc_ptr, local, K: tl.constexpr, NB_P: tl.constexpr, K_P: tl.constexpr):
    # sc_ptr: one (row, group)'s block scores, the first `local` valid. Returns (K_P,) int32: the K-1 best
    # earlier blocks best first (ties -> lower index), then the local block, then -1: msa_ref.select_blocks.
    j = tl.arange(0, NB_P)                                   # candidate blocks
    s = tl.load(sc_ptr + j, mask=j < local, other=0.0)
    key = _sortable_key(s, j)                                # a max finds the best block and breaks ties
    key = tl.where(j < local, key, INT64_MIN)                # never chosen
    n_far = tl.minimum(local, K - 1)                         # earlier blocks to take
    slot = tl.arange(0, K_P)
    out = tl.where(slot == n_far, local, -1)                 # local block in the last valid slot
    # rounds of "best 4 keys, then remove them": one block-wide reduction finds 4 blocks at once, so the
    # K-1 = 15 blocks of the M3 shape take 4 dependent reductions instead of 15
    none = tl.full([NB_P], INT64_MIN, tl.int64)
    for r in tl.static_range(0, K - 1, 4):
        t0, t1, t2, t3 = tl.reduce((key, none, none, none), 0, _best4)
        out = _put(out, slot, r, t0, n_far)
        out = _put(out, slot, r + 1, t1, n_far)
        out = _put(out, slot, r + 2, t2, n_far)
        out = _put(out, slot, r + 3, t3, n_far)
        key = tl.where(key >= t3, INT64_MIN, key)           # keys are unique: drops those 4 blocks
    return out


# ---------------------------------------------------------------------------------------------
# 2b. split-K attention over the selected blocks

@triton.jit
def _attend_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, sc_ptr, idx_ptr, o_ptr, lse_ptr,
                   s_qb, s_qh, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd, s_scb, s_sch,
                   Tmax, qk_scale,
                   HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BS: tl.constexpr, K: tl.constexpr,
                   SPLITS: tl.constexpr, ITEMS: tl.constexpr, NS: tl.constexpr, BLOCK_N: tl.constexpr,
                   G_P: tl.constexpr, D_P: tl.constexpr, NB_P: tl.constexpr, K_P: tl.constexpr,
                   PREC: tl.constexpr, PDL: tl.constexpr):
    # The selection of (b, h) is K blocks, each cut in SPLITS pieces of BLOCK_N tokens: K*SPLITS
    # items. Program (bh, p) runs items p*ITEMS .. p*ITEMS+ITEMS-1 with an online softmax and writes
    # one partial (out, lse) for each of the G heads: NS = cdiv(K*SPLITS, ITEMS) partials per head.
    # Every program first runs the top-k of its (b, h) itself (the same answer in all NS of them, from
    # 4 KB of scores in L2): one launch and one round trip fewer than a top-k pass of its own, which is
    # what a batch-1 step waits on. Program 0 writes the selection out.
    _pdl_wait(PDL)
    bh = tl.program_id(0)
    p = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    h = bh % HKV
    n = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 1), Tmax)
    sel = _select_blocks(sc_ptr + b * s_scb + h * s_sch, (n - 1) // BS, K, NB_P, K_P)      # (K_P,) int32
    slots = tl.arange(0, K_P)
    tl.store(idx_ptr + bh * K + slots, sel, mask=(slots < K) & (slots * 0 + p == 0))
    g = tl.arange(0, G_P)
    d = tl.arange(0, D_P)
    x = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * s_qb + (h * G + g)[:, None] * s_qh + d[None, :] * s_qd,
                mask=(g[:, None] < G) & (d[None, :] < D), other=0.0)                     # (G_P, D_P)
    k_base = k_ptr + b * s_kb + h.to(tl.int64) * s_kh
    v_base = v_ptr + b * s_vb + h.to(tl.int64) * s_vh
    m = tl.full([G_P], float("-inf"), tl.float32)            # running max, log2 units
    l = tl.zeros([G_P], tl.float32)                          # running sum of exp2
    acc = tl.zeros([G_P, D_P], tl.float32)
    for it in range(ITEMS):
        item = p * ITEMS + it
        slot = item // SPLITS
        blk = tl.sum(tl.where(slots == slot, sel, 0))        # sel[slot]; items past the selection: -1
        blk = tl.where(slot < K, blk, -1)
        off = (item % SPLITS) * BLOCK_N + x                  # offsets inside the block
        tok = blk * BS + off                                 # (BLOCK_N,) cache positions
        valid = (off < BS) & (tok >= 0) & (tok < n)          # tok < 0 <=> blk = -1 (padding)
        kt = tl.load(k_base + tok[:, None] * s_kt + d[None, :] * s_kd,
                     mask=valid[:, None] & (d[None, :] < D), other=0.0)                  # (BLOCK_N, D_P)
        vt = tl.load(v_base + tok[:, None] * s_vt + d[None, :] * s_vd,
                     mask=valid[:, None] & (d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale                    # (G_P, BLOCK_N)
        s = tl.where(valid[None, :], s, float("-inf"))
        m, m_ref, alpha = _softmax_rescale(m, tl.max(s, axis=1))
        pr = tl.exp2(s - m_ref[:, None])
        l = l * alpha + tl.sum(pr, axis=1)
        acc = acc * alpha[:, None] + tl.dot(pr.to(vt.dtype), vt, input_precision=PREC)
    # an empty piece (padding, or past the row's length) gets lse = -inf: the merge ignores it
    ls, lse = _softmax_finish(m, l)
    acc = acc / ls[:, None]
    row = (b * HKV + h) * G + g                              # (G_P,) rows of the partial buffers (B*Hq)
    tl.store(lse_ptr + row * NS + p, lse, mask=g < G)
    tl.store(o_ptr + (row * NS + p)[:, None] * D + d[None, :], acc, mask=(g[:, None] < G) & (d[None, :] < D))


# ---------------------------------------------------------------------------------------------
# 3. merge the partials of each query head

@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, s_ob, s_oh, s_od,
                  HQ: tl.constexpr, D: tl.constexpr, NS: tl.constexpr, D_P: tl.constexpr, PDL: tl.constexpr):
    # One row (b * Hq + head): the LSE-weighted sum of its NS partials, as an online softmax over the
    # pieces. Every piece is read (an empty one holds zeros and lse = -inf, weight 0) and nothing but
    # elementwise math follows a load, so the unrolled loop puts all loads in flight at once: one round
    # trip to L2. (Reducing the lse first and reading only non-empty pieces would cost two dependent round
    # trips, which a batch-1 step feels.)
    _pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)   # (1,) the row, as a vector
    d = tl.arange(0, D_P)
    m = tl.full([1], float("-inf"), tl.float32)              # running max of the lse, log2 units
    den = tl.zeros([1], tl.float32)                          # running sum of the weights
    acc = tl.zeros([1, D_P], tl.float32)
    for i in tl.static_range(NS):
        lse = tl.load(lse_ptr + row * NS + i)                                            # (1,)
        o = tl.load(o_ptr + (row * NS + i)[:, None] * D + d[None, :], mask=d[None, :] < D, other=0.0)  # (1, D_P)
        m, m_ref, alpha = _softmax_rescale(m, lse)
        w = tl.exp2(lse - m_ref)                             # 0 for an empty piece
        den = den * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
    res = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(out_ptr + (row // HQ)[:, None] * s_ob + (row % HQ)[:, None] * s_oh + d[None, :] * s_od,
             res.to(out_ptr.dtype.element_ty), mask=d[None, :] < D)


# ---------------------------------------------------------------------------------------------
# launch choices (benchmarks override these functions to sweep)

def _score_config(fp8):
    """(BLOCKS, num_warps) of the scoring pass: BLOCKS (bs x Di) tiles of index keys per program. One tile a
    program reads fastest at both batch 1 and 8 on Hopper (dev/score_sweep.py); an fp8 tile (half the bytes) is
    read fastest by one warp, a bf16 tile by four."""
    return 1, 1 if fp8 else 4


def _attend_config(B, Hkv, K, block_size):
    """(BLOCK_N, ITEMS, num_warps, num_stages): tokens per piece and pieces per program of the split-K
    pass (tuned on Hopper; see bench.py): with few (row, group) pairs (under two programs per SM of a
    132-SM GPU), blocks cut in halves and one piece per program (more programs in flight); with many,
    several pieces per program, pipelined, while at least 256 programs remain (fewer partials to write
    and merge)."""
    bn = min(128, _pow2(block_size))
    if B * Hkv * K < 2 * 132 and block_size > 64:
        bn = 64
    pieces = B * Hkv * K * _cdiv(block_size, bn)
    items = 1
    while items * 2 <= K and pieces // (items * 2) >= 256:
        items *= 2
    return bn, items, 4, 3 if items >= 4 else 2


def _block_scores(qi, ki_cache, cache_lens, block_size, ki_scale=None, ki_new=None):
    """Step 1. qi (B, Hkv, Di), ki_cache (B, Tmax, Di), cache_lens (B,) -> S (B, Hkv, nb) float32,
    written for the blocks before each row's local block only. fp8 keys: ki_scale (B, Tmax). ki_new (B, Di): first
    written into the caches at cache_lens - 1 (quantized for fp8 keys)."""
    B, Hkv, Di = qi.shape
    Tmax = ki_cache.shape[1]
    nb = _cdiv(Tmax, block_size)
    S = torch.empty(B, Hkv, nb, device=qi.device, dtype=torch.float32)                 # (B, Hkv, nb)
    fp8 = ki_scale is not None
    blocks, warps = _score_config(fp8)
    write = ki_new is not None
    ks = ki_scale if fp8 else S[:, 0]                     # (B, Tmax), any strides; else a stand-in never read
    kn = ki_new if write else S[:, 0]                       # (B, Di), likewise
    _score_kernel[(_cdiv(nb, blocks), B)](
        qi_ptr=qi, ki_ptr=ki_cache, ks_ptr=ks, lens_ptr=cache_lens, sc_ptr=S, kn_ptr=kn,
        **_strides("qi", qi, "bhd"), **_strides("ki", ki_cache, "btd"), **_strides("ks", ks, "bt"),
        s_scb=S.stride(0), s_sch=S.stride(1), **_strides("kn", kn, "bd"), Tmax=Tmax, scale_i=1 / math.sqrt(Di),
        HKV=Hkv, DI=Di, BS=block_size,
        HKV_P=_pow2(Hkv), DI_P=_pow2(Di, 32 if fp8 else 16), BS_P=_pow2(block_size), BLOCKS=blocks, PREC=_prec(qi),
        FP8=fp8, WRITE=write, num_warps=warps, **_pdl(qi))
    return S


def _partials(q, k_cache, v_cache, cache_lens, S, block_size, topk):
    """Step 2. q (B, Hq, D), caches (B, Hkv, Tmax, D), S (B, Hkv, nb) -> o_part (B, Hq, NS, D) float32,
    lse_part (B, Hq, NS) float32 (log2 units) and the selection block_idx (B, Hkv, K) int32, exactly
    msa_ref.select_blocks' order."""
    B, Hq, D = q.shape
    Hkv, Tmax = k_cache.shape[1], k_cache.shape[2]
    G, K, nb = Hq // Hkv, topk, S.shape[-1]
    BLOCK_N, ITEMS, warps, stages = _attend_config(B, Hkv, K, block_size)
    splits = _cdiv(block_size, BLOCK_N)
    NS = _cdiv(K * splits, ITEMS)                                                        # partials per head
    block_idx = torch.empty(B, Hkv, K, device=q.device, dtype=torch.int32)              # (B, Hkv, K)
    o_part = torch.empty(B, Hq, NS, D, device=q.device, dtype=torch.float32)            # (B, Hq, NS, D)
    lse_part = torch.empty(B, Hq, NS, device=q.device, dtype=torch.float32)             # (B, Hq, NS)
    _attend_kernel[(B * Hkv, NS)](
        q_ptr=q, k_ptr=k_cache, v_ptr=v_cache, lens_ptr=cache_lens, sc_ptr=S, idx_ptr=block_idx, o_ptr=o_part,
        lse_ptr=lse_part, **_strides("q", q, "bhd"), **_strides("k", k_cache), **_strides("v", v_cache),
        s_scb=S.stride(0), s_sch=S.stride(1), Tmax=Tmax, qk_scale=LOG2E / math.sqrt(D),
        HKV=Hkv, G=G, D=D, BS=block_size, K=K, SPLITS=splits, ITEMS=ITEMS, NS=NS,
        BLOCK_N=BLOCK_N, G_P=_pow2(G), D_P=_pow2(D), NB_P=_pow2(nb, 1), K_P=_pow2(K, 1),
        PREC=_prec(q), num_warps=warps, num_stages=stages, **_pdl(q))
    return o_part, lse_part, block_idx


def _merge(o_part, lse_part, like):
    """Step 3. Partials (B, Hq, NS, D), (B, Hq, NS) -> out (B, Hq, D) shaped and typed like `like`."""
    B, Hq, NS, D = o_part.shape
    out = torch.empty_like(like)
    _merge_kernel[(B * Hq,)](o_ptr=o_part, lse_ptr=lse_part, out_ptr=out, **_strides("o", out, "bhd"),
                             HQ=Hq, D=D, NS=NS, D_P=_pow2(D, 1), num_warps=4, **_pdl(out))
    return out


def _decode(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk, ki_scale=None, ki_new=None):
    """The three launches: out (B, Hq, D) and the selection block_idx (B, Hkv, K) int32 (for tests). cache_lens'
    values are checked in the checking mode only (a host sync)."""
    if _checking(cache_lens):
        check_cache_lens(cache_lens, k_cache.shape[2])
    cache_lens = cache_lens.contiguous()                                  # the kernels read them as (B,)
    S = _block_scores(qi, ki_cache, cache_lens, block_size, ki_scale, ki_new)           # (B, Hkv, nb)
    o_part, lse_part, block_idx = _partials(q, k_cache, v_cache, cache_lens, S, block_size, topk)
    return _merge(o_part, lse_part, q), block_idx


def sparse_decode(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk, ki_scale=None, ki_new=None):
    """
    q (B, Hq, D), qi (B, Hkv, Di), caches k/v (B, Hkv, Tmax, D) and ki (B, Tmax, Di), cache_lens int (B,)
    on q's device: tokens in each row's cache, the new token's k, v and ki already written at
    cache_lens - 1. Returns out (B, Hq, D) in q's dtype: msa_ref.sparse_decode, computed in Triton.
    An fp8 index-key cache (ki_cache float8_e4m3fn, ki_scale float32 (B, Tmax): msa_ref.fp8_quantize of the
    keys; GPU only) halves the bytes of the scoring pass; the selection is then msa_ref.index_topk(fp8=True)'s.
    ki_new (B, Di) in qi's dtype: the new token's index key, not yet in ki_cache; the scoring launch writes it at
    cache_lens - 1 (quantized as fp8_quantize does, for an fp8 cache). A decode step of an fp8 index passes it: its
    quantization is a row reduction, a launch of its own in a compiled step otherwise.
    No host sync, so capturable in a CUDA graph: the lengths are checked only in the checking mode
    (common.checks), and clamped to [1, Tmax] by the kernels.
    """
    check_decode_inputs(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk, ki_scale, values=False,
                        ki_new=ki_new)
    if ki_scale is not None and not q.is_cuda:
        raise ValueError(f"an fp8 index-key cache needs CUDA tensors, got {q.device}")
    if ki_new is None:
        return _decode_op(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk, ki_scale)
    # an fp8 cache is written as its bytes: under torch.compile, a write through the e4m3 view of a uint8 cache
    # (KVCache holds them so) would copy the whole cache, where the bytes are written in place
    held = ki_cache.view(torch.uint8) if ki_scale is not None else ki_cache
    return _decode_write_op(q, qi, k_cache, v_cache, held, cache_lens, block_size, topk, ki_scale, ki_new)


@_op("sparse_decode")
def _decode_op(q: torch.Tensor, qi: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ki_cache: torch.Tensor,
               cache_lens: torch.Tensor, block_size: int, topk: int, ki_scale: Optional[torch.Tensor]) -> torch.Tensor:
    return _decode(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk, ki_scale)[0]  # (B, Hq, D)


@_decode_op.register_fake
def _(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk, ki_scale):
    return torch.empty_like(q)


@_op("sparse_decode_write", mutates=("ki_cache", "ki_scale"))
def _decode_write_op(q: torch.Tensor, qi: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     ki_cache: torch.Tensor, cache_lens: torch.Tensor, block_size: int, topk: int,
                     ki_scale: Optional[torch.Tensor], ki_new: torch.Tensor) -> torch.Tensor:
    # sparse_decode with ki_new, written into ki_cache (an fp8 cache's bytes, uint8) and ki_scale
    keys = ki_cache.view(torch.float8_e4m3fn) if ki_scale is not None else ki_cache
    return _decode(q, qi, k_cache, v_cache, keys, cache_lens, block_size, topk, ki_scale, ki_new)[0]  # (B, Hq, D)


@_decode_write_op.register_fake
def _(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk, ki_scale, ki_new):
    return torch.empty_like(q)
