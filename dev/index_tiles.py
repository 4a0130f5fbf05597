"""
A lab tool (dev/indexer.md, "index_topk's query tiles at the model's shape"), not part of the model: launch options
of msa_triton.index's _index_topk_kernel (queries a tile, warps, pipeline stages) at the model's shape (Hkv=2,
Di=64, bs=64, K=4; T = 1K, 4K, 16K with 32K tokens a call) and the M3 shape (Hkv=4, Di=128, bs=128, K=16, 32K; add
"long" for 128K), bf16. Each launch's output is checked equal to index_topk's, then timed (do_bench median, ms);
index_topk itself is timed too (its host time shows at the short shapes). One line a shape:
    python dev/index_tiles.py [long]
"""
import math
import os
import sys

import torch
import triton
from triton.testing import do_bench
sys.path.insert(0, os.getcwd())
import msa_triton
from msa_triton import index
from msa_triton.common import _pow2, _prec, _strides

VARIANTS = [(128, 4, 3), (128, 4, 2), (128, 8, 3), (256, 8, 3), (64, 4, 3), (64, 4, 2), (64, 2, 3), (32, 4, 3)]
msa_triton.checks(False)


def launch(qi, ki, bs, K, block_q, warps, stages):
    B, Hkv, T, Di = qi.shape
    out = torch.empty(B, Hkv, T, K, dtype=torch.int32, device=qi.device)
    block_n = min(_pow2(bs), 128)
    index._index_topk_kernel[(B * Hkv, triton.cdiv(T, block_q))](
        qi_ptr=qi, ki_ptr=ki, ks_ptr=qi, out_ptr=out, T=T, Hkv=Hkv, sqrt_di=math.sqrt(Di),
        **_strides("qi", qi), **_strides("ki", ki, "btd"), **_strides("o", out, "bhtk"),
        BS=bs, K=K, K_P=_pow2(K, 2), DI=Di, DI_P=_pow2(Di), BLOCK_Q=block_q, BLOCK_N=block_n,
        NCHUNK=triton.cdiv(bs, block_n), PREC=_prec(qi, ki), FP8=False, num_warps=warps, num_stages=stages)
    return out


shapes = [("model", 32, 2, 1024, 64, 64, 4), ("model", 8, 2, 4096, 64, 64, 4), ("model", 2, 2, 16384, 64, 64, 4),
          ("m3", 1, 4, 32768, 128, 128, 16)] + ([("m3", 1, 4, 131072, 128, 128, 16)] if "long" in sys.argv else [])
for name, B, Hkv, T, Di, bs, K in shapes:
    gen = torch.Generator(device="cuda").manual_seed(0)
    qi = torch.randn(B, Hkv, T, Di, device="cuda", dtype=torch.bfloat16, generator=gen)
    ki = torch.randn(B, T, Di, device="cuda", dtype=torch.bfloat16, generator=gen)
    ref = msa_triton.index_topk(qi, ki, bs, K)
    line = [f"{name} T={T} B={B}: index_topk {do_bench(lambda: msa_triton.index_topk(qi, ki, bs, K), rep=200):.4f}"]
    for bq, w, st in VARIANTS:
        same = torch.equal(launch(qi, ki, bs, K, bq, w, st), ref)
        ms = do_bench(lambda: launch(qi, ki, bs, K, bq, w, st), rep=100)
        line.append(f"{bq} queries, {w} warps, {st} stages {ms:.4f}" + ("" if same else " (output differs)"))
    print(" | ".join(line), flush=True)
