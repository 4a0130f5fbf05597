"""
Exact sparse attention with an online softmax, in plain PyTorch (assignment 2's solution).

msa_ref.sparse_attention builds the whole (T x T) score matrix and masks it. This version never does:
it walks the K slots of block_idx one at a time, gathers the bs keys of each query's block in that
slot, and folds them into a running softmax (running max m, running sum l, running weighted sum acc),
exactly as the Triton kernels do. Memory is O(T * bs * D) per slot instead of O(T * T).
"""
import math

import torch

from msa_checks import check_inputs


def sparse_attention_online(q, k, v, block_idx, block_size):
    """
    q (B, Hq, T, D), k and v (B, Hkv, T, D), block_idx int (B, Hkv, T, K): for each query, distinct blocks
    (any order) and -1 padding. Returns out (B, Hq, T, D) in q's dtype and the natural-log lse (B, Hq, T)
    in float32 (float64 for float64 inputs): the same as msa_ref.sparse_attention, a row with no visible
    key included (out 0, lse -inf). Never builds a T x T tensor.
    """
    B, Hkv, T = check_inputs(q=q, k=k, v=v, block_idx=block_idx, block_size=block_size)
    Hq, D, K = q.shape[1], q.shape[3], block_idx.shape[3]
    G = Hq // Hkv
    dt = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(dt).reshape(B, Hkv, G, T, D) / math.sqrt(D)                      # heads of a group together
    kf, vf = k.to(dt), v.to(dt)
    m = torch.full((B, Hkv, G, T), float("-inf"), dtype=dt, device=q.device)   # running max of the scores
    l = torch.zeros(B, Hkv, G, T, dtype=dt, device=q.device)                   # running sum of exp(s - m)
    acc = torch.zeros(B, Hkv, G, T, D, dtype=dt, device=q.device)              # running sum of exp(s - m) v
    t = torch.arange(T, device=q.device)[:, None]                              # (T, 1) query positions
    for s in range(K):
        blk = block_idx[..., s].long()                                          # (B, Hkv, T)
        pos = blk.unsqueeze(-1) * block_size + torch.arange(block_size, device=q.device)  # (B, Hkv, T, bs)
        ok = (blk.unsqueeze(-1) >= 0) & (pos <= t)                              # a real block, no future key
        idx = pos.clamp(0, T - 1).reshape(B, Hkv, T * block_size, 1).expand(-1, -1, -1, D)
        kb = kf.gather(2, idx).view(B, Hkv, T, block_size, D)                   # (B, Hkv, T, bs, D)
        vb = vf.gather(2, idx).view(B, Hkv, T, block_size, D)
        sc = torch.einsum("bhgtd,bhtjd->bhgtj", qg, kb)                         # (B, Hkv, G, T, bs)
        sc = sc.masked_fill(~ok.unsqueeze(2), float("-inf"))
        m_new = torch.maximum(m, sc.amax(-1))
        m_ref = m_new.masked_fill(m_new == float("-inf"), 0.0)                 # nothing seen yet: avoid inf - inf
        alpha = torch.exp(m - m_ref)                                            # rescales what was summed so far
        p = torch.exp(sc - m_ref.unsqueeze(-1))                                 # (B, Hkv, G, T, bs), 0 where masked
        l = l * alpha + p.sum(-1)
        acc = acc * alpha.unsqueeze(-1) + torch.einsum("bhgtj,bhtjd->bhgtd", p, vb)
        m = m_new
    seen = l > 0
    out = acc / torch.where(seen, l, 1.0).unsqueeze(-1)                         # 0 for a row that saw nothing
    lse = torch.where(seen, m + torch.log(torch.where(seen, l, 1.0)), float("-inf"))
    return out.reshape(B, Hq, T, D).to(q.dtype), lse.reshape(B, Hq, T)
