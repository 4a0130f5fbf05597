"""
The query-tile path of MSA in Triton: sparse_attention_tile (forward and backward) and kl_loss_tile. They
compute msa_ref.sparse_attention and msa_ref.kl_loss (DESIGN.md section 3) with no work lists at all, for
short sequences, where the KV-outer passes (attention.py, index.py: work lists, segments, partials and their
combine) cost more launches than the sparsity saves. Shapes and naming: common.py.

A program takes one tile of consecutive queries (rows = TT tokens x G heads of one group) and walks the key
blocks 0 .. the tile's last visible block. Each row holds its token's K chosen blocks in registers; a block
that no token of the tile chose is skipped, one that some chose is loaded once for the whole tile, under a
per-row mask (the row chose it) and the causal mask. So a tile reads the union of its tokens' selections:
at T = 1K with bs = 64 that union is most of the visible blocks anyway, and a tile needs no list built.
  forward    one launch: online softmax in log2 units; it also writes reads (BH, nb, NT) int8, "tile i reads
             block kb", that the backward walks instead of recomputing it;
  backward   FlashAttention-2 style, two launches, no atomics (deterministic): per query tile, delta =
             rowsum(out * dout) and dQ over its blocks; per key block, dK and dV over the tiles that read it.
kl_loss_tile runs the same way on tiles of BLOCK_Q tokens (one row per token; the G teacher heads in a loop).
use_tile holds the rule that picks this path or the KV-outer one; FORCE overrides it for measurement.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from msa_checks import check_block_idx
from .common import (LN2, LN2_K, LOG2E, LOG2E_K, _attention_autograd, _cdiv, _check_attention, _checking, _ikeys,
                     _keys, _kl_call, _kl_custom_op, _load_rows, _op, _pow2, _prec, _softmax_finish, _softmax_rescale,
                     _strides, _token_major)

FORCE = None          # None: use_tile decides; 'tile' or 'kv': that path for every call (measurement)
ROWS = 64             # rows (tokens x G_P heads) of an attention tile: TT = ROWS // G_P tokens (>= 16: tl.dot)
BLOCK_Q = 32          # tokens of a kl_loss_tile tile (one row each; >= 16)
# Smaller tiles read fewer blocks (the union of fewer tokens' lists) at a lower matrix-unit efficiency and with
# more tiles for each dK, dV program to walk; bench.py --what paths measures ROWS = 64 and 16.
TILE_MAX_T = 2048     # use_tile: eager calls on sequences up to this length take the tile path


def use_tile(B, Hkv, T, K, block_size, G, D):
    """The path rule: True for the tile path, from the call's shapes and whether torch.compile is tracing it (never
    from the data, so a compiled graph's fake implementations choose alike). Measured with bench.py --what small
    and --what paths (dev/kernels.md):
    - in a CUDA graph the launches cost no host time, and the KV-outer path is faster at every length measured:
      a tile reads the union of its tokens' blocks, close to dense work, while the KV-outer passes read each
      chosen block once per query. A compiled model (torch.compile, whose "reduce-overhead" mode replays CUDA
      graphs) therefore takes the KV-outer path;
    - called eagerly, the KV-outer path's launches per training step (the work lists, the passes, the combine:
      about three times the tile path's) cost more host time than the tile path's extra reads up to TILE_MAX_T
      tokens; at 4K the two are level with K = 4 and the KV-outer path is ahead with K = 8, at 16K far ahead.
      A CUDA graph captured by hand (torch.cuda.graph) keeps the eager choice, so that its warm-up call has
      compiled the kernels the capture replays.
    B and Hkv scale both paths alike and do not enter the rule; shapes past the tile kernels' limits (G > 64,
    D > 128, bs > 128) take the KV-outer path, whose checks then say what is supported."""
    if FORCE is not None:
        return FORCE == "tile"
    if G > 64 or D > 128 or block_size > 128:
        return False
    if torch.compiler.is_compiling():
        return False
    return T <= TILE_MAX_T


# ---------------------------------------------------------------------------------------------
# kernel helpers

@triton.jit
def _rows(tile, T, G, G_P: tl.constexpr, ROWS: tl.constexpr):
    """Rows of query tile `tile`: row r = (token tile * TT + r // G_P, head r % G_P). Returns t, h, rv (real row)."""
    r = tl.arange(0, ROWS)
    t = tile * (ROWS // G_P) + r // G_P
    h = r % G_P
    return t, h, (t < T) & (h < G)


@triton.jit
def _load_sel(bi_ptr, b, g, t, rv, K, s_ib, s_ih, s_it, s_ik, K_P: tl.constexpr):
    """The chosen blocks of each row's token: block_idx[b, g, t, :] -> (R, K_P) int32, -1 where padded."""
    kk = tl.arange(0, K_P)
    sel = tl.load(bi_ptr + b * s_ib + g.to(tl.int64) * s_ih + t.to(tl.int64)[:, None] * s_it + kk[None, :] * s_ik,
                  mask=rv[:, None] & (kk[None, :] < K), other=-1)
    return tl.where((sel < -1) | (sel > 0x7FFFFFFF), -1, sel).to(tl.int32)  # int64 ids past int32: none, not wrapped


@triton.jit
def _chose(sel, kb):
    """sel (R, K_P) chosen blocks -> (R,) int32: 1 where the row chose block kb (a repeat counts once)."""
    return tl.max(tl.where(sel == kb, 1, 0), axis=1)


# ---------------------------------------------------------------------------------------------
# attention kernels

@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, bi_ptr, o_ptr, lse_ptr, rd_ptr,
                s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd, s_ib, s_ih, s_it, s_ik,
                T, K, Hkv, BS, NB, NT, D, scale2,
                G: tl.constexpr, G_P: tl.constexpr, ROWS: tl.constexpr, K_P: tl.constexpr,
                BLOCK_N: tl.constexpr, D_P: tl.constexpr, PREC: tl.constexpr, WITH_OUT: tl.constexpr):
    """Grid (NT, B * Hkv): one query tile of one (batch, group). Writes lse (B, Hq, T) natural log, with WITH_OUT
    out (B, Hq, T, D) contiguous, and reads[bh, kb, tile] (BH, NB, NT) int8 for kb <= the tile's last block."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    t, h, rv = _rows(tile, T, G, G_P, ROWS)                                    # (ROWS,)
    d = tl.arange(0, D_P)
    dmask = d < D
    jn = tl.arange(0, BLOCK_N)
    q = _load_rows(q_ptr, b, g * G + h, t, rv, s_qb, s_qh, s_qt, s_qd, d, dmask)  # (ROWS, D_P)
    sel = _load_sel(bi_ptr, b, g, t, rv, K, s_ib, s_ih, s_it, s_ik, K_P)     # (ROWS, K_P)
    acc = tl.zeros((ROWS, D_P), dtype=tl.float32)
    m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((ROWS,), dtype=tl.float32)
    last = (tl.minimum((tile + 1) * (ROWS // G_P), T) - 1) // BS               # the tile's last visible block
    for kb in range(0, last + 1):
        chose = _chose(sel, kb)                                                # (ROWS,)
        hit = tl.max(chose, axis=0)
        tl.store(rd_ptr + (bh.to(tl.int64) * NB + kb) * NT + tile, hit.to(tl.int8))
        if hit > 0:                                                            # some token of the tile chose kb
            n = kb * BS + jn
            kmask = (jn < BS) & (n < T)
            k = _keys(k_ptr, b, g, n, kmask, s_kb, s_kh, s_kt, s_kd, d, dmask)  # (BLOCK_N, D_P)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2         # (ROWS, BLOCK_N)
            vis = (chose[:, None] > 0) & kmask[None, :] & (n[None, :] <= t[:, None])
            s = tl.where(vis, s, float("-inf"))
            m, m_ref, alpha = _softmax_rescale(m, tl.max(s, 1))
            p = tl.exp2(s - m_ref[:, None])
            l = l * alpha + tl.sum(p, 1)
            if WITH_OUT:
                v = _keys(v_ptr, b, g, n, kmask, s_vb, s_vh, s_vt, s_vd, d, dmask)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    ls, lse2 = _softmax_finish(m, l)
    orow = ((b * Hkv + g) * G + h).to(tl.int64) * T + t                        # (ROWS,) rows of (B, Hq, T)
    tl.store(lse_ptr + orow, lse2 * LN2_K, mask=rv)
    if WITH_OUT:
        tl.store(o_ptr + orow[:, None] * D + d[None, :], (acc / ls[:, None]).to(o_ptr.dtype.element_ty),
                 mask=rv[:, None] & dmask[None, :])


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dlse_ptr, bi_ptr, dq_ptr, delta_ptr,
                   s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                   s_ob, s_oh, s_ot, s_od, s_dob, s_doh, s_dot, s_dod, s_ib, s_ih, s_it, s_ik,
                   T, K, Hkv, BS, D, scale, scale2,
                   G: tl.constexpr, G_P: tl.constexpr, ROWS: tl.constexpr, K_P: tl.constexpr,
                   BLOCK_N: tl.constexpr, D_P: tl.constexpr, PREC: tl.constexpr, DLSE: tl.constexpr):
    """Grid (NT, B * Hkv): one query tile. Writes delta (B, Hq, T) = rowsum(out * dout) - dlse (DLSE: lse's gradient,
    contiguous (B, Hq, T), since d lse / d s_ij = p_ij) for the dK, dV kernel and dq (B, Hq, T, D) contiguous, summed
    over the tile's blocks."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    t, h, rv = _rows(tile, T, G, G_P, ROWS)
    d = tl.arange(0, D_P)
    dmask = d < D
    jn = tl.arange(0, BLOCK_N)
    hh = g * G + h
    q = _load_rows(q_ptr, b, hh, t, rv, s_qb, s_qh, s_qt, s_qd, d, dmask)     # (ROWS, D_P)
    do = _load_rows(do_ptr, b, hh, t, rv, s_dob, s_doh, s_dot, s_dod, d, dmask)
    o = _load_rows(o_ptr, b, hh, t, rv, s_ob, s_oh, s_ot, s_od, d, dmask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)                    # (ROWS,)
    orow = ((b * Hkv + g) * G + h).to(tl.int64) * T + t
    if DLSE:
        delta -= tl.load(dlse_ptr + orow, mask=rv, other=0.0)
    tl.store(delta_ptr + orow, delta, mask=rv)
    lse2 = tl.load(lse_ptr + orow, mask=rv, other=0.0) * LOG2E_K
    sel = _load_sel(bi_ptr, b, g, t, rv, K, s_ib, s_ih, s_it, s_ik, K_P)
    dq = tl.zeros((ROWS, D_P), dtype=tl.float32)
    last = (tl.minimum((tile + 1) * (ROWS // G_P), T) - 1) // BS
    for kb in range(0, last + 1):
        chose = _chose(sel, kb)
        if tl.max(chose, axis=0) > 0:
            n = kb * BS + jn
            kmask = (jn < BS) & (n < T)
            k = _keys(k_ptr, b, g, n, kmask, s_kb, s_kh, s_kt, s_kd, d, dmask)
            v = _keys(v_ptr, b, g, n, kmask, s_vb, s_vh, s_vt, s_vd, d, dmask)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            vis = (chose[:, None] > 0) & kmask[None, :] & (n[None, :] <= t[:, None])
            p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)                 # the forward's probabilities
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)                # (ROWS, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    tl.store(dq_ptr + orow[:, None] * D + d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=rv[:, None] & dmask[None, :])


@triton.jit
def _bwd_dkv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, bi_ptr, rd_ptr, dk_ptr, dv_ptr,
                    s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_vb, s_vh, s_vt, s_vd,
                    s_dob, s_doh, s_dot, s_dod, s_ib, s_ih, s_it, s_ik,
                    T, K, Hkv, BS, NB, NT, D, scale, scale2,
                    G: tl.constexpr, G_P: tl.constexpr, ROWS: tl.constexpr, K_P: tl.constexpr, NSUB: tl.constexpr,
                    BLOCK_N: tl.constexpr, D_P: tl.constexpr, CHUNK: tl.constexpr, PREC: tl.constexpr):
    """Grid (NB * NSUB, B * Hkv): keys [sub * BLOCK_N, (sub + 1) * BLOCK_N) of key block kb of one (batch, group),
    summed over the query tiles that read kb (reads, from the forward); writes dk, dv (B, Hkv, T, D) contiguous.
    The tiles' flags are read CHUNK at a time, so that a run of tiles that skip kb costs one vector load."""
    kb = tl.program_id(0) // NSUB
    sub = tl.program_id(0) % NSUB
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    d = tl.arange(0, D_P)
    dmask = d < D
    jn = sub * BLOCK_N + tl.arange(0, BLOCK_N)
    n = kb * BS + jn
    kmask = (jn < BS) & (n < T)
    k = _keys(k_ptr, b, g, n, kmask, s_kb, s_kh, s_kt, s_kd, d, dmask)        # (BLOCK_N, D_P)
    v = _keys(v_ptr, b, g, n, kmask, s_vb, s_vh, s_vt, s_vd, d, dmask)
    dk = tl.zeros((BLOCK_N, D_P), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D_P), dtype=tl.float32)
    rd_b = rd_ptr + (bh.to(tl.int64) * NB + kb) * NT
    first = (kb * BS) // (ROWS // G_P)                                         # the first tile that sees kb
    for c0 in range(first, NT, CHUNK):
        ci = c0 + tl.arange(0, CHUNK)
        if tl.max(tl.load(rd_b + ci, mask=ci < NT, other=0).to(tl.int32), axis=0) > 0:
            for tile in range(c0, tl.minimum(c0 + CHUNK, NT)):
                if tl.load(rd_b + tile) != 0:
                    t, h, rv = _rows(tile, T, G, G_P, ROWS)
                    hh = g * G + h
                    q = _load_rows(q_ptr, b, hh, t, rv, s_qb, s_qh, s_qt, s_qd, d, dmask)
                    do = _load_rows(do_ptr, b, hh, t, rv, s_dob, s_doh, s_dot, s_dod, d, dmask)
                    orow = ((b * Hkv + g) * G + h).to(tl.int64) * T + t
                    lse2 = tl.load(lse_ptr + orow, mask=rv, other=0.0) * LOG2E_K
                    delta = tl.load(delta_ptr + orow, mask=rv, other=0.0)
                    chose = _chose(_load_sel(bi_ptr, b, g, t, rv, K, s_ib, s_ih, s_it, s_ik, K_P), kb)
                    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2  # (ROWS, BLOCK_N)
                    vis = (chose[:, None] > 0) & kmask[None, :] & (n[None, :] <= t[:, None])
                    p = tl.where(vis, tl.exp2(s - lse2[:, None]), 0.0)
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                    ds = p * (dp - delta[:, None])
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    kvo = (bh.to(tl.int64) * T + n)[:, None] * D + d[None, :]
    kvm = kmask[:, None] & dmask[None, :]
    tl.store(dk_ptr + kvo, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kvm)
    tl.store(dv_ptr + kvo, dv.to(dv_ptr.dtype.element_ty), mask=kvm)


