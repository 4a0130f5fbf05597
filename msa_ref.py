"""
MiniMax Sparse Attention (MSA), the readable reference.

This file is the definition: every other implementation in the repository (msa_triton, the
course kit) is tested against it. It is plain PyTorch, computes in float32 (float64 if given), and
freely builds T x T tensors, so it is meant for reading and for short sequences.

Shapes: B batch, T tokens, Hq query heads, Hkv KV heads (= GQA groups), G = Hq // Hkv,
D head dim, Di index dim, bs block size, K blocks per query, nb = ceil(T / bs) blocks.

An MSA layer attends in two steps:
  1. the index branch (one index query per group, one index key per token, shared by all groups)
     scores every visible token, max-pools the scores over blocks of bs tokens, and picks, for each
     query and group, the K - 1 best earlier blocks plus the query's own ("local") block;
  2. the main branch runs exact softmax attention over the tokens of the chosen blocks only.
The index branch learns from a KL loss that pulls its token distribution towards the main branch's
attention (the "teacher"); the language-model loss never reaches it.

The MSA functions come in that order (index branch, main branch, KL loss, selections without an index
branch, decoding), then the language-model loss. Their input checks, shared with msa_triton, are in msa_checks.py.
"""
import math

import torch
import torch.nn.functional as F

from msa_checks import check_decode_inputs, check_inputs, check_sizes


# ---------------------------------------------------------------------------------------------
# the index branch: which blocks does each query read?

def _visible(q_pos, Tk):
    """Causality. q_pos (...) query positions -> bool (..., Tk): key j is visible iff j <= q_pos."""
    return torch.arange(Tk, device=q_pos.device) <= q_pos.unsqueeze(-1)


def block_scores(qi, ki, block_size, q_pos):
    """Max-pooled index scores. qi (B, Hkv, Tq, Di), ki (B, Tk, Di), q_pos broadcastable to (B, Hkv, Tq)
    -> (B, Hkv, Tq, nb) float32, -inf for a block with no visible token."""
    B, Hkv, Tq, Di = qi.shape
    Tk = ki.shape[1]
    nb = math.ceil(Tk / block_size)
    dt = torch.promote_types(qi.dtype, torch.float32)
    # times 1 / sqrt(Di), one product rounded alike everywhere (GPU divisions are not), so ties agree with the kernels
    s = qi.to(dt) @ ki.to(dt).unsqueeze(1).transpose(-1, -2) * (1 / math.sqrt(Di))  # (B, Hkv, Tq, Tk)
    s = s.masked_fill(~_visible(q_pos, Tk), float("-inf"))                    # no peeking at the future
    s = F.pad(s, (0, nb * block_size - Tk), value=float("-inf"))              # (B, Hkv, Tq, nb*bs)
    return s.view(B, Hkv, Tq, nb, block_size).amax(-1)                         # (B, Hkv, Tq, nb)


