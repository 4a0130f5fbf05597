"""
Assignment 6's experiment: how do K (blocks per query) and the block size bs change a small MSA model's
loss, the recall of its indexer, and its training speed?

  OMP_NUM_THREADS=1 python experiment.py   # the grid below, a small model, on a CPU: six runs of 1-7 minutes
                                          # each on 2 cores (one thread is faster at this size)
  python experiment.py --quick             # a smoke test of the pipeline (a few steps per run): numbers mean nothing

Each run is train.py (config/train_cpu.py plus the overrides below), run inside this process (torch is
imported once), with its own out_dir under runs/. After it, the checkpoint is loaded and its indexer's
recall measured on validation batches (see indexer_recall). Writes results.json (one record per run), loss.svg, recall.svg and speed.svg.
"""
import argparse
import contextlib
import io
import json
import math
import os
import runpy
import sys
import time
import types

import numpy as np
import torch
import torch.nn.functional as F

import checkpoint
import data
import msa_checks
import msa_ref
from model import GPT, GPTConfig

HERE = os.path.dirname(os.path.abspath(__file__))
# a model small enough that a CPU trains it in a minute or two; the attention shape is what the grid varies
SMALL = dict(n_layer=3, n_head=4, n_kv_head=2, n_embd=64, index_dim=16, n_dense_layers=1, n_expert=4, expert_topk=2,
             expert_hidden=128, seq_len=256, batch_size=4, max_iters=80, lr_decay_iters=80, warmup_iters=8,
             kl_warmup_iters=10, eval_interval=80, eval_iters=4, eval_captions=0, eval_long_range=0, log_interval=10)
GRID = dict(K=(2, 4, 8), bs=(16, 32))
QUICK = dict(SMALL, n_layer=2, n_embd=32, index_dim=8, expert_hidden=32, seq_len=64, batch_size=2, max_iters=3,
             lr_decay_iters=3, warmup_iters=1, kl_warmup_iters=1, eval_interval=3, eval_iters=1, log_interval=1)
QUICK_GRID = dict(K=(2, 4), bs=(8, 16))


def indexer_recall(q, k, qi, ki, block_size, topk):
    """
    How many of the blocks that matter did the indexer find? For each (b, g, t):
      oracle  = the K-1 earlier blocks (c < t // bs) holding the most attention mass of the main branch,
                where the mass of a block is the sum over its tokens of softmax over ALL visible tokens of
                q_h . k_g / sqrt(D), averaged over the G heads h of group g (ties: the lower block index);
      chosen  = the non-local blocks of msa_ref.index_topk(qi, ki, block_size, topk).
    recall = (oracle blocks found in chosen) / (oracle blocks), counted over the queries whose local block
    l = t // bs satisfies l >= K (with fewer earlier blocks every block is chosen and recall means nothing).
    q (B, Hq, T, D), k (B, Hkv, T, D), qi (B, Hkv, T, Di), ki (B, T, Di) -> a float in [0, 1],
    nan when no query counts (T <= K * bs, or K = 1).
    """
    B, Hkv, T = msa_checks.check_inputs(q=q, k=k, qi=qi, ki=ki, block_size=block_size, topk=topk)
    pos = torch.arange(T, device=q.device)
    visible = msa_ref.support_mask(msa_ref.dense_block_idx(B, Hkv, T, block_size, q.device), block_size, pos, T)
    p = torch.softmax(msa_ref._grouped_scores(q, k, visible), -1).mean(2)     # (B, Hkv, T, T) dense teacher
    nb = math.ceil(T / block_size)
    mass = F.pad(p, (0, nb * block_size - T)).view(B, Hkv, T, nb, block_size).sum(-1)  # (B, Hkv, T, nb)
    far = topk - 1
    oracle = msa_ref.select_blocks(mass, pos, block_size, topk)[..., :far]    # (B, Hkv, T, K-1): l >= K fills them
    chosen = msa_ref.index_topk(qi, ki, block_size, topk)                      # (B, Hkv, T, K)
    hit = (oracle.unsqueeze(-1) == chosen.unsqueeze(-2)).any(-1)               # (B, Hkv, T, K-1)
    counted = pos // block_size >= topk                                        # (T,)
    return hit[:, :, counted].double().mean().item()                           # mean of nothing: nan


def layer_tensors(model, x, y, patches):
    """(q, k, qi, ki) of every MSA layer of model on one batch. model.py hands exactly these to
    backend.sparse_attention_kl (or backend.kl_loss in the dense-KL warm-up), so a backend that records them is all
    it takes (nothing of the model is copied)."""
    seen = []

    def kl_loss(q, k, qi, ki, block_idx, block_size, lse=None):
        seen.append((q, k, qi, ki))
        return msa_ref.kl_loss(q, k, qi, ki, block_idx, block_size)

    def sparse_attention_kl(q, k, v, qi, ki, block_idx, block_size):
        return (*msa_ref.sparse_attention(q, k, v, block_idx, block_size), kl_loss(q, k, qi, ki, block_idx, block_size))

    recorder = types.SimpleNamespace(index_topk=msa_ref.index_topk, sparse_attention=msa_ref.sparse_attention,
                                     kl_loss=kl_loss, sparse_attention_kl=sparse_attention_kl,
                                     sparse_decode=msa_ref.sparse_decode)
    for block in model.blocks:
        block.attn.backend = recorder
    with torch.no_grad():
        model(x, y, patches)
    return seen


