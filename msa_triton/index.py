"""
The index branch of MSA in Triton: index_topk (which blocks does each query read?) and kl_loss (teach
the index branch where the main branch looks). msa_ref.py is the definition; these compute the same
functions (DESIGN.md sections 1 and 3) without ever building a T x T tensor. Shapes and naming: common.py.

index_topk, one kernel: a program owns BLOCK_Q consecutive queries of one (batch, group) and walks
the key blocks left to right. For each block it computes the [BLOCK_Q, bs] index scores with one
matrix product, max-pools them to one score per query, and merges that score into a running top-k
kept in registers. The [Hkv, T, nb] block-score matrix is never written (2.15 GB at 128K for a
kernel that writes it) and there is no second top-k pass.
Two facts keep it simple:
  - only earlier blocks b < t // bs compete (the local block is always taken), and those are
    entirely visible, so no token-level causal mask is needed: a block score is a plain max;
  - a score and its block index pack into one int64 key (common._sortable_key), so "higher score,
    ties to the lower block" is plain integer order: the running top-k is a [BLOCK_Q, K_P] tile of
    keys where a new key replaces the row minimum if larger, and one tl.sort orders the winners.
fp8=True scores in float8 e4m3, rounded as msa_ref.fp8_quantize rounds (ki per token by torch, its scale
applied to each score column; qi per row in the kernel, common._fp8_rows): twice the matrix rate on Hopper;
the selection of msa_ref.index_topk(fp8=True) up to the fp8 MMA's accumulation, which keeps fewer bits than
fp32 (DESIGN.md section 4 gives the measured differences).

kl_loss: see the section further down.
"""
import math

import torch
import triton
import triton.language as tl

from msa_checks import check_inputs
from msa_ref import fp8_quantize
from .common import (INT64_MIN, LN2, LOG2E, LOG2E_K, _cdiv, _chunk_bounds, _chunks, _combine_kernel, _combine_unroll,
                     _fixup_kernel, _fp8_rows, _ikeys, _key_block, _keys, _kl_call, _kl_custom_op, _op, _pow2, _prec,
                     _seg_len, _segment, _segments, _slot_tile, _sortable_key, _split_segments, _strides, _token_major)


# ---------------------------------------------------------------------------------------------
# index_topk

