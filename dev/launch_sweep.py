"""
A lab tool (dev/kernels.md, "Launch options at the model's shape"), not part of the model: the KV-outer kernels'
launch options swept at the repository model's shape (Hq=8, Hkv=2, D=Di=64, bs=64, 32K tokens a call, bf16,
`indexer` selections) on one GPU. One knob at a time, the others as committed; each setting times the whole MSA
training step (bench.msa_train_step) captured in a CUDA graph at four shapes by default (K = 4 at 1K, 4K, 16K; K = 8 at 1K),
after checking its gradients against the committed options' (relative difference <= 3e-2). A knob's best setting
counts when the mean of its times over the committed ones is below 0.985; the best settings are then timed
together. $OUT (default /tmp) receives launch_sweep.json; stop early with SWEEP_S (seconds, default 330); name
knobs (KNOBS below) to sweep only those, and cases TxK (as dev/step_kernels.py takes them) to time those shapes
instead of the four above:
    python dev/launch_sweep.py [fwd KL_SEG_SMALL ...] [1024x8 4096x8 ...]
"""
import itertools
import json
import os
import re
import sys
import time

import torch
sys.path.insert(0, os.getcwd())
import msa_triton
from bench import graph_of, msa_train_step, rand_qkv, timed
from msa_triton import attention as A, index as I, tile

dev, dt = "cuda", torch.bfloat16
Hq, Hkv, D, Di, bs = 8, 2, 64, 64, 64
SHAPES = [(4, 1024), (8, 1024), (4, 4096), (4, 16384)]                      # (K, T), B = 32K / T
cases = [tuple(int(x) for x in a.split("x")) for a in sys.argv[1:] if re.fullmatch(r"\d+x\d+", a)]
SHAPES = [(K, T) for T, K in cases] or SHAPES
msa_triton.checks(False)                                                      # the hot path: no host sync
tile.FORCE = "kv"                                                             # every call on the KV-outer path


class Override:
    """A kernel whose launches take some keyword arguments replaced (num_warps, num_stages, a tile constexpr)."""

    def __init__(self, kernel, **opts):
        self.kernel, self.opts = kernel, opts

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *a, **kw: launch(*a, **{**kw, **self.opts})


TILES, KERNELS = A._tiles, dict(klloss=I._kl_loss_kernel, klstats=I._kl_stats_kernel)
SEGS = dict(SEG=(A, A.SEG), BWD_SEG_SMALL=(A, A.BWD_SEG_SMALL), KL_SEG_SMALL=(I, I.KL_SEG_SMALL),
            STATS_SEG=(I, I.STATS_SEG))


def apply(cfg):
    """Set the launch options of cfg ({knob: setting}); every other knob as committed."""
    A._tiles = lambda kind, *a: {**TILES(kind, *a), **cfg.get(kind, {})}      # 'fwd', 'bwd', 'combine'
    I._kl_loss_kernel, I._kl_stats_kernel = (Override(KERNELS[n], **cfg[n]) if n in cfg else KERNELS[n]
                                             for n in ("klloss", "klstats"))
    for name, (mod, committed) in SEGS.items():
        setattr(mod, name, cfg.get(name, committed))


inputs, refs = {}, {}
for K, T in SHAPES:
    B = 32768 // T
    q, k, v = (x.requires_grad_() for x in rand_qkv(B, Hq, Hkv, T, D, dt, dev))
    gen = torch.Generator(device=dev).manual_seed(4)
    qi = torch.randn(B, Hkv, T, Di, device=dev, dtype=dt, generator=gen).requires_grad_()
    ki = torch.randn(B, T, Di, device=dev, dtype=dt, generator=gen).requires_grad_()
    inputs[K, T] = (q, k, v, qi, ki, torch.randn_like(q))


def measure(cfg):
    """{(K, T): (ms of the graphed step, largest relative gradient difference from the committed options')}."""
    apply(cfg)
    res = {}
    for K, T in SHAPES:
        q, k, v, qi, ki, dout = inputs[K, T]

        def step():
            return msa_train_step(q, k, v, qi, ki, dout, bs, K)
        grads = [g.float() for g in step()]
        refs.setdefault((K, T), grads)
        err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(grads, refs[K, T]))
        res[K, T] = (timed(graph_of(step), rep_ms=150), err)
    apply({})
    return res


KNOBS = {   # the committed setting is among each knob's values (for D = 64, bs = 64: fwd 64 x 4 x 1, bwd 64 x 4 x 2 ...)
    "klloss": [dict(BLOCK_Q=bq, num_warps=w, num_stages=s) for bq, w, s in itertools.product((32, 64, 128), (4, 8), (1, 2))],
    "bwd": [dict(ROWS=r, num_warps=w, num_stages=s) for r, w, s in itertools.product((32, 64, 128), (4, 8), (1, 2))],
    "fwd": [dict(ROWS=r, num_warps=w, num_stages=s) for r, w, s in itertools.product((64, 128), (4, 8), (1, 2))],
    "combine": [dict(ROWS=r, num_warps=w) for r, w in itertools.product((32, 64, 128), (1, 2, 4))],
    "SEG": [32, 64, 128, 256], "BWD_SEG_SMALL": [256, 512, 1024, 2048], "KL_SEG_SMALL": [512, 1024, 2048, 4096],
    "STATS_SEG": [32, 64, 128, 256],
    "klstats": [dict(BLOCK_Q=bq, num_warps=w, num_stages=s) for bq, w, s in itertools.product((32, 64, 128), (4, 8), (1, 2))],
}

names = [a for a in sys.argv[1:] if not re.fullmatch(r"\d+x\d+", a)]
if names:
    unknown = set(names) - set(KNOBS)
    if unknown:
        sys.exit(f"launch_sweep: knobs are {', '.join(KNOBS)} or cases TxK; got {', '.join(sorted(unknown))}")
    KNOBS = {name: KNOBS[name] for name in names}
base = measure({})
print("committed: " + "  ".join(f"K={K} T={T} {base[K, T][0]:.3f} ms" for K, T in SHAPES), flush=True)
best, log, t0 = {}, [], time.time()
for knob, settings in KNOBS.items():
    scored = []
    for setting in settings:
        if time.time() - t0 > float(os.environ.get("SWEEP_S", 330)):
            break
        r = measure({knob: setting})
        score = sum(r[s][0] / base[s][0] for s in SHAPES) / len(SHAPES)
        ok = all(e <= 3e-2 for _, e in r.values())
        line = f"{knob} {setting}: " + " ".join(f"{r[s][0]:.3f}" for s in SHAPES) + f"  mean ratio {score:.3f}"
        print(line + ("" if ok else "  GRADIENTS DIFFER"), flush=True)
        log.append(line)
        if ok:
            scored.append((score, setting))
    if scored and min(scored, key=lambda x: x[0])[0] < 0.985:
        best[knob] = min(scored, key=lambda x: x[0])[1]
together = measure(best)
print(f"best: {best}")
print("together: " + "  ".join(f"K={K} T={T} {together[K, T][0]:.3f} ms (committed {base[K, T][0]:.3f})"
                               for K, T in SHAPES))
with open(os.path.join(os.environ.get("OUT", "/tmp"), "launch_sweep.json"), "w") as f:
    json.dump(dict(log=log, best=best), f, default=str)
