"""
The Mixture-of-Experts layer of the nanoMSA model (model.py): a router picks the top-k of E SwiGLU experts per
token, plus an optional shared expert that every token goes through, and a Switch-style auxiliary loss keeps
the experts evenly loaded.

Shapes: N tokens, C = n_embd, H = expert_hidden, E = n_expert, k = expert_topk.
An expert's gate and up projections sit side by side in one (C, 2H) matrix (one product computes both), and the
shared expert, if any, is stored after the routed ones: w13 (E + S, C, 2H), w2 (E + S, H, C), S = 1 with a
shared expert, else 0.
A training step routes with moe_dispatch: the (token, expert) assignments sorted by expert, every expert's
product over its own rows at once (grouped_mm), all on the device. A decode step's few tokens take a backend's
expert_mix (msa_triton's on a GPU): the routing and the same sum in two or three launches of its own, reading only
the chosen experts' weights while the tokens' (token, expert) pairs are fewer than the experts (one token: its k
and the shared one), else every expert's once for all the tokens. Without one (a CPU): moe_all_experts, every
expert, the shared one included, on every token in one batched product: fewer kernels than moe_dispatch.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def swiglu_act(h):
    """h (..., 2H) = [gate | up] projections -> silu(gate) * up (..., H)."""
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def swiglu(x, w13, w2):
    """One SwiGLU expert: x (N, C), w13 (C, 2H) the gate and up projections side by side, w2 (H, C) -> (N, C)."""
    return swiglu_act(x @ w13) @ w2


def top_k(logits, k):
    """
    logits (N, E) -> (values, indices), each (N, k), largest first, as logits.topk(k) gives them (ties: the lower
    index first). A logit's rank is how many logits beat it (a larger one, or an equal one at a lower index); the
    pick of rank r is the expert whose rank is r. Comparisons and sums over E only, which torch.compile fuses into
    a few small generated kernels, where torch.topk is two library kernels of a sort.
    """
    E = logits.shape[-1]
    cols = torch.arange(E, device=logits.device)                             # (E,)
    mine, other = logits.unsqueeze(-1), logits.unsqueeze(-2)                 # (N, E, 1) e, (N, 1, E) j
    beats = (other > mine) | ((other == mine) & (cols < cols[:, None]))      # (N, E, E): j beats e
    rank = beats.sum(-1)                                                     # (N, E) 0 for the largest
    pick = rank.unsqueeze(-2) == torch.arange(k, device=logits.device)[:, None]  # (N, k, E) e has rank r
    indices = (pick * cols).sum(-1)                                          # (N, k)
    return logits.gather(-1, indices), indices


def compute_dtype(x):
    """The dtype matrix products on x run in: autocast's when it is on for x's device (bf16 in train.py and
    sample.py on CUDA), else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def grouped_mm(a, w, ends):
    """
    Each row of a times its group's matrix: a (M, K) with the rows of each group together, w (G, K, N), ends (G,)
    int32 on a's device, where each group's rows end (group g is rows ends[g - 1] .. ends[g] - 1, ends[-1] == M)
    -> (M, N). torch.nn.functional.grouped_mm does it in one kernel that reads ends on the device, in bf16 on CUDA
    compute capability 9.x and 10.x. On other GPUs, and on a CPU (float32, bf16, fp16: rows of a multiple of 16
    bytes), it loops over the groups on the host, reading ends: a host sync, harmless on a CPU, but no CUDA graph
    can capture it. torch.compile traces it in bf16 only. Where it does not fit (float64, unaligned rows, float32
    on CUDA or compiled, a capture without its kernel) the batched product below computes the same.
    """
    size = a.element_size()
    native = a.dtype in (torch.float32, torch.bfloat16, torch.float16) and (a.shape[1] * size) % 16 == 0 \
        and (w.shape[2] * size) % 16 == 0
    if a.is_cuda or torch.compiler.is_compiling():
        native = native and a.dtype == torch.bfloat16
    if native and a.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing():
        native = torch.cuda.get_device_capability(a.device)[0] in (9, 10)
    if native:
        return F.grouped_mm(a, w, offs=ends)
    # every group's matrix on every row in one batched product, each row keeping its own group's: G times the
    # FLOPs, but the same fixed shapes and nothing read on the host
    M = a.shape[0]
    rows = torch.arange(M, device=a.device)
    group = torch.searchsorted(ends, rows.to(ends.dtype), right=True)          # (M,) group of each row
    return torch.bmm(a.expand(w.shape[0], M, -1), w)[group, rows]              # (G, M, N) -> (M, N)


