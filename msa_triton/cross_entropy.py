"""
The language-model loss in Triton: linear_cross_entropy (msa_ref.linear_cross_entropy), chunked and fused.
Not MSA, but the other (T, ...) cost of a long-context step: at T = 128K the (T, V) logits would be
13 GB in bf16 and 26 GB in fp32, and torch's fp32 softmax forward + backward over them costs more than
MSA's attention. Here each chunk of rows is multiplied out in the compute dtype, one kernel turns it into
the rows' losses and, in place, into d loss / d logits, and two matmuls take that to dh and dw at once;
nothing of size (T, V) outlives a chunk.
"""
import torch
import triton
import triton.language as tl

from .common import _op

CE_CHUNK_ELEMS = 2 ** 29  # logits per chunk (1 GB in bf16)


@triton.jit
def _ce_rows_kernel(l_ptr, y_ptr, loss_ptr, V, s_lt, BLOCK_V: tl.constexpr):
    """One program = one row of the logits l (N, V). loss[row] = lse - l[y] (0 where y = -1, NaN where y
    is outside [-1, V): a bad target poisons the loss instead of reading out of bounds); the row is then
    overwritten with softmax - onehot(y) (zeros where y = -1). Two sweeps; the second mostly hits L2."""
    row = tl.program_id(0)
    l_row = l_ptr + row.to(tl.int64) * s_lt
    y = tl.load(y_ptr + row)
    m = tl.full((), float("-inf"), tl.float32)  # running max and sum of exp(x - m): an online logsumexp
    s = tl.full((), 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(l_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    ok = (y >= 0) & (y < V)
    x_y = tl.load(l_row + y, mask=ok, other=0.0).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(ok, lse - x_y, tl.where(y == -1, 0.0, float("nan"))))
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(l_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)
        tl.store(l_row + cols, tl.where(y == -1, 0.0, g).to(l_ptr.dtype.element_ty), mask=cols < V)


# linear_cross_entropy as a custom op: the forward returns the mean loss, the scored-token count n, and, when asked,
# the gradients of the summed row losses dh (N, C) and dw (V, C) fp32 (empty tensors otherwise); the backward
# scales them by dloss / n.

@_op("linear_cross_entropy")
def _ce_op(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, grad_h: bool, grad_w: bool,
           cdt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = h.device.type
    N, V = h.shape[0], w.shape[0]
    rows = max(1, CE_CHUNK_ELEMS // V)
    loss = torch.empty(N, device=h.device, dtype=torch.float32)
    with torch.autocast(dev, enabled=False):
        hc, wc = h.to(cdt), w.to(cdt)                                          # (N, C), (V, C)
        dh = torch.empty_like(h) if grad_h else h.new_empty(0)                 # (N, C)
        dw = torch.zeros_like(w, dtype=torch.float32) if grad_w else h.new_empty(0, dtype=torch.float32)  # (V, C)
        for i in range(0, N, rows):
            hi = hc[i:i + rows]                                                # (n, C)
            logits = hi @ wc.t()                                               # (n, V), then d loss / d logits
            _ce_rows_kernel[(hi.shape[0],)](l_ptr=logits, y_ptr=y[i:i + rows], loss_ptr=loss[i:i + rows], V=V,
                                            s_lt=logits.stride(0), BLOCK_V=4096, num_warps=8)
            if grad_h:
                dh[i:i + rows] = logits @ wc
            if grad_w:
                dw += (logits.t() @ hi).float()
    n = (y != -1).sum().float()                                                # the mean is over scored tokens
    return loss.sum() / n, n, dh, dw


@_ce_op.register_fake
def _(h, w, y, grad_h, grad_w, cdt):
    f32 = dict(dtype=torch.float32)
    return (h.new_empty((), **f32), h.new_empty((), **f32), torch.empty_like(h) if grad_h else h.new_empty(0),
            torch.empty_like(w, **f32) if grad_w else h.new_empty(0, **f32))


def _ce_setup(ctx, inputs, output):
    h, w = inputs[0], inputs[1]
    ctx.set_materialize_grads(False)                                           # n, dh, dw get no gradient: no zeros
    ctx.save_for_backward(*output[1:])
    ctx.dtypes = h.dtype, w.dtype


def _ce_grad(ctx, dloss, _dn, _dh, _dw):
    n, dh, dw = ctx.saved_tensors
    scale = dloss / n.clamp_min(1)          # d mean / d (sum of row losses); no scored token: zero gradients
    return ((dh * scale).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None,
            (dw * scale).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None, None, None, None, None)


_ce_op.register_autograd(_ce_grad, setup_context=_ce_setup)


def linear_cross_entropy(h, w, y):
    """Mean cross-entropy of the logits h @ w.T against y: h (N, C), w (V, C), y int (N,), -1 = no loss.
    Same value and gradients as msa_ref.linear_cross_entropy, computed chunk by chunk (see above)."""
    if not (h.dim() == 2 and w.dim() == 2 and h.shape[1] == w.shape[1]):
        raise ValueError(f"h must be (N, C) and w (V, C) with the same C, got {tuple(h.shape)} and {tuple(w.shape)}")
    if not (y.shape == (h.shape[0],) and not y.is_floating_point()):
        raise ValueError(f"y must be integer targets of shape ({h.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    if not (h.device == w.device == y.device):
        raise ValueError(f"h, w, y must be on one device, got {h.device}, {w.device}, {y.device}")
    # the dtype the logits would have: autocast's if it is on (it does not reach inside the op's explicit casts),
    # else h's; gradients only where a backward can come (eval would pay 3x)
    dev = h.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    grad = torch.is_grad_enabled()
    loss, _, _, _ = _ce_op(h, w, y.contiguous(), grad and h.requires_grad, grad and w.requires_grad, cdt)
    return loss
