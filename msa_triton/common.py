"""
What the MSA kernels share: constants, small Triton helpers, the precision switch, and the KV-outer
work lists (which queries read each KV block?) with the kernels that combine their partial results.
Every kernel module of this package imports this module, msa_checks and msa_ref, never a sibling.

Shapes: B batch, T tokens, Hq query heads, Hkv KV heads (= groups), G = Hq // Hkv, D head dim,
Di index dim, bs block size, K blocks per query, nb = ceil(T / bs). A "row" is one (query token, head)
pair. BH = B * Hkv indexes one (batch, group).

Naming, in every kernel of the package:
  x_ptr                      a pointer to tensor x (q_ptr, k_ptr, op_ptr, ...)
  s_xb, s_xh, s_xt, s_xd     x's strides along batch, head, token and feature (s_qb, s_kt, s_qid, ...)
  X_P                        a size padded to a power of two for tl.arange (D_P, G_P, K_P, DI_P)
  BLOCK_*                    a tile: BLOCK_N keys, BLOCK_Q queries per program or step
  ROWS                       rows (tokens x heads) of a tile of gathered queries
Inside the kernels scores are in log2 units, s2 = q.k * scale * log2(e), so that exp2 replaces exp;
an "lse2" is a log-sum-exp in those units (lse = lse2 * ln 2).

The KV-outer work lists (DESIGN.md section 4): the selection block_idx (B, Hkv, T, K) is inverted into
a CSR that lists, for each (batch, group, KV block), the (token, slot) entries that chose it, tokens
ascending: a counting sort in three launches (_csr). A program takes one segment of one block's list,
loads the block once and runs it against tiles of the gathered rows. Segments bound a program's work, so
a block chosen by many tokens (a sink) is split over programs; tokens run in chunks so that partial
buffers stay under PARTIAL_ELEMS.
An entry is token_in_chunk * K + slot; the kernels that read entries take K as a compile-time constant,
so that splitting one (ent // K, ent % K) is a shift and a mask, not an integer division per row.
"""
import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from msa_checks import check_block_idx, check_inputs

LOG2E = 1.4426950408889634                # log2(e): natural-log units -> log2 units
LN2 = 0.6931471805599453                  # ln(2) = 1 / LOG2E: log2 units -> natural-log units
LOG2E_K = tl.constexpr(LOG2E)             # the same numbers inside kernels (a @triton.jit function
LN2_K = tl.constexpr(LN2)                 # reads only globals that are tl.constexpr)
INT64_MIN = tl.constexpr(-(2 ** 63))      # below every sortable key (_sortable_key)
PARTIAL_ELEMS = 1 << 31                   # bound on a chunk's forward partials, in elements (_chunk_bounds)
LIST_TILE = 4096                          # most (token, slot) entries per program of the list builder (_csr)
LIST_PROGRAMS = 1024                      # its tiles shrink while its grid would have fewer programs (_list_tiles)
HIST_BINS = 512                           # the list builder counts up to this many keys a tile by histogram
SMALL_CHUNK = 1 << 20                     # gradient passes take short segments up to this many entries (_seg_len)


def _tag_compile_caches():
    """torch.compile's caches (inductor's, AOTAutograd's, on disk across runs) key a graph by the custom ops it
    calls, not by their backward or fake implementations (a known limit of torch's caches, dev/kernels.md): after an
    edit of this package a warm cache would replay the old backward. A hash of the package's source, added to the
    tag that every torch.compile cache key includes, makes any edit a cache miss (a user's own tag is kept)."""
    import hashlib
    folder = os.path.dirname(os.path.abspath(__file__))
    digest = hashlib.sha256()
    for name in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(f.read())
    tag = f"nanomsa-{digest.hexdigest()[:16]}"
    config = torch.compiler.config
    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag} {tag}".strip()


_tag_compile_caches()


# ---------------------------------------------------------------------------------------------
# the checking mode: the input checks that read the device's data (block_idx's range, cache_lens' range)
# cost a host sync, so they run only in this mode: on for CPU tensors (the interpreter) and off on CUDA by
# default; NANOMSA_CHECKS=1 (or 0), read once at import, or checks(True / False) sets it for every device.
# With it off, bad values are harmless: block ids outside [0, nb) are dropped from the work lists (_slots)
# and lengths outside [1, Tmax] are clamped by the decode kernels.

_CHECKS = {"1": True, "0": False}.get(os.environ.get("NANOMSA_CHECKS", "").strip())   # None: by device


def checks(on):
    """Turn the data-dependent input checks on (True), off (False) or back to the default (None: on for CPU
    tensors, off for CUDA ones). Returns the previous setting."""
    global _CHECKS
    if on not in (True, False, None):
        raise ValueError(f"checks takes True, False or None, got {on!r}")
    prev, _CHECKS = _CHECKS, on
    return prev


def _checking(x):
    """Whether the data-dependent checks run for tensor x (never while a CUDA graph is being captured)."""
    if x.is_cuda:
        return bool(_CHECKS) and not torch.cuda.is_current_stream_capturing()
    return _CHECKS is not False


def _op(name, mutates=()):
    """Register the decorated function as the custom op nanomsa::name (torch.library.custom_op; it allocates its
    outputs and writes into no input but those named in `mutates`), once per process: importing a module again
    reuses the op registered first. Returns an _Op, which a caller calls with positional arguments."""
    def register(fn):
        qualname = f"nanomsa::{name}"
        from torch._library.custom_ops import OPDEFS                           # the registry of custom ops
        op = OPDEFS[qualname] if qualname in OPDEFS else torch.library.custom_op(qualname, fn, mutates_args=mutates)
        return _Op(op, fn)
    return register