@triton.jit
def _index_topk_kernel(qi_ptr, ki_ptr, ks_ptr, out_ptr, T, Hkv, scale_i,
                       s_qib, s_qih, s_qit, s_qid, s_kib, s_kit, s_kid, s_ob, s_oh, s_ot, s_ok,
                       BS: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr, DI: tl.constexpr, DI_P: tl.constexpr,
                       BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NCHUNK: tl.constexpr,
                       PREC: tl.constexpr, FP8: tl.constexpr):
    """One program = BLOCK_Q consecutive queries of one (batch, group): writes their rows of out (B, Hkv, T, K)."""
    bh = tl.program_id(0)                    # axis 0 varies fastest: the first wave takes the
    qt = tl.num_programs(1) - 1 - tl.program_id(1)  # last (longest) query tiles of every (b, g)
    b = (bh // Hkv).to(tl.int64)             # int64: offsets past 2^31 elements (b * s_qib, g * s_qih)
    g = (bh % Hkv).to(tl.int64)
    rows = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)                                # (BLOCK_Q,) query positions
    dcol = tl.arange(0, DI_P)                                                  # Di padded to a power of 2
    qi = tl.load(qi_ptr + b * s_qib + g * s_qih + rows.to(tl.int64)[:, None] * s_qit + dcol[None, :] * s_qid,
                 mask=(rows[:, None] < T) & (dcol[None, :] < DI), other=0.0)   # (BLOCK_Q, Di)
    if FP8:   # a positive factor per query (its scale, dropped) ranks nothing differently
        qi = _fp8_rows(qi.to(tl.float32))
    local = rows // BS                                                         # (BLOCK_Q,) each row's local block
    cols = tl.arange(0, K_P)
    # running top-k, distinct sentinels below every real key so "== row minimum" hits one column
    top = tl.full([BLOCK_Q, K_P], INT64_MIN + 1, tl.int64) + cols[None, :].to(tl.int64)  # (BLOCK_Q, K_P)
    thr = tl.min(top, axis=1)                                                  # (BLOCK_Q,) row minimum
    n_blocks = 0                                                               # earlier blocks of the last row
    if K > 1:
        n_blocks = (tl.minimum(qt * BLOCK_Q + BLOCK_Q, T) - 1) // BS
    ncol = tl.arange(0, BLOCK_N)
    for blk in range(0, n_blocks):
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        for c in tl.static_range(NCHUNK):                                      # bs in chunks of BLOCK_N keys
            n = c * BLOCK_N + ncol                                             # (BLOCK_N,) offset inside the block
            kmask = n < BS
            ki = tl.load(ki_ptr + b * s_kib + (blk * BS + n)[:, None] * s_kit + dcol[None, :] * s_kid,
                         mask=kmask[:, None] & (dcol[None, :] < DI), other=0.0)  # (BLOCK_N, Di)
            s = tl.dot(qi, tl.trans(ki), input_precision=PREC)                 # (BLOCK_Q, BLOCK_N)
            if FP8:                                                            # each key's scale (a power of 2)
                s = s * tl.load(ks_ptr + b * T + blk * BS + n, mask=kmask, other=0.0)[None, :]
            if BS % BLOCK_N != 0:
                s = tl.where(kmask[None, :], s, float("-inf"))
            m = tl.maximum(m, tl.max(s, axis=1))
        # the scale goes on after the max (x -> x c is monotone), one rounded product as in msa_ref.block_scores
        key = _sortable_key(m * scale_i, blk)                                  # (BLOCK_Q,) ties -> lower block
        key = tl.where(blk < local, key, INT64_MIN)                            # only earlier blocks compete
        hit = (top == thr[:, None]) & (key > thr)[:, None]                     # replace the row minimum
        top = tl.where(hit, key[:, None], top)
        thr = tl.min(top, axis=1)
    top = tl.sort(top, dim=1, descending=True)                                 # best first, ties -> lower block
    idx = _key_block(top)                                                      # (BLOCK_Q, K_P) block indices
    n_far = tl.minimum(local, K - 1)[:, None]                                  # earlier blocks taken
    out = tl.where(cols[None, :] < n_far, idx, -1)
    out = tl.where(cols[None, :] == n_far, local[:, None], out)                # local in the last valid slot
    tl.store(out_ptr + b * s_ob + g * s_oh + rows[:, None] * s_ot + cols[None, :] * s_ok, out,
             mask=(rows[:, None] < T) & (cols[None, :] < K))


def index_topk(qi, ki, block_size, topk, fp8=False):
    """qi (B, Hkv, T, Di), ki (B, T, Di) -> block_idx int32 (B, Hkv, T, K), the selection of msa_ref.index_topk:
    the K-1 best earlier blocks by descending block score (ties: lower block first), then the local block
    t // bs in the last valid slot, then -1. No gradient (qi and ki are read detached).
    fp8=True (GPU only) scores in float8 e4m3 (twice the matrix rate on Hopper): msa_ref.index_topk(fp8=True) up
    to the fp8 MMA's accumulation, the selection of slightly perturbed scores (DESIGN.md section 4)."""
    check_inputs(qi=qi, ki=ki, block_size=block_size, topk=topk)
    if fp8 and not qi.is_cuda:
        raise ValueError(f"fp8=True needs CUDA tensors, got {qi.device}")
    return _index_topk_op(qi.detach(), ki.detach(), block_size, topk, fp8)


