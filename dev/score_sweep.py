"""
A lab tool (dev/decode.md, "The scoring pass at batch 8"), not part of the model: sparse_decode's scoring pass
(msa_triton/decode.py, _block_scores) timed over its launch settings (_score_config: index-key blocks per program,
warps) at the default model's index shape (Hkv=2, Di=64, bs=64), bf16 and fp8 index keys, full caches. Seven layers'
caches are scored back to back in one CUDA graph, as in a decode step (together larger than L2, so every read
comes from memory); each setting's scores must equal the committed setting's exactly. Prints us a layer and the
index-key bytes read per second:
    python dev/score_sweep.py              # B x Tmax: 8x33024 1x131328 1x33024 by default
    python dev/score_sweep.py 8x33024
"""
import itertools
import os
import sys

import torch
sys.path.insert(0, os.getcwd())
import msa_ref
import msa_triton.decode as dec
from bench import graph_of, timed

Hkv, Di, bs, LAYERS = 2, 64, 64, 7
shapes = [tuple(int(x) for x in a.split("x")) for a in sys.argv[1:]] or [(8, 33024), (1, 131328), (1, 33024)]
committed = dec._score_config


def sweep(B, Tmax, fp8):
    """Every setting at one shape: a line each."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    qis, caches = [], []
    for _ in range(LAYERS):
        qi = torch.randn(B, Hkv, Di, device="cuda", dtype=torch.bfloat16, generator=gen)
        ki = torch.randn(B, Tmax, Di, device="cuda", dtype=torch.bfloat16, generator=gen)
        qis.append(qi)
        caches.append(msa_ref.fp8_quantize(ki) if fp8 else (ki, None))
    lens = torch.full((B,), Tmax, device="cuda", dtype=torch.int32)
    bytes_read = LAYERS * B * Tmax * (Di * (1 if fp8 else 2) + (4 if fp8 else 0))
    nb_valid = (Tmax - 1) // bs                               # blocks before the local one are written

    def scores():
        return [dec._block_scores(qi, c, lens, bs, s)[..., :nb_valid] for qi, (c, s) in zip(qis, caches)]
    ref = scores()
    lines = []
    for blocks, warps in itertools.product((1, 2, 4, 8), (1, 2, 4, 8)):
        dec._score_config = lambda fp8: (blocks, warps)
        same = all(torch.equal(g, r) for g, r in zip(scores(), ref))
        ms = timed(graph_of(scores), rep_ms=200)
        lines.append(f"B={B} Tmax={Tmax} {'fp8 ' if fp8 else 'bf16'} blocks={blocks} warps={warps}: "
                     f"{ms / LAYERS * 1e3:6.2f} us a layer, {bytes_read / ms / 1e9:5.2f} TB/s, "
                     f"scores {'equal' if same else 'DIFFER'}")
        print(lines[-1], flush=True)
    dec._score_config = committed
    return lines


lines = [line for (B, Tmax), fp8 in itertools.product(shapes, (False, True)) for line in sweep(B, Tmax, fp8)]
with open(os.path.join(os.environ.get("OUT", "/tmp"), "score_sweep.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
