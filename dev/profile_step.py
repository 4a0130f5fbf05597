"""
A lab tool (dev/model.md, "Where the compiled step's time goes"), not part of the model: the default GPU model
(config/train_gpu.py, random weights and tokens, bf16 autocast) timed and profiled on one GPU.
  train1k  the compiled training step (forward + backward), 16 x 1024 tokens: dense, MSA, MSA on the tile path
           (default compile mode, each profiled: kernels a step, their time, every kernel by time), then dense and MSA
           under mode="reduce-overhead" (CUDA graphs; timed only)
  train8k  the same model on 2 x 8192 tokens, dense and MSA (default mode, profiled)
  split1k  train1k's dense and MSA rows in the default mode only (profiled)
           (each profile splits the kernel time: msa_triton's kernels, dense attention's, the rest)
  ro1k, ro8k   dense and MSA under "reduce-overhead" at those shapes (timed only)
  roBxT    the same for B rows of T tokens (ro8x1024 ro32x1024: one micro-batch of accumulation's against the whole)
  decode   one compiled batch-1 decode step (sparse), profiled un-graphed
  decode8  the same at batch 8
  decode8long  batch 8 after a 32K-token prompt, bf16 and fp8 index keys (decode8fp8: the fp8 one only)
Run from the repository root; $OUT (default /tmp) receives one prof_*.txt per profile; a summary prints last:
    python dev/profile_step.py train1k decode train8k
"""
import collections
import os
import re
import sys
import time
from dataclasses import fields
import torch
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, os.getcwd())
import data
from configurator import read_config_file
from model import GPT, GPTConfig, gpu_peak_flops
from decoding import compiled_step
OUT = os.environ.get("OUT", "/tmp")
dev = "cuda"
conf = read_config_file("config/train_gpu.py")
peak = gpu_peak_flops(torch.cuda.get_device_name())
parts = sys.argv[1:] or ["train1k", "train8k", "decode"]
summary = []

def build(attention, **over):
    kw = {f.name: conf[f.name] for f in fields(GPTConfig) if f.name in conf}
    kw.update(vocab_size=data.VOCAB_SIZE, patch_dim=data.PATCH_DIM, img_patch_id=data.IMG_PATCH, attention=attention, **over)
    torch.manual_seed(0)
    return GPT(GPTConfig(**kw), backend="auto").to(dev)

def median_ms(fn, warmup=3, steps=10):
    for _ in range(warmup): fn()
    ts = []
    for _ in range(steps):
        torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]

def kernels(fn, tag, n=2):
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(n): fn()
        torch.cuda.synchronize()
    agg = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            a = agg[e.name]; a[0] += 1; a[1] += e.device_time / 1e3
    tot = sum(v[1] for v in agg.values()) / n
    cnt = sum(v[0] for v in agg.values()) / n
    # msa_triton's kernels are the Triton functions named _..._kernel; dense attention is cuDNN's or flash's
    ours = sum(v[1] for k, v in agg.items() if k.startswith("_") and k.endswith("_kernel")) / n
    dense = sum(v[1] for k, v in agg.items() if any(w in k.lower() for w in ("flash", "fmha", "cudnn"))) / n
    split = f"msa_triton {ours:.3f}, dense attention {dense:.3f}, the rest {tot - ours - dense:.3f}"
    lines = [f"== {tag}: {cnt:.0f} kernels/step, {tot:.3f} ms kernel time/step: {split}"]
    for name, (c, t) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{t / n:8.3f} ms {c / n:6.0f}x  {name[:150]}")
    txt = "\n".join(lines)
    open(f"{OUT}/prof_{tag}.txt", "w").write(txt + "\n\n" + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60))
    print("\n".join(lines[:22]), flush=True)
    return cnt, tot, split

