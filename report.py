"""
Plots of a long-context run (issue 7), from what train.py leaves in its out_dir (log.jsonl, ckpt.pt).

  python report.py curves OUT_MSA OUT_DENSE --png=assets/long_curves.png
      val LM loss of both arms, training tokens/s of both, and the MSA arm's indexer recall and KL per layer over
      training; prints a markdown table of the last evaluation of each arm.
  python report.py heatmap --out_dir=OUT_MSA --png=assets/long_heatmap.png
      loads the checkpoint and one real val sequence; for each MSA layer (rows) and KV group (columns) an image
      of query block x key block = the fraction of that query block's tokens that selected the key block.

Settings use the configurator of train.py (--key=value); the positional words are the mode and the run folders.
"""
import json
import os
import sys

import numpy as np
import torch

import data
from configurator import configure

# -----------------------------------------------------------------------------------------------
out_dir = "out-long"     # heatmap: the run whose checkpoint is read
png = ""                 # the picture to write ('' = report_<mode>.png in the current folder)
seed = 0                 # heatmap: which val sequence (a get_batch row drawn from default_rng([HEATMAP_STREAM, seed]))
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
    ckpt = torch.load(path, map_location=device, weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["config"]


@torch.no_grad()
def selection_maps(model, x, patches):
    """x (1, T) tokens, patches (1, T, PATCH_DIM) -> {layer index: (Hkv, nb, nb) float array}, one per MSA layer:
    [g, i, j] = fraction of the tokens of query block i whose selection (group g) holds key block j.
    The selection is recomputed from each MSA layer's real input: a forward hook keeps (x, pos) of block.attn,
    Attention.index_branch turns it into qi, ki and backend.index_topk picks the blocks, as the forward did."""
    cfg = model.cfg
    bs, K, T = cfg.msa_block_size, cfg.msa_topk, x.shape[1]
    nb = -(-T // bs)
    inputs, hooks = {}, []
    for i, block in enumerate(model.blocks):
        if block.attn.sparse:
            hooks.append(block.attn.register_forward_hook(
                lambda mod, args, out, i=i: inputs.__setitem__(i, (args[0], args[1]))))
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else torch.autocast("cpu", enabled=False)
    try:
        with ctx:
            model(x, patches=patches)
    finally:
        for h in hooks:
            h.remove()
    maps = {}
    for i, (h, pos) in inputs.items():
        with ctx:
            qi, ki = model.blocks[i].attn.index_branch(h, pos)                       # (1, Hkv, T, Di), (1, T, Di)
        idx = model.backend.index_topk(qi, ki, bs, K)[0].long()                      # (Hkv, T, K), -1 padded
        Hkv = idx.shape[0]
        qblock = (torch.arange(T, device=idx.device) // bs).view(1, T, 1).expand_as(idx)  # (Hkv, T, K)
        flat = (torch.arange(Hkv, device=idx.device).view(Hkv, 1, 1) * nb + qblock) * nb + idx
        counts = torch.bincount(flat[idx >= 0], minlength=Hkv * nb * nb).view(Hkv, nb, nb).float()
        tokens = torch.bincount(torch.arange(T, device=idx.device) // bs, minlength=nb).float()  # (nb,)
        maps[i] = (counts / tokens.view(1, nb, 1)).cpu().numpy()
    return maps


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
    model, cfg = load_model(run_dir)
    if not any(b.attn.sparse for b in model.blocks):
        raise ValueError(f"the model in {run_dir} has no MSA layer (attention={cfg['attention']!r})")
    rng = np.random.default_rng([HEATMAP_STREAM, seed])
    x, _, patches = data.get_batch("val", 1, cfg["seq_len"], rng, device, cfg["p_image"])
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
    fig.suptitle(f"blocks selected by the trained indexer: one val sequence of {x.shape[1]} tokens, "
                 f"bs={model.cfg.msa_block_size}, K={model.cfg.msa_topk}" + (f"; a pixel = max over {f} x {f} blocks" if f > 1 else ""))
    fig.savefig(path, dpi=90)
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
        else:
            raise SystemExit(f"usage: python report.py curves OUT_MSA OUT_DENSE [--png=...] | "
                             f"python report.py heatmap [--out_dir=...] [--png=...]; got {argv}")
    except ValueError as e:
        raise SystemExit(f"report error: {e}")
    print(f"wrote {png or f'report_{mode}.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
