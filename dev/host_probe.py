"""
A lab tool (dev/kernels.md, "Eager calls without the dispatcher"), not part of the model: the host's time of eager
calls at the model's shape, measured on a machine without a GPU. A stand-in driver (device 0, stream 0, an sm_90
target) and a compile that returns a kernel whose launch does nothing let every Triton launch run Triton's Python
path (binding, specialisation, the cache lookup) up to its C launcher; the tensors live on the CPU and no kernel
reads them. Times, best of five rounds: the MSA training step (bench.msa_train_step) and the forward on both paths,
Triton's run() per kernel of the KV-outer step, and sparse_decode. Outside a GPU's process the index and KL calls
take the interpreter's tile sizes (more programs, the same launches). Use the Triton version of the GPU machine:
    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python dev/host_probe.py
"""
import collections
import os
import sys
import time

import torch
import triton
import triton.runtime.jit as jit

import stand_in

stand_in.install()
sys.path.insert(0, os.getcwd())
import msa_triton                                                              # noqa: E402 (after the stand-ins)
from bench import msa_train_step                                              # noqa: E402
from msa_triton import tile                                                   # noqa: E402

msa_triton.checks(False)                                                      # as on CUDA: no data-dependent checks
os.environ["TRITON_INTERPRET"] = "1"  # after the kernels are built: only lets the device check pass CPU tensors
Hq, Hkv, D, Di, bs = 8, 2, 64, 64, 64


def host_us(fn, n=100):
    """Best of five rounds of n calls: microseconds of host time a call."""
    for _ in range(5):
        fn()
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append(1e6 * (time.perf_counter() - t0) / n)
    return min(rounds)


run, launches = jit.JITFunction.run, collections.defaultdict(lambda: [0, 0.0])


def timed_run(self, *args, **kwargs):
    t0 = time.perf_counter()
    result = run(self, *args, **kwargs)
    launches[self.fn.__name__][0] += 1
    launches[self.fn.__name__][1] += time.perf_counter() - t0
    return result


print(f"triton {triton.__version__}, torch {torch.__version__}, host time a call (us):")
for T, K, path in ((1024, 4, "kv"), (1024, 8, "kv"), (4096, 4, "kv"), (1024, 4, "tile")):
    tile.FORCE = path
    g = torch.Generator().manual_seed(0)
    q, k, v, qi, ki = (torch.randn(*shape, dtype=torch.bfloat16, generator=g).requires_grad_() for shape in
                       ((1, Hq, T, D), (1, Hkv, T, D), (1, Hkv, T, D), (1, Hkv, T, Di), (1, T, Di)))
    dout = torch.randn_like(q)
    qd, kd, vd, qid, kid = (x.detach() for x in (q, k, v, qi, ki))
    step = host_us(lambda: msa_train_step(q, k, v, qi, ki, dout, bs, K))
    fwd = host_us(lambda: msa_triton.sparse_attention(qd, kd, vd, msa_triton.index_topk(qid, kid, bs, K), bs))
    print(f"  T={T} K={K} {path:4s} path: training step {step:6.0f}, forward (index_topk + sparse_attention) {fwd:6.0f}")
tile.FORCE = "kv"
launches.clear()
jit.JITFunction.run = timed_run
for _ in range(20):
    msa_train_step(q, k, v, qi, ki, dout, bs, 4)
jit.JITFunction.run = run
tile.FORCE = None
total = sum(s for _, s in launches.values()) / 20
print(f"  Triton's run() in the KV-outer step (T=1024, K=4): {sum(c for c, _ in launches.values()) / 20:.0f} "
      f"launches, {1e6 * total:.0f} us")
for name, (c, s) in sorted(launches.items(), key=lambda kv: -kv[1][1]):
    print(f"    {name:24s} {c / 20:3.0f} a step, {1e6 * s / c:5.1f} us each")
for B, Tmax, hq, hkv, d, block, topk in ((1, 131072, 64, 4, 128, 128, 16), (8, 2048, 8, 2, 64, 64, 8)):
    q = torch.randn(B, hq, d, dtype=torch.bfloat16)
    qi = torch.randn(B, hkv, 64, dtype=torch.bfloat16)
    kc = torch.randn(B, hkv, Tmax, d, dtype=torch.bfloat16)
    kic = torch.randn(B, Tmax, 64, dtype=torch.bfloat16)
    lens = torch.full((B,), Tmax - 5, dtype=torch.int32)
    call = host_us(lambda: msa_triton.sparse_decode(q, qi, kc, kc, kic, lens, block, topk), 500)
    print(f"  sparse_decode B={B} Tmax={Tmax} (Hq={hq}, Hkv={hkv}, D={d}, bs={block}, K={topk}): {call:.0f}")
