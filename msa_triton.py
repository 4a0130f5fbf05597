"""
MiniMax Sparse Attention (MSA) in Triton: the fast path. msa_ref.py is the definition; this file
computes the same functions (DESIGN.md section 3) without ever building a T x T tensor.

Shapes: B batch, T tokens, Hq query heads, Hkv KV heads (= groups), G = Hq // Hkv, D head dim,
bs block size, K blocks per query, nb = ceil(T / bs). A "row" is one (query token, head) pair.

sparse_attention runs KV-outer (DESIGN.md section 4):
  1. invert block_idx into a CSR: for each (batch, group, KV block), the list of (token, slot)
     entries that chose it, sorted by token (torch sort, no host sync);
  2. forward: one program per segment of one block's list loads that K/V block once and runs it
     against tiles of gathered queries (rows = queries x G heads), writing a partial (out, lse) into
     the slot the block has in each query's list; a combine kernel merges the K partials by LSE;
  3. backward, over the same lists: delta = rowsum(out * dout); one program per segment of a block's
     list accumulates dK, dV in registers and writes a partial dQ per (query, slot); a block's first
     segment adds its dK, dV into the result, a fix-up kernel adds the further segments' in order (no
     atomics: deterministic); a combine kernel sums the K dQ partials.
Partial buffers are bounded by running over chunks of query tokens.
attention_forward_query_outer is the simple baseline (one program per token and group, looping over
its K blocks, like the public vLLM / NSA kernels); bench.py measures both.
"""
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from msa_ref import _expect, check_inputs
from msa_triton_index import _segment, _slot_tile  # KV-outer helpers shared with the KL passes

LOG2E = 1.4426950408889634
PARTIAL_ELEMS = 1 << 31   # partial outs per chunk of T (the dq partials: NSUB times as many): bounded memory
SEG = 128                 # forward: (token, slot) entries per program, so hot blocks split over programs (128: run 7)
BWD_SEG = 1024            # backward: the same, larger (a further segment costs a dK, dV partial; KERNELS.md, session 4)


def _pow2(x, lo=16):
    return max(lo, triton.next_power_of_2(x))


# ---------------------------------------------------------------------------------------------
# the selection, inverted: which queries read each KV block?

def _slots(block_idx, t0, t1, nbc):
    """The selection of tokens [t0, t1) as a slot table: block_idx (B, Hkv, T, K) -> int32 (B*Hkv, Tc, K),
    each row sorted, -1 for padding, for a repeated block and for a block >= nbc (entirely after t1).
    Slot s of (token, group) is where that block's partial result goes."""
    B, Hkv, _, K = block_idx.shape
    sl = block_idx[:, :, t0:t1].reshape(B * Hkv, t1 - t0, K).sort(-1).values   # -1 first, then ascending
    dup = F.pad(sl[..., 1:] == sl[..., :-1], (1, 0))                           # a block chosen twice counts once
    return sl.masked_fill(dup | (sl >= nbc), -1).to(torch.int32).contiguous()


def _csr(slots, nbc):
    """slots (BH, Tc, K) -> ent int32 (BH, Tc*K): entry ids e = token * K + slot grouped by block, tokens
    ascending; start, cnt int64 (BH, nbc): where each block's entries begin in ent and how many there are."""
    BH, Tc, K = slots.shape
    key = slots.view(BH, Tc * K)
    key = key.masked_fill(key < 0, nbc)                                        # padding -> a spare block nbc
    key, ent = key.sort(dim=-1, stable=True)                                   # int32 keys: a cheaper radix sort;
    ent = ent.to(torch.int32)                                                  # stable: tokens stay ascending
    # the keys are sorted, so block b's entries begin where the first key >= b sits (no histogram needed)
    edge = torch.searchsorted(key, torch.arange(nbc + 1, device=key.device, dtype=key.dtype).expand(BH, nbc + 1).contiguous())
    start = edge[:, :nbc].contiguous()                                         # (BH, nbc) int64
    return ent, start, edge[:, 1:] - start


def _segments(start, cnt, n_entries, seg):
    """Split each block's list into segments of <= seg entries, one program each, with no host sync.
    n_entries bounds the entries of one (batch, group). Returns seg_lo, seg_hi, seg_blk, seg_part int32 (BH, n):
    the entries [lo, hi) of block blk, part = which of the block's segments this is (0 = its first);
    n = ceil(n_entries / seg) + nbc is an upper bound on the segments; spare programs get lo = hi."""
    BH, nbc = cnt.shape
    nseg = (cnt + seg - 1) // seg                                              # (BH, nbc)
    last = torch.cumsum(nseg, 1)                                               # segments up to each block
    n = math.ceil(n_entries / seg) + nbc
    pid = torch.arange(n, device=cnt.device).expand(BH, n).contiguous()
    blk = torch.searchsorted(last, pid, right=True)                            # block whose segments hold pid
    used = blk < nbc
    blk = blk.clamp(max=nbc - 1)
    part = pid - (last - nseg).gather(1, blk)
    lo = start.gather(1, blk) + part * seg
    hi = torch.minimum(lo + seg, (start + cnt).gather(1, blk))
    lo, hi = torch.where(used, lo, 0), torch.where(used, hi, 0)
    return lo.to(torch.int32), hi.to(torch.int32), blk.to(torch.int32), part.to(torch.int32)


