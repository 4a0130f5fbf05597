"""
The KV-outer work lists (msa_triton.common: _slots, _csr, _chunks) against their definition in plain torch
(slots_by_torch, csr_by_torch below: a sort per row, a stable sort of the keys, a searchsorted), bitwise, over
random selections and the edge cases: -1 padding, repeated blocks, ids >= nbc or < 0 (dropped), K = 1, T = 1,
a chunk [t0, t1) inside T, B > 1, Hkv = 1, int16 / int32 / int64 ids, a strided block_idx, one tile or many
(common.LIST_TILE, and the rule that shrinks tiles for a small grid), one chunk of keys or several in the scan,
a tile's keys counted by histogram or by atomics;
the in-register sort (common._sort_keys) against torch.sort. Integer kernels only: the interpreter is exact.
Also: the builder is three Triton launches and no torch kernel, whatever the shapes.
"""
import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import bench
from msa_triton import common
from conftest import DEVICE


def slots_by_torch(block_idx, t0, t1, nbc):
    """common._slots' definition: each row of K ids sorted, then a repeat (equal to its left neighbour), an id
    >= nbc and an id < 0 replaced by -1 where they sorted to. int32 (B*Hkv, Tc, K)."""
    B, Hkv, _, K = block_idx.shape
    sl = block_idx[:, :, t0:t1].reshape(B * Hkv, t1 - t0, K).sort(-1).values   # -1 first, then ascending
    dup = F.pad(sl[..., 1:] == sl[..., :-1], (1, 0))
    return sl.masked_fill(dup | (sl >= nbc) | (sl < 0), -1).to(torch.int32).contiguous()


def csr_by_torch(slots, nbc):
    """common._csr's definition from the slots: ent int32 (BH, Tc*K) = the entry ids sorted stably by block (an
    empty slot: block nbc), start, cnt int64 (BH, nbc) from a searchsorted of the sorted keys."""
    BH, Tc, K = slots.shape
    key = slots.view(BH, Tc * K)
    key = key.masked_fill(key < 0, nbc)
    key, ent = key.sort(dim=-1, stable=True)
    edge = torch.searchsorted(key, torch.arange(nbc + 1, device=key.device, dtype=key.dtype).expand(BH, nbc + 1).contiguous())
    start = edge[:, :nbc].contiguous()
    return ent.to(torch.int32), start, edge[:, 1:] - start


def lists_by_torch(block_idx, t0, t1, nbc):
    """(slots, ent, start, cnt), what common._csr returns."""
    slots = slots_by_torch(block_idx, t0, t1, nbc)
    return (slots, *csr_by_torch(slots, nbc))


def assert_lists_equal(block_idx, t0, t1, nbc):
    got = common._csr(block_idx, t0, t1, nbc)
    want = lists_by_torch(block_idx, t0, t1, nbc)
    for name, g, w in zip(("slots", "ent", "start", "cnt"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, w.dtype, g.shape, w.shape)
        assert g.is_contiguous(), name
        assert torch.equal(g.cpu(), w.cpu()), (name, g, w)
    assert torch.equal(common._slots(block_idx, t0, t1, nbc).cpu(), want[0].cpu())


def random_block_idx(B, Hkv, T, K, lo, hi, seed, dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (B, Hkv, T, K), generator=g).to(dtype).to(DEVICE)


def set_tile(monkeypatch, tile, counts="histogram"):
    """tile entries a tile (LIST_TILE, not shrunk), or 'auto': the rule of common._list_tiles (tiles shrink while the
    grid is small). counts: how _slots_kernel counts a tile's keys, by 'histogram' (up to HIST_BINS keys, as every
    shape here has) or by 'atomics' (HIST_BINS = 0, what more keys get)."""
    if counts == "atomics":
        monkeypatch.setattr(common, "HIST_BINS", 0)
    if tile != "auto":
        monkeypatch.setattr(common, "LIST_TILE", tile)
        monkeypatch.setattr(common, "LIST_PROGRAMS", 1)


@pytest.mark.parametrize("counts", ["histogram", "atomics"])
@pytest.mark.parametrize("tile", [16, 64, 4096, "auto"])
@pytest.mark.parametrize("seed", range(6))
def test_lists_random(monkeypatch, tile, seed, counts):
    """Random selections with repeats, -1, ids out of range on both sides; a random chunk of tokens."""
    set_tile(monkeypatch, tile, counts)
    g = torch.Generator().manual_seed(100 + seed)
    B, Hkv = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g))
    T, K = int(torch.randint(1, 90, (1,), generator=g)), int(torch.randint(1, 10, (1,), generator=g))
    nbc = int(torch.randint(1, 40, (1,), generator=g))
    t0 = int(torch.randint(0, T, (1,), generator=g))
    t1 = int(torch.randint(t0 + 1, T + 1, (1,), generator=g))
    dtype = (torch.int32, torch.int64, torch.int16)[seed % 3]
    assert_lists_equal(random_block_idx(B, Hkv, T, K, -3, nbc + 3, seed, dtype), t0, t1, nbc)


