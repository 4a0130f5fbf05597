"""
A lab tool (dev/decode.md, "The fp8 key write through bench's protocol"), not part of the model: where do the
compiled decode step and the eager one part? The default GPU model (config/train_gpu.py, random weights, bf16),
batch 8, a random prompt of T0 tokens prefilled once; then N steps, each run eagerly on one copy of the caches and
compiled (decoding.STEP_OPTIONS) on another, fed the eager step's tokens. After each step it compares the rows the
step wrote into every layer's caches (k, v, the index keys: they are computed from each layer's input, so the first
layer whose rows differ follows the first part of the step that rounds differently) and the logits, then copies
the eager rows into the compiled copy, so that every step starts equal. On a GPU:
    python dev/step_parity.py 32768 130      # T0, N
"""
import os
import sys
import time

from dataclasses import fields

import torch
sys.path.insert(0, os.getcwd())
import data
import decoding
from configurator import read_config_file
from decoding import KVCache
from model import GPT, GPTConfig, autocast

T0 = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
N = int(sys.argv[2]) if len(sys.argv) > 2 else 130
conf = read_config_file("config/train_gpu.py")
kw = {f.name: conf[f.name] for f in fields(GPTConfig) if f.name in conf}
kw.update(vocab_size=data.VOCAB_SIZE, patch_dim=data.PATCH_DIM, img_patch_id=data.IMG_PATCH, attention="msa")
torch.manual_seed(0)
m = GPT(GPTConfig(**kw), backend="auto").cuda().eval().to(torch.bfloat16)
B = 8
g = torch.Generator(device="cuda").manual_seed(0)
prompt = torch.randint(0, data.EOT, (B, T0), device="cuda", generator=g)


def clone(cs):
    """Copies of the KVCaches cs: their tensors cloned, the stacked weights shared."""
    out = []
    for c in cs:
        n = KVCache(c.max_len, c.dense, c.w)
        n.k, n.v = c.k.clone(), c.v.clone()
        n._ki = None if c._ki is None else c._ki.clone()
        n.ks = None if c.ks is None else c.ks.clone()
        out.append(n)
    return out

# one step's logits (B, V), writing the step's keys into cache: eager, and compiled as a decode step is
fe = lambda tok, pos, cache: m(tok, cache=cache, pos0=pos)[0][:, -1].float()
fc = torch.compile(fe, fullgraph=True, dynamic=False, options=decoding.STEP_OPTIONS)
t0 = time.time()
with torch.no_grad(), autocast("cuda"):
    cache = m.new_cache(T0 + N + 1)
    logits = m(prompt, cache=cache)[0][:, -1].float()
    cA, cB = clone(cache), clone(cache)
    tok = logits.argmax(-1)[:, None]
    pos = torch.tensor([T0], device="cuda")
    steps_diff = 0
    for i in range(N):
        la = fe(tok, pos, cA)
        lb = fc(tok, pos.clone(), cB)
        p = T0 + i
        rows = []
        for l, (a, b) in enumerate(zip(cA, cB)):
            dk = (a.k[:, :, p] != b.k[:, :, p]).sum().item()
            dv = (a.v[:, :, p] != b.v[:, :, p]).sum().item()
            dki = 0 if a._ki is None else (a._ki[:, p] != b._ki[:, p]).sum().item()
            if dk or dv or dki:
                rows.append((l, dk, dv, dki))
            b.k[:, :, p] = a.k[:, :, p]                                        # every step starts equal
            b.v[:, :, p] = a.v[:, :, p]
            if a._ki is not None:
                b._ki[:, p] = a._ki[:, p]
        dl = (la - lb).abs().max().item()
        am = (la.argmax(-1) != lb.argmax(-1)).sum().item()
        if rows or dl > 0:
            steps_diff += 1
            if steps_diff <= 12:
                print(f"step {i}: logits max diff {dl:.3g}, argmax differs in {am} rows, cache rows differing "
                      f"(layer, k, v, ki elements): {rows[:8]}")
        tok = la.argmax(-1)[:, None]
        pos += 1
print(f"T0={T0}: {steps_diff} of {N} steps differ; {time.time() - t0:.0f} s")
