"""
The MoE layer of a decode step in Triton: expert_mix routes each token (router logits, top-k, softmax gates, as
moe.MoE does) and computes moe.moe_all_experts' sum (each token's gates times its experts' outputs), in one of two
ways. A row times a matrix is a few FLOPs per byte, so the time is the weights' read, and a read runs at the
memory's speed only with enough bytes in flight: few dependent loads per program, and a few hundred programs.

The chosen experts' path, while the tokens' (token, expert) pairs are fewer than the experts (one token: its k
routed experts and the shared one, of nine at the default config, ~28 MB a layer in bf16): only the experts some
token chose are read. Products run as broadcast multiply-and-sum on the CUDA cores (the tensor cores need 16 rows),
accumulated in fp32; each program loads its whole strip of weights in one go. Three launches:
  0. route: weight[n, e] = the softmax gate of expert e if it is among token n's top k by router logit, else 0;
           1 for a shared expert (the MoE's routing, in one small launch where a compiled step takes five);
  1. up:   h[n, e, j] = silu(x[n] . w13[e, :, j]) * (x[n] . w13[e, :, H + j]), UP_COLS hidden units a program;
           programs of a pair whose gate is 0 return at once;
  2. down: part[n, s, c] = sum over token n's chosen experts e of
           weight[n, e] * (h[n, e, slice s] . w2[e, slice s, c]), the hidden units in DOWN_SPLIT slices s (more
           programs for one token), DOWN_COLS output columns a program.
The all-experts path, from as many pairs as experts on (a few tokens together choose nearly every expert, so every
expert is read once, for all the tokens): the tokens are the rows of tensor-core products, padded to 16. Two
launches:
  1. up:   h[n, e, j] = weight[n, e] * silu(x[n] . w13[e, :, j]) * (x[n] . w13[e, :, H + j]), ALL_UP_COLS hidden
           units of one expert a program, each program routing the tokens again from the router's product (a few
           KB that L2 serves) instead of a launch of its own;
  2. down: h carries the gates, so with w2 seen as one (E' * H, C) matrix, h (N, E' * H) times it is the sum over
           the experts: part[s, n, c] over ALL_SPLIT slices s of the stacked hidden units.
Either way the partial sums are added in a fixed order outside the op (deterministic): so few that a compiled model
adds them inside the kernel that follows (the residual's sum and the next norm), with no launch of their own.
"""
import torch
import triton
import triton.language as tl

from .common import _cdiv, _op, _pdl, _pdl_wait, _pow2, _prec

# Tile sizes (tuned on Hopper at the default model's experts, C=512, H=1024; see dev/decode.md)
UP_COLS = 16       # hidden units per program of the up kernel: a (C, 16) strip of the gate and of the up weights
DOWN_COLS = 16     # output columns per program of the down kernel
DOWN_SPLIT = 4     # slices of the hidden units, one program each: (H / 4, 16) strips of w2, one per chosen expert;
                   # under 8, so that inductor adds the partial sums inside the next kernel (unrolled)
DOWN_WARPS = 4     # warps of a down program
MAX_STRIP = 16384  # elements of a strip loaded at once; a larger C or H runs the strip in pieces of this size
# the all-experts path (as many (token, expert) pairs as experts, or more: every expert is read anyway)
ALL_UP_COLS = 64   # hidden units per up program: (C, 64) strips of an expert's gate and up weights, 128-byte rows
ALL_UP_C = 128     # input features per step of the up program's loop (in 2-byte dtypes; half as many in fp32)
ALL_UP_WARPS = 4
ALL_UP_STAGES = 3  # steps of the up loop whose loads are in flight at once (Triton's software pipeline)
ALL_SPLIT = 32     # slices of the E' * H stacked hidden units in the down product: its partial sums, added outside
ALL_DOWN_COLS = 64  # output columns per down program: (slice, 64) strips of w2, 128-byte rows
ALL_DOWN_K = 64    # hidden units per step of the down program's loop
ALL_DOWN_WARPS = 4
ALL_DOWN_STAGES = 4


