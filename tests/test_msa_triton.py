"""
msa_triton.sparse_attention (and the query-outer baseline forward) against msa_ref, the definition.
Without a GPU these run in fp32 under TRITON_INTERPRET=1 (conftest.py) at tiny sizes; with one they
also run in bf16 / fp16 at larger sizes with tolerances that fit those dtypes.
"""
import pytest
import torch

import msa_ref
import msa_triton
from msa_triton import attention, common, index, tile
from conftest import DEVICE, past_int32, poison_allocator, rand_inputs, requires_cuda

GPU = DEVICE == "cuda"


def random_block_idx(B, Hkv, T, bs, K, seed=0, pad=0.0, shuffle=True):
    """K-1 distinct random earlier blocks + the local one per token, then some entries set to -1 (pad is
    the probability) and the K entries of each token shuffled. int32 (B, Hkv, T, K) on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-T // bs)
    local = torch.arange(T) // bs                                              # (T,)
    r = torch.rand(B, Hkv, T, nb, generator=g).masked_fill(torch.arange(nb) >= local[:, None], -1.0)
    far = r.topk(min(K - 1, nb), -1).indices if K > 1 else torch.empty(B, Hkv, T, 0, dtype=torch.long)
    far = torch.where(r.gather(-1, far) >= 0, far, -1)                         # fewer earlier blocks than K-1
    idx = torch.cat([far, local.expand(B, Hkv, T)[..., None], torch.full((B, Hkv, T, K), -1)], -1)[..., :K]
    idx = torch.where(torch.rand(idx.shape, generator=g) < pad, -1, idx)
    if shuffle:
        idx = idx.gather(-1, torch.rand(idx.shape, generator=g).argsort(-1))
    return idx.to(torch.int32).to(DEVICE)


def run_both(q, k, v, block_idx, bs, dout, attend=None):
    """(out, lse, dq, dk, dv) of a Triton path (attend: the KV-outer one unless given) and of msa_ref computed in
    float64 from the same inputs."""
    qkv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = (attend or attention.sparse_attention)(*qkv, block_idx, bs)
    grads = torch.autograd.grad(out, qkv, dout)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    rout, rlse = msa_ref.sparse_attention(*ref_in, block_idx, bs)
    rgrads = torch.autograd.grad(rout, ref_in, dout.double())
    return (out, lse, *grads), (rout, rlse, *rgrads)


def assert_close(got, ref, dtype, what):
    """Relative Frobenius error over the whole tensor: fp32 ~1e-6, bf16 / fp16 operands ~3e-3 (two roundings per
    product). Then row by row (the last dim; lse: each entry), so that a few wrong rows cannot hide in a large
    tensor's norm: a row's error relative to its own norm, or to a tenth of the rows' RMS norm where it is smaller
    (lse entries: relative to |lse| + 1). A wrong row is off by ~1; a block counted twice moves lse by up to log 2.
    bf16's row bound is loose: its 8-bit mantissa leaves a gradient row near the floor up to ~0.2 off (dq on a GPU)."""
    tol, row_tol = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 3e-2), torch.bfloat16: (1.5e-2, 3e-1)}[dtype]
    got, ref = got.double(), ref.double()
    fin = ref.isfinite()
    assert torch.equal(got.isfinite(), fin), f"{what}: -inf pattern differs"
    err = ((got[fin] - ref[fin]).norm() / ref[fin].norm().clamp_min(1e-30)).item()
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e} ({dtype})"
    if ref.dim() == 3:                                                         # lse (B, H, T): entry by entry
        rows = ((got - ref).abs() / (ref.abs() + 1))[fin]
    else:
        norms = ref.norm(dim=-1)
        floor = 0.1 * norms.square().mean().sqrt().clamp_min(1e-30)
        rows = (got - ref).norm(dim=-1) / torch.maximum(norms, floor)
    worst = rows.max().item() if rows.numel() else 0.0
    assert worst < row_tol, f"{what}: a row's relative error {worst:.2e} >= {row_tol:.0e} ({dtype})"


