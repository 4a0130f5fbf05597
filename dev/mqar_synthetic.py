"""
A lab tool for the retrieval recipe (dev/retrieval.md), not part of the model: can a small model form the
induction step at all? Trains on the bare Zoology-style recall task, no text: a row of 64 tokens from a
256-word vocabulary (--V) holds P=8 facts (--P) "k v" (keys from the lower half, values from the upper), then the keys
again, in random order at random places among filler tokens, each followed by its value; the loss is on those
answers only. Picking any value of this row scores ~0.13 (1/8), a value not yet asked ~0.34 (the mean of
1/8, 1/7, ..., 1/1): the two plateaus; the lookup scores ~1.0.
Two models: model.py's GPT (every layer dense; 2 experts), and a plain control transformer (learned absolute
positions, full multi-head attention, GELU MLP, PyTorch's default init), each with switches for what differs:
    python dev/mqar_synthetic.py --impl gpt --tie 1          # model.py as configured by default
    python dev/mqar_synthetic.py --impl gpt --tie 0          # its own LM head matrix
    python dev/mqar_synthetic.py --impl plain                # the control: untied, learned positions
    python dev/mqar_synthetic.py --impl plain --rope 1       # the control with RoPE instead of learned positions
    python dev/mqar_synthetic.py --copy_steps 500            # first 500 steps on copy rows (the induction warm-up)
Copy rows (copy_batch) are random tokens in which a random stretch comes again later at a random offset: only a
lookup by content predicts the repeat, the step a recall answer needs. Prints one JSON line per 500 steps:
held-out answer accuracy, the copy rows' accuracy and the training loss. Runs on a GPU (a CPU manages ~8 steps/s).
"""
import argparse, json, math, os, sys, time
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, os.getcwd())
import model as model_module
from model import GPT, GPTConfig

p = argparse.ArgumentParser()
p.add_argument("--impl", default="gpt", choices=["gpt", "plain"]); p.add_argument("--name", default="synthetic")
p.add_argument("--tie", type=int, default=None)     # the LM head shares the embedding matrix; default: gpt 1, plain 0
p.add_argument("--rope", type=int, default=None)    # RoPE (1) or learned absolute positions (0); default: the impl's own
p.add_argument("--head_init", default="own", choices=["own", "copy"])  # untied head: its own draw, or a copy of wte's
p.add_argument("--seed", type=int, default=0)      # the init and the training rows (not 1: the held-out rows' seed)
p.add_argument("--kv_heads", type=int, default=2)   # gpt: GQA groups (4 = full multi-head attention)
p.add_argument("--small_init", type=int, default=0) # plain: every matrix N(0, 0.02), as model.py's
p.add_argument("--C", type=int, default=128); p.add_argument("--layers", type=int, default=2)
p.add_argument("--lr", type=float, default=3e-3); p.add_argument("--wd", type=float, default=0.1)
p.add_argument("--steps", type=int, default=8000); p.add_argument("--B", type=int, default=64)
p.add_argument("--budget_s", type=float, default=1e9)  # stop after this many seconds, too
p.add_argument("--P", type=int, default=8)          # facts (and questions) per row
p.add_argument("--V", type=int, default=256)        # vocabulary
p.add_argument("--copy_steps", type=int, default=0) # steps on repeated random half-rows before the recall rows
p.add_argument("--copy_frac", type=float, default=0)  # the share of repeated half-rows in every later batch
a = p.parse_args()
V, T, H = a.V, 64, 4                                 # vocabulary, row length, heads
dev = "cuda" if torch.cuda.is_available() else "cpu"
rope = a.rope if a.rope is not None else int(a.impl == "gpt")
tie = a.tie if a.tie is not None else int(a.impl == "gpt")


