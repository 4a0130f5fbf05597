"""
msa_triton/tile.py (the query-tile path: sparse_attention_tile, kl_loss_tile) against msa_ref, the definition.
Without a GPU these run in Triton's interpreter (conftest.py) at tiny sizes in fp32 / fp16; with one they
also run in bf16 at the repository model's shape and the M3 head layout, against msa_ref and the KV-outer path.
"""

import pytest
import torch
import torch.nn.functional as F

import msa_ref
import msa_triton
from msa_triton import attention, tile
from conftest import DEVICE, rand_inputs, requires_cuda
from test_msa_triton import assert_close, random_block_idx
from test_msa_triton import run_both as run_both_paths

GPU = DEVICE == "cuda"


def selection(kind, B, Hkv, T, bs, K, seed=0):
    """block_idx (B, Hkv, T, K) int32 on DEVICE: 'random' (shuffled, 20% -1 padding), 'repeats' (random, then a
    token's first block repeated in its last slot), 'sink' (random with block 0 in every token's first slot),
    'indexer' (msa_ref.index_topk on random qi, ki), 'dense' (every visible block: K must be >= nb)."""
    if kind == "indexer":
        _, _, _, qi, ki = rand_inputs(B, Hkv, Hkv, T, 8, 16, seed=seed + 100, device="cpu")
        return msa_ref.index_topk(qi, ki, bs, K).to(DEVICE)
    if kind == "dense":
        return msa_ref.dense_block_idx(B, Hkv, T, bs, DEVICE)
    idx = random_block_idx(B, Hkv, T, bs, K, seed=seed, pad=0.2 if kind == "random" else 0.0)
    if kind == "repeats" and K > 1:
        idx[..., -1] = idx[..., 0]
    if kind == "sink":
        idx[..., 0] = 0
    return idx


def run_both(q, k, v, block_idx, bs, dout):
    """(out, lse, dq, dk, dv) of the tile path and of msa_ref in float64 from the same inputs."""
    return run_both_paths(q, k, v, block_idx, bs, dout, attend=tile.sparse_attention_tile)


def check_attention(shape, dtype, kind, seed=0):
    B, Hq, Hkv, T, D, bs, K = shape
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, dtype=dtype, seed=seed)
    block_idx = selection(kind, B, Hkv, T, bs, K, seed=seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    got, ref = run_both(q, k, v, block_idx, bs, dout)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, dtype, name)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    return got


# (B, Hq, Hkv, T, D, bs, K, selection)
CPU_CASES = [
    ((1, 2, 1, 1, 16, 16, 2), "random"),      # T = 1
    ((2, 4, 2, 37, 16, 8, 3), "random"),      # B = 2, T % bs != 0, bs < 16, -1 padding, shuffled slots
    ((1, 3, 1, 29, 32, 16, 1), "random"),     # K = 1 (the local block alone), G = 3 (not a power of two)
    ((1, 4, 2, 70, 16, 8, 3), "repeats"),     # a block listed twice counts once; several tiles
    ((1, 4, 2, 70, 16, 8, 3), "sink"),        # block 0 in every token's list
    ((1, 2, 2, 45, 16, 8, 4), "indexer"),     # G = 1: 64 tokens a tile; index_topk's selections
    ((1, 16, 1, 21, 16, 16, 2), "random"),    # G = 16: 4 tokens a tile
    ((1, 64, 1, 40, 16, 8, 2), "sink"),       # G = 64: one token a tile, 40 tiles (> one CHUNK of flags)
    ((1, 4, 2, 40, 72, 16, 3), "random"),     # D > 64
    ((1, 2, 1, 150, 16, 96, 2), "random"),    # bs > 64: two dK, dV programs per block
]


@pytest.mark.parametrize("shape, kind", CPU_CASES)
def test_attention_matches_ref_fp32(shape, kind):
    check_attention(shape, torch.float32, kind)


