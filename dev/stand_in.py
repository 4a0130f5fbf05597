"""
Shared by the lab tools that run Triton's launch path on a machine without a GPU (host_probe.py, kernel_regs.py):
a stand-in driver (device 0, stream 0, an sm_90 target) and a kernel whose launch does nothing. install(compile)
makes them Triton's: every launch then runs Triton's Python path up to its C launcher, calls compile(src, target,
options) where Triton would compile (by default: nothing is compiled) and launches nothing. Call it before
msa_triton is imported.
"""
import triton
import triton.compiler
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver


class StandInDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class NoLaunch:
    """What the stand-in compile returns: a kernel whose launch does nothing."""
    function = packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        return None


def install(compile=None):
    """The stand-in driver, and compile (src, target, options -> None) in place of Triton's compiler: what it does
    with each kernel before the launch that does nothing."""
    def stand_in_compile(src, target=None, options=None, _env_vars=None):
        if compile is not None:
            compile(src, target, options)
        return NoLaunch()
    driver.set_active(StandInDriver())
    triton.compiler.compile = stand_in_compile