# ---------------------------------------------------------------------------------------------
# attention launchers

def reads_shape(B, Hkv, T, G, block_size, rows):
    """The shape (B * Hkv, nb, NT) of the forward's int8 table "query tile i reads key block kb", which the backward
    takes (a custom op's fake implementation needs it): NT tiles of rows // G_P tokens (rows: see _meta)."""
    G_P = _pow2(G, 1)
    return B * Hkv, _cdiv(T, block_size), _cdiv(T, max(rows, G_P) // G_P)


def _meta(q, block_idx, block_size, Hkv, rows):
    """Tile shape and compile-time constants shared by the attention kernels of one call: rows (tokens x G_P heads)
    per tile, at least G_P; the forward and the backward of one call must use the same rows (the forward reads
    ROWS once and the backward gets it from there). Returns (meta, NT, NB)."""
    B, Hq, T, D = q.shape
    G = Hq // Hkv
    G_P = _pow2(G, 1)
    meta = dict(G=G, G_P=G_P, ROWS=max(rows, G_P), K_P=_pow2(block_idx.shape[3], 2), D_P=_pow2(D), PREC=_prec(q))
    _, NB, NT = reads_shape(B, Hkv, T, G, block_size, rows)
    return meta, NT, NB


def _warps(D, block_n):
    """Warps of a program that holds (.., D) and (block_n, ..) fp32 tiles: 8 once either passes 64 (registers)."""
    return 8 if D > 64 or block_n > 64 else 4


def _forward(q, k, v, block_idx, block_size, rows, with_out=True):
    """Returns out (B, Hq, T, D) in q's dtype (None without with_out), lse fp32 (B, Hq, T), reads (BH, NB, NT) int8."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    meta, NT, NB = _meta(q, block_idx, block_size, Hkv, rows)
    block_n = _pow2(block_size)
    out = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype) if with_out else None
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    reads = torch.empty(B * Hkv, NB, NT, device=q.device, dtype=torch.int8)   # = reads_shape(...)
    _fwd_kernel[(NT, B * Hkv)](
        q_ptr=q, k_ptr=k, v_ptr=v, bi_ptr=block_idx, o_ptr=out if with_out else lse, lse_ptr=lse, rd_ptr=reads,
        **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("i", block_idx, "bhtk"),
        T=T, K=block_idx.shape[3], Hkv=Hkv, BS=block_size, NB=NB, NT=NT, D=D, scale2=LOG2E / math.sqrt(D),
        BLOCK_N=block_n, WITH_OUT=with_out, num_warps=_warps(D, block_n), num_stages=1, **meta)
    return out, lse, reads


def _backward(q, k, v, out, lse, dout, block_idx, reads, block_size, rows, dlse=None):
    """Returns dq, dk, dv in the inputs' dtypes. reads and rows: what the forward used; dlse (B, Hq, T): lse's
    gradient, if lse was used."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    meta, NT, NB = _meta(q, block_idx, block_size, Hkv, rows)
    block_n = _pow2(block_size)
    delta = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    dq = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, Hkv, T, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, Hkv, T, D, device=q.device, dtype=v.dtype)
    common = dict(T=T, K=block_idx.shape[3], Hkv=Hkv, BS=block_size, D=D, scale=1.0 / math.sqrt(D),
                  scale2=LOG2E / math.sqrt(D), **meta)
    _bwd_dq_kernel[(NT, B * Hkv)](
        q_ptr=q, k_ptr=k, v_ptr=v, o_ptr=out, do_ptr=dout, lse_ptr=lse,
        dlse_ptr=delta if dlse is None else dlse.contiguous(), bi_ptr=block_idx, dq_ptr=dq, delta_ptr=delta,
        **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("o", out), **_strides("do", dout),
        **_strides("i", block_idx, "bhtk"), BLOCK_N=block_n, num_warps=_warps(D, block_n), num_stages=1,
        DLSE=dlse is not None, **common)
    sub_n = min(block_n, 64)                                                   # dK, dV accumulate in registers
    nsub = _cdiv(block_size, sub_n)
    _bwd_dkv_kernel[(NB * nsub, B * Hkv)](
        q_ptr=q, k_ptr=k, v_ptr=v, do_ptr=dout, lse_ptr=lse, delta_ptr=delta, bi_ptr=block_idx, rd_ptr=reads,
        dk_ptr=dk, dv_ptr=dv, **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("do", dout),
        **_strides("i", block_idx, "bhtk"), NB=NB, NT=NT, NSUB=nsub, BLOCK_N=sub_n, CHUNK=32,
        num_warps=_warps(D, sub_n), num_stages=1, **common)
    return dq, dk, dv


