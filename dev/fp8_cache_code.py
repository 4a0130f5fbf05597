"""
A lab tool (dev/decode.md, "Why fp8 index keys slow the batch-8 step"), not part of the model: compiles one decode
step of a tiny model with an fp8 index-key cache (the reference backend, on the CPU: inductor's C++ code) and
counts the loops that run over a whole layer's key cache, which a step that writes the cache in place has none of.
    python dev/fp8_cache_code.py        # prints the count; the generated code goes to $OUT/fp8_step_code.py
"""
import os
import re
import sys

import torch
from torch._inductor.utils import run_and_get_code

sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]
from test_model import PATCH, tiny  # noqa: E402

B, T0, L = 2, 16, 4096
m = tiny(index_fp8=True).eval()
x = torch.randint(0, PATCH, (B, T0), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    cache = m.new_cache(L)
    m(x, cache=cache)                                                         # the prefill, eagerly
    tok, pos, out = x[:, -1:].clone(), torch.tensor([T0]), torch.zeros(B, L, dtype=torch.long)
    step = torch.compile(m.decode_step, fullgraph=True, dynamic=False)
    _, code = run_and_get_code(step, tok, pos, cache, out, None, 0, None)
src = "\n".join(code)
open(os.path.join(os.environ.get("OUT", "/tmp"), "fp8_step_code.py"), "w").write(src)
n = B * L * m.cfg.index_dim                                                   # one layer's key cache, in elements
loops = len(re.findall(rf"<static_cast<int64_t>\({n}L\)", src))
print(f"torch {torch.__version__}: {loops} loops over a whole fp8 key cache ({n} elements) in the compiled step")
