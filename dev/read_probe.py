"""
A lab tool (dev/decode.md, "The all-experts kernels alone"), not part of the model: how fast a kernel can only read
the up weights of a decode step's MoE layer (w13, 9 x 512 x 2048 bf16, 18.9 MB a layer; eight layers back to back
in one CUDA graph, beyond L2), by the shape of its programs:
  strips:  _up_all_kernel's programs without the products: (expert, 64 hidden units) x every input feature, a
           (BLOCK_C, 64) tile of the gate and of the up columns a step (128-byte pieces of 4 KB rows);
  flat P:  the same bytes as one array cut in P contiguous pieces, one program each, TILE elements a step.
Every program sums what it reads (so nothing is optimised away) and the sums are checked against torch's.
    python dev/read_probe.py          # on a GPU
$OUT (default /tmp) receives read_probe.txt.
"""
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import graph_of, timed

C, H, EA, LAYERS = 512, 1024, 9, 8


@triton.jit
def _strips(w_ptr, out_ptr, C, H, s_we, s_wc, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr, STAGES: tl.constexpr):
    e, jb = tl.program_id(0), tl.program_id(1)
    j = jb * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_J,), dtype=tl.float32)
    for c0 in tl.range(0, C, BLOCK_C, num_stages=STAGES):
        c = c0 + tl.arange(0, BLOCK_C)
        w = w_ptr + e.to(tl.int64) * s_we + c[:, None].to(tl.int64) * s_wc + j[None, :]
        acc += tl.sum(tl.load(w).to(tl.float32) + tl.load(w + H).to(tl.float32), axis=0)
    tl.store(out_ptr + (e * tl.num_programs(1) + jb) * BLOCK_J + tl.arange(0, BLOCK_J), acc)


@triton.jit
def _flat(w_ptr, out_ptr, PER, TILE: tl.constexpr, STAGES: tl.constexpr):
    p = tl.program_id(0)
    acc = tl.zeros((TILE,), dtype=tl.float32)
    for i in tl.range(0, PER, TILE, num_stages=STAGES):
        acc += tl.load(w_ptr + p.to(tl.int64) * PER + i + tl.arange(0, TILE)).to(tl.float32)
    tl.store(out_ptr + p * TILE + tl.arange(0, TILE), acc)


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    ws = [torch.randn(EA, C, 2 * H, device="cuda", generator=gen).to(torch.bfloat16) for _ in range(LAYERS)]
    total = ws[0].numel()
    want = [w.float().sum().item() for w in ws]
    lines = []

    def run_case(name, launch):
        outs = launch()
        err = max(abs(o.sum().item() - t) / abs(t) for o, t in zip(outs, want))
        us = timed(graph_of(launch), rep_ms=100) * 1e3 / LAYERS
        lines.append(f"{name}: {us:6.2f} us a layer, {total * 2 / us / 1e6:5.2f} TB/s (sum error {err:.0e})")
        print(lines[-1], flush=True)

    for bc, warps, stages in itertools.product((64, 128), (4, 8), (2, 3, 4)):
        def launch():
            outs = []
            for w in ws:
                out = torch.empty(EA * H, device="cuda")
                _strips[(EA, H // 64)](w, out, C, H, w.stride(0), w.stride(1), BLOCK_C=bc, BLOCK_J=64, STAGES=stages,
                                       num_warps=warps)
                outs.append(out)
            return outs
        run_case(f"strips BLOCK_C={bc} warps={warps} stages={stages}", launch)
    for P, tile, warps, stages in itertools.product((144, 288, 576, 1152, 4608), (2048, 8192), (4, 8), (2, 4)):
        if (total // P) % tile:                                                  # whole tiles a piece only
            continue

        def launch():
            outs = []
            for w in ws:
                out = torch.empty(P * tile, device="cuda")
                _flat[(P,)](w, out, total // P, TILE=tile, STAGES=stages, num_warps=warps)
                outs.append(out)
            return outs
        run_case(f"flat P={P} TILE={tile} warps={warps} stages={stages}", launch)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "read_probe.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
