"""
Plots of a long-context run, from what train.py leaves in its out_dir (log.jsonl, ckpt.pt).

  python report.py curves OUT_MSA OUT_DENSE --png=assets/long_curves.png
      val LM loss of both arms, training tokens/s of both, and the MSA arm's indexer recall and KL per layer over
      training; prints a markdown table of the last evaluation of each arm.
  python report.py heatmap --out_dir=OUT_MSA --png=assets/long_heatmap.png
      loads the checkpoint and one real val sequence; for each MSA layer (rows) and KV group (columns) an image
      of query block x key block = the fraction of that query block's tokens that selected the key block.
  python report.py recall --out_dir=OUT_MSA [--n_queries=2048]
      on the same sequence, per MSA layer: the indexer's recall next to the best recall any K blocks could reach
      (the dense teacher's K heaviest blocks), which tells a weak indexer from a teacher that spreads its attention.

Settings use the configurator of train.py (--key=value); the positional words are the mode and the run folders.
"""
import json
import os
import sys

import numpy as np
import torch

import checkpoint
import data
import recall_eval
from configurator import configure
from recall_eval import msa_layer_inputs

# -----------------------------------------------------------------------------------------------
out_dir = "out-long"     # heatmap: the run whose checkpoint is read
png = ""                 # the picture to write ('' = report_<mode>.png in the current folder)
seed = 0                 # heatmap, recall: which val sequence (a get_batch row from default_rng([HEATMAP_STREAM, seed]))
n_queries = 2048         # recall: positions of that sequence, spread evenly
device = "cuda" if torch.cuda.is_available() else "cpu"
# -----------------------------------------------------------------------------------------------
HEATMAP_STREAM = 0x4EA7


