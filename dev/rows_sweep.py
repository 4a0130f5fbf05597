"""
A lab tool (dev/decode.md, "One-row products in Triton, and programmatic dependent launch"), not part of the model:
msa_triton.row_linear's tile (COLS output columns, WARPS warps a program) against cuBLAS's F.linear at the default
model's decode products, M rows each: a chain of 20 products (960 columns, then 512 of them back to 512) captured in
a CUDA graph, us a product, and ten logits products (50,304 columns):
    python dev/rows_sweep.py
"""
import itertools
import os
import sys

import torch
import torch.nn.functional as F
sys.path.insert(0, os.getcwd())
from bench import graphed, timed
from msa_triton import rows


def chain(fn, x0, wa, wb, reps=10):
    x = x0
    for _ in range(reps):
        y = fn(x, wa)                      # (M, 960): the stacked q, k, v and index product
        x = fn(y[:, :512], wb)             # (M, 512): the output projection
    return x


def graphed_us(f):
    """us of one replay of f() captured in a CUDA graph (median)."""
    return timed(graphed(f)) * 1e3


def main():
    torch.manual_seed(0)
    bf = torch.bfloat16
    wa = torch.randn(960, 512, device="cuda", dtype=bf) / 22
    wb = torch.randn(512, 512, device="cuda", dtype=bf) / 22
    wl = torch.randn(50304, 512, device="cuda", dtype=bf) / 22
    rows.MAX_ROWS = 8                                                          # the kernel for every M below
    for M in (1, 2, 4, 8):
        x0 = torch.randn(M, 512, device="cuda", dtype=bf)
        base = graphed_us(lambda: chain(F.linear, x0, wa, wb)) / 20
        head = graphed_us(lambda: [F.linear(x0, wl) for _ in range(10)]) / 10
        print(f"M={M}: cuBLAS {base:.2f} us a product in the chain, logits {head:.2f} us", flush=True)
        for cols, warps in itertools.product((8, 16, 32), (2, 4)):
            rows.COLS, rows.WARPS = cols, warps
            t = graphed_us(lambda: chain(rows.row_linear, x0, wa, wb)) / 20
            t2 = graphed_us(lambda: [rows.row_linear(x0, wl) for _ in range(10)]) / 10
            print(f"  COLS={cols:3d} WARPS={warps}: {t:.2f} us ({t / base:.2f}x), logits {t2:.2f} us", flush=True)


if __name__ == "__main__":
    main()
