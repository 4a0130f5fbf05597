"""
The index branch of MSA in Triton: index_topk (which blocks does each query read?) and kl_loss (teach
the index branch where the main branch looks). msa_ref.py is the definition; these compute the same
functions (DESIGN.md sections 1 and 3) without ever building a T x T tensor, and msa_triton.py
re-exports them.

Shapes: B batch, T tokens, Hq query heads, Hkv KV heads (= groups), G = Hq // Hkv, D head dim,
Di index dim, bs block size, K blocks per query, nb = ceil(T / bs).

index_topk, one kernel: a program owns BLOCK_Q consecutive queries of one (batch, group) and walks
the key blocks left to right. For each block it computes the [BLOCK_Q, bs] index scores with one
matrix product, max-pools them to one score per query, and merges that score into a running top-k
kept in registers. The [Hkv, T, nb] block-score matrix is never written (vLLM's indexer writes it:
2.15 GB at 128K) and there is no second top-k pass.
Two facts keep it simple:
  - only earlier blocks b < t // bs compete (the local block is always taken), and those are
    entirely visible, so no token-level causal mask is needed: a block score is a plain max;
  - a score and its block index pack into one int64 key (monotone int32 image of the fp32 score in
    the high word, 0x7fffffff - block in the low word), so "higher score, ties to the lower block"
    is plain integer order: the running top-k is a [BLOCK_Q, KP] tile of keys where a new key
    replaces the row minimum if larger, and one tl.sort orders the winners at the end.

kl_loss: see the section further down.
"""
import math

import torch
import triton
import triton.language as tl

from msa_ref import check_inputs

INT64_MIN = tl.constexpr(-(2 ** 63))


def _pow2(x, lo=16):
    return max(lo, triton.next_power_of_2(x))


# ---------------------------------------------------------------------------------------------
# index_topk

@triton.jit
def _index_topk_kernel(qi_ptr, ki_ptr, out_ptr, T, Hkv, sqrt_di,
                       s_qb, s_qh, s_qt, s_qd, s_kb, s_kt, s_kd, s_ob, s_oh, s_ot, s_ok,
                       BS: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, DI: tl.constexpr, DIP: tl.constexpr,
                       BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NCHUNK: tl.constexpr,
                       IEEE: tl.constexpr):
    bh = tl.program_id(0)                    # axis 0 varies fastest: the first wave takes the
    qt = tl.num_programs(1) - 1 - tl.program_id(1)  # last (longest) query tiles of every (b, g)
    b = bh // Hkv
    g = bh % Hkv
    rows = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)                                # (BLOCK_Q,) query positions
    dcol = tl.arange(0, DIP)                                                   # Di padded to a power of 2
    qi = tl.load(qi_ptr + b * s_qb + g * s_qh + rows[:, None] * s_qt + dcol[None, :] * s_qd,
                 mask=(rows[:, None] < T) & (dcol[None, :] < DI), other=0.0)   # (BLOCK_Q, Di)
    local = rows // BS                                                         # (BLOCK_Q,) each row's local block
    cols = tl.arange(0, KP)
    # running top-k, distinct sentinels below every real key so "== row minimum" hits one column
    top = tl.full([BLOCK_Q, KP], INT64_MIN + 1, tl.int64) + cols[None, :].to(tl.int64)  # (BLOCK_Q, KP)
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
            ki = tl.load(ki_ptr + b * s_kb + (blk * BS + n)[:, None] * s_kt + dcol[None, :] * s_kd,
                         mask=kmask[:, None] & (dcol[None, :] < DI), other=0.0)  # (BLOCK_N, Di)
            if IEEE:
                s = tl.dot(qi, tl.trans(ki), input_precision="ieee")           # (BLOCK_Q, BLOCK_N)
            else:
                s = tl.dot(qi, tl.trans(ki))
            if BS % BLOCK_N != 0:
                s = tl.where(kmask[None, :], s, float("-inf"))
            m = tl.maximum(m, tl.max(s, axis=1))
        # the scale goes on after the max (x -> x / c is monotone), divided as msa_ref divides,
        # and + 0.0 turns -0.0 into +0.0 so the two zeros tie as they do in msa_ref
        score = m / sqrt_di + 0.0                                              # (BLOCK_Q,)
        bits = score.to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)                     # monotone: float order = int order
        key = (bits.to(tl.int64) << 32) | (tl.zeros_like(bits).to(tl.int64) + (0x7FFFFFFF - blk))  # ties -> lower block
        key = tl.where(blk < local, key, INT64_MIN)                            # only earlier blocks compete
        hit = (top == thr[:, None]) & (key > thr)[:, None]                     # replace the row minimum
        top = tl.where(hit, key[:, None], top)
        thr = tl.min(top, axis=1)
    top = tl.sort(top, dim=1, descending=True)                                 # best first, ties -> lower block
    idx = 0x7FFFFFFF - (top & 0xFFFFFFFF).to(tl.int32)                         # (BLOCK_Q, KP) block indices
    n_far = tl.minimum(local, K - 1)[:, None]                                  # earlier blocks taken
    out = tl.where(cols[None, :] < n_far, idx, -1)
    out = tl.where(cols[None, :] == n_far, local[:, None], out)                # local in the last valid slot
    tl.store(out_ptr + b * s_ob + g * s_oh + rows[:, None] * s_ot + cols[None, :] * s_ok, out,
             mask=(rows[:, None] < T) & (cols[None, :] < K))