def read_log(run_dir):
    """log.jsonl of a train.py run -> (training records, eval records), each a list of dicts."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: expected the out_dir of a train.py run")
    recs = [json.loads(line) for line in open(path)]
    return [r for r in recs if "iter" in r], [r for r in recs if "eval" in r]


def summary(runs):
    """{name: run_dir} -> markdown table of each run's last evaluation and its median training tokens/s
    (the first logged window is left out: it holds the kernels' compilation)."""
    lines = ["| run | iterations | val LM | KL (sum) | recall per layer | tokens/s (median) | MFU (median) | "
             "caption all four | long-range |", "|---" * 9 + "|"]
    for name, run_dir in runs.items():
        train, evals = read_log(run_dir)
        last = evals[-1]
        steady = train[1:] or train
        recall = " ".join(f"{v:.3f}" for v in last.get("recall_layers", [])) or "-"
        lines.append(f"| {name} | {last['eval']} | {last['lm']:.4f} | {last['kl']:.4f} | {recall} | "
                     f"{np.median([r['tok_s'] for r in steady]):,.0f} | "
                     f"{100 * np.median([r.get('mfu', np.nan) for r in steady]):.1f}% | "
                     f"{last['caption'].get('all', float('nan')):.2f} | {last['long_range']} |")
    return "\n".join(lines)


def plot_curves(msa_dir, dense_dir, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {"msa": read_log(msa_dir), "dense": read_log(dense_dir)}
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    for name, (train, evals) in runs.items():
        ax[0, 0].plot([r["eval"] for r in evals], [r["lm"] for r in evals], "o-", label=name)
        ax[0, 1].plot([r["iter"] for r in train], [r["tok_s"] for r in train], label=name)
    ax[0, 0].set(title="val LM loss", xlabel="iteration")
    ax[0, 1].set(title="training tokens/s", xlabel="iteration", ylim=(0, None))
    _, evals = runs["msa"]
    its = [r["eval"] for r in evals]
    for key, a, title in (("recall_layers", ax[1, 0], "MSA indexer recall per layer (teacher mass in chosen blocks)"),
                          ("kl_layers", ax[1, 1], "MSA KL per layer")):
        per_layer = np.array([r[key] for r in evals if key in r])  # (evals, n_msa)
        for i in range(per_layer.shape[1] if per_layer.ndim == 2 else 0):
            a.plot(its[-len(per_layer):], per_layer[:, i], "o-", label=f"MSA layer {i}")
        a.set(title=title, xlabel="iteration")
    ax[1, 0].set_ylim(0, 1)
    for a in ax.flat:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def load_model(run_dir):
    """The checkpoint of a train.py run -> (GPT in eval mode on `device`, its config dict)."""
    from model import GPT, GPTConfig
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: expected the out_dir of a train.py run")
    ckpt = checkpoint.load(path, device)  # a CheckpointError is a ValueError: main() prints its one line
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


_autocast = recall_eval.autocast  # bf16 on CUDA, as train.py runs the model


@torch.no_grad()
def selection_maps(model, x, patches):
    """x (1, T) tokens, patches (1, T, PATCH_DIM) -> {layer index: (Hkv, nb, nb) float array}, one per MSA layer:
    [g, i, j] = fraction of the tokens of query block i whose selection (group g) holds key block j.
    The selection is recomputed from each MSA layer's real input (recall_eval.msa_layer_inputs: forward hooks) by
    the layer's own Attention._sparse (recall_eval.selection_at), as the forward did."""
    cfg = model.cfg
    bs, T = cfg.msa_block_size, x.shape[1]
    nb = -(-T // bs)
    at = torch.arange(T, device=x.device).unsqueeze(0)                              # (1, T) every position
    maps = {}
    for i, idx in recall_eval.selection_at(model, msa_layer_inputs(model, x, patches), at).items():
        idx = idx[0]                                                                 # (Hkv, T, K), -1 padded
        Hkv = idx.shape[0]
        qblock = (torch.arange(T, device=idx.device) // bs).view(1, T, 1).expand_as(idx)  # (Hkv, T, K)
        flat = (torch.arange(Hkv, device=idx.device).view(Hkv, 1, 1) * nb + qblock) * nb + idx
        counts = torch.bincount(flat[idx >= 0], minlength=Hkv * nb * nb).view(Hkv, nb, nb).float()
        tokens = torch.bincount(torch.arange(T, device=idx.device) // bs, minlength=nb).float()  # (nb,)
        maps[i] = (counts / tokens.view(1, nb, 1)).cpu().numpy()
    return maps


@torch.no_grad()
def recall_vs_best(model, x, patches, n_queries, chunk=256):
    """Is a low indexer recall the indexer's fault? For n_queries positions spread evenly over x (1, T), per MSA
    layer: the dense teacher's attention mass (recall_eval.teacher_block_mass: the mean over a group's G heads of
    each head's softmax over every visible key) inside (a) the K blocks the forward chose: the recall train.py
    logs, and (b) the K blocks that hold the most of it, the local block forced as for the indexer: the most any
    selection of K blocks can reach. Returns {layer index: (indexer recall, best recall)}, each a mean over groups
    and positions."""
    cfg = model.cfg
    bs, K, T = cfg.msa_block_size, cfg.msa_topk, x.shape[1]
    nb = -(-T // bs)
    ts = torch.linspace(0, T - 1, min(n_queries, T), device=x.device).round().long().unique()  # (n,) positions
    inputs = msa_layer_inputs(model, x, patches)
    at = ts.unsqueeze(0)                                                             # (1, n)
    sel, mass = recall_eval.selection_at(model, inputs, at), recall_eval.teacher_block_mass(model, inputs, at, chunk)
    out = {}
    for i in inputs:
        m, idx = mass[i][0], sel[i][0]                                               # (Hkv, n, nb), (Hkv, n, K)
        got = m.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, 0).sum(-1)         # (Hkv, n)
        local = (ts // bs).view(1, -1, 1).expand(m.shape[0], -1, 1)                  # (Hkv, n, 1)
        rest = m.scatter(-1, local, 0.0).topk(min(K - 1, nb), -1).values.sum(-1)     # future blocks hold 0
        out[i] = (got.mean().item(), (m.gather(-1, local).squeeze(-1) + rest).mean().item())
    return out


def msa_model_and_row(run_dir):
    """The run's model, which must have an MSA layer, its config, and the val row the heatmap and the recall table
    read: (model, cfg, x (1, T), patches (1, T, PATCH_DIM)), the row drawn from default_rng([HEATMAP_STREAM, seed])."""
    model, cfg = load_model(run_dir)
    if not any(b.attn.sparse for b in model.blocks):
        raise ValueError(f"the model in {run_dir} has no MSA layer (attention={cfg['attention']!r})")
    rng = np.random.default_rng([HEATMAP_STREAM, seed])
    x, _, patches = data.get_batch("val", 1, cfg["seq_len"], rng, device, cfg["p_image"])
    return model, cfg, x, patches


def recall_table(run_dir, n):
    """The table of recall_vs_best for one val row of the run's length (the heatmap's row)."""
    model, cfg, x, patches = msa_model_and_row(run_dir)
    res = recall_vs_best(model, x, patches, n)
    lines = [f"indexer recall vs the best possible, K={cfg['msa_topk']} blocks of {cfg['msa_block_size']}, "
             f"{min(n, x.shape[1])} positions of one val row of {x.shape[1]} tokens",
             "| layer | indexer recall | best K blocks | indexer / best |", "|---|---|---|---|"]
    lines += [f"| {i} | {got:.3f} | {best:.3f} | {got / best:.2f} |" for i, (got, best) in res.items()]
    return "\n".join(lines)


HEATMAP_PIXELS = 256  # at most this many cells per side of a panel (a 4-inch panel shows about 360 pixels)


def max_pool(m, f):
    """(n, n) -> (ceil(n / f),) * 2: the max over each f x f square, so one-block stripes survive the shrinking."""
    n = m.shape[0]
    p = -(-n // f) * f
    m = np.pad(m, ((0, p - n), (0, p - n)))
    return m.reshape(p // f, f, p // f, f).max(axis=(1, 3))


def plot_heatmap(run_dir, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    model, cfg, x, patches = msa_model_and_row(run_dir)
    maps = selection_maps(model, x, patches)
    layers, Hkv = sorted(maps), model.cfg.n_kv_head
    nb = maps[layers[0]].shape[-1]
    f = -(-nb // HEATMAP_PIXELS)                     # blocks per pixel side: a 128K row has 1024 blocks of 128
    fig, ax = plt.subplots(len(layers), Hkv, figsize=(4 * Hkv, 4 * len(layers)), squeeze=False)
    for r, i in enumerate(layers):
        for g in range(Hkv):
            im = ax[r, g].imshow(max_pool(maps[i][g], f), cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1),
                                 interpolation="nearest", extent=(0, nb, nb, 0))
            ax[r, g].set(title=f"layer {i}, group {g}", xlabel="key block", ylabel="query block")
    fig.colorbar(im, ax=ax, shrink=0.6, label="fraction of the query block's tokens selecting it (sqrt scale)")
    fig.suptitle(f"blocks selected by the trained indexer\none val sequence of {x.shape[1]} tokens, "
                 f"bs={model.cfg.msa_block_size}, K={model.cfg.msa_topk}" + (f"; a cell = max over {f} x {f} blocks" if f > 1 else ""))
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return maps


def main(argv):
    words = [a for a in argv if not a.startswith("--")]
    configure(globals(), [a for a in argv if a.startswith("--")])
    mode = words[0] if words else None
    try:
        if mode == "curves" and len(words) == 3:
            plot_curves(words[1], words[2], png or "report_curves.png")
            print(summary({"msa": words[1], "dense": words[2]}))
        elif mode == "heatmap" and len(words) == 1:
            plot_heatmap(out_dir, png or "report_heatmap.png")
        elif mode == "recall" and len(words) == 1:
            print(recall_table(out_dir, n_queries))
            return
        else:
            raise SystemExit(f"usage: python report.py curves OUT_MSA OUT_DENSE [--png=...] | "
                             f"python report.py heatmap [--out_dir=...] [--png=...] | "
                             f"python report.py recall [--out_dir=...] [--n_queries=...]; got {argv}")
    except ValueError as e:
        raise SystemExit(f"report error: {e}")
    print(f"wrote {png or f'report_{mode}.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
