"""
MiniMax Sparse Attention (MSA) in Triton: the fast path. msa_ref.py is the definition; these kernels
compute the same functions (DESIGN.md section 3) without ever building a T x T tensor.

The package is a star: each kernel module imports only msa_triton.common (shared helpers and the
KV-outer work lists) and msa_ref, never a sibling.
  attention.py       sparse_attention (forward and backward) and the query-outer baseline forward
  index.py           index_topk (which blocks each query reads) and kl_loss (the index branch's loss)
  decode.py          sparse_decode (one new token against the caches)
  cross_entropy.py   linear_cross_entropy (the language-model loss, chunked)
  common.py          constants, Triton helpers, the naming convention of every kernel, the checking mode
Each public function checks its arguments' shapes and calls a custom op (torch.ops.nanomsa.*, registered on
import), so torch.compile traces through it without a graph break and a CUDA graph can capture it: no call
waits on the host. The checks that read the data (block_idx's and cache_lens' values) run in the checking mode
only: checks(True / False / None), or NANOMSA_CHECKS=1 / 0; by default on for CPU tensors, off on CUDA.
"""
from .attention import attention_forward_query_outer, sparse_attention
from .common import checks
from .cross_entropy import linear_cross_entropy
from .decode import sparse_decode
from .index import index_topk, kl_loss

__all__ = ["index_topk", "sparse_attention", "kl_loss", "sparse_decode", "linear_cross_entropy",
           "attention_forward_query_outer", "checks"]