def index_topk(qi, ki, block_size, topk, block_q=None, num_warps=None, num_stages=None):
    """qi (B, Hkv, T, Di), ki (B, T, Di) -> block_idx int32 (B, Hkv, T, K), the selection of msa_ref.index_topk:
    the K-1 best earlier blocks by descending block score (ties: lower block first), then the local block
    t // bs in the last valid slot, then -1. block_q / num_warps / num_stages tune the kernel (bench.py)."""
    B, Hkv, T = check_inputs(qi=qi, ki=ki, block_size=block_size, topk=topk)
    Di = qi.shape[3]
    out = torch.empty(B, Hkv, T, topk, dtype=torch.int32, device=qi.device)
    if ki.dtype != qi.dtype:
        ki = ki.to(qi.dtype)
    on_gpu = qi.is_cuda
    block_q = block_q or (128 if on_gpu else 16)
    block_n = min(_pow2(block_size), 128 if on_gpu else 32)
    grid = (B * Hkv, triton.cdiv(T, block_q))
    _index_topk_kernel[grid](
        qi, ki, out, T, Hkv, math.sqrt(Di),
        *qi.stride(), *ki.stride(), *out.stride(),
        BS=block_size, K=topk, KP=_pow2(topk, 2), DI=Di, DIP=_pow2(Di), BLOCK_Q=block_q, BLOCK_N=block_n,
        NCHUNK=triton.cdiv(block_size, block_n), IEEE=qi.dtype == torch.float32,
        num_warps=num_warps or (8 if block_q >= 256 else 4), num_stages=num_stages or 3)
    return out


# ---------------------------------------------------------------------------------------------
# kl_loss, KV-outer over the same CSR as msa_triton.sparse_attention (DESIGN.md section 4)
#
# For each (batch, group, KV block), msa_triton's CSR lists the (token, slot) entries that chose
# the block; a program takes one segment of such a list, loads the block's k and ki once and runs
# them against tiles of BLOCK_Q gathered queries. Two passes:
#   1. stats: per entry, the partial log-sum-exp over this block's visible tokens of every teacher
#      head (q_h . k / sqrt(D)) and of the student (qi . ki / sqrt(Di)); torch merges the K partials
#      of each (token, group) into lse_h (BH, T, G) and lse_u (BH, T);
#   2. loss (+ gradients): p = mean_h exp(s_h - lse_h), log r = u - lse_u, loss += sum p (log p - log r);
#      with ds = (r - p) / (B * Hkv * T) / sqrt(Di): dqi[t] += ds @ ki (fp32 atomics per entry) and
#      dki[block] += ds^T @ qi, summed over the segment in registers, then one fp32 atomic add.
# The loss is a scalar, so its gradient is computed in pass 2 and the backward only scales it by
# the incoming gradient: two passes over the teacher's scores instead of FlashAttention's three.
# fp32 atomics make dqi / dki not bitwise deterministic run to run (the loss is: per-program sums).

@triton.jit
def _kl_rows(ENT, e0, hi, K, BLOCK_Q: tl.constexpr):
    """A tile of BLOCK_Q entries e0.. of a block's list: token t, slot, and which rows are real."""
    e = e0 + tl.arange(0, BLOCK_Q)
    ev = e < hi
    ent = tl.load(ENT + e, mask=ev, other=0)                                   # ent = t * K + slot
    return ent // K, ent % K, ev


