"""
The nanoMSA model: a decoder-only Mixture-of-Experts transformer whose attention is MiniMax Sparse
Attention (MSA), and which reads images natively (each image patch is projected into the token stream).

Shapes: B batch, T tokens, C = n_embd, Hq = n_head query heads, Hkv = n_kv_head KV heads (GQA groups),
D = C // Hq head dim, Di = index_dim, bs = msa_block_size, K = msa_topk, E = n_expert.

One block is  x + attn(norm(x))  then  x + moe(norm(x)).
- attn: GQA with RoPE. The first n_dense_layers layers attend densely (as MiniMax-M3 does); the others
  are MSA layers: an index branch (Wqi, Wki, stacked in wi; it reads x.detach()) picks K blocks per query and
  group, the main branch attends over those blocks only. The index branch learns from the KL loss alone.
- moe: a router picks the top-k of E SwiGLU experts per token (plus an optional shared expert that sees
  every token); a Switch-style auxiliary loss keeps the experts evenly loaded (moe.py).
The forward returns the logits, or, given targets, the losses (LM, KL summed over MSA layers, balance), so
train.py stays simple.
GPT also measures itself for train.py: indexer_recall (how much of the dense attention the chosen blocks hold)
and flops_per_token (for the MFU). generate() decodes with one KVCache per layer (decoding.py).
"""
import contextlib
import math
import os
import re
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

import msa_ref
from decoding import KVCache, compiled_step, cuda_graphed, sample_token
from moe import MoE

BACKEND_FUNCTIONS = ("index_topk", "fixed_block_idx", "select_fixed", "sparse_attention", "kl_loss", "sparse_attention_kl",
                     "sparse_decode", "linear_cross_entropy")


def get_backend(name="auto"):
    """The one place that picks the MSA implementation: 'ref' -> msa_ref, 'triton' -> msa_triton,
    'auto' -> msa_triton when CUDA is present and msa_triton has every function, else msa_ref."""
    if name not in ("auto", "ref", "triton"):
        raise ValueError(f"backend must be 'auto', 'ref' or 'triton', got {name!r}")
    if name == "ref":
        return msa_ref
    if name == "auto" and not torch.cuda.is_available():
        return msa_ref  # no GPU: the reference is the fast path (msa_triton would run in the interpreter)
    if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs a CUDA GPU and none was found (TRITON_INTERPRET=1 runs the kernels "
                         "in Triton's slow CPU interpreter); use backend 'ref' or 'auto'")
    try:
        import msa_triton
        missing = [f for f in BACKEND_FUNCTIONS if not hasattr(msa_triton, f)]
        why = f"msa_triton lacks {', '.join(missing)}" if missing else None
    except Exception as e:  # ImportError, or a kernel module that fails to build
        msa_triton, why = None, f"import msa_triton failed: {type(e).__name__}: {e}"
    if why is None:
        return msa_triton
    if name == "triton":
        raise ValueError(f"backend='triton' asked for, but {why}")
    print(f"msa backend: falling back to msa_ref ({why})")
    return msa_ref


