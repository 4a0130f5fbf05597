"""
MiniMax Sparse Attention (MSA) in Triton: the fast path. msa_ref.py is the definition; these kernels
compute the same functions (DESIGN.md section 3) without ever building a T x T tensor.

The package is a star: each kernel module imports only msa_triton.common (shared helpers, the KV-outer work
lists, the checking mode), msa_checks and msa_ref, never a sibling. This facade is the one place that knows
them all.
  attention.py       sparse_attention on the KV-outer path (forward, backward) and the query-outer baseline
  tile.py            sparse_attention and kl_loss on the query-tile path (short sequences: no work lists)
  index.py           index_topk (which blocks each query reads) and kl_loss on the KV-outer path
  decode.py          sparse_decode (one new token against the caches)
  cross_entropy.py   linear_cross_entropy (the language-model loss, chunked)
  experts.py         expert_mix (a decode step's MoE layer: routing, then the chosen experts' products, or all)
  rows.py            row_linear (a decode step's dense products: a few rows times a weight matrix)
  common.py          constants, Triton helpers, the naming convention of every kernel, the checking mode
Each public function checks its arguments' shapes and calls custom ops (torch.ops.nanomsa.*, registered on
import), so torch.compile traces through it without a graph break and a CUDA graph can capture it: no call
waits on the host. An eager call on real tensors runs the same functions without the dispatcher (common._Op),
which would cost tens of microseconds of host time a call. The checks that read the data (block_idx's and
cache_lens' values) run in the checking mode only: checks(True / False / None), or NANOMSA_CHECKS=1 / 0; by
default on for CPU tensors, off on CUDA.
sparse_attention and kl_loss pick their path from the shapes alone (tile.use_tile, DESIGN.md section 4), so
an eager call, a compiled graph and its fake implementations all take the same one. sparse_attention_kl, what a
training step calls, runs both on one path and hands the attention's work lists to the KL.
The blind selections (fixed_block_idx, select_fixed: the controls without a learned choice) are msa_ref's own
functions: plain torch ops with no host sync, as fast as a kernel would be for them.
"""
from msa_ref import fixed_block_idx, select_fixed  # the blind selections: plain torch, any device

from . import attention, index, tile
from .attention import attention_forward_query_outer
from .common import checks
from .cross_entropy import linear_cross_entropy
from .decode import sparse_decode
from .experts import expert_mix
from .index import index_topk
from .rows import row_linear

__all__ = ["index_topk", "fixed_block_idx", "select_fixed", "sparse_attention", "kl_loss", "sparse_attention_kl",
           "sparse_decode", "linear_cross_entropy", "expert_mix", "row_linear", "attention_forward_query_outer",
           "checks"]


def _tile_path(q, k, block_idx, block_size):
    """Whether a call takes the query-tile path (tile.use_tile on its shapes). The chosen path checks the
    arguments (both with msa_checks' messages), so arguments without the documented shapes go to the KV-outer
    path, whose checks say what is wrong, and are not checked twice here."""
    try:
        B, Hq, T, D = q.shape
        Hkv, K = k.shape[1], block_idx.shape[3]
    except (AttributeError, ValueError, IndexError):
        return False
    if not (isinstance(block_size, int) and Hkv >= 1):
        return False
    return tile.use_tile(B, Hkv, T, K, block_size, Hq // Hkv, D)


def sparse_attention(q, k, v, block_idx, block_size):
    """msa_ref.sparse_attention: q (B, Hq, T, D), k and v (B, Hkv, T, D), block_idx int (B, Hkv, T, K) with -1
    padding -> out (B, Hq, T, D) in q's dtype, lse fp32 (B, Hq, T). Differentiable in q, k, v through out and lse;
    deterministic backward; no host sync."""
    if _tile_path(q, k, block_idx, block_size):
        return tile.sparse_attention_tile(q, k, v, block_idx, block_size)
    return attention.sparse_attention(q, k, v, block_idx, block_size)


def kl_loss(q, k, qi, ki, block_idx, block_size, lse=None):
    """msa_ref.kl_loss: mean over (b, g, t) of KL(teacher || index scores) on the support of block_idx;
    differentiable in qi and ki only. lse: optional, what sparse_attention returned for these q, k, block_idx."""
    if _tile_path(q, k, block_idx, block_size):
        return tile.kl_loss_tile(q, k, qi, ki, block_idx, block_size, lse)
    return index.kl_loss(q, k, qi, ki, block_idx, block_size, lse)


def sparse_attention_kl(q, k, v, qi, ki, block_idx, block_size):
    """msa_ref.sparse_attention_kl: sparse_attention and the kl_loss of its selection given its lse, (out, lse, kl),
    in one call so that on the KV-outer path the KL's passes read the work lists the attention built (one build
    per selection instead of two)."""
    if _tile_path(q, k, block_idx, block_size):
        out, lse = tile.sparse_attention_tile(q, k, v, block_idx, block_size)
        return out, lse, tile.kl_loss_tile(q, k, qi, ki, block_idx, block_size, lse)
    out, lse, lists = attention.sparse_attention(q, k, v, block_idx, block_size, with_lists=True)
    return out, lse, index.kl_loss(q, k, qi, ki, block_idx, block_size, lse, lists)
