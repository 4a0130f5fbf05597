"""
A lab tool (dev/decode.md, "One-row products in Triton, and programmatic dependent launch"), not part of the model:
msa_triton.row_linear's tile (COLS output columns, WARPS warps a program) against cuBLAS's F.linear at the default
model's decode products, M rows each: a chain of 20 products (960 columns, then 512 of them back to 512) captured in
a CUDA graph, us a product, and ten logits products (50,304 columns). Then, for 2 to 16 rows, a candidate that
row_linear's CUDA-core kernel is not (its time grows with the rows: one reduction a row): row_dot below, the rows
padded to 16 as one tensor-core product against a strip of `cols` columns a program.
    python dev/rows_sweep.py             # on a GPU; ROWS=8,16 to choose the rows
    python dev/rows_sweep.py --check     # row_dot against a float64 product, fp32 (a CPU: Triton's interpreter)
"""
import functools
import itertools
import os
import sys

import torch
import torch.nn.functional as F

if __name__ == "__main__" and "--check" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")                             # before triton is imported
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from msa_triton import rows
from msa_triton.common import _cdiv, _pdl, _pdl_wait, _pow2


@triton.jit
def _row_dot_kernel(x_ptr, w_ptr, y_ptr, M, N, K, s_xm, s_wn, s_ym,
                    M_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """One program = BLOCK_N output columns n for the M rows: y[m, n] = sum over k of x[m, k] * w[n, k], as
    (M_P, BLOCK_K) @ (BLOCK_K, BLOCK_N) tensor-core products accumulated in fp32; the first strip piece loads before
    the wait for the kernel before (no kernel of a step writes a weight)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                   # (BLOCK_N,) output columns
    nm = n < N
    m = tl.arange(0, M_P)
    mm = m < M
    w_n = w_ptr + n[None, :].to(tl.int64) * s_wn
    k = tl.arange(0, BLOCK_K)
    w = tl.load(w_n + k[:, None], mask=(k < K)[:, None] & nm[None, :], other=0.0)   # (BLOCK_K, BLOCK_N)
    _pdl_wait(PDL)
    acc = tl.zeros((M_P, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        if k0 > 0:
            w = tl.load(w_n + k[:, None], mask=km[:, None] & nm[None, :], other=0.0)
        x = tl.load(x_ptr + m[:, None] * s_xm + k[None, :], mask=mm[:, None] & km[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
    tl.store(y_ptr + m[:, None] * s_ym + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & nm[None, :])


def row_dot(x, w, cols=16, warps=4):
    """F.linear(x, w) for x (M, K) and w (N, K) of one dtype, both with contiguous rows; M <= 64. cols output columns
    and warps warps a program."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _row_dot_kernel[(_cdiv(N, cols),)](
        x_ptr=x, w_ptr=w, y_ptr=y, M=M, N=N, K=K, s_xm=x.stride(0), s_wn=w.stride(0), s_ym=y.stride(0),
        M_P=_pow2(M, 16), BLOCK_N=cols, BLOCK_K=min(_pow2(K, 16), rows.MAX_STRIP // cols),
        num_warps=warps, **_pdl(x))
    return y


def check():
    """row_dot against a float64 product: rows 1 to past 16, K and N not multiples of the tiles, K past one piece."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tol = 5e-3 if dev == "cuda" else 1e-5                                      # tl.dot takes fp32 as tf32 on a GPU
    g = torch.Generator().manual_seed(0)
    for M, N, K in [(1, 40, 24), (2, 16, 16), (5, 70, 48), (8, 33, 1030), (17, 20, 40)]:
        x = torch.randn(M, K, generator=g, dtype=torch.float64)
        w = torch.randn(N, K, generator=g, dtype=torch.float64)
        want = x @ w.t()
        got = row_dot(x.to(dev, torch.float32), w.to(dev, torch.float32)).double().cpu()
        err = ((got - want).abs().max() / want.abs().max()).item()
        print(f"M={M:2d} N={N} K={K}: relative error {err:.1e}")
        assert err < tol, f"row_dot off by {err:.1e}"
    print("check passed")


def chain(fn, x0, wa, wb, reps=10):
    x = x0
    for _ in range(reps):
        y = fn(x, wa)                      # (M, 960): the stacked q, k, v and index product
        x = fn(y[:, :512], wb)             # (M, 512): the output projection
    return x


def graphed_us(f):
    """us of one replay of f() captured in a CUDA graph (median)."""
    from bench import graphed, timed
    return timed(graphed(f)) * 1e3


def main():
    if "--check" in sys.argv:
        check()
        return
    torch.manual_seed(0)
    bf = torch.bfloat16
    wa = torch.randn(960, 512, device="cuda", dtype=bf) / 22
    wb = torch.randn(512, 512, device="cuda", dtype=bf) / 22
    wl = torch.randn(50304, 512, device="cuda", dtype=bf) / 22
    rows.MAX_ROWS = 16                                                         # the kernel for every M below
    for M in [int(m) for m in os.environ.get("ROWS", "1,2,4,8,16").split(",")]:
        x0 = torch.randn(M, 512, device="cuda", dtype=bf)
        base = graphed_us(lambda: chain(F.linear, x0, wa, wb)) / 20
        head = graphed_us(lambda: [F.linear(x0, wl) for _ in range(10)]) / 10
        print(f"M={M}: cuBLAS {base:.2f} us a product in the chain, logits {head:.2f} us", flush=True)
        for cols, warps in itertools.product((8, 16, 32), (2, 4)):
            rows.COLS, rows.WARPS = cols, warps
            t = graphed_us(lambda: chain(rows.row_linear, x0, wa, wb)) / 20
            t2 = graphed_us(lambda: [rows.row_linear(x0, wl) for _ in range(10)]) / 10
            print(f"  COLS={cols:3d} WARPS={warps}: {t:.2f} us ({t / base:.2f}x), logits {t2:.2f} us", flush=True)
        if M < 2:
            continue
        ref = F.linear(x0, wa).float()
        err = (row_dot(x0, wa).float() - ref).abs().max() / ref.abs().max()
        for cols, warps in itertools.product((16, 32), (2, 4)):
            dot = functools.partial(row_dot, cols=cols, warps=warps)
            t = graphed_us(lambda: chain(dot, x0, wa, wb)) / 20
            t2 = graphed_us(lambda: [dot(x0, wl) for _ in range(10)]) / 10
            print(f"  row_dot COLS={cols:3d} WARPS={warps}: {t:.2f} us ({t / base:.2f}x), logits {t2:.2f} us "
                  f"(vs cuBLAS: {err.item():.1e})", flush=True)


if __name__ == "__main__":
    main()