def measure_recall(ckpt_path, n_batches=2, seed=0):
    """Mean indexer recall over the MSA layers on n_batches val batches, for the trained index branch and for
    a random one (the same q, k; qi, ki drawn at random): the chance level to compare with."""
    ckpt = checkpoint.load(ckpt_path)  # weights_only=True: the file is read as data, nothing in it runs
    cfg = GPTConfig(**ckpt["model_args"])
    model = GPT(cfg, backend="ref")
    model.load_state_dict(ckpt["model"])
    model.eval()
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    trained, chance = [], []
    for _ in range(n_batches):
        x, y, patches = data.get_batch("val", ckpt["config"]["batch_size"], ckpt["config"]["seq_len"], rng)
        for q, k, qi, ki in layer_tensors(model, x, y, patches):
            trained.append(indexer_recall(q, k, qi, ki, cfg.msa_block_size, cfg.msa_topk))
            chance.append(indexer_recall(q, k, torch.randn(qi.shape, generator=g), torch.randn(ki.shape, generator=g),
                                         cfg.msa_block_size, cfg.msa_topk))
    return float(np.mean(trained)), float(np.mean(chance))


def run(K, bs, settings, out_root):
    """Train one configuration with train.py and measure it. Returns its results record."""
    out_dir = os.path.join(out_root, f"K{K}_bs{bs}")
    args = [f"--{k}={v}" for k, v in dict(settings, msa_topk=K, msa_block_size=bs, out_dir=out_dir).items()]
    argv, sys.argv = sys.argv, ["train.py", os.path.join(HERE, "config", "train_cpu.py"), "--init_from=scratch", *args]
    t0, printed = time.time(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(os.path.join(HERE, "train.py"), run_name="__main__")
    except SystemExit as e:
        sys.exit(f"train.py stopped for K={K} bs={bs}: {e}\n{printed.getvalue()[-2000:]}")
    finally:
        sys.argv = argv
    seconds = time.time() - t0
    log = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    steps = [rec for rec in log if "iter" in rec]
    last_eval = [rec for rec in log if "eval" in rec][-1]
    recall, recall_random = measure_recall(os.path.join(out_dir, "ckpt.pt"))
    return dict(K=K, bs=bs, seq_len=settings["seq_len"], dense=K * bs >= settings["seq_len"], iters=steps[-1]["iter"],
                val_lm=last_eval["lm"], val_kl=last_eval["kl"], train_lm=steps[-1]["lm"],
                tok_s=float(np.median([rec["tok_s"] for rec in steps[1:] or steps])),  # the first interval warms up
                recall=recall, recall_random=recall_random, seconds=seconds)


def svg_plot(path, title, xlabel, ylabel, series):
    """A line plot as a small SVG file (no plotting library needed). series {label: [(x, y), ...]}."""
    W, H, L, R, T, Bm = 480, 320, 60, 110, 30, 45
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    sy = lambda y: H - Bm - (y - y0) / (y1 - y0) * (H - T - Bm)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<text x="{W / 2}" y="18" text-anchor="middle">{title}</text>',
           f'<line x1="{L}" y1="{H - Bm}" x2="{W - R}" y2="{H - Bm}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - Bm}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">{xlabel}</text>',
           f'<text x="14" y="{(T + H - Bm) / 2}" transform="rotate(-90 14 {(T + H - Bm) / 2})" text-anchor="middle">{ylabel}</text>']
    for x in sorted({p[0] for p in pts}):
        out.append(f'<text x="{sx(x):.1f}" y="{H - Bm + 15}" text-anchor="middle">{x:g}</text>')
    for y in (y0, (y0 + y1) / 2, y1):
        out.append(f'<text x="{L - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for i, (label, s) in enumerate(series.items()):
        colour = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")[i % 4]
        xy = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(s) if math.isfinite(y))
        out.append(f'<polyline points="{xy}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{W - R + 8}" y="{T + 16 * i + 10}" fill="{colour}">{label}</text>')
    with open(path, "w") as f:
        f.write("\n".join(out + ["</svg>"]) + "\n")


def main():
    p = argparse.ArgumentParser(description="Assignment 6: vary K and the block size, measure loss, recall, speed.")
    p.add_argument("--quick", action="store_true", help="a few steps per run, to check the pipeline")
    p.add_argument("--out", default=HERE, help="where results.json and the plots go (runs/ beside them)")
    args = p.parse_args()
    settings, grid = (QUICK, QUICK_GRID) if args.quick else (SMALL, GRID)
    results = []
    for bs in grid["bs"]:
        for K in grid["K"]:
            rec = run(K, bs, settings, os.path.join(args.out, "runs"))
            results.append(rec)
            print(f"K={K:2d} bs={bs:3d}{' (dense)' if rec['dense'] else '        '} val lm {rec['val_lm']:.3f} | "
                  f"recall {rec['recall']:.3f} (random {rec['recall_random']:.3f}) | {rec['tok_s']:,.0f} tok/s | "
                  f"{rec['seconds']:.0f} s", flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(quick=args.quick, settings=settings, runs=results), f, indent=1)
    for name, key, label in (("loss", "val_lm", "val LM loss"), ("recall", "recall", "indexer recall"),
                             ("speed", "tok_s", "training tokens/s")):
        series = {f"bs={bs}": [(r["K"], r[key]) for r in results if r["bs"] == bs] for bs in grid["bs"]}
        if key == "recall":
            series.update({f"random, bs={bs}": [(r["K"], r["recall_random"]) for r in results if r["bs"] == bs]
                           for bs in grid["bs"]})
        svg_plot(os.path.join(args.out, f"{name}.svg"), f"{label} vs K (T={settings['seq_len']})", "K", label, series)
    print(f"wrote results.json, loss.svg, recall.svg, speed.svg in {args.out}")


if __name__ == "__main__":
    main()
