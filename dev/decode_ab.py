"""
A lab tool (dev/decode.md, "One-row products in Triton, and programmatic dependent launch"), not part of the model:
the default GPU model's compiled, CUDA-graphed decode step timed in several forms in one process. Each variant sets
msa_triton's PDL switch, row_linear's MAX_ROWS, COLS and WARPS, inductor's triton.enable_pdl (None: left to
decoding.compiled_step) and the MoE layer's way (dev/moe_ab.py: 'rule' as committed, 'torch' without the backend's
kernels), compiles and captures its own step; then rounds of N replays run variant after variant (CUDA
events; pos and the token reset each round, so every round decodes the same greedy tokens), and the median us a step
is printed with how many leading tokens (all rows) equal the first variant's. A variant name may end in @dense
(dense decode) or @fp8 (fp8 index keys: the same weights in a model with index_fp8), and T0 sets the prompt's length:
    python dev/decode_ab.py            # BS=1,8 by default; VARS=base,final selects variants
    VARS=final,final-torch python dev/decode_ab.py            # the MoE layer: expert_mix against torch's products
    T0=32768 BS=8 VARS=final,final@fp8,final@dense python dev/decode_ab.py   # the 32K bar's arms
$OUT (default /tmp) receives decode_ab.txt.
"""
import os
import statistics
import sys
import time
from dataclasses import fields

import torch
import torch._inductor.config as inductor_config
sys.path.insert(0, os.getcwd())
import data
import msa_triton.common as common
import msa_triton.rows as rows
import moe_ab                                                                  # dev/, beside this file
from configurator import read_config_file
from decoding import compiled_step, cuda_graphed, sample_token
from model import GPT, GPTConfig

VARIANTS = {  # name: (PDL in msa_triton's kernels, row_linear's MAX_ROWS, inductor's PDL (True, False, None),
    #                row_linear's COLS and WARPS[, the MoE's way (dev/moe_ab.py): 'rule' when left out])
    "base": (False, 0, False, 16, 4), "rows": (False, 1, False, 16, 4), "pdl": (True, 0, False, 16, 4),
    "pdl+rows": (True, 1, False, 16, 4), "pdl+rows+inductor": (True, 1, True, 16, 4),
    "pdl+inductor": (True, 0, True, 16, 4), "cols16": (True, 1, None, 16, 4), "cols16-again": (True, 1, None, 16, 4),
    "final": (True, 1, None, 8, 4), "final-w2": (True, 1, None, 8, 2), "final-w2-global": (True, 1, True, 8, 2),
    "final-torch": (True, 1, None, 8, 4, "torch"),
}
T0, N, ROUNDS = int(os.environ.get("T0", 512)), 200, 7


def build(model, prompt, decode, pdl, max_rows, inductor_pdl, cols, warps, moe_way="rule"):
    """The variant's step, captured: returns run(n) -> (us a step over n replays, the (B, n + 1) tokens)."""
    moe_ab.use(moe_way)                                                        # read when the step is traced
    common.PDL, rows.MAX_ROWS, rows.COLS, rows.WARPS = pdl, max_rows, cols, warps
    inductor_config.triton.enable_pdl = bool(inductor_pdl)
    os.environ["NANOMSA_PDL"] = "0" if inductor_pdl is False else "1"        # what compiled_step reads
    torch._dynamo.reset()
    B = prompt.shape[0]
    cache = model.new_cache(T0 + N + 1, decode)
    out = torch.cat([prompt, prompt.new_zeros(B, N + 1)], 1)
    tok0 = sample_token(model(prompt, cache=cache)[0][:, -1].float(), 0, None, None)[:, None]   # (B, 1)
    out[:, T0] = tok0[:, 0]
    tok, pos = tok0.clone(), torch.full((1,), T0, dtype=torch.long, device="cuda")
    step = compiled_step(model.decode_step, "inductor")
    replay = cuda_graphed(lambda: step(tok, pos, cache, out, None, 0, None))[1]
    moe_ab.use("rule")

    def run(n):
        pos.fill_(T0)
        tok.copy_(tok0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n * 1e3, out[:, T0:T0 + n + 1].clone()
    return run


def main():
    conf = read_config_file("config/train_gpu.py")
    kw = {f.name: conf[f.name] for f in fields(GPTConfig) if f.name in conf}
    kw.update(vocab_size=data.VOCAB_SIZE, patch_dim=data.PATCH_DIM, img_patch_id=data.IMG_PATCH, attention="msa")
    torch.manual_seed(0)
    model = GPT(GPTConfig(**kw), backend="auto").cuda().eval().to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(0, data.EOT, (8, T0), device="cuda", generator=g)
    names = os.environ.get("VARS", ",".join(VARIANTS)).split(",")
    model8 = None
    if any(name.endswith("@fp8") for name in names):                         # the same weights, fp8 index keys
        model8 = GPT(GPTConfig(**{**kw, "index_fp8": True}), backend="auto").cuda().eval().to(torch.bfloat16)
        model8.load_state_dict(model.state_dict())
    lines = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for B in [int(b) for b in os.environ.get("BS", "1,8").split(",")]:
            runs = {}
            for name in names:
                t0 = time.time()
                base, _, mode = name.partition("@")
                runs[name] = build(model8 if mode == "fp8" else model, prompt[:B],
                                   "dense" if mode == "dense" else "sparse", *VARIANTS[base])
                runs[name](5)
                print(f"B={B} {name} built in {time.time() - t0:.1f} s", flush=True)
            times, tokens = {name: [] for name in runs}, {}
            for _ in range(ROUNDS):
                for name, run in runs.items():
                    t, tokens[name] = run(N)
                    times[name].append(t)
            first = tokens[names[0]]
            for name in runs:
                same = int((tokens[name] == first).all(0).long().cumprod(0).sum())
                us = statistics.median(times[name])
                lines.append(f"B={B} {name:18s} {us:7.1f} us a step {B * 1e6 / us:9,.0f} tokens/s  "
                             f"tokens equal to {names[0]}'s: {same}/{N + 1}")
                print(lines[-1], flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "decode_ab.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
