"""
A lab tool (dev/decode.md, "The all-experts kernels alone"), not part of the model: expert_mix's all-experts path
(msa_triton/experts.py) kernel by kernel over its tiles, at the default GPU model's experts (C=512, H=1024, 8 routed
+ 1 shared, top-2) and N tokens. Eight layers of their own weights (226 MB in bf16, beyond L2) run back to back in
one CUDA graph, as in a decode step; each line is us a layer and the weights' bytes read per second:
  up:   _up_all alone (w13, 18.9 MB a layer) over ALL_UP_COLS x ALL_UP_C x ALL_UP_WARPS x ALL_UP_STAGES;
  down: _down_all alone (w2, 9.4 MB a layer) over ALL_SPLIT x ALL_DOWN_COLS x ALL_DOWN_K x ALL_DOWN_WARPS x
        ALL_DOWN_STAGES;
  op:   both kernels (expert_all, the partial sums left unsummed), the committed tiles and the best of each sweep.
Every setting's result is checked against moe.moe_all_experts in fp32 (relative error under 2e-2).
    python dev/expert_sweep.py            # on a GPU; 8 tokens by default (NS=4,16 to choose)
$OUT (default /tmp) receives expert_sweep.txt.
"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe
import msa_triton.experts as ex
from bench import graph_of, timed

C, H, E, EA, TOPK, LAYERS = 512, 1024, 8, 9, 2, 8
UP = ("ALL_UP_COLS", "ALL_UP_C", "ALL_UP_WARPS", "ALL_UP_STAGES")
DOWN = ("ALL_SPLIT", "ALL_DOWN_COLS", "ALL_DOWN_K", "ALL_DOWN_WARPS", "ALL_DOWN_STAGES")
UP_GRID = list(itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 3, 4)))
DOWN_GRID = list(itertools.product((16, 32), (64, 128), (64, 128), (4, 8), (3, 4)))


def setting(names, values):
    for name, v in zip(names, values):
        setattr(ex, name, v)


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s, scale: (torch.randn(*s, device="cuda", generator=gen) * scale).to(torch.bfloat16)
    layers = [(rnd(E, C, scale=0.5), rnd(EA, C, 2 * H, scale=C ** -0.5), rnd(EA, H, C, scale=H ** -0.5))
              for _ in range(LAYERS)]
    lines = []

    def say(line):
        lines.append(line)
        print(line, flush=True)

    committed = {name: getattr(ex, name) for name in UP + DOWN}
    for N in [int(n) for n in os.environ.get("NS", "8").split(",")]:
        x = torch.randn(N, C, device="cuda", generator=gen).to(torch.bfloat16)
        want = []
        for router, w13, w2 in layers:                                          # the torch path, fp32
            logits = (x @ router.t()).float()
            top, idx = logits.topk(TOPK, dim=-1)
            wt = torch.zeros(N, EA, device="cuda").scatter_(1, idx, torch.softmax(top, -1))
            wt[:, E:] = 1
            want.append(moe.moe_all_experts(x.float(), wt, w13.float(), w2.float()))

        def check(outs):
            return max(((o.float() - w).abs().max() / w.abs().max()).item() for o, w in zip(outs, want))

        hs = [ex._up_all(x, r, TOPK, w13) for r, w13, _ in layers]

        def sweep(kind, names, grid, run, nbytes):
            best = None
            for values in grid:
                setting(names, values)
                try:
                    err = check([p.sum(0) for p in run()]) if kind == "down" else \
                        check([ex._down_all(h, w2).sum(0) for h, (_, _, w2) in zip(run(), layers)])
                    us = timed(graph_of(run), rep_ms=100) * 1e3 / LAYERS
                except Exception as e:                                      # a setting Triton cannot build
                    say(f"N={N} {kind} {values}: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                    continue
                ok = err < 2e-2
                say(f"N={N} {kind} {'/'.join(map(str, values))}: {us:6.2f} us a layer, "
                    f"{nbytes / us / 1e6:5.2f} TB/s, error {err:.1e}{'' if ok else ' WRONG'}")
                if ok and (best is None or us < best[0]):
                    best = (us, values)
            setting(names, [committed[n] for n in names])
            return best

        up = sweep("up", UP, UP_GRID, lambda: [ex._up_all(x, r, TOPK, w13) for r, w13, _ in layers],
                   EA * C * 2 * H * 2)
        down = sweep("down", DOWN, DOWN_GRID, lambda: [ex._down_all(h, w2) for h, (_, _, w2) in zip(hs, layers)],
                     EA * H * C * 2)
        op = lambda: [ex._all_op(x, r, TOPK, w13, w2) for r, w13, w2 in layers]
        res = {}
        for name, up_v, down_v in (("committed", None, None), ("both best", up and up[1], down and down[1])):
            if name != "committed" and not (up_v and down_v):
                continue
            if up_v:
                setting(UP, up_v)
                setting(DOWN, down_v)
            res[name] = (check([p.sum(0) for p in op()]), timed(graph_of(op), rep_ms=200) * 1e3 / LAYERS)
            setting(UP + DOWN, [committed[n] for n in UP + DOWN])
        best = lambda b: f"{'/'.join(map(str, b[1]))} {b[0]:.2f} us" if b else "none right"
        say(f"N={N} best up {best(up)}, best down {best(down)}; expert_all " +
            ", ".join(f"{k} tiles {t:.2f} us a layer (error {e:.1e})" for k, (e, t) in res.items()))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "expert_sweep.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    with torch.no_grad():
        main()
