"""
The input checks of the MSA functions, shared by msa_ref and msa_triton so that both reject bad input with the
same one-line message (what was expected, what came). Shapes, dtypes and devices are checked on every call;
the checks that read a tensor's values (block_idx, cache_lens) cost a host sync on a GPU, so msa_triton runs
them only in its checking mode (msa_triton.checks) and msa_ref always.
Each check builds its message only when it fails: formatted on every call, the messages would cost more host time
than the checks (these run on every call of the fast path).
"""
import math

import torch


def check_block_idx(block_idx, nb):
    """block_idx's values: -1 (padding) or a block in [0, nb). Reads the tensor: a host sync on a GPU."""
    if block_idx.numel():
        lo, hi = torch.stack(torch.aminmax(block_idx)).tolist()                  # one host sync, not two
        if not (lo >= -1 and hi < nb):
            raise ValueError(f"block_idx entries must be -1 (padding) or a block in [0, {nb}), got range [{lo}, {hi}]")


def check_cache_lens(cache_lens, Tmax):
    """cache_lens' values lie in [1, Tmax]. Reads the tensor (a host sync on a GPU), so it is skipped while a
    CUDA graph is being captured (the kernels clamp the lengths) and while torch.compile traces (the values are
    not known then)."""
    if torch.compiler.is_compiling():
        return
    if not (cache_lens.is_cuda and torch.cuda.is_current_stream_capturing()):
        if not bool(((cache_lens >= 1) & (cache_lens <= Tmax)).all()):         # build the message only on failure:
            raise ValueError(f"cache_lens must lie in [1, Tmax={Tmax}], got {cache_lens.tolist()}")  # it copies


def check_sizes(**sizes):
    """Each size given by name (block_size, topk) is an int >= 1."""
    for name, n in sizes.items():
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"{name} must be an int >= 1, got {n!r}")


def check_inputs(q=None, k=None, v=None, qi=None, ki=None, block_idx=None, block_size=None, topk=None, values=True):
    """Raise ValueError, saying what was expected, for any inconsistent argument. Returns (B, Hkv, T).
    values=False checks shapes, dtypes and devices only, not block_idx's values (which need a host sync):
    msa_triton checks those in its checking mode (msa_triton.checks)."""
    check_sizes(**{name: n for name, n in (("block_size", block_size), ("topk", topk)) if n is not None})
    named = [(n, t) for n, t in (("q", q), ("k", k), ("v", v), ("qi", qi), ("ki", ki), ("block_idx", block_idx)) if t is not None]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        want = 3 if name == "ki" else 4
        if t.dim() != want:
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(t.shape)}")
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {', '.join(f'{n}: {t.device}' for n, t in named)}")
    ref = k if k is not None else qi  # the tensor that fixes (B, Hkv, T)
    B, Hkv, T = ref.shape[:3]
    if q is not None:
        if not (q.shape[0] == B and q.shape[2] == T):
            raise ValueError(f"q must be [B={B}, Hq, T={T}, D], got {tuple(q.shape)}")
        if q.shape[1] % Hkv != 0:
            raise ValueError(f"Hq must be a multiple of Hkv={Hkv}, got q with Hq={q.shape[1]}")
    if k is not None:
        if not (q is None or k.shape[3] == q.shape[3]):
            raise ValueError(f"k must have head dim D={q.shape[3]} like q, got {tuple(k.shape)}")
    if v is not None:
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if qi is not None:
        if qi.shape[:3] != (B, Hkv, T):
            raise ValueError(f"qi must be [B={B}, Hkv={Hkv}, T={T}, Di], got {tuple(qi.shape)}")
    if ki is not None:
        if ki.shape != (B, T, qi.shape[3]):
            raise ValueError(f"ki must be [B={B}, T={T}, Di={qi.shape[3]}], got {tuple(ki.shape)}")
    if block_idx is not None:
        if not (block_idx.shape[:3] == (B, Hkv, T) and block_idx.shape[3] >= 1):
            raise ValueError(f"block_idx must be [B={B}, Hkv={Hkv}, T={T}, K>=1], got {tuple(block_idx.shape)}")
        if block_idx.is_floating_point():
            raise ValueError(f"block_idx must be an integer tensor, got {block_idx.dtype}")
        if values:
            check_block_idx(block_idx, math.ceil(T / block_size))
    return B, Hkv, T


