"""
Shared test setup. pytest imports this file before any test module, so it is the one place that
decides how Triton runs:
  - with a CUDA GPU, Triton compiles real kernels;
  - without one (CI, laptops), TRITON_INTERPRET=1 makes Triton run kernels in its numpy interpreter.
    The variable is read when triton is imported, so it must be set here, before any test imports it.
    The interpreter is slow (use tiny shapes) and its tl.dot is wrong for bf16: test fp32/fp16 there.
NANOMSA_CHECKS=1 turns msa_triton's checking mode on for the suite, on a GPU too (the checks of block_idx's and
cache_lens' values, a host sync each); tests of the hot path turn it off with msa_triton.checks.

Helpers for several test files (the tests directory is on sys.path, so `from conftest import ...`):
  DEVICE         "cuda" when a GPU is present, else "cpu"
  requires_cuda  skip marker for tests that only mean something on a GPU
  rand_inputs    random q, k, v, qi, ki in the layout of the API (DESIGN.md section 3)
  past_int32     a copy of a tensor whose elements sit past int32's range of offsets
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NANOMSA_CHECKS", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU (bf16 / speed / compiled kernels); none on this machine")


def rand_inputs(B, Hq, Hkv, T, D, Di, dtype=torch.float32, device=DEVICE, seed=0):
    """Random (q, k, v, qi, ki) = ((B, Hq, T, D), (B, Hkv, T, D) x2, (B, Hkv, T, Di), (B, T, Di)), contiguous,
    drawn on the CPU from a seeded generator (the same numbers on every machine), then moved."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, Hq, T, D), (B, Hkv, T, D), (B, Hkv, T, D), (B, Hkv, T, Di), (B, T, Di)]
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes)


def past_int32(x, dim):
    """A copy of x (on the CPU) whose index along dim steps 2^30 elements, inside a storage of 2^32 + 2^20 elements
    (8 GB of fp16, allocated lazily: only the pages written cost memory), from an offset of 2^31: every element's
    offset is past int32's range, where a kernel that computes offsets in int32 wraps. None when the machine will
    not lend the address space."""
    try:
        store = torch.empty((1 << 32) + (1 << 20), dtype=x.dtype)
    except RuntimeError:
        return None
    strides = list(x.contiguous().stride())
    strides[dim] = 1 << 30
    view = store.as_strided(x.shape, strides, storage_offset=1 << 31)
    view.copy_(x)
    return view


def poison_allocator(numel, dtype=torch.float32, device=DEVICE, n=8):
    """Fill n freed buffers of numel elements with NaN, so that the next allocations of that size (an output the
    code under test allocates without zeroing) start as NaN instead of zeros by luck: a row that is never written
    then shows. Reliable with CUDA's caching allocator; on a CPU the C allocator usually hands the same memory back."""
    bufs = [torch.full((numel,), float("nan"), dtype=dtype, device=device) for _ in range(n)]
    del bufs


@pytest.fixture(autouse=True)
def _torch_matmul_precision():
    """Each test starts from the float32 matmul precision of the test session: train.py, which some tests run in
    their own process (runpy), turns on TF32 for the GPU's float32 products (a speed setting), and a float32
    test that follows it in the same worker would otherwise compare TF32 results at float32 tolerances."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]
