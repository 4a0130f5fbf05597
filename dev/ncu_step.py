"""
A lab tool (dev/kernels.md, "Registers and integer work in the KV-outer kernels"), not part of the model: one eager
MSA training step at the model's shape (Hq=8, Hkv=2, D=Di=64, bs=64, 32K tokens a call, bf16, KV-outer path),
after three untimed ones, between cudaProfilerStart and cudaProfilerStop, so that Nsight Compute profiles exactly
one step's kernels. Arguments: T (default 1024) and K (default 4); B = 32768 // T. On one GPU:
    ncu --clock-control none --profile-from-start off --set full -f -o step1k python dev/ncu_step.py 1024 4
    ncu --import step1k.ncu-rep --page details --csv > details.csv          # registers, occupancy, throughputs, spills
    ncu --import step1k.ncu-rep -k _kl_loss_kernel -c 1 --page source --csv --print-source sass > kl_sass.csv   # stalls
"""
import os
import sys

import torch
sys.path.insert(0, os.getcwd())
import msa_triton
from bench import msa_train_step, rand_qkv
from msa_triton import tile

T = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
K = int(sys.argv[2]) if len(sys.argv) > 2 else 4
B = 32768 // T
dev, dt = "cuda", torch.bfloat16
msa_triton.checks(False)                                                      # the hot path: no host sync
tile.FORCE = "kv"
q, k, v = (x.requires_grad_() for x in rand_qkv(B, 8, 2, T, 64, dt, dev))
gen = torch.Generator(device=dev).manual_seed(4)
qi = torch.randn(B, 2, T, 64, device=dev, dtype=dt, generator=gen).requires_grad_()
ki = torch.randn(B, T, 64, device=dev, dtype=dt, generator=gen).requires_grad_()
dout = torch.randn_like(q)
for _ in range(3):                                                            # compile every kernel first
    msa_train_step(q, k, v, qi, ki, dout, 64, K)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
msa_train_step(q, k, v, qi, ki, dout, 64, K)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print(f"profiled one MSA step: T={T}, B={B}, K={K}")
