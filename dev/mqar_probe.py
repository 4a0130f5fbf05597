"""
A lab tool for the retrieval recipe (dev/retrieval.md), not part of the model: trains a small model of model.py on
batches with p_mqar recall rows (data.mqar_row) for a wall-clock budget, with a context length that can grow at
given seconds (--T 256 1024 8192 --switch_s 100 200), and prints one JSON line per evaluation: held-out answer
accuracy at the current length, by quarter of the fact-to-question distance, and the answer tokens' cross-entropy
(ce; ln of the value words' count is the level of a model that knows only that a value word comes). Run it from
the repository root on a GPU, several at once to compare settings:
    python dev/mqar_probe.py --name d256 --attention dense --T 256 --every 16 --budget_s 300 --compile 0
train.py is the way to train a model; this loop exists to try recipes in minutes.
"""
import argparse, json, math, os, sys, time
import numpy as np, torch
sys.path.insert(0, os.getcwd())
import data
import recall_eval
from model import GPT, GPTConfig

p = argparse.ArgumentParser()
p.add_argument("--name", default="probe"); p.add_argument("--attention", default="dense")
p.add_argument("--select", default="indexer"); p.add_argument("--T", type=int, nargs="+", default=[1024])
p.add_argument("--switch_s", type=float, nargs="*", default=[])   # curriculum: seconds at which T moves to the next
p.add_argument("--tokens", type=int, default=32768); p.add_argument("--layers", type=int, default=4)
p.add_argument("--embd", type=int, default=512); p.add_argument("--heads", type=int, default=8)
p.add_argument("--K", type=int, default=8); p.add_argument("--bs", type=int, default=64)
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--p_mqar", type=float, default=1.0)
p.add_argument("--every", type=int, default=32); p.add_argument("--budget_s", type=float, default=240)
p.add_argument("--eval_s", type=float, default=30); p.add_argument("--kl_warmup", type=int, default=200)
p.add_argument("--compile", type=int, default=1); p.add_argument("--experts", type=int, default=8)
p.add_argument("--n_dense", type=int, default=1); p.add_argument("--eval_T", type=int, nargs="*", default=[])
p.add_argument("--distance", default="uniform")   # data.mqar_row distance: uniform or log
p.add_argument("--text_loss", type=int, default=1)   # 0: a recall row's answers are its only targets
p.add_argument("--tie", type=int, default=1)         # 0: the LM head has its own matrix (GPTConfig.tie_embeddings)
p.add_argument("--p_repeat", type=float, default=0)  # the share of induction warm-up rows (data.repeat_row), taken
p.add_argument("--repeat_s", type=float, default=1e9)  # from p_mqar, for this many seconds (then 0)
p.add_argument("--seed", type=int, default=0)
a = p.parse_args()
data.MQAR_EVERY = a.every
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(a.seed)
cfg = GPTConfig(n_layer=a.layers, n_head=a.heads, n_kv_head=2, n_embd=a.embd, index_dim=64, n_dense_layers=a.n_dense,
                msa_block_size=a.bs, msa_topk=a.K, n_expert=a.experts, expert_topk=2, expert_hidden=2 * a.embd,
                vocab_size=data.VOCAB_SIZE, patch_dim=data.PATCH_DIM, img_patch_id=data.IMG_PATCH,
                attention=a.attention, msa_select=a.select, tie_embeddings=bool(a.tie))
model = GPT(cfg).to(dev)
params = [q for q in model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=dev == "cuda")
cm = torch.compile(model) if a.compile else model
val = data._load(data._active or data.prepare(), "val")[0]
evalsets = {}
def evalset(T):
    if T not in evalsets:
        rng = np.random.default_rng([77, T]); rows, tasks = [], []
        n = max(2, 65536 // T) if T <= 16384 else 2
        for _ in range(n):
            r, _, t = data.mqar_row(val, T, rng); rows.append(r); tasks.append(t)
        evalsets[T] = (torch.tensor(np.stack(rows), device=dev), tasks)
    return evalsets[T]
@torch.no_grad()
def evaluate(T):
    x, tasks = evalset(T); model.eval(); hits, dist, ces = [], [], []
    for b in range(x.shape[0]):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits = model(x[b:b + 1])[0][0]
        q = torch.tensor([t[0] for t in tasks[b]], device=dev)
        lq = logits[q].float()
        ans = torch.tensor([int(t[1][0]) for t in tasks[b]], device=dev)
        ces.append(torch.nn.functional.cross_entropy(lq, ans, reduction="sum").item())
        pred = lq.argmax(-1).cpu().numpy()
        hits += [int(pred[i] == t[1][0]) for i, t in enumerate(tasks[b])]; dist += [(t[0] - t[2]) / T for t in tasks[b]]
    hits, dist = np.array(hits), np.array(dist)
    bins = [float(hits[(dist >= lo) & (dist < lo + .25)].mean()) for lo in (0, .25, .5, .75)]
    rep = recall_eval.repeat_eval(model, max(1, 8192 // T), T, seed=78)        # the warm-up rows' own accuracy
    model.train()
    return float(hits.mean()), [round(v, 3) for v in bins], round(sum(ces) / len(hits), 3), round(rep, 3)
t0 = time.time(); it = 0; last_eval = 0; stage = 0; toks = 0; lm_acc = []
while True:
    el = time.time() - t0
    while stage < len(a.switch_s) and el >= a.switch_s[stage]: stage += 1
    T = a.T[min(stage, len(a.T) - 1)]; B = max(1, a.tokens // T)
    lr = a.lr * min(1, (it + 1) / 100)
    pr = a.p_repeat if el < a.repeat_s else 0.0
    mix = dict(p_repeat=pr, p_mqar=min(a.p_mqar, 1 - pr) if pr else a.p_mqar)
    for g in opt.param_groups: g["lr"] = lr
    x, y, pt = data.get_batch("train", B, T, np.random.default_rng([5, a.seed, it]), dev, mqar_distance=a.distance,
                              mqar_text_loss=bool(a.text_loss), **mix)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
        _, losses = cm(x, y, pt, kl_dense=it < a.kl_warmup)
        loss = losses["lm"] + losses["kl"] + 0.01 * losses["balance"]
    loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad(set_to_none=True)
    it += 1; toks += B * T; lm_acc.append(losses["lm"].detach())
    if time.time() - t0 - last_eval >= a.eval_s or time.time() - t0 >= a.budget_s:
        last_eval = time.time() - t0
        acc, bins, ce, rep = evaluate(T)
        rec = dict(name=a.name, t=round(last_eval), it=it, T=T, Mtok=round(toks / 1e6, 1),
                   lm=round(torch.stack(lm_acc).float().mean().item(), 3), kl=round(losses["kl"].item(), 4),
                   acc=round(acc, 3), bins=bins, ce=ce, repeat_acc=rep)
        lm_acc = []
        print(json.dumps(rec), flush=True)
        if time.time() - t0 >= a.budget_s: break
for T in a.eval_T:
    print(json.dumps(dict(name=a.name, eval_T=T, acc=evaluate(T))), flush=True)
