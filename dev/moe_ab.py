"""
A lab tool (dev/decode.md, "Where the batch-8 step goes" and "A few tokens' experts"), not part of the model: a
decode step's MoE layer for a few tokens, several ways, at the default GPU model's size (C=512, H=1024, 8 experts,
top-2, a shared one):
  rule: moe.MoE as committed: msa_triton.expert_mix at every few-token count (its chosen experts' path while the
       tokens' (token, expert) pairs are fewer than the experts, its all-experts path from there on);
  t:a/b/c/d/e/f: the rule with the all-experts path's tiles set (experts.ALL_UP_COLS, ALL_UP_C, ALL_SPLIT,
       ALL_DOWN_COLS, ALL_DOWN_K, ALL_WARPS);
  stack: the torch few-token path (no backend kernels): one product of the router's and every expert's first
       weights stacked (MoE.stacked_weight, held as a decode state holds it), the routing, then one product over
       every expert's gated hidden units (moe.moe_all_experts);
  bmm: the torch path before the stacking: the router's product, the routing, every expert on every token in two
       batched products, then the gated sum over experts;
  mix: msa_triton.expert_mix forced on every few-token call (what the rule now does too);
  dot: the candidate below, expert_dot: expert_mix's routing kernel, then each chosen expert read once for all the
       tokens, the tokens as the 16 rows of a tensor-core product in 16-column strips, the gates applied before the
       down product (slower than the all-experts path, whose strips are 64 columns wide).
Eight layers of their own weights (226 MB in bf16, beyond L2) run as one chain x = x + moe(x), compiled as the
decode step is (decoding.compiled_step's options) and captured in a CUDA graph; rounds of do_bench (bench.timed)
alternate the ways; the median us a layer is printed with each way's largest difference from the first way
(relative to its largest value; bf16, so ~1e-2 is rounding).
    python dev/moe_ab.py                  # on a GPU: N = 1, 2, 4, 8, 16 tokens (NS=1,8 to choose; WAYS=rule,stack)
    python dev/moe_ab.py --check          # expert_dot and expert_mix against a float64 reference, fp32
                                          # (runs on a CPU, in Triton's interpreter, at small sizes)
$OUT (default /tmp) receives moe_ab.txt. dev/decode_ab.py's variants final-stack, final-bmm, final-mix and
final-dot put the same ways into the whole decode step.
"""
import os
import statistics
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F

if __name__ == "__main__" and "--check" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")                             # before triton is imported
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe
import msa_triton
import msa_triton.experts as experts
from msa_triton.common import _cdiv, _op, _pdl, _pdl_wait, _pow2
from msa_triton.experts import MAX_STRIP, _route

UP_COLS = 16    # hidden units a program of the up kernel: (C, 16) strips of the gate and the up weights, 32 KB in bf16
DOWN_COLS = 16  # output columns a program of the down kernel: an (H, 16) strip of w2, 32 KB in bf16


@triton.jit
def _up_dot_kernel(x_ptr, wt_ptr, w13_ptr, h_ptr, N, C, H, EA, s_xn, s_we, s_wc,
                   N_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr):
    """One program = expert e x BLOCK_H hidden units j, for all N tokens at once (rows of a tensor-core product):
    h[e, n, j] = weight[n, e] * silu(x[n] . w13[e, :, j]) * (x[n] . w13[e, :, H + j]), rounded to x's dtype.
    Nothing is read or written when no token chose e. h (EA, N_P, H)."""
    _pdl_wait(PDL)
    e = tl.program_id(0)
    n = tl.arange(0, N_P)                                                      # (N_P,) tokens, padded
    nm = n < N
    wt = tl.load(wt_ptr + n * EA + e, mask=nm, other=0.0)                      # (N_P,) each token's weight of e
    if tl.sum((wt != 0).to(tl.int32), axis=0) > 0:
        j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)                 # (BLOCK_H,) hidden units
        jm = j < H
        w_e = w13_ptr + e.to(tl.int64) * s_we
        gate = tl.zeros((N_P, BLOCK_H), dtype=tl.float32)
        up = tl.zeros((N_P, BLOCK_H), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):                                        # one piece when C <= BLOCK_C
            c = c0 + tl.arange(0, BLOCK_C)                                     # (BLOCK_C,) input features
            cm = c < C
            xt = tl.load(x_ptr + n[:, None] * s_xn + c[None, :], mask=nm[:, None] & cm[None, :], other=0.0)
            w = w_e + c[:, None].to(tl.int64) * s_wc + j[None, :]              # (BLOCK_C, BLOCK_H) gate columns
            m = cm[:, None] & jm[None, :]
            wg = tl.load(w, mask=m, other=0.0)                                 # both strips' loads issued
            wu = tl.load(w + H, mask=m, other=0.0)                             # before either product
            gate = tl.dot(xt, wg.to(xt.dtype), gate)
            up = tl.dot(xt, wu.to(xt.dtype), up)
        hh = gate * tl.sigmoid(gate) * up * wt[:, None]                        # the gate applied here, once
        tl.store(h_ptr + (e * N_P + n[:, None]) * H + j[None, :], hh.to(x_ptr.dtype.element_ty),
                 mask=nm[:, None] & jm[None, :])


