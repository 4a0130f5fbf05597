"""
A lab tool (dev/kernels.md, "The KV-outer step's fixed costs at the model's shape"), not part of the model: one MSA
training step at the model's shape (Hq=8, Hkv=2, D=Di=64, bs=64, 32K tokens a call, `indexer` selections, bf16, the
KV-outer path; bench.msa_train_step) kernel by kernel. For each case TxK (B = 32768 // T): three eager steps under
torch.profiler, every GPU kernel's time a step, largest first; then the step captured in a CUDA graph and dense
attention's forward + backward, both timed (do_bench median). The per-case header line prints again last:
    python dev/step_kernels.py 1024x4 4096x4 16384x4 1024x8
"""
import collections
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, os.getcwd())
import msa_triton
from bench import graph_of, msa_train_step, rand_qkv, timed
from msa_triton import tile

msa_triton.checks(False)                                                      # the hot path: no host sync
tile.FORCE = "kv"
dev, dt = "cuda", torch.bfloat16
summary = []
for case in sys.argv[1:] or ["1024x4", "4096x4", "16384x4", "1024x8"]:
    T, K = (int(x) for x in case.split("x"))
    B = 32768 // T
    q, k, v = (x.requires_grad_() for x in rand_qkv(B, 8, 2, T, 64, dt, dev))
    gen = torch.Generator(device=dev).manual_seed(4)
    qi = torch.randn(B, 2, T, 64, device=dev, dtype=dt, generator=gen).requires_grad_()
    ki = torch.randn(B, T, 64, device=dev, dtype=dt, generator=gen).requires_grad_()
    dout = torch.randn_like(q)

    def step():
        return msa_train_step(q, k, v, qi, ki, dout, 64, K)

    for _ in range(3):                                                        # compile every kernel first
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0, 0.0])                           # name -> [launches, us] a step
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per[e.name][0] += 1 / 3
            per[e.name][1] += e.device_time / 3
    graph_ms = timed(graph_of(step))
    qkv = [x.detach().requires_grad_() for x in (q, k, v)]

    def dense():
        o = F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=True)
        return torch.autograd.grad(o, qkv, dout)

    dense_ms = timed(dense)
    head = (f"T={T} B={B} K={K}: step in a CUDA graph {graph_ms:.3f} ms, dense {dense_ms:.3f} ms, "
            f"{graph_ms / dense_ms:.2f}x; kernels {sum(n for n, _ in per.values()):.0f}, "
            f"{sum(us for _, us in per.values()):.0f} us eager")
    print(head)
    for name, (n, us) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        print(f"  {us:8.1f} us  x{n:.0f}  {name[:100]}")
    summary.append(head)
    del q, k, v, qi, ki, dout, qkv
    torch.cuda.empty_cache()
print("\n".join(summary))