# (B, Hq, Hkv, T, D, bs, K): T not a multiple of bs, G = 1..16, B = 2, K = 1, K*bs >= T (dense)
CPU_SHAPES = [
    (1, 2, 1, 1, 16, 16, 2),      # T = 1
    (2, 4, 2, 37, 16, 8, 3),      # B = 2, T % bs != 0, bs < 16 (padded tiles)
    (1, 3, 1, 29, 32, 16, 1),     # K = 1 (local block only), G = 3 (not a power of two)
    (1, 16, 1, 21, 16, 16, 2),    # G = 16
    (1, 2, 2, 40, 24, 12, 8),     # G = 1, D and bs not powers of two, K * bs >= T: dense causal
    (1, 4, 2, 40, 72, 16, 3),     # D > 64: the backward's whole-block tiles
    (1, 2, 1, 150, 16, 96, 2),    # bs > 64, D <= 64: two backward programs per block (NSUB = 2)
    (1, 2, 1, 70, 16, 8, 9),      # K = 9 > 8: the combine loops over a row's partials (up to 8 it is unrolled)
]
GPU_SHAPES = [
    (1, 64, 4, 1000, 128, 128, 16),   # M3 head layout
    (2, 8, 2, 777, 64, 64, 4),        # the repository model's layout
    (1, 6, 2, 700, 64, 128, 5),       # config/train_long.py's layout (NSUB = 2)
    (2, 6, 3, 300, 32, 32, 5),
    (1, 16, 16, 129, 128, 64, 3),     # G = 1
]


def _check(shape, dtype, pad, seed=0):
    B, Hq, Hkv, T, D, bs, K = shape
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, dtype=dtype, seed=seed)
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=seed, pad=pad)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    got, ref = run_both(q, k, v, block_idx, bs, dout)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, dtype, name)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32


@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_matches_ref_fp32(shape):
    _check(shape, torch.float32, pad=0.2)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GPU_SHAPES + CPU_SHAPES)
def test_matches_ref_half(shape, dtype):
    _check(shape, dtype, pad=0.1)


@pytest.mark.parametrize("path", ["kv", "tile"])
def test_empty_rows_and_repeats(path):
    """Rows with no visible key (all -1, or only future blocks) give out 0, lse -inf, zero gradients;
    a block listed twice counts once (msa_ref's set semantics). Both paths of sparse_attention."""
    B, Hq, Hkv, T, D, bs = 1, 2, 1, 24, 16, 8
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, seed=3)
    block_idx = random_block_idx(B, Hkv, T, bs, 3, seed=3, shuffle=False)
    block_idx[0, 0, 5] = -1                                                    # nothing at all
    block_idx[0, 0, 6] = torch.tensor([2, 1, -1])                              # only future blocks
    block_idx[0, 0, 20] = torch.tensor([1, 1, 2])                              # a repeat
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    got, ref = run_both(q, k, v, block_idx, bs, dout, attend=tile.sparse_attention_tile if path == "tile" else None)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, torch.float32, name)
    assert torch.equal(got[0][0, :, 5:7], torch.zeros_like(got[0][0, :, 5:7]))
    assert bool((got[1][0, :, 5:7] == float("-inf")).all())


PATHS = {"kv": attention.sparse_attention, "tile": tile.sparse_attention_tile}


