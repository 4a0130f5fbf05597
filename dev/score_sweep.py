"""
A lab tool (dev/decode.md, "The scoring pass at batch 8"), not part of the model: sparse_decode's scoring pass
(msa_triton/decode.py, _block_scores) timed over its launch settings (_score_config: index-key blocks per program,
warps) at the default model's index shape (Hkv=2, Di=64, bs=64), bf16 and fp8 index keys, full caches. Seven layers'
caches are scored back to back in one CUDA graph, as in a decode step (together larger than L2, so every read
comes from memory); each setting's scores must equal the committed setting's exactly. A second form, `loop` (this
file's _score_loop_kernel), gives each program a strided run of blocks in a software-pipelined loop (programs a row,
warps, stages). Prints us a layer and the index-key bytes read per second:
    python dev/score_sweep.py              # B x Tmax: 8x33024 1x131328 1x33024 by default
    python dev/score_sweep.py 8x33024
"""
import itertools
import os
import sys

import torch
import triton
import triton.language as tl
sys.path.insert(0, os.getcwd())
import msa_ref
import msa_triton.decode as dec
from bench import graph_of, timed
from msa_triton.common import _cdiv, _fp8_rows, _pdl, _pdl_wait, _pow2, _prec, _strides


@triton.jit
def _score_loop_kernel(qi_ptr, ki_ptr, ks_ptr, lens_ptr, sc_ptr,
                       s_qib, s_qih, s_qid, s_kib, s_kit, s_kid, s_ksb, s_scb, s_sch,
                       Tmax, P, HKV: tl.constexpr, DI: tl.constexpr, BS: tl.constexpr,
                       HKV_P: tl.constexpr, DI_P: tl.constexpr, BS_P: tl.constexpr,
                       PREC: tl.constexpr, FP8: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
    # decode._score_kernel's scores; program p of row b scores blocks p, p + P, p + 2P, ... before the local one
    _pdl_wait(PDL)
    p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = tl.minimum(tl.maximum(tl.load(lens_ptr + b), 1), Tmax)
    local = (n - 1) // BS
    h = tl.arange(0, HKV_P)
    d = tl.arange(0, DI_P)
    t = tl.arange(0, BS_P)
    qi = tl.load(qi_ptr + b * s_qib + h[:, None] * s_qih + d[None, :] * s_qid,
                 mask=(h[:, None] < HKV) & (d[None, :] < DI), other=0.0)
    if FP8:
        qi = _fp8_rows(qi.to(tl.float32))
    for blk in tl.range(p, local, P, num_stages=STAGES):
        tok = blk * BS + t
        ki = tl.load(ki_ptr + b * s_kib + tok[:, None] * s_kit + d[None, :] * s_kid,
                     mask=(t[:, None] < BS) & (d[None, :] < DI), other=0.0)
        if FP8:
            s = tl.dot(qi, tl.trans(ki)) * tl.load(ks_ptr + b * s_ksb + tok, mask=t < BS, other=0.0)[None, :]
        else:
            s = tl.dot(qi, tl.trans(ki), input_precision=PREC)
        s = tl.where(t[None, :] < BS, s, float("-inf"))
        tl.store(sc_ptr + b * s_scb + h * s_sch + blk, tl.max(s, axis=1), mask=h < HKV)


def loop_scores(qi, ki_cache, cache_lens, block_size, ki_scale, per_sm, warps, stages):
    """_score_loop_kernel's launch: about per_sm programs an SM in all (132 SMs)."""
    B, Hkv, Di = qi.shape
    Tmax = ki_cache.shape[1]
    nb = _cdiv(Tmax, block_size)
    S = torch.empty(B, Hkv, nb, device=qi.device, dtype=torch.float32)
    fp8 = ki_scale is not None
    P = min(nb, _cdiv(per_sm * 132, B))
    _score_loop_kernel[(P, B)](
        qi_ptr=qi, ki_ptr=ki_cache, ks_ptr=ki_scale if fp8 else S, lens_ptr=cache_lens, sc_ptr=S,
        **_strides("qi", qi, "bhd"), **_strides("ki", ki_cache, "btd"), s_ksb=ki_scale.stride(0) if fp8 else 0,
        s_scb=S.stride(0), s_sch=S.stride(1), Tmax=Tmax, P=P, HKV=Hkv, DI=Di, BS=block_size, HKV_P=_pow2(Hkv),
        DI_P=_pow2(Di, 32 if fp8 else 16), BS_P=_pow2(block_size), PREC=_prec(qi), FP8=fp8, STAGES=stages,
        num_warps=warps, **_pdl(qi))
    return S

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

    def measure(setting, scores):
        same = all(torch.equal(g, r) for g, r in zip(scores(), ref))
        ms = timed(graph_of(scores), rep_ms=200)
        lines.append(f"B={B} Tmax={Tmax} {'fp8 ' if fp8 else 'bf16'} {setting}: {ms / LAYERS * 1e3:6.2f} us a layer, "
                     f"{bytes_read / ms / 1e9:5.2f} TB/s, scores {'equal' if same else 'DIFFER'}")
        print(lines[-1], flush=True)

    for blocks, warps in itertools.product((1, 2), (1, 4)):
        dec._score_config = lambda fp8: (blocks, warps)
        measure(f"blocks={blocks} warps={warps}", scores)
    dec._score_config = committed
    for per_sm, warps, stages in itertools.product((1, 2, 4, 8), (1, 4), (2, 3, 4, 6)):
        measure(f"loop {per_sm}/SM warps={warps} stages={stages}",
                lambda: [loop_scores(qi, c, lens, bs, s, per_sm, warps, stages)[..., :nb_valid]
                         for qi, (c, s) in zip(qis, caches)])
    return lines


lines = [line for (B, Tmax), fp8 in itertools.product(shapes, (False, True)) for line in sweep(B, Tmax, fp8)]
with open(os.path.join(os.environ.get("OUT", "/tmp"), "score_sweep.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