@_op("index_topk")
def _index_topk_op(qi: torch.Tensor, ki: torch.Tensor, block_size: int, topk: int, fp8: bool) -> torch.Tensor:
    B, Hkv, T, Di = qi.shape
    out = torch.empty(B, Hkv, T, topk, dtype=torch.int32, device=qi.device)
    if ki.dtype != qi.dtype:
        ki = ki.to(qi.dtype)
    ks = qi                                                                    # unused unless fp8
    if fp8:
        ki, ks = fp8_quantize(ki)                                              # (B, T, Di) e4m3, (B, T)
    on_gpu = qi.is_cuda
    # tiles of queries (tuned on Hopper; dev/indexer.md): 64 at Di <= 64 (the model's shape, 1K to 16K), at Di = 128
    # 256 for long T (the M3 shape), else 128; small tiles for the interpreter
    block_q = (64 if Di <= 64 else 256 if T >= 16384 else 128) if on_gpu else 16
    block_n = min(_pow2(block_size), 128 if on_gpu else 32)
    grid = (B * Hkv, _cdiv(T, block_q))
    _index_topk_kernel[grid](
        qi_ptr=qi, ki_ptr=ki, ks_ptr=ks, out_ptr=out, T=T, Hkv=Hkv, scale_i=1 / math.sqrt(Di),
        **_strides("qi", qi), **_strides("ki", ki, "btd"), **_strides("o", out, "bhtk"),
        BS=block_size, K=topk, K_P=_pow2(topk, 2), DI=Di, DI_P=_pow2(Di), BLOCK_Q=block_q, BLOCK_N=block_n,
        NCHUNK=_cdiv(block_size, block_n), PREC=_prec(qi, ki), FP8=fp8,
        num_warps=8 if block_q >= 256 else 4, num_stages=3)
    return out