@triton.jit
def _kl_stats_kernel(Q, Kc, QI, KI, ENT, SEG_LO, SEG_HI, SEG_BLK, LSE_QP, LSE_UP,
                     sqb, sqh, sqt, sqd, skb, skh, skt, skd, sib, sih, sit, sid, sjb, sjt, sjd,
                     T, K, NSEG, Hkv, scale_d, sqrt_di,
                     G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                     DI: tl.constexpr, DIP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                     NCHUNK: tl.constexpr, IEEE: tl.constexpr):
    """Pass 1. Partial lse of every entry over one chunk of its block: LSE_QP (BH, T, K*NCHUNK, G) for
    the teacher heads, LSE_UP (BH, T, K*NCHUNK) for the student (natural log, -inf: nothing visible)."""
    sid_ = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    lo = tl.load(SEG_LO + bh * NSEG + sid_)
    hi = tl.load(SEG_HI + bh * NSEG + sid_)
    kb = tl.load(SEG_BLK + bh * NSEG + sid_)
    ENTb = ENT + bh.to(tl.int64) * T * K
    d = tl.arange(0, DP)
    di = tl.arange(0, DIP)
    for c in tl.static_range(NCHUNK):                                          # bs in chunks of BLOCK_N keys
        jn = c * BLOCK_N + tl.arange(0, BLOCK_N)
        j = kb * BS + jn                                                       # (BLOCK_N,) key positions
        kmask = (jn < BS) & (j < T)
        k = tl.load(Kc + b * skb + g * skh + j[:, None] * skt + d[None, :] * skd,
                    mask=kmask[:, None] & (d[None, :] < D), other=0.0)         # (BLOCK_N, D)
        ki = tl.load(KI + b * sjb + j[:, None] * sjt + di[None, :] * sjd,
                     mask=kmask[:, None] & (di[None, :] < DI), other=0.0)      # (BLOCK_N, Di)
        for e0 in range(lo, hi, BLOCK_Q):
            t, slot, ev = _kl_rows(ENTb, e0, hi, K, BLOCK_Q)
            vis = ev[:, None] & kmask[None, :] & (j[None, :] <= t[:, None])  # causal inside the local block
            qi = tl.load(QI + b * sib + g * sih + t[:, None].to(tl.int64) * sit + di[None, :] * sid,
                         mask=ev[:, None] & (di[None, :] < DI), other=0.0)     # (BLOCK_Q, Di)
            if IEEE:
                u = tl.dot(qi, tl.trans(ki), input_precision="ieee")
            else:
                u = tl.dot(qi, tl.trans(ki))
            u = tl.where(vis, u / sqrt_di, float("-inf"))                      # (BLOCK_Q, BLOCK_N) student logits
            slot_c = (bh.to(tl.int64) * T + t) * (K * NCHUNK) + slot * NCHUNK + c  # (BLOCK_Q,)
            tl.store(LSE_UP + slot_c, _row_lse(u), mask=ev)
            for h in range(G):
                q = tl.load(Q + b * sqb + (g * G + h) * sqh + t[:, None].to(tl.int64) * sqt + d[None, :] * sqd,
                            mask=ev[:, None] & (d[None, :] < D), other=0.0)    # (BLOCK_Q, D) head h of the group
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = tl.where(vis, s * scale_d, float("-inf"))
                tl.store(LSE_QP + slot_c * G + h, _row_lse(s), mask=ev)


@triton.jit
def _row_lse(s):
    """Natural-log log-sum-exp of each row of s; -inf for a row of -inf."""
    m = tl.max(s, axis=1)
    m0 = tl.where(m == float("-inf"), 0.0, m)
    return m0 + tl.log(tl.sum(tl.exp(s - m0[:, None]), axis=1))