@pytest.mark.parametrize("shape, kind", [CPU_CASES[1], CPU_CASES[4]])
def test_attention_matches_ref_fp16(shape, kind):
    check_attention(shape, torch.float16, kind)


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if GPU else []))
def test_dense_selection_is_causal_sdpa(dtype):
    """K * bs >= T selects every visible block: the tile path equals dense causal GQA attention."""
    B, Hq, Hkv, T, D, bs = (2, 8, 2, 300, 64, 64) if GPU else (1, 4, 2, 40, 16, 8)
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, dtype=dtype, seed=4)
    block_idx = selection("dense", B, Hkv, T, bs, 0)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    qkv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, _ = tile.sparse_attention_tile(*qkv, block_idx, bs)
    grads = torch.autograd.grad(out, qkv, dout)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    G = Hq // Hkv
    rout = F.scaled_dot_product_attention(ref_in[0], ref_in[1].repeat_interleave(G, 1), ref_in[2].repeat_interleave(G, 1),
                                          is_causal=True)
    rgrads = torch.autograd.grad(rout, ref_in, dout.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (rout, *rgrads)):
        assert_close(a, b, dtype, name)


def test_views_int64_and_deterministic():
    """Strided q, k, v, dout, an int64 block_idx that is an expanded view: the same as msa_ref, and two backward
    passes bitwise equal (no atomics)."""
    B, Hq, Hkv, T, D, bs, K = 2, 4, 2, 45, 16, 8, 3
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, T, Hq, D, generator=g).to(DEVICE).transpose(1, 2)       # (B, Hq, T, D), T-major
    kv = torch.randn(B, Hkv, T, 2 * D, generator=g).to(DEVICE)
    k, v = kv[..., :D], kv[..., D:]
    block_idx = random_block_idx(1, 1, T, bs, K, seed=5, pad=0.2).long().expand(B, Hkv, T, K)
    dout = torch.randn(B, Hq, D, T, generator=g).to(DEVICE).transpose(2, 3)
    got, ref = run_both(q, k, v, block_idx, bs, dout)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref):
        assert_close(a, b, torch.float32, name)
    again, _ = run_both(q, k, v, block_idx, bs, dout)
    for a, b in zip(got, again):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# kl_loss_tile

def check_kl(shape, Di, kind, dtype=torch.float32, seed=0):
    """kl_loss_tile's value and gradients against msa_ref.kl_loss in float64, without and with the teacher lse."""
    B, Hq, Hkv, T, D, bs, K = shape
    q, k, v, qi, ki = rand_inputs(B, Hq, Hkv, T, D, Di, dtype=dtype, seed=seed)
    block_idx = selection(kind, B, Hkv, T, bs, K, seed=seed)
    qr, kr = (x.detach().double().requires_grad_() for x in (qi, ki))
    ref = msa_ref.kl_loss(q.double(), k.double(), qr, kr, block_idx, bs)
    rg = torch.autograd.grad(ref, [qr, kr])
    _, lse = tile.sparse_attention_tile(q, k, v, block_idx, bs)
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for given in (None, lse):
        qg, kg = (x.detach().clone().requires_grad_() for x in (qi, ki))
        loss = tile.kl_loss_tile(q, k, qg, kg, block_idx, bs, lse=given)
        assert loss.dim() == 0 and loss.dtype == torch.float32
        assert abs(loss.item() - ref.item()) <= tol * max(abs(ref.item()), 1e-3), (loss.item(), ref.item())
        g = torch.autograd.grad(loss, [qg, kg])
        for name, a, b in zip(("dqi", "dki"), g, rg):                        # relative to the gradient's scale
            assert a.dtype == dtype
            err = ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()
            assert err < {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype], (name, err)


@pytest.mark.parametrize("shape, Di, kind", [
    ((1, 2, 1, 1, 16, 16, 2), 8, "random"),       # T = 1
    ((2, 4, 2, 37, 16, 8, 3), 16, "random"),      # B = 2, T % bs != 0, -1 padding
    ((1, 3, 1, 29, 16, 16, 1), 8, "repeats"),     # K = 1, G = 3
    ((1, 2, 2, 70, 16, 8, 3), 24, "sink"),        # G = 1, Di not a power of two, block 0 everywhere, 3 tiles
    ((1, 4, 2, 45, 16, 8, 4), 16, "indexer"),
    ((1, 2, 1, 150, 16, 96, 2), 8, "repeats"),    # bs > 64: two dki programs per block
])
def test_kl_matches_ref(shape, Di, kind):
    check_kl(shape, Di, kind)