class _Op:
    """One of the package's custom ops and the way a call reaches it. Under torch.compile (and for fake tensors)
    a call is the custom op itself: one node of the graph, its shapes from the fake implementation. An eager call
    on real tensors runs the same function without the dispatcher (tens of microseconds of host time a call, its
    autograd wrapper included: dev/kernels.md): through a torch.autograd.Function built from the op's own
    setup_context and backward when it has them, else directly."""

    def __init__(self, op, fn):
        self.op, self.eager = op, fn                                           # fn: the decorated function

    def register_fake(self, fake):
        return self.op.register_fake(fake)

    def register_autograd(self, backward, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        fn = self.eager

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                output = fn(*args)
                setup_context(ctx, args, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                # autograd.Function wants None for an input that is not a tensor, such as a list of work lists
                return tuple(None if isinstance(g, list) else g for g in backward(ctx, *grads))

        self.eager = Function.apply

    def __call__(self, *args):
        if torch.compiler.is_compiling() or type(args[0]) not in (torch.Tensor, torch.nn.Parameter):
            return self.op(*args)
        return self.eager(*args)


def _attention_autograd(fwd_op, bwd_op, saved):
    """Make bwd_op the backward of fwd_op, as both attention paths need. fwd_op(q, k, v, block_idx, *consts) returns
    (out, lse, aux); saved(block_idx, aux) lists the tensors the backward needs besides q, k, v, out and lse (the
    KV-outer path's work lists, the tile path's block_idx and reads table); bwd_op(q, k, v, out, lse, dout, dlse,
    that list, *consts) returns dq, dk, dv. Either of out and lse may be used alone."""
    def setup(ctx, inputs, output):
        q, k, v, block_idx, *consts = inputs
        out, lse, aux = output
        ctx.set_materialize_grads(False)                                       # the unused outputs' gradients stay None
        ctx.save_for_backward(q, k, v, out, lse, *saved(block_idx, aux))
        ctx.consts = consts

    def backward(ctx, dout, dlse, _daux):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        if dout is None:                                                       # only lse was used
            dout = torch.zeros_like(out)
        dq, dk, dv = bwd_op(q, k, v, out, lse, dout, dlse, tensors, *ctx.consts)
        return (dq, dk, dv, None) + (None,) * len(ctx.consts)

    fwd_op.register_autograd(backward, setup_context=setup)


# ---------------------------------------------------------------------------------------------
# programmatic dependent launch (PDL, compute capability 9 and newer): a kernel launched with it starts while the
# kernel before it in the stream is still running, and waits (gdc_wait) before it reads anything that kernel wrote.
# A decode step is ~90 kernels of a few microseconds each, so each launch's latency shows between them; with PDL it
# overlaps the kernel before. The decode kernels take PDL as a constexpr and launch with launch_pdl equal to it:
# both come from _pdl(x), passed as **_pdl(x).
# NANOMSA_PDL=0, read once at import, turns it off (decoding.compiled_step reads it too).

PDL = os.environ.get("NANOMSA_PDL", "1").strip() != "0"


@functools.lru_cache(maxsize=None)
def _capability(device):
    return torch.cuda.get_device_capability(device)


def _pdl(x):
    """A decode kernel's launch arguments for a call on x's device: the PDL constexpr and the launch option, both on
    for a GPU of compute capability 9 or newer with PDL on."""
    on = PDL and x.is_cuda and _capability(x.device)[0] >= 9
    return dict(PDL=on, launch_pdl=on)


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """Under PDL: wait until the kernel before has finished and its writes are visible (call it before the first
    load of anything an earlier kernel of the stream wrote), then let the next kernel launch at once: its programs
    wait in their own _pdl_wait, and a decode kernel's few programs leave the GPU room for them."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def _kernel_limits(q, k, v, Hkv, block_size):
    """What the attention kernels of both paths support beyond msa_checks' checks, one ValueError line each:
    q, k, v of one float dtype, D <= 128, bs <= 128, G <= 64, on CUDA (or in Triton's interpreter)."""
    if not (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype and v.dtype == q.dtype):
        raise ValueError(f"q, k, v must share one dtype of float16, bfloat16, float32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] > 128:
        raise ValueError(f"head dim D must be <= 128, got {q.shape[3]}")
    if block_size > 128:
        raise ValueError(f"block_size must be <= 128 for these kernels, got {block_size}")
    if q.shape[1] // Hkv > 64:
        raise ValueError(f"G = Hq / Hkv must be <= 64, got {q.shape[1] // Hkv}")
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError(f"tensors must be on CUDA (or set TRITON_INTERPRET=1 before importing triton), got {q.device}")


def _check_attention(q, k, v, block_idx, block_size):
    """Both attention paths' checks: msa_ref's of the shapes (no host sync) and the kernels' limits -> (B, Hkv, T)."""
    B, Hkv, T = check_inputs(q=q, k=k, v=v, block_idx=block_idx, block_size=block_size, values=False)
    _kernel_limits(q, k, v, Hkv, block_size)
    return B, Hkv, T


def _pow2(n, lo=16):
    """Smallest power of two >= max(n, lo): tl.arange needs powers of two, tl.dot needs >= 16. (Plain Python, as
    is _cdiv: triton.next_power_of_2 and triton.cdiv are constexpr functions that cost microseconds of host time a
    call, and an eager step computes a few dozen launch sizes.)"""
    return max(lo, 1 << max(n - 1, 0).bit_length())


def _cdiv(a, b):
    """ceil(a / b) for integers a >= 0, b > 0."""
    return -(-a // b)


def _prec(*tensors):
    """The input_precision of every tl.dot of a launch: 'ieee' (true fp32 products, what msa_ref computes)
    when all operands are float32, else 'tf32' (Triton's default: a float32 tl.dot would use TF32, and half
    or fp8 operands have no other choice)."""
    return "ieee" if all(t.dtype == torch.float32 for t in tensors) else "tf32"


def _strides(prefix, x, dims="bhtd"):
    """x's strides as a kernel's keyword arguments: _strides("q", q) = {"s_qb": .., "s_qh": .., "s_qt": .., "s_qd": ..};
    dims names x's dimensions in order (b batch, h head, t token, d feature; _ a dimension the kernel does not take)."""
    assert x.dim() == len(dims), (x.shape, dims)
    return {f"s_{prefix}{a}": st for a, st in zip(dims, x.stride()) if a != "_"}


def _token_major(B, H, T, D, **kw):
    """An empty (B, H, T, D) tensor laid out as (B, T, H, D): the layout of q, k, v as a model's projection makes them
    (x @ W viewed as heads, transposed). An output or a gradient in that layout goes back into the model's (B, T, C)
    rows as a view; a (B, H, T, D)-contiguous one costs a transposing copy there (a compiled step's tiled transpose
    kernels, dev/model.md)."""
    return torch.empty(B, T, H, D, **kw).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# small Triton helpers

@triton.jit
def _load_rows(x_ptr, b, hh, t, rv, s_xb, s_xh, s_xt, s_xd, d, dmask):
    """Rows (head hh, token t) of x (B, H, T, D) -> (R, D_P), zeros where not rv."""
    return tl.load(x_ptr + b * s_xb + hh.to(tl.int64)[:, None] * s_xh + t.to(tl.int64)[:, None] * s_xt
                   + d[None, :] * s_xd, mask=rv[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _keys(x_ptr, b, g, n, kmask, s_xb, s_xh, s_xt, s_xd, d, dmask):
    """Keys n (BLOCK_N,) of group g of x (B, Hkv, T, D) -> (BLOCK_N, D_P), zeros where masked."""
    return tl.load(x_ptr + b * s_xb + g.to(tl.int64) * s_xh + n.to(tl.int64)[:, None] * s_xt + d[None, :] * s_xd,
                   mask=kmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def _ikeys(ki_ptr, b, n, kmask, s_kib, s_kit, s_kid, di, dimask):
    """Index keys n (BLOCK_N,) of batch b of ki (B, T, Di) -> (BLOCK_N, DI_P), zeros where masked."""
    return tl.load(ki_ptr + b * s_kib + n.to(tl.int64)[:, None] * s_kit + di[None, :] * s_kid,
                   mask=kmask[:, None] & dimask[None, :], other=0.0)


@triton.jit
def _sortable_key(score, blk):
    """One int64 key per (score, block) whose integer order is "higher score first, ties to the lower
    block", the order of msa_ref.select_blocks: the high word is the fp32 score's bits made monotone as a
    signed int (negative floats have their magnitude bits flipped), the low word 0x7FFFFFFF - blk. -0.0 is
    made +0.0 first so that the two zeros tie, as they do in a float sort. blk: a scalar or score's shape."""
    score = tl.where(score == 0.0, 0.0, score)
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | (tl.zeros_like(bits).to(tl.int64) + (0x7FFFFFFF - blk))


@triton.jit
def _key_block(key):
    """The block index of a _sortable_key."""
    return 0x7FFFFFFF - (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _fp8_exponent(x):
    """x (R, C) float32 -> (R,) int32: the biased float32 exponent f = e + 126 of each row's max|x| = m * 2^e (m in
    [0.5, 1)), read from its bits and clamped as msa_ref.fp8_quantize clamps e to [-118, 128]; a row of zeros gets
    e = 0, as frexp(0) gives."""
    amax = tl.max(tl.abs(x), axis=1)
    f = tl.where(amax == 0, 126, (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF)
    return tl.minimum(tl.maximum(f, 8), 254)                                   # e in [-118, 128]


@triton.jit
def _fp8_rows(x):
    """x (R, C) float32 -> float8e4nv (R, C): each row times the power of two 2^(8 - e), then rounded:
    msa_ref.fp8_quantize's e4m3 values (its scale, _fp8_scale, left off)."""
    f = _fp8_exponent(x)
    return (x * ((261 - f) << 23).to(tl.float32, bitcast=True)[:, None]).to(tl.float8e4nv)


@triton.jit
def _fp8_scale(x):
    """x (R, C) float32 -> (R,) float32: msa_ref.fp8_quantize's scale of each row, 2^(e - 8)."""
    return ((_fp8_exponent(x) - 7) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _softmax_rescale(m, m_in):
    """One step of an online softmax (log2 units): the running max m meets new maxima m_in (a tile's row
    maxima, or partial results' lse2). Returns m_new = max(m, m_in); m_ref, the reference the new terms are
    taken against (0 while everything seen is -inf, so no -inf - -inf); and alpha = exp2(m - m_ref), the
    factor that rescales what was accumulated so far."""
    m_new = tl.maximum(m, m_in)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, m_ref, tl.exp2(m - m_ref)


@triton.jit
def _softmax_finish(m, l):
    """The end of a softmax over rows with running max m and sum l of exp2: returns ls, the divisor of
    the accumulated output (1 for a row that saw nothing, whose output stays 0), and the rows' lse2
    (-inf for a row that saw nothing)."""
    ls = tl.where(l > 0, l, 1.0)
    return ls, tl.where(l > 0, m + tl.log2(ls), float("-inf"))


@triton.jit
def _segment(seg_lo_ptr, seg_hi_ptr, seg_blk_ptr, NSEG, Hkv):
    """The prologue of a KV-outer program over _segments' lists (grid (NSEG, B * Hkv)): returns the batch b
    (int64), the group g, bh = b * Hkv + g, and the program's entries [lo, hi) of KV block kb's list."""
    bh = tl.program_id(1)
    i = bh * NSEG + tl.program_id(0)
    return (bh // Hkv).to(tl.int64), bh % Hkv, bh, tl.load(seg_lo_ptr + i), tl.load(seg_hi_ptr + i), tl.load(seg_blk_ptr + i)


@triton.jit
def _slot_tile(bh, x, sub, NX, NSUB: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr):
    """Offsets (BLOCK_N, D_P) of slot x, part sub, of (batch, group) bh in a buffer (BH, NX, NSUB, BLOCK_N, D_P)
    of further segments' sums (_split_segments): the one layout that the gradient kernels write and
    _fixup_kernel reads."""
    r = ((bh * NX + x) * NSUB + sub) * BLOCK_N + tl.arange(0, BLOCK_N)
    return r.to(tl.int64)[:, None] * D_P + tl.arange(0, D_P)[None, :]


# ---------------------------------------------------------------------------------------------
# the selection, inverted: which queries read each KV block?

@triton.jit
def _slot_rows(bi_ptr, slots_ptr, s_ib, s_ih, s_it, s_ik, t0, Tc, K, Hkv, NBC, TT: tl.constexpr, K_P: tl.constexpr):
    """Program (tile, bh) of a grid (NT, BH): TT tokens of one (batch, group) -> their rows of slots (BH, Tc, K) int32
    (_slots). A row is sorted by counting, not by moving values: an id's place is the number of ids below it plus the
    equal ones in earlier columns, and an id equal to one in an earlier column is a repeat. Returns m, the (TT, K_P)
    real slots, v their ids, and keep, the ids kept (not a repeat, not -1, below NBC)."""
    tt = tl.program_id(0) * TT + tl.arange(0, TT)                              # (TT,) tokens of the chunk
    bh = tl.program_id(1)
    s = tl.arange(0, K_P)
    tm = tt < Tc
    m = tm[:, None] & (s[None, :] < K)                                         # (TT, K_P) real slots
    row = bi_ptr + (bh // Hkv).to(tl.int64) * s_ib + (bh % Hkv).to(tl.int64) * s_ih + (t0 + tt).to(tl.int64) * s_it
    v = tl.load(row[:, None] + s[None, :] * s_ik, mask=m, other=-1).to(tl.int64)   # any int dtype, exactly
    place = tl.zeros((TT, K_P), dtype=tl.int32)                                # where v goes in its sorted row
    rep = tl.zeros((TT, K_P), dtype=tl.int32)                                  # equal ids in earlier columns
    for j in range(0, K):
        vj = tl.load(row + j * s_ik, mask=tm, other=-1).to(tl.int64)[:, None]  # (TT, 1) column j
        earlier = j < s[None, :]
        place += ((vj < v) | ((vj == v) & earlier)).to(tl.int32)
        rep += ((vj == v) & earlier).to(tl.int32)
    keep = (rep == 0) & (v >= 0) & (v < NBC)                                   # a block chosen twice counts once
    tl.store(slots_ptr + (bh.to(tl.int64) * Tc + tt[:, None]) * K + place, tl.where(keep, v, -1).to(tl.int32), mask=m)
    return m, v, keep


@triton.jit
def _slots_kernel(bi_ptr, slots_ptr, s_ib, s_ih, s_it, s_ik, t0, Tc, K, Hkv, NBC,
                  TT: tl.constexpr, K_P: tl.constexpr):
    """Grid (NT, BH): the slots of TT tokens of one (batch, group) each (_slot_rows)."""
    _slot_rows(bi_ptr, slots_ptr, s_ib, s_ih, s_it, s_ik, t0, Tc, K, Hkv, NBC, TT, K_P)


@triton.jit
def _count_kernel(bi_ptr, slots_ptr, cnt_ptr, ccnt_ptr, s_ib, s_ih, s_it, s_ik, t0, Tc, K, Hkv, NBC, NT, NCH, BB,
                  TT: tl.constexpr, K_P: tl.constexpr, NB: tl.constexpr, NCB: tl.constexpr):
    """Grid (NT, BH): _slots_kernel's rows, and each tile's counts of entries per key (a block, or NBC for an empty
    slot) into cnt (BH, NT, NBC + 1) and per chunk of BB keys into ccnt (BH, NT, NCH), for _csr. The program owns
    those two rows. NB > 0 (up to HIST_BINS bins, >= NBC + 2): it counts with tl.histogram of NB and NCB bins in
    registers and stores the rows; NB = 0 (more keys): it zeroes them, then adds with atomics. Integer sums: their
    order cannot change them, so the counts are deterministic either way."""
    m, v, keep = _slot_rows(bi_ptr, slots_ptr, s_ib, s_ih, s_it, s_ik, t0, Tc, K, Hkv, NBC, TT, K_P)
    key = tl.where(keep, v, NBC).to(tl.int32)                                  # an empty slot: the spare key NBC
    own = tl.program_id(1).to(tl.int64) * NT + tl.program_id(0)
    if NB > 0:   # few keys: atomics on a few addresses would serialise
        key = tl.reshape(tl.where(m, key, NBC + 1), (TT * K_P,))               # lanes outside the tile: bin NBC + 1
        kz = tl.arange(0, NB)
        tl.store(cnt_ptr + own * (NBC + 1) + kz, tl.histogram(key, NB), mask=kz <= NBC)
        cz = tl.arange(0, NCB)
        chunk = tl.where(key <= NBC, key // BB, NCH)                           # the same lanes: bin NCH
        tl.store(ccnt_ptr + own * NCH + cz, tl.histogram(chunk, NCB), mask=cz < NCH)
    else:        # many keys: atomics rarely meet on one address
        for k0 in range(0, NBC + 1, TT * K_P):
            kz = k0 + tl.arange(0, TT * K_P)
            tl.store(cnt_ptr + own * (NBC + 1) + kz, tl.zeros_like(kz), mask=kz <= NBC)
            tl.store(ccnt_ptr + own * NCH + kz, tl.zeros_like(kz), mask=kz < NCH)
        tl.debug_barrier()                                                     # the zeros land before the adds
        one = tl.full((TT, K_P), 1, tl.int32)
        tl.atomic_add(cnt_ptr + own * (NBC + 1) + key, one, mask=m, sem="relaxed")
        tl.atomic_add(ccnt_ptr + own * NCH + key // BB, one, mask=m, sem="relaxed")


@triton.jit
def _csr_scan_kernel(cnt_ptr, ccnt_ptr, off_ptr, start32_ptr, start_ptr, count_ptr, NBC, NT, NCH,
                     BB: tl.constexpr, TB: tl.constexpr, NCH_P: tl.constexpr):
    """Grid (NCH, BH): keys [j * BB, (j + 1) * BB) of one (batch, group), a walk over the tiles' counts
    (_count_kernel) TB tiles at a time. An entry of key k that sits at place i of its tile sorted by key goes to
    start[k] + base[t, k] + (i - below[t, k]) of the list: start, the entries of smaller keys in the whole row;
    base, those of key k in earlier tiles; below, those of smaller keys in its own tile. Writes off[t, k] =
    base - below (BH, NT, NBC + 1) and start32 (BH, NBC + 1) for _csr_scatter_kernel, and start, cnt (BH, NBC) int64."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    k = j * BB + tl.arange(0, BB)
    km = k <= NBC
    c8 = tl.arange(0, NCH_P)
    run = tl.zeros((BB,), dtype=tl.int32)                                      # entries of key k in the tiles so far
    before = tl.full((), 0, tl.int32)                                          # entries of keys < j * BB so far
    for t0 in range(0, NT, TB):
        t = bh.to(tl.int64) * NT + t0 + tl.arange(0, TB)
        tm = (t0 + tl.arange(0, TB)) < NT
        c = tl.load(cnt_ptr + t[:, None] * (NBC + 1) + k[None, :], mask=tm[:, None] & km[None, :], other=0)
        lower = tl.sum(tl.load(ccnt_ptr + t[:, None] * NCH + c8[None, :], mask=tm[:, None] & (c8[None, :] < j),
                               other=0), 1)                                    # (TB,) entries of earlier chunks
        off = run[None, :] + tl.cumsum(c, 0) - c - lower[:, None] - (tl.cumsum(c, 1) - c)
        tl.store(off_ptr + t[:, None] * (NBC + 1) + k[None, :], off, mask=tm[:, None] & km[None, :])
        run += tl.sum(c, 0)
        before += tl.sum(lower, 0)
    start = before + tl.cumsum(run, 0) - run
    tl.store(start32_ptr + bh * (NBC + 1) + k, start, mask=km)
    tl.store(start_ptr + bh.to(tl.int64) * NBC + k, start.to(tl.int64), mask=k < NBC)
    tl.store(count_ptr + bh.to(tl.int64) * NBC + k, run.to(tl.int64), mask=k < NBC)


@triton.jit
def _sort_keys(x, LOG_N: tl.constexpr):
    """x (2**LOG_N,) int32 in [0, 2**30) sorted ascending: a bitonic network on x seen as a hypercube [2] * LOG_N.
    Each step pairs the elements along one axis of size 2, finds each one's partner as the pair's sum minus
    itself (below 2**31: no overflow), and keeps the min or the max. tl.sort's network, with its partner found by
    an xor reduction instead, which Triton's interpreter runs element by element; a sum runs there as numpy."""
    if LOG_N > 0:
        h = tl.reshape(x, [2] * LOG_N)
        for s in tl.static_range(1, LOG_N + 1):                                # merge sorted runs of 2**(s-1)
            if s < LOG_N:                                                      # runs of 2**s alternate up, down
                down = tl.reshape(tl.arange(0, 2), [1] * (LOG_N - 1 - s) + [2] + [1] * s)
            else:
                down = tl.zeros([1] * LOG_N, tl.int32)
            for k in tl.static_range(s):                                       # compare elements 2**(s-1-k)
                upper = tl.reshape(tl.arange(0, 2), [1] * (LOG_N - s + k) + [2] + [1] * (s - 1 - k))  # apart
                other = tl.sum(h, LOG_N - s + k, keep_dims=True) - h           # (along axis LOG_N - s + k)
                h = tl.where(upper != down, tl.maximum(h, other), tl.minimum(h, other))
        x = tl.reshape(h, [2 ** LOG_N])
    return x


@triton.jit
def _csr_scatter_kernel(slots_ptr, off_ptr, start32_ptr, ent_ptr, Tc, K, NBC, NT,
                        TT: tl.constexpr, K_P: tl.constexpr, LOG_NE: tl.constexpr):
    """Grid (NT, BH): the entries of TT tokens of one (batch, group) sorted by (key, entry) in registers (one
    int32 key each: key * NE + place in the tile), then each written to its place in ent (_csr_scan_kernel)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    NE: tl.constexpr = TT * K_P
    i = tl.arange(0, NE)
    tt = tile * TT + i // K_P
    ok = (tt < Tc) & (i % K_P < K)
    sl = tl.load(slots_ptr + (bh.to(tl.int64) * Tc + tt) * K + i % K_P, mask=ok, other=-1)
    key = tl.where(ok, tl.where(sl < 0, NBC, sl), NBC + 1)                     # not an entry: after every key
    srt = _sort_keys(key * NE + i, LOG_NE)                                     # (NE,) ties kept in entry order
    key = srt // NE
    loc = srt % NE
    ok = key <= NBC
    own = bh.to(tl.int64) * NT + tile
    pos = (tl.load(off_ptr + own * (NBC + 1) + key, mask=ok, other=0)
           + tl.load(start32_ptr + bh * (NBC + 1) + key, mask=ok, other=0) + i)
    e = (tile * TT + loc // K_P) * K + loc % K_P                               # entry id: token * K + slot
    tl.store(ent_ptr + bh.to(tl.int64) * Tc * K + pos, e, mask=ok)


def _list_tiles(K, Tc, BH):
    """The list builder's tile: (K_P, TT, NT): TT tokens of K_P slots, NT tiles over the chunk's Tc tokens, for BH
    (batch, group) rows. At most LIST_TILE entries a tile (fewer for a short chunk), halved (down to 64 entries)
    while the grid of NT x BH programs would be smaller than LIST_PROGRAMS: a tile's sort in registers and its
    counts are serial work, so a small call (the model's shape: 32 rows of 1K tokens) in a few big tiles would run
    a few long programs on an idle GPU."""
    K_P = _pow2(K, 1)
    TT = min(max(1, LIST_TILE // K_P), _pow2(Tc, 1))
    while TT * K_P > 64 and BH * _cdiv(Tc, TT) < LIST_PROGRAMS:
        TT //= 2
    return K_P, TT, _cdiv(Tc, TT)


def _slots(block_idx, t0, t1, nbc):
    """The selection of tokens [t0, t1) as a slot table: block_idx (B, Hkv, T, K) -> int32 (B*Hkv, Tc, K),
    each row sorted, -1 for padding, for a repeated block and for a block >= nbc (entirely after t1) or < 0
    (so that ids out of range, unchecked outside the checking mode, are dropped, never read); the -1 of a
    repeat or an id out of range stays where the id sorted to. Slot s of (token, group) is where that block's
    partial result goes. One launch."""
    B, Hkv, _, K = block_idx.shape
    K_P, TT, NT = _list_tiles(K, t1 - t0, B * Hkv)
    slots = torch.empty(B * Hkv, t1 - t0, K, device=block_idx.device, dtype=torch.int32)
    _slots_kernel[(NT, B * Hkv)](block_idx, slots, *block_idx.stride(), t0, t1 - t0, K, Hkv, nbc, TT=TT, K_P=K_P,
                                 num_warps=4)
    return slots


def _csr(block_idx, t0, t1, nbc):
    """The work lists of tokens [t0, t1): slots (_slots) and their inversion, a CSR: ent int32 (BH, Tc*K), entry
    ids e = token * K + slot grouped by block, tokens ascending, then the empty slots' (a spare block nbc) in
    order; start, cnt int64 (BH, nbc): where each block's entries begin in ent and how many there are. A stable
    counting sort in three launches, no host sync: slots and counts per (tile of tokens, block) (_count_kernel),
    scans of those counts (_csr_scan_kernel), each tile's entries sorted in registers and written out
    (_csr_scatter_kernel)."""
    B, Hkv, _, K = block_idx.shape
    BH, Tc, dev = B * Hkv, t1 - t0, block_idx.device
    K_P, TT, NT = _list_tiles(K, Tc, BH)
    BB = min(128, _pow2(nbc + 1, 1))                                            # keys per program of the scan
    NCH = _cdiv(nbc + 1, BB)
    assert (nbc + 2) * TT * K_P <= 2 ** 30 and BH * Tc * K < 2 ** 31, "work lists too long for int32 keys"
    work = torch.empty(BH * (NT * (2 * (nbc + 1) + NCH) + nbc + 1), device=dev, dtype=torch.int32)
    cnt, off, ccnt, start32 = work.split([BH * NT * (nbc + 1)] * 2 + [BH * NT * NCH, BH * (nbc + 1)])
    slots = torch.empty(BH, Tc, K, device=dev, dtype=torch.int32)
    NB = max(32, _pow2(nbc + 2))                                               # tl.histogram takes >= 32 bins
    hist = NB <= HIST_BINS
    _count_kernel[(NT, BH)](block_idx, slots, cnt, ccnt, *block_idx.stride(), t0, Tc, K, Hkv, nbc, NT, NCH, BB,
                            TT=TT, K_P=K_P, NB=NB if hist else 0, NCB=max(32, _pow2(NCH + 1)) if hist else 0,
                            num_warps=4)
    ent = torch.empty(BH, Tc * K, device=dev, dtype=torch.int32)
    start = torch.empty(BH, nbc, device=dev, dtype=torch.int64)
    count = torch.empty(BH, nbc, device=dev, dtype=torch.int64)
    _csr_scan_kernel[(NCH, BH)](cnt, ccnt, off, start32, start, count, nbc, NT, NCH,
                                BB=BB, TB=min(_pow2(NT, 1), max(1, 4096 // BB)), NCH_P=_pow2(NCH, 1), num_warps=4)
    _csr_scatter_kernel[(NT, BH)](slots, off, start32, ent, Tc, K, nbc, NT, TT=TT, K_P=K_P,
                                  LOG_NE=(TT * K_P).bit_length() - 1, num_warps=8)
    return slots, ent, start, count


@triton.jit
def _segments_kernel(start_ptr, cnt_ptr, lo_ptr, hi_ptr, blk_ptr, x_ptr, xbase_ptr, xcnt_ptr, NBC, N, SEG,
                     BLOCK_B: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (BH,): one (batch, group)'s block lists cut in segments (_segments). Blocks run in chunks of BLOCK_B;
    block b's nseg segments are programs first .. first + nseg - 1 (first: a running sum), part j at first + j."""
    bh = tl.program_id(0)
    row = bh.to(tl.int64) * N
    used = tl.full((), 0, tl.int32)                                            # segments of the blocks so far
    xused = tl.full((), 0, tl.int32)                                           # further segments so far
    for b0 in range(0, NBC, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        bm = b < NBC
        start = tl.load(start_ptr + bh * NBC + b, mask=bm, other=0).to(tl.int32)
        cnt = tl.load(cnt_ptr + bh * NBC + b, mask=bm, other=0).to(tl.int32)
        nseg = (cnt + SEG - 1) // SEG                                          # (BLOCK_B,) segments of each block
        xcnt = tl.maximum(nseg - 1, 0)                                         # its further segments
        first = used + tl.cumsum(nseg, 0) - nseg                               # its first segment
        xbase = xused + tl.cumsum(xcnt, 0) - xcnt                              # its first partial slot
        tl.store(xbase_ptr + bh * NBC + b, xbase, mask=bm)
        tl.store(xcnt_ptr + bh * NBC + b, xcnt, mask=bm)
        for j in range(0, tl.max(nseg, 0)):
            m = bm & (j < nseg)
            lo = start + j * SEG
            i = row + first + j
            tl.store(lo_ptr + i, lo, mask=m)
            tl.store(hi_ptr + i, tl.minimum(lo + SEG, start + cnt), mask=m)
            tl.store(blk_ptr + i, b, mask=m)
            tl.store(x_ptr + i, tl.where(j > 0, xbase + j - 1, -1), mask=m)
        used += tl.sum(nseg, 0)
        xused += tl.sum(xcnt, 0)
    for p0 in range(used, N, BLOCK):                                           # spare programs: nothing to do
        p = p0 + tl.arange(0, BLOCK)
        m = p < N
        zero = tl.zeros([BLOCK], tl.int32)
        tl.store(lo_ptr + row + p, zero, mask=m)
        tl.store(hi_ptr + row + p, zero, mask=m)
        tl.store(blk_ptr + row + p, zero + NBC - 1, mask=m)
        tl.store(x_ptr + row + p, zero - 1, mask=m)


def _split_segments(start, cnt, n_entries, seg):
    """Split each block's list into segments of <= seg entries, one program each, in one launch with no host sync.
    n_entries bounds the entries of one (batch, group). Returns lo, hi, blk, x int32 (BH, n): the entries [lo, hi)
    of block blk; n = ceil(n_entries / seg) + nbc bounds the segments, and spare programs get lo = hi = 0.
    For a pass whose programs each sum a block's gradient rows (dK, dV; kl_loss's dKI), a block's first segment
    adds its sum into the result and each further one (a block many tokens chose, such as a sink) writes it to
    slot x of a partial buffer (x = -1 for a first segment) that _fixup_kernel then adds in order: no atomics,
    deterministic. Also returns xbase, xcnt int32 (BH, nbc) (each block's slots) and nx, a bound on the slots one
    (batch, group) needs."""
    BH, nbc = cnt.shape
    n = math.ceil(n_entries / seg) + nbc
    lo, hi, blk, x = torch.empty(4, BH, n, device=cnt.device, dtype=torch.int32)
    xbase, xcnt = torch.empty(2, BH, nbc, device=cnt.device, dtype=torch.int32)
    _segments_kernel[(BH,)](start, cnt, lo, hi, blk, x, xbase, xcnt, nbc, n, seg, BLOCK_B=256, BLOCK=256)
    return lo, hi, blk, x, xbase, xcnt, max(1, n_entries // seg)


def _seg_len(n_entries, short, long):
    """Entries per program of a pass that sums a block's gradient rows (the attention's backward, kl_loss's pass 2),
    for a chunk of n_entries (token, slot) entries over all (batch, group). Long segments cost fewer partials and
    less fix-up work; in a chunk of at most SMALL_CHUNK entries (the model's shapes up to 16K tokens, a launch of a
    few waves) short ones pay, more programs sharing the work."""
    return short if n_entries <= SMALL_CHUNK else long


def _segments(start, cnt, n_entries, seg):
    """_split_segments' lo, hi, blk (BH, n), for a pass that needs no partial slots (a forward, kl_loss's stats)."""
    return _split_segments(start, cnt, n_entries, seg)[:3]


def _chunk_bounds(B, Hkv, T, K, per_slot, block_size):
    """Chunks of tokens whose partial buffer of per_slot elements per (batch*group, token, slot) stays under
    PARTIAL_ELEMS (the forward's (B*Hkv, Tc, K, G, D): per_slot = G*D; the backward keeps the forward's chunks, and
    so its work lists, and its dq partials are NSUB times that: twice at bs = 128 with D <= 64; offsets into them
    are int64): a list of (t0, t1, nbc), nbc = the blocks a token of the chunk may see. From the shapes alone, so a
    fake (meta) implementation gets them too."""
    Tc = min(T, max(1, PARTIAL_ELEMS // (B * Hkv * K * per_slot)))
    return [(t0, min(T, t0 + Tc), math.ceil(min(T, t0 + Tc) / block_size)) for t0 in range(0, T, Tc)]


def _chunks(block_idx, per_slot, block_size, lists=()):
    """The selection as KV-outer work lists, chunk by chunk of tokens (_chunk_bounds): yields
    (t0, t1, nbc, slots, ent, start, cnt) (_csr). A generator, so that the host builds chunk i + 1's lists
    while the GPU runs chunk i. lists: lists built before for this block_idx (flat, four tensors a chunk, as the
    attention forward keeps them for its backward): they serve when their chunks are these chunks (chunks run
    consecutively from token 0, so equal lengths are equal bounds; slots is (BH, Tc, K)), else they are built."""
    bounds = _chunk_bounds(*block_idx.shape, per_slot, block_size)
    reuse = bool(lists) and [t1 - t0 for t0, t1, _ in bounds] == [slots.shape[1] for slots in lists[::4]]
    for i, (t0, t1, nbc) in enumerate(bounds):
        yield (t0, t1, nbc, *(lists[4 * i:4 * i + 4] if reuse else _csr(block_idx, t0, t1, nbc)))


# ---------------------------------------------------------------------------------------------
# kernels that finish a KV-outer pass

@triton.jit
def _combine_one(s, acc, m, l, op_ptr, lp_ptr, slots_ptr, row0, rv, h, d, dm, D,
                 G: tl.constexpr, WITH_LSE: tl.constexpr, NSUB: tl.constexpr):
    """Partial s of each row merged into (acc, m, l): _combine_kernel's step."""
    ok = rv & (tl.load(slots_ptr + row0 + s // NSUB, mask=rv, other=-1) >= 0)
    po = (row0 * NSUB + s) * G + h
    o = tl.load(op_ptr + po[:, None] * D + d[None, :], mask=ok[:, None] & dm, other=0.0).to(tl.float32)
    if WITH_LSE:
        lse2_in = tl.load(lp_ptr + po, mask=ok, other=float("-inf"))
        m, m_ref, alpha = _softmax_rescale(m, lse2_in)
        beta = tl.exp2(lse2_in - m_ref)
        acc = acc * alpha[:, None] + o * beta[:, None]
        l = l * alpha + beta
    else:
        acc += o
    return acc, m, l


def _combine_unroll(K, NSUB):
    """_combine_kernel's UNROLL for K slots of NSUB partials: their count when at most 8, else 0."""
    return K * NSUB if K * NSUB <= 8 else 0


@triton.jit
def _combine_kernel(op_ptr, lp_ptr, slots_ptr, o_ptr, lse_ptr, s_ob, s_oh, s_ot, T, t0, Tc, K, Hkv, D,
                    G: tl.constexpr, G_P: tl.constexpr, ROWS: tl.constexpr, D_P: tl.constexpr,
                    WITH_LSE: tl.constexpr, NSUB: tl.constexpr, UNROLL: tl.constexpr):
    """Merge the K partials of ROWS // G_P tokens of one (batch, group) into o (B, Hq, T, D) of strides s_o* (its
    last dimension contiguous).
    WITH_LSE: partial outs weighted by their lse2 (the attention forward; also writes lse (B, Hq, T) in
    natural log); else a plain sum (a gradient: NSUB partials per slot). Slots with slots < 0 were never
    written and are not read. UNROLL: _combine_unroll(K, NSUB)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    r = tl.arange(0, ROWS)
    tloc = pid * (ROWS // G_P) + r // G_P
    h = r % G_P
    d = tl.arange(0, D_P)
    rv = (tloc < Tc) & (t0 + tloc < T) & (h < G)
    dm = d[None, :] < D
    row0 = (bh.to(tl.int64) * Tc + tloc) * K                                   # (ROWS,) first slot of each token
    acc = tl.zeros((ROWS, D_P), dtype=tl.float32)
    m = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((ROWS,), dtype=tl.float32)
    # up to 8 partials a row the loop is unrolled (UNROLL), so that all their loads are in flight at once; with more
    # (the M3 shape's 16) the trip count K * NSUB stays a runtime value: unrolled, or with K a compile-time constant,
    # the combine at that shape is two to three times slower (dev/kernels.md)
    if UNROLL > 0:
        for s in tl.static_range(UNROLL):
            acc, m, l = _combine_one(s, acc, m, l, op_ptr, lp_ptr, slots_ptr, row0, rv, h, d, dm, D, G, WITH_LSE, NSUB)
    else:
        for s in range(K * NSUB):
            acc, m, l = _combine_one(s, acc, m, l, op_ptr, lp_ptr, slots_ptr, row0, rv, h, d, dm, D, G, WITH_LSE, NSUB)
    b = bh // Hkv
    g = bh % Hkv
    hq = (g * G + h).to(tl.int64)                                             # (ROWS,) head of each row
    t = t0 + tloc
    if WITH_LSE:
        ls, lse2 = _softmax_finish(m, l)
        acc = acc / ls[:, None]
        tl.store(lse_ptr + (b * Hkv * G + hq) * T + t, lse2 * LN2_K, mask=rv)  # lse (B, Hq, T), contiguous
    orow = b.to(tl.int64) * s_ob + hq * s_oh + t.to(tl.int64) * s_ot
    tl.store(o_ptr + orow[:, None] + d[None, :], acc.to(o_ptr.dtype.element_ty), mask=rv[:, None] & dm)


@triton.jit
def _fixup_kernel(x_ptr, xp_ptr, xbase_ptr, xcnt_ptr, cnt_ptr, o_ptr, s_ob, s_oh, s_ot, T, NBC, NX, BS, D, HO,
                  NG: tl.constexpr, NSUB: tl.constexpr, BLOCK_N: tl.constexpr, D_P: tl.constexpr, OUT: tl.constexpr,
                  FRESH: tl.constexpr, DIRECT: tl.constexpr = False):
    """Grid (NBC, BH // NG, NSUB): for each of the NG consecutive (batch, head) rows bh = pid1 * NG + i, add the sums
    of block kb's further segments (slots xbase .. xbase + xcnt of xp (BH, NX, NSUB, BLOCK_N, D_P), in order) to its
    rows of x (BH, T, D) fp32 (dK, dV or dKI). Without OUT, into x. With OUT (the last chunk of tokens, whose blocks
    are all of them): the finished rows, summed over the NG rows, go to o (B, HO, T, D) of strides s_o*, in o's dtype
    (dK, dV in k's dtype and layout: NG = 1; dKI summed over its groups: NG = Hkv, HO = 1), so that no cast or sum
    runs after the pass. FRESH (one chunk of tokens: the first segments stored their sums into x, which was not
    zeroed): a block no token chose (cnt (BH, NBC) = 0) has no rows in x and counts as zero. DIRECT (FRESH, OUT,
    NG = 1; the attention's dK, dV): the pass stored the finished rows of a chosen block with one segment in o
    itself, so those blocks are left as they are."""
    kb = tl.program_id(0)
    j = tl.program_id(1)
    sub = tl.program_id(2)
    jn = sub * BLOCK_N + tl.arange(0, BLOCK_N)
    n = kb * BS + jn
    d = tl.arange(0, D_P)
    m = ((jn < BS) & (n < T))[:, None] & (d[None, :] < D)
    if DIRECT:                     # left to do: a block no token chose (zeros) or one with further segments
        todo = (tl.load(cnt_ptr + j * NBC + kb) == 0) | (tl.load(xcnt_ptr + j * NBC + kb) > 0)
        m = m & (jn < tl.where(todo, BS, 0))[:, None]
    total = tl.zeros((BLOCK_N, D_P), dtype=tl.float32)
    for i in tl.static_range(NG):
        bh = j * NG + i
        x0 = tl.load(xbase_ptr + bh * NBC + kb)
        nx = tl.load(xcnt_ptr + bh * NBC + kb)
        xo = bh.to(tl.int64) * T * D + n[:, None] * D + d[None, :]
        if OUT or nx > 0:
            acc = tl.zeros((BLOCK_N, D_P), dtype=tl.float32)
            for x in range(x0, x0 + nx):
                acc += tl.load(xp_ptr + _slot_tile(bh, x, sub, NX, NSUB, BLOCK_N, D_P))
            xm = m
            if FRESH:      # x holds a block's rows only if a token chose it: its keys, else none
                xm = m & (jn < tl.where(tl.load(cnt_ptr + bh * NBC + kb) > 0, BS, 0))[:, None]
            acc += tl.load(x_ptr + xo, mask=xm, other=0.0)
            if OUT:
                total += acc
            else:
                tl.store(x_ptr + xo, acc, mask=m)
    if OUT:
        b = (j // HO).to(tl.int64)
        oo = b * s_ob + (j % HO).to(tl.int64) * s_oh + n.to(tl.int64)[:, None] * s_ot + d[None, :]
        tl.store(o_ptr + oo, total.to(o_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------------------------
# kl_loss as a custom op, for both of its paths (index.py's KV-outer passes, tile.py's query tiles)

@triton.jit
def _scale2_kernel(a_ptr, b_ptr, g_ptr, oa_ptr, ob_ptr, NA, NB, BLOCK: tl.constexpr):
    """Grid (cdiv(max(NA, NB), BLOCK),): oa = a * g and ob = b * g, elementwise over flat buffers of NA and NB
    elements, g a scalar on the device, the products in fp32, stored in the outputs' dtypes."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr).to(tl.float32)
    a = tl.load(a_ptr + i, mask=i < NA, other=0.0)
    tl.store(oa_ptr + i, (a.to(tl.float32) * g).to(oa_ptr.dtype.element_ty), mask=i < NA)
    b = tl.load(b_ptr + i, mask=i < NB, other=0.0)
    tl.store(ob_ptr + i, (b.to(tl.float32) * g).to(ob_ptr.dtype.element_ty), mask=i < NB)


@_op("kl_loss_grads")
def _kl_grads_op(dqi: torch.Tensor, dki: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kl_loss's gradients times the loss's incoming gradient g (a 0-dim tensor), both in one launch, where two torch
    multiplies by a tensor on the device take two slower, broadcasting kernels. dqi and dki are kl_loss's outputs,
    dense in memory in any dim order (dqi is token-major), so they are scaled as flat buffers; the results get the
    same strides (empty_like)."""
    oa, ob = torch.empty_like(dqi), torch.empty_like(dki)
    n = max(dqi.numel(), dki.numel(), 1)
    _scale2_kernel[(_cdiv(n, 1024),)](dqi, dki, g, oa, ob, dqi.numel(), dki.numel(), BLOCK=1024)
    return oa, ob


@_kl_grads_op.register_fake
def _(dqi, dki, g):
    return torch.empty_like(dqi), torch.empty_like(dki)


def _kl_custom_op(name, launch):
    """Register launch(q, k, qi, ki, block_idx, block_size, grad, lse, lists) -> (loss fp32 scalar, dqi, dki) as the
    custom op nanomsa::name. Its forward computes the loss and, when grad, d loss / d qi (B, Hkv, T, Di), token-major
    (_token_major), and d loss / d ki (B, T, Di), in qi's and ki's dtypes (empty tensors otherwise), while the scores
    are at hand; its backward only scales them by the incoming gradient (_kl_grads_op: one kernel for both).
    lists: the attention's KV-outer work lists for this block_idx, or [] (sparse_attention_kl). Returns the op."""
    @_op(name)
    def kl_op(q: torch.Tensor, k: torch.Tensor, qi: torch.Tensor, ki: torch.Tensor, block_idx: torch.Tensor,
              block_size: int, lse: Optional[torch.Tensor], grad: bool,
              lists: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if _checking(block_idx):
            check_block_idx(block_idx, math.ceil(q.shape[2] / block_size))
        loss, dqi, dki = launch(q, k, qi, ki, block_idx, block_size, grad, lse, lists)
        if not grad:
            dqi, dki = loss.new_empty(0), loss.new_empty(0)
        return loss, dqi, dki

    @kl_op.register_fake
    def _(q, k, qi, ki, block_idx, block_size, lse, grad, lists):
        B, Hkv, T, Di = qi.shape
        f32 = dict(dtype=torch.float32, device=q.device)
        return (q.new_empty((), **f32),
                _token_major(B, Hkv, T, Di, dtype=qi.dtype, device=q.device) if grad else q.new_empty(0, **f32),
                ki.new_empty((B, T, Di)) if grad else q.new_empty(0, **f32))

    def setup(ctx, inputs, output):
        ctx.set_materialize_grads(False)                                       # dqi, dki get no gradient: no zeros
        ctx.save_for_backward(output[1], output[2])
        ctx.n_lists = len(inputs[8])

    def backward(ctx, dloss, _dqi, _dki):
        dqi, dki = _kl_grads_op(*ctx.saved_tensors, dloss)
        return (None, None, dqi if ctx.needs_input_grad[2] else None, dki if ctx.needs_input_grad[3] else None,
                None, None, None, None, [None] * ctx.n_lists)

    kl_op.register_autograd(backward, setup_context=setup)
    return kl_op


def _kl_call(kl_op, q, k, qi, ki, block_idx, block_size, lse, lists=()):
    """What both kl_loss paths do around their op: shape checks (no host sync), the kernels' limits (the same on both
    paths, so that a call's path never decides whether it raises), lse's check, whether gradients are wanted; q and k
    enter detached (the teacher is a target), k in q's dtype and ki in qi's (autograd casts ki's gradient back).
    lists: the attention's work lists, if the caller has them. Returns the loss in qi's dtype promoted to fp32."""
    B, Hkv, T = check_inputs(q=q, k=k, qi=qi, ki=ki, block_idx=block_idx, block_size=block_size, values=False)
    _kernel_limits(q, q, q, Hkv, block_size)                                   # k may differ: it is cast
    if qi.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"qi must be float16, bfloat16 or float32, got {qi.dtype}")
    if qi.shape[3] > 128:
        raise ValueError(f"index dim Di must be <= 128, got {qi.shape[3]}")
    if lse is not None:
        if not (isinstance(lse, torch.Tensor) and lse.shape == (B, q.shape[1], T) and lse.dtype == torch.float32):
            raise ValueError(f"lse must be a float32 tensor [B={B}, Hq={q.shape[1]}, T={T}] from sparse_attention, got "
                             f"{getattr(lse, 'dtype', type(lse).__name__)} {tuple(getattr(lse, 'shape', ()))}")
        lse = lse.detach()
    grad = torch.is_grad_enabled() and (qi.requires_grad or ki.requires_grad)
    loss, _, _ = kl_op(q.detach(), k.detach().to(q.dtype), qi, ki.to(qi.dtype), block_idx, block_size, lse, grad,
                       list(lists))
    return loss.to(torch.promote_types(qi.dtype, torch.float32))