@pytest.mark.parametrize("path", ["kv", "tile"])
def test_one_token_attends_to_itself(path):
    """T = 1 with the token's own block chosen (the random selections of CPU_SHAPES[0] pad it away: an empty row):
    out = v for every head of the group, lse = q . k / sqrt(D), and the softmax over one key passes no gradient to
    q or k: dq = dk = 0, dv = the group's dout summed, as msa_ref gives them."""
    B, Hq, Hkv, T, D, bs = 2, 4, 2, 1, 16, 16
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, seed=6)
    block_idx = torch.tensor([0, -1], dtype=torch.int32, device=DEVICE).expand(B, Hkv, T, 2)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    got, ref = run_both(q, k, v, block_idx, bs, dout, attend=PATHS[path])
    for name, a, b in zip(("out", "lse", "dv"), got[:2] + got[4:], ref[:2] + ref[4:]):
        assert_close(a, b, torch.float32, name)
    out, lse, dq, dk, dv = got
    torch.testing.assert_close(out, v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(lse, (q * k.repeat_interleave(2, dim=1)).sum(-1) / D ** 0.5)
    torch.testing.assert_close(dv, dout.view(B, Hkv, 2, T, D).sum(2))
    for grad in (dq, dk, *ref[2:4]):                                           # p (dp - delta) = dp - dp: rounding only
        assert grad.abs().max() < 1e-5


@pytest.mark.parametrize("path", ["kv", "tile"])
@pytest.mark.parametrize("shape, sel", [((1, 2, 1, 1, 16, 16, 2), "dense"),      # T = 1, one key
                                        ((2, 4, 2, 37, 16, 8, 3), "random"),    # B = 2, T % bs, -1 padding
                                        ((1, 2, 2, 40, 24, 12, 1), "random"),   # G = 1, K = 1
                                        ((1, 4, 2, 45, 16, 8, 3), "sink")])      # block 0 chosen by every token
def test_lse_gradient(monkeypatch, path, shape, sel):
    """lse is differentiable, as msa_ref's is: d lse / d s_ij = p_ij. Gradients of out . dout + lse . dlse, and of
    lse . dlse alone (no gradient reaches out), against msa_ref in float64; through sparse_attention_kl's lse too."""
    B, Hq, Hkv, T, D, bs, K = shape
    q, k, v, qi, ki = rand_inputs(B, Hq, Hkv, T, D, 8, seed=8)
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=8, pad=0.2 if sel == "random" else 0.0)
    if sel == "sink":
        block_idx[..., 0] = 0
    g = torch.Generator().manual_seed(9)
    dout = torch.randn(q.shape, generator=g).to(DEVICE)
    dlse = torch.randn(q.shape[:3], generator=g).to(DEVICE)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    rout, rlse = msa_ref.sparse_attention(*ref_in, block_idx, bs)
    empty = rlse == float("-inf")                                              # rows without a key: no lse gradient
    dlse = dlse.masked_fill(empty, 0.0)
    for with_out in (True, False):
        qkv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out, lse = PATHS[path](*qkv, block_idx, bs)
        loss = (lse.masked_fill(empty, 0.0) * dlse).sum() + ((out * dout).sum() if with_out else 0.0)
        rloss = (rlse.masked_fill(empty, 0.0) * dlse.double()).sum() + ((rout * dout.double()).sum() if with_out else 0.0)
        got = torch.autograd.grad(loss, qkv, allow_unused=True)
        ref = torch.autograd.grad(rloss, ref_in, retain_graph=True, allow_unused=True)   # lse alone: no dv
        for name, a, b, x in zip(("dq", "dk", "dv"), got, ref, ref_in):
            a, b = (torch.zeros_like(x) if y is None else y for y in (a, b))
            if b.any():
                assert_close(a, b, torch.float32, f"{name} (with out: {with_out})")
            else:
                assert a.abs().max() < 1e-5, name
    qkv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    monkeypatch.setattr(tile, "FORCE", path)
    out, lse, _ = msa_triton.sparse_attention_kl(*qkv, qi, ki, block_idx, bs)
    got = torch.autograd.grad((lse.masked_fill(empty, 0.0) * dlse).sum() + (out * dout).sum(), qkv)
    ref = torch.autograd.grad((rlse.masked_fill(empty, 0.0) * dlse.double()).sum() + (rout * dout.double()).sum(), ref_in)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        assert_close(a, b, torch.float32, f"{name} (sparse_attention_kl)")