def test_kl_dense_and_fp16():
    check_kl((1, 4, 2, 40, 16, 8, 5), 16, "dense")
    check_kl((1, 4, 2, 37, 16, 8, 3), 16, "random", dtype=torch.float16)


def test_kl_no_grad_and_bad_lse():
    B, Hq, Hkv, T, D, Di, bs, K = 1, 4, 2, 20, 16, 8, 8, 2
    q, k, v, qi, ki = rand_inputs(B, Hq, Hkv, T, D, Di, seed=7)
    block_idx = selection("random", B, Hkv, T, bs, K, seed=7)
    with torch.no_grad():
        loss = tile.kl_loss_tile(q, k, qi, ki, block_idx, bs)
    ref = msa_ref.kl_loss(q.double(), k.double(), qi.double(), ki.double(), block_idx, bs)
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    with pytest.raises(ValueError, match="lse must be"):
        tile.kl_loss_tile(q, k, qi, ki, block_idx, bs, lse=torch.zeros(B, Hq, T + 1, device=DEVICE))


# ---------------------------------------------------------------------------------------------
# the path rule and bad input

def test_use_tile_rule_and_force(monkeypatch):
    model = dict(Hkv=2, block_size=64, G=4, D=64)
    assert tile.use_tile(B=32, T=1024, K=4, **model) is True               # short: near-dense union, no lists
    assert tile.use_tile(B=16, T=tile.TILE_MAX_T, K=8, **model) is True
    assert tile.use_tile(B=8, T=tile.TILE_MAX_T + 1, K=4, **model) is False  # longer: the KV-outer lists pay
    assert tile.use_tile(B=2, T=16384, K=8, **model) is False
    assert tile.use_tile(B=1, T=1024, K=4, Hkv=2, block_size=64, G=128, D=64) is False   # beyond the kernels
    for force, want in (("tile", True), ("kv", False)):
        monkeypatch.setattr(tile, "FORCE", force)
        assert tile.use_tile(B=1, T=131072, K=16, Hkv=4, block_size=128, G=16, D=128) is want
        assert tile.use_tile(B=32, T=1024, K=4, **model) is want


def test_bad_inputs():
    q, k, v, _, _ = rand_inputs(1, 4, 2, 8, 16, 8)
    bi = random_block_idx(1, 2, 8, 4, 2)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        tile.sparse_attention_tile(q[:, :3], k, v, bi, 4)
    with pytest.raises(ValueError, match="one dtype"):
        tile.sparse_attention_tile(q, k.double(), v, bi, 4)
    with pytest.raises(ValueError, match="block_size must be <= 128"):
        tile.sparse_attention_tile(q, k, v, torch.zeros_like(bi), 256)
    with pytest.raises(ValueError, match="head dim D must be <= 128"):
        q2, k2, v2, _, _ = rand_inputs(1, 2, 1, 4, 160, 8)
        tile.sparse_attention_tile(q2, k2, v2, random_block_idx(1, 1, 4, 4, 1), 4)


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at the repository model's shape and the M3 head layout, against msa_ref and the KV-outer path

GPU_CASES = [
    ((2, 8, 2, 1000, 64, 64, 4), "random"),       # the repository model's layout
    ((2, 8, 2, 1000, 64, 64, 8), "indexer"),
    ((2, 8, 2, 777, 64, 64, 4), "sink"),
    ((1, 64, 4, 700, 128, 128, 16), "random"),    # M3 head layout: G = 16, D = bs = 128
    ((1, 16, 16, 300, 128, 64, 3), "repeats"),    # G = 1
    ((1, 6, 2, 700, 64, 128, 5), "random"),       # config/train_long.py's layout (bs = 128)
]


