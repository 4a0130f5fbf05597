"""
The fused block-sparse attention of MSA in Triton: sparse_attention (forward and backward) and the
query-outer baseline forward. msa_ref.sparse_attention is the definition; these compute the same
function (DESIGN.md section 3) without ever building a T x T tensor. Shapes and naming: common.py.

sparse_attention runs KV-outer (DESIGN.md section 4):
  1. invert block_idx into a CSR: for each (batch, group, KV block), the list of (token, slot)
     entries that chose it, sorted by token (common._chunks: three Triton launches, no host sync);
  2. forward: one program per segment of one block's list loads that K/V block once and runs it
     against tiles of gathered queries (rows = queries x G heads), writing a partial (out, lse) into
     the slot the block has in each query's list; a combine kernel merges the K partials by LSE;
  3. backward, over the same lists: delta = rowsum(out * dout); one program per segment of a block's
     list accumulates dK, dV in registers and writes a partial dQ per (query, slot); a block's first
     segment adds its dK, dV into the result, a fix-up kernel adds the further segments' in order (no
     atomics: deterministic); a combine kernel sums the K dQ partials.
Partial buffers are bounded by running over chunks of query tokens (common.PARTIAL_ELEMS).
attention_forward_query_outer is the simple baseline (one program per token and group, looping over
its K blocks, like the public vLLM / NSA kernels); bench.py measures both.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from msa_checks import check_block_idx
from .common import (LN2_K, LOG2E, LOG2E_K, _attention_autograd, _cdiv, _check_attention, _checking, _chunk_bounds,
                     _chunks, _combine_kernel, _combine_unroll, _fixup_kernel, _keys, _load_rows, _op, _pow2, _prec,
                     _seg_len, _segment, _segments, _slot_tile, _slots, _softmax_finish, _softmax_rescale,
                     _split_segments, _strides, _token_major)

# Entries per program: a block chosen by many tokens (block 0, a sink) is split over programs, so that no
# program walks all of T while the rest of the launch waits. The backward's segments are longer because
# each further segment costs a dK, dV partial and a fix-up pass, but short in a small chunk (_seg_len).
# Tuned on Hopper; see bench.py.
SEG = 128
BWD_SEG = 1024
BWD_SEG_SMALL = 256


# ---------------------------------------------------------------------------------------------
# kernels

@triton.jit
def _tile_rows(ent_ptr, i, hi, G: tl.constexpr, G_P: tl.constexpr, ROWS: tl.constexpr):
    """Rows of a tile of gathered queries: row r = (entry i + r // G_P of a block's list, head r % G_P).
    Returns per row: ent = token_in_chunk * K + slot, h (head in group), rv (a real row)."""
    r = tl.arange(0, ROWS)
    e = i + r // G_P
    h = r % G_P
    rv = (e < hi) & (h < G)
    return tl.load(ent_ptr + e, mask=rv, other=0), h, rv


@triton.jit
def _kv_block(k_ptr, v_ptr, b, g, kb, jn, T, BS, D, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
              D_P: tl.constexpr):
    """Keys kb * BS + jn of group g, the tile every KV-outer program holds while it walks its entries.
    Returns the key positions n (BLOCK_N,), their mask (inside the block and < T), the head-dim offsets d and
    mask, the (BLOCK_N, D_P) mask of both, and the K and V tiles (zeros where masked)."""
    n = kb * BS + jn
    kmask = (jn < BS) & (n < T)
    d = tl.arange(0, D_P)
    dmask = d < D
    kvm = kmask[:, None] & dmask[None, :]
    k = _keys(k_ptr, b, g, n, kmask, s_kb, s_kh, s_kt, s_kd, d, dmask)                # (BLOCK_N, D_P)
    v = _keys(v_ptr, b, g, n, kmask, s_vb, s_vh, s_vt, s_vd, d, dmask)
    return n, kmask, d, dmask, kvm, k, v


@triton.jit
def _fwd_kv_kernel(q_ptr, k_ptr, v_ptr, op_ptr, lp_ptr, ent_ptr, seg_lo_ptr, seg_hi_ptr, seg_blk_ptr,
                   s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                   T, t0, Tc, K: tl.constexpr, NSEG, Hkv, BS, D, scale2,
                   G: tl.constexpr, G_P: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                   D_P: tl.constexpr, PREC: tl.constexpr):
    """One program = one segment of one KV block's list of (token, slot) entries, for one (batch, group).
    Writes the block's partial out (normalised) and lse2 into op (BH, Tc, K, G, D) and lp (BH, Tc, K, G)."""
    b, g, bh, lo, hi, kb = _segment(seg_lo_ptr, seg_hi_ptr, seg_blk_ptr, NSEG, Hkv)
    if lo < hi:
        jn = tl.arange(0, BLOCK_N)
        n, kmask, d, dmask, kvm, k, v = _kv_block(k_ptr, v_ptr, b, g, kb, jn, T, BS, D, s_kb, s_kh, s_kt, s_kd,
                                                  s_vb, s_vh, s_vt, s_vd, D_P)  # k, v (BLOCK_N, D_P)
        ent_b = ent_ptr + bh.to(tl.int64) * Tc * K
        STEP: tl.constexpr = ROWS // G_P                                       # tokens per tile
        # software pipeline: entry ids two tiles ahead, gathered q rows one tile ahead, so neither
        # the index load nor the gather it feeds stalls the tile being computed
        ent, h, rv = _tile_rows(ent_b, lo, hi, G, G_P, ROWS)
        ent_n, h, rv_n = _tile_rows(ent_b, lo + STEP, hi, G, G_P, ROWS)
        q = _load_rows(q_ptr, b, g * G + h, t0 + ent // K, rv, s_qb, s_qh, s_qt, s_qd, d, dmask)  # (ROWS, D_P)
        for i in range(lo, hi, STEP):
            ent_nn, h, rv_nn = _tile_rows(ent_b, i + 2 * STEP, hi, G, G_P, ROWS)
            q_n = _load_rows(q_ptr, b, g * G + h, t0 + ent_n // K, rv_n, s_qb, s_qh, s_qt, s_qd, d, dmask)
            tloc = ent // K
            slot = ent % K
            t = t0 + tloc
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2         # (ROWS, BLOCK_N)
            vis = rv[:, None] & kmask[None, :] & (n[None, :] <= t[:, None])  # causal inside the block
            s = tl.where(vis, s, float("-inf"))
            m = tl.max(s, 1)
            m = tl.where(m == float("-inf"), 0.0, m)                           # a row seeing nothing: p = 0
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, 1)
            o = tl.dot(p.to(v.dtype), v, input_precision=PREC)                # (ROWS, D_P)
            ls, lse2 = _softmax_finish(m, l)
            o = o / ls[:, None]
            po = ((bh.to(tl.int64) * Tc + tloc) * K + slot) * G + h            # (ROWS,) partial row index
            tl.store(op_ptr + po[:, None] * D + d[None, :], o.to(op_ptr.dtype.element_ty), mask=rv[:, None] & dmask[None, :])
            tl.store(lp_ptr + po, lse2, mask=rv)
            q, ent, rv, ent_n, rv_n = q_n, ent_n, rv_n, ent_nn, rv_nn


@triton.jit
def _fwd_query_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, slots_ptr,
                      s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                      T, K, Hkv, BS, D, scale2,
                      G: tl.constexpr, G_P: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr,
                      PREC: tl.constexpr):
    """The query-outer baseline: one program = one token t and one (batch, group); the G heads are the
    rows (padded to G_P >= 16); loop over the token's K blocks with an online softmax."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    h = tl.arange(0, G_P)
    d = tl.arange(0, D_P)
    jn = tl.arange(0, BLOCK_N)
    hm = h[:, None] < G
    dm = d[None, :] < D
    q = tl.load(q_ptr + b * s_qb + (g * G + h).to(tl.int64)[:, None] * s_qh + t.to(tl.int64) * s_qt + d[None, :] * s_qd,
                mask=hm & dm, other=0.0)
    acc = tl.zeros((G_P, D_P), dtype=tl.float32)
    m = tl.full((G_P,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((G_P,), dtype=tl.float32)
    for s in range(K):
        kb = tl.load(slots_ptr + (bh.to(tl.int64) * T + t) * K + s)
        if kb >= 0:
            n = kb * BS + jn
            kmask = (jn < BS) & (n <= t)
            k = tl.load(k_ptr + b * s_kb + g.to(tl.int64) * s_kh + n.to(tl.int64)[:, None] * s_kt + d[None, :] * s_kd,
                        mask=kmask[:, None] & dm, other=0.0)
            v = tl.load(v_ptr + b * s_vb + g.to(tl.int64) * s_vh + n.to(tl.int64)[:, None] * s_vt + d[None, :] * s_vd,
                        mask=kmask[:, None] & dm, other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            sc = tl.where(kmask[None, :], sc, float("-inf"))
            m, m_ref, alpha = _softmax_rescale(m, tl.max(sc, 1))
            p = tl.exp2(sc - m_ref[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    ls, lse2 = _softmax_finish(m, l)
    orow = (b * Hkv * G + g * G + h) * T + t                                   # (G_P,) rows of (B, Hq, T)
    tl.store(lse_ptr + orow, lse2 * LN2_K, mask=h < G)
    tl.store(o_ptr + orow[:, None] * D + d[None, :], (acc / ls[:, None]).to(o_ptr.dtype.element_ty), mask=hm & dm)


@triton.jit
def _delta_kernel(o_ptr, do_ptr, delta_ptr, T, Hq, s_ob, s_oh, s_ot, s_od, s_dob, s_doh, s_dot, s_dod, D,
                  ROWS: tl.constexpr, D_P: tl.constexpr):
    """Grid (B * Hq, cdiv(T, ROWS)): delta (B, Hq, T) fp32 = rowsum(out * dout), the softmax-backward term of every
    row. The (batch, head) comes from the grid, so no row index is divided on the device."""
    bh = tl.program_id(0)
    b = bh // Hq
    h = bh % Hq
    t = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, D_P)
    tv = t < T
    msk = tv[:, None] & (d[None, :] < D)
    orow = b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + t.to(tl.int64) * s_ot  # (ROWS,) row starts
    dorow = b.to(tl.int64) * s_dob + h.to(tl.int64) * s_doh + t.to(tl.int64) * s_dot
    o = tl.load(o_ptr + orow[:, None] + d[None, :] * s_od, mask=msk, other=0.0)
    do = tl.load(do_ptr + dorow[:, None] + d[None, :] * s_dod, mask=msk, other=0.0)
    tl.store(delta_ptr + bh.to(tl.int64) * T + t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=tv)


@triton.jit
def _bwd_kv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dqp_ptr, dk_ptr, dv_ptr, dkp_ptr, dvp_ptr,
                   dko_ptr, dvo_ptr, xcnt_ptr, ent_ptr, seg_lo_ptr, seg_hi_ptr, seg_blk_ptr, seg_x_ptr,
                   s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd, s_dob, s_doh, s_dot, s_dod,
                   s_ob, s_oh, s_ot, T, t0, Tc, K: tl.constexpr, NSEG, NX, NBC, Hkv, BS, D, scale, scale2,
                   G: tl.constexpr, G_P: tl.constexpr, ROWS: tl.constexpr, NSUB: tl.constexpr,
                   BLOCK_N: tl.constexpr, D_P: tl.constexpr, PREC: tl.constexpr, FRESH: tl.constexpr):
    """One program = keys [sub * BLOCK_N, (sub + 1) * BLOCK_N) of one KV block (NSUB parts per block) of one
    (batch, group), over one segment of the (token, slot) entries of the chunk that chose the block.
    Writes each row's partial dQ into dqp (BH, Tc, K * NSUB, G, D) at slot * NSUB + sub. A block's first
    segment (seg_x = -1) adds its dK, dV into dk, dv (B, Hkv, T, D) fp32; a further one (a block chosen by
    many tokens) stores them in slot seg_x of dkp, dvp (BH, NX, NSUB, BLOCK_N, D_P) for _fixup_kernel:
    no atomics, so the sums are deterministic. FRESH (one chunk of tokens): the first segment stores its sums
    instead, into dk, dv left unzeroed; and the only segment of a block (xcnt (BH, NBC) = 0 further ones) stores
    its finished rows straight into dko, dvo (dK, dV in k's and v's dtype, strides s_o*), which the fix-up
    pass then leaves alone."""
    b, g, bh, lo, hi, kb = _segment(seg_lo_ptr, seg_hi_ptr, seg_blk_ptr, NSEG, Hkv)
    sub = tl.program_id(2)
    if lo < hi:
        jn = sub * BLOCK_N + tl.arange(0, BLOCK_N)                             # key offsets inside the block
        n, kmask, d, dmask, kvm, k, v = _kv_block(k_ptr, v_ptr, b, g, kb, jn, T, BS, D, s_kb, s_kh, s_kt, s_kd,
                                                  s_vb, s_vh, s_vt, s_vd, D_P)  # k, v (BLOCK_N, D_P)
        dk = tl.zeros((BLOCK_N, D_P), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, D_P), dtype=tl.float32)
        ent_b = ent_ptr + bh.to(tl.int64) * Tc * K
        STEP: tl.constexpr = ROWS // G_P
        # software pipeline as in the forward: entry ids two tiles ahead, row data one tile ahead
        ent, h, rv = _tile_rows(ent_b, lo, hi, G, G_P, ROWS)
        ent_n, h, rv_n = _tile_rows(ent_b, lo + STEP, hi, G, G_P, ROWS)
        t = t0 + ent // K
        q = _load_rows(q_ptr, b, g * G + h, t, rv, s_qb, s_qh, s_qt, s_qd, d, dmask)  # (ROWS, D_P)
        do = _load_rows(do_ptr, b, g * G + h, t, rv, s_dob, s_doh, s_dot, s_dod, d, dmask)
        row = ((b * Hkv + g) * G + h) * T + t                                  # (ROWS,) rows of (B, Hq, T)
        lse2 = tl.load(lse_ptr + row, mask=rv, other=0.0) * LOG2E_K
        delta = tl.load(delta_ptr + row, mask=rv, other=0.0)
        for i in range(lo, hi, STEP):
            ent_nn, h, rv_nn = _tile_rows(ent_b, i + 2 * STEP, hi, G, G_P, ROWS)
            t_n = t0 + ent_n // K
            q_n = _load_rows(q_ptr, b, g * G + h, t_n, rv_n, s_qb, s_qh, s_qt, s_qd, d, dmask)
            do_n = _load_rows(do_ptr, b, g * G + h, t_n, rv_n, s_dob, s_doh, s_dot, s_dod, d, dmask)
            row_n = ((b * Hkv + g) * G + h) * T + t_n
            lse2_n = tl.load(lse_ptr + row_n, mask=rv_n, other=0.0) * LOG2E_K
            delta_n = tl.load(delta_ptr + row_n, mask=rv_n, other=0.0)
            tloc = ent // K
            slot = ent % K
            t = t0 + tloc
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2          # (ROWS, BLOCK_N)
            vis = rv[:, None] & kmask[None, :] & (n[None, :] <= t[:, None])
            p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)                 # the forward's probabilities
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)                # (ROWS, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale      # (ROWS, D_P)
            po = ((bh.to(tl.int64) * Tc + tloc) * K + slot) * NSUB + sub       # (ROWS,) partial slot
            tl.store(dqp_ptr + (po * G + h)[:, None] * D + d[None, :], dq.to(dqp_ptr.dtype.element_ty),
                     mask=rv[:, None] & dmask[None, :])
            q, do, lse2, delta, ent, rv, ent_n, rv_n = q_n, do_n, lse2_n, delta_n, ent_n, rv_n, ent_nn, rv_nn
        x = tl.load(seg_x_ptr + bh * NSEG + tl.program_id(0))
        if x < 0:
            dk = dk * scale
            further = 1                                                        # the block's further segments
            if FRESH:
                further = tl.load(xcnt_ptr + bh * NBC + kb)
            if further == 0:                                                   # the whole sum: finished rows
                oo = b.to(tl.int64) * s_ob + g.to(tl.int64) * s_oh + n.to(tl.int64)[:, None] * s_ot + d[None, :]
                tl.store(dko_ptr + oo, dk.to(dko_ptr.dtype.element_ty), mask=kvm)
                tl.store(dvo_ptr + oo, dv.to(dvo_ptr.dtype.element_ty), mask=kvm)
            else:
                kvo = (b * Hkv + g) * T * D + n[:, None] * D + d[None, :]
                if not FRESH:                                                  # chunks of T add up
                    dk = tl.load(dk_ptr + kvo, mask=kvm, other=0.0) + dk
                    dv = tl.load(dv_ptr + kvo, mask=kvm, other=0.0) + dv
                tl.store(dk_ptr + kvo, dk, mask=kvm)
                tl.store(dv_ptr + kvo, dv, mask=kvm)
        else:
            xo = _slot_tile(bh, x, sub, NX, NSUB, BLOCK_N, D_P)
            tl.store(dkp_ptr + xo, dk * scale)
            tl.store(dvp_ptr + xo, dv)


# ---------------------------------------------------------------------------------------------
# launchers

def _consts(q, block_size):
    """Compile-time constants shared by every kernel of one call."""
    return dict(BLOCK_N=_pow2(block_size), D_P=_pow2(q.shape[3]), PREC=_prec(q))


def _tiles(kind, D, G_P, BLOCK_N):
    """Tile shape and launch options of the 'fwd' and 'bwd' KV-outer kernels and of the 'combine' kernel (tuned on
    Hopper; see bench.py): ROWS = tokens x G_P heads per tile; BLOCK_N keys per program (a backward program may
    take part of a block: fewer registers, but one more dq partial per slot); maxnreg caps registers per thread
    so that more programs share an SM (None: the compiler's choice)."""
    if kind == "combine":
        # 32 rows a program: many programs, many loads in flight per SM; 4 warps at the model's D = 64, 2 at D = 128
        return dict(ROWS=max(G_P, 32), num_warps=4 if D <= 64 else 2)
    if kind == "fwd":   # at D = 64 a cap of 168 registers fits three programs on an SM (two at the compiler's 185)
        return dict(ROWS=max(G_P, 64), BLOCK_N=BLOCK_N, num_warps=4, num_stages=1, maxnreg=168 if D <= 64 else None)
    if D > 64:   # whole blocks, 2 tokens x 16 heads a tile: half the dq partials and gathers of 64 x 64 tiles
        return dict(ROWS=max(G_P, 32), BLOCK_N=BLOCK_N, num_warps=8, num_stages=2, maxnreg=None)
    return dict(ROWS=max(G_P, 64), BLOCK_N=min(BLOCK_N, 64), num_warps=4, num_stages=2, maxnreg=None)


def _launch_opts(t):
    """Kernel keyword arguments from a _tiles dict: the options set (maxnreg None: the compiler's choice)."""
    return {k: v for k, v in t.items() if v is not None}


def _forward(q, k, v, block_idx, block_size):
    """KV-outer forward. Returns out (B, Hq, T, D) in q's dtype, token-major (common._token_major), lse fp32
    (B, Hq, T) and the work lists, flat: slots, ent, start, cnt of each chunk in turn (common._chunks)."""
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], block_idx.shape[3]
    G = Hq // Hkv
    G_P = _pow2(G, 1)
    c = _consts(q, block_size)
    tiles = _launch_opts(_tiles("fwd", D, G_P, c["BLOCK_N"]))
    ct = _tiles("combine", D, G_P, c["BLOCK_N"])
    out = _token_major(B, Hq, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    lists = []
    for t0, t1, nbc, slots, ent, start, cnt in _chunks(block_idx, G * D, block_size):
        lists += [slots, ent, start, cnt]
        lo, hi, blk = _segments(start, cnt, (t1 - t0) * K, SEG)
        op = torch.empty(B * Hkv, t1 - t0, K, G, D, device=q.device, dtype=q.dtype)  # partial outs
        lp = torch.empty(B * Hkv, t1 - t0, K, G, device=q.device, dtype=torch.float32)  # partial lse2
        _fwd_kv_kernel[(lo.shape[1], B * Hkv)](
            q_ptr=q, k_ptr=k, v_ptr=v, op_ptr=op, lp_ptr=lp, ent_ptr=ent, seg_lo_ptr=lo, seg_hi_ptr=hi, seg_blk_ptr=blk,
            **_strides("q", q), **_strides("k", k), **_strides("v", v),
            T=T, t0=t0, Tc=t1 - t0, K=K, NSEG=lo.shape[1], Hkv=Hkv, BS=block_size, D=D, scale2=LOG2E / math.sqrt(D),
            G=G, G_P=G_P, D_P=c["D_P"], PREC=c["PREC"], **tiles)
        _combine_kernel[(_cdiv(t1 - t0, ct["ROWS"] // G_P), B * Hkv)](
            op_ptr=op, lp_ptr=lp, slots_ptr=slots, o_ptr=out, lse_ptr=lse, **_strides("o", out, "bht_"), T=T, t0=t0,
            Tc=t1 - t0, K=K, Hkv=Hkv, D=D, G=G, G_P=G_P, D_P=c["D_P"], WITH_LSE=True, NSUB=1,
            UNROLL=_combine_unroll(K, 1), **ct)
    return out, lse, lists


def _backward(q, k, v, out, lse, dout, lists, block_size, dlse=None):
    """KV-outer backward over the forward's work lists (flat, as _forward returns them): dK, dV summed per block (its
    segments in a fixed order), dQ from per-slot partials. dlse (B, Hq, T): lse's gradient, if lse was used (d lse /
    d s_ij = p_ij, so it enters every score's gradient p * (dp - delta) as delta - dlse). Returns dq, dk, dv."""
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], lists[0].shape[2]                                     # slots: (BH, Tc, K)
    G = Hq // Hkv
    G_P = _pow2(G, 1)
    c = _consts(q, block_size)
    delta = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    _delta_kernel[(B * Hq, _cdiv(T, 64))](
        o_ptr=out, do_ptr=dout, delta_ptr=delta, T=T, Hq=Hq, **_strides("o", out), **_strides("do", dout),
        D=D, ROWS=64, D_P=c["D_P"])
    if dlse is not None:
        delta -= dlse                                                          # (B, Hq, T)
    dq = _token_major(B, Hq, T, D, device=q.device, dtype=q.dtype)
    bounds = _chunk_bounds(B, Hkv, T, K, G * D, block_size)
    fresh = len(bounds) == 1                       # one chunk: first segments store, so no zeros are needed
    dk, dv = (torch.empty if fresh else torch.zeros)(2, B, Hkv, T, D, device=q.device, dtype=torch.float32)
    tiles = _launch_opts(_tiles("bwd", D, G_P, c["BLOCK_N"]))
    ct = _tiles("combine", D, G_P, c["BLOCK_N"])
    NSUB = _cdiv(block_size, tiles["BLOCK_N"])                                 # programs per KV block
    # dK, dV finished in k's and v's dtype, token-major (_token_major), by the last chunk's fix-up pass (and in one
    # chunk by the backward itself for a block with one segment); both of one layout, so they share strides
    dk_out = _token_major(B, Hkv, T, D, device=q.device, dtype=k.dtype)
    dv_out = _token_major(B, Hkv, T, D, device=q.device, dtype=v.dtype)
    for i, (t0, t1, nbc) in enumerate(bounds):
        slots, ent, start, cnt = lists[4 * i:4 * i + 4]
        seg = _seg_len(B * Hkv * (t1 - t0) * K, BWD_SEG_SMALL, BWD_SEG)
        lo, hi, blk, x, xbase, xcnt, NX = _split_segments(start, cnt, (t1 - t0) * K, seg)
        dkp, dvp = torch.empty(2, B * Hkv, NX, NSUB, tiles["BLOCK_N"], c["D_P"], device=q.device, dtype=torch.float32)
        dqp = torch.empty(B * Hkv, t1 - t0, K * NSUB, G, D, device=q.device, dtype=q.dtype)  # partial dq
        _bwd_kv_kernel[(lo.shape[1], B * Hkv, NSUB)](
            q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=dout, lse_ptr=lse, delta_ptr=delta, dqp_ptr=dqp, dk_ptr=dk, dv_ptr=dv,
            dkp_ptr=dkp, dvp_ptr=dvp, dko_ptr=dk_out, dvo_ptr=dv_out, xcnt_ptr=xcnt, ent_ptr=ent, seg_lo_ptr=lo,
            seg_hi_ptr=hi, seg_blk_ptr=blk, seg_x_ptr=x, **_strides("q", q), **_strides("k", k), **_strides("v", v),
            **_strides("do", dout), **_strides("o", dk_out, "bht_"),
            T=T, t0=t0, Tc=t1 - t0, K=K, NSEG=lo.shape[1], NX=NX, NBC=nbc, Hkv=Hkv, BS=block_size, D=D,
            scale=1.0 / math.sqrt(D), scale2=LOG2E / math.sqrt(D),
            G=G, G_P=G_P, NSUB=NSUB, D_P=c["D_P"], PREC=c["PREC"], FRESH=fresh, **tiles)
        for grad, partial, o in ((dk, dkp, dk_out), (dv, dvp, dv_out)):           # the last chunk finishes them
            _fixup_kernel[(nbc, B * Hkv, NSUB)](
                x_ptr=grad, xp_ptr=partial, xbase_ptr=xbase, xcnt_ptr=xcnt, cnt_ptr=cnt, o_ptr=o,
                **_strides("o", o, "bht_"), T=T, NBC=nbc, NX=NX, BS=block_size, D=D, HO=Hkv, NG=1, NSUB=NSUB,
                BLOCK_N=tiles["BLOCK_N"], D_P=c["D_P"], OUT=t1 == T, FRESH=fresh, DIRECT=fresh)
        _combine_kernel[(_cdiv(t1 - t0, ct["ROWS"] // G_P), B * Hkv)](
            op_ptr=dqp, lp_ptr=dqp, slots_ptr=slots, o_ptr=dq, lse_ptr=dq, **_strides("o", dq, "bht_"), T=T, t0=t0,
            Tc=t1 - t0, K=K, Hkv=Hkv, D=D, G=G, G_P=G_P, D_P=c["D_P"], WITH_LSE=False, NSUB=NSUB,
            UNROLL=_combine_unroll(K, NSUB), **ct)
    return dq, dk_out, dv_out


# ---------------------------------------------------------------------------------------------
# the custom ops (torch.library): torch.compile traces through them without a graph break, and their fake
# implementations give the output shapes from the input shapes alone.
# The forward returns its work lists as outputs and the backward takes them: they are what the forward saved
# for the backward, and rebuilding them there would cost common._chunks' launches again (three per chunk).

@_op("sparse_attention_fwd")
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor,
            block_size: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    if _checking(block_idx):
        check_block_idx(block_idx, math.ceil(q.shape[2] / block_size))
    return _forward(q, k, v, block_idx, block_size)


@_fwd_op.register_fake
def _(q, k, v, block_idx, block_size):
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], block_idx.shape[3]
    lists = []
    for t0, t1, nbc in _chunk_bounds(B, Hkv, T, K, (Hq // Hkv) * D, block_size):
        lists += [q.new_empty(B * Hkv, t1 - t0, K, dtype=torch.int32), q.new_empty(B * Hkv, (t1 - t0) * K, dtype=torch.int32),
                  q.new_empty(B * Hkv, nbc, dtype=torch.int64), q.new_empty(B * Hkv, nbc, dtype=torch.int64)]
    out = _token_major(B, Hq, T, D, dtype=q.dtype, device=q.device)
    return out, q.new_empty(B, Hq, T, dtype=torch.float32), lists


@_op("sparse_attention_bwd")
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
            dlse: Optional[torch.Tensor], lists: list[torch.Tensor],
            block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(q, k, v, out, lse, dout, lists, block_size, dlse)


@_bwd_op.register_fake
def _(q, k, v, out, lse, dout, dlse, lists, block_size):
    return tuple(_token_major(*x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))


_attention_autograd(_fwd_op, _bwd_op, lambda block_idx, lists: lists)


def sparse_attention(q, k, v, block_idx, block_size, with_lists=False):
    """
    q (B, Hq, T, D), k and v (B, Hkv, T, D), block_idx int (B, Hkv, T, K) with -1 padding, any order.
    Returns out (B, Hq, T, D) in q's dtype and the natural-log lse fp32 (B, Hq, T), as msa_ref does, and with
    with_lists the work lists it built (for index.kl_loss on the same block_idx).
    Differentiable in q, k, v through out and lse. Deterministic backward.
    No host sync: block_idx's values are checked only in the checking mode (common.checks); outside it,
    ids outside [0, nb) are ignored.
    """
    _check_attention(q, k, v, block_idx, block_size)
    out, lse, lists = _fwd_op(q, k, v, block_idx, block_size)
    return (out, lse, lists) if with_lists else (out, lse)


def attention_forward_query_outer(q, k, v, block_idx, block_size):
    """The query-outer baseline forward (no autograd): same inputs and outputs as sparse_attention. block_idx's values
    are not checked (no host sync): ids outside [0, nb) select nothing."""
    B, Hkv, T = _check_attention(q, k, v, block_idx, block_size)
    Hq, D, K = q.shape[1], q.shape[3], block_idx.shape[3]
    G = Hq // Hkv
    slots = _slots(block_idx, 0, T, math.ceil(T / block_size))
    out = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    _fwd_query_kernel[(T, B * Hkv)](
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, lse_ptr=lse, slots_ptr=slots,
        **_strides("q", q), **_strides("k", k), **_strides("v", v),
        T=T, K=K, Hkv=Hkv, BS=block_size, D=D, scale2=LOG2E / math.sqrt(D),
        G=G, G_P=_pow2(G), num_warps=4, num_stages=2, **_consts(q, block_size))
    return out, lse
