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

Retrieval (recall_eval.py), each recomputed from the runs' checkpoints on held-out rows of the val split:
  python report.py mqar OUT_DENSE OUT_MSA OUT_LOCAL OUT_RANDOM --png=assets/mqar.png
      recall accuracy against the distance from fact to question for every arm in one plot, and the MSA arms'
      needle recall per layer (are the fact's blocks among those read?), and the recall through training from the
      runs' own evaluations (eval_mqar; the warm-up rows' accuracy where logged); prints a markdown table with the
      val LM loss of each run's last evaluation.
  python report.py needle --out_dir=OUT_MSA --png=assets/needle.png [--question=-1]
      one question: per MSA layer and group, the blocks read for its answer token over the teacher's attention,
      the fact's block and the local block marked; prints the same as text.
  python report.py niah OUT_DENSE OUT_MSA --png=assets/niah.png [--niah_scales=0.25,0.5,1,2,4]
      one fact at depth 0, 0.1, ..., 0.9 of rows of 1/4 to 4x the training length: accuracy per cell, and the
      forward's tokens/s per length; a heatmap per arm and a markdown table.

Settings use the configurator of train.py (--key=value); the positional words are the mode and the run folders.
"""
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
seed = 0                 # heatmap, recall: which val sequence (a get_batch row from default_rng([_HEATMAP_STREAM, seed]));
                         # mqar, needle, niah: the seed of the held-out rows (data.mqar_eval_set, data.niah_eval_set)
n_queries = 2048         # recall: positions of that sequence, spread evenly
mqar_questions = 4096    # mqar: held-out questions per arm, in rows of the run's seq_len (one per 32 tokens)
question = -1            # needle: which question of the held-out row (-1: the one farthest from its fact)
niah_rows = 4            # niah: rows per (length, depth) cell
niah_scales = None       # niah: the lengths in multiples of the run's seq_len (None: 0.25,0.5,1,2,4), e.g. --niah_scales=1,4
max_tokens = 65536       # mqar, niah: tokens per forward (rows of one length batched up to this, one row at least)
device = "cuda" if torch.cuda.is_available() else "cpu"
# -----------------------------------------------------------------------------------------------
_HEATMAP_STREAM = 0x4EA7


def read_log(run_dir):
    """log.jsonl of a train.py run -> (training records, eval records), each a list of dicts."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: expected the out_dir of a train.py run")
    recs, _ = checkpoint.read_log(path)                                         # a ValueError names a bad line
    return [r for r in recs if "iter" in r], [r for r in recs if "eval" in r]


def summary(runs):
    """{name: run_dir} -> markdown table of each run's last evaluation and its median training tokens/s
    (the first logged window is left out: it holds the kernels' compilation)."""
    lines = ["| run | iterations | val LM | KL (sum) | recall per layer | tokens/s (median) | MFU (median) | "
             "caption all four | long-range |", "|---" * 9 + "|"]
    for name, run_dir in runs.items():
        train, evals = read_log(run_dir)
        if not (train and evals):
            raise ValueError(f"{run_dir}/log.jsonl holds no {'evaluation' if train else 'training record'} yet: "
                             f"expected a run that reached its first evaluation")
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
    """The checkpoint of a train.py run -> (GPT in eval mode on `device`, its config dict plus iter_num: the
    iteration its weights are from, which is later than the last evaluation when the run was interrupted)."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: expected the out_dir of a train.py run")
    model, ckpt = checkpoint.load_model(path, device)  # a ValueError: main() prints its one line
    return model, dict(ckpt["config"], iter_num=ckpt["iter_num"])


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
    read: (model, cfg, x (1, T), patches (1, T, PATCH_DIM)), the row drawn from default_rng([_HEATMAP_STREAM, seed])."""
    model, cfg = load_model(run_dir)
    if not any(b.attn.sparse for b in model.blocks):
        raise ValueError(f"the model in {run_dir} has no MSA layer (attention={cfg['attention']!r})")
    rng = np.random.default_rng([_HEATMAP_STREAM, seed])
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


_HEATMAP_PIXELS = 256  # at most this many cells per side of a panel (a 4-inch panel shows about 360 pixels)


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
    f = -(-nb // _HEATMAP_PIXELS)                     # blocks per pixel side: a 128K row has 1024 blocks of 128
    fig, ax = plt.subplots(len(layers), Hkv, figsize=(4 * Hkv, 4 * len(layers)), squeeze=False)
    for r, i in enumerate(layers):
        for g in range(Hkv):
            im = ax[r, g].imshow(max_pool(maps[i][g], f), cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1),
                                 interpolation="nearest", extent=(0, nb, nb, 0))
            ax[r, g].set(title=f"layer {i}, group {g}", xlabel="key block", ylabel="query block")
    fig.colorbar(im, ax=ax, shrink=0.6, label="fraction of the query block's tokens selecting it (sqrt scale)")
    rule = "the trained indexer" if model.cfg.msa_select == "indexer" else f"the blind rule '{model.cfg.msa_select}'"
    fig.suptitle(f"blocks selected by {rule}\none val sequence of {x.shape[1]} tokens, "
                 f"bs={model.cfg.msa_block_size}, K={model.cfg.msa_topk}" + (f"; a cell = max over {f} x {f} blocks" if f > 1 else ""))
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return maps


