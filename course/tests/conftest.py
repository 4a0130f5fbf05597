"""
Test setup of every assignment folder (course/make_student.py copies this file next to the tests).
pytest puts the folder holding this file first on sys.path, so `import msa_ref` (etc.) imports the copy
in the assignment folder: the student's code. Without a CUDA GPU, Triton must run in its interpreter,
and the variable is read when triton is imported, so it is set here, before any test imports it.

Two helpers the tests import (`from conftest import assert_close, random_block_idx`):
  assert_close      compares tensors and, on a mismatch, says where in one line, never a screen of numbers;
  random_block_idx  a valid selection drawn at random, so that a test needs no other assignment's code.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch.testing.assert_close's default tolerances (rtol, atol); other dtypes compare exactly
TOLERANCES = {torch.float64: (1e-7, 1e-7), torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-5),
              torch.bfloat16: (1.6e-2, 1e-5)}


def assert_close(actual, expected, atol=None, rtol=None, what="result"):
    """Like torch.testing.assert_close (same shape, same dtype, |a - e| <= atol + rtol * |e| everywhere, inf only
    where expected, no NaN), but a failure reads: how many elements differ, the first differing index and its two
    values, and the rows around it when they are short (a row of selected blocks, say)."""
    __tracebackhide__ = True
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    rtol0, atol0 = TOLERANCES.get(actual.dtype, (0.0, 0.0))
    rtol, atol = rtol0 if rtol is None else rtol, atol0 if atol is None else atol
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    ok = (a == e) | ((a - e).abs() <= atol + rtol * e.abs())                   # a == e: equal infinities
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    first = tuple(bad[0].tolist())
    a, e = actual.detach().cpu(), expected.detach().cpu()                      # the values in their own dtype
    msg = (f"{what}: {len(bad)} of {ok.numel()} elements differ (atol {atol:g}, rtol {rtol:g}); "
           f"first at index {first}: got {a[first].item()!r}, expected {e[first].item()!r}")
    if a.dim() > 1 and a.shape[-1] <= 16:
        msg += f"; that row: got {a[first[:-1]].tolist()}, expected {e[first[:-1]].tolist()}"
    raise AssertionError(msg)


def random_block_idx(B, Hkv, T, block_size, topk, seed=0, device="cpu"):
    """A valid block_idx int32 (B, Hkv, T, K) drawn at random: for each query t, its local block t // bs, up to
    K - 1 distinct earlier blocks, in random order, and -1 padding (min(K, t // bs + 1) valid entries, like
    msa_ref.index_topk's). Random on purpose: the tests that need a selection do not depend on assignment 1."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, Hkv, T, topk), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                local = t // block_size
                row = torch.randperm(local, generator=g)[:topk - 1].tolist() + [local]
                idx[b, h, t, :len(row)] = torch.tensor(row, dtype=torch.int32)[torch.randperm(len(row), generator=g)]
    return idx.to(device)