@triton.jit
def _kl_loss_kernel(Q, Kc, QI, KI, ENT, SEG_LO, SEG_HI, SEG_BLK, LSE_Q, LSE_U, LOSS, DQI, DKI,
                    sqb, sqh, sqt, sqd, skb, skh, skt, skd, sib, sih, sit, sid, sjb, sjt, sjd,
                    T, K, NSEG, Hkv, scale_d, sqrt_di, grad_scale,
                    G: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                    DI: tl.constexpr, DIP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                    NCHUNK: tl.constexpr, IEEE: tl.constexpr, GRAD: tl.constexpr):
    """Pass 2. LOSS (BH, NSEG): this program's sum of p (log p - log r). With GRAD: fp32 atomic adds of
    ds @ ki into DQI (BH, T, Di) and of ds^T @ qi into DKI (B, T, Di), ds already scaled by grad_scale."""
    sid_ = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    g = bh % Hkv
    lo = tl.load(SEG_LO + bh * NSEG + sid_)
    hi = tl.load(SEG_HI + bh * NSEG + sid_)
    kb = tl.load(SEG_BLK + bh * NSEG + sid_)
    ENTb = ENT + bh.to(tl.int64) * T * K
    d = tl.arange(0, DP)
    di = tl.arange(0, DIP)
    dim = di[None, :] < DI
    loss = tl.zeros([BLOCK_Q], tl.float32)
    for c in tl.static_range(NCHUNK):
        jn = c * BLOCK_N + tl.arange(0, BLOCK_N)
        j = kb * BS + jn
        kmask = (jn < BS) & (j < T)
        k = tl.load(Kc + b * skb + g * skh + j[:, None] * skt + d[None, :] * skd,
                    mask=kmask[:, None] & (d[None, :] < D), other=0.0)         # (BLOCK_N, D)
        ki = tl.load(KI + b * sjb + j[:, None] * sjt + di[None, :] * sjd,
                     mask=kmask[:, None] & dim, other=0.0)                     # (BLOCK_N, Di)
        dki = tl.zeros([BLOCK_N, DIP], tl.float32)
        for e0 in range(lo, hi, BLOCK_Q):
            t, slot, ev = _kl_rows(ENTb, e0, hi, K, BLOCK_Q)
            t64 = t.to(tl.int64)
            vis = ev[:, None] & kmask[None, :] & (j[None, :] <= t[:, None])
            qi = tl.load(QI + b * sib + g * sih + t64[:, None] * sit + di[None, :] * sid,
                         mask=ev[:, None] & dim, other=0.0)                    # (BLOCK_Q, Di)
            if IEEE:
                u = tl.dot(qi, tl.trans(ki), input_precision="ieee")
            else:
                u = tl.dot(qi, tl.trans(ki))
            row = bh.to(tl.int64) * T + t64                                    # (BLOCK_Q,) row of (BH, T)
            log_r = u / sqrt_di - tl.load(LSE_U + row, mask=ev, other=0.0)[:, None]  # student log-probs
            p = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
            for h in range(G):
                q = tl.load(Q + b * sqb + (g * G + h) * sqh + t64[:, None] * sqt + d[None, :] * sqd,
                            mask=ev[:, None] & (d[None, :] < D), other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                lse_h = tl.load(LSE_Q + row * G + h, mask=ev, other=0.0)
                p += tl.where(vis, tl.exp(s * scale_d - lse_h[:, None]), 0.0)
            p = p / G                                                          # (BLOCK_Q, BLOCK_N) teacher
            loss += tl.sum(tl.where(p > 0, p * (tl.log(tl.where(p > 0, p, 1.0)) - log_r), 0.0), axis=1)
            if GRAD:
                ds = (tl.where(vis, tl.exp(log_r), 0.0) - p) * grad_scale       # (BLOCK_Q, BLOCK_N)
                if IEEE:
                    dqi = tl.dot(ds, ki, input_precision="ieee")
                    dki += tl.dot(tl.trans(ds), qi, input_precision="ieee")
                else:
                    dqi = tl.dot(ds.to(ki.dtype), ki)
                    dki += tl.dot(tl.trans(ds.to(qi.dtype)), qi)
                tl.atomic_add(DQI + row[:, None] * DI + di[None, :], dqi, mask=ev[:, None] & dim)
        if GRAD:
            tl.atomic_add(DKI + (b * T + j[:, None]) * DI + di[None, :], dki, mask=kmask[:, None] & dim)
    tl.store(LOSS + bh * NSEG + sid_, tl.sum(loss, axis=0))


def _kl_launch(q, k, qi, ki, block_idx, block_size, grad):
    """Both passes. Returns the loss (fp32 scalar tensor) and, with grad, d loss / d qi and d ki in fp32."""
    from msa_triton import _csr, _segments, _slots   # the CSR of sparse_attention (msa_triton re-exports us)
    B, Hq, T, D = q.shape
    Hkv, Di = qi.shape[1], qi.shape[3]
    G, BH, K = Hq // Hkv, B * Hkv, block_idx.shape[3]
    nb = triton.cdiv(T, block_size)
    dev = q.device
    on_gpu = q.is_cuda
    block_q = 64 if on_gpu else 16
    block_n = min(_pow2(block_size), 128 if on_gpu else 32)
    nchunk = triton.cdiv(block_size, block_n)
    seg = 4 * block_q                                                          # entries per program
    if k.dtype != q.dtype:
        k = k.to(q.dtype)
    if ki.dtype != qi.dtype:
        ki = ki.to(qi.dtype)
    ent, start, cnt = _csr(_slots(block_idx, 0, T, nb), nb)                    # (BH, T*K), (BH, nb) x2
    lo, hi, blk = _segments(start, cnt, T * K, seg)                            # (BH, NSEG) x3
    nseg = lo.shape[1]
    grid = (nseg, BH)
    strides = (*q.stride(), *k.stride(), *qi.stride(), *ki.stride())
    meta = dict(G=G, BS=block_size, D=D, DP=_pow2(D), DI=Di, DIP=_pow2(Di), BLOCK_Q=block_q,
                BLOCK_N=block_n, NCHUNK=nchunk, IEEE=q.dtype == torch.float32 and qi.dtype == torch.float32,
                num_warps=4)
    # pass 1: partial lse per (token, slot, chunk), -inf where nothing was written, merged by torch
    lse_qp = torch.full((BH, T, K * nchunk, G), float("-inf"), dtype=torch.float32, device=dev)
    lse_up = torch.full((BH, T, K * nchunk), float("-inf"), dtype=torch.float32, device=dev)
    _kl_stats_kernel[grid](q, k, qi, ki, ent, lo, hi, blk, lse_qp, lse_up, *strides,
                           T, K, nseg, Hkv, 1.0 / math.sqrt(D), math.sqrt(Di), **meta)
    lse_q = torch.logsumexp(lse_qp, dim=2).contiguous()                        # (BH, T, G) teacher, per head
    lse_u = torch.logsumexp(lse_up, dim=2).contiguous()                        # (BH, T) student
    del lse_qp, lse_up
    # pass 2: the loss, and its gradient while the scores are at hand
    loss = torch.empty(BH, nseg, dtype=torch.float32, device=dev)
    dqi = torch.zeros(BH, T, Di, dtype=torch.float32, device=dev) if grad else loss
    dki = torch.zeros(B, T, Di, dtype=torch.float32, device=dev) if grad else loss
    n_rows = B * Hkv * T
    _kl_loss_kernel[grid](q, k, qi, ki, ent, lo, hi, blk, lse_q, lse_u, loss, dqi, dki, *strides,
                          T, K, nseg, Hkv, 1.0 / math.sqrt(D), math.sqrt(Di), 1.0 / (n_rows * math.sqrt(Di)),
                          GRAD=grad, **meta)
    loss = loss.sum() / n_rows
    if not grad:
        return loss, None, None
    return loss, dqi.view(B, Hkv, T, Di), dki


class _KLLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, qi, ki, block_idx, block_size):
        grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        loss, dqi, dki = _kl_launch(q, k, qi, ki, block_idx, block_size, grad)
        ctx.save_for_backward(dqi, dki)
        ctx.dtypes = (qi.dtype, ki.dtype)
        return loss.to(torch.promote_types(qi.dtype, torch.float32))

    @staticmethod
    def backward(ctx, dloss):
        dqi, dki = ctx.saved_tensors
        return (None, None, (dqi * dloss).to(ctx.dtypes[0]) if ctx.needs_input_grad[2] else None,
                (dki * dloss).to(ctx.dtypes[1]) if ctx.needs_input_grad[3] else None, None, None)


def kl_loss(q, k, qi, ki, block_idx, block_size):
    """msa_ref.kl_loss on the GPU (or the Triton interpreter): mean over (b, g, t) of KL(p || r) on the
    support of block_idx. Differentiable in qi and ki only; q and k are a target and get no gradient."""
    check_inputs(q=q, k=k, qi=qi, ki=ki, block_idx=block_idx, block_size=block_size)
    return _KLLoss.apply(q.detach(), k.detach(), qi, ki, block_idx, block_size)