# sparse_attention_tile as custom ops (torch.library): the forward returns the reads table and the backward takes
# it; rows, the tiles' shape, is an argument so that the two use the same tiles.

@_op("sparse_attention_tile_fwd")
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_idx: torch.Tensor, block_size: int,
            rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _checking(block_idx):
        check_block_idx(block_idx, math.ceil(q.shape[2] / block_size))
    return _forward(q, k, v, block_idx, block_size, rows)


@_fwd_op.register_fake
def _(q, k, v, block_idx, block_size, rows):
    B, Hq, T, _ = q.shape
    Hkv = k.shape[1]
    return (q.new_empty(q.shape), q.new_empty(B, Hq, T, dtype=torch.float32),
            q.new_empty(reads_shape(B, Hkv, T, Hq // Hkv, block_size, rows), dtype=torch.int8))


@_op("sparse_attention_tile_bwd")
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
            dlse: Optional[torch.Tensor], saved: list[torch.Tensor], block_size: int,
            rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    block_idx, reads = saved
    return _backward(q, k, v, out, lse, dout, block_idx, reads, block_size, rows, dlse)


@_bwd_op.register_fake
def _(q, k, v, out, lse, dout, dlse, saved, block_size, rows):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_attention_autograd(_fwd_op, _bwd_op, lambda block_idx, reads: [block_idx, reads])


def sparse_attention_tile(q, k, v, block_idx, block_size):
    """
    msa_ref.sparse_attention on the query-tile path: q (B, Hq, T, D), k and v (B, Hkv, T, D), block_idx int
    (B, Hkv, T, K) with -1 padding, any order, repeats allowed. Returns out (B, Hq, T, D) in q's dtype and the
    natural-log lse fp32 (B, Hq, T). Differentiable in q, k, v through out and lse. Deterministic backward.
    Launches: forward 1, backward 2.
    """
    _check_attention(q, k, v, block_idx, block_size)
    out, lse, _ = _fwd_op(q, k, v, block_idx, block_size, ROWS)
    return out, lse


# ---------------------------------------------------------------------------------------------
# kl_loss kernels: tiles of BLOCK_Q tokens, one row per token; the teacher's G heads in a loop

@triton.jit
def _student(qi, ki, lu, vis, scale_i2, PREC: tl.constexpr):
    """log2 r: qi (BLOCK_Q, DI_P) . ki (BLOCK_N, DI_P) in log2 units minus the row's lse2 lu; 0 off the support vis
    (where r = 0 and p = 0: no inf - inf, no 0 * inf)."""
    return tl.where(vis, tl.dot(qi, tl.trans(ki), input_precision=PREC) * scale_i2 - lu[:, None], 0.0)


@triton.jit
def _teacher(q_ptr, lse_ptr, k, b, g, t, rv, T, Hkv, s_qb, s_qh, s_qt, s_qd, d, dmask, scale_d2,
             G: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """The teacher p before the support mask: the mean over the G heads of group g of exp2(s_h - lse2_h),
    (BLOCK_Q, BLOCK_N). k (BLOCK_N, D_P) the keys of group g; lse (B, Hq, T) natural log, contiguous."""
    p = tl.zeros((BLOCK_Q, BLOCK_N), dtype=tl.float32)
    for h in range(G):
        hh = tl.zeros_like(t) + (g * G + h)
        q = _load_rows(q_ptr, b, hh, t, rv, s_qb, s_qh, s_qt, s_qd, d, dmask)  # (BLOCK_Q, D_P) head h
        lse2 = tl.load(lse_ptr + (b * Hkv * G + hh) * T + t, mask=rv, other=0.0) * LOG2E_K
        p += tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * scale_d2 - lse2[:, None])
    return p / G


@triton.jit
def _kl_stats_kernel(qi_ptr, ki_ptr, bi_ptr, lu_ptr, rd_ptr,
                     s_qib, s_qih, s_qit, s_qid, s_kib, s_kit, s_kid, s_ib, s_ih, s_it, s_ik,
                     T, K, Hkv, BS, NB, NT, DI, scale_i2,
                     BLOCK_Q: tl.constexpr, K_P: tl.constexpr, BLOCK_N: tl.constexpr, DI_P: tl.constexpr,
                     PREC: tl.constexpr):
    """Grid (NT, B * Hkv): the student's lse2 lu (BH, T) over each row's support, and reads[bh, kb, tile]
    (BH, NB, NT) int8 for kb <= the tile's last block."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    t = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rv = t < T
    di = tl.arange(0, DI_P)
    dimask = di < DI
    jn = tl.arange(0, BLOCK_N)
    qi = _load_rows(qi_ptr, b, tl.zeros_like(t) + g, t, rv, s_qib, s_qih, s_qit, s_qid, di, dimask)
    sel = _load_sel(bi_ptr, b, g, t, rv, K, s_ib, s_ih, s_it, s_ik, K_P)
    m = tl.full((BLOCK_Q,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    last = (tl.minimum((tile + 1) * BLOCK_Q, T) - 1) // BS
    for kb in range(0, last + 1):
        chose = _chose(sel, kb)
        hit = tl.max(chose, axis=0)
        tl.store(rd_ptr + (bh.to(tl.int64) * NB + kb) * NT + tile, hit.to(tl.int8))
        if hit > 0:
            n = kb * BS + jn
            kmask = (jn < BS) & (n < T)
            ki = _ikeys(ki_ptr, b, n, kmask, s_kib, s_kit, s_kid, di, dimask)
            u = tl.dot(qi, tl.trans(ki), input_precision=PREC) * scale_i2      # (BLOCK_Q, BLOCK_N)
            vis = (chose[:, None] > 0) & kmask[None, :] & (n[None, :] <= t[:, None])
            u = tl.where(vis, u, float("-inf"))
            m, m_ref, alpha = _softmax_rescale(m, tl.max(u, 1))
            l = l * alpha + tl.sum(tl.exp2(u - m_ref[:, None]), 1)
    _, lse2 = _softmax_finish(m, l)
    tl.store(lu_ptr + bh.to(tl.int64) * T + t, lse2, mask=rv)


@triton.jit
def _kl_loss_kernel(q_ptr, k_ptr, qi_ptr, ki_ptr, bi_ptr, lse_ptr, lu_ptr, loss_ptr, dqi_ptr,
                    s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_qib, s_qih, s_qit, s_qid, s_kib, s_kit, s_kid,
                    s_ib, s_ih, s_it, s_ik, s_gb, s_gh, s_gt,
                    T, K, Hkv, BS, D, DI, scale_d2, scale_i2, loss_scale, grad_scale,
                    G: tl.constexpr, BLOCK_Q: tl.constexpr, K_P: tl.constexpr, BLOCK_N: tl.constexpr,
                    D_P: tl.constexpr, DI_P: tl.constexpr, PREC: tl.constexpr, GRAD: tl.constexpr):
    """Grid (NT, B * Hkv): loss (BH * NT,) = loss_scale * sum over the tile's rows of sum p (log2 p - log2 r);
    with GRAD, dqi (B, Hkv, T, Di), in its dtype and of strides s_g*, = grad_scale * sum over the row's support of
    (r - p) ki."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    t = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rv = t < T
    d = tl.arange(0, D_P)
    dmask = d < D
    di = tl.arange(0, DI_P)
    dimask = di < DI
    jn = tl.arange(0, BLOCK_N)
    qi = _load_rows(qi_ptr, b, tl.zeros_like(t) + g, t, rv, s_qib, s_qih, s_qit, s_qid, di, dimask)
    sel = _load_sel(bi_ptr, b, g, t, rv, K, s_ib, s_ih, s_it, s_ik, K_P)
    lu = tl.load(lu_ptr + bh.to(tl.int64) * T + t, mask=rv, other=0.0)
    loss = tl.zeros((BLOCK_Q,), dtype=tl.float32)
    dqi = tl.zeros((BLOCK_Q, DI_P), dtype=tl.float32)
    last = (tl.minimum((tile + 1) * BLOCK_Q, T) - 1) // BS
    for kb in range(0, last + 1):
        chose = _chose(sel, kb)
        if tl.max(chose, axis=0) > 0:
            n = kb * BS + jn
            kmask = (jn < BS) & (n < T)
            ki = _ikeys(ki_ptr, b, n, kmask, s_kib, s_kit, s_kid, di, dimask)  # (BLOCK_N, DI_P)
            k = _keys(k_ptr, b, g, n, kmask, s_kb, s_kh, s_kt, s_kd, d, dmask)  # (BLOCK_N, D_P)
            vis = (chose[:, None] > 0) & kmask[None, :] & (n[None, :] <= t[:, None])
            log_r = _student(qi, ki, lu, vis, scale_i2, PREC)                       # (BLOCK_Q, BLOCK_N)
            p = tl.where(vis, _teacher(q_ptr, lse_ptr, k, b, g, t, rv, T, Hkv, s_qb, s_qh, s_qt, s_qd, d, dmask,
                                       scale_d2, G, BLOCK_Q, BLOCK_N, PREC), 0.0)
            loss += tl.sum(tl.where(p > 0, p * (tl.log2(tl.where(p > 0, p, 1.0)) - log_r), 0.0), 1)
            if GRAD:
                ds = tl.where(vis, tl.exp2(log_r), 0.0) - p                    # r - p on the support
                dqi += tl.dot(ds.to(ki.dtype), ki, input_precision=PREC)
    tl.store(loss_ptr + bh * tl.num_programs(0) + tile, tl.sum(loss, 0) * loss_scale)
    if GRAD:
        tl.store(dqi_ptr + (b * s_gb + g.to(tl.int64) * s_gh + t.to(tl.int64) * s_gt)[:, None] + di[None, :],
                 (dqi * grad_scale).to(dqi_ptr.dtype.element_ty),
                 mask=rv[:, None] & dimask[None, :])


@triton.jit
def _kl_dki_kernel(q_ptr, k_ptr, qi_ptr, ki_ptr, bi_ptr, lse_ptr, lu_ptr, rd_ptr, dki_ptr,
                   s_qb, s_qh, s_qt, s_qd, s_kb, s_kh, s_kt, s_kd, s_qib, s_qih, s_qit, s_qid, s_kib, s_kit, s_kid,
                   s_ib, s_ih, s_it, s_ik,
                   T, K, Hkv, BS, NB, NT, D, DI, scale_d2, scale_i2, grad_scale,
                   G: tl.constexpr, BLOCK_Q: tl.constexpr, K_P: tl.constexpr, NSUB: tl.constexpr,
                   BLOCK_N: tl.constexpr, D_P: tl.constexpr, DI_P: tl.constexpr, CHUNK: tl.constexpr,
                   PREC: tl.constexpr):
    """Grid (NB * NSUB, B): keys [sub * BLOCK_N, (sub + 1) * BLOCK_N) of key block kb of batch b; dki (B, T, Di)
    contiguous, in its dtype, = grad_scale * sum over the groups and the query tiles that read kb of (r - p)^T qi."""
    kb = tl.program_id(0) // NSUB
    sub = tl.program_id(0) % NSUB
    b = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, D_P)
    dmask = d < D
    di = tl.arange(0, DI_P)
    dimask = di < DI
    jn = sub * BLOCK_N + tl.arange(0, BLOCK_N)
    n = kb * BS + jn
    kmask = (jn < BS) & (n < T)
    ki = _ikeys(ki_ptr, b, n, kmask, s_kib, s_kit, s_kid, di, dimask)          # (BLOCK_N, DI_P)
    dki = tl.zeros((BLOCK_N, DI_P), dtype=tl.float32)
    first = (kb * BS) // BLOCK_Q
    for gi in range(Hkv):
        g = b * 0 + gi                                                         # int64, as in every other kernel
        bh = b * Hkv + g
        k = _keys(k_ptr, b, g, n, kmask, s_kb, s_kh, s_kt, s_kd, d, dmask)    # (BLOCK_N, D_P)
        rd_b = rd_ptr + (bh * NB + kb) * NT
        for c0 in range(first, NT, CHUNK):
            ci = c0 + tl.arange(0, CHUNK)
            if tl.max(tl.load(rd_b + ci, mask=ci < NT, other=0).to(tl.int32), axis=0) > 0:
                for tile in range(c0, tl.minimum(c0 + CHUNK, NT)):
                    if tl.load(rd_b + tile) != 0:
                        t = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
                        rv = t < T
                        qi = _load_rows(qi_ptr, b, tl.zeros_like(t) + g, t, rv, s_qib, s_qih, s_qit, s_qid, di, dimask)
                        lu = tl.load(lu_ptr + bh * T + t, mask=rv, other=0.0)
                        chose = _chose(_load_sel(bi_ptr, b, g, t, rv, K, s_ib, s_ih, s_it, s_ik, K_P), kb)
                        vis = (chose[:, None] > 0) & kmask[None, :] & (n[None, :] <= t[:, None])
                        log_r = _student(qi, ki, lu, vis, scale_i2, PREC)
                        p = tl.where(vis, _teacher(q_ptr, lse_ptr, k, b, g, t, rv, T, Hkv, s_qb, s_qh, s_qt, s_qd, d,
                                                   dmask, scale_d2, G, BLOCK_Q, BLOCK_N, PREC), 0.0)
                        ds = tl.where(vis, tl.exp2(log_r), 0.0) - p
                        dki += tl.dot(tl.trans(ds.to(qi.dtype)), qi, input_precision=PREC)
    tl.store(dki_ptr + (b * T + n)[:, None] * DI + di[None, :], (dki * grad_scale).to(dki_ptr.dtype.element_ty),
             mask=kmask[:, None] & dimask[None, :])


# ---------------------------------------------------------------------------------------------
# kl_loss launcher

def _kl_launch(q, k, qi, ki, block_idx, block_size, grad, lse=None, lists=()):
    """Returns the loss (fp32 scalar) and, with grad, d loss / d qi (B, Hkv, T, Di), token-major
    (common._token_major), and d loss / d ki (B, T, Di), in qi's dtype (ki's: common._kl_call casts it). lse:
    sparse_attention's (B, Hq, T), or None (then the forward kernel recomputes it, without V).
    lists: unused (this path has no work lists; the op's arguments are those of the KV-outer path's)."""
    B, Hq, T, D = q.shape
    Hkv, Di = qi.shape[1], qi.shape[3]
    G, BH, K = Hq // Hkv, B * Hkv, block_idx.shape[3]
    dev = q.device
    lse = _forward(q, k, k, block_idx, block_size, ROWS, with_out=False)[1] if lse is None else lse.contiguous()
    NT, NB = _cdiv(T, BLOCK_Q), _cdiv(T, block_size)
    block_n = _pow2(block_size)
    n_rows = BH * T
    meta = dict(T=T, K=K, Hkv=Hkv, BS=block_size, DI=Di, scale_i2=LOG2E / math.sqrt(Di), BLOCK_Q=BLOCK_Q,
                K_P=_pow2(K, 2), DI_P=_pow2(Di), PREC=_prec(q, qi), **_strides("i", block_idx, "bhtk"),
                **_strides("qi", qi), **_strides("ki", ki, "btd"))
    teacher = dict(q_ptr=q, k_ptr=k, lse_ptr=lse, D=D, D_P=_pow2(D), G=G, scale_d2=LOG2E / math.sqrt(D),
                   **_strides("q", q), **_strides("k", k))
    lu = torch.empty(BH, T, device=dev, dtype=torch.float32)                  # the student's lse2 per row
    reads = torch.empty(BH, NB, NT, device=dev, dtype=torch.int8)
    _kl_stats_kernel[(NT, BH)](qi_ptr=qi, ki_ptr=ki, bi_ptr=block_idx, lu_ptr=lu, rd_ptr=reads, NB=NB, NT=NT,
                               BLOCK_N=block_n, num_warps=4, num_stages=1, **meta)
    loss = torch.empty(BH * NT, device=dev, dtype=torch.float32)
    dqi = _token_major(B, Hkv, T, Di, device=dev, dtype=qi.dtype) if grad else None
    grad_scale = 1.0 / (n_rows * math.sqrt(Di))                                # d/du = (r - p) / n_rows, u = qi.ki/sqrt(Di)
    _kl_loss_kernel[(NT, BH)](qi_ptr=qi, ki_ptr=ki, bi_ptr=block_idx, lu_ptr=lu, loss_ptr=loss,
                              dqi_ptr=dqi if grad else loss,
                              **_strides("g", dqi if grad else qi, "bht_"),
                              loss_scale=LN2 / n_rows, grad_scale=grad_scale,
                              BLOCK_N=block_n, GRAD=grad, num_warps=_warps(max(D, Di), block_n), num_stages=1,
                              **meta, **teacher)
    dki = None
    if grad:
        sub_n = min(block_n, 64)
        nsub = _cdiv(block_size, sub_n)
        dki = torch.empty(B, T, Di, device=dev, dtype=ki.dtype)
        _kl_dki_kernel[(NB * nsub, B)](qi_ptr=qi, ki_ptr=ki, bi_ptr=block_idx, lu_ptr=lu, rd_ptr=reads, dki_ptr=dki,
                                       NB=NB, NT=NT, grad_scale=grad_scale, NSUB=nsub, BLOCK_N=sub_n, CHUNK=32,
                                       num_warps=_warps(max(D, Di), sub_n), num_stages=1, **meta, **teacher)
    return loss.sum(), dqi, dki


_kl_op = _kl_custom_op("kl_loss_tile", _kl_launch)


def kl_loss_tile(q, k, qi, ki, block_idx, block_size, lse=None):
    """msa_ref.kl_loss on the query-tile path: mean over (b, g, t) of KL(p || r) on the support of block_idx.
    Differentiable in qi and ki only. lse: optional fp32 (B, Hq, T), what sparse_attention returned for these q, k,
    block_idx (the teacher's normaliser; without it one more launch recomputes it).
    Launches: forward 3 with lse, 4 without (+1 for the gradients when qi or ki requires grad: they are computed
    here, with the loss); backward 1 for both gradients (scaled by the incoming gradient)."""
    return _kl_call(_kl_op, q, k, qi, ki, block_idx, block_size, lse)