class GatherRows(torch.autograd.Function):
    """
    out = x[rows // k]: x (N, C), rows a permutation of range(N * k), inverse its inverse -> (N * k, C), each row of x
    k times in the order rows gives. The backward gathers the gradient rows back with inverse and sums each row's k
    of them in a fixed order: index_select's own backward would scatter-add them (atomic adds, slow in bf16, and in
    an order that changes from run to run). k = 1: a plain permutation of the rows.
    """

    @staticmethod
    def forward(ctx, x, rows, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, rows // k if k > 1 else rows)

    @staticmethod
    def backward(ctx, dout):
        (inverse,) = ctx.saved_tensors
        dx = dout.index_select(0, inverse)                                     # (N * k, C) back in x's row order
        return dx.view(-1, ctx.k, dx.shape[1]).sum(1) if ctx.k > 1 else dx, None, None, None


def moe_dispatch(x, idx, gate, w13, w2):
    """
    out[n] = sum over j of gate[n, j] * expert_{idx[n, j]}(x[n]).
    x (N, C); idx, gate (N, k); expert weights w13 (E, C, 2H), w2 (E, H, C) -> (N, C).
    The N*k (token, expert) assignments are sorted by expert, so each expert's rows are one contiguous group, and
    grouped matrix products (grouped_mm) run every expert on its own group at once. The routing stays on the
    device in shapes fixed by N and k (no expert's token count reaches the host): with grouped_mm's kernel (bf16 on
    compute capability 9.x and 10.x) a training step never waits on the host. The products run in autocast's
    dtype. A decode step's few tokens take moe_all_experts instead (fewer kernels).
    """
    N, k = idx.shape
    E = w13.shape[0]
    dt = compute_dtype(x)
    expert, order = idx.reshape(-1).sort(stable=True)                          # (N*k,) assignments by expert
    ends = torch.searchsorted(expert, torch.arange(E, device=x.device), right=True).to(torch.int32)  # (E,)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(N * k, device=x.device))  # order's inverse
    # row i in expert order is assignment order[i], of token order[i] // k; GatherRows' backward needs no atomics
    xs = GatherRows.apply(x.to(dt), order, inverse, k)                         # (N*k, C)
    h = swiglu_act(grouped_mm(xs, w13.to(dt), ends))                          # (N*k, 2H) -> (N*k, H)
    y = grouped_mm(h, w2.to(dt), ends)                                         # (N*k, C)
    y = GatherRows.apply(y, inverse, order, 1).view(N, k, -1)                  # back to token order
    return (gate.unsqueeze(-1) * y).sum(1).to(x.dtype)                         # (N, C): a token's k rows summed


def moe_all_experts(x, weight, w13, w2):
    """
    out[n] = sum over e of weight[n, e] * expert_e(x[n]), for a few tokens (a decode step): every expert runs on every
    token in one batched matrix product. x (N, C); weight (N, E'): the gates of each token's chosen experts, 0 for
    the others, 1 for a shared expert; w13 (E', C, 2H), w2 (E', H, C) -> (N, C).
    For a few tokens the expert products are bound by reading the weights (about N FLOPs per byte in bf16, far
    below a GPU's ridge) and moe_dispatch reads nearly every expert anyway once N * k >= E, so the E / k times more
    FLOPs are almost free, and this takes a handful of kernels where moe_dispatch's routing (sort, gathers, group
    ends, scatter back) takes several times as many: what a decode step of small kernels costs.
    """
    xe = x.unsqueeze(0).expand(w13.shape[0], -1, -1)                         # (E', N, C)
    y = torch.bmm(swiglu_act(torch.bmm(xe, w13)), w2)                        # (E', N, C), in autocast's dtype
    return (y * weight.t().unsqueeze(-1).to(y.dtype)).sum(0).to(x.dtype)    # (N, C)


MOE_FEW_TOKENS = 64  # MoE.forward runs expert_mix or moe_all_experts up to this many tokens, moe_dispatch above


class MoE(nn.Module):
    """
    Top-k routing over E SwiGLU experts, plus an optional shared expert.
    Load balancing, Switch-Transformer style: balance = E * sum_e f_e * P_e, where f_e is the fraction of
    the N*k assignments that went to expert e and P_e the mean router probability of e. f is not
    differentiable, P is: the gradient lowers the probability of the experts that are overloaded.
    It is 1 when the load is uniform, and at most E / k (every token routed to the same k experts).
    (We chose it over DeepSeek-V3's bias update because it is a plain loss: nothing to synchronise
    across DDP ranks, nothing outside the optimizer to checkpoint.)
    """

    def __init__(self, cfg, expert_mix=None):
        super().__init__()
        E, C, H = cfg.n_expert, cfg.n_embd, cfg.expert_hidden
        self.expert_mix = expert_mix  # a backend's decode-step MoE (routing and the experts' products), or None
        self.k, self.E, self.n_shared = cfg.expert_topk, E, int(cfg.shared_expert)  # n_shared: 0 or 1
        self.router = nn.Linear(C, E, bias=False)
        # the routed experts, then the shared one (if any): gate and up projections side by side, and the down one
        self.w13 = nn.Parameter(torch.randn(E + self.n_shared, C, 2 * H) * 0.02)
        self.w2 = nn.Parameter(torch.randn(E + self.n_shared, H, C) * 0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, x, stats=True):
        """x (B, T, C) -> out (B, T, C), balance loss (scalar), load (E,) fraction of assignments per expert.
        stats=False: balance and load are None (a forward without targets has no use for them)."""
        B, T, C = x.shape
        xf = x.reshape(B * T, C)                                     # (N, C)
        E = self.E
        few = B * T <= MOE_FEW_TOKENS
        # a decode step's few tokens on a GPU (no gradient, no statistics): the backend's expert_mix routes and runs
        # the experts in two or three launches of its own, where the products and the routing below take several more
        if self.expert_mix is not None and few and not stats and xf.is_cuda and not torch.is_grad_enabled():
            dt = compute_dtype(xf)
            out = self.expert_mix(xf.to(dt), self.router.weight.to(dt), self.k, self.w13, self.w2)
            return out.to(x.dtype).view(B, T, C), None, None
        logits = self.router(xf).float()                             # (N, E)
        top_logit, idx = top_k(logits, self.k)                       # (N, k)
        gate = top_logit.softmax(-1)                                 # (N, k) weights of the chosen experts
        chosen = idx.unsqueeze(-1) == torch.arange(E, device=idx.device)  # (N, k, E) one-hot
        if few:  # gates as an (N, E) row, 0 where not chosen; the shared expert's weight 1
            weight = F.pad((chosen * gate.unsqueeze(-1)).sum(1), (0, self.n_shared), value=1.0)  # (N, E')
            # the gates in the products' dtype, as moe_all_experts applies them; so rounded, a compiled step's gates
            # (summed in another order) equal the eager step's, and greedy decoding picks the same tokens
            out = moe_all_experts(xf, weight.to(compute_dtype(xf)), self.w13, self.w2)
        else:
            out = moe_dispatch(xf, idx, gate, self.w13[:E], self.w2[:E])
            if self.n_shared:
                out = out + swiglu(xf, self.w13[E], self.w2[E]).to(out.dtype)
        if not stats:
            return out.view(B, T, C), None, None
        # f: (E,), sums to 1. Counted from the one-hot, not by torch.bincount, which syncs with the host on CUDA
        load = chosen.float().mean((0, 1))
        balance = E * (load * logits.softmax(-1).mean(0)).sum()
        return out.view(B, T, C), balance, load