def select_blocks(S, q_pos, block_size, topk):
    """Top-k with the local block forced. S (..., nb) block scores, q_pos broadcastable to S.shape[:-1].
    Returns int32 (..., K): the chosen earlier blocks by descending score (ties: the lower block index
    first), then the local block q_pos // bs in the last valid slot, then -1 padding.
    Every query gets min(K, q_pos // bs + 1) valid entries."""
    nb = S.shape[-1]
    local = (q_pos // block_size).unsqueeze(-1)                                # (..., 1) the local block l
    S = S.masked_fill(torch.arange(nb, device=S.device) >= local, float("-inf"))  # only earlier blocks compete
    order = S.sort(dim=-1, descending=True, stable=True).indices               # stable: ties -> lower index
    return _with_local(F.pad(order, (0, max(0, topk - nb)), value=-1), local, topk)  # -1 pads nb < K up to K


def _with_local(far, local, topk):
    """select_blocks' layout from far (..., >= K) earlier blocks in the order to keep and local (..., 1) the local
    block l: the first min(l, K - 1) of far, then l, then -1 padding -> int32 (..., K)."""
    n_far = local.clamp(max=topk - 1)                                          # (..., 1) earlier blocks taken
    slot = torch.arange(topk, device=far.device)                               # (K,)
    idx = torch.where(slot < n_far, far[..., :topk], -1)                       # keep the n_far first
    return torch.where(slot == n_far, local, idx).to(torch.int32)              # local in the last valid slot


def index_topk(qi, ki, block_size, topk, fp8=False):
    """qi (B, Hkv, T, Di), ki (B, T, Di) -> block_idx int32 (B, Hkv, T, K), see select_blocks.
    fp8=True: qi and ki rounded to float8 e4m3 (fp8_quantize) before scoring, as an fp8 indexer computes them."""
    B, Hkv, T = check_inputs(qi=qi, ki=ki, block_size=block_size, topk=topk)
    if fp8:
        qi, ki = (fp8_dequantize(*fp8_quantize(x)) for x in (qi, ki))
    q_pos = torch.arange(T, device=qi.device)                                  # (T,)
    return select_blocks(block_scores(qi, ki, block_size, q_pos), q_pos, block_size, topk)


def fp8_quantize(x):
    """x (..., d) -> (x8 float8_e4m3fn (..., d), scale float32 (...,)), x ~= x8 * scale: the rounding of the optional
    fp8 index scores (DeepSeek's indexer runs in fp8: twice bf16's matrix rate on Hopper, half the key-cache bytes).
    Each vector's scale is the power of two that puts max|x| in [128, 256) (e4m3 reaches 448); a power of two
    scales exactly, so every implementation rounds every element alike."""
    e = torch.frexp(x.float().abs().amax(-1))[1].clamp(-118, 128)             # max|x| = m * 2^e, m in [0.5, 1)
    scale = ((e + 119) << 23).view(torch.float32)                              # 2^(e - 8), built from its bits
    return (x.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale    # |x8| <= 256 after rounding


def fp8_dequantize(x8, scale):
    """(x8 (..., d), scale (...,)) -> float32 (..., d): the values the fp8 scores are exact products of."""
    return x8.float() * scale.unsqueeze(-1)


# ---------------------------------------------------------------------------------------------
# the main branch: exact softmax attention over the chosen blocks

def support_mask(block_idx, block_size, q_pos, Tk):
    """Token-level support. block_idx (B, Hkv, Tq, K) -> bool (B, Hkv, Tq, Tk): key j visible to query t."""
    nb = math.ceil(Tk / block_size)
    idx = block_idx.long().masked_fill(block_idx < 0, nb)                      # -1 -> a spare column
    chosen = torch.zeros(*block_idx.shape[:3], nb + 1, dtype=torch.bool, device=block_idx.device)
    chosen.scatter_(-1, idx, True)                                             # (B, Hkv, Tq, nb+1)
    tokens = chosen[..., :nb].repeat_interleave(block_size, dim=-1)[..., :Tk]  # (B, Hkv, Tq, Tk)
    return tokens & _visible(q_pos, Tk)


def _grouped_scores(q, k, mask):
    """Masked attention logits per head. q (B, Hq, Tq, D), k (B, Hkv, Tk, D) -> (B, Hkv, G, Tq, Tk)."""
    B, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dt).reshape(B, Hkv, Hq // Hkv, Tq, D)                            # heads of one group together
    s = qg @ k.to(dt).unsqueeze(2).transpose(-1, -2) / math.sqrt(D)            # (B, Hkv, G, Tq, Tk)
    return s.masked_fill(~mask.unsqueeze(2), float("-inf"))


def _attend(q, k, v, mask):
    """Softmax attention on a mask. Returns out (B, Hq, Tq, D) and lse (B, Hq, Tq), both in float32+."""
    B, Hq, Tq, D = q.shape
    s = _grouped_scores(q, k, mask)                                            # (B, Hkv, G, Tq, Tk)
    lse = s.logsumexp(-1)                                                      # (B, Hkv, G, Tq)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)                       # empty rows: 0, not NaN
    out = p @ v.to(s.dtype).unsqueeze(2)                                       # (B, Hkv, G, Tq, D)
    return out.reshape(B, Hq, Tq, D), lse.reshape(B, Hq, Tq)


def sparse_attention(q, k, v, block_idx, block_size):
    """q (B, Hq, T, D), k and v (B, Hkv, T, D), block_idx (B, Hkv, T, K).
    Returns out (B, Hq, T, D) in q's dtype and the natural-log lse (B, Hq, T), float32 (float64 for float64 inputs).
    A row with no visible key (only possible for a hand-made block_idx) gives out 0 and lse -inf."""
    B, Hkv, T = check_inputs(q=q, k=k, v=v, block_idx=block_idx, block_size=block_size)
    q_pos = torch.arange(T, device=q.device)
    out, lse = _attend(q, k, v, support_mask(block_idx, block_size, q_pos, T))
    return out.to(q.dtype), lse


# ---------------------------------------------------------------------------------------------
# the KL alignment loss: teach the index branch where the main branch looks

def kl_loss(q, k, qi, ki, block_idx, block_size, lse=None):
    """mean over (b, g, t) of KL(p || r) on the support S(t, g) of the chosen blocks, where
      p = the main branch's attention averaged over the G heads of group g (a target: no gradient),
      r = softmax of the index scores qi . ki / sqrt(Di) over the same support.
    Gradients reach qi and ki only: d kl / d s_ij = (r - p) / (B * Hkv * T).
    lse (B, Hq, T), optional: what sparse_attention returned for these q, k, block_idx. It is the
    teacher's normaliser, so passing it saves recomputing it (the fast kernels gain most from this)."""
    B, Hkv, T = check_inputs(q=q, k=k, qi=qi, ki=ki, block_idx=block_idx, block_size=block_size)
    mask = support_mask(block_idx, block_size, torch.arange(T, device=q.device), T)  # (B, Hkv, T, T)
    with torch.no_grad():
        s = _grouped_scores(q, k, mask)                                        # (B, Hkv, G, T, T)
        if lse is None:
            lse = s.logsumexp(-1)
        lse = lse.reshape(B, Hkv, -1, T, 1).to(s.dtype)                         # (B, Hkv, G, T, 1): head g*G + i
        p = torch.exp(s - lse).mean(2)                                         # (B, Hkv, T, T) teacher
    dt = torch.promote_types(qi.dtype, torch.float32)
    s = qi.to(dt) @ ki.to(dt).unsqueeze(1).transpose(-1, -2) / math.sqrt(qi.shape[-1])
    log_r = torch.log_softmax(s.masked_fill(~mask, float("-inf")), dim=-1)     # (B, Hkv, T, T) student
    # p log p - p log r, with 0 log 0 = 0 and nothing taken off the support
    kl = torch.where(p > 0, p * (p.clamp_min(1e-30).log() - log_r), 0.0).sum(-1)  # (B, Hkv, T)
    return kl.mean()


def sparse_attention_kl(q, k, v, qi, ki, block_idx, block_size):
    """A training step's MSA layer: (out, lse) of sparse_attention and the kl_loss of the same selection given that
    lse (the teacher q, k detached). One function, so that a fast backend can share work between the two."""
    out, lse = sparse_attention(q, k, v, block_idx, block_size)
    return out, lse, kl_loss(q.detach(), k.detach(), qi, ki, block_idx, block_size, lse=lse)


# ---------------------------------------------------------------------------------------------
# selections without an index branch: every visible block (the dense KL warm-up's support), the blind controls

def dense_block_idx(B, Hkv, T, block_size, device=None):
    """Every visible block for every query: block_idx (B, Hkv, T, nb) with the local block last."""
    nb = math.ceil(T / block_size)
    local = torch.arange(T, device=device)[:, None] // block_size              # (T, 1)
    idx = torch.arange(nb, device=device).expand(T, nb)                        # (T, nb)
    return idx.masked_fill(idx > local, -1).to(torch.int32).expand(B, Hkv, T, nb)


def kl_loss_dense(q, k, qi, ki, block_size):
    """Warm-up variant: the same KL with every visible token as support (no top-k)."""
    B, Hkv, T = check_inputs(q=q, k=k, qi=qi, ki=ki, block_size=block_size)
    return kl_loss(q, k, qi, ki, dense_block_idx(B, Hkv, T, block_size, q.device), block_size)


SELECT_RULES = ("indexer", "local", "random")  # the indexer's choice, and two blind controls with the same K


def select_fixed(q_pos, B, Hkv, block_size, topk, rule, generator=None):
    """A blind selection (no scores): the controls that show what the learned choice adds. q_pos (Tq,) long
    -> block_idx int32 (B, Hkv, Tq, K) in select_blocks' layout (earlier blocks, the local block l = q_pos // bs
    in the last valid slot, -1 padding); while l + 1 <= K every visible block, as index_topk.
      'local':  the first block (a sink), the K - 2 blocks just before the local one and the local block (a
                sliding window): the same K blocks per query as the other rules;
      'random': K - 1 distinct earlier blocks drawn uniformly, fresh for each (b, g, t), and the local block.
    generator: a torch.Generator on q_pos' device for 'random' (None: torch's global RNG). No host sync."""
    if rule not in SELECT_RULES[1:]:
        raise ValueError(f"rule must be 'local' or 'random', got {rule!r}")
    Tq = q_pos.shape[0]
    local = (q_pos.long() // block_size).view(1, 1, Tq, 1).expand(B, Hkv, Tq, 1)  # (B, Hkv, Tq, 1) the local block l
    slot = torch.arange(topk, device=q_pos.device)                             # (K,)
    dense = local < topk                                                       # l + 1 <= K: every visible block
    if rule == "local":
        window = local - (topk - 1) + slot                                     # slots 1 .. K-2: blocks l-K+2 .. l-1
        far = torch.where(dense | (slot == 0), slot, window)                   # dense: block s in slot s; else the
                                                                               # sink (block 0) in slot 0, then the window
    else:
        # Floyd's algorithm: m distinct draws from [0, l) in m steps, each a draw t from [0, j] for j = l - m .. l - 1,
        # j taken instead when t is already chosen. Uniform over the m-subsets; (B, Hkv, Tq, m) memory, not nb.
        m = topk - 1
        u = torch.rand(B, Hkv, Tq, m, generator=generator, device=q_pos.device)  # (B, Hkv, Tq, m)
        chosen = local.new_empty(B, Hkv, Tq, 0)
        for i in range(m):
            j = (local - m + i).clamp(min=0)                                   # (B, Hkv, Tq, 1)
            t = torch.minimum((u[..., i:i + 1] * (j + 1)).long(), j)           # uniform in [0, j]
            t = torch.where((chosen == t).any(-1, keepdim=True), j, t)
            chosen = torch.cat([chosen, t], dim=-1)
        far = torch.where(dense, slot[:m], chosen)                             # (B, Hkv, Tq, m)
    return _with_local(F.pad(far, (0, 1), value=-1), local, topk)


def fixed_block_idx(B, Hkv, T, block_size, topk, rule, generator=None, device=None):
    """select_fixed for every position of a sequence: block_idx int32 (B, Hkv, T, K), index_topk's layout,
    for the blind rules 'local' and 'random' (msa_select in model.py)."""
    check_sizes(block_size=block_size, topk=topk)
    return select_fixed(torch.arange(T, device=device), B, Hkv, block_size, topk, rule, generator)


# ---------------------------------------------------------------------------------------------
# decoding: one new token per sequence against caches

def sparse_decode(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk, ki_scale=None, ki_new=None):
    """q (B, Hq, D), qi (B, Hkv, Di), caches k/v (B, Hkv, Tmax, D) and ki (B, Tmax, Di), cache_lens int (B,):
    tokens in each row's cache, the new token's k, v and ki already written at cache_lens - 1.
    Returns out (B, Hq, D): the new token's row of sparse_attention, selected exactly as index_topk would.
    An fp8 index-key cache: ki_cache, ki_scale (B, Tmax) = fp8_quantize(keys); it selects as index_topk(fp8=True).
    ki_new (B, Di): the new token's index key, written into the caches at cache_lens - 1 here (quantized for fp8)."""
    B, Hkv, Tmax = check_decode_inputs(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk, ki_scale,
                                       ki_new=ki_new)
    q_pos = (cache_lens.long() - 1).view(B, 1, 1)                 # (B, 1, 1) the new token's position
    if ki_new is not None:
        rows, at = torch.arange(B, device=q.device), q_pos.view(B)
        if ki_scale is None:
            ki_cache[rows, at] = ki_new
        else:                                                     # fp8, written as its bytes (no e4m3 index_put)
            x8, scale = fp8_quantize(ki_new)
            ki_cache.view(torch.uint8)[rows, at], ki_scale[rows, at] = x8.view(torch.uint8), scale
    if ki_scale is not None:                                      # fp8: score the e4m3-rounded qi and ki
        qi, ki_cache = fp8_dequantize(*fp8_quantize(qi)), fp8_dequantize(ki_cache, ki_scale)
    S = block_scores(qi.unsqueeze(2), ki_cache, block_size, q_pos)             # (B, Hkv, 1, nb)
    block_idx = select_blocks(S, q_pos, block_size, topk)                      # (B, Hkv, 1, K)
    out, _ = _attend(q.unsqueeze(2), k_cache, v_cache, support_mask(block_idx, block_size, q_pos, Tmax))
    return out.squeeze(2).to(q.dtype)                                          # (B, Hq, D)


# ---------------------------------------------------------------------------------------------
# the language-model loss: not MSA, but both modules expose it (msa_triton's never holds the logits)

def linear_cross_entropy(h, w, y):
    """Mean cross-entropy of the logits h @ w.T (N, V) against y int (N,), -1 = no loss; softmax in float32."""
    return F.cross_entropy((h @ w.t()).float(), y, ignore_index=-1)