@triton.jit
def _down_dot_kernel(h_ptr, wt_ptr, w2_ptr, p_ptr, N, C, H, EA, s_we, s_wh,
                     N_P: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """One program = expert e x BLOCK_C output columns c, for all N tokens: part[e, n, c] = h[e, n, :] . w2[e, :, c]
    (h carries the gates), 0 when no token chose e (w2[e] not read). part (EA, N, C) fp32."""
    _pdl_wait(PDL)
    e = tl.program_id(0)
    n = tl.arange(0, N_P)
    nm = n < N
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)                    # (BLOCK_C,) output columns
    cm = c < C
    wt = tl.load(wt_ptr + n * EA + e, mask=nm, other=0.0)
    acc = tl.zeros((N_P, BLOCK_C), dtype=tl.float32)
    if tl.sum((wt != 0).to(tl.int32), axis=0) > 0:
        w_e = w2_ptr + e.to(tl.int64) * s_we
        for j0 in range(0, H, BLOCK_H):                                        # one piece when H <= BLOCK_H
            j = j0 + tl.arange(0, BLOCK_H)
            jm = j < H
            hj = tl.load(h_ptr + (e * N_P + n[:, None]) * H + j[None, :], mask=nm[:, None] & jm[None, :], other=0.0)
            w = tl.load(w_e + j[:, None].to(tl.int64) * s_wh + c[None, :], mask=jm[:, None] & cm[None, :], other=0.0)
            acc = tl.dot(hj, w.to(hj.dtype), acc)
    tl.store(p_ptr + (e * N + n[:, None]) * C + c[None, :], acc, mask=nm[:, None] & cm[None, :])