@dataclass
class GPTConfig:
    vocab_size: int = 50304     # padded GPT-2 vocabulary plus the image tokens (data.py)
    n_layer: int = 6
    n_head: int = 8             # Hq
    n_kv_head: int = 2          # Hkv: GQA groups, and index queries per token
    n_embd: int = 512           # C
    index_dim: int = 64         # Di, even (RoPE rotates pairs)
    index_rope: bool = True     # RoPE on the index branch; False: its scores read content only, alike at every distance
    attention: str = "msa"      # 'msa': layers past n_dense_layers are sparse; 'dense': every layer dense
    n_dense_layers: int = 1
    msa_block_size: int = 64    # bs
    msa_topk: int = 4           # K blocks per query, the local block included
    msa_select: str = "indexer" # which K blocks: 'indexer' (learned), or a blind control (msa_ref.select_fixed):
                                # 'local' (first block + the K - 1 last), 'random' (K - 1 random earlier + local); no KL
    index_fp8: bool = False     # qi, ki rounded to float8 e4m3 to score (msa_ref.fp8_quantize): an fp8 decode cache
    n_expert: int = 8           # E
    expert_topk: int = 2        # experts per token (>= 2: the gates are a softmax over the chosen ones)
    shared_expert: bool = True  # one more expert that every token goes through
    expert_hidden: int = 512    # SwiGLU hidden width of each expert
    rope_theta: float = 10000.0
    tie_embeddings: bool = True # lm_head reuses wte's matrix (GPT-2); False: a matrix of its own (most recent LLMs)
    patch_dim: int = 192        # flattened image patch (data.PATCH_DIM)
    img_patch_id: int = 50259   # the token whose embedding is replaced by a projected patch (data.IMG_PATCH)

    def check(self):
        """A config the model cannot be built from raises ValueError, one line saying what was expected."""
        c = self
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "index_dim", "msa_block_size", "msa_topk",
                     "n_expert", "expert_hidden", "patch_dim"):                # sizes first: the checks below divide
            if not (isinstance(getattr(c, name), int) and getattr(c, name) >= 1):
                raise ValueError(f"bad model config: {name} must be an int >= 1, got {getattr(c, name)!r}")
        for ok, msg in [(c.n_embd % c.n_head == 0, f"n_embd={c.n_embd} must be a multiple of n_head={c.n_head}"),
                        (c.n_head % c.n_kv_head == 0, f"n_head={c.n_head} must be a multiple of n_kv_head={c.n_kv_head}"),
                        ((c.n_embd // c.n_head) % 2 == 0 and c.index_dim % 2 == 0, "head dim and index_dim must be even (RoPE)"),
                        (c.attention in ("msa", "dense"), f"attention must be 'msa' or 'dense', got {c.attention!r}"),
                        (c.msa_select in msa_ref.SELECT_RULES,
                         f"msa_select must be one of {', '.join(map(repr, msa_ref.SELECT_RULES))}, got {c.msa_select!r}"),
                        (0 <= c.n_dense_layers <= c.n_layer, f"n_dense_layers must be in [0, n_layer={c.n_layer}], got {c.n_dense_layers}"),
                        (2 <= c.expert_topk <= c.n_expert, f"expert_topk must be in [2, n_expert={c.n_expert}], got {c.expert_topk}")]:
            if not ok:
                raise ValueError(f"bad model config: {msg}")


def rope_table(pos, d, theta):
    """The rotation of positions pos (T,) for rope(): cos, sin (T, d) float32, where position t turns dims i and
    i + d/2 together by the angle t * theta^(-i / (d/2)); sin holds -sin on the first half, +sin on the second.
    GPT keeps its rows for every layer to read (GPT.rope_reach). Computed in float64, rounded once: float32 angles
    are off by ~2e-3 at position 32K, and compiled and eager float32 sin / cos differ there."""
    freqs = theta ** (-torch.arange(d // 2, device=pos.device, dtype=torch.float64) / (d // 2))  # (d/2,)
    angle = pos.to(torch.float64)[:, None] * freqs                                              # (T, d/2)
    cos, sin = angle.cos().float(), angle.sin().float()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)                        # (T, d) each


def rope_widths(cfg):
    """The widths RoPE rotates: the head dim and index_dim (one width when they are equal)."""
    return sorted({cfg.n_embd // cfg.n_head, cfg.index_dim})


def rope_tables(pos, cfg):
    """rope_table of pos for every rotated width: {d: (cos, sin)}."""
    return {d: rope_table(pos, d, cfg.rope_theta) for d in rope_widths(cfg)}


ROPE_REACH = 8192  # positions a new model's RoPE tables cover (GPT.rope_reach extends them)


def rope(x, table):
    """Rotary position embedding. x (..., T, d), table = rope_table(pos, d, theta) -> x's shape and dtype:
    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), x1 and x2 the two halves of the last dim, in float32."""
    cos, sin = table                                                                            # (T, d)
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([x2, x1], dim=-1) * sin).to(x.dtype)  # float32 tables: float32 products


def autocast(device):
    """The precision the scripts run the model in: bf16 autocast on CUDA (fp32 weights, bf16 products), none
    elsewhere. device: a torch.device or its name ('cuda', 'cuda:1', 'cpu')."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def decode_linear(backend, x, w, cache):
    """x (B, T, C) times w (N, C) transposed -> (B, T, N): the backend's row_linear (msa_triton's kernel for the few
    rows of a decode step) when x is one new token a sequence on CUDA, decoded without gradients, x and w of one
    dtype that autocast leaves as it is; else F.linear (which casts under autocast)."""
    row_linear = getattr(backend, "row_linear", None)
    one = cache is not None and x.shape[1] == 1 and x.is_cuda and not torch.is_grad_enabled()
    kept = not torch.is_autocast_enabled("cuda") or w.dtype == torch.get_autocast_dtype("cuda")
    return (row_linear if one and x.dtype == w.dtype and kept and row_linear is not None else F.linear)(x, w)


class Attention(nn.Module):
    """GQA with RoPE; sparse (MSA) or dense causal. With a KVCache it also serves prefill and decoding."""

    def __init__(self, cfg, sparse, backend):
        super().__init__()
        self.cfg, self.sparse, self.backend = cfg, sparse, backend
        C, Hq, Hkv, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        # q, k and v in one product: one kernel instead of three, which is what a decode step's time depends on
        self.wqkv = nn.Linear(C, (Hq + 2 * Hkv) * D, bias=False)
        self.wo = nn.Linear(Hq * D, C, bias=False)
        if sparse:  # the index branch, one product too: one index query per group and one index key they share
            self.wi = nn.Linear(C, (Hkv + 1) * cfg.index_dim, bias=False)
            if cfg.msa_select != "indexer":  # a blind rule never reads it: kept (checkpoints load either way),
                self.wi.requires_grad_(False)  # frozen, so DDP does not wait for its gradient
        self.learned = sparse and cfg.msa_select == "indexer"       # the index branch chooses the blocks

    def qkv(self, x, pos, rot=None, proj=None):
        """x (B, T, C) at positions pos (T,) -> q (B, Hq, T, D) and k (B, Hkv, T, D), both rotated (RoPE), and
        v (B, Hkv, T, D). rot: rope_tables(pos, cfg) when the caller has them (GPT.forward), else built here.
        proj: wqkv(x) when the caller has it (a decode step's stacked product)."""
        cfg, B, T, _ = self.cfg, *x.shape
        Hq, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        table = (rot or rope_tables(pos, cfg))[D]
        proj = self.wqkv(x) if proj is None else proj                               # (B, T, (Hq + 2 Hkv) D)
        q, k, v = proj.split([Hq * D, Hkv * D, Hkv * D], dim=-1)                    # (B, T, Hq*D), (B, T, Hkv*D) x2
        q = rope(q.view(B, T, Hq, D).transpose(1, 2), table)
        k = rope(k.view(B, T, Hkv, D).transpose(1, 2), table)
        return q, k, v.view(B, T, Hkv, D).transpose(1, 2)

    def index_branch(self, x, pos, rot=None, proj=None):
        """x (B, T, C) -> qi (B, Hkv, T, Di), ki (B, T, Di). Reads x.detach(): the LM loss must not reach it.
        proj: wi(x) when the caller has it (a decode step's stacked product, without gradients)."""
        cfg, B, T, _ = self.cfg, *x.shape
        proj = self.wi(x.detach()) if proj is None else proj                       # (B, T, (Hkv + 1) Di)
        qi, ki = proj.split([cfg.n_kv_head * cfg.index_dim, cfg.index_dim], dim=-1)
        qi = qi.view(B, T, cfg.n_kv_head, cfg.index_dim).transpose(1, 2)
        if not cfg.index_rope:  # the scores see content only: a fact scores alike at any distance, even past seq_len
            return qi, ki
        # RoPE by default: the teacher's scores (q . k) depend on distance, so the student's may as well
        table = (rot or rope_tables(pos, cfg))[cfg.index_dim]
        return rope(qi, table), rope(ki, table)

    def forward(self, x, pos, cache=None, kl_support=None, rot=None, dense=False):
        """x (B, T, C), pos (T,) positions (rot: their rope_tables, when the caller has them). Three paths:
          a whole sequence from position 0 (training, eval, prefill): MSA (_sparse) or dense causal attention
          (dense=True: an MSA layer attends densely too, its index branch learning from the dense KL);
          with a KVCache, this chunk's keys are also written into it at pos;
          with a KVCache and T == 1: one token decoded against everything cached (_decode).
        kl_support None (no KL), 'sparse' (the chosen blocks) or 'dense' (every visible block: the warm-up).
        Returns y (B, T, C) and the KL (a scalar tensor, or None)."""
        cfg, B, T, _ = self.cfg, *x.shape
        pqkv = pi = None
        if cache is not None and T == 1 and cache.w is not None:
            # a decode step: q, k, v and the index branch's qi, ki from one product of the weights stacked (one
            # small kernel a layer fewer, which is what a step of one token costs)
            pqkv, pi = decode_linear(self.backend, x, cache.w, cache).split(
                [self.wqkv.out_features, self.wi.out_features], dim=-1)
        elif cache is not None and T == 1:
            pqkv = decode_linear(self.backend, x, self.wqkv.weight, cache)           # a layer without an index
        q, k, v = self.qkv(x, pos, rot, pqkv)                                         # (B, Hq or Hkv, T, D)
        qi, ki = self.index_branch(x, pos, rot, pi) if self.learned else (None, None)  # (B, Hkv, T, Di), (B, T, Di)
        kl = None
        if cache is not None:
            # the index keys as cached: as they are, or (fp8) e4m3 + a power-of-two scale per token. A decode step
            # of an fp8 index leaves its new key to sparse_decode (new_ki), which quantizes and writes it in its
            # scoring launch: in a compiled step the quantization is a row reduction, a launch of its own a layer
            fp8 = self.learned and cfg.index_fp8
            new_ki = fp8 and T == 1 and self.sparse and not cache.dense and cache.ki is not None
            if new_ki:
                cache.write(pos, k, v)
            else:
                cache.write(pos, k, v, *(msa_ref.fp8_quantize(ki) if fp8 else (ki, None)))
        if cache is not None and T == 1:
            y = self._decode(q, qi, pos, cache, ki[:, 0] if new_ki else None)
        elif self.sparse and not dense:  # the KL on the chosen blocks comes with the attention (one call shares work)
            y, _, _, kl = self._sparse(q, k, v, qi, ki, with_kl=kl_support == "sparse" and self.learned)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if kl is None and kl_support is not None and self.learned:  # the dense KL (a blind rule has nothing to teach)
            kl = self._kl_dense(q, k, qi, ki)
        return decode_linear(self.backend, y.transpose(1, 2).reshape(B, T, -1), self.wo.weight, cache), kl

    def _sparse(self, q, k, v, qi, ki, with_kl=False):
        """MSA over a whole sequence: the index branch picks K blocks per query and group (no gradient through the
        choice), or a blind rule does (cfg.msa_select; qi, ki unused), the main branch attends over them.
        Returns y (B, Hq, T, D), block_idx (B, Hkv, T, K), lse (B, Hq, T) and, with_kl, the index branch's KL loss
        on the chosen blocks (gradients to qi, ki only; the attention's lse is its teacher's normaliser), else None."""
        cfg, (B, Hkv, T, _) = self.cfg, k.shape
        with torch.no_grad():
            if self.learned:
                block_idx = self.backend.index_topk(qi.detach(), ki.detach(), cfg.msa_block_size, cfg.msa_topk,
                                                    fp8=cfg.index_fp8)
            else:
                block_idx = self.backend.fixed_block_idx(B, Hkv, T, cfg.msa_block_size, cfg.msa_topk, cfg.msa_select,
                                                         device=k.device)
        if with_kl:
            y, lse, kl = self.backend.sparse_attention_kl(q, k, v, qi, ki, block_idx, cfg.msa_block_size)
            return y, block_idx, lse, kl
        y, lse = self.backend.sparse_attention(q, k, v, block_idx, cfg.msa_block_size)
        return y, block_idx, lse, None

    def _kl_dense(self, q, k, qi, ki):
        """The index branch's KL loss on every visible block (kl_support 'dense', the warm-up, or a layer attending
        densely), whatever the main branch read. Gradients reach qi, ki only."""
        B, Hkv, T, _ = qi.shape
        bs = self.cfg.msa_block_size
        block_idx = msa_ref.dense_block_idx(B, Hkv, T, bs, q.device)
        return self.backend.kl_loss(q.detach(), k.detach(), qi, ki, block_idx, bs)

    def _decode(self, q, qi, pos, cache, ki_new=None):
        """One new token: q (B, Hq, 1, D), qi (B, Hkv, 1, Di) at pos (1,), its keys already in the cache but for
        ki_new (B, Di), its index key, which sparse_decode writes. -> (B, Hq, 1, D). Everything stays on the device
        and in fixed shapes (a CUDA graph replays it)."""
        cfg, B = self.cfg, q.shape[0]
        n = pos + 1                                                                   # (1,) tokens cached
        if self.sparse and not cache.dense and not self.learned:
            # a blind rule: the blocks the forward picks for this position (a fresh draw for 'random'), as a mask
            # over the whole preallocated cache (fixed shapes), the G heads of a group sharing their group's row
            block_idx = self.backend.select_fixed(pos, B, cfg.n_kv_head, cfg.msa_block_size, cfg.msa_topk,
                                                  cfg.msa_select)                     # (B, Hkv, 1, K)
            mask = msa_ref.support_mask(block_idx, cfg.msa_block_size, pos, cache.max_len)  # (B, Hkv, 1, Tmax)
            mask = mask.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)         # (B, Hq, 1, Tmax)
            return F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=mask, enable_gqa=True)
        if self.sparse and not cache.dense:
            lens = n.to(torch.int32).repeat(B)                                        # (B,) every row at the same length
            y = self.backend.sparse_decode(q[:, :, 0], qi[:, :, 0], cache.k, cache.v, cache.ki, lens,
                                           cfg.msa_block_size, cfg.msa_topk, ki_scale=cache.ks, ki_new=ki_new)
            return y.unsqueeze(2)                                                     # (B, Hq, 1, D)
        # dense layers, and MSA layers under decode='dense': attention over the whole preallocated cache with its
        # unwritten tail masked (it reads Tmax tokens, not n: fixed shapes). The Hq heads stay heads (enable_gqa):
        # folding a group's heads into query rows would leave the backend only B * Hkv programs to stream the cache
        visible = (torch.arange(cache.max_len, device=q.device) < n).view(1, 1, 1, -1)  # (1, 1, 1, Tmax)
        return F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=visible, enable_gqa=True)

    @torch.no_grad()
    def stacked_weight(self):
        """wqkv's and wi's weights as one (rows, C) matrix for decode steps (KVCache.w), or None when the layer has
        no index branch to read. A copy: generate() takes it when it starts, from the weights as they are then."""
        return torch.cat([self.wqkv.weight, self.wi.weight]) if self.learned else None

    @torch.no_grad()
    def recall(self, x, pos):
        """The indexer recall of this MSA layer on x (B, T, C): the dense teacher's attention mass inside the chosen
        blocks, averaged over batch, heads and queries. A head's mass on a set of keys is exp(lse over those keys -
        lse over every visible key), so two attention passes give it: the chosen blocks', and every block's."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, pos)
        qi, ki = self.index_branch(x, pos) if self.learned else (None, None)
        _, _, lse, _ = self._sparse(q, k, v, qi, ki)                              # (B, Hq, T)
        every = msa_ref.dense_block_idx(B, self.cfg.n_kv_head, T, self.cfg.msa_block_size, x.device)
        _, lse_all = self.backend.sparse_attention(q, k, v, every, self.cfg.msa_block_size)  # (B, Hq, T)
        return (lse.float() - lse_all.float()).exp().mean()


class Block(nn.Module):
    def __init__(self, cfg, sparse, backend):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.n_embd), nn.RMSNorm(cfg.n_embd)
        self.attn = Attention(cfg, sparse, backend)
        self.moe = MoE(cfg, getattr(backend, "expert_mix", None))  # msa_triton's on a GPU; msa_ref has none

    def forward(self, x, pos, cache=None, kl_support=None, rot=None, stats=True, dense=False):
        """x (B, T, C) at positions pos (T,) -> x (B, T, C), the KL (or None), the MoE's balance and load (None
        unless stats). cache, kl_support, dense: Attention.forward's; rot: rope_tables(pos) when the caller has them."""
        a, kl = self.attn(self.norm1(x), pos, cache, kl_support, rot, dense)
        x = x + a
        m, balance, load = self.moe(self.norm2(x), stats)
        return x + m, kl, balance, load