def batch(B, rng):
    """-> x (B, T), y (B, T): -1 except at the answers (the value after a repeated key)."""
    r = np.arange(B)[:, None]
    k = rng.random((B, V // 2 - 2)).argsort(1)[:, :a.P] + 2                   # (B, P) distinct keys
    v = rng.integers(V // 2, V, (B, a.P))                                       # (B, P) values
    x, y = np.ones((B, T + 1), np.int64), np.full((B, T + 1), -1)             # token 1 is the filler
    x[:, 0:2 * a.P:2], x[:, 1:2 * a.P:2] = k, v                                # the facts: k1 v1 ... kP vP
    at = np.sort(rng.random((B, (T - 2 * a.P) // 2)).argsort(1)[:, :a.P], 1) * 2 + 2 * a.P  # (B, P) question places
    i = rng.random((B, a.P)).argsort(1)                                         # the order they are asked in
    x[r, at], x[r, at + 1], y[r, at + 1] = k[r, i], v[r, i], v[r, i]
    x, y = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)
    return x[:, :-1], y[:, 1:]


def copy_batch(B, rng):
    """-> x, y: random tokens in which a random stretch (8 to T/2 tokens) comes again later, at a random offset,
    so that only a lookup by content (not a fixed distance) predicts it: the classic induction warm-up; the
    targets are the repeat's tokens after its first."""
    x = rng.integers(2, V, (B, T))
    L = rng.integers(8, T // 2 + 1, (B, 1))                                     # (B, 1) the stretch's length
    src = (rng.random((B, 1)) * (T - 2 * L + 1)).astype(np.int64)               # its first place
    dst = src + L + (rng.random((B, 1)) * (T - 2 * L - src + 1)).astype(np.int64)  # the repeat's, after it
    p = np.arange(T)[None, :]
    rep = (p >= dst) & (p < dst + L)                                            # (B, T) inside the repeat
    x = np.where(rep, np.take_along_axis(x, np.clip(p - dst + src, 0, T - 1), 1), x)
    y = np.full((B, T), -1)
    nxt = rep[:, 1:] & rep[:, :-1]                                              # p and p + 1 both in the repeat
    y[:, :-1][nxt] = x[:, 1:][nxt]
    return torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)


class PlainBlock(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(C), nn.RMSNorm(C)
        self.qkv, self.o = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(), nn.Linear(4 * C, C))

    def forward(self, x, table):
        B, T_, C = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T_, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        if table is not None:
            q, k = model_module.rope(q, table), model_module.rope(k, table)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(B, T_, C))
        return x + self.mlp(self.n2(x))


class Plain(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList([PlainBlock(C) for _ in range(a.layers)])
        self.norm, self.head = nn.RMSNorm(C), nn.Linear(C, V, bias=False)
        if a.small_init:
            for w in self.parameters():
                if w.dim() == 2:
                    nn.init.normal_(w, std=0.02)
        if tie:
            self.head.weight = self.wte.weight

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)
        h = self.wte(x) + (0 if rope else self.wpe(pos))
        table = model_module.rope_table(pos, a.C // H, 10000.0) if rope else None
        for block in self.blocks:
            h = block(h, table)
        return self.head(self.norm(h))


torch.manual_seed(a.seed)
if a.impl == "plain":
    net = Plain(a.C).to(dev)
    logits = net
else:
    if not rope:  # learned absolute positions instead of RoPE: rotate nothing, add a position embedding
        model_module.rope = lambda x, table: x
    cfg = GPTConfig(n_layer=a.layers, n_head=H, n_kv_head=a.kv_heads, n_embd=a.C, n_dense_layers=a.layers,
                    attention="dense", n_expert=2, expert_topk=2, expert_hidden=2 * a.C, vocab_size=V, patch_dim=6,
                    img_patch_id=0, tie_embeddings=bool(tie))
    net = GPT(cfg, backend="ref").to(dev)
    if not tie and a.head_init == "copy":  # untied, but starting from the embedding's matrix
        with torch.no_grad():
            net.lm_head.weight.copy_(net.wte.weight)
    if not rope:
        wpe = nn.Embedding(T, a.C).to(dev)
        nn.init.normal_(wpe.weight, std=0.02)
        net.wpe, embed = wpe, net.embed
        net.embed = lambda x, patches=None, decoding=False: embed(x) + wpe(torch.arange(x.shape[1], device=x.device))
    logits = lambda x: net(x)[0]
opt = torch.optim.AdamW(net.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=a.wd)
rng, held_out = np.random.default_rng(a.seed), batch(512, np.random.default_rng(1))
held_copy = copy_batch(512, np.random.default_rng(1))
t0 = time.time()
for it in range(a.steps + 1):
    for g in opt.param_groups:
        g["lr"] = a.lr * min(1, (it + 1) / 100)
    n_copy = a.B if it < a.copy_steps else round(a.B * a.copy_frac)
    x, y = batch(a.B - n_copy, rng)
    if n_copy:
        xc, yc = copy_batch(n_copy, rng)
        x, y = torch.cat([x, xc]), torch.cat([y, yc])
    loss = F.cross_entropy(logits(x).float().view(-1, V), y.reshape(-1), ignore_index=-1)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if it % 500 == 0 or time.time() - t0 > a.budget_s:
        with torch.no_grad():
            acc = [(logits(x).argmax(-1)[y >= 0] == y[y >= 0]).float().mean().item() for x, y in (held_out, held_copy)]
        print(json.dumps(dict(name=a.name, it=it, s=round(time.time() - t0), loss=round(loss.item(), 3),
                              acc=round(acc[0], 3), copy_acc=round(acc[1], 3))), flush=True)
        if time.time() - t0 > a.budget_s:
            break