@triton.jit
def _gates(logit, e, E, K: tl.constexpr):
    """logit (R, EA_P) fp32 router logits of R tokens, already rounded to the products' dtype; e (EA_P,) the expert
    columns, the first E routed -> (R, EA_P) fp32: the softmax gate of each of a token's top K routed experts, 0 for
    the others and for columns past E. Expert e is chosen when fewer than K logits beat it (a larger one, or an equal
    one at a lower index: moe.top_k's order); the largest logit is always chosen, so it is the softmax's max."""
    em = (e < E)[None, :]                                                      # (1, EA_P) the routed ones
    logit = tl.where(em, logit, float("-inf"))
    mine, other = logit[:, :, None], logit[:, None, :]                         # (R, EA_P, 1) e, (R, 1, EA_P) j
    beats = (other > mine) | ((other == mine) & (e[None, None, :] < e[None, :, None]))  # (R, EA_P, EA_P) j beats e
    chosen = em & (tl.sum(beats.to(tl.int32), axis=2) < K)                    # (R, EA_P)
    p = tl.where(chosen, tl.exp(logit - tl.max(logit, axis=1)[:, None]), 0.0)
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _route_kernel(x_ptr, r_ptr, wt_ptr, C, E, EA, s_xn, s_xc, s_re, s_rc,
                  K: tl.constexpr, EA_P: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """One program = one token n: writes its row of weight (N, EA) fp32, EA = E routed experts + the shared ones.
    The logits x[n] . router[e] are rounded to x's dtype, as a product in that dtype returns them; the gates are
    _gates', rounded to x's dtype as moe.MoE rounds them; shared experts get 1."""
    _pdl_wait(PDL)
    n = tl.program_id(0)
    e = tl.arange(0, EA_P)                                                     # (EA_P,) experts
    em = e < E                                                                 # the routed ones
    logit = tl.zeros((EA_P,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):                                            # one piece when C <= BLOCK_C
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        m = em[:, None] & cm[None, :]
        # offsets clamped into the tensors as well as masked, and the product masked too: a masked load alone gave
        # NaN logits on a GPU for a C that is not a multiple of BLOCK_C (dev/decode.md)
        cs, es = tl.where(cm, c, 0), tl.where(em, e, 0)
        xc = tl.load(x_ptr + n * s_xn + cs * s_xc, mask=cm, other=0.0).to(tl.float32)
        w = tl.load(r_ptr + es[:, None] * s_re + cs[None, :] * s_rc, mask=m, other=0.0)
        logit += tl.sum(tl.where(m, w.to(tl.float32) * xc[None, :], 0.0), axis=1)
    dt: tl.constexpr = x_ptr.dtype.element_ty
    gate = tl.sum(_gates(logit.to(dt).to(tl.float32)[None, :], e, E, K), axis=0).to(dt).to(tl.float32)
    tl.store(wt_ptr + n * EA + e, tl.where(em, gate, 1.0), mask=e < EA)


@triton.jit
def _up_kernel(x_ptr, wt_ptr, w13_ptr, h_ptr, C, H, E, s_xn, s_xc, s_we, s_wc,
               BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """One program = one (token n, expert e) pair x BLOCK_H hidden units j; nothing read or written where
    weight[n, e] == 0. h (N, E, H) fp32."""
    _pdl_wait(PDL)
    pair = tl.program_id(0)                                                    # n * E + e
    n, e = pair // E, pair % E
    if tl.load(wt_ptr + pair) != 0:
        j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                 # (BLOCK_H,) hidden units
        jm = j < H
        gate = tl.zeros((BLOCK_H,), dtype=tl.float32)
        up = tl.zeros((BLOCK_H,), dtype=tl.float32)
        w_e = w13_ptr + e.to(tl.int64) * s_we
        for c0 in range(0, C, BLOCK_C):                                        # one piece when C <= BLOCK_C
            c = c0 + tl.arange(0, BLOCK_C)                                     # (BLOCK_C,) input features
            cm = c < C
            xc = tl.load(x_ptr + n * s_xn + c * s_xc, mask=cm, other=0.0).to(tl.float32)
            w = w_e + c[:, None].to(tl.int64) * s_wc + j[None, :]              # (BLOCK_C, BLOCK_H) gate columns
            m = cm[:, None] & jm[None, :]
            wg = tl.load(w, mask=m, other=0.0)                                 # both strips' loads issued
            wu = tl.load(w + H, mask=m, other=0.0)                             # before either sum
            gate += tl.sum(xc[:, None] * wg.to(tl.float32), axis=0)
            up += tl.sum(xc[:, None] * wu.to(tl.float32), axis=0)
        tl.store(h_ptr + pair * H + j, gate * tl.sigmoid(gate) * up, mask=jm)


@triton.jit
def _down_kernel(h_ptr, wt_ptr, w2_ptr, p_ptr, C, H, EA, s_we, s_wh, PER,
                 SPLIT: tl.constexpr, KA: tl.constexpr, EA_P: tl.constexpr, BLOCK_J: tl.constexpr,
                 BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """One program = one token n x BLOCK_C output columns c x the sp-th slice of PER hidden units:
    part[n, sp, c] = sum over the token's experts e with weight[n, e] != 0 (at most KA: k routed + the shared ones)
    of weight[n, e] * (h[n, e, slice] . w2[e, slice, c]), the KA experts' strips loaded together.
    part (N, SPLIT, C) fp32."""
    _pdl_wait(PDL)
    n, sp = tl.program_id(0), tl.program_id(2)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)                    # (BLOCK_C,) output columns
    cm = c < C
    # the token's chosen experts, in order: slot a holds the a-th expert of nonzero weight (none: ok false)
    e = tl.arange(0, EA_P)
    wt = tl.load(wt_ptr + n * EA + e, mask=e < EA, other=0.0)                 # (EA_P,)
    nz = wt != 0
    slot = tl.cumsum(nz.to(tl.int32), axis=0) - 1                             # (EA_P,) its slot, if nonzero
    a = tl.arange(0, KA)
    sel = nz[None, :] & (slot[None, :] == a[:, None])                         # (KA, EA_P): slot a holds e
    ok = tl.sum(sel.to(tl.int32), axis=1) > 0                                 # (KA,)
    ea = tl.sum(tl.where(sel, e[None, :], 0), axis=1)                         # (KA,) expert ids
    wa = tl.sum(tl.where(sel, wt[None, :], 0.0), axis=1)                      # (KA,) their weights
    w_a = w2_ptr + ea.to(tl.int64) * s_we                                     # (KA,) each expert's w2
    acc = tl.zeros((KA, BLOCK_C), dtype=tl.float32)
    for j0 in range(sp * PER, tl.minimum(sp * PER + PER, H), BLOCK_J):      # one piece when PER <= BLOCK_J
        j = j0 + tl.arange(0, BLOCK_J)                                         # (BLOCK_J,) hidden units
        jm = (j < sp * PER + PER) & (j < H)
        m = ok[:, None] & jm[None, :]                                          # (KA, BLOCK_J)
        hj = tl.load(h_ptr + (n * EA + ea[:, None]) * H + j[None, :], mask=m, other=0.0)  # fp32
        w = tl.load(w_a[:, None, None] + j[None, :, None].to(tl.int64) * s_wh + c[None, None, :],
                    mask=m[:, :, None] & cm[None, None, :], other=0.0)        # (KA, BLOCK_J, BLOCK_C)
        acc += tl.sum(hj[:, :, None] * w.to(tl.float32), axis=1)
    out = tl.sum(acc * wa[:, None], axis=0)                                   # (BLOCK_C,) over the experts
    tl.store(p_ptr + (n * SPLIT + sp) * C + c, out, mask=cm)


@triton.jit
def _up_all_kernel(x_ptr, r_ptr, w13_ptr, h_ptr, N, C, H, E, EA, s_xn, s_re, s_rc, s_we, s_wc,
                   K: tl.constexpr, N_P: tl.constexpr, E_P: tl.constexpr, BLOCK_C: tl.constexpr,
                   BLOCK_J: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr):
    """Every expert on every token, the up half. One program = expert e x BLOCK_J hidden units j, for all N tokens
    as the rows of tensor-core products (padded to N_P): h[n, e, j] = weight[n, e] * silu(x[n] . w13[e, :, j]) *
    (x[n] . w13[e, :, H + j]), rounded to x's dtype. weight is _route_kernel's, computed again in every program
    from the router's product (E x C, a few KB that L2 serves): one launch fewer. h (N, EA, H)."""
    _pdl_wait(PDL)
    e = tl.program_id(0)
    n = tl.arange(0, N_P)                                                      # (N_P,) tokens, padded
    nm = n < N
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)                     # (BLOCK_J,) hidden units
    jm = j < H
    r = tl.arange(0, E_P)                                                      # (E_P,) routed experts, padded
    w_e = w13_ptr + e.to(tl.int64) * s_we
    gate = tl.zeros((N_P, BLOCK_J), dtype=tl.float32)
    up = tl.zeros((N_P, BLOCK_J), dtype=tl.float32)
    logit = tl.zeros((N_P, E_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):                                            # input features, BLOCK_C at a time
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        xt = tl.load(x_ptr + n[:, None] * s_xn + c[None, :], mask=nm[:, None] & cm[None, :], other=0.0)
        w = w_e + c[:, None].to(tl.int64) * s_wc + j[None, :]                  # (BLOCK_C, BLOCK_J) gate columns
        m = cm[:, None] & jm[None, :]
        wg = tl.load(w, mask=m, other=0.0)
        wu = tl.load(w + H, mask=m, other=0.0)                                 # the up columns, H further on
        rt = tl.load(r_ptr + r[None, :] * s_re + c[:, None] * s_rc, mask=(r < E)[None, :] & cm[:, None], other=0.0)
        # weights of another dtype (fp32 parameters under autocast) are rounded to x's, as autocast rounds them
        gate = tl.dot(xt, wg.to(xt.dtype), gate, input_precision=PREC)         # (N_P, BLOCK_J)
        up = tl.dot(xt, wu.to(xt.dtype), up, input_precision=PREC)
        logit = tl.dot(xt, rt.to(xt.dtype), logit, input_precision=PREC)       # (N_P, E_P)
    dt: tl.constexpr = x_ptr.dtype.element_ty
    g = _gates(logit.to(dt).to(tl.float32), r, E, K).to(dt).to(tl.float32)    # (N_P, E_P) rounded as moe.MoE's
    wt = tl.sum(tl.where(r[None, :] == e, g, 0.0), axis=1)                     # (N_P,) each token's gate of e
    wt = tl.where(n * 0 + e < E, wt, 1.0)                                      # a shared expert: 1
    hh = gate * tl.sigmoid(gate) * up * wt[:, None]
    tl.store(h_ptr + (n[:, None] * EA + e) * H + j[None, :], hh.to(dt), mask=nm[:, None] & jm[None, :])


@triton.jit
def _down_all_kernel(h_ptr, w2_ptr, p_ptr, N, C, KT, KS, s_wk,
                     N_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
                     PDL: tl.constexpr):
    """Every expert on every token, the down half: the E' * H hidden units of all experts are KT rows of w2 viewed
    as one (KT, C) matrix, and h carries the gates, so h (N, KT) times it is the sum over experts. One program = the
    s-th slice of KS of those rows x BLOCK_C output columns, for all N tokens: part[s, n, c] = h[n, slice] .
    w2[slice, c]. part (S, N, C) fp32, summed outside the op."""
    _pdl_wait(PDL)
    s = tl.program_id(0)
    n = tl.arange(0, N_P)
    nm = n < N
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)                    # (BLOCK_C,) output columns
    cm = c < C
    acc = tl.zeros((N_P, BLOCK_C), dtype=tl.float32)
    for k0 in range(s * KS, s * KS + KS, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                                         # (BLOCK_K,) stacked hidden units
        km = (k < s * KS + KS) & (k < KT)
        ht = tl.load(h_ptr + n[:, None] * KT + k[None, :], mask=nm[:, None] & km[None, :], other=0.0)
        w = tl.load(w2_ptr + k[:, None].to(tl.int64) * s_wk + c[None, :], mask=km[:, None] & cm[None, :], other=0.0)
        acc = tl.dot(ht, w.to(ht.dtype), acc, input_precision=PREC)
    tl.store(p_ptr + (s * N + n[:, None]) * C + c[None, :], acc, mask=nm[:, None] & cm[None, :])


def _route(x, router, k, EA):
    """_route_kernel's launch: x (N, C), router (E, C) -> weight (N, EA) fp32, EA = E + the shared experts."""
    N, C = x.shape
    ea_p = _pow2(EA, 1)
    weight = torch.empty(N, EA, device=x.device, dtype=torch.float32)
    _route_kernel[(N,)](
        x_ptr=x, r_ptr=router, wt_ptr=weight, C=C, E=router.shape[0], EA=EA, s_xn=x.stride(0), s_xc=x.stride(1),
        s_re=router.stride(0), s_rc=router.stride(1), K=k, EA_P=ea_p,
        BLOCK_C=min(_pow2(C, 1), MAX_STRIP // ea_p), num_warps=4, **_pdl(x))
    return weight


# Each path's kernels as one custom op (torch.compile traces through it): it returns the fp32 partial sums, which
# expert_mix adds up outside the op. Offsets inside a weight tensor are int64; those of x, h and the partials
# (N * max(E' * H, DOWN_SPLIT * C, ALL_SPLIT * C) for the few tokens of a decode step) int32.

@_op("expert_mix")
def _mix_op(x: torch.Tensor, router: torch.Tensor, k: int, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    N, C = x.shape
    E, EA, H = router.shape[0], w13.shape[0], w2.shape[1]
    ea_p = _pow2(EA, 1)
    weight = _route(x, router, k, EA)                                          # (N, EA)
    h = torch.empty(N, EA, H, device=x.device, dtype=torch.float32)          # rows of unchosen pairs stay unwritten
    part = torch.empty(N, DOWN_SPLIT, C, device=x.device, dtype=torch.float32)
    pdl = _pdl(x)
    block_c = min(_pow2(C, 1), MAX_STRIP // UP_COLS)
    _up_kernel[(N * EA, _cdiv(H, UP_COLS))](
        x_ptr=x, wt_ptr=weight, w13_ptr=w13, h_ptr=h, C=C, H=H, E=EA, s_xn=x.stride(0), s_xc=x.stride(1),
        s_we=w13.stride(0), s_wc=w13.stride(1), BLOCK_C=block_c, BLOCK_H=UP_COLS, num_warps=4, **pdl)
    per = _cdiv(H, DOWN_SPLIT)                                                 # hidden units per slice
    ka = _pow2(k + EA - E, 1)                                                  # chosen experts a token, padded
    _down_kernel[(N, _cdiv(C, DOWN_COLS), DOWN_SPLIT)](
        h_ptr=h, wt_ptr=weight, w2_ptr=w2, p_ptr=part, C=C, H=H, EA=EA, s_we=w2.stride(0), s_wh=w2.stride(1), PER=per,
        SPLIT=DOWN_SPLIT, KA=ka, EA_P=ea_p, BLOCK_J=min(_pow2(per, 1), MAX_STRIP // (ka * DOWN_COLS)),
        BLOCK_C=DOWN_COLS, num_warps=DOWN_WARPS, **pdl)
    return part


@_mix_op.register_fake
def _(x, router, k, w13, w2):
    return x.new_empty(x.shape[0], DOWN_SPLIT, x.shape[1], dtype=torch.float32)


def _up_all(x, router, k, w13):
    """_up_all_kernel's launch: x (N, C), router (E, C), w13 (E', C, 2H) -> h (N, E', H) in x's dtype, gated."""
    N, C = x.shape
    E, EA, H = router.shape[0], w13.shape[0], w13.shape[2] // 2
    h = torch.empty(N, EA, H, device=x.device, dtype=x.dtype)
    _up_all_kernel[(EA, _cdiv(H, ALL_UP_COLS))](
        x_ptr=x, r_ptr=router, w13_ptr=w13, h_ptr=h, N=N, C=C, H=H, E=E, EA=EA, s_xn=x.stride(0),
        s_re=router.stride(0), s_rc=router.stride(1), s_we=w13.stride(0), s_wc=w13.stride(1), K=k,
        N_P=_pow2(N, 16), E_P=_pow2(E, 16), BLOCK_C=min(_pow2(C, 16), _pow2(ALL_UP_C * 2 // x.element_size())),
        BLOCK_J=ALL_UP_COLS, PREC=_prec(x), num_warps=ALL_UP_WARPS, num_stages=ALL_UP_STAGES, **_pdl(x))
    return h


def _down_all(h, w2):
    """_down_all_kernel's launch: h (N, E', H), w2 (E', H, C) contiguous -> part (ALL_SPLIT, N, C) fp32, whose sum
    over the first dimension is h (N, E' * H) times w2 seen as one (E' * H, C) matrix."""
    N, EA, H = h.shape
    C = w2.shape[2]
    part = torch.empty(ALL_SPLIT, N, C, device=h.device, dtype=torch.float32)
    ks = _cdiv(EA * H, ALL_SPLIT)                                              # stacked hidden units a slice
    _down_all_kernel[(ALL_SPLIT, _cdiv(C, ALL_DOWN_COLS))](
        h_ptr=h, w2_ptr=w2, p_ptr=part, N=N, C=C, KT=EA * H, KS=ks, s_wk=w2.stride(1),
        N_P=_pow2(N, 16), BLOCK_K=min(_pow2(ks, 16), ALL_DOWN_K), BLOCK_C=ALL_DOWN_COLS, PREC=_prec(h),
        num_warps=ALL_DOWN_WARPS, num_stages=ALL_DOWN_STAGES, **_pdl(h))
    return part


@_op("expert_all")
def _all_op(x: torch.Tensor, router: torch.Tensor, k: int, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return _down_all(_up_all(x, router, k, w13), w2)                          # (ALL_SPLIT, N, C)


@_all_op.register_fake
def _(x, router, k, w13, w2):
    return x.new_empty(ALL_SPLIT, x.shape[0], x.shape[1], dtype=torch.float32)


def expert_mix(x, router, k, w13, w2):
    """A decode step's MoE layer (moe.MoE.forward's output without its statistics, no gradient): each token's k
    experts of the E routed ones by router logit, gated by the softmax of their logits, plus the shared experts
    (w13's and w2's beyond the first E) with weight 1; out[n] = sum over e of weight[n, e] * expert_e(x[n]). x (N, C),
    in the products' dtype (the logits and gates are rounded to it, as moe.MoE's are under autocast; weights of
    another dtype are rounded to it, as autocast rounds them); router (E, C) the router's weight; w13 (E', C, 2H)
    each expert's gate and up projections side by side, w2 (E', H, C), E' >= E -> (N, C) in x's dtype. Products
    accumulate in fp32. Fewer (token, expert) pairs than experts: only the chosen experts are read; else all."""
    N, C = x.shape if x.dim() == 2 else (None, None)
    if N is None or router.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or router.shape[1] != C \
            or w13.shape[1] != C or w13.shape[2] != 2 * w2.shape[1] or w2.shape[0] != w13.shape[0] \
            or w2.shape[2] != C or not 1 <= k <= router.shape[0] <= w13.shape[0]:
        raise ValueError(f"expert_mix wants x (N, C), router (E, C), 1 <= k <= E, w13 (E', C, 2H), w2 (E', H, C) with "
                         f"E' >= E; got {tuple(x.shape)}, {tuple(router.shape)}, k={k}, {tuple(w13.shape)}, "
                         f"{tuple(w2.shape)}")
    if not (x.device == router.device == w13.device == w2.device):
        raise ValueError(f"x, router, w13, w2 must be on one device, got {x.device}, {router.device}, "
                         f"{w13.device}, {w2.device}")
    # the weights' last dimension read contiguously (views of a stacked parameter keep it so); the all-experts path
    # reads w2 as one (E' * H, C) matrix and x's rows contiguously
    w13, w2 = (w if w.stride(2) == 1 else w.contiguous() for w in (w13, w2))
    if N * (k + w13.shape[0] - router.shape[0]) < w13.shape[0]:   # fewer (token, expert) pairs than experts
        part = _mix_op(x, router, k, w13, w2).transpose(0, 1)                 # (DOWN_SPLIT, N, C)
    else:
        part = _all_op(x.contiguous(), router, k, w13, w2.contiguous())                           # (S, N, C)
    out = part[0]
    for s in range(1, part.shape[0]):  # one by one, in order: the eager op adds them as a compiled step does
        out = out + part[s]
    return out.to(x.dtype)                                                    # (N, C)