def train_rows(B, T, tag, variants):
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, data.EOT, (B, T), device=dev, generator=g)
    y = torch.randint(0, data.EOT, (B, T), device=dev, generator=g)
    patches = torch.zeros(B, T, data.PATCH_DIM, device=dev)
    import msa_triton.tile as tile
    for attention, mode, force in variants:
        tile.FORCE = force
        m = build(attention).train()
        fpt = m.flops_per_token(T)
        c = torch.compile(m, mode=mode)
        def step():
            c.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, l = c(x, y, patches)
                loss = l["lm"] + l["kl"] + 0.01 * l["balance"]
            loss.backward()
        t0 = time.time(); step(); torch.cuda.synchronize(); cs = time.time() - t0
        ms = median_ms(step)
        mfu = 100 * fpt * B * T / (ms * 1e-3) / peak
        cnt, kt, split = kernels(step, f"{tag}_{attention}_{mode}_{force}") if mode is None else (0, 0, "")
        s = f"{tag} {attention} {mode} force={force} compiled: {ms:.2f} ms/step {B*T/ms*1e3/1e3:.0f}K tok/s MFU {mfu:.1f}% kernels {cnt:.0f} ktime {kt:.2f} ms {split} (compile {cs:.0f}s)"
        print(s, flush=True); summary.append(s)
        del m, c; torch._dynamo.reset(); torch.cuda.empty_cache()

if "train1k" in parts: train_rows(16, 1024, "t1k", [("dense", None, None), ("msa", None, None), ("msa", None, "tile"),
                                                   ("dense", "reduce-overhead", None), ("msa", "reduce-overhead", None)])
if "train8k" in parts: train_rows(2, 8192, "t8k", [("dense", None, None), ("msa", None, None)])
if "split1k" in parts: train_rows(16, 1024, "t1k", [("dense", None, None), ("msa", None, None)])
if "ro1k" in parts: train_rows(16, 1024, "t1k", [("dense", "reduce-overhead", None), ("msa", "reduce-overhead", None)])
if "ro8k" in parts: train_rows(2, 8192, "t8k", [("dense", "reduce-overhead", None), ("msa", "reduce-overhead", None)])
for B, T in [tuple(int(v) for v in p[2:].split("x")) for p in parts if re.fullmatch(r"ro\d+x\d+", p)]:
    train_rows(B, T, f"b{B}t{T}", [("dense", "reduce-overhead", None), ("msa", "reduce-overhead", None)])
decodes = [(1, 512, False, "decode"), (8, 512, False, "decode8"), (8, 32768, False, "decode8long"),
           (8, 32768, True, "decode8long"), (8, 32768, True, "decode8fp8")]
for B, T0, fp8 in dict.fromkeys((b, t, f) for b, t, f, part in decodes if part in parts):   # each step once
    m = build("msa", index_fp8=fp8).eval().to(torch.bfloat16)
    n_new = 256
    prompt = torch.randint(0, data.EOT, (B, T0), device=dev)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for decode in ("sparse",):
            cache = m.new_cache(T0 + n_new, decode)
            m(prompt, cache=cache)
            tok, pos = prompt[:, -1:].clone(), torch.tensor([T0], device=dev)
            out = torch.zeros(B, T0 + n_new, dtype=torch.long, device=dev)
            step = compiled_step(m.decode_step, "inductor")                  # as generate() compiles it
            tag = f"decode_{decode}" + ("" if B == 1 else f"_b{B}") + ("" if T0 == 512 else f"_t{T0}") + ("_fp8" if fp8 else "")
            cnt, kt, _ = kernels(lambda: step(tok, pos, cache, out, None, 0, None), tag, n=4)
            s = f"decode B={B} T0={T0}{' fp8 index' if fp8 else ''} {decode} compiled step: {cnt:.0f} kernels, {kt*1e3:.0f} us kernel time"
            print(s); summary.append(s)
    del m; torch._dynamo.reset(); torch.cuda.empty_cache()
print("\n".join(["SUMMARY"] + summary))