@pytest.mark.parametrize("path", ["kv", "tile"])
def test_ids_outside_the_blocks_are_ignored(path):
    """Outside the checking mode a block id outside [-1, nb) selects nothing, on both paths: int64 ids past int32's
    range included (not wrapped to a real block: 2^32 is not block 0)."""
    B, Hq, Hkv, T, D, bs, K = 1, 2, 1, 24, 16, 8, 3
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, seed=11)
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=11, shuffle=False).long()
    bad = block_idx.clone()
    bad[..., 0] = torch.tensor([1 << 32, 3, -7], device=DEVICE).repeat(T)[:T]   # none of them a block here
    before = msa_triton.checks(False)
    try:
        out, lse = PATHS[path](q, k, v, bad, bs)
    finally:
        msa_triton.checks(before)
    want = msa_ref.sparse_attention(q.double(), k.double(), v.double(), block_idx.masked_fill(bad != block_idx, -1), bs)
    assert_close(out, want[0], torch.float32, "out")
    assert_close(lse, want[1], torch.float32, "lse")


@pytest.mark.skipif(GPU, reason="the interpreter's int32 arithmetic on a lazily allocated CPU storage")
def test_offsets_past_int32():
    """dout with a head stride of 2^30 elements (its third head 2^31 past the base): the backward's row offsets in
    int64, so the gradients are those of a contiguous copy."""
    B, Hq, Hkv, T, D, bs, K = 1, 3, 1, 16, 16, 4, 2
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, dtype=torch.float16, seed=4)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).half()
    dout_far = past_int32(dout, 1)
    if dout_far is None:
        pytest.skip("no 8 GB of address space for the lazily allocated storage")
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=4)
    got, ref = run_both(q, k, v, block_idx, bs, dout_far)
    for name, a, b in zip(("dq", "dk", "dv"), got[2:], ref[2:]):
        assert_close(a, b, torch.float16, name)


def test_non_contiguous_and_chunked(monkeypatch):
    """Strided views of q, k, v, dout, and a partial-buffer bound small enough to force several chunks of T."""
    monkeypatch.setattr(common, "PARTIAL_ELEMS", 4096)
    B, Hq, Hkv, T, D, bs, K = 2, 4, 2, 45, 16, 8, 3
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, Hq, D, generator=g).to(DEVICE).transpose(1, 2)       # (B, Hq, T, D), T-major
    kv = torch.randn(B, Hkv, T, 2 * D, generator=g).to(DEVICE)
    k, v = kv[..., :D], kv[..., D:]                                            # strided views
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=5, pad=0.2)
    dout = torch.randn(B, Hq, D, T, generator=g).to(DEVICE).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or dout.is_contiguous())
    got, ref = run_both(q, k, v, block_idx, bs, dout)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, torch.float32, name)


def test_outputs_token_major():
    """out, dq, dk and dv come back laid out (B, T, H, D) in memory, as a model's projections lay out q, k, v: out's
    rows for the output projection, out.transpose(1, 2).reshape(B, T, Hq * D), are a view of it, not a copy."""
    B, Hq, Hkv, T, D, bs, K = 2, 4, 2, 40, 16, 8, 3
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, D)
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=3)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = attention.sparse_attention(*qkv, block_idx, bs)
    grads = torch.autograd.grad(out, qkv, torch.ones_like(out))
    for name, x in zip(("out", "dq", "dk", "dv"), (out, *grads)):
        assert x.transpose(1, 2).is_contiguous(), name
    assert out.transpose(1, 2).reshape(B, T, Hq * D).data_ptr() == out.data_ptr()


