"""
A lab tool (dev/kernels.md, "Registers without a GPU"), not part of the model: registers, spills and shared memory
of the Triton kernels of one MSA training step (index_topk, sparse_attention_kl, its backward) and of sparse_decode,
compiled for Hopper (sm_90) on a machine without a GPU. A stand-in driver gives an sm_90 target; Triton's compiler
and the ptxas it bundles build each kernel as on an H100 or H200, with the launch options a GPU run picks (the
inputs are CPU tensors that say they are CUDA ones); nothing launches. From each cubin (cuobjdump
--dump-resource-usage): registers a thread (255 is the cap), local memory a thread (spills), and the shared memory
a program takes, then how many programs an SM holds by registers and by shared memory. Use the Triton version of
the GPU machine:
    pip install --no-deps --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36 python dev/kernel_regs.py 1024x4 16384x8      # TxK of the model's shape, B*T = 32K
"""
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.compiler

import stand_in


class CudaLike(torch.Tensor):
    """A CPU tensor that says it is a CUDA one, so that the launchers pick their GPU tiles and options."""
    @property
    def is_cuda(self):
        return True


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
compile_for_real, found = triton.compiler.compile, {}


def read_usage(src, target, options):
    """Triton's compile of one kernel, then its cubin's resource usage into found[kernel name] (one entry per
    configuration)."""
    kernel = compile_for_real(src, target=target, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = (int(re.search(rf"{k}:(\d+)", usage).group(1)) for k in ("REG", "STACK"))
    warps, shared = kernel.metadata.num_warps, kernel.metadata.shared
    by_regs = 65536 // (max(regs, 1) * 32 * warps)
    by_shared = 232448 // shared if shared else 99
    found.setdefault(src.fn.__name__, set()).add((regs, stack, shared, warps, by_regs, min(by_shared, 32)))


stand_in.install(read_usage)
sys.path.insert(0, os.getcwd())
import msa_triton                                                              # noqa: E402 (after the stand-ins)
from msa_triton import common, tile                                           # noqa: E402
from bench import msa_train_step                                              # noqa: E402

common._capability = lambda device: (9, 0)                                    # Hopper, for the PDL launch option
msa_triton.checks(False)                                                      # as on CUDA: no data-dependent checks
tile.FORCE = "kv"
os.environ["TRITON_INTERPRET"] = "1"  # after the stand-ins: only lets the device check pass CPU tensors


def cuda_like(*shape, grad=False):
    x = torch.randn(*shape, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(len(shape)))
    return torch.Tensor._make_subclass(CudaLike, x, grad)


for case in sys.argv[1:] or ["1024x4", "1024x8"]:
    T, K = (int(x) for x in case.split("x"))
    B = 32768 // T
    q, k, v = cuda_like(B, 8, T, 64, grad=True), cuda_like(B, 2, T, 64, grad=True), cuda_like(B, 2, T, 64, grad=True)
    qi, ki = cuda_like(B, 2, T, 64, grad=True), cuda_like(B, T, 64, grad=True)
    msa_train_step(q, k, v, qi, ki, torch.randn(B, 8, T, 64, dtype=torch.bfloat16), 64, K)
    print(f"{case} (B = {B}):", flush=True)
msa_triton.sparse_decode(cuda_like(8, 8, 64), cuda_like(8, 2, 64), cuda_like(8, 2, 4096, 64), cuda_like(8, 2, 4096, 64),
                         cuda_like(8, 4096, 64), torch.full((8,), 4000, dtype=torch.int32), 64, 4)
print(f"{'kernel':26s} {'regs':>5s} {'spill B':>8s} {'shared B':>9s} {'warps':>6s} {'programs/SM by regs, shared':>28s}")
for name, rows in sorted(found.items()):
    for regs, stack, shared, warps, by_regs, by_shared in sorted(rows):
        print(f"{name:26s} {regs:5d} {stack:8d} {shared:9d} {warps:6d} {by_regs:14d}, {by_shared}")