def _split_segments(start, cnt, n_entries, seg):
    """_segments for a pass whose programs each sum a block's gradient rows (dK, dV; kl_loss's dKI). A block's
    first segment adds its sum into the result, each further one (a block many tokens chose, such as a sink)
    writes it to a slot of a partial buffer that _fixup_kernel then adds in order: no atomics, deterministic.
    Returns lo, hi, blk, x int32 (BH, n) (x = the program's slot, -1 for a first segment), xbase, xcnt int32
    (BH, nbc) (each block's slots) and nx, a bound on the slots one (batch, group) needs."""
    lo, hi, blk, part = _segments(start, cnt, n_entries, seg)
    xcnt = ((cnt + seg - 1) // seg - 1).clamp(min=0)                          # further segments of each block
    xbase = torch.cumsum(xcnt, 1) - xcnt                                       # their first slot
    x = torch.where(part > 0, xbase.gather(1, blk.long()) + part - 1, -1)
    return lo, hi, blk, x.to(torch.int32), xbase.to(torch.int32), xcnt.to(torch.int32), max(1, n_entries // seg)


# ---------------------------------------------------------------------------------------------
# kernels. Inside them scores are in log2 units: s2 = q.k * scale * log2(e), so exp2 replaces exp.

@triton.jit
def _tile_rows(ENT, i, hi, G: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr):
    """Rows of a tile of gathered queries: row r = (entry i + r // GP of a block's list, head r % GP).
    Returns per row: ent = token_in_chunk * K + slot, h (head in group), rv (a real row)."""
    r = tl.arange(0, ROWS)
    e = i + r // GP
    h = r % GP
    rv = (e < hi) & (h < G)
    return tl.load(ENT + e, mask=rv, other=0), h, rv


@triton.jit
def _gather(X, b, g, G, h, t, rv, sxb, sxh, sxt, sxd, d, dmask):
    """Rows (head g * G + h, token t) of X (B, H, T, D) -> (ROWS, BLOCK_D), zeros where not rv."""
    return tl.load(X + b * sxb + (g * G + h).to(tl.int64)[:, None] * sxh + t[:, None].to(tl.int64) * sxt + d[None, :] * sxd,
                   mask=rv[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _kv_block(Kc, V, b, g, kb, jn, T, BS, D, skb, skh, skt, skd, svb, svh, svt, svd, BLOCK_D: tl.constexpr):
    """Keys kb * BS + jn of group g, the tile every KV-outer program holds while it walks its entries.
    Returns the key positions n (BLOCK_N,), their mask (inside the block and < T), the head-dim offsets d and
    mask, the (BLOCK_N, BLOCK_D) mask of both, and the K and V tiles (zeros where masked)."""
    n = kb * BS + jn
    kmask = (jn < BS) & (n < T)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    kvm = kmask[:, None] & dmask[None, :]
    k = tl.load(Kc + b * skb + g.to(tl.int64) * skh + n.to(tl.int64)[:, None] * skt + d[None, :] * skd, mask=kvm, other=0.0)
    v = tl.load(V + b * svb + g.to(tl.int64) * svh + n.to(tl.int64)[:, None] * svt + d[None, :] * svd, mask=kvm, other=0.0)
    return n, kmask, d, dmask, kvm, k, v


@triton.jit
def _fwd_kv_kernel(Q, Kc, V, OP, LP, ENT, SEG_LO, SEG_HI, SEG_BLK,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                   T, t0, Tc, K, NSEG, Hkv, BS, D, scale2,
                   G: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """One program = one segment of one KV block's list of (token, slot) entries, for one (batch, group).
    Writes the block's partial out (normalised) and lse2 into OP (BH, Tc, K, G, D) and LP (BH, Tc, K, G)."""
    b, g, bh, lo, hi, kb = _segment(SEG_LO, SEG_HI, SEG_BLK, NSEG, Hkv)
    if lo < hi:
        jn = tl.arange(0, BLOCK_N)
        n, kmask, d, dmask, kvm, k, v = _kv_block(Kc, V, b, g, kb, jn, T, BS, D, skb, skh, skt, skd,
                                                  svb, svh, svt, svd, BLOCK_D)  # k, v (BLOCK_N, BLOCK_D)
        ENTb = ENT + bh.to(tl.int64) * Tc * K
        STEP: tl.constexpr = ROWS // GP                                        # tokens per tile
        # software pipeline: entry ids two tiles ahead, gathered q rows one tile ahead, so neither
        # the index load nor the gather it feeds stalls the tile being computed
        ent, h, rv = _tile_rows(ENTb, lo, hi, G, GP, ROWS)
        ent_n, h, rv_n = _tile_rows(ENTb, lo + STEP, hi, G, GP, ROWS)
        q = _gather(Q, b, g, G, h, t0 + ent // K, rv, sqb, sqh, sqt, sqd, d, dmask)  # (ROWS, BLOCK_D)
        for i in range(lo, hi, STEP):
            ent_nn, h, rv_nn = _tile_rows(ENTb, i + 2 * STEP, hi, G, GP, ROWS)
            q_n = _gather(Q, b, g, G, h, t0 + ent_n // K, rv_n, sqb, sqh, sqt, sqd, d, dmask)
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
            o = tl.dot(p.to(v.dtype), v, input_precision=PREC)                # (ROWS, BLOCK_D)
            ls = tl.where(l > 0, l, 1.0)
            o = o / ls[:, None]
            lse2 = tl.where(l > 0, m + tl.log2(ls), float("-inf"))
            po = ((bh.to(tl.int64) * Tc + tloc) * K + slot) * G + h            # (ROWS,) partial row index
            tl.store(OP + po[:, None] * D + d[None, :], o.to(OP.dtype.element_ty), mask=rv[:, None] & dmask[None, :])
            tl.store(LP + po, lse2, mask=rv)
            q, ent, rv, ent_n, rv_n = q_n, ent_n, rv_n, ent_nn, rv_nn


@triton.jit
def _combine_kernel(OP, LP, SLOTS, O, LSE, T, t0, Tc, K, Hkv, D,
                    G: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                    WITH_LSE: tl.constexpr, NSUB: tl.constexpr):
    """Merge the K partials of ROWS // GP tokens of one (batch, group) into O (B, Hq, T, D), contiguous.
    WITH_LSE: partial outs weighted by their lse2 (forward; also writes LSE (B, Hq, T) in natural log);
    else a plain sum (dq, NSUB partials per slot). Slots with SLOTS < 0 were never written and are not read."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    r = tl.arange(0, ROWS)
    tloc = pid * (ROWS // GP) + r // GP
    h = r % GP
    d = tl.arange(0, BLOCK_D)
    rv = (tloc < Tc) & (t0 + tloc < T) & (h < G)
    dm = d[None, :] < D
    row0 = (bh.to(tl.int64) * Tc + tloc) * K                                   # (ROWS,) first slot of each token
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((ROWS,), dtype=tl.float32)
    for s in range(K * NSUB):
        ok = rv & (tl.load(SLOTS + row0 + s // NSUB, mask=rv, other=-1) >= 0)
        po = (row0 * NSUB + s) * G + h
        o = tl.load(OP + po[:, None] * D + d[None, :], mask=ok[:, None] & dm, other=0.0).to(tl.float32)
        if WITH_LSE:
            ls = tl.load(LP + po, mask=ok, other=float("-inf"))
            m_new = tl.maximum(m, ls)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_ref)
            beta = tl.exp2(ls - m_ref)
            acc = acc * alpha[:, None] + o * beta[:, None]
            l = l * alpha + beta
            m = m_new
        else:
            acc += o
    b = bh // Hkv
    g = bh % Hkv
    orow = ((b * Hkv + g) * G + h).to(tl.int64) * T + t0 + tloc               # (ROWS,) row of (B, Hq, T)
    if WITH_LSE:
        ls = tl.where(l > 0, l, 1.0)
        acc = acc / ls[:, None]
        tl.store(LSE + orow, tl.where(l > 0, (m + tl.log2(ls)) * 0.6931471805599453, float("-inf")), mask=rv)
    tl.store(O + orow[:, None] * D + d[None, :], acc.to(O.dtype.element_ty), mask=rv[:, None] & dm)


@triton.jit
def _fwd_query_kernel(Q, Kc, V, O, LSE, SLOTS,
                      sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                      T, K, Hkv, BS, D, scale2,
                      G: tl.constexpr, GP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      PREC: tl.constexpr):
    """The query-outer baseline: one program = one token t and one (batch, group); the G heads are the
    rows (padded to GP >= 16); loop over the token's K blocks with an online softmax."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    h = tl.arange(0, GP)
    d = tl.arange(0, BLOCK_D)
    jn = tl.arange(0, BLOCK_N)
    hm = h[:, None] < G
    dm = d[None, :] < D
    q = tl.load(Q + b * sqb + (g * G + h).to(tl.int64)[:, None] * sqh + t.to(tl.int64) * sqt + d[None, :] * sqd, mask=hm & dm, other=0.0)
    acc = tl.zeros((GP, BLOCK_D), dtype=tl.float32)
    m = tl.full((GP,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((GP,), dtype=tl.float32)
    for s in range(K):
        kb = tl.load(SLOTS + (bh.to(tl.int64) * T + t) * K + s)
        if kb >= 0:
            n = kb * BS + jn
            kmask = (jn < BS) & (n <= t)
            k = tl.load(Kc + b * skb + g.to(tl.int64) * skh + n.to(tl.int64)[:, None] * skt + d[None, :] * skd, mask=kmask[:, None] & dm, other=0.0)
            v = tl.load(V + b * svb + g.to(tl.int64) * svh + n.to(tl.int64)[:, None] * svt + d[None, :] * svd, mask=kmask[:, None] & dm, other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale2
            sc = tl.where(kmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_ref)
            p = tl.exp2(sc - m_ref[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m = m_new
    ls = tl.where(l > 0, l, 1.0)
    orow = (b * Hkv * G + g * G + h) * T + t                                   # (GP,) rows of (B, Hq, T)
    tl.store(LSE + orow, tl.where(l > 0, (m + tl.log2(ls)) * 0.6931471805599453, float("-inf")), mask=h < G)
    tl.store(O + orow[:, None] * D + d[None, :], (acc / ls[:, None]).to(O.dtype.element_ty), mask=hm & dm)


@triton.jit
def _delta_kernel(O, DO, DELTA, N, T, Hq, sob, soh, sot, sod, sdb, sdh, sdt, sdd, D,
                  ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta (B*Hq*T,) fp32 = rowsum(out * dout), the softmax-backward term of every row."""
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BLOCK_D)
    rv = r < N
    rr = r.to(tl.int64)
    t = rr % T
    bh = rr // T
    b = bh // Hq
    h = bh % Hq
    msk = rv[:, None] & (d[None, :] < D)
    o = tl.load(O + (b * sob + h * soh + t * sot)[:, None] + d[None, :] * sod, mask=msk, other=0.0)
    do = tl.load(DO + (b * sdb + h * sdh + t * sdt)[:, None] + d[None, :] * sdd, mask=msk, other=0.0)
    tl.store(DELTA + r, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=rv)


@triton.jit
def _bwd_kv_kernel(Q, Kc, V, DO, LSE, DELTA, DQP, DK, DV, DKP, DVP, ENT, SEG_LO, SEG_HI, SEG_BLK, SEG_X,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                   T, t0, Tc, K, NSEG, NX, Hkv, BS, D, scale, scale2,
                   G: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, NSUB: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """One program = keys [sub * BLOCK_N, (sub + 1) * BLOCK_N) of one KV block (NSUB parts per block) of one
    (batch, group), over one segment of the (token, slot) entries of the chunk that chose the block.
    Writes each row's partial dQ into DQP (BH, Tc, K * NSUB, G, D) at slot * NSUB + sub. A block's first
    segment (SEG_X = -1) adds its dK, dV into DK, DV (B, Hkv, T, D) fp32; a further one (a block chosen by
    many tokens) stores them in slot SEG_X of DKP, DVP (BH, NX, NSUB, BLOCK_N, BLOCK_D) for _fixup_kernel:
    no atomics, so the sums are deterministic."""
    b, g, bh, lo, hi, kb = _segment(SEG_LO, SEG_HI, SEG_BLK, NSEG, Hkv)
    sub = tl.program_id(2)
    if lo < hi:
        jn = sub * BLOCK_N + tl.arange(0, BLOCK_N)                             # key offsets inside the block
        n, kmask, d, dmask, kvm, k, v = _kv_block(Kc, V, b, g, kb, jn, T, BS, D, skb, skh, skt, skd,
                                                  svb, svh, svt, svd, BLOCK_D)  # k, v (BLOCK_N, BLOCK_D)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        ENTb = ENT + bh.to(tl.int64) * Tc * K
        STEP: tl.constexpr = ROWS // GP
        # software pipeline as in the forward: entry ids two tiles ahead, row data one tile ahead
        ent, h, rv = _tile_rows(ENTb, lo, hi, G, GP, ROWS)
        ent_n, h, rv_n = _tile_rows(ENTb, lo + STEP, hi, G, GP, ROWS)
        t = t0 + ent // K
        q = _gather(Q, b, g, G, h, t, rv, sqb, sqh, sqt, sqd, d, dmask)       # (ROWS, BLOCK_D)
        do = _gather(DO, b, g, G, h, t, rv, sdb, sdh, sdt, sdd, d, dmask)
        row = ((b * Hkv + g) * G + h) * T + t                                  # (ROWS,) rows of (B, Hq, T)
        lse2 = tl.load(LSE + row, mask=rv, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row, mask=rv, other=0.0)
        for i in range(lo, hi, STEP):
            ent_nn, h, rv_nn = _tile_rows(ENTb, i + 2 * STEP, hi, G, GP, ROWS)
            t_n = t0 + ent_n // K
            q_n = _gather(Q, b, g, G, h, t_n, rv_n, sqb, sqh, sqt, sqd, d, dmask)
            do_n = _gather(DO, b, g, G, h, t_n, rv_n, sdb, sdh, sdt, sdd, d, dmask)
            row_n = ((b * Hkv + g) * G + h) * T + t_n
            lse2_n = tl.load(LSE + row_n, mask=rv_n, other=0.0) * 1.4426950408889634
            delta_n = tl.load(DELTA + row_n, mask=rv_n, other=0.0)
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
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC) * scale      # (ROWS, BLOCK_D)
            po = ((bh.to(tl.int64) * Tc + tloc) * K + slot) * NSUB + sub       # (ROWS,) partial slot
            tl.store(DQP + (po * G + h)[:, None] * D + d[None, :], dq.to(DQP.dtype.element_ty), mask=rv[:, None] & dmask[None, :])
            q, do, lse2, delta, ent, rv, ent_n, rv_n = q_n, do_n, lse2_n, delta_n, ent_n, rv_n, ent_nn, rv_nn
        x = tl.load(SEG_X + bh * NSEG + tl.program_id(0))
        if x < 0:
            kvo = (b * Hkv + g) * T * D + n[:, None] * D + d[None, :]
            tl.store(DK + kvo, tl.load(DK + kvo, mask=kvm, other=0.0) + dk * scale, mask=kvm)
            tl.store(DV + kvo, tl.load(DV + kvo, mask=kvm, other=0.0) + dv, mask=kvm)
        else:
            xo = _slot_tile(bh, x, sub, NX, NSUB, BLOCK_N, BLOCK_D)
            tl.store(DKP + xo, dk * scale)
            tl.store(DVP + xo, dv)


@triton.jit
def _fixup_kernel(X, XP, XBASE, XCNT, T, NBC, NX, BS, D,
                  NSUB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (NBC, BH, NSUB): add the sums of block kb's further segments (slots XBASE .. XBASE + XCNT of XP
    (BH, NX, NSUB, BLOCK_N, BLOCK_D), in order) into its rows of X (BH, T, D) fp32 (dK, dV or dKI)."""
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    sub = tl.program_id(2)
    x0 = tl.load(XBASE + bh * NBC + kb)
    nx = tl.load(XCNT + bh * NBC + kb)
    if nx > 0:
        jn = sub * BLOCK_N + tl.arange(0, BLOCK_N)
        n = kb * BS + jn
        d = tl.arange(0, BLOCK_D)
        m = ((jn < BS) & (n < T))[:, None] & (d[None, :] < D)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for x in range(x0, x0 + nx):
            acc += tl.load(XP + _slot_tile(bh, x, sub, NX, NSUB, BLOCK_N, BLOCK_D))
        xo = bh.to(tl.int64) * T * D + n[:, None] * D + d[None, :]
        tl.store(X + xo, tl.load(X + xo, mask=m, other=0.0) + acc, mask=m)


# ---------------------------------------------------------------------------------------------
# launchers

def _check(q, k, v, block_idx, block_size):
    """msa_ref's checks plus what these kernels need. Returns (B, Hkv, T)."""
    B, Hkv, T = check_inputs(q=q, k=k, v=v, block_idx=block_idx, block_size=block_size)
    _expect(q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype and v.dtype == q.dtype,
            f"q, k, v must share one dtype among float16, bfloat16, float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    _expect(q.shape[3] <= 128, f"head dim D must be <= 128, got {q.shape[3]}")
    _expect(block_size <= 128, f"block_size must be <= 128 for these kernels, got {block_size}")
    _expect(q.shape[1] // Hkv <= 64, f"G = Hq / Hkv must be <= 64, got {q.shape[1] // Hkv}")
    _expect(q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1",
            f"tensors must be on a CUDA device (or set TRITON_INTERPRET=1 before importing triton), got {q.device}")
    return B, Hkv, T


def _consts(q, block_size):
    """Compile-time shape constants shared by every kernel of one call."""
    D = q.shape[3]
    return dict(BLOCK_N=_pow2(block_size), BLOCK_D=_pow2(D),
                PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _tiles(kind, D, GP, BLOCK_N):
    """Tile shape and launch options of the 'fwd' and 'bwd' KV-outer kernels and of the 'combine' kernel (measured
    on an H100, KERNELS.md): ROWS = tokens x GP heads per tile; BLOCK_N keys per program (a backward program may
    take part of a block: fewer registers, but one more dq partial per slot); maxnreg caps registers per thread
    so that more programs share an SM (None: the compiler's choice)."""
    if kind == "combine":
        return dict(ROWS=max(GP, 32), num_warps=2)   # 2 warps: more programs, more loads in flight per SM
    if kind == "fwd":
        return dict(ROWS=max(GP, 64), BLOCK_N=BLOCK_N, num_warps=4, num_stages=1, maxnreg=None)
    if D > 64:   # whole blocks, 2 tokens x 16 heads a tile: half the dq partials and gathers of 64 x 64 tiles
        return dict(ROWS=max(GP, 32), BLOCK_N=BLOCK_N, num_warps=8, num_stages=2, maxnreg=None)
    return dict(ROWS=max(GP, 64), BLOCK_N=min(BLOCK_N, 64), num_warps=4, num_stages=2, maxnreg=None)


def _launch_opts(t):
    """Kernel keyword arguments from a _tiles dict (maxnreg only when set: the interpreter knows no such option)."""
    return {k: v for k, v in t.items() if v is not None}


def _chunks(block_idx, per_slot, block_size):
    """The selection as KV-outer work lists, chunk by chunk of tokens so that a partial buffer of per_slot elements
    per (batch*group, token, slot) stays under PARTIAL_ELEMS (the forward's (B*Hkv, Tc, K, G, D): per_slot = G*D):
    yields (t0, t1, nbc, slots, ent, start, cnt) (_slots, _csr). A generator, so that the host builds chunk i + 1's
    lists while the GPU runs chunk i; the forward keeps them for the backward, kl_loss's passes use them too."""
    B, Hkv, T, K = block_idx.shape
    Tc = min(T, max(1, PARTIAL_ELEMS // (B * Hkv * K * per_slot)))
    for t0 in range(0, T, Tc):
        t1 = min(T, t0 + Tc)
        nbc = math.ceil(t1 / block_size)                                       # blocks a token of the chunk may see
        slots = _slots(block_idx, t0, t1, nbc)
        yield (t0, t1, nbc, slots, *_csr(slots, nbc))


def _forward(q, k, v, block_idx, block_size):
    """KV-outer forward. Returns out (B, Hq, T, D) contiguous in q's dtype, lse fp32 (B, Hq, T) and the chunks."""
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], block_idx.shape[3]
    G = Hq // Hkv
    GP = triton.next_power_of_2(G)
    c = _consts(q, block_size)
    tiles = _launch_opts(_tiles("fwd", D, GP, c["BLOCK_N"]))
    ct = _tiles("combine", D, GP, c["BLOCK_N"])
    out = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    chunks = []
    for chunk in _chunks(block_idx, G * D, block_size):
        chunks.append(chunk)
        t0, t1, nbc, slots, ent, start, cnt = chunk
        lo, hi, blk, _ = _segments(start, cnt, (t1 - t0) * K, SEG)
        op = torch.empty(B * Hkv, t1 - t0, K, G, D, device=q.device, dtype=q.dtype)  # partial outs
        lp = torch.empty(B * Hkv, t1 - t0, K, G, device=q.device, dtype=torch.float32)  # partial lse2
        _fwd_kv_kernel[(lo.shape[1], B * Hkv)](
            q, k, v, op, lp, ent, lo, hi, blk, *q.stride(), *k.stride(), *v.stride(),
            T, t0, t1 - t0, K, lo.shape[1], Hkv, block_size, D, LOG2E / math.sqrt(D),
            G=G, GP=GP, BLOCK_D=c["BLOCK_D"], PREC=c["PREC"], **tiles)
        _combine_kernel[(triton.cdiv(t1 - t0, ct["ROWS"] // GP), B * Hkv)](
            op, lp, slots, out, lse, T, t0, t1 - t0, K, Hkv, D,
            G=G, GP=GP, BLOCK_D=c["BLOCK_D"], WITH_LSE=True, NSUB=1, **ct)
    return out, lse, chunks


def _backward(q, k, v, out, lse, dout, chunks, block_size):
    """KV-outer backward over the forward's chunks: dK, dV summed per block (its segments in a fixed order), dQ
    from per-slot partials. Returns dq, dk, dv."""
    B, Hq, T, D = q.shape
    Hkv, K = k.shape[1], chunks[0][3].shape[2]                                 # slots: (BH, Tc, K)
    G = Hq // Hkv
    GP = triton.next_power_of_2(G)
    c = _consts(q, block_size)
    delta = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(B * Hq * T, 64),)](out, dout, delta, B * Hq * T, T, Hq, *out.stride(), *dout.stride(), D,
                                                  ROWS=64, BLOCK_D=c["BLOCK_D"])
    dq = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)
    dk = torch.zeros(B, Hkv, T, D, device=q.device, dtype=torch.float32)
    dv = torch.zeros(B, Hkv, T, D, device=q.device, dtype=torch.float32)
    tiles = _launch_opts(_tiles("bwd", D, GP, c["BLOCK_N"]))
    ct = _tiles("combine", D, GP, c["BLOCK_N"])
    NSUB = triton.cdiv(block_size, tiles["BLOCK_N"])                           # programs per KV block
    for t0, t1, nbc, slots, ent, start, cnt in chunks:
        # segments of <= BWD_SEG entries, so that a block many tokens chose (block 0, a sink) is not one long
        # program that the rest of the launch waits for
        lo, hi, blk, x, xbase, xcnt, NX = _split_segments(start, cnt, (t1 - t0) * K, BWD_SEG)
        dkp, dvp = torch.empty(2, B * Hkv, NX, NSUB, tiles["BLOCK_N"], c["BLOCK_D"], device=q.device, dtype=torch.float32)
        dqp = torch.empty(B * Hkv, t1 - t0, K * NSUB, G, D, device=q.device, dtype=q.dtype)  # partial dq
        _bwd_kv_kernel[(lo.shape[1], B * Hkv, NSUB)](
            q, k, v, dout, lse, delta, dqp, dk, dv, dkp, dvp, ent, lo, hi, blk, x,
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(),
            T, t0, t1 - t0, K, lo.shape[1], NX, Hkv, block_size, D, 1.0 / math.sqrt(D), LOG2E / math.sqrt(D),
            G=G, GP=GP, NSUB=NSUB, BLOCK_D=c["BLOCK_D"], PREC=c["PREC"], **tiles)
        for grad, partial in ((dk, dkp), (dv, dvp)):
            _fixup_kernel[(nbc, B * Hkv, NSUB)](grad, partial, xbase, xcnt, T, nbc, NX, block_size, D,
                                                NSUB=NSUB, BLOCK_N=tiles["BLOCK_N"], BLOCK_D=c["BLOCK_D"])
        _combine_kernel[(triton.cdiv(t1 - t0, ct["ROWS"] // GP), B * Hkv)](
            dqp, dqp, slots, dq, dq, T, t0, t1 - t0, K, Hkv, D,
            G=G, GP=GP, BLOCK_D=c["BLOCK_D"], WITH_LSE=False, NSUB=NSUB, **ct)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_idx, block_size):
        out, lse, ctx.chunks = _forward(q, k, v, block_idx, block_size)   # work lists: intermediates, kept on ctx
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.block_size = block_size
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.chunks, ctx.block_size)
        return dq, dk, dv, None, None


def sparse_attention(q, k, v, block_idx, block_size):
    """
    q (B, Hq, T, D), k and v (B, Hkv, T, D), block_idx int (B, Hkv, T, K) with -1 padding, any order.
    Returns out (B, Hq, T, D) in q's dtype and the natural-log lse fp32 (B, Hq, T), as msa_ref does.
    Differentiable in q, k, v through out (lse is returned without gradient). Deterministic backward.
    """
    _check(q, k, v, block_idx, block_size)
    return _SparseAttention.apply(q, k, v, block_idx, block_size)


def attention_forward_query_outer(q, k, v, block_idx, block_size):
    """The query-outer baseline forward (no autograd): same inputs and outputs as sparse_attention."""
    B, Hkv, T = _check(q, k, v, block_idx, block_size)
    Hq, D, K = q.shape[1], q.shape[3], block_idx.shape[3]
    G = Hq // Hkv
    c = _consts(q, block_size)
    slots = _slots(block_idx, 0, T, math.ceil(T / block_size))
    out = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    _fwd_query_kernel[(T, B * Hkv)](q, k, v, out, lse, slots, *q.stride(), *k.stride(), *v.stride(),
                                    T, K, Hkv, block_size, D, LOG2E / math.sqrt(D),
                                    G=G, GP=_pow2(G), num_warps=4, num_stages=2, **c)
    return out, lse


# ---------------------------------------------------------------------------------------------
# the language-model loss (msa_ref.linear_cross_entropy), chunked and fused. Not MSA: at T = 128K the
# (T, V) logits would be 13 GB in bf16 and 26 GB in fp32, and torch's fp32 softmax forward + backward
# over them costs more than MSA's attention (MODEL_NOTES.md). Here each chunk of rows is multiplied
# out in the compute dtype, one kernel turns it into the rows' losses and, in place, into d loss /
# d logits, and two matmuls take that to dh and dw at once; nothing of size (T, V) outlives a chunk.

CE_CHUNK_ELEMS = 2 ** 29  # logits per chunk (1 GB in bf16)


@triton.jit
def _ce_rows_kernel(L, Y, LOSS, V, stride, BLOCK_V: tl.constexpr):
    """One program = one row of the logits L (N, V). LOSS[row] = lse - L[y] (0 where y = -1, NaN where y
    is outside [-1, V): a bad target poisons the loss instead of reading out of bounds); the row is then
    overwritten with softmax - onehot(y) (zeros where y = -1). Two sweeps; the second mostly hits L2."""
    row = tl.program_id(0)
    Lr = L + row.to(tl.int64) * stride
    y = tl.load(Y + row)
    m = tl.full((), float("-inf"), tl.float32)  # running max and sum of exp(x - m): an online logsumexp
    s = tl.full((), 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(Lr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    ok = (y >= 0) & (y < V)
    x_y = tl.load(Lr + y, mask=ok, other=0.0).to(tl.float32)
    tl.store(LOSS + row, tl.where(ok, lse - x_y, tl.where(y == -1, 0.0, float("nan"))))
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(Lr + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)
        tl.store(Lr + cols, tl.where(y == -1, 0.0, g).to(L.dtype.element_ty), mask=cols < V)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, y, grad_enabled):
        # the dtype the logits would have: autocast's if it is on (it does not reach inside the explicit
        # casts below), else h's
        dev = h.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        # gradients only where a backward can come (needs_input_grad ignores torch.no_grad(): eval would pay 3x)
        grad_h, grad_w = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        N, V = h.shape[0], w.shape[0]
        rows = max(1, CE_CHUNK_ELEMS // V)
        loss = torch.empty(N, device=h.device, dtype=torch.float32)
        with torch.autocast(dev, enabled=False):
            hc, wc = h.to(cdt), w.to(cdt)                                      # (N, C), (V, C)
            dh = torch.empty_like(h) if grad_h else None                       # (N, C)
            dw = torch.zeros_like(w, dtype=torch.float32) if grad_w else None  # (V, C), summed over chunks
            for i in range(0, N, rows):
                hi = hc[i:i + rows]                                            # (n, C)
                logits = hi @ wc.t()                                           # (n, V), then d loss / d logits
                _ce_rows_kernel[(hi.shape[0],)](logits, y[i:i + rows], loss[i:i + rows], V, logits.stride(0),
                                                BLOCK_V=4096, num_warps=8)
                if grad_h:
                    dh[i:i + rows] = logits @ wc
                if grad_w:
                    dw += (logits.t() @ hi).float()
        n = (y != -1).sum()                                                    # the mean is over scored tokens
        ctx.save_for_backward(dh, dw, n)
        ctx.dtypes = h.dtype, w.dtype
        return loss.sum() / n

    @staticmethod
    def backward(ctx, dloss):
        dh, dw, n = ctx.saved_tensors
        scale = dloss / n                                                      # d mean / d (sum of row losses)
        return (None if dh is None else (dh * scale).to(ctx.dtypes[0]),
                None if dw is None else (dw * scale).to(ctx.dtypes[1]), None, None)


def linear_cross_entropy(h, w, y):
    """Mean cross-entropy of the logits h @ w.T against y: h (N, C), w (V, C), y int (N,), -1 = no loss.
    Same value and gradients as msa_ref.linear_cross_entropy, computed chunk by chunk (see above)."""
    _expect(h.dim() == 2 and w.dim() == 2 and h.shape[1] == w.shape[1],
            f"h must be (N, C) and w (V, C) with the same C, got {tuple(h.shape)} and {tuple(w.shape)}")
    _expect(y.shape == (h.shape[0],) and not y.is_floating_point(),
            f"y must be integer targets of shape ({h.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    _expect(h.device == w.device == y.device, f"h, w, y must be on one device, got {h.device}, {w.device}, {y.device}")
    return _LinearCrossEntropy.apply(h, w, y.contiguous(), torch.is_grad_enabled())


# ---------------------------------------------------------------------------------------------
# the rest of the API lives in two sibling files, so that each file reads as one topic; import them
# from here. (msa_triton_index borrows this file's work-list helpers inside its functions, not at
# import time, so either module may be imported first.)
from msa_triton_index import index_topk, kl_loss  # noqa: E402,F401 the index branch: selection and KL loss
from msa_triton_decode import sparse_decode       # noqa: E402,F401 one new token against the caches
