"""
Retrieval measurements on multi-query associative recall (data.mqar_row): does the model answer, how far back can
the fact be, and does each MSA layer read the block that holds it? The one implementation behind train.py's
evaluation (eval_mqar), report.py's tables and figures (mqar, needle, niah) and sample.py's demo (--demo=recall).

  accuracy      a question is right when the argmax of the logits at its key is the answer, under teacher forcing:
                one forward pass over the whole row answers all of its questions. Overall and by distance q - f
                (question's key - fact's key) in n_bins equal bins of [0, n)
  needle recall per MSA layer and KV group: is the block of the fact's value (position f + 1, the token the answer
                copies) among the K blocks that the forward selected for the query at q?
  needle mass   per MSA layer and group: the dense teacher's attention on that block (the mean over the group's G
                heads of each head's softmax over every visible key). A diagnostic: does dense attention itself
                find the needle? (A learned indexer imitates the teacher: where the teacher looks away, so does it.)
  NIAH grid     one fact at depth d of a row of n tokens, asked at the end (data.niah_row): accuracy per (n, d),
                and the forward's tokens/s per n. Lengths past the training context show how far retrieval and
                speed carry: MSA's main branch reads K blocks per query at any n, dense attention reads all n.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
from model import autocast

N_BINS = 8                                      # distance bins over [0, n)
NIAH_DEPTHS = tuple(i / 10 for i in range(10))  # where the fact sits: 0, 0.1, ..., 0.9 of the row
NIAH_SCALES = (0.25, 0.5, 1, 2, 4)              # the grid's lengths, in multiples of the training seq_len


@torch.no_grad()
def run_model(model, x, at=None, patches=None):
    """
    One forward of x (B, T) -> (logits (B, P, V) float32 at the positions at (B, P) long (None without at),
                                {MSA layer index: (h (B, T, C), pos (T,))}: each MSA layer's attention input).
    Forward hooks keep the layer inputs, and one on the final norm keeps only the rows at `at`: the LM head then
    computes B * P logits instead of B * T (a 32K-token row's would take 3 GB).
    """
    inputs, hooks = {}, []
    for i, block in enumerate(model.blocks):
        if block.attn.sparse:  # Block calls attn(x, pos, cache, kl_support): args[0], args[1]
            hooks.append(block.attn.register_forward_hook(
                lambda mod, args, out, i=i: inputs.__setitem__(i, (args[0], args[1]))))
    keep = x.new_zeros(x.shape[0], 1) if at is None else at                  # (B, P)
    hooks.append(model.norm_f.register_forward_hook(
        lambda mod, args, h: h.gather(1, keep.unsqueeze(-1).expand(-1, -1, h.shape[-1]))))  # (B, P, C)
    try:
        with autocast(x.device):
            logits = model(x, patches=patches)[0]                            # (B, P, V)
    finally:
        for h in hooks:
            h.remove()
    return (None if at is None else logits.float()), inputs


def msa_layer_inputs(model, x, patches=None):
    """One forward of x (B, T) -> {MSA layer index: (h, pos)}, the input of each MSA layer's attention."""
    return run_model(model, x, None, patches)[1]


@torch.no_grad()
def selection_at(model, inputs, at):
    """The blocks each MSA layer's forward selected for the queries at `at` (B, P) long: {layer: (B, Hkv, P, K)
    long, -1 padded}. Recomputed from the layer's input (run_model) by Attention._sparse, the forward's own code;
    a blind 'random' rule draws afresh (the same distribution, not the same draw)."""
    out = {}
    for i, (h, pos) in inputs.items():
        attn = model.blocks[i].attn
        with autocast(h.device):
            q, k, v = attn.qkv(h, pos)
            qi, ki = attn.index_branch(h, pos) if attn.learned else (None, None)
            block_idx = attn._sparse(q, k, v, qi, ki)[1].long()              # (B, Hkv, T, K)
        B, Hkv, _, K = block_idx.shape
        out[i] = block_idx.gather(2, at.view(B, 1, -1, 1).expand(B, Hkv, -1, K))
    return out


@torch.no_grad()
def teacher_block_mass(model, inputs, at, chunk=256):
    """The dense teacher's attention per key block for the queries at `at` (B, P) long: {layer: (B, Hkv, P, nb)
    float32}, [b, g, p, j] = the mean over group g's heads of each head's softmax over every visible key, summed
    over the keys of block j (0 for blocks past the query). Each row sums to 1. Plain torch, chunk queries at a
    time: (Hq, chunk, T) scores."""
    out, bs = {}, model.cfg.msa_block_size
    for i, (h, pos) in inputs.items():
        with autocast(h.device):
            q, k, _ = model.blocks[i].attn.qkv(h, pos)                       # (B, Hq, T, D), (B, Hkv, T, D)
        B, Hkv, T, D = k.shape
        nb = -(-T // bs)
        rows = []
        for b in range(B):
            kb = k[b].float().unsqueeze(1)                                   # (Hkv, 1, T, D)
            parts = []
            for t in at[b].split(chunk):                                     # (n,) query positions
                s = q[b, :, t].float().view(Hkv, -1, len(t), D) @ kb.transpose(-1, -2) / D ** 0.5  # (Hkv, G, n, T)
                s = s.masked_fill(torch.arange(T, device=s.device) > t[:, None], float("-inf"))
                p = s.softmax(-1).mean(1)                                    # (Hkv, n, T) the group's teacher
                parts.append(F.pad(p, (0, nb * bs - T)).view(Hkv, len(t), nb, bs).sum(-1))  # (Hkv, n, nb)
            rows.append(torch.cat(parts, 1))
        out[i] = torch.stack(rows)                                           # (B, Hkv, P, nb)
    return out


@torch.no_grad()
def needle_stats(model, inputs, q, f):
    """q, f (B, P) long: the questions' keys and their facts' keys. -> hit (B, P, L, Hkv) bool: the needle's block
    (that of f + 1) is among the blocks selected at q; mass (B, P, L, Hkv) float32: the teacher's attention on it.
    L = the MSA layers in order (0 for a dense model)."""
    layers = sorted(inputs)
    B, P = q.shape
    if not layers:
        empty = torch.zeros(B, P, 0, model.cfg.n_kv_head, device=q.device)
        return empty.bool(), empty
    needle = ((f + 1) // model.cfg.msa_block_size)[:, None, :, None]        # (B, 1, P, 1)
    sel, mass = selection_at(model, inputs, q), teacher_block_mass(model, inputs, q)
    hit = torch.stack([(sel[i] == needle).any(-1) for i in layers], -1)    # (B, Hkv, P, L)
    m = torch.stack([mass[i].gather(-1, needle.expand(-1, mass[i].shape[1], -1, -1))[..., 0] for i in layers], -1)
    return hit.permute(0, 2, 3, 1), m.permute(0, 2, 3, 1)


def score(model, rows, batch_size=8):
    """
    rows [(row (n,), tasks)], all of one length n (data.mqar_eval_set, data.niah_eval_set) -> per question, in order:
      correct (N,) bool, distance (N,) int (q - f), hit (N, L, Hkv) bool and mass (N, L, Hkv) float32 (needle_stats),
    plus n, layers (the MSA layer indices), tokens and seconds (of the forwards alone, the GPU's work included).
    """
    if len({len(r) for r, _ in rows}) != 1:
        raise ValueError(f"score: expected rows of one length, got lengths {sorted({len(r) for r, _ in rows})}")
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out, seconds, layers = {"correct": [], "distance": [], "hit": [], "mass": []}, 0.0, []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        P = max(len(tasks) for _, tasks in chunk)
        # (B, P) each; a row with fewer questions repeats its first, and `valid` drops the copies
        tasks = [t + t[:1] * (P - len(t)) for _, t in chunk]
        q = torch.tensor([[qq for qq, _, _ in t] for t in tasks], device=device)
        answer = torch.tensor([[int(a[0]) for _, a, _ in t] for t in tasks], device=device)
        f = torch.tensor([[ff for _, _, ff in t] for t in tasks], device=device)
        valid = torch.tensor([[p < len(t) for p in range(P)] for _, t in chunk], device=device)
        x = torch.from_numpy(np.stack([r for r, _ in chunk])).to(device)    # (B, n)
        sync()
        t0 = time.time()
        logits, inputs = run_model(model, x, q)                              # (B, P, V)
        sync()
        seconds += time.time() - t0
        hit, mass = needle_stats(model, inputs, q, f)                        # (B, P, L, Hkv)
        layers = sorted(inputs)
        for k, v in (("correct", logits.argmax(-1) == answer), ("distance", q - f), ("hit", hit), ("mass", mass)):
            out[k].append(v[valid].cpu().numpy())
    res = {k: np.concatenate(v) for k, v in out.items()}
    return dict(res, n=len(rows[0][0]), layers=layers, tokens=len(rows) * len(rows[0][0]), seconds=seconds)


def _binned(values, bins, n_bins):
    """Mean of values (N, ...) per bin (N,) -> list of n_bins entries (None for an empty bin)."""
    return [values[bins == i].mean(0).tolist() if (bins == i).any() else None for i in range(n_bins)]


def summarize(s, n_bins=N_BINS):
    """score()'s per-question arrays -> plain numbers for the log and the tables:
      acc, questions; bin_edges (n_bins + 1 distances), acc_bins and count_bins per distance bin;
      layers (MSA layer indices), needle_recall and needle_mass [L][Hkv] (means over the questions),
      needle_recall_bins [n_bins][L] (mean over the groups; None for an empty bin);
      needle_any [L]: the share of questions for which some group of the layer reads the fact's block, and
      acc_read, acc_missed [L]: the accuracy on those questions and on the others (None if there are none): whether
      the misses are the wrong answers."""
    n = s["n"]
    bins = np.minimum(s["distance"] * n_bins // n, n_bins - 1)              # (N,) distance bin of each question
    L = len(s["layers"])
    any_group = s["hit"].any(-1)                                            # (N, L)
    acc_if = lambda m: [float(s["correct"][m[:, l]].mean()) if m[:, l].any() else None for l in range(L)]
    return dict(acc=float(s["correct"].mean()), questions=int(len(s["correct"])),
                needle_any=any_group.mean(0).tolist(), acc_read=acc_if(any_group), acc_missed=acc_if(~any_group),
                bin_edges=[i * n / n_bins for i in range(n_bins + 1)],
                acc_bins=_binned(s["correct"].astype(float), bins, n_bins),
                count_bins=np.bincount(bins, minlength=n_bins).tolist(), layers=s["layers"],
                needle_recall=s["hit"].mean(0).tolist() if L else [],
                needle_mass=s["mass"].mean(0).tolist() if L else [],
                needle_recall_bins=_binned(s["hit"].mean(-1), bins, n_bins) if L else [])


def mqar_eval(model, n_rows, n, seed=0, batch_size=8, n_bins=N_BINS):
    """Accuracy by distance and needle recall on n_rows held-out recall rows of n tokens (summarize's dict)."""
    return summarize(score(model, data.mqar_eval_set(n_rows, n, seed), batch_size), n_bins)


def repeat_eval(model, n_rows, n, seed=0, batch_size=8):
    """Accuracy on the copied tokens of n_rows held-out induction warm-up rows (data.repeat_eval_set) of n tokens
    and one more, their last target: the share that the argmax predicts, i.e. whether the lookup by content that
    recall needs has formed (it forms abruptly, and recall rows teach little before it has)."""
    rows, hit, total = data.repeat_eval_set(n_rows, n + 1, seed), 0, 0
    device = next(model.parameters()).device
    for i in range(0, n_rows, batch_size):
        row = torch.from_numpy(np.stack([r for r, _ in rows[i:i + batch_size]])).to(device)       # (B, n + 1)
        target = torch.from_numpy(np.stack([t for _, t in rows[i:i + batch_size]])).to(device)[:, 1:]  # (B, n)
        at = torch.arange(n, device=device).expand(row.shape[0], n)
        pred = run_model(model, row[:, :-1], at)[0].argmax(-1)                # (B, n) the next token's guess
        hit += (pred == row[:, 1:])[target].sum().item()
        total += target.sum().item()
    return hit / total


def fmt(v):
    """A rate for the tables: two decimals, '-' for None (an empty bin, no such question)."""
    return "-" if v is None else f"{v:.2f}"


def summary_line(r):
    """One line of a summarize() result: accuracy, by distance bin, needle recall (and the teacher's mass on the
    needle's block) per MSA layer, each the mean over the KV groups."""
    bins = " ".join(map(fmt, r["acc_bins"]))
    needle = " ".join(f"{np.mean(g):.2f}" for g in r["needle_recall"])
    mass = " ".join(f"{np.mean(g):.2f}" for g in r["needle_mass"])
    split = " ".join(f"{fmt(a)}/{fmt(b)}" for a, b in zip(r["acc_read"], r["acc_missed"]))
    return (f"mqar acc {r['acc']:.3f} ({r['questions']} questions) | by distance ({len(r['acc_bins'])} bins over "
            f"{int(r['bin_edges'][-1])} tokens) {bins}" +
            (f" | needle recall per MSA layer {needle} (teacher mass {mass}; accuracy when some group reads it / "
             f"when none does {split})" if needle else ""))


def niah_grid(model, lengths, depths=NIAH_DEPTHS, n_rows=4, seed=0, max_tokens=1 << 16):
    """
    The needle grid: n_rows rows per (length, depth), rows of each length in forwards of up to max_tokens tokens
    (one row at least). -> dict of lengths, depths, acc [len][depth], needle_recall [len][depth] (the mean over
    MSA layers and groups; None for a dense model), tok_s [len]: the forwards' tokens per second, measured after
    untimed forwards of each batch shape at that length (the first call of a shape compiles kernels on a GPU).
    """
    acc, recall, tok_s = [], [], []
    device = next(model.parameters()).device
    for n in lengths:
        cells = [data.niah_eval_set(n_rows, n, d, seed) for d in depths]
        rows, bs = [row for cell in cells for row in cell], max(1, max_tokens // n)
        for b in {min(bs, len(rows)), len(rows) % bs or bs}:                    # the full batches' and the last's
            run_model(model, torch.from_numpy(np.stack([r for r, _ in rows[:b]])).to(device))
        s = score(model, rows, batch_size=bs)
        per_cell = lambda v: v.reshape(len(depths), n_rows, *v.shape[1:])    # one question per row
        acc.append(per_cell(s["correct"]).mean(1).tolist())
        recall.append(per_cell(s["hit"]).mean((1, 2, 3)).tolist() if s["layers"] else None)
        tok_s.append(s["tokens"] / max(s["seconds"], 1e-9))
    return dict(lengths=list(lengths), depths=list(depths), acc=acc, needle_recall=recall, tok_s=tok_s)


def pick_question(tasks, question=-1):
    """tasks of a row -> one task: tasks[question], or with question=-1 the one farthest from its fact."""
    if question == -1:
        return max(tasks, key=lambda t: t[0] - t[2])
    if not 0 <= question < len(tasks):
        raise ValueError(f"question must be -1 (the farthest) or in [0, {len(tasks)}), got {question}")
    return tasks[question]


@torch.no_grad()
def explain(model, row, task):
    """
    One question read closely: the model sees the prompt row[:q + 1] and answers with the argmax of its next-token
    logits (what greedy generation's prefill computes). -> dict of
      q, f, answer (token id), pred (token id), needle (the block of f + 1), local (the block of q),
      blocks {MSA layer: [[blocks group g read for the answer token, -1 padding dropped], ...]},
      hit {layer: [needle in group g's blocks]}, mass {layer: (Hkv, q // bs + 1) numpy: the teacher per block}.
    """
    q, answer, f = task
    device = next(model.parameters()).device
    x = torch.from_numpy(np.asarray(row[:q + 1])).to(device).unsqueeze(0)  # (1, q + 1)
    at = torch.tensor([[q]], device=device)
    logits, inputs = run_model(model, x, at)
    sel, mass = selection_at(model, inputs, at), teacher_block_mass(model, inputs, at)
    bs = model.cfg.msa_block_size
    needle = (f + 1) // bs
    blocks = {i: [[b for b in s if b >= 0] for s in sel[i][0, :, 0].tolist()] for i in sel}
    return dict(q=q, f=f, answer=int(answer[0]), pred=int(logits[0, 0].argmax()), needle=needle, local=q // bs,
                blocks=blocks, hit={i: [needle in g for g in b] for i, b in blocks.items()},
                mass={i: m[0, :, 0].cpu().numpy() for i, m in mass.items()})


def explain_lines(e, rule="indexer"):
    """explain()'s dict -> lines of text: the question, the answer against the truth, and per MSA layer and group
    the blocks read for the answer token, the fact's block starred."""
    word = lambda t: repr(data.decode([t]))
    lines = [f"fact at token {e['f']} (its value in block {e['needle']}), question at token {e['q']} (block "
             f"{e['local']}), {e['q'] - e['f']} tokens apart",
             f"truth {word(e['answer'])} | model {word(e['pred'])} ({'right' if e['pred'] == e['answer'] else 'wrong'})"]
    lines.append(f"blocks read for the answer token ({rule} selection; * = the fact's block):" if e["blocks"] else
                 "no MSA layer: every layer attends to every block")
    for i, groups in e["blocks"].items():
        for g, bl in enumerate(groups):
            found = "has the fact's block" if e["hit"][i][g] else "misses it"
            lines.append(f"  layer {i} group {g}: {' '.join(f'{b}*' if b == e['needle'] else str(b) for b in bl)}"
                         f"  -> {found} (teacher's mass there {e['mass'][i][g][e['needle']]:.2f})")
    return lines