@pytest.mark.parametrize("chunks", [1, 3])
def test_unchosen_block_gets_zero_gradients(monkeypatch, chunks):
    """A block that no token chose gets dK = dV = 0 exactly, in one chunk of tokens (where each block's first
    segment stores its sums into fp32 buffers that are not zeroed first) and in several (zeroed, added to)."""
    B, Hq, Hkv, T, D, bs, K = 1, 4, 2, 40, 16, 8, 3
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, seed=8)
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=8)
    block_idx = block_idx.masked_fill(block_idx == 1, -1)                      # block 1: nobody's, not even its own
    monkeypatch.setattr(common, "PARTIAL_ELEMS", B * Hkv * K * (Hq // Hkv) * D * T // chunks)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    poison_allocator(B * Hkv * T * D)
    got, ref = run_both(q, k, v, block_idx, bs, dout)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, torch.float32, name)
    for name, g in zip(("dk", "dv"), got[3:]):
        assert torch.equal(g[:, :, bs:2 * bs], torch.zeros_like(g[:, :, bs:2 * bs])), name


def test_backward_is_deterministic():
    """Two backward passes give bitwise equal gradients (no atomics; fixed reduction orders)."""
    B, Hq, Hkv, T, D, bs, K = (1, 64, 4, 512, 128, 64, 8) if GPU else (1, 4, 1, 40, 16, 8, 4)
    dtype = torch.bfloat16 if GPU else torch.float32
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, dtype=dtype, seed=6)
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=6)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, dtype)
    runs = []
    for _ in range(2):
        qkv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        runs.append(torch.autograd.grad(attention.sparse_attention(*qkv, block_idx, bs)[0], qkv, dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# (shape, dtype, backward segment, PARTIAL_ELEMS): NSUB = 1 and 2, D > 64, and on a GPU the M3 layout with the real
# settings (None: the segment that the backward picks, common._seg_len)
HOT = [((1, 4, 2, 70, 16, 8, 3), torch.float32, 4, 16384), ((1, 2, 1, 150, 16, 96, 2), torch.float32, 4, 16384),
       ((1, 4, 2, 70, 72, 16, 3), torch.float32, 4, 16384)]
HOT += [((1, 64, 4, 2048, 128, 128, 16), torch.bfloat16, None, common.PARTIAL_ELEMS)] if GPU else []


@pytest.mark.parametrize("shape, dtype, seg, partial", HOT)
def test_hot_blocks_split(monkeypatch, shape, dtype, seg, partial):
    """A block chosen by many tokens (block 0 by every token here, as an attention sink would be) is split over
    several backward programs of seg entries; their dK, dV sums are added in a fixed order: equal to the
    reference, bitwise the same in two runs, across chunks of T too."""
    B, Hq, Hkv, T, D, bs, K = shape
    if seg is None:
        seg = common._seg_len(B * Hkv * T * K, attention.BWD_SEG_SMALL, attention.BWD_SEG)
    else:
        monkeypatch.setattr(attention, "BWD_SEG", seg)
        monkeypatch.setattr(attention, "BWD_SEG_SMALL", seg)
    monkeypatch.setattr(common, "PARTIAL_ELEMS", partial)
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, dtype=dtype, seed=9)
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=9)
    block_idx[..., 0] = 0
    assert int((block_idx == 0).sum()) > 2 * seg                               # so block 0 has further segments
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(10)).to(DEVICE, dtype)
    got, ref = run_both(q, k, v, block_idx, bs, dout)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, dtype, name)
    again, _ = run_both(q, k, v, block_idx, bs, dout)
    for a, b in zip(got[2:], again[2:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("short, long", [(attention.BWD_SEG_SMALL, attention.BWD_SEG),  # the backward
                                         (index.KL_SEG_SMALL, index.KL_SEG)])           # kl_loss's pass 2
def test_gradient_segments_by_chunk_size(short, long):
    """Short segments for a chunk of few entries (the model's shapes: more programs in a launch of a few waves),
    long ones beyond SMALL_CHUNK entries (the M3 shape: fewer partials and less fix-up work)."""
    assert common._seg_len(32 * 2 * 1024 * 4, short, long) == short < long
    assert common._seg_len(common.SMALL_CHUNK, short, long) == short
    assert common._seg_len(common.SMALL_CHUNK + 1, short, long) == long
    assert common._seg_len(4 * 32768 * 16, short, long) == long                     # the M3 layer at 32K


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if GPU else []))
@pytest.mark.parametrize("shape, sink", [((2, 4, 2, 37, 16, 8, 3), False),    # B = 2, T % bs, -1 padding
                                         ((1, 2, 2, 40, 24, 12, 8), False),   # G = 1, dense (K * bs >= T)
                                         ((1, 3, 1, 29, 32, 16, 1), False),   # K = 1
                                         ((1, 4, 2, 45, 16, 8, 3), True)])    # block 0 chosen by every token