@pytest.mark.parametrize("counts", ["histogram", "atomics"])
@pytest.mark.parametrize("tile", [16, 4096, "auto"])
def test_lists_many_tiles_and_key_chunks(monkeypatch, tile, counts):
    """nbc > 128 (several programs of the scan, each needing the entries of the chunks before it), more tiles
    than one load of the scan holds (TB), a sink block that every token chose."""
    set_tile(monkeypatch, tile, counts)
    bi = random_block_idx(2, 1, 300, 4, -1, 300, 7)
    bi[..., 1] = 0
    assert_lists_equal(bi, 0, 300, 300)


def test_lists_edge_cases(monkeypatch):
    set_tile(monkeypatch, 16)
    assert_lists_equal(torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=DEVICE), 0, 1, 1)       # T = 1, K = 1
    assert_lists_equal(torch.full((2, 2, 5, 3), -1, dtype=torch.int32, device=DEVICE), 0, 5, 1)  # padding only
    assert_lists_equal(random_block_idx(1, 2, 37, 1, -2, 12, 1), 0, 37, 10)                      # K = 1
    same = torch.full((1, 2, 33, 5), 3, dtype=torch.int64, device=DEVICE)                         # one block, 5 times
    assert_lists_equal(same, 0, 33, 4)
    assert_lists_equal(same, 0, 33, 3)                                                           # ... and >= nbc
    big = random_block_idx(2, 1, 20, 6, -5, 9, 2, torch.int64)
    big[0, 0, ::3, 2] = 2 ** 40                                                                  # beyond int32
    big[1, 0, ::2, 0] = -2 ** 40
    assert_lists_equal(big, 3, 17, 8)
    T, bs = 45, 8                                                                                # T % bs != 0
    bi = random_block_idx(2, 2, T, 4, -1, math.ceil(T / bs), 3)
    for t0, t1 in ((0, 20), (20, 45), (0, 45)):                                                  # chunks of tokens
        assert_lists_equal(bi, t0, t1, math.ceil(t1 / bs))
    strided = random_block_idx(2, 6, 2, 30, -1, 7, 4).permute(0, 2, 3, 1)                         # (2, 2, 30, 6) view
    assert not strided.is_contiguous()
    assert_lists_equal(strided, 0, 30, 6)


@triton.jit
def _sort_program(x_ptr, LOG_N: tl.constexpr):
    i = tl.arange(0, 2 ** LOG_N)
    tl.store(x_ptr + i, common._sort_keys(tl.load(x_ptr + i), LOG_N))


@pytest.mark.parametrize("log_n", [0, 1, 3, 6, 10])
def test_sort_keys(log_n):
    """The in-register sort of _csr_scatter_kernel equals torch.sort, with repeats and the extremes of its range."""
    x = torch.randint(0, 2 ** 30, (2 ** log_n,), generator=torch.Generator().manual_seed(log_n), dtype=torch.int32)
    x[::3] = x[0]
    x[1::7] = 2 ** 30 - 1
    x[2::5] = 0
    y = x.to(DEVICE)
    _sort_program[(1,)](y, LOG_N=log_n)
    assert torch.equal(y.cpu(), x.sort().values)


def test_chunks_yield_the_lists():
    """_chunks: each chunk's bounds and its lists (the chunking rule itself: test_msa_triton*)."""
    bi = random_block_idx(1, 2, 50, 3, -1, 7, 5)
    for t0, t1, nbc, *lists in common._chunks(bi, 4, 8):
        for g, w in zip(lists, lists_by_torch(bi, t0, t1, nbc)):
            assert torch.equal(g.cpu(), w.cpu())


def test_list_builder_launches():
    """_csr is three Triton launches and _slots one, with no torch op that launches device work (allocations only),
    at any shape: the count does not grow with T, K or the number of blocks."""
    for B, Hkv, T, K, nbc in ((1, 1, 5, 1, 1), (2, 2, 200, 5, 30)):
        bi = random_block_idx(B, Hkv, T, K, -1, nbc, 6)
        n = bench.count_ops(lambda: common._csr(bi, 0, T, nbc))
        assert n["triton"] == 3 and n["torch_device"] == 0, n
        n = bench.count_ops(lambda: common._slots(bi, 0, T, nbc))
        assert n["triton"] == 1 and n["torch_device"] == 0, n