@_index_topk_op.register_fake
def _(qi, ki, block_size, topk, fp8):
    return qi.new_empty(*qi.shape[:3], topk, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# kl_loss, KV-outer over the same work lists as sparse_attention (common.py, DESIGN.md section 4)
#
# The CSR lists, for each (batch, group, KV block), the (token, slot) entries that chose the block,
# tokens ascending. Tokens run in chunks [t0, t1) so that partial buffers stay under
# common.PARTIAL_ELEMS. Two passes per chunk, each loading a block's k and ki once and running
# them against tiles of BLOCK_Q gathered entries (a tile = BLOCK_Q tokens of one group):
#   1. stats (one program per segment of a block's list): per entry, the partial log-sum-exp over
#      this block's visible tokens of every teacher head (q_h . k / sqrt(D)) and of the student
#      (qi . ki / sqrt(Di)), written as partials that pass 2 merges into lse_h and lse_u for each row.
#      The teacher half is skipped when the caller passes sparse_attention's lse, the same numbers;
#   2. loss + gradient (one program per segment of a block's list; a block's further segments write their
#      dki sums to slots that common._fixup_kernel adds in order: deterministic, no atomics):
#      p = mean_h exp(s_h - lse_h), log r = u - lse_u, loss += sum p (log p - log r); with
#      ds = (r - p) / (B Hkv T) / sqrt(Di): dki[block] += ds^T @ qi, and ds @ ki is written as a
#      partial dqi per (token, slot) that common._combine_kernel sums, as for sparse_attention's dq.
# The loss is a scalar, so its gradient is computed in pass 2 and the backward only scales it by the
# incoming gradient: two passes over the teacher's scores instead of FlashAttention's three.
# Inside the kernels logits are in log2 units (exp2; log2(e) folded into the scales).

# Entries per program of each pass, so that a block chosen by many tokens (a sink) is split over programs;
# pass 2's segments are longer because each further one costs a dki partial, but short in a small chunk
# (common._seg_len). Tuned on Hopper; see bench.py.
STATS_SEG = 64
KL_SEG = 4096
KL_SEG_SMALL = 512


@triton.jit
def _kl_block(k_ptr, ki_ptr, b, g, kb, c, T, s_kb, s_kh, s_kt, s_kd, s_kib, s_kit, s_kid, d, di,
              BS: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, BLOCK_N: tl.constexpr):
    """Chunk c of key block kb: positions j (BLOCK_N,), which are real, k (BLOCK_N, D), ki (BLOCK_N, Di)."""
    jn = c * BLOCK_N + tl.arange(0, BLOCK_N)
    j = kb * BS + jn
    kmask = (jn < BS) & (j < T)
    k = _keys(k_ptr, b, g, j, kmask, s_kb, s_kh, s_kt, s_kd, d, d < D)                 # (BLOCK_N, D_P)
    ki = _ikeys(ki_ptr, b, j, kmask, s_kib, s_kit, s_kid, di, di < DI)              # (BLOCK_N, DI_P)
    return j, kmask, k, ki


@triton.jit
def _kl_tile(ent_ptr, e0, hi, K, t0, qi_ptr, b, g, s_qib, s_qih, s_qit, s_qid, di,
             DI: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Entries e0 .. e0 + BLOCK_Q of a block's list: tloc (token in chunk), slot, t, real rows, qi (BLOCK_Q, Di)."""
    e = e0 + tl.arange(0, BLOCK_Q)
    ev = e < hi
    ent = tl.load(ent_ptr + e, mask=ev, other=0)                               # ent = tloc * K + slot
    tloc = ent // K
    t = (t0 + tloc).to(tl.int64)
    qi = tl.load(qi_ptr + b * s_qib + g.to(tl.int64) * s_qih + t[:, None] * s_qit + di[None, :] * s_qid,
                 mask=ev[:, None] & (di[None, :] < DI), other=0.0)
    return tloc, ent % K, t, ev, qi


@triton.jit
def _row_lse2(s):
    """log2-sum-exp2 of each row of s; -inf for a row of -inf."""
    m = tl.max(s, axis=1)
    m0 = tl.where(m == float("-inf"), 0.0, m)
    return m0 + tl.log2(tl.sum(tl.exp2(s - m0[:, None]), axis=1))


@triton.jit
def _kl_stats_kernel(q_ptr, k_ptr, qi_ptr, ki_ptr, ent_ptr, seg_lo_ptr, seg_hi_ptr, seg_blk_ptr, lqp_ptr, lup_ptr,
                     s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_qib, s_qih, s_qit, s_qid, s_kib, s_kit, s_kid,
                     T, t0, Tc, K: tl.constexpr, NSEG, Hkv, scale_d2, scale_i2,
                     G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                     DI: tl.constexpr, DI_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                     NCHUNK: tl.constexpr, PREC: tl.constexpr, TEACHER: tl.constexpr):
    """Pass 1. Partial lse2 of every entry over chunk c of its block, at slot * NCHUNK + c of
    lup (BH, Tc, K*NCHUNK) for the student and, with TEACHER, lqp (BH, Tc, K*NCHUNK, G) for each head."""
    b, g, bh, lo, hi, kb = _segment(seg_lo_ptr, seg_hi_ptr, seg_blk_ptr, NSEG, Hkv)
    ent_b = ent_ptr + bh.to(tl.int64) * Tc * K
    d = tl.arange(0, D_P)
    di = tl.arange(0, DI_P)
    for c in tl.static_range(NCHUNK):                                          # bs in chunks of BLOCK_N keys
        j, kmask, k, ki = _kl_block(k_ptr, ki_ptr, b, g, kb, c, T, s_kb, s_kh, s_kt, s_kd, s_kib, s_kit, s_kid,
                                    d, di, BS, D, DI, BLOCK_N)
        for e0 in range(lo, hi, BLOCK_Q):
            tloc, slot, t, ev, qi = _kl_tile(ent_b, e0, hi, K, t0, qi_ptr, b, g, s_qib, s_qih, s_qit, s_qid, di,
                                             DI, BLOCK_Q)
            vis = ev[:, None] & kmask[None, :] & (j[None, :] <= t[:, None])  # causal inside the local block
            u = tl.where(vis, tl.dot(qi, tl.trans(ki), input_precision=PREC) * scale_i2,
                         float("-inf"))                                        # (BLOCK_Q, BLOCK_N)
            po = (bh.to(tl.int64) * Tc + tloc) * (K * NCHUNK) + slot * NCHUNK + c      # (BLOCK_Q,) partial slot
            tl.store(lup_ptr + po, _row_lse2(u), mask=ev)
            if TEACHER:
                for h in range(G):
                    hq = (g * G + h).to(tl.int64)                                       # head h of the group
                    q = tl.load(q_ptr + b * s_qb + hq * s_qh + t[:, None] * s_qt + d[None, :] * s_qd,
                                mask=ev[:, None] & (d[None, :] < D), other=0.0)  # (BLOCK_Q, D) head h
                    s = tl.where(vis, tl.dot(q, tl.trans(k), input_precision=PREC) * scale_d2, float("-inf"))
                    tl.store(lqp_ptr + po * G + h, _row_lse2(s), mask=ev)


@triton.jit
def _kl_loss_kernel(q_ptr, k_ptr, qi_ptr, ki_ptr, ent_ptr, seg_lo_ptr, seg_hi_ptr, seg_blk_ptr, seg_x_ptr,
                    lq_ptr, lup_ptr, loss_ptr, dqp_ptr, dki_ptr, dkip_ptr,
                    s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_qib, s_qih, s_qit, s_qid, s_kib, s_kit, s_kid,
                    T, t0, Tc, K: tl.constexpr, NSEG, NX, Hkv, scale_d2, scale_i2, loss_scale, grad_scale,
                    G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
                    DI: tl.constexpr, DI_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                    NCHUNK: tl.constexpr, KN_P: tl.constexpr, PREC: tl.constexpr, GRAD: tl.constexpr,
                    TEACHER: tl.constexpr, FRESH: tl.constexpr):
    """Pass 2, one program per segment of a KV block's list (common._split_segments). The rows' lse2 come from
    pass 1's partials, merged here: the student's from lup (BH, Tc, K*NCHUNK), each teacher head's from lq, the
    partials (BH, Tc, K*NCHUNK, G) with TEACHER, else from the lse (B, Hq, T) that sparse_attention gave.
    loss (BH, NSEG): loss_scale x the sum over the segment's entries of p (log2 p - log2 r). With GRAD: the partial
    dqi ds @ ki of each entry into dqp (BH, Tc, K*NCHUNK, Di), and ds^T @ qi, summed over the segment, added to the
    block's rows of dki (B, Hkv, T, Di) fp32 by its first segment (seg_x = -1) or stored in slot seg_x of dkip for
    common._fixup_kernel. FRESH (one chunk of tokens): the first segment stores its sum, into dki left unzeroed."""
    b, g, bh, lo, hi, kb = _segment(seg_lo_ptr, seg_hi_ptr, seg_blk_ptr, NSEG, Hkv)
    x = tl.load(seg_x_ptr + bh * NSEG + tl.program_id(0))
    ent_b = ent_ptr + bh.to(tl.int64) * Tc * K
    d = tl.arange(0, D_P)
    di = tl.arange(0, DI_P)
    kn = tl.arange(0, KN_P)                                                    # a row's partials
    loss = tl.zeros([BLOCK_Q], tl.float32)
    for c in tl.static_range(NCHUNK):
        j, kmask, k, ki = _kl_block(k_ptr, ki_ptr, b, g, kb, c, T, s_kb, s_kh, s_kt, s_kd, s_kib, s_kit, s_kid,
                                    d, di, BS, D, DI, BLOCK_N)
        dki = tl.zeros([BLOCK_N, DI_P], tl.float32)
        for e0 in range(lo, hi, BLOCK_Q):
            tloc, slot, t, ev, qi = _kl_tile(ent_b, e0, hi, K, t0, qi_ptr, b, g, s_qib, s_qih, s_qit, s_qid, di,
                                             DI, BLOCK_Q)
            vis = ev[:, None] & kmask[None, :] & (j[None, :] <= t[:, None])
            row = bh.to(tl.int64) * Tc + tloc                                  # (BLOCK_Q,) row of (BH, Tc)
            pm = ev[:, None] & (kn[None, :] < K * NCHUNK)
            part = row[:, None] * (K * NCHUNK) + kn[None, :]                   # (BLOCK_Q, KN_P) the row's partials
            lu = tl.where(ev, _row_lse2(tl.load(lup_ptr + part, mask=pm, other=float("-inf"))), 0.0)
            log_r = tl.dot(qi, tl.trans(ki), input_precision=PREC) * scale_i2 - lu[:, None]
            p = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
            for h in tl.range(0, G, num_stages=2):                              # head h + 1's q loads during h
                hq = (g * G + h).to(tl.int64)                                           # head h of the group
                q = tl.load(q_ptr + b * s_qb + hq * s_qh + t[:, None] * s_qt + d[None, :] * s_qd,
                            mask=ev[:, None] & (d[None, :] < D), other=0.0)
                if TEACHER:                                                    # merged from pass 1's partials
                    lse_h = tl.where(ev, _row_lse2(tl.load(lq_ptr + part * G + h, mask=pm, other=float("-inf"))), 0.0)
                else:                                                          # lse (B, Hq, T) -> log2
                    lse_h = tl.load(lq_ptr + (bh.to(tl.int64) * G + h) * T + t, mask=ev, other=0.0) * LOG2E_K
                p += tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * scale_d2 - lse_h[:, None])
            p = tl.where(vis, p / G, 0.0)                                      # (BLOCK_Q, BLOCK_N) teacher
            loss += tl.sum(tl.where(p > 0, p * (tl.log2(tl.where(p > 0, p, 1.0)) - log_r), 0.0), axis=1)
            if GRAD:
                ds = (tl.where(vis, tl.exp2(log_r), 0.0) - p) * grad_scale     # d loss / d (qi . ki)
                po = (row * (K * NCHUNK) + slot * NCHUNK + c)                  # (BLOCK_Q,) partial slot
                dq = tl.dot(ds.to(ki.dtype), ki, input_precision=PREC)        # (BLOCK_Q, DI_P)
                tl.store(dqp_ptr + po[:, None] * DI + di[None, :], dq.to(dqp_ptr.dtype.element_ty),
                         mask=ev[:, None] & (di[None, :] < DI))
                dki += tl.dot(tl.trans(ds.to(qi.dtype)), qi, input_precision=PREC)
        if GRAD:
            if lo < hi:                                                        # (a spare program writes nothing)
                if x < 0:
                    dptr = dki_ptr + ((b * Hkv + g) * T + j[:, None]) * DI + di[None, :]
                    dmask = kmask[:, None] & (di[None, :] < DI)
                    if not FRESH:                                              # chunks of T add up
                        dki = tl.load(dptr, mask=dmask, other=0.0) + dki
                    tl.store(dptr, dki, mask=dmask)
                else:
                    tl.store(dkip_ptr + _slot_tile(bh, x, c, NX, NCHUNK, BLOCK_N, DI_P), dki)
    tl.store(loss_ptr + bh * NSEG + tl.program_id(0), tl.sum(loss, axis=0) * loss_scale)


def _kl_launch(q, k, qi, ki, block_idx, block_size, grad, lse=None, lists=()):
    """Both passes, chunk by chunk of tokens. Returns the loss (fp32 scalar) and, with grad, d loss / d qi
    (B, Hkv, T, Di), token-major (common._token_major), and d loss / d ki (B, T, Di), in qi's dtype (ki's).
    lse: sparse_attention's (B, Hq, T), or None. lists: the attention's work lists for this block_idx (flat, as
    attention._forward returns them), or ()."""
    B, Hq, T, D = q.shape
    Hkv, Di = qi.shape[1], qi.shape[3]
    G, BH, K = Hq // Hkv, B * Hkv, block_idx.shape[3]
    dev = q.device
    on_gpu = q.is_cuda
    block_q = 64 if on_gpu else 16        # tiles of 64 entries x a block (tuned on Hopper; see bench.py)
    block_n = min(_pow2(block_size), 128 if on_gpu else 32)
    # pass 2's launch: 8 warps for 128-key tiles; 4 and no software pipelining for 64 keys or fewer
    loss_opts = dict(num_warps=8) if block_n > 64 else dict(num_warps=4, num_stages=1)
    nchunk = _cdiv(block_size, block_n)
    meta = dict(G=G, BS=block_size, D=D, D_P=_pow2(D), DI=Di, DI_P=_pow2(Di), BLOCK_Q=block_q,
                BLOCK_N=block_n, NCHUNK=nchunk, PREC=_prec(q, qi),
                **_strides("q", q), **_strides("k", k), **_strides("qi", qi), **_strides("ki", ki, "btd"))
    scale_d2, scale_i2 = LOG2E / math.sqrt(D), LOG2E / math.sqrt(Di)
    n_rows = B * Hkv * T
    lq_all = None if lse is None else lse.contiguous()                          # (B, Hq, T), natural log
    dqi = _token_major(B, Hkv, T, Di, dtype=qi.dtype, device=dev) if grad else None
    fresh = len(_chunk_bounds(B, Hkv, T, K, nchunk * max(G, Di), block_size)) == 1   # one chunk: no zeros needed
    dki = (torch.empty if fresh else torch.zeros)(B, Hkv, T, Di, dtype=torch.float32, device=dev) if grad else None
    losses = []
    # chunks of tokens whose partials (nchunk per slot, of G teacher lse or Di dqi values) fit PARTIAL_ELEMS; the
    # attention's lists serve where it cut the same chunks (the model's shapes: one chunk)
    dki_out = torch.empty(B, T, Di, dtype=ki.dtype, device=dev) if grad else None  # the groups' sum, at the end
    for t0, t1, nbc, slots, ent, start, cnt in _chunks(block_idx, nchunk * max(G, Di), block_size, lists):
        lo, hi, blk = _segments(start, cnt, (t1 - t0) * K, STATS_SEG)
        # pass 1: partial lse2 per (token, slot, chunk); slots never written stay -inf
        lup = torch.full((BH, t1 - t0, K * nchunk), float("-inf"), dtype=torch.float32, device=dev)
        lqp = (torch.full((BH, t1 - t0, K * nchunk, G), float("-inf"), dtype=torch.float32, device=dev)
               if lq_all is None else lup)
        _kl_stats_kernel[(lo.shape[1], BH)](
            q_ptr=q, k_ptr=k, qi_ptr=qi, ki_ptr=ki, ent_ptr=ent, seg_lo_ptr=lo, seg_hi_ptr=hi, seg_blk_ptr=blk,
            lqp_ptr=lqp, lup_ptr=lup, T=T, t0=t0, Tc=t1 - t0, K=K, NSEG=lo.shape[1], Hkv=Hkv,
            scale_d2=scale_d2, scale_i2=scale_i2, TEACHER=lq_all is None, num_warps=4, **meta)
        lq = lqp if lq_all is None else lq_all                                 # partials, or the rows' lse
        # pass 2: the rows' lse2 from the partials, the loss (log2 -> natural log, / rows: the mean), and its gradient
        # while the scores are at hand
        lo, hi, blk, x, xbase, xcnt, nx = _split_segments(start, cnt, (t1 - t0) * K,
                                                             _seg_len(BH * (t1 - t0) * K, KL_SEG_SMALL, KL_SEG))
        loss = torch.empty(BH, lo.shape[1], dtype=torch.float32, device=dev)
        dqp = torch.empty(BH, t1 - t0, K * nchunk, Di, dtype=qi.dtype, device=dev) if grad else loss
        dkip = torch.empty(BH, nx, nchunk, block_n, meta["DI_P"], dtype=torch.float32, device=dev) if grad else loss
        _kl_loss_kernel[(lo.shape[1], BH)](
            q_ptr=q, k_ptr=k, qi_ptr=qi, ki_ptr=ki, ent_ptr=ent, seg_lo_ptr=lo, seg_hi_ptr=hi, seg_blk_ptr=blk,
            seg_x_ptr=x, lq_ptr=lq, lup_ptr=lup, loss_ptr=loss, dqp_ptr=dqp, dki_ptr=dki if grad else loss,
            dkip_ptr=dkip, T=T, t0=t0, Tc=t1 - t0, K=K, NSEG=lo.shape[1], NX=nx, Hkv=Hkv, scale_d2=scale_d2,
            scale_i2=scale_i2, loss_scale=LN2 / n_rows, grad_scale=LN2 / (n_rows * math.sqrt(Di)) * LOG2E,
            KN_P=_pow2(K * nchunk, 1), GRAD=grad, TEACHER=lq_all is None, FRESH=fresh, **loss_opts, **meta)
        del lup, lqp
        if grad:   # the last chunk's fix-up (the chunks run in order up to T) also sums dki over the groups
            last = t1 == T
            _fixup_kernel[(nbc, B if last else BH, nchunk)](
                x_ptr=dki, xp_ptr=dkip, xbase_ptr=xbase, xcnt_ptr=xcnt, cnt_ptr=cnt, o_ptr=dki_out,
                **_strides("o", dki_out[:, None], "bht_"), T=T, NBC=nbc, NX=nx, BS=block_size, D=Di, HO=1,
                NG=Hkv if last else 1, NSUB=nchunk, BLOCK_N=block_n, D_P=meta["DI_P"], OUT=last, FRESH=fresh)
        losses.append(loss)
        if grad:                                                               # dqi = sum of the K partials
            _combine_kernel[(_cdiv(t1 - t0, 32), BH)](
                op_ptr=dqp, lp_ptr=dqp, slots_ptr=slots, o_ptr=dqi, lse_ptr=dqi, **_strides("o", dqi, "bht_"), T=T,
                t0=t0, Tc=t1 - t0, K=K, Hkv=Hkv, D=Di, G=1, G_P=1, ROWS=32, D_P=_pow2(Di), WITH_LSE=False, NSUB=nchunk,
                UNROLL=_combine_unroll(K, nchunk), num_warps=4)
    loss = (torch.cat(losses, 1) if len(losses) > 1 else losses[0]).sum()      # the mean, in natural log
    return loss, dqi, dki_out


_kl_op = _kl_custom_op("kl_loss", _kl_launch)


def kl_loss(q, k, qi, ki, block_idx, block_size, lse=None, lists=()):
    """msa_ref.kl_loss on the GPU (or the Triton interpreter): mean over (b, g, t) of KL(p || r) on the
    support of block_idx. Differentiable in qi and ki only; q and k are a target and get no gradient.
    lse: optional fp32 (B, Hq, T), the lse that msa_triton.sparse_attention returned for these q, k and
    block_idx: it is the teacher's per-head lse over the support, so passing it skips recomputing it.
    lists: optional, the work lists that the attention built for this block_idx (attention.sparse_attention with
    with_lists=True), so that these passes do not build them again.
    No host sync: block_idx's values are checked only in the checking mode (common.checks)."""
    return _kl_call(_kl_op, q, k, qi, ki, block_idx, block_size, lse, lists=lists)