def check_decode_inputs(q, qi, k_cache, v_cache, ki_cache, cache_lens, block_size, topk, ki_scale=None, values=True,
                        ki_new=None):
    """sparse_decode's checks (both modules). Returns (B, Hkv, Tmax). values=False leaves out cache_lens' values
    (check_cache_lens, a host sync)."""
    named = (("q", q, "[B, Hq, D]"), ("qi", qi, "[B, Hkv, Di]"), ("k_cache", k_cache, "[B, Hkv, Tmax, D]"),
             ("v_cache", v_cache, "[B, Hkv, Tmax, D]"), ("ki_cache", ki_cache, "[B, Tmax, Di]"))
    for name, t, want in named:
        if not (isinstance(t, torch.Tensor) and t.dim() == want.count(",") + 1):
            raise ValueError(f"{name} must be {want}, got {tuple(t.shape) if isinstance(t, torch.Tensor) else t}")
    if len({t.device for _, t, _ in named}) > 1:
        raise ValueError(f"all tensors must be on one device, got {', '.join(f'{n}: {t.device}' for n, t, _ in named)}")
    check_sizes(block_size=block_size, topk=topk)
    B, Hkv, Tmax, D = k_cache.shape
    Di = qi.shape[2]
    if Tmax < 1:
        raise ValueError(f"the caches must hold Tmax >= 1 tokens, got {Tmax}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if not (q.shape[0] == B and q.shape[2] == D):
        raise ValueError(f"q must be [B={B}, Hq, D={D}] like the caches, got {tuple(q.shape)}")
    if q.shape[1] % Hkv != 0:
        raise ValueError(f"Hq must be a multiple of Hkv={Hkv}, got q with Hq={q.shape[1]}")
    if qi.shape[:2] != (B, Hkv):
        raise ValueError(f"qi must be [B={B}, Hkv={Hkv}, Di], got {tuple(qi.shape)}")
    if ki_cache.shape != (B, Tmax, Di):
        raise ValueError(f"ki_cache must be [B={B}, Tmax={Tmax}, Di={Di}], got {tuple(ki_cache.shape)}")
    if not (k_cache.dtype == q.dtype and v_cache.dtype == q.dtype):
        raise ValueError(f"k_cache and v_cache must have q's dtype {q.dtype}, got {k_cache.dtype}, {v_cache.dtype}")
    if ki_cache.dtype != (qi.dtype if ki_scale is None else torch.float8_e4m3fn):
        raise ValueError(f"ki_cache must have qi's dtype {qi.dtype} without ki_scale and must be float8_e4m3fn with "
                         f"it; got {ki_cache.dtype} with{'out' * (ki_scale is None)} ki_scale")
    if not (ki_scale is None or (isinstance(ki_scale, torch.Tensor) and ki_scale.dtype == torch.float32
                                 and ki_scale.shape == (B, Tmax) and ki_scale.device == q.device)):
        raise ValueError(f"ki_scale must be float32 [B={B}, Tmax={Tmax}] on {q.device}, "
                         f"got {getattr(ki_scale, 'dtype', type(ki_scale))} {tuple(getattr(ki_scale, 'shape', ()))}")
    if not (isinstance(cache_lens, torch.Tensor) and cache_lens.shape == (B,) and not cache_lens.is_floating_point()
            and cache_lens.dtype != torch.bool):
        raise ValueError(f"cache_lens must be int [B={B}], got {getattr(cache_lens, 'dtype', type(cache_lens))} "
                         f"{tuple(getattr(cache_lens, 'shape', ()))}")
    if cache_lens.device != q.device:
        raise ValueError(f"cache_lens must be on q's device {q.device}, got {cache_lens.device}")
    if ki_new is not None and not (isinstance(ki_new, torch.Tensor) and ki_new.shape == (B, Di)
                                   and ki_new.dtype == qi.dtype and ki_new.device == q.device):
        raise ValueError(f"ki_new must be [B={B}, Di={Di}] in qi's dtype {qi.dtype} on {q.device}, got "
                         f"{getattr(ki_new, 'dtype', type(ki_new))} {tuple(getattr(ki_new, 'shape', ()))}")
    if values:
        check_cache_lens(cache_lens, Tmax)
    return B, Hkv, Tmax