def test_query_outer_baseline(dtype, shape, sink):
    B, Hq, Hkv, T, D, bs, K = (2, 6, 2, 300, 64, 64, 4) if GPU and shape[0] == 2 else shape
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, dtype=dtype, seed=8)
    block_idx = random_block_idx(B, Hkv, T, bs, K, seed=8, pad=0.2)
    if sink:
        block_idx[..., 0] = 0
    out, lse = msa_triton.attention_forward_query_outer(q, k, v, block_idx, bs)
    rout, rlse = msa_ref.sparse_attention(q.double(), k.double(), v.double(), block_idx, bs)
    assert_close(out, rout, dtype, "out")
    assert_close(lse, rlse, dtype, "lse")


def test_bad_inputs():
    q, k, v, _, _ = rand_inputs(1, 4, 2, 8, 16, 8)
    bi = random_block_idx(1, 2, 8, 4, 2)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        msa_triton.sparse_attention(q[:, :3], k, v, bi, 4)
    with pytest.raises(ValueError, match="block_idx entries"):
        msa_triton.sparse_attention(q, k, v, bi + 5, 4)
    with pytest.raises(ValueError, match="block_size"):
        msa_triton.sparse_attention(q, k, v, bi, 0)
    with pytest.raises(ValueError, match="one dtype"):
        msa_triton.sparse_attention(q, k.double(), v, bi, 4)
    with pytest.raises(ValueError, match="head dim D must be <= 128"):
        q2, k2, v2, _, _ = rand_inputs(1, 2, 1, 4, 160, 8)
        msa_triton.sparse_attention(q2, k2, v2, random_block_idx(1, 1, 4, 4, 1), 4)
    with pytest.raises(ValueError, match="block_idx must be"):
        msa_triton.sparse_attention(q, k, v, bi[..., :4, :], 4)


def segments_by_torch(start, cnt, n_entries, seg):
    """common._split_segments in plain torch (searchsorted over the running count of segments): lo, hi, blk, x,
    used (which programs hold a segment), xbase, xcnt."""
    BH, nbc = cnt.shape
    nseg = (cnt + seg - 1) // seg
    last = torch.cumsum(nseg, 1)
    pid = torch.arange(-(-n_entries // seg) + nbc, device=cnt.device).expand(BH, -1).contiguous()
    blk = torch.searchsorted(last, pid, right=True)
    used = blk < nbc
    blk = blk.clamp(max=nbc - 1)
    part = pid - (last - nseg).gather(1, blk)
    lo = torch.where(used, start.gather(1, blk) + part * seg, 0)
    hi = torch.where(used, torch.minimum(lo + seg, (start + cnt).gather(1, blk)), 0)
    xcnt = (nseg - 1).clamp(min=0)
    xbase = torch.cumsum(xcnt, 1) - xcnt
    return lo, hi, blk, torch.where(part > 0, xbase.gather(1, blk) + part - 1, -1), used, xbase, xcnt


@pytest.mark.parametrize("BH, nbc, T, K, seg", [(3, 5, 20, 2, 4), (2, 300, 1500, 2, 7), (1, 1, 10, 1, 3),
                                                (2, 600, 600, 4, 128)])
def test_segments_kernel(BH, nbc, T, K, seg):
    """The one-launch segment lists equal the torch formulation, across chunks of 256 blocks, with a sink block."""
    g = torch.Generator().manual_seed(BH + nbc)
    bi = torch.randint(-1, nbc, (1, BH, T, K), generator=g).int()
    bi[..., 0] = 0                                                             # every token chooses block 0
    _, ent, start, cnt = common._csr(bi.to(DEVICE), 0, T, nbc)
    got = common._split_segments(start, cnt, T * K, seg)
    lo, hi, blk, x, used, xbase, xcnt = segments_by_torch(start, cnt, T * K, seg)
    assert torch.equal(got[0].long(), lo) and torch.equal(got[1].long(), hi)
    assert torch.equal(got[2].long()[used], blk[used]) and torch.equal(got[3].long()[used], x[used])
    assert bool((got[3][~used] == -1).all()) and torch.equal(got[4].long(), xbase) and torch.equal(got[5].long(), xcnt)
    assert int(xcnt.sum(1).max()) <= got[6]                                     # slots of one (batch, group)
