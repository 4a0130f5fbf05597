"""
A lab tool (dev/decode.md, "Where the batch-8 step goes" and "A few tokens' experts"), not part of the model: a
decode step's MoE layer for a few tokens, several ways, at the default GPU model's size (C=512, H=1024, 8 experts,
top-2, a shared one):
  rule: moe.MoE as committed: msa_triton.expert_mix at every few-token count (its chosen experts' path while the
       tokens' (token, expert) pairs are fewer than the experts, its all-experts path from there on);
  t:NAME=v/NAME=v...: the rule with some of the all-experts path's tiles set (experts.ALL_NAME, e.g.
       t:UP_COLS=32/UP_STAGES=2; dev/expert_sweep.py times the two kernels alone over many);
  torch: MoE.forward without a backend's kernels (as on a CPU): the router's product, the routing, every expert
       on every token in two batched products, the gated sum (moe.moe_all_experts).
Eight layers of their own weights (226 MB in bf16, beyond L2) run as one chain x = x + moe(x), compiled as the
decode step is (decoding.compiled_step's options) and captured in a CUDA graph; rounds of do_bench (bench.timed)
alternate the ways; the median us a layer is printed with each way's largest difference from the first way
(relative to its largest value; bf16, so ~1e-2 is rounding).
    python dev/moe_ab.py                  # on a GPU: N = 1, 2, 4, 8, 16 tokens (NS=1,8 to choose; WAYS=rule,torch)
$OUT (default /tmp) receives moe_ab.txt. dev/decode_ab.py's variant final-torch puts the torch way into the whole
decode step.
"""
import os
import statistics
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe
import msa_triton
from decoding import STEP_OPTIONS
import msa_triton.experts as experts

_rule_forward = moe.MoE.forward
_TILES = {name: getattr(experts, name) for name in dir(experts) if name.startswith("ALL_")}


def torch_forward(self, x, stats=True):
    """MoE.forward as it runs without a backend's expert_mix."""
    mix, self.expert_mix = self.expert_mix, None
    try:
        return _rule_forward(self, x, stats)
    finally:
        self.expert_mix = mix


def use(way):
    """Make moe.MoE run `way` ('rule', 't:NAME=v/...', 'torch': the docstring at the top) from the next trace on."""
    for name, value in _TILES.items():
        setattr(experts, name, value)
    if way.startswith("t:"):
        for item in way[2:].split("/"):
            name, value = item.split("=")
            assert "ALL_" + name in _TILES, f"no tile experts.ALL_{name}"
            setattr(experts, "ALL_" + name, int(value))
    moe.MoE.forward = torch_forward if way == "torch" else _rule_forward


def time_ways(N, ways=("rule", "torch"), layers=8, rounds=5):
    """us a layer of each way for N tokens (see the docstring at the top), and its difference from the first."""
    from bench import graphed, timed
    cfg = SimpleNamespace(n_expert=8, n_embd=512, expert_hidden=1024, expert_topk=2, shared_expert=True, n_layer=8)
    torch.manual_seed(0)
    mods = [moe.MoE(cfg, expert_mix=msa_triton.expert_mix).cuda().eval().to(torch.bfloat16) for _ in range(layers)]
    for m in mods:                                                             # a router that spreads the tokens
        m.router.weight.data.normal_(0, 0.5)
    x0 = torch.randn(N, 1, 512, device="cuda", dtype=torch.bfloat16)

    def chain(x):
        for m in mods:
            x = x + m(x, stats=False)[0]
        return x

    replays, outs = {}, {}
    for way in ways:
        use(way)
        torch._dynamo.reset()
        f = torch.compile(chain, fullgraph=True, dynamic=False, options=STEP_OPTIONS)
        out = torch.empty_like(x0)
        replays[way] = graphed(lambda: out.copy_(f(x0)))
        replays[way]()
        torch.cuda.synchronize()
        outs[way] = out
    use("rule")
    times = {way: [] for way in ways}
    for _ in range(rounds):
        for way, replay in replays.items():
            times[way].append(timed(replay, 100) * 1e3 / layers)                # do_bench's median, us a layer
    base = outs[ways[0]].float()
    return {way: (statistics.median(times[way]),
                  ((outs[way].float() - base).abs().max() / base.abs().max()).item()) for way in ways}


def main():
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        lines = []
        for N in [int(n) for n in os.environ.get("NS", "1,2,4,8,16").split(",")]:
            res = time_ways(N, *[os.environ["WAYS"].split(",")] if "WAYS" in os.environ else [])
            lines.append(f"N={N:2d} " + "  ".join(f"{w} {t:6.2f} us ({d:.1e})" for w, (t, d) in res.items()))
            print(lines[-1], flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "moe_ab.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