# -----------------------------------------------------------------------------------------------
# retrieval: multi-query associative recall across arms, one question read closely, the needle grid
def arm_name(cfg):
    """A run's arm, from its config: 'dense', or 'msa <selection rule>'."""
    return "dense" if cfg.get("attention") == "dense" else f"msa {cfg.get('msa_select', 'indexer')}"


def named(results):
    """Arms that share a name get their folder's name added."""
    names = [r[0] for r in results]
    return [[f"{n} ({os.path.basename(os.path.normpath(r[1]))})" if names.count(n) > 1 else n] + r[1:]
            for n, r in zip(names, results)]


def long_row_tok_s(train, cfg):
    """A run's median training tokens/s in rows of seq_len (after its short-row stages; the first window there left
    out when there are more: it holds the compilation of the new shapes), or None if it logged none."""
    start = cfg.get("repeat_iters", 0) + cfg.get("short_iters", 0)
    windows = [rec["tok_s"] for rec in train if rec["iter"] > start]
    return float(np.median(windows[1:] or windows)) if windows else None


def mqar_results(run_dirs):
    """-> [[arm, run_dir, last eval record of its log, recall_eval.summarize dict, every eval record, training
    tokens/s in rows of seq_len]]: recall scored afresh from each run's checkpoint on mqar_questions held-out
    questions in rows of its seq_len."""
    out = []
    for d in run_dirs:
        train, evals = read_log(d)
        if not evals:
            raise ValueError(f"{os.path.join(d, 'log.jsonl')} holds no evaluation: expected a train.py run that "
                             f"evaluated at least once")
        model, cfg = load_model(d)
        n = cfg["seq_len"]
        rows = -(-mqar_questions // max(1, n // data.MQAR_EVERY))
        res = dict(recall_eval.mqar_eval(model, rows, n, seed, batch_size=max(1, max_tokens // n)), iter_num=cfg["iter_num"])
        out.append([arm_name(cfg), d, evals[-1], res, evals, long_row_tok_s(train, cfg)])
    return named(out)


def mqar_table(results):
    """Markdown: per arm, the checkpoint's iteration, the val LM loss of the last evaluation, the training tokens/s in
    rows of seq_len, recall accuracy overall and per distance bin (share of the row), and per MSA layer the needle
    recall and the teacher's mass on the needle's block (means over groups), the share of questions whose fact's
    block some group reads, and the accuracy on those and on the rest."""
    first = results[0][3]
    n = first["bin_edges"][-1]
    bins = [f"{100 * lo / n:.0f}-{100 * hi / n:.0f}%" for lo, hi in zip(first["bin_edges"], first["bin_edges"][1:])]
    per_layer = lambda v: " ".join(f"{np.mean(g):.2f}" for g in v) or "-"
    lines = ["recall (MQAR) on held-out rows, accuracy by distance from fact to question (share of the row)",
             "| arm | run | iterations | val LM | training tokens/s | accuracy | " + " | ".join(bins) +
             " | needle recall per MSA layer | teacher mass on the needle per MSA layer | read by some group | "
             "accuracy when read / not read |",
             "|---" * (10 + len(bins)) + "|"]
    for name, d, last, r, _, tok_s in results:
        accs = " | ".join(map(recall_eval.fmt, r["acc_bins"]))
        split = " ".join(f"{recall_eval.fmt(a)} / {recall_eval.fmt(b)}"
                         for a, b in zip(r["acc_read"], r["acc_missed"])) or "-"
        lines.append(f"| {name} | {d} | {r['iter_num']} | {last['lm']:.4f} | {'-' if tok_s is None else f'{tok_s:,.0f}'} | "
                     f"{r['acc']:.3f} | {accs} | "
                     f"{per_layer(r['needle_recall'])} | {per_layer(r['needle_mass'])} | "
                     f"{' '.join(f'{v:.2f}' for v in r['needle_any']) or '-'} | {split} |")
    lines.append(f"| questions | | | | | {first['questions']} | " + " | ".join(map(str, first["count_bins"])) +
                 " | | | | |")
    return "\n".join(lines)


def through_training(evals):
    """A run's eval records -> (iterations, held-out recall accuracy) where it evaluated recall (eval_mqar), and
    (iterations, warm-up rows' accuracy) where it evaluated those (eval_repeat): the lookup forming."""
    pick = lambda key, f: ([e["eval"] for e in evals if key in e], [f(e[key]) for e in evals if key in e])
    return pick("mqar", lambda m: m["acc"]), pick("repeat", float)


def plot_mqar(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(19, 4.8))
    for c, (name, _, _, r, evals, _) in enumerate(results):
        (it_r, acc_r), (it_w, warm) = through_training(evals)
        ax[2].plot(it_r, acc_r, "o-", color=f"C{c}", label=f"{name}: recall")
        if it_w:
            ax[2].plot(it_w, warm, "x:", color=f"C{c}", label=f"{name}: warm-up rows")
        edges = np.array(r["bin_edges"])
        mid = (edges[:-1] + edges[1:]) / 2                                     # bin centres, in tokens
        acc = [np.nan if a is None else a for a in r["acc_bins"]]
        ax[0].plot(mid, acc, "o-", color=f"C{c}", label=f"{name} ({r['acc']:.2f})")
        for l, layer in enumerate(r["layers"]):
            rec = [np.nan if v is None else v[l] for v in r["needle_recall_bins"]]
            ax[1].plot(mid, rec, ["o-", "s--", "^-.", "v:"][l % 4], color=f"C{c}", label=f"{name}, layer {layer}")
    ax[0].set(title="recall accuracy (exact answer, teacher forcing)", ylabel="accuracy")
    ax[1].set(title="needle recall: the fact's block among those read\n(mean over KV groups)", ylabel="needle recall")
    ax[2].set(title="through training (the runs' own evaluations)", xlabel="iteration", ylabel="accuracy")
    lengths = [(e["eval"], int(e["mqar"]["bin_edges"][-1])) for e in results[0][4] if "mqar" in e]
    changes = [(it, n) for (it, n), before in zip(lengths, [None] + [n for _, n in lengths]) if n != before]
    for it, _ in changes:                                                      # the rows' length changes here
        ax[2].axvline(it, color="0.85", lw=0.8, zorder=0)
    top = ax[2].secondary_xaxis("top")
    top.set_xticks([it for it, _ in changes], labels=[f"{n:,}" for _, n in changes], fontsize=7)
    top.set_xlabel("evaluated in rows of (tokens)", fontsize=8)
    for a in ax[:2]:
        a.set(xlabel="distance from fact to question (tokens)")
    for a, where in zip(ax, ("best", "best", "center left")):
        a.set(ylim=(-0.02, 1.02))
        a.grid(alpha=0.3)
        a.legend(fontsize=7, loc=where)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_needle(run_dir, path):
    """One held-out question (data.mqar_eval_set(1, seq_len, seed), recall_eval.pick_question): for each MSA layer
    a panel of groups x key blocks coloured by the teacher's attention of the answer token, its chosen blocks
    boxed, the fact's block and the local block marked. Returns recall_eval.explain's dict."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm
    model, cfg = load_model(run_dir)
    if not any(b.attn.sparse for b in model.blocks):
        raise ValueError(f"the model in {run_dir} has no MSA layer (attention={cfg['attention']!r})")
    (row, tasks), = data.mqar_eval_set(1, cfg["seq_len"], seed)
    e = recall_eval.explain(model, row, recall_eval.pick_question(tasks, question))
    for line in recall_eval.explain_lines(e, model.cfg.msa_select):
        print(line)
    layers, Hkv, nb = sorted(e["blocks"]), model.cfg.n_kv_head, e["local"] + 1
    fig, ax = plt.subplots(len(layers), 1, figsize=(min(16, 8 + nb * 0.08), 1.2 + (0.4 + 0.4 * Hkv) * len(layers)),
                           squeeze=False, layout="constrained")
    for r, i in enumerate(layers):
        a = ax[r, 0]
        im = a.imshow(e["mass"][i], aspect="auto", cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1),
                      interpolation="nearest", extent=(-0.5, nb - 0.5, Hkv - 0.5, -0.5))
        for g, bl in enumerate(e["blocks"][i]):
            a.scatter(bl, [g] * len(bl), marker="s", s=40, facecolors="none", edgecolors="cyan", linewidths=1.2,
                      label="read" if g == 0 else None)
        a.axvline(e["needle"], color="lime", ls="--", lw=1.2, label="fact's block")
        a.axvline(e["local"], color="white", ls=":", lw=1.2, label="local block")
        a.set(ylabel=f"layer {i}\ngroup", yticks=range(Hkv))
    ax[-1, 0].set_xlabel("key block")
    ax[0, 0].legend(fontsize=7, loc="upper left", framealpha=0.6)
    fig.colorbar(im, ax=ax, shrink=0.8, label="teacher's attention (sqrt scale)")
    word = lambda t: repr(data.decode([t]))
    fig.suptitle(f"{arm_name(cfg)}: question {word(int(row[e['q']]))} -> truth {word(e['answer'])}, model "
                 f"{word(e['pred'])}\n{e['q'] - e['f']} tokens after its fact; blocks of {model.cfg.msa_block_size}, "
                 f"K={model.cfg.msa_topk} read per query", fontsize=10)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return e


def niah_lengths(seq_len):
    scales = recall_eval.NIAH_SCALES if niah_scales is None else niah_scales
    scales = scales if isinstance(scales, tuple) else (scales,)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in scales):
        raise ValueError(f"niah_scales must be positive numbers (multiples of the run's seq_len), got {niah_scales!r}")
    return [int(round(v * seq_len)) for v in scales]


def niah_results(run_dirs):
    """-> [[arm, run_dir, recall_eval.niah_grid dict]] over niah_lengths of each run's seq_len."""
    out = []
    for d in run_dirs:
        model, cfg = load_model(d)
        out.append([arm_name(cfg), d, recall_eval.niah_grid(model, niah_lengths(cfg["seq_len"]), n_rows=niah_rows,
                                                            seed=seed, max_tokens=max_tokens)])
    return named(out)


def niah_table(results):
    lines = []
    for name, d, g in results:
        lines += [f"needle in a haystack, {name} ({d}): accuracy per context length (rows) and depth of the fact "
                  f"(columns), {niah_rows} rows a cell",
                  "| tokens | " + " | ".join(f"{v:.1f}" for v in g["depths"]) + " | needle recall | forward tokens/s |",
                  "|---" * (len(g["depths"]) + 3) + "|"]
        for n, acc, rec, tok_s in zip(g["lengths"], g["acc"], g["needle_recall"], g["tok_s"]):
            lines.append(f"| {n:,} | " + " | ".join(f"{a:.2f}" for a in acc) +
                         f" | {'-' if rec is None else f'{np.mean(rec):.2f}'} | {tok_s:,.0f} |")
        lines.append("")
    return "\n".join(lines)


def plot_niah(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, len(results), figsize=(6.5 * len(results), 1.5 + 0.45 * len(results[0][2]["lengths"])),
                           squeeze=False, layout="constrained")
    for a, (name, _, g) in zip(ax[0], results):
        acc = np.array(g["acc"])                                               # (lengths, depths)
        im = a.imshow(acc, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for (r, c), v in np.ndenumerate(acc):
            a.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        a.set(title=name, xlabel="depth of the fact", xticks=range(len(g["depths"])),
              xticklabels=[f"{v:.1f}" for v in g["depths"]], yticks=range(len(g["lengths"])),
              yticklabels=[f"{n:,} ({t / 1e3:,.0f}K tok/s)" for n, t in zip(g["lengths"], g["tok_s"])])
    ax[0, 0].set_ylabel("context length (forward tokens/s)")
    fig.colorbar(im, ax=ax, shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv):
    words = [a for a in argv if not a.startswith("--")]
    configure(globals(), [a for a in argv if a.startswith("--")])
    mode = words[0] if words else None
    try:
        if mode == "curves" and len(words) == 3:
            table = summary({"msa": words[1], "dense": words[2]})             # checks both logs before drawing
            plot_curves(words[1], words[2], png or "report_curves.png")
            print(table)
        elif mode == "heatmap" and len(words) == 1:
            plot_heatmap(out_dir, png or "report_heatmap.png")
        elif mode == "recall" and len(words) == 1:
            print(recall_table(out_dir, n_queries))
            return
        elif mode == "mqar" and len(words) >= 2:
            results = mqar_results(words[1:])
            plot_mqar(results, png or "report_mqar.png")
            print(mqar_table(results))
        elif mode == "needle" and len(words) == 1:
            plot_needle(out_dir, png or "report_needle.png")
        elif mode == "niah" and len(words) >= 2:
            results = niah_results(words[1:])
            plot_niah(results, png or "report_niah.png")
            print(niah_table(results))
        else:
            raise SystemExit(f"usage: python report.py curves OUT_MSA OUT_DENSE [--png=...] | "
                             f"python report.py heatmap [--out_dir=...] [--png=...] | "
                             f"python report.py recall [--out_dir=...] [--n_queries=...] | "
                             f"python report.py mqar RUN [RUN ...] [--png=...] | "
                             f"python report.py needle [--out_dir=...] [--question=...] [--png=...] | "
                             f"python report.py niah RUN [RUN ...] [--niah_scales=...] [--png=...]; got {argv}")
    except ValueError as e:
        raise SystemExit(f"report error: {e}")
    print(f"wrote {png or f'report_{mode}.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