@requires_cuda
@pytest.mark.parametrize("shape, kind", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_gpu(shape, kind, dtype):
    got = check_attention(shape, dtype, kind)
    B, Hq, Hkv, T, D, bs, K = shape
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, dtype=dtype, seed=0)
    block_idx = selection(kind, B, Hkv, T, bs, K, seed=0)
    out, lse = attention.sparse_attention(q, k, v, block_idx, bs)            # the KV-outer path, same inputs
    assert (out.float() - got[0].float()).abs().max().item() < 3e-2
    fin = lse.isfinite()
    assert torch.equal(fin, got[1].isfinite()) and (lse[fin] - got[1][fin]).abs().max().item() < 1e-2


@requires_cuda
@pytest.mark.parametrize("shape, kind", [GPU_CASES[0], GPU_CASES[1], GPU_CASES[3]])
def test_kl_gpu(shape, kind):
    check_kl(shape, 64, kind, dtype=torch.bfloat16)


@requires_cuda
def test_gpu_deterministic():
    B, Hq, Hkv, T, D, bs, K = 4, 8, 2, 2048, 64, 64, 8
    q, k, v, _, _ = rand_inputs(B, Hq, Hkv, T, D, 8, dtype=torch.bfloat16, seed=6)
    block_idx = selection("sink", B, Hkv, T, bs, K, seed=6)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, torch.bfloat16)
    runs = []
    for _ in range(2):
        qkv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        runs.append(torch.autograd.grad(tile.sparse_attention_tile(*qkv, block_idx, bs)[0], qkv, dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_smaller_tiles(monkeypatch):
    """ROWS = 16 (4 tokens x 4 heads a tile) and BLOCK_Q = 16; a forward keeps its tile shape for its backward
    even when ROWS changes in between."""
    monkeypatch.setattr(tile, "ROWS", 16)
    monkeypatch.setattr(tile, "BLOCK_Q", 16)
    check_attention((1, 4, 1, 45, 16, 8, 3), torch.float32, "sink")
    check_kl((1, 4, 2, 45, 16, 8, 3), 16, "random")
    q, k, v, _, _ = rand_inputs(1, 4, 1, 45, 16, 8, seed=2)
    block_idx = selection("random", 1, 1, 45, 8, 3, seed=2)
    qkv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, _ = tile.sparse_attention_tile(*qkv, block_idx, 8)
    monkeypatch.setattr(tile, "ROWS", 64)
    grads = torch.autograd.grad(out, qkv, torch.ones_like(out))
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    rgrads = torch.autograd.grad(msa_ref.sparse_attention(*ref_in, block_idx, 8)[0], ref_in, torch.ones_like(out).double())
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert_close(a, b, torch.float32, name)


def test_facade_picks_a_path_by_shape_alone(monkeypatch):
    """msa_triton.sparse_attention and kl_loss call the path tile.use_tile names for the shapes (never the data):
    the tile path for the repository model's short rows, the KV-outer one at the MiniMax-M3 shape."""
    assert tile.use_tile(16, 2, 1024, 4, 64, 4, 64) and not tile.use_tile(1, 4, 32768, 16, 128, 16, 128)
    called = []
    monkeypatch.setattr(tile, "sparse_attention_tile", lambda *a: called.append("tile") or ("out", "lse"))
    monkeypatch.setattr(msa_triton.attention, "sparse_attention", lambda *a: called.append("kv") or ("out", "lse"))
    monkeypatch.setattr(tile, "kl_loss_tile", lambda *a: called.append("kl tile"))
    monkeypatch.setattr(msa_triton.index, "kl_loss", lambda *a: called.append("kl kv"))
    q, k, v, qi, ki = rand_inputs(1, 4, 2, 40, 16, 16, dtype=torch.float32, seed=0)
    bi = random_block_idx(1, 2, 40, 8, 3)
    for force in ("tile", "kv"):
        monkeypatch.setattr(tile, "FORCE", force)
        msa_triton.sparse_attention(q, k, v, bi, 8)
        msa_triton.kl_loss(q, k, qi, ki, bi, 8)
    assert called == ["tile", "kl tile", "kv", "kl kv"]