@_op("expert_dot_candidate")
def _dot_op(x: torch.Tensor, router: torch.Tensor, k: int, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    N, C = x.shape
    EA, H = w13.shape[0], w2.shape[1]
    n_p = _pow2(N, 16)                                                         # tl.dot wants 16 rows or more
    weight = _route(x, router, k, EA)                                          # (N, EA), expert_mix's routing
    h = torch.empty(EA, n_p, H, device=x.device, dtype=x.dtype)               # the rows of unchosen experts unwritten
    part = torch.empty(EA, N, C, device=x.device, dtype=torch.float32)
    pdl = _pdl(x)
    _up_dot_kernel[(EA, _cdiv(H, UP_COLS))](
        x_ptr=x, wt_ptr=weight, w13_ptr=w13, h_ptr=h, N=N, C=C, H=H, EA=EA, s_xn=x.stride(0),
        s_we=w13.stride(0), s_wc=w13.stride(1), N_P=n_p, BLOCK_C=min(_pow2(C, 16), MAX_STRIP // UP_COLS),
        BLOCK_H=UP_COLS, num_warps=4, **pdl)
    _down_dot_kernel[(EA, _cdiv(C, DOWN_COLS))](
        h_ptr=h, wt_ptr=weight, w2_ptr=w2, p_ptr=part, N=N, C=C, H=H, EA=EA, s_we=w2.stride(0), s_wh=w2.stride(1),
        N_P=n_p, BLOCK_H=min(_pow2(H, 16), MAX_STRIP // DOWN_COLS), BLOCK_C=DOWN_COLS, num_warps=4, **pdl)
    return part


@_dot_op.register_fake
def _(x, router, k, w13, w2):
    return x.new_empty(w13.shape[0], x.shape[0], x.shape[1], dtype=torch.float32)


def expert_dot(x, router, k, w13, w2):
    """msa_triton.expert_mix's contract (x (N, C) contiguous in the products' dtype, router (E, C), w13 (E', C, 2H),
    w2 (E', H, C) -> (N, C)), computed by the kernels above: the experts' partial sums added in expert order."""
    w13, w2 = (w if w.stride(2) == 1 else w.contiguous() for w in (w13, w2))
    part = _dot_op(x.contiguous(), router, k, w13, w2)                        # (E', N, C) fp32
    out = part[0]
    for e in range(1, part.shape[0]):                                          # a fixed order: deterministic
        out = out + part[e]
    return out.to(x.dtype)


WAYS = {"mix": msa_triton.expert_mix, "dot": expert_dot}
_rule_forward = moe.MoE.forward
_TILES = (experts.ALL_UP_COLS, experts.ALL_UP_C, experts.ALL_SPLIT, experts.ALL_DOWN_COLS, experts.ALL_DOWN_K,
          experts.ALL_WARPS)


def bmm_forward(self, x, stats=True, w1=None):
    """MoE.forward's few-token path as it was before the experts were stacked (no gradient, no statistics); anything
    else (a prefill, training) as MoE.forward does it."""
    if stats or torch.is_grad_enabled() or x.shape[0] * x.shape[1] > moe.MOE_FEW_TOKENS:
        return _rule_forward(self, x, stats, w1)
    B, T, C = x.shape
    xf = x.reshape(B * T, C)
    top_logit, idx = moe.top_k(self.router(xf).float(), self.k)
    chosen = idx.unsqueeze(-1) == torch.arange(self.E, device=x.device)                  # (N, k, E)
    weight = F.pad((chosen * top_logit.softmax(-1).unsqueeze(-1)).sum(1), (0, self.n_shared), value=1.0)
    xe = xf.unsqueeze(0).expand(self.w13.shape[0], -1, -1)                                # (E', N, C)
    y = torch.bmm(moe.swiglu_act(torch.bmm(xe, self.w13)), self.w2)                      # (E', N, C)
    out = (y * weight.to(moe.compute_dtype(xf)).t().unsqueeze(-1).to(y.dtype)).sum(0)
    return out.to(x.dtype).view(B, T, C), None, None


def stack_forward(self, x, stats=True, w1=None):
    """MoE.forward's few-token path without a backend's kernels: moe.moe_all_experts on the stacked weights."""
    if stats or torch.is_grad_enabled() or x.shape[0] * x.shape[1] > moe.MOE_FEW_TOKENS:
        return _rule_forward(self, x, stats, w1)
    B, T, C = x.shape
    xf = x.reshape(B * T, C)
    a = xf @ (self.stacked_weight() if w1 is None else w1)                               # (N, E + E' * 2H)
    top_logit, idx = moe.top_k(a[:, :self.E].float(), self.k)
    chosen = idx.unsqueeze(-1) == torch.arange(self.E, device=x.device)                  # (N, k, E)
    weight = F.pad((chosen * top_logit.softmax(-1).unsqueeze(-1)).sum(1), (0, self.n_shared), value=1.0)
    out = moe.moe_all_experts(a[:, self.E:], weight.to(a.dtype), self.w2.reshape(-1, C))
    return out.to(x.dtype).view(B, T, C), None, None


def forced_forward(fn):
    """MoE.forward that sends every call of a few tokens (at most moe.MOE_FEW_TOKENS) without gradient or statistics
    on a GPU to fn (expert_mix's contract), as MoE.forward's rule sends one token's to expert_mix; anything else (a
    prefill, training) as MoE.forward does it."""
    def forward(self, x, stats=True, w1=None):
        if stats or torch.is_grad_enabled() or not x.is_cuda or x.shape[0] * x.shape[1] > moe.MOE_FEW_TOKENS:
            return _rule_forward(self, x, stats, w1)
        B, T, C = x.shape
        xf = x.reshape(B * T, C)
        dt = moe.compute_dtype(xf)
        out = fn(xf.to(dt), self.router.weight.to(dt), self.k, self.w13, self.w2)
        return out.to(x.dtype).view(B, T, C), None, None
    return forward


def use(way):
    """Make moe.MoE run `way` ('rule', 't:...', 'stack', 'bmm', 'mix', 'dot': the docstring at the top) from the
    next trace on."""
    # 't:a/b/c/d/e/f': the rule with the all-experts kernels' tiles ALL_UP_COLS/UP_C/SPLIT/DOWN_COLS/DOWN_K/WARPS
    tiles = tuple(int(v) for v in way[2:].split("/")) if way.startswith("t:") else _TILES
    (experts.ALL_UP_COLS, experts.ALL_UP_C, experts.ALL_SPLIT, experts.ALL_DOWN_COLS, experts.ALL_DOWN_K,
     experts.ALL_WARPS) = tiles
    way = "rule" if way.startswith("t:") else way
    moe.MoE.forward = {"rule": _rule_forward, "bmm": bmm_forward, "stack": stack_forward}.get(way) \
        or forced_forward(WAYS[way])


def check():
    """expert_dot and expert_mix against reference at small sizes (C, H not multiples of the tiles; k = 1; every
    expert chosen; N from 1 to past the 16 rows of one product), fp32."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_experts import reference                                         # moe.MoE's output in float64
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tol = 5e-3 if dev == "cuda" else 1e-4                                      # tl.dot takes fp32 as tf32 on a GPU
    for N, C, H, E, k, shared in [(1, 64, 48, 8, 2, True), (3, 40, 20, 4, 2, True), (8, 24, 70, 5, 1, False),
                                  (5, 16, 16, 3, 3, True), (17, 32, 40, 6, 2, True)]:
        g = torch.Generator().manual_seed(N)
        Ep = E + int(shared)
        x = torch.randn(N, C, generator=g, dtype=torch.float64)
        router = torch.randn(E, C, generator=g, dtype=torch.float64) / C ** 0.5
        w13 = torch.randn(Ep, C, 2 * H, generator=g, dtype=torch.float64) / C ** 0.5
        w2 = torch.randn(Ep, H, C, generator=g, dtype=torch.float64) / H ** 0.5
        x, router, w13, w2 = (t.to(dev, torch.float32) for t in (x, router, w13, w2))
        want = reference(x, router, k, w13, w2)[0]
        for name, fn in WAYS.items():
            got = fn(x, router, k, w13, w2)
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            print(f"N={N:2d} C={C} H={H} E={E} k={k} shared={shared} {name}: relative error {err:.1e}")
            assert got.shape == want.shape and err < tol, f"{name} off by {err:.1e}"
    print("check passed")


def time_ways(N, ways=("rule", "stack", "bmm", "dot"), layers=8, rounds=5):
    """us a layer of each way for N tokens (see the docstring at the top), and its difference from the first."""
    from bench import graphed, timed
    cfg = SimpleNamespace(n_expert=8, n_embd=512, expert_hidden=1024, expert_topk=2, shared_expert=True, n_layer=8)
    torch.manual_seed(0)
    mods = [moe.MoE(cfg, expert_mix=msa_triton.expert_mix).cuda().eval().to(torch.bfloat16) for _ in range(layers)]
    for m in mods:                                                             # a router that spreads the tokens
        m.router.weight.data.normal_(0, 0.5)
    x0 = torch.randn(N, 1, 512, device="cuda", dtype=torch.bfloat16)

    w1s = [m.stacked_weight() for m in mods]                                   # as a decode state holds them

    def chain(x):
        for m, w1 in zip(mods, w1s):
            x = x + m(x, stats=False, w1=w1)[0]
        return x

    replays, outs = {}, {}
    for way in ways:
        use(way)
        torch._dynamo.reset()
        f = torch.compile(chain, fullgraph=True, dynamic=False, options=dict(combo_kernels=True))
        out = torch.empty_like(x0)
        replays[way] = graphed(lambda: out.copy_(f(x0)))
        replays[way]()
        torch.cuda.synchronize()
        outs[way] = out
    use("rule")
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way, replay in replays.items():
            times[way].append(timed(replay, 100) * 1e3 / layers)                # do_bench's median, us a layer
    base = outs[ways[0]].float()
    return {way: (statistics.median(times[way]),
                  ((outs[way].float() - base).abs().max() / base.abs().max()).item()) for way in ways}


def main():
    if "--check" in sys.argv:
        check()
        return
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        lines = []
        for N in [int(n) for n in os.environ.get("NS", "1,2,4,8,16").split(",")]:
            res = time_ways(N, *[os.environ["WAYS"].split(",")] if "WAYS" in os.environ else [])
            lines.append(f"N={N:2d} " + "  ".join(f"{w} {t:6.2f} us ({d:.1e})" for w, (t, d) in res.items()))
            print(lines[-1], flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "moe_ab.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
