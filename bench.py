"""
Benchmark of the MSA kernels against dense attention (DESIGN.md section 5). GPU only, but --what launches.

    python bench.py                          # attention: M3 layer shape at 8K/32K/128K + the repo model's shape
    python bench.py --what attn --T 8192 32768 --json out/bench.json
    python bench.py --what small             # the model's shape at B*T = 32K tokens: MSA step vs dense, launches
    python bench.py --what paths             # KV-outer vs query-tile path at the model's shape, T = 1K, 4K, 16K
    TRITON_INTERPRET=1 python bench.py --what launches   # host operations of one MSA step per path (CPU or GPU)
    python bench.py --what lists             # the KV-outer work lists: Triton builder vs the torch reference

Each benchmark family is one function bench_<what>(args) -> list of rows (dicts); they share the
helpers below: selections, timing (do_bench, median), FLOP counts, the markdown table and the JSON.
Every family checks correctness before it times anything.
Conventions (DESIGN.md section 2): E = attended (query, key) pairs, summed over batch and groups;
main forward FLOPs = 4 * G * D * E, backward = 2.5x forward, kl_loss (2 G D + 8 Di) E, index_topk
2 Hkv Di E_causal; "useful TF/s" = those FLOPs / time.
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import msa_ref
import msa_triton
from msa_triton import common, decode as dec

# (name, B, Hq, Hkv, D, Di, bs, K, default T list)
SHAPES = {
    "m3": (1, 64, 4, 128, 128, 128, 16, [8192, 32768, 131072]),
    "model": (16, 8, 2, 64, 64, 64, 4, [1024]),      # model.py / train.py defaults: batch 16, seq_len 1024
}
REF_MAX_T = 2048  # msa_ref builds (B, Hkv, G, T, T) float32 tensors: only short sequences


# ---------------------------------------------------------------------------------------------
# shared helpers

def timed(fn, rep_ms=300):
    """Median milliseconds of fn() after warm-up (events, do_bench)."""
    return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def random_block_idx(B, Hkv, T, bs, K, device, seed=0):
    """The `random` selection: each token reads K-1 distinct random earlier blocks (uniform, Floyd's
    algorithm, vectorised over tokens) plus its local block, last. No T x T tensor. int32 (B, Hkv, T, K)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    l = (torch.arange(T, device=device) // bs).expand(B, Hkv, T)             # (B, Hkv, T) local block
    picked = []
    for i in range(K - 1):                                                     # Floyd: j runs over the last K-1 values of [0, l)
        j = l - (K - 1) + i
        r = (torch.rand(B, Hkv, T, device=device, generator=gen) * (j + 1)).long()
        if picked:
            r = torch.where((torch.stack(picked, -1) == r[..., None]).any(-1), j, r)
        picked.append(r)
    far = torch.stack(picked + [l], -1) if picked else l[..., None]           # (B, Hkv, T, K)
    few = torch.arange(K, device=device).expand(B, Hkv, T, K)                  # tokens with l + 1 <= K: every block
    few = torch.where(few < l[..., None], few, torch.where(few == l[..., None], l[..., None], -1))
    return torch.where((l < K)[..., None], few, far).to(torch.int32)


def indexer_block_idx(B, Hkv, T, Di, bs, K, device, seed=0):
    """The `indexer` selection: msa_triton.index_topk on random qi, ki."""
    g = torch.Generator(device=device).manual_seed(seed)
    qi = torch.randn(B, Hkv, T, Di, device=device, generator=g, dtype=torch.bfloat16)
    ki = torch.randn(B, T, Di, device=device, generator=g, dtype=torch.bfloat16)
    return msa_triton.index_topk(qi, ki, bs, K)


def attended_pairs(block_idx, bs, T):
    """E: attended (query, key) pairs summed over (B, Hkv), from block_idx (repeats count once)."""
    sl = common._slots(block_idx, 0, T, math.ceil(T / bs)).long()              # (B*Hkv, T, K) -1 = nothing
    t = torch.arange(T, device=block_idx.device)[None, :, None]
    n = (torch.minimum(t + 1, (sl + 1) * bs) - sl * bs).clamp(min=0)          # visible keys of each chosen block
    return int(torch.where(sl >= 0, n, 0).sum())


def kl_flops(E, G, D, Di):
    """kl_loss given the attention's lse, forward + backward (DESIGN.md section 2): per attended pair the G teacher
    heads' scores (2 G D) and the student's scores in both passes, dqi and dki (8 Di)."""
    return (2 * G * D + 8 * Di) * E


def rel_err(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def rand_qkv(B, Hq, Hkv, T, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(B, h, T, D, device=device, dtype=dtype, generator=g) for h in (Hq, Hkv, Hkv)]


def print_table(rows, cols):
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


# ---------------------------------------------------------------------------------------------
# attention: dense SDPA vs msa_triton.sparse_attention (and msa_ref at short T)

def check_attention(q, k, v, block_idx, bs, n_rows=64):
    """Relative errors of msa_triton vs an fp32 reference: msa_ref (forward and gradients) when T is
    short, else an fp32 gather over the selected keys of n_rows sampled (batch, group, token) rows."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    res = {}
    if T <= REF_MAX_T:
        qkv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out, lse = msa_triton.sparse_attention(*qkv, block_idx, bs)
        ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
        rout, rlse = msa_ref.sparse_attention(*ref, block_idx, bs)
        dout = torch.randn_like(out)
        g = torch.autograd.grad(out, qkv, dout)
        rg = torch.autograd.grad(rout, ref, dout.float())
        g2 = torch.autograd.grad(msa_triton.sparse_attention(*qkv, block_idx, bs)[0], qkv, dout)
        fin = rlse.isfinite()                                                  # -inf rows must match exactly
        res.update(out=rel_err(out, rout), lse=rel_err(lse[fin], rlse[fin]), lse_inf_match=torch.equal(lse.isfinite(), fin),
                   dq=rel_err(g[0], rg[0]),
                   dk=rel_err(g[1], rg[1]), dv=rel_err(g[2], rg[2]),
                   deterministic=all(torch.equal(a, b) for a, b in zip(g, g2)))
        return res
    out, lse = msa_triton.sparse_attention(q, k, v, block_idx, bs)
    gen = torch.Generator(device=q.device).manual_seed(1)
    errs, lerrs = [], []
    for _ in range(n_rows):
        b, grp, t = (int(torch.randint(0, n, (1,), generator=gen, device=q.device)) for n in (B, Hkv, T))
        blocks = torch.unique(block_idx[b, grp, t])
        blocks = blocks[blocks >= 0]
        keys = (blocks[:, None] * bs + torch.arange(bs, device=q.device)).flatten()
        keys = keys[keys <= t]                                                 # (n_keys,) the support
        qr = q[b, grp * G:(grp + 1) * G, t].float()                            # (G, D)
        s = qr @ k[b, grp, keys].float().T / math.sqrt(D)                      # (G, n_keys)
        rl = s.logsumexp(-1)
        ro = torch.softmax(s, -1) @ v[b, grp, keys].float()                    # (G, D)
        errs.append(rel_err(out[b, grp * G:(grp + 1) * G, t], ro))
        lerrs.append((lse[b, grp * G:(grp + 1) * G, t] - rl).abs().max().item())
    res.update(out_rows=max(errs), lse_rows_abs=max(lerrs))
    return res


def bench_attn(args):
    rows = []
    dev = "cuda"
    dtype = torch.bfloat16
    for shape in args.shape:
        B, Hq, Hkv, D, Di, bs, K, Ts = SHAPES[shape]
        for T in args.T or Ts:
            q, k, v = rand_qkv(B, Hq, Hkv, T, D, dtype, dev)
            dout = torch.randn(B, Hq, T, D, device=dev, dtype=dtype)
            base = dict(shape=shape, T=T)
            # dense causal GQA, two backends
            dense_flops = 4 * Hq * D * B * T * (T + 1) / 2
            dense = {}
            for name, backend in (("cuDNN", SDPBackend.CUDNN_ATTENTION),
                                  ("flash", SDPBackend.FLASH_ATTENTION)):
                def fwd():
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

                def fwdbwd():
                    qkv = [x.detach().requires_grad_() for x in (q, k, v)]
                    with sdpa_kernel(backend):
                        o = F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=True)
                    return torch.autograd.grad(o, qkv, dout)
                for pas, fn, fl in (("fwd", fwd, dense_flops), ("fwd+bwd", fwdbwd, 3.5 * dense_flops)):
                    try:
                        ms = timed(fn)
                    except RuntimeError as e:                                  # backend refuses this shape
                        rows.append(dict(base, sel="-", impl=f"dense {name}", **{"pass": pas}, ms="n/a", note=str(e)[:80]))
                        continue
                    dense[(name, pas)] = ms
                    rows.append(dict(base, sel="-", impl=f"dense {name}", **{"pass": pas}, ms=round(ms, 3),
                                     tflops=round(fl / ms / 1e9, 1)))
            best = {p: min([ms for (n, pp), ms in dense.items() if pp == p], default=float("nan")) for p in ("fwd", "fwd+bwd")}
            for sel in args.sel:
                block_idx = (random_block_idx(B, Hkv, T, bs, K, dev) if sel == "random"
                             else indexer_block_idx(B, Hkv, T, Di, bs, K, dev))
                E = attended_pairs(block_idx, bs, T)
                flops = 4 * (Hq // Hkv) * D * E
                chk = check_attention(q, k, v, block_idx, bs)
                print(f"[check] {shape} T={T} {sel}: " + ", ".join(f"{a}={b:.2e}" if isinstance(b, float) else f"{a}={b}" for a, b in chk.items()), flush=True)

                def ours_fwd():
                    return msa_triton.sparse_attention(q, k, v, block_idx, bs)

                def ours_fwdbwd():
                    qkv = [x.detach().requires_grad_() for x in (q, k, v)]
                    return torch.autograd.grad(msa_triton.sparse_attention(*qkv, block_idx, bs)[0], qkv, dout)

                def ours_query_outer():
                    return msa_triton.attention_forward_query_outer(q, k, v, block_idx, bs)
                variants = [("msa_triton", "fwd", ours_fwd, flops), ("msa_triton", "fwd+bwd", ours_fwdbwd, 3.5 * flops),
                            ("query-outer baseline", "fwd", ours_query_outer, flops)]
                if T <= REF_MAX_T and not args.no_ref:
                    variants.append(("msa_ref", "fwd", lambda: msa_ref.sparse_attention(q, k, v, block_idx, bs), flops))
                for impl, pas, fn, fl in variants:
                    ms = timed(fn)
                    rows.append(dict(base, sel=sel, impl=impl, **{"pass": pas}, ms=round(ms, 3), tflops=round(fl / ms / 1e9, 1),
                                     vs_dense=f"{best[pas] / ms:.2f}x", E=E, check=chk))
                del block_idx
            del q, k, v, dout
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# index: index_topk alone, the whole MSA forward (index_topk + sparse_attention) and the whole MSA
# training step (index_topk, attention fwd + bwd, kl_loss fwd + bwd), next to dense cuDNN

def peak_extra_mib(fn):
    """Peak memory allocated while fn() runs, above what was allocated before, in MiB (outputs included)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    m0 = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    del out
    return round((torch.cuda.max_memory_allocated() - m0) / 2**20, 1)


def check_index(qi, ki, block_idx, bs, K, n_rows=256):
    """index_topk vs the definition: the chosen earlier blocks' fp32 block scores (msa_ref.block_scores on
    n_rows sampled rows) against the best K-1. Returns the fraction of rows with the same set and the
    deficit of the chosen blocks' score sum per chosen block, max and mean over rows (bf16: ~1e-6, rounding;
    fp8: larger, that is its tolerance); the local block and the -1 slots must be exact."""
    B, Hkv, T, Di = qi.shape
    gen = torch.Generator(device=qi.device).manual_seed(2)
    t = torch.randint(0, T, (n_rows,), device=qi.device, generator=gen)       # sampled query positions
    S = msa_ref.block_scores(qi[:, :, t], ki, bs, t.view(1, 1, -1))            # (B, Hkv, n_rows, nb) fp32
    ref = msa_ref.select_blocks(S, t.view(1, 1, -1), bs, K).long()
    got = block_idx[:, :, t].long()
    far = (ref >= 0) & (ref < (t // bs).view(1, 1, -1, 1))
    assert torch.equal(got.masked_fill(far, 0), ref.masked_fill(far, 0)), "local block / -1 slots differ from msa_ref"
    score = lambda idx: torch.where(far, S.gather(3, idx.clamp(min=0)), 0.0).sum(-1)
    same = (got.masked_fill(~far, -2).sort(-1).values == ref.masked_fill(~far, -2).sort(-1).values).all(-1)
    deficit = (score(ref) - score(got)) / far.sum(-1).clamp(min=1)            # per chosen block
    return dict(same_set=same.float().mean().item(), deficit_max=deficit.max().item(), deficit_mean=deficit.mean().item())


def bench_index(args):
    rows = []
    dev, dtype = "cuda", torch.bfloat16
    for shape in args.shape:
        B, Hq, Hkv, D, Di, bs, K, Ts = SHAPES[shape]
        G = Hq // Hkv
        for T in args.T or Ts:
            q, k, v = rand_qkv(B, Hq, Hkv, T, D, dtype, dev)
            gen = torch.Generator(device=dev).manual_seed(3)
            qi = torch.randn(B, Hkv, T, Di, device=dev, dtype=dtype, generator=gen)
            ki = torch.randn(B, T, Di, device=dev, dtype=dtype, generator=gen)
            dout = torch.randn_like(q)
            base = dict(shape=shape, T=T, sel="indexer")
            idx_flops = 2 * Hkv * Di * B * T * (T + 1) / 2
            dense_flops = 4 * Hq * D * B * T * (T + 1) / 2
            block_idx = msa_triton.index_topk(qi, ki, bs, K)
            chk = check_index(qi, ki, block_idx, bs, K)
            chk.update({f"fp8_{a}": b for a, b in check_index(qi, ki, msa_triton.index_topk(qi, ki, bs, K, fp8=True), bs, K).items()})
            E = attended_pairs(block_idx, bs, T)
            flops = 4 * G * D * E
            step_flops = 3.5 * flops + kl_flops(E, G, D, Di) + idx_flops       # the work a training step must do
            if T <= REF_MAX_T:                                                 # kl_loss vs msa_ref, bf16 inputs
                qr, kr = (x.detach().float().requires_grad_() for x in (qi, ki))
                qg, kg = (x.detach().requires_grad_() for x in (qi, ki))
                lg = msa_triton.kl_loss(q, k, qg, kg, block_idx, bs)
                lr = msa_ref.kl_loss(q, k, qr, kr, block_idx, bs)
                g1, g0 = torch.autograd.grad(lg, [qg, kg]), torch.autograd.grad(lr, [qr, kr])
                chk.update(kl=abs(lg.item() / lr.item() - 1), dqi=rel_err(g1[0], g0[0]), dki=rel_err(g1[1], g0[1]))
            print(f"[check] index {shape} T={T}: " + ", ".join(f"{a}={b:.3g}" for a, b in chk.items()), flush=True)
            qiv, kiv = (x.detach().requires_grad_() for x in (qi, ki))

            def dense_fwd():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            def dense_step():
                qkv = [x.detach().requires_grad_() for x in (q, k, v)]
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    o = F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=True)
                return torch.autograd.grad(o, qkv, dout)

            def select():
                return msa_triton.index_topk(qi, ki, bs, K)

            def msa_fwd():
                return msa_triton.sparse_attention(q, k, v, msa_triton.index_topk(qi, ki, bs, K), bs)

            attn_lse = msa_triton.sparse_attention(q, k, v, block_idx, bs)[1]

            def kl_step(lse):
                return torch.autograd.grad(msa_triton.kl_loss(q, k, qiv, kiv, block_idx, bs, lse=lse), [qiv, kiv])

            def msa_step(reuse):
                qkv = [x.detach().requires_grad_() for x in (q, k, v)]
                idx = msa_triton.index_topk(qi, ki, bs, K)
                o, lse = msa_triton.sparse_attention(*qkv, idx, bs)
                kl = msa_triton.kl_loss(q, k, qiv, kiv, idx, bs, lse=lse if reuse else None)
                return torch.autograd.grad([o, kl], qkv + [qiv, kiv], [dout, torch.ones_like(kl)])
            dense = {}
            for impl, pas, fn, fl in (("dense cuDNN", "fwd", dense_fwd, dense_flops),
                                      ("dense cuDNN", "fwd+bwd", dense_step, 3.5 * dense_flops),
                                      ("index_topk", "select", select, idx_flops),
                                      ("index_topk fp8", "select", lambda: msa_triton.index_topk(qi, ki, bs, K, fp8=True), idx_flops),
                                      ("MSA fwd = index_topk + sparse_attention", "fwd", msa_fwd, flops + idx_flops),
                                      ("kl_loss (teacher lse recomputed)", "fwd+bwd", lambda: kl_step(None), kl_flops(E, G, D, Di)),
                                      ("kl_loss (given sparse_attention's lse)", "fwd+bwd", lambda: kl_step(attn_lse), kl_flops(E, G, D, Di)),
                                      ("MSA train step (kl recomputes lse)", "fwd+bwd", lambda: msa_step(False), step_flops),
                                      ("MSA train step (kl reuses attention lse)", "fwd+bwd", lambda: msa_step(True), step_flops)):
                ms = timed(fn)
                if impl.startswith("dense"):
                    dense[pas] = ms
                rows.append(dict(base, impl=impl, **{"pass": pas}, ms=round(ms, 3),
                                 tflops=round(fl / ms / 1e9, 1),
                                 vs_dense=f"{dense[pas] / ms:.2f}x" if impl.startswith(("dense", "MSA")) else "",
                                 mem_MiB=peak_extra_mib(fn), E=E, check=chk))
            del q, k, v, qi, ki, qiv, kiv, dout, block_idx
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# decode: one new token per sequence against full caches, MSA sparse_decode vs dense SDPA

def graphed(fn):
    """fn() captured in a CUDA graph after one eager call (compiles, allocates); returns graph.replay."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def graphed_loop(fns, steps):
    """One CUDA graph of `steps` consecutive calls fns[0], fns[1], ... (in turn): the steady state of a
    decoding loop, where a layer's step runs right after the previous one and no graph replay, host
    launch or L2 flush sits between two steps (do_bench flushes L2 once per replay, i.e. per `steps`
    steps; rotating over the copies still keeps each step's caches out of L2). Returns graph.replay."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(steps):
            fns[i % len(fns)]()
    return g.replay


def rotating(fns):
    """One callable that runs fns[0], fns[1], ... in turn, so that each call reads another cache copy."""
    state = [0]

    def run():
        fns[state[0] % len(fns)]()
        state[0] += 1
    return run


def decode_reference(q, qi, k, v, ki, lens, bs, K, ki_scale=None):
    """fp32: msa_ref's selection (block_scores + select_blocks), then softmax over a gather of the selected
    tokens only (no (B, Hkv, Tmax, D) fp32 copy). Returns block_idx (B, Hkv, K) and out (B, Hq, D).
    ki_scale: ki is an fp8 cache (msa_ref.fp8_quantize), scored as msa_ref.sparse_decode scores it."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    q_pos = (lens.long() - 1).view(B, 1, 1)
    if ki_scale is not None:
        qi, ki = msa_ref.fp8_dequantize(*msa_ref.fp8_quantize(qi)), msa_ref.fp8_dequantize(ki, ki_scale)
    idx = msa_ref.select_blocks(msa_ref.block_scores(qi.unsqueeze(2), ki, bs, q_pos), q_pos, bs, K).squeeze(2)
    tok = idx.long().clamp(min=0)[..., None] * bs + torch.arange(bs, device=q.device)   # (B, Hkv, K, bs)
    valid = (idx[..., None] >= 0) & (tok < lens.view(B, 1, 1, 1))
    tok = tok.clamp(max=k.shape[2] - 1).view(B, Hkv, K * bs, 1).expand(-1, -1, -1, D)
    s = q.float().view(B, Hkv, Hq // Hkv, D) @ k.gather(2, tok).float().transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~valid.view(B, Hkv, 1, K * bs), float("-inf"))                   # (B, Hkv, G, K*bs)
    return idx, (torch.softmax(s, -1) @ v.gather(2, tok).float()).view(B, Hq, D)


def bench_decode(args):
    """Per (T, B): N copies of the caches (every row full, at T tokens), N such that 300 MB (6 x L2) of
    sparse-step data lie between two reads of one copy (do_bench also clears L2 before each call).
    Dense = SDPA over the whole cache, cuDNN and flash, eager and CUDA-graphed (best of all = vs_dense).
    MSA step = msa_triton.sparse_decode (scoring + top-k + split-K attention + merge), eager and
    graphed (eager_over_graph: the host's share of an eager call; launches: GPU operations per call); its pieces
    graphed alone. Shapes: M3's at 32K and 128K, the repository model's at 1K (--shape). "N steps in one graph" rows: a decoding loop's steady state (see
    graphed_loop), MSA against the best dense backend timed the same way. "fp8 index cache" rows: the same
    step on e4m3 index keys (msa_ref.fp8_quantize; the selection is msa_ref's with fp8=True, which differs
    from the bf16 one: the check line says how often). GB/s = bytes that must be read / time: index keys
    of the earlier blocks (and their scales) + the selected K/V for MSA, the whole K/V cache for dense."""
    rows = []
    dt = torch.bfloat16
    for shape in args.shape:
        Hq, Hkv, D, Di, bs, K = SHAPES[shape][1:7]
        for T in args.T or ([32768, 131072] if shape == "m3" else [1024]):
            for B in args.B:
                copy_bytes = B * T * ((2 * Hkv * D + Di) * 2 + Di + 4)                    # bf16 caches + the fp8 index cache
                ki_bytes = B * ((T - 1) // bs) * bs * Di * 2
                ki8_bytes = B * ((T - 1) // bs) * bs * (Di + 4)                   # e4m3 keys + a float32 scale each
                kv_bytes = B * Hkv * min(K, (T - 1) // bs + 1) * bs * D * 2 * 2
                dense_bytes = B * Hkv * T * D * 2 * 2
                n = int(max(2, min(math.ceil(300e6 / (ki_bytes + kv_bytes)), 40e9 // copy_bytes, 64)))
                gen = torch.Generator(device="cuda").manual_seed(T + B)
                rnd = lambda *s: torch.randn(*s, device="cuda", dtype=dt, generator=gen)
                cs = [dict(q=rnd(B, Hq, D), qi=rnd(B, Hkv, Di), k=rnd(B, Hkv, T, D), v=rnd(B, Hkv, T, D), ki=rnd(B, T, Di),
                           lens=torch.full((B,), T, device="cuda", dtype=torch.int32)) for _ in range(n)]
                for c in cs:
                    c["ki8"], c["ks"] = msa_ref.fp8_quantize(c["ki"])               # (B, T, Di) e4m3, (B, T)
                c = cs[0]
                ridx, rout = decode_reference(c["q"], c["qi"], c["k"], c["v"], c["ki"], c["lens"], bs, K)
                out = msa_triton.sparse_decode(c["q"], c["qi"], c["k"], c["v"], c["ki"], c["lens"], bs, K)
                sel = dec._decode(c["q"], c["qi"], c["k"], c["v"], c["ki"], c["lens"], bs, K)[1]
                ridx8, rout8 = decode_reference(c["q"], c["qi"], c["k"], c["v"], c["ki8"], c["lens"], bs, K, c["ks"])
                out8, sel8 = dec._decode(c["q"], c["qi"], c["k"], c["v"], c["ki8"], c["lens"], bs, K, c["ks"])
                same = lambda a, b: (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()
                chk = dict(sel_rows_differing=int((sel != ridx).any(-1).sum()), out=rel_err(out, rout),
                           fp8_sel_rows_differing=int((sel8 != ridx8).any(-1).sum()), fp8_out=rel_err(out8, rout8),
                           fp8_same_set_as_bf16=same(sel8, sel))
                print(f"[check] decode {shape} T={T} B={B}: " + ", ".join(f"{a}={b:.3g}" for a, b in chk.items()), flush=True)
                del ridx, rout, ridx8, rout8
                base = dict(shape=shape, T=T, sel="indexer", **{"pass": f"decode B={B}"}, copies=n, check=chk)

                def add(impl, fn, nbytes, dense_ms=None, steps=1):
                    ms = timed(fn, rep_ms=100) / steps
                    rows.append(dict(base, impl=impl, ms=round(ms, 4), GBps=round(nbytes / ms / 1e6),
                                     vs_dense=f"{dense_ms / ms:.2f}x" if dense_ms else ""))
                    return ms

                dense, dense_loop = [], []
                loop = n * math.ceil(16 / n)          # steps per graph in the steady-state rows (graphed_loop)
                for name, be in (("cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
                    def sdpa(c, be=be):
                        with sdpa_kernel(be):
                            return F.scaled_dot_product_attention(c["q"].unsqueeze(2), c["k"], c["v"], enable_gqa=True)
                    try:
                        dense.append(add(f"dense SDPA {name}", rotating([lambda c=c: sdpa(c) for c in cs]), dense_bytes))
                        dense.append(add(f"dense SDPA {name} graph", rotating([graphed(lambda c=c: sdpa(c)) for c in cs]), dense_bytes))
                        dense_loop.append(add(f"dense SDPA {name}, {loop} steps in one graph",
                                              graphed_loop([lambda c=c: sdpa(c) for c in cs], loop), dense_bytes, steps=loop))
                    except RuntimeError as e:                                      # backend refuses this shape
                        rows.append(dict(base, impl=f"dense SDPA {name}", ms="n/a", note=str(e)[:80]))
                step = lambda c: msa_triton.sparse_decode(c["q"], c["qi"], c["k"], c["v"], c["ki"], c["lens"], bs, K)
                eager = add("MSA sparse_decode", rotating([lambda c=c: step(c) for c in cs]), ki_bytes + kv_bytes, min(dense))
                graph = add("MSA sparse_decode graph", rotating([graphed(lambda c=c: step(c)) for c in cs]), ki_bytes + kv_bytes,
                            min(dense))
                rows[-2].update(eager_over_graph=f"{eager / graph:.2f}x", launches=gpu_ops(lambda: step(cs[0])))
                # a decoding loop's steady state: consecutive steps in one graph, per step, vs dense the same way
                add(f"MSA sparse_decode, {loop} steps in one graph", graphed_loop([lambda c=c: step(c) for c in cs], loop),
                    ki_bytes + kv_bytes, min(dense_loop), steps=loop)
                step8 = lambda c: msa_triton.sparse_decode(c["q"], c["qi"], c["k"], c["v"], c["ki8"], c["lens"], bs, K,
                                                           ki_scale=c["ks"])
                add("MSA sparse_decode, fp8 index cache, graph", rotating([graphed(lambda c=c: step8(c)) for c in cs]),
                    ki8_bytes + kv_bytes, min(dense))
                add(f"MSA sparse_decode, fp8 index cache, {loop} steps in one graph",
                    graphed_loop([lambda c=c: step8(c) for c in cs], loop), ki8_bytes + kv_bytes, min(dense_loop), steps=loop)
                # the pieces, each graphed alone (a graph of one tiny kernel shows the fixed cost of a replay)
                S = [dec._block_scores(c["qi"], c["ki"], c["lens"], bs) for c in cs]
                part = [dec._partials(c["q"], c["k"], c["v"], c["lens"], s, bs, K) for s, c in zip(S, cs)]
                tiny = torch.zeros(1, device="cuda")
                add("  graph of one tiny kernel", graphed(lambda: tiny.add_(1)), 4)
                add("  scoring graph", rotating([graphed(lambda c=c: dec._block_scores(c["qi"], c["ki"], c["lens"], bs)) for c in cs]), ki_bytes)
                add("  scoring, fp8 index cache, graph", rotating([graphed(lambda c=c: dec._block_scores(c["qi"], c["ki8"], c["lens"], bs, c["ks"]))
                                                                   for c in cs]), ki8_bytes)
                add("  top-k + split-K + merge graph", rotating([graphed(lambda s=s, c=c: dec._merge(*dec._partials(c["q"], c["k"], c["v"], c["lens"], s, bs, K)[:2], c["q"]))
                                                                 for s, c in zip(S, cs)]), kv_bytes)
                add("  top-k + split-K partials graph", rotating([graphed(lambda s=s, c=c: dec._partials(c["q"], c["k"], c["v"], c["lens"], s, bs, K))
                                                                  for s, c in zip(S, cs)]), kv_bytes)
                add("  merge graph", rotating([graphed(lambda p=p, c=c: dec._merge(*p[:2], c["q"])) for p, c in zip(part, cs)]), part[0][0].numel() * 4)
                del cs, S, part
                torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------
# small: the repository model's shape (Hq=8, Hkv=2, D=Di=64, bs=64) at B*T = 32K tokens, where a call's fixed
# cost (launches, host work) shows: the MSA training step and forward against dense SDPA, eager and in a CUDA
# graph, with the GPU operations (kernels, memsets, copies) that one call launches

SMALL = dict(Hq=8, Hkv=2, D=64, Di=64, bs=64, tokens=32768, T=[1024, 4096, 16384], K=[4, 8])


def gpu_ops(fn):
    """The GPU operations (kernels, memsets, copies) that one call of fn() launches, counted by torch.profiler
    after a warm-up call; 'n/a' if the profiler reports none."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    n = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())
    return n or "n/a"


def graph_of(fn):
    """fn() captured in a CUDA graph after two eager calls on a side stream (they compile the kernels and
    allocate, which a capture must not do); returns graph.replay. fn may run a backward (torch.autograd.grad)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


# host-side operations of one call, counted on any device (the CPU runs Triton in its interpreter)

HOST_ONLY = ("aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_reshape_alias",
             "aten::as_strided", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::slice", "aten::select",
             "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::transpose", "aten::t", "aten::permute",
             "aten::unbind", "aten::_unsafe_view", "aten::resize_", "aten::set_", "aten::result_type",
             "aten::promote_types", "aten::real", "aten::to")   # aten::to with no aten op below it: no conversion


def count_ops(fn):
    """What one call of fn() asks of the host, from torch.profiler's CPU events after a warm-up call: Triton launches
    (kernel[grid](...), wrapped in a profiler range), torch ops that launch device work (aten ops with no aten op
    below them, outside a Triton launch, but views and allocations) and host-only torch ops (views, allocations).
    Runs on a CPU too (TRITON_INTERPRET=1): the counts are the GPU's, up to how a few aten ops decompose there."""
    from triton.runtime import interpreter, jit
    fn()
    originals = {c: c.run for c in (jit.JITFunction, interpreter.InterpretedFunction)}

    def wrap(run):
        def counted(self, *a, **kw):
            with torch.profiler.record_function(f"triton::{getattr(self, '__name__', 'kernel')}"):
                return run(self, *a, **kw)
        return counted
    for c, run in originals.items():
        c.run = wrap(run)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        for c, run in originals.items():
            c.run = run
    n = dict(triton=0, torch_device=0, torch_host=0)
    for e in prof.events():
        up, inside = e.cpu_parent, False
        while up is not None and not inside:
            inside, up = up.name.startswith("triton::"), up.cpu_parent
        if e.name.startswith("triton::"):
            n["triton"] += 1
        elif e.name.startswith("aten::") and not inside and not any(c.name.startswith("aten::") for c in e.cpu_children):
            n["torch_host" if e.name in HOST_ONLY else "torch_device"] += 1
    return n


def msa_train_step(q, k, v, qi, ki, dout, bs, K):
    """One MSA training step at the model's layer, as model.py runs it: the selection (no grad), sparse_attention_kl,
    and the gradients of out . dout + kl with respect to q, k, v, qi, ki (the leaves given)."""
    with torch.no_grad():
        idx = msa_triton.index_topk(qi, ki, bs, K)
    o, _, kl = msa_triton.sparse_attention_kl(q, k, v, qi, ki, idx, bs)
    return torch.autograd.grad([o, kl], [q, k, v, qi, ki], [dout, torch.ones_like(kl)])


def bench_launches(args):
    """The host operations of one MSA training step (index_topk, sparse_attention_kl: the attention and kl_loss given
    its lse, their backward) on each path (tile.FORCE) at the model's head shape, K in 4 and 8, one token chunk. On a
    CPU (TRITON_INTERPRET=1, float32, a short T) as on a GPU; the counts hardly depend on T or B."""
    from msa_triton import tile
    rows = []
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    Hq, Hkv, D, Di, bs = (SMALL[x] for x in ("Hq", "Hkv", "D", "Di", "bs"))
    prev = msa_triton.checks(False)
    for K in SMALL["K"]:
        for T in args.T or ([1024] if cuda else [4 * bs]):
            B = 2
            q, k, v = (x.detach().requires_grad_() for x in rand_qkv(B, Hq, Hkv, T, D, dtype, dev))
            gen = torch.Generator(device=dev).manual_seed(4)
            qi = torch.randn(B, Hkv, T, Di, device=dev, dtype=dtype, generator=gen).requires_grad_()
            ki = torch.randn(B, T, Di, device=dev, dtype=dtype, generator=gen).requires_grad_()
            dout = torch.randn_like(q)

            def step():
                return msa_train_step(q, k, v, qi, ki, dout, bs, K)
            for path in ("kv", "tile"):
                tile.FORCE = path
                try:
                    n = count_ops(step)
                finally:
                    tile.FORCE = None
                rows.append(dict(shape="model", T=T, B=B, K=K, impl=f"MSA step [{path}]", **{"pass": "fwd+bwd"},
                                 launches=n["triton"] + n["torch_device"], **n))
    msa_triton.checks(prev)
    return rows


def torch_lists():
    """tests/test_lists.py's torch reference of common._csr (the same lists in ~20 torch operations), which
    --what lists checks the Triton builder against and times beside it."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests"))
    from test_lists import lists_by_torch
    return lists_by_torch


def bench_lists(args):
    """The KV-outer work lists of one call, chunk by chunk as the attention forward (per_slot = G * D) and kl_loss
    (per_slot = max(G, Di)) build them: common._csr against the torch reference, checked equal, then timed."""
    rows = []
    ref = torch_lists()
    cases = [("model", 32, 2, 1024, 64, k, 4 * 64, 4) for k in (4, 8)] + [("model", 2, 2, 16384, 64, 8, 4 * 64, 4)]
    cases += [("m3", 1, 4, T, 128, 16, 16 * 128, 128) for T in (args.T or [32768, 131072])]
    for shape, B, Hkv, T, bs, K, attn_slot, kl_slot in cases:
        block_idx = random_block_idx(B, Hkv, T, bs, K, "cuda")
        for who, per_slot in (("attention", attn_slot), ("kl_loss", kl_slot)):
            bounds = common._chunk_bounds(B, Hkv, T, K, per_slot, bs)
            for a, b in zip(common._csr(block_idx, *bounds[0]), ref(block_idx, *bounds[0])):
                assert torch.equal(a, b), f"lists differ: {shape} T={T} K={K}"
            ms = {name: timed(lambda: [f(block_idx, *c) for c in bounds]) for name, f in (("triton", common._csr), ("torch", ref))}
            rows.append(dict(shape=shape, T=T, B=B, K=K, impl=f"work lists of {who}: {len(bounds)} chunk(s), Triton",
                             ms=round(ms["triton"], 3), torch_ms=round(ms["torch"], 3),
                             vs_torch=f"{ms['torch'] / ms['triton']:.2f}x"))
    return rows


def bench_small(args):
    from msa_triton import tile
    rows = []
    dev, dtype = "cuda", torch.bfloat16
    Hq, Hkv, D, Di, bs = (SMALL[x] for x in ("Hq", "Hkv", "D", "Di", "bs"))
    msa_triton.checks(False)                                                   # the hot path: no host sync
    tile.FORCE = args.path                                                     # None: the rule picks each call's path
    for K in SMALL["K"]:
        for T in args.T or SMALL["T"]:
            B = max(1, SMALL["tokens"] // T)
            q, k, v = rand_qkv(B, Hq, Hkv, T, D, dtype, dev)
            gen = torch.Generator(device=dev).manual_seed(4)
            qi = torch.randn(B, Hkv, T, Di, device=dev, dtype=dtype, generator=gen)
            ki = torch.randn(B, T, Di, device=dev, dtype=dtype, generator=gen)
            dout = torch.randn_like(q)
            base = dict(shape="model", T=T, B=B, K=K, sel="indexer")
            block_idx = msa_triton.index_topk(qi, ki, bs, K)
            E, G = attended_pairs(block_idx, bs, T), Hq // Hkv
            idx_flops, fwd_flops = 2 * Hkv * Di * B * T * (T + 1) / 2, 4 * G * D * E
            step_flops = 3.5 * fwd_flops + kl_flops(E, G, D, Di) + idx_flops
            path = "tile" if msa_triton._tile_path(q, k, block_idx, bs) else "kv"
            if T <= REF_MAX_T:                                                 # two batch rows against msa_ref
                chk = check_attention(q[:2], k[:2], v[:2], block_idx[:2], bs)
                qr, kr = (x[:2].detach().float().requires_grad_() for x in (qi, ki))
                qg, kg = (x[:2].detach().requires_grad_() for x in (qi, ki))
                lse2 = msa_triton.sparse_attention(q[:2], k[:2], v[:2], block_idx[:2], bs)[1]
                lg = msa_triton.kl_loss(q[:2], k[:2], qg, kg, block_idx[:2], bs, lse=lse2)
                lr = msa_ref.kl_loss(q[:2], k[:2], qr, kr, block_idx[:2], bs)
                g1, g0 = torch.autograd.grad(lg, [qg, kg]), torch.autograd.grad(lr, [qr, kr])
                chk.update(kl=abs(lg.item() / lr.item() - 1), dqi=rel_err(g1[0], g0[0]), dki=rel_err(g1[1], g0[1]))
                print(f"[check] small K={K} T={T}: " + ", ".join(f"{a}={b:.2e}" if isinstance(b, float) else f"{a}={b}"
                                                                 for a, b in chk.items()), flush=True)
            qkv = [x.detach().requires_grad_() for x in (q, k, v)]
            qiv, kiv = (x.detach().requires_grad_() for x in (qi, ki))

            def dense_step():
                o = F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=True)
                return torch.autograd.grad(o, qkv, dout)

            def msa_fwd():
                with torch.no_grad():
                    return msa_triton.sparse_attention(q, k, v, msa_triton.index_topk(qi, ki, bs, K), bs)

            def msa_step():
                return msa_train_step(*qkv, qiv, kiv, dout, bs, K)

            dense_ms = None
            for impl, pas, fn, fl in (("dense SDPA (causal, enable_gqa)", "fwd+bwd", dense_step,
                                       3.5 * 4 * Hq * D * B * T * (T + 1) / 2),
                                      (f"MSA step [{path}]", "fwd+bwd", msa_step, step_flops),
                                      (f"MSA forward (index_topk + sparse_attention) [{path}]", "fwd", msa_fwd,
                                       fwd_flops + idx_flops),
                                      (f"MSA step, CUDA graph [{path}]", "fwd+bwd", "graph", step_flops)):
                try:
                    if fn == "graph":
                        fn, ops = graph_of(msa_step), 1
                    else:
                        ops = gpu_ops(fn)
                    ms = timed(fn)
                except Exception as e:                                         # one row's failure keeps the rest
                    rows.append(dict(base, impl=impl, **{"pass": pas}, ms="n/a", note=f"{type(e).__name__}: {str(e)[:80]}"))
                    continue
                dense_ms = dense_ms or ms
                rows.append(dict(base, impl=impl, **{"pass": pas}, ms=round(ms, 3), tflops=round(fl / ms / 1e9, 1),
                                 launches=ops, msa_over_dense=f"{ms / dense_ms:.2f}x"))
            del q, k, v, qi, ki, qiv, kiv, qkv, dout, block_idx
            torch.cuda.empty_cache()
    msa_triton.checks(None)
    tile.FORCE = None
    return rows


# model: the default GPU config's model (config/train_gpu.py) end to end, randomly initialised

def bench_model(args):
    """Three parts (--model_parts):
    train: training forward + backward of one micro-batch of config/train_gpu.py (32 x 1024 random tokens, or
      --train_batch rows of 1024; bf16 autocast, median of 10 steps after 3) for the dense and the MSA arm, eager
      and torch.compile'd in each of --compile_modes (compile time apart): tokens/s and MFU against the GPU's peak
      (model.gpu_peak_flops, FLOPs from GPT.flops_per_token).
    moe: the MoE layer alone (16K tokens, C=512, H=1024, E=8, top-2) forward + backward, moe_dispatch vs its two
      F.grouped_mm alone.
    gen: GPT.generate of the MSA arm, greedy, bf16 weights under bf16 autocast (and one pair with the fp32 weights
      as trained), decode step eager or compiled (generate's compile=False / True), CUDA-graphed either way:
      512-token prompt, 256 new tokens, batch 1 and 8, sparse and dense decode; a 32K-token prompt at batch 8, sparse
      (bf16 and fp8 index keys: GPTConfig.index_fp8, sample.py's --index_fp8) and dense decode. Each row: after
      one untimed identical call (first_call_s: Triton and torch.compile compile, the graph captures), the prompt
      alone is timed, then the whole call, the new tokens take the difference (ms per step, tokens/s). A compiled
      row checks its tokens against the eager row's (same_tokens: how many leading new tokens agree in every row).
      Last, the GPU operations of one un-graphed decode step (batch 1, torch.profiler), eager and compiled.
    All three take a few minutes on an H200 (compiling the decode steps is most of gen's)."""
    import os
    from dataclasses import fields

    import data  # imported here: only this family needs the model, its data constants and its config
    from configurator import read_config_file
    from model import GPT, GPTConfig, autocast, gpu_peak_flops
    from moe import moe_dispatch
    rows, dev = [], "cuda"
    gpu = torch.cuda.get_device_name()
    peak = gpu_peak_flops(gpu)
    if peak is None:
        print(f"MFU: unknown peak for {gpu}")
    conf = read_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "train_gpu.py"))
    B, T = args.train_batch or conf["batch_size"], conf["seq_len"]                 # train's micro-batch
    bf16 = autocast("cuda")

    def build(attention, **over):
        kw = {f.name: conf[f.name] for f in fields(GPTConfig) if f.name in conf}
        kw.update(vocab_size=data.VOCAB_SIZE, patch_dim=data.PATCH_DIM, img_patch_id=data.IMG_PATCH, attention=attention,
                  **over)
        torch.manual_seed(0)
        return GPT(GPTConfig(**kw), backend="auto").to(dev)

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randint(0, data.EOT, (B, T), device=dev, generator=g)             # text tokens only
    y = torch.randint(0, data.EOT, (B, T), device=dev, generator=g)
    patches = torch.zeros(B, T, data.PATCH_DIM, device=dev)                      # as train.py passes them

    def train_step(m):
        m.zero_grad(set_to_none=True)
        with bf16:
            _, losses = m(x, y, patches)
            loss = losses["lm"] + losses["kl"] + 0.01 * losses["balance"]
        loss.backward()
        return loss.detach()

    def median_ms(fn, warmup=3, steps=10):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    def add(impl, pas, ms=None, tok_s=None, flops=None, **extra):
        row = dict(shape="model", T=T, impl=impl, **{"pass": pas}, **extra)
        if ms is not None:
            row["ms"] = round(ms, 3)
        if tok_s is not None:
            row["tok_s"] = round(tok_s)
        if flops is not None:
            row["tflops"] = round(flops / ms / 1e9, 1)
            row["mfu"] = f"{100 * flops / ms / 1e-3 / peak:.1f}%" if peak else "unknown peak"
        rows.append(row)
        print(" | ".join(f"{k} {v}" for k, v in row.items()), flush=True)

    if "train" in args.model_parts:
        # training: eager, then compiled, per arm
        for attention in ("dense", "msa"):
            m = build(attention).train()
            fpt = m.flops_per_token(T)
            eager_loss = train_step(m).item()
            ms = median_ms(lambda: train_step(m))
            add(f"train {attention}, eager", "fwd+bwd", ms, B * T / ms * 1e3, fpt * B * T)
            for mode in args.compile_modes:
                name = "torch.compile" + ("" if mode == "default" else f" {mode}")
                try:
                    c = torch.compile(m, mode=None if mode == "default" else mode)
                    t0 = time.time()
                    loss = train_step(c).item()                                     # compiles forward and backward
                    compile_s = time.time() - t0
                    ms = median_ms(lambda: train_step(c))
                    add(f"train {attention}, {name}", "fwd+bwd", ms, B * T / ms * 1e3, fpt * B * T,
                        compile_s=round(compile_s, 1), check=f"loss {loss:.4f} vs eager {eager_loss:.4f}")
                except Exception as e:  # report and go on: the eager numbers stand
                    print(f"train {attention}, {name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                torch._dynamo.reset()
            del m
            torch.cuda.empty_cache()

    if "moe" in args.model_parts:
        # the MoE layer alone: 16K tokens, bf16 inputs and weights
        N, C, H, E, k = 16384, 512, 1024, 8, 2
        gm = torch.Generator(device=dev).manual_seed(1)
        xs = (torch.randn(N, C, device=dev, generator=gm)).bfloat16().requires_grad_()
        ws = [(torch.randn(E, a, b, device=dev, generator=gm) / a ** 0.5).bfloat16().requires_grad_()
              for a, b in ((C, 2 * H), (H, C))]                                # w13 (gate | up), w2
        top, idx = torch.randn(N, E, device=dev, generator=gm).topk(k, -1)
        gate = top.softmax(-1)
        dy = torch.randn(N, C, device=dev, generator=gm).bfloat16()
        with torch.no_grad():  # check against a loop over experts in float32
            want = torch.zeros(N, C, device=dev)
            for e in range(E):
                n, j = (idx == e).nonzero(as_tuple=True)
                xe = xs[n].float()
                he = F.silu(xe @ ws[0][e, :, :H].float()) * (xe @ ws[0][e, :, H:].float())
                want.index_add_(0, n, gate[n, j].unsqueeze(1) * (he @ ws[1][e].float()))
            err = rel_err(moe_dispatch(xs, idx, gate, *ws), want)
        flops = 18 * N * k * C * H                                      # 3 C x H products, forward + 2x backward

        def moe_step():
            moe_dispatch(xs, idx, gate, *ws).backward(dy)

        order = idx.reshape(-1).argsort()
        ends = torch.searchsorted(idx.reshape(-1)[order], torch.arange(E, device=dev), right=True).to(torch.int32)
        rows_in = xs.detach().repeat_interleave(k, 0)[order].requires_grad_()
        dyk = dy.repeat_interleave(k, 0)

        def grouped_only():
            g1, u = F.grouped_mm(rows_in, ws[0], offs=ends).chunk(2, dim=-1)
            F.grouped_mm(F.silu(g1) * u, ws[1], offs=ends).backward(dyk)

        for impl, fn in (("MoE layer: moe_dispatch", moe_step), ("MoE layer: its 2 F.grouped_mm alone", grouped_only)):
            ms = timed(fn)
            add(impl, "fwd+bwd", ms, flops=flops, check=f"rel err {err:.1e}" if fn is moe_step else "")
        del xs, ws, dy, rows_in, dyk, want
        torch.cuda.empty_cache()

    if "gen" in args.model_parts:
        bench_generate(args, build, add, g)
    return rows


def bench_generate(args, build, add, g):
    """bench_model's gen part (see there). build(attention, **config overrides) -> a fresh model in float32 (the same
    weights every call), add(...) records a row, g the generator of the random prompts."""
    import data
    from decoding import compiled_step
    from model import autocast
    dev = "cuda"
    T0, n_new, T_long = 512, 256, 32768
    prompt = torch.randint(0, data.EOT, (8, T0), device=dev, generator=g)
    long_prompt = torch.randint(0, data.EOT, (8, T_long), device=dev, generator=g)
    m32 = build("msa").eval()
    m16 = build("msa").eval().to(torch.bfloat16)  # inference weights: half the bytes a decode step reads

    def seconds(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    def run(m, p, weights, decode, compiled, eager_out=None):
        """One generation row; returns its tokens (None if it failed)."""
        impl = f"generate B={p.shape[0]}, {decode} decode, {'compiled' if compiled else 'eager'} step, {weights}"
        kw = dict(temperature=0, decode=decode, compile=compiled)
        try:
            torch._dynamo.reset()                                               # first_call_s holds its compile
            _, first = seconds(lambda: m.generate(p, n_new, **kw))
            _, t_prompt = seconds(lambda: m.generate(p, 0, **kw))
            out, t_all = seconds(lambda: m.generate(p, n_new, **kw))
        except Exception as e:                                                  # one row's failure keeps the rest
            add(impl, f"{n_new} tokens after {p.shape[1]}", note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            return None
        extra = {}
        if eager_out is not None:
            new, ref = out[:, p.shape[1]:], eager_out[:, p.shape[1]:]
            differ = (new != ref).any(0).nonzero()
            extra["same_tokens"] = f"{differ[0, 0].item() if len(differ) else n_new}/{n_new}"
        t_new = t_all - t_prompt
        add(impl, f"{n_new} tokens after {p.shape[1]}", t_new / n_new * 1e3, p.shape[0] * n_new / t_new,
            first_call_s=round(first, 1), **extra)
        return out

    every = args.gen_rows == "all"
    with torch.no_grad(), autocast("cuda"):
        for Bg in (1, 8):
            for decode in ("sparse", "dense") if every else ("sparse",):
                eager = run(m16, prompt[:Bg], "bf16 weights", decode, False)
                run(m16, prompt[:Bg], "bf16 weights", decode, True, eager_out=eager)
        for Bg in (1, 8) if every else ():                                      # the weights as trained
            run(m32, prompt[:Bg], "fp32 weights", "sparse", True)
        m8 = build("msa", index_fp8=True).eval().to(torch.bfloat16)             # the same weights, fp8 index keys
        for m, weights, decode in ((m16, "bf16 weights", "sparse"), (m8, "bf16 weights, fp8 index keys", "sparse"),
                                   (m16, "bf16 weights", "dense")):            # long prompt: attention matters
            eager = run(m, long_prompt, weights, decode, False)
            run(m, long_prompt, weights, decode, True, eager_out=eager)
        del long_prompt, m8
        torch.cuda.empty_cache()
        # GPU operations of one un-graphed decode step, batch 1 (gpu_ops: a warm-up call, then the profiled one)
        for decode in ("sparse", "dense") if every else ():
            for compiled in (False, True):
                torch._dynamo.reset()
                cache = m16.new_cache(T0 + n_new, decode)
                m16(prompt[:1], cache=cache)
                tok, pos = prompt[:1, -1:].clone(), torch.tensor([T0], device=dev)
                out = torch.zeros(1, T0 + n_new, dtype=torch.long, device=dev)
                step = compiled_step(m16.decode_step, "inductor") if compiled else m16.decode_step  # as generate()
                impl = f"decode step B=1, {decode} decode, {'compiled' if compiled else 'eager'}: GPU ops"
                try:
                    add(impl, "one step", kernels=gpu_ops(lambda: step(tok, pos, cache, out, None, 0, None)))
                except Exception as e:
                    add(impl, "one step", note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    del m16, m32
    torch._dynamo.reset()
    torch.cuda.empty_cache()


# paths: the KV-outer path against the query-tile path (msa_triton/tile.py) at the repository model's shape

def bench_paths(args):
    """At the model's shape (Hq=8, Hkv=2, D=Di=64, bs=64), B*T = 32K tokens, T in 1K, 4K, 16K (or --T), K in 4
    and 8, `random` and `indexer` selections: sparse_attention forward and forward+backward, kl_loss forward+backward
    given the attention's lse, and (indexer only) the MSA training step (index_topk + both), on the KV-outer
    path (attention.py, index.py) and on the tile path (tile.py), next to dense cuDNN forward+backward. Each
    configuration first checks the tile path against the KV-outer one (max abs diff of out and lse, kl)."""
    from msa_triton import attention as kv_attention, index as kv_index, tile   # each path by name, not the dispatch
    rows = []
    dev, dtype = "cuda", torch.bfloat16
    Hq, Hkv, D, Di, bs = 8, 2, 64, 64, 64

    def tiles(fn, rows, block_q):
        """fn run with the tile path's tile shape set to (rows, block_q) (a forward keeps its rows for its backward)."""
        def run(*a, **kw):
            old = tile.ROWS, tile.BLOCK_Q
            tile.ROWS, tile.BLOCK_Q = rows, block_q
            try:
                return fn(*a, **kw)
            finally:
                tile.ROWS, tile.BLOCK_Q = old
        return run
    paths = {"kv": (kv_attention.sparse_attention, kv_index.kl_loss),
             "tile": (tile.sparse_attention_tile, tile.kl_loss_tile),
             "tile ROWS=16": (tiles(tile.sparse_attention_tile, 16, 16), tiles(tile.kl_loss_tile, 16, 16))}
    for T in args.T or [1024, 4096, 16384]:
        B = max(1, 32768 // T)
        q, k, v = rand_qkv(B, Hq, Hkv, T, D, dtype, dev)
        dout = torch.randn_like(q)
        gen = torch.Generator(device=dev).manual_seed(3)
        qi = torch.randn(B, Hkv, T, Di, device=dev, dtype=dtype, generator=gen)
        ki = torch.randn(B, T, Di, device=dev, dtype=dtype, generator=gen)
        qiv, kiv = (x.detach().requires_grad_() for x in (qi, ki))

        def dense_step():
            qkv = [x.detach().requires_grad_() for x in (q, k, v)]
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=True)
            return torch.autograd.grad(o, qkv, dout)
        dense = timed(dense_step, rep_ms=100)
        rows.append(dict(shape="model", T=T, sel="-", impl=f"dense cuDNN B={B}", **{"pass": "fwd+bwd"}, ms=round(dense, 3),
                         vs_dense="1.00x"))
        for K in (4, 8):
            for sel in args.sel:
                block_idx = (random_block_idx(B, Hkv, T, bs, K, dev) if sel == "random"
                             else msa_triton.index_topk(qi, ki, bs, K))
                o_kv, l_kv = kv_attention.sparse_attention(q, k, v, block_idx, bs)
                kl_kv = kv_index.kl_loss(q, k, qi, ki, block_idx, bs, lse=l_kv)
                fin = l_kv.isfinite()
                chk = {}
                for name, (attn, kl) in list(paths.items())[1:]:
                    o_t, l_t = attn(q, k, v, block_idx, bs)
                    chk[name] = dict(out=(o_kv.float() - o_t.float()).abs().max().item(),
                                     lse=(l_kv[fin] - l_t[fin]).abs().max().item(),
                                     lse_inf_match=torch.equal(fin, l_t.isfinite()),
                                     kl=abs(kl(q, k, qi, ki, block_idx, bs, lse=l_kv).item() / kl_kv.item() - 1))
                    print(f"[check] paths T={T} K={K} {sel}: {name} vs kv " + ", ".join(
                        f"{a}={b:.2e}" if isinstance(b, float) else f"{a}={b}" for a, b in chk[name].items()), flush=True)
                base = dict(shape=f"model K={K}", T=T, sel=sel, check=chk)
                for name, (attn, kl) in paths.items():
                    def fwd():
                        return attn(q, k, v, block_idx, bs)

                    def fwdbwd():
                        qkv = [x.detach().requires_grad_() for x in (q, k, v)]
                        return torch.autograd.grad(attn(*qkv, block_idx, bs)[0], qkv, dout)

                    def kl_step():
                        return torch.autograd.grad(kl(q, k, qiv, kiv, block_idx, bs, lse=l_kv), [qiv, kiv])

                    def msa_step():
                        qkv = [x.detach().requires_grad_() for x in (q, k, v)]
                        idx = msa_triton.index_topk(qi, ki, bs, K)
                        o, lse = attn(*qkv, idx, bs)
                        loss = kl(q, k, qiv, kiv, idx, bs, lse=lse)
                        return torch.autograd.grad([o, loss], qkv + [qiv, kiv], [dout, torch.ones_like(loss)])
                    todo = [("sparse_attention", "fwd", fwd), ("sparse_attention", "fwd+bwd", fwdbwd),
                            ("kl_loss (given lse)", "fwd+bwd", kl_step)]
                    todo += [("MSA step (index_topk + attention + kl)", "fwd+bwd", msa_step)] if sel == "indexer" else []
                    for impl, pas, fn in todo:
                        ms = timed(fn, rep_ms=100)
                        rows.append(dict(base, impl=f"{impl} [{name}]", **{"pass": pas}, ms=round(ms, 3),
                                         vs_dense=f"{dense / ms:.2f}x" if pas == "fwd+bwd" and not impl.startswith("kl") else ""))
                del block_idx, o_kv, l_kv, o_t, l_t, kl_kv
        del q, k, v, dout, qi, ki, qiv, kiv
        torch.cuda.empty_cache()
    return rows


BENCHES = {"attn": bench_attn, "index": bench_index, "decode": bench_decode, "small": bench_small,
           "paths": bench_paths, "model": bench_model, "launches": bench_launches, "lists": bench_lists}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", nargs="+", default=["attn"], choices=sorted(BENCHES))
    p.add_argument("--shape", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    p.add_argument("--T", nargs="+", type=int, help="sequence lengths (default: each shape's list)")
    p.add_argument("--B", nargs="+", type=int, default=[1, 8, 32], help="decode: batch sizes")
    p.add_argument("--sel", nargs="+", default=["random", "indexer"], choices=["random", "indexer"])
    p.add_argument("--no-ref", action="store_true", help="skip timing msa_ref")
    p.add_argument("--model_parts", nargs="+", default=["train", "moe", "gen"], choices=["train", "moe", "gen"],
                   help="model: which parts run (gen: generation only)")
    p.add_argument("--train_batch", type=int, help="model train: rows of the micro-batch (default: the config's 32)")
    p.add_argument("--gen_rows", default="all", choices=["all", "bars"],
                   help="model gen: every row, or the bf16-weight sparse rows at B=1 and 8 and the 32K rows (the bars' rows)")
    p.add_argument("--compile_modes", nargs="+", default=["default", "reduce-overhead"],
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                   help="model train: the torch.compile modes timed after eager (reduce-overhead: CUDA graphs)")
    p.add_argument("--path", choices=["kv", "tile"],
                   help="small: every MSA call on this path (tile.FORCE; default: the rule, tile.use_tile)")
    p.add_argument("--json", help="write every row here")
    args = p.parse_args()
    if args.train_batch is not None and args.train_batch < 1:
        p.error(f"--train_batch must be >= 1, got {args.train_batch}")
    if not torch.cuda.is_available() and args.what != ["launches"]:
        raise SystemExit("bench.py needs a CUDA GPU (but --what launches, which also runs on a CPU: TRITON_INTERPRET=1)")
    t0 = time.time()
    rows = [r for w in args.what for r in BENCHES[w](args)]
    meta = dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)", torch=torch.__version__, triton=__import__("triton").__version__,
                seconds=round(time.time() - t0, 1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\n{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, bf16 (fp32 on a CPU), median ms (do_bench)")
    cols = ["shape", "T", "B", "K", "sel", "impl", "pass", "ms", "tflops", "GBps", "vs_dense", "mem_MiB",
            "msa_over_dense", "eager_over_graph", "launches", "triton", "torch_device", "torch_host", "torch_ms", "vs_torch"]
    more = ["tok_s", "mfu", "compile_s", "first_call_s", "same_tokens", "kernels", "check", "note"]  # --what model's
    print_table(rows, cols + [c for c in more if any(c in r for r in rows)])


if __name__ == "__main__":
    main()
