"""
A lab tool (dev/kernels.md, "Where the eager step's host time goes"), not part of the model: the host's time per
eager MSA step at the model's shape (Hq=8, Hkv=2, D=Di=64, bs=64, K=4, 32K tokens a call, bf16) on one GPU, and
where it goes: Triton's JITFunction.run per kernel, each public function with and without its custom-op dispatch,
an empty Triton kernel through JITFunction.run and through its CompiledKernel.run, and eager sparse_decode.
Steps are launched without waiting, so the host's time per step is what the GPU waits for. $OUT (default /tmp)
receives host_time.txt with the profiler's CPU-op tables too; a summary prints:
    python dev/host_time.py
"""
import collections
import os
import sys
import time

import torch
import triton
import triton.language as tl
import triton.runtime.jit as jit
sys.path.insert(0, os.getcwd())
import msa_triton
from bench import msa_train_step
from msa_triton import attention, decode, index, tile

dev, dt = "cuda", torch.bfloat16
Hq, Hkv, D, Di, bs, K = 8, 2, 64, 64, 64, 4
out = open(os.path.join(os.environ.get("OUT", "/tmp"), "host_time.txt"), "w")
msa_triton.checks(False)                                                      # the hot path: no host sync


def say(*a):
    print(*a)
    print(*a, file=out, flush=True)


def host_us(fn, n=50):
    """Host microseconds per call of fn, n calls launched without waiting (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return 1e6 * (t1 - t0) / n


run = jit.JITFunction.run
launches = collections.defaultdict(lambda: [0, 0.0])                         # kernel -> [calls, seconds]


def timed_run(self, *args, **kwargs):
    t0 = time.perf_counter()
    result = run(self, *args, **kwargs)
    entry = launches[self.fn.__name__]
    entry[0] += 1
    entry[1] += time.perf_counter() - t0
    return result


for T, path in ((1024, "tile"), (1024, "kv"), (16384, "kv")):
    tile.FORCE, B = path, 32768 // T
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v, qi, ki = (torch.randn(*shape, device=dev, dtype=dt, generator=g).requires_grad_() for shape in
                       ((B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (B, Hkv, T, Di), (B, T, Di)))
    dout = torch.randn_like(q)

    def step():
        return msa_train_step(q, k, v, qi, ki, dout, bs, K)

    total = host_us(step, 20)
    launches.clear()
    jit.JITFunction.run = timed_run
    host_us(step, 20)
    jit.JITFunction.run = run
    n = 23                                                                     # 3 warm-up steps + 20
    say(f"T={T} B={B} {path} path: {total / 1e3:.3f} ms of host time a step; Triton's run(): "
        f"{sum(c for c, _ in launches.values()) / n:.0f} launches, {sum(s for _, s in launches.values()) / n * 1e3:.3f} ms")
    for name, (c, s) in sorted(launches.items(), key=lambda kv: -kv[1][1]):
        say(f"    {name:28s} {c / n:4.1f} a step, {1e6 * s / c:6.1f} us each")
    qd, kd, vd, qid, kid = (x.detach() for x in (q, k, v, qi, ki))
    idx = msa_triton.index_topk(qid, kid, bs, K)
    body = tile._forward if path == "tile" else attention._forward
    kl_body = tile._kl_launch if path == "tile" else index._kl_launch
    for name, fn in (("index_topk", lambda: msa_triton.index_topk(qid, kid, bs, K)),
                     ("  its op, no checks", lambda: torch.ops.nanomsa.index_topk(qid, kid, bs, K, False)),
                     ("  its body, no dispatch", lambda: index._index_topk_op.eager(qid, kid, bs, K, False)),
                     ("sparse_attention (no grad)", lambda: msa_triton.sparse_attention(qd, kd, vd, idx, bs)),
                     ("  its body", lambda: body(qd, kd, vd, idx, bs, *([tile.ROWS] if path == "tile" else []))),
                     ("kl_loss (no grad)", lambda: msa_triton.kl_loss(qd, kd, qid, kid, idx, bs)),
                     ("  its body", lambda: kl_body(qd, kd, qid, kid, idx, bs, False))):
        say(f"    {name:34s} {host_us(fn):7.1f} us")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"\n== T={T} {path} path, 5 steps: CPU operations\n"
          + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35), file=out)
tile.FORCE = None


@triton.jit
def _empty(a_ptr, b_ptr, c_ptr, s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, T, K, N: tl.constexpr, M: tl.constexpr):
    pass


x = torch.empty(16, device=dev)
args = [x, x, x] + list(range(1, 15))
kwargs = dict(zip(["a_ptr", "b_ptr", "c_ptr"] + [f"s{i}" for i in range(12)] + ["T", "K"], args))
compiled = _empty[(4, 2)](*args, N=16, M=32)
stream = torch.cuda.current_stream().cuda_stream
say(f"an empty 20-argument Triton kernel: positional {host_us(lambda: _empty[(4, 2)](*args, N=16, M=32), 500):.1f} us, "
    f"by keyword {host_us(lambda: _empty[(4, 2)](**kwargs, N=16, M=32), 500):.1f} us, through CompiledKernel.run "
    f"{host_us(lambda: compiled.run(4, 2, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *args, 16, 32), 500):.1f} us")
for B, Tmax, hq, hkv, d, block, topk in ((1, 131072, 64, 4, 128, 128, 16), (8, 2048, 8, 2, 64, 64, 8)):
    q = torch.randn(B, hq, d, device=dev, dtype=dt)
    qi = torch.randn(B, hkv, 64, device=dev, dtype=dt)
    kc = torch.randn(B, hkv, Tmax, d, device=dev, dtype=dt)
    kic = torch.randn(B, Tmax, 64, device=dev, dtype=dt)
    lens = torch.full((B,), Tmax - 5, device=dev, dtype=torch.int32)
    call = lambda: msa_triton.sparse_decode(q, qi, kc, kc, kic, lens, block, topk)
    body = lambda: decode._decode_op.eager(q, qi, kc, kc, kic, lens, block, topk, None)
    graph = torch.cuda.CUDAGraph()
    call()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        call()
    from triton.testing import do_bench
    say(f"sparse_decode B={B} Tmax={Tmax}: host {host_us(call, 200):.1f} us (its body {host_us(body, 200):.1f}); "
        f"do_bench eager {1e3 * do_bench(call):.1f} us, CUDA graph {1e3 * do_bench(graph.replay):.1f} us")
