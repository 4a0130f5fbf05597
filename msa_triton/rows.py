"""
A decode step's dense products in Triton: row_linear(x, w) is F.linear(x, w) for the few rows of a decode step (one
new token a sequence) against a weight w (N, K). Not MSA, but a batch-1 step runs two such products a layer (q, k,
v and the index branch stacked; the attention's output), and cuBLAS's kernel for one row waits ~3 us on its own
latency where the 1 MB it reads takes ~0.2 us at the memory's speed.

One program computes COLS output columns for all M rows: it loads its (COLS, K) strip of w in one go (pieces of
MAX_STRIP elements when K is larger), so that all its bytes are in flight at once, and multiplies each row by it as a
broadcast multiply-and-sum on the CUDA cores (the tensor cores need 16 rows), in fp32, rounded to x's dtype once,
as a product in that dtype returns it. More than MAX_ROWS rows go to F.linear, whose tiles pay from there on.
Under programmatic dependent launch (common._pdl_wait) a program loads its strip before it waits for the kernel
before it: no kernel of a decode step writes a weight, so the strip's bytes are in flight while that kernel ends.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import _cdiv, _op, _pdl, _pdl_wait, _pow2

# Tile sizes (tuned on Hopper at the default model's products, K = 512, N = 512 and 960; see dev/decode.md)
COLS = 8           # output columns per program
WARPS = 4          # warps per program
MAX_ROWS = 1       # rows a call computes here; more go to F.linear (at 2-4 rows cuBLAS wins the logits' product)
MAX_STRIP = 16384  # elements of w loaded at once; a larger K runs the strip in pieces of this size


@triton.jit
def _rows_times_strip(x_ptr, s_xm, s_xk, w, k, km, acc, M: tl.constexpr, M_P: tl.constexpr):
    """acc (M_P, BLOCK_N) += x[:M, k] @ w.T for a strip w (BLOCK_N, BLOCK_K) fp32 of the columns k."""
    rows = tl.arange(0, M_P)
    for m in tl.static_range(M):                                              # the strip read once for all rows
        x = tl.load(x_ptr + m * s_xm + k * s_xk, mask=km, other=0.0).to(tl.float32)
        part = tl.sum(w * x[None, :], axis=1)                                  # (BLOCK_N,)
        acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)
    return acc


@triton.jit
def _row_linear_kernel(x_ptr, w_ptr, y_ptr, N, K, s_xm, s_xk, s_wn, s_wk, s_ym,
                       M: tl.constexpr, M_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       PDL: tl.constexpr):
    """One program = BLOCK_N output columns n for the M rows: y[m, n] = sum over k of x[m, k] * w[n, k]."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                   # (BLOCK_N,) output columns
    nm = n < N
    w_n = w_ptr + n[:, None].to(tl.int64) * s_wn
    k = tl.arange(0, BLOCK_K)
    km = k < K
    # the first piece of the strip loads before the wait for the kernel before (under PDL): no kernel of a step
    # writes a weight, so its bytes are in flight while that kernel finishes
    w = tl.load(w_n + k[None, :] * s_wk, mask=nm[:, None] & km[None, :], other=0.0).to(tl.float32)
    _pdl_wait(PDL)
    acc = _rows_times_strip(x_ptr, s_xm, s_xk, w, k, km, tl.zeros((M_P, BLOCK_N), dtype=tl.float32), M, M_P)
    for k0 in range(BLOCK_K, K, BLOCK_K):                                      # the other pieces, if any
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        w = tl.load(w_n + k[None, :] * s_wk, mask=nm[:, None] & km[None, :], other=0.0).to(tl.float32)
        acc = _rows_times_strip(x_ptr, s_xm, s_xk, w, k, km, acc, M, M_P)
    rows = tl.arange(0, M_P)
    tl.store(y_ptr + rows[:, None] * s_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & nm[None, :])


@_op("row_linear")
def _row_linear_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _row_linear_kernel[(_cdiv(N, COLS),)](
        x_ptr=x, w_ptr=w, y_ptr=y, N=N, K=K, s_xm=x.stride(0), s_xk=x.stride(1), s_wn=w.stride(0), s_wk=w.stride(1),
        s_ym=y.stride(0), M=M, M_P=_pow2(M, 1), BLOCK_N=COLS,
        BLOCK_K=min(_pow2(K, 1), MAX_STRIP // COLS), num_warps=WARPS, **_pdl(x))
    return y


@_row_linear_op.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def row_linear(x, w):
    """F.linear(x, w) without a bias, for a decode step: x (..., K), w (N, K) of x's dtype -> (..., N). Up to
    MAX_ROWS rows (the product of x's leading dimensions) in the kernel above, more through F.linear. Products
    accumulate in fp32; no gradient."""
    if x.dim() < 1 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"row_linear wants x (..., K) and w (N, K), got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype != w.dtype or x.device != w.device:
        raise ValueError(f"x and w must share a dtype and a device, got {x.dtype} on {x.device}, "
                         f"{w.dtype} on {w.device}")
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > MAX_ROWS or rows.shape[0] == 0:
        return F.linear(x, w)
    return _row_linear_op(rows, w).view(*x.shape[:-1], w.shape[0])