class GPT(nn.Module):

    def __init__(self, cfg, backend="auto"):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.backend = get_backend(backend)
        n_sparse_from = cfg.n_layer if cfg.attention == "dense" else cfg.n_dense_layers
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.patch_proj = nn.Linear(cfg.patch_dim, cfg.n_embd)  # a flattened image patch -> one token's embedding
        self.blocks = nn.ModuleList([Block(cfg, i >= n_sparse_from, self.backend) for i in range(cfg.n_layer)])
        self.norm_f = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying, as in GPT-2
        for name, p in self.named_parameters():  # GPT-2 init; residual projections scaled by depth
            if name.endswith((".wo.weight",)):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
            elif name.endswith(".weight") and p.dim() == 2 and "norm" not in name:
                nn.init.normal_(p, std=0.02)
        nn.init.zeros_(self.patch_proj.bias)
        self.decoder = None  # generate's caches and compiled, graphed step, kept for its next call
        self.rope_n = 0      # positions the RoPE tables cover
        self.rope_reach(ROPE_REACH)

    def rope_reach(self, n):
        """Make the RoPE tables cover positions 0 .. n - 1 (train.py and generate call it before they compile).
        GPT.forward reads its rows of them, and computes the rows of positions past them, which inside a compiled
        step recomputes the float64 angles in every kernel that rotates. Buffers rope_{d} (2, n, d): cos and sin as
        the int32 bits of float32, so that model.to(torch.bfloat16) leaves them exact; not saved in checkpoints (they
        follow from cfg)."""
        if n <= self.rope_n:
            return
        pos = torch.arange(n, device=self.wte.weight.device)
        for d, (cos, sin) in rope_tables(pos, self.cfg).items():
            self.register_buffer(f"rope_{d}", torch.stack([cos, sin]).view(torch.int32), persistent=False)
        self.rope_n = n

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed(self, x, patches=None, decoding=False):
        """x (B, T) token ids, patches (B, T, patch_dim) read where x == img_patch_id -> h (B, T, C).
        decoding: x holds sampled tokens, which are not checked for image-patch ids (that check is a host sync
        per step); such a token embeds as a token."""
        cfg, (B, T) = self.cfg, x.shape
        h = self.wte(x)                                                      # (B, T, C)
        if patches is not None:
            if patches.shape != (B, T, cfg.patch_dim):
                raise ValueError(f"patches must be [B={B}, T={T}, {cfg.patch_dim}], got {tuple(patches.shape)}")
            is_patch = (x == cfg.img_patch_id).unsqueeze(-1)                 # (B, T, 1)
            h = torch.where(is_patch, self.patch_proj(patches.to(self.patch_proj.weight.dtype)).to(h.dtype), h)
        elif not decoding and bool((x == cfg.img_patch_id).any()):
            raise ValueError("x holds image-patch tokens but no patches were given")
        return h

    def forward(self, x, y=None, patches=None, kl_dense=False, cache=None, pos0=0, msa_dense=False):
        """x (B, T) token ids; y (B, T) targets, -1 where no loss; patches (B, T, patch_dim) float, read where
        x == img_patch_id. kl_dense: KL over every visible token (the indexer warm-up) instead of the chosen blocks.
        msa_dense: the MSA layers attend to every visible token, as dense layers do, and learn from the dense KL: a
        warm-up in which their attention learns where to look (the teacher the index branch follows) before it
        must choose.
        cache/pos0: used by generate(); cache is a list of KVCache, one per block, and then only the last position's
        logits are returned. pos0 is the position of x[:, 0]: an int, or a (1,) long tensor on x's device (a CUDA
        graph replays the step with a new value in it).
        Without y: logits (B, T, V), None. With y: None (the loss is computed chunk by chunk from the last hidden
        states, so a long-context step never holds the logits) and losses: lm, kl (summed over MSA layers),
        balance (mean over layers), kl_layers (n_msa,) ((0,) under a blind msa_select), expert_load (n_layer, E)."""
        B, T = x.shape
        if y is not None and y.shape != x.shape:
            raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
        if cache is not None and T > 1 and not (isinstance(pos0, int) and pos0 == 0):  # the prefill attends within x
            raise ValueError(f"a cached call of T > 1 tokens is a prefill and starts at pos0 = 0, got T={T}, "
                             f"pos0={pos0}; continue a cache one token a call")
        if cache is None and not isinstance(pos0, int):
            raise ValueError("pos0 as a tensor is a decode step's position and comes with a cache; got cache=None")
        h = self.embed(x, patches, decoding=cache is not None and T == 1)   # (B, T, C)
        pos = pos0 + torch.arange(T, device=x.device)                        # (T,); pos0 an int or a (1,) device tensor
        end = pos0 + T if isinstance(pos0, int) else cache[0].max_len       # positions stay below it (host-known)
        if end <= self.rope_n:                                               # the tables' rows, once for every layer
            rot = {d: tuple(getattr(self, f"rope_{d}")[:, pos].view(torch.float32)) for d in rope_widths(self.cfg)}
        else:                                                                # past them: computed here (rope_reach)
            rot = rope_tables(pos, self.cfg)
        kl_support = None if y is None else ("dense" if kl_dense else "sparse")
        kls, balances, loads = [], [], []                                    # balances, loads: with y only
        for i, block in enumerate(self.blocks):
            h, kl, balance, load = block(h, pos, None if cache is None else cache[i], kl_support, rot, y is not None,
                                         msa_dense)
            kls += [] if kl is None else [kl]
            balances.append(balance)
            loads.append(load)
        if cache is not None:
            h = h[:, -1:]                                                    # only the next token's logits
        h = self.norm_f(h)                                                   # (B, T, C)
        if y is None:
            return decode_linear(self.backend, h, self.lm_head.weight, cache), None     # (B, T, V)
        # the loss straight from h and the head's weight: the Triton backend never builds the (B*T, V) logits
        h, y = h.reshape(B * T, -1), y.reshape(-1)                           # (N, C), (N,)
        if h.device.type == "cpu":  # only the rows with a target: the head is most of a small CPU step, and image
            keep = y != -1          # tokens are half the CPU preset's rows (a GPU would wait for the count); one
            h, y = h[keep], y[keep]  # mask, so that a compiled step sees one row count for both
        lm = self.backend.linear_cross_entropy(h, self.lm_head.weight, y)
        kl_layers = torch.stack(kls).float() if kls else lm.new_zeros(0)
        return None, dict(lm=lm, kl=kl_layers.sum(), kl_layers=kl_layers.detach(),
                          balance=torch.stack(balances).mean(), expert_load=torch.stack(loads))

    @torch.no_grad()
    def indexer_recall(self, x, patches=None):
        """x (B, T) (patches as for forward) -> recall (n_msa,) float32, one per MSA layer: the dense teacher's
        attention mass inside the chosen blocks (the indexer's, or a blind rule's; Attention.recall), averaged over
        batch, heads and queries. 1 when the chosen blocks hold all of it. Runs the blocks up to the last MSA layer
        only."""
        T = x.shape[1]
        sparse = [block.attn.sparse for block in self.blocks]
        if not any(sparse):
            return torch.zeros(0, device=x.device)
        h, pos = self.embed(x, patches), torch.arange(T, device=x.device)   # (B, T, C), (T,)
        recalls = []
        for block in self.blocks[:len(sparse) - sparse[::-1].index(True)]:   # up to the last MSA layer
            if block.attn.sparse:
                recalls.append(block.attn.recall(block.norm1(h), pos))
            h = block(h, pos, stats=False)[0]
        return torch.stack(recalls)

    def flops_per_token(self, seq_len, kl_dense=False, msa_dense=False):
        """Model FLOPs of one training token (forward + backward) on rows of seq_len tokens, for the MFU: what the
        model needs, not what the kernels happen to do (no recomputation, no padding). A multiply-add is 2 FLOPs;
        backward = 2x forward.
          matmul weights: 6 * (active params per token): attention Wq, Wk, Wv, Wo, the router, expert_topk experts
            (+ the shared one) of 3 C x H matrices, the LM head. The index branch (Wqi, Wki) counts 4, not 6: it
            reads x.detach(), so its backward has no input gradient. Embedding lookups are not matmuls; the
            image-patch projection (patch_dim inputs per token) is left out.
          attention: q.k and p.v over the keys n_t that query t attends, 2 * 2 * Hq * D * n_t forward, x3:
            dense: n_t = t + 1 (causal); MSA: the local block's visible part + K - 1 full blocks (all visible
            blocks while t // bs < K), i.e. min(K * bs, t + 1) up to the local block's partial fill; MSA layers
            attending densely (msa_dense) count as dense, with the dense KL;
          MSA index branch (msa_select 'indexer' only), no gradient through the selection: scores qi.ki over all
            t + 1 visible tokens and the block max, 2 * Hkv * Di * (t + 1) (none under msa_dense: nothing is chosen);
          MSA KL over the support n_t (the chosen blocks, or every visible token during the dense warm-up, kl_dense):
            teacher q.k without gradient 2 * Hq * D * n_t, student qi.ki forward + backward 6 * Hkv * Di * n_t.
        Averaged over the seq_len positions of a row."""
        cfg = self.cfg
        C, H, Hq, Hkv, Di = cfg.n_embd, cfg.expert_hidden, cfg.n_head, cfg.n_kv_head, cfg.index_dim
        D, bs, K, L = C // Hq, cfg.msa_block_size, cfg.msa_topk, cfg.n_layer
        n_msa = sum(block.attn.sparse for block in self.blocks)
        t = torch.arange(seq_len, dtype=torch.float64)                       # query positions
        n_dense_keys = (t + 1).mean().item()
        n_msa_keys = n_dense_keys if msa_dense else \
            torch.where(t // bs + 1 <= K, t + 1, (K - 1) * bs + t % bs + 1).mean().item()
        n_kl_keys = n_dense_keys if kl_dense else n_msa_keys
        attn_params = 2 * C * Hq * D + 2 * C * Hkv * D
        moe_params = C * cfg.n_expert + (cfg.expert_topk + cfg.shared_expert) * 3 * C * H
        n_idx = n_msa if cfg.msa_select == "indexer" else 0                  # a blind rule runs no index branch
        matmul = 6 * (L * (attn_params + moe_params) + cfg.vocab_size * C) + 4 * n_idx * (C * Hkv * Di + C * Di)
        attn = 12 * Hq * D * ((L - n_msa) * n_dense_keys + n_msa * n_msa_keys)
        index = n_idx * (2 * Hkv * Di * n_dense_keys * (not msa_dense) + (2 * Hq * D + 6 * Hkv * Di) * n_kl_keys)
        return matmul + attn + index

    def decode_step(self, tok, pos, cache, out, uniform, temperature, top_k):
        """One new token per row, on fixed tensors that it updates in place, so that torch.compile sees one static
        shape and a CUDA graph replays it: tok (B, 1) the last token, at position pos (1,) long on the device;
        cache the KVCaches (tok's keys are written into them); out (B, Tout) the sequences; uniform (B, V) draws
        in [0, 1) for sample_token (None when greedy). The next token goes into out[:, pos + 1] and tok, and pos
        moves on by one. Nothing in it waits on the host."""
        logits = self(tok, cache=cache, pos0=pos)[0][:, -1].float()          # (B, V)
        nxt = sample_token(logits, temperature, top_k, uniform)[:, None]     # (B, 1)
        out.index_copy_(1, pos + 1, nxt)
        tok.copy_(nxt)
        pos.add_(1)

    def new_cache(self, max_len, decode="sparse"):
        """One KVCache per layer for max_len tokens (decode: generate's), each with its layer's stacked weight."""
        return [KVCache(max_len, dense=decode == "dense", w=block.attn.stacked_weight()) for block in self.blocks]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, patches=None, generator=None, decode="sparse",
                 compile="auto"):
        """idx (B, T0) prompt (patches (B, T0, patch_dim) if it holds an image) -> (B, T0 + max_new_tokens) tokens.
        The prompt is prefilled with the sparse forward, eagerly (any prompt length, nothing to recompile), filling
        one KVCache per layer (allocated for T0 + max_new_tokens tokens); then each new token (decode_step) attends
        through backend.sparse_decode, or, with decode='dense', MSA layers attend to the whole cache like the dense
        layers (the index is ignored). Sampling: sample_token (temperature 0 is greedy), its uniform draws from
        generator (torch's global one if None), one (B, V) draw per token, the same on every path.
        compile: decode_step through torch.compile (one static shape; the prefill stays eager): 'auto' (inductor on
        CUDA, not on a CPU), True (inductor), False, or a torch.compile backend's name ('aot_eager' for tests).
        If it fails, one line says why and the step runs eagerly.
        On CUDA the step is captured in a CUDA graph after one run and replayed: the host only draws the uniforms
        and launches the replay. The caches, the step and its graph stay in self.decoder for the next call with the
        same shapes, settings, weight and RoPE-table tensors, which only prefills and replays; self.decoder = None
        frees them."""
        if decode not in ("sparse", "dense"):
            raise ValueError(f"decode must be 'sparse' or 'dense', got {decode!r}")
        if not (idx.dim() == 2 and idx.shape[1] >= 1 and max_new_tokens >= 0):
            raise ValueError(f"expected a prompt idx (B, T0 >= 1) and max_new_tokens >= 0, got idx of shape "
                             f"{tuple(idx.shape)} and max_new_tokens={max_new_tokens}")
        B, T0 = idx.shape
        self.rope_reach(T0 + max_new_tokens)                                 # before the step is compiled
        if max_new_tokens == 0:                                              # the prefill alone, in its own cache
            self(idx, patches=patches, cache=self.new_cache(T0, decode))
            return idx.clone()
        backend = {"auto": "inductor" if idx.is_cuda else None, True: "inductor", False: None}.get(compile, compile)
        kind = idx.device.type
        key = (B, T0 + max_new_tokens, decode, temperature, top_k, backend, str(idx.device),
               torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind),
               tuple((t.data_ptr(), t.dtype) for t in (*self.parameters(), *self.buffers())))  # the RoPE tables too
        st = self.decoder
        if st is None or st.key != key:
            self.decoder = None                                              # the old state's memory goes first
            step = self.decode_step if backend is None else compiled_step(self.decode_step, backend)
            # (B, V) uniforms: drawn outside the graph (the generator stays the caller's), read inside it
            uniform = idx.new_empty(B, self.cfg.vocab_size, dtype=torch.float32) if temperature > 0 else None
            self.decoder = st = SimpleNamespace(key=key, step=step, replay=None, uniform=uniform,
                                                cache=self.new_cache(T0 + max_new_tokens, decode),
                                                out=idx.new_zeros(B, T0 + max_new_tokens),  # (B, T0 + new)
                                                tok=idx.new_zeros(B, 1), pos=idx.new_zeros(1))  # the step's inputs
        else:                                                                # the weights may have trained since
            for c, block in zip(st.cache, self.blocks):
                if c.w is not None:
                    c.w.copy_(block.attn.stacked_weight())
        out, tok, pos, cache, uniform, step = st.out, st.tok, st.pos, st.cache, st.uniform, st.step
        out[:, :T0] = idx
        logits = self(idx, patches=patches, cache=cache)[0][:, -1].float()   # prefill: (B, V)

        def draw():
            if uniform is not None:
                uniform.uniform_(generator=generator)

        draw()
        tok.copy_(sample_token(logits, temperature, top_k, uniform)[:, None])
        out[:, T0] = tok[:, 0]
        pos.fill_(T0)                                                        # tok's position
        for _ in range(max_new_tokens - 1):
            draw()
            if not idx.is_cuda:
                step(tok, pos, cache, out, uniform, temperature, top_k)
            elif st.replay is None:  # runs it once, then captures; the graph keeps the tensors, st keeps the graph
                st.replay = cuda_graphed(lambda: step(tok, pos, cache, out, uniform, temperature, top_k))[1]
            else:
                st.replay()
        return out.clone()                                                   # out is written again by the next call


# dense (not 2:4 sparse) bf16 tensor-core peak FLOP/s per GPU, by a word of torch.cuda.get_device_name() (so an
# "RTX A1000" is no A100); the first match counts: the PCIe and NVL H100s come before the SXM one
GPU_PEAK_FLOPS = [("H100 PCIE", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("G?H200", 989e12), ("A100", 312e12)]


def gpu_peak_flops(name):
    """The dense bf16 peak FLOP/s of the GPU named name (as torch.cuda.get_device_name gives it), or None when
    it is not in GPU_PEAK_FLOPS: the MFU is then left unsaid rather than computed against a wrong peak."""
    return next((flops for key, flops in GPU_PEAK_FLOPS if re.search(rf"\b{key}\b", name.upper())), None)
