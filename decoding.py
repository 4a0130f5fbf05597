"""
The machinery of decoding, apart from the model it drives (model.py's GPT.generate and GPT.decode_step use it):
  KVCache        one attention layer's cache of keys, values and index keys, preallocated, written on the device;
  sample_token   greedy, or a draw from the softmax (temperature, top-k) by the Gumbel-max trick: no host read;
  compiled_step  torch.compile of the decode step, falling back to eager with one line if compiling fails;
  cuda_graphed   a function of fixed tensors, captured once in a CUDA graph and replayed.
Together they make a decode step that nothing on the host waits for, so one CUDA graph replays it per token.
"""
import contextlib
import os

import torch
import torch.nn.functional as F


class KVCache:
    """
    One attention layer's decoding cache: k, v (B, Hkv, Tmax, D) and, for an MSA layer with a learnt index, the
    index keys ki (B, Tmax, Di), plus their scales ks (B, Tmax) when the index is fp8 (msa_ref.fp8_quantize).
    The tensors are allocated once, at the first write (the prefill), for all Tmax = max_len positions and in
    the dtype written (bf16 under autocast); positions not yet written hold zeros that attention masks out.
    dense: an MSA layer decodes like a dense one, over the whole cache (GPT.generate(decode='dense')).
    w: the layer's q, k, v and index projections stacked into one weight (Attention.stacked_weight), which a decode
    step multiplies once instead of twice; None: the layer's own weights, one product each.
    Every write is an index_copy_ at positions held in a device tensor, into tensors of fixed shape: nothing waits
    on the host, so a CUDA graph can capture a decode step and replay it with a new position.
    """

    def __init__(self, max_len, dense=False, w=None):
        self.max_len, self.dense, self.w = max_len, dense, w
        self.k = self.v = self.ks = self._ki = None

    @property
    def ki(self):
        """The index keys (B, Tmax, Di), or None. fp8 keys are held as their bytes (uint8) and seen as e4m3 here:
        index_copy_ has no fp8 kernel, and a write through a dtype view of the cache becomes, in a compiled step, a
        copy of the whole cache every step, where a write into a tensor of its own stays in place."""
        return self._ki.view(torch.float8_e4m3fn) if self.ks is not None else self._ki

    def write(self, pos, k, v, ki=None, ks=None):
        """pos (T,) long positions on the device; k, v (B, Hkv, T, D); ki (B, T, Di) or None; ks (B, T) or None."""
        if self.k is None:
            B, Hkv, _, D = k.shape
            self.k, self.v = k.new_zeros(B, Hkv, self.max_len, D), v.new_zeros(B, Hkv, self.max_len, D)
            if ki is not None:
                held = torch.uint8 if ks is not None else ki.dtype                      # fp8 as bytes: see ki
                self._ki = ki.new_zeros(B, self.max_len, ki.shape[-1], dtype=held)
                self.ks = None if ks is None else ks.new_zeros(B, self.max_len)
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        if ki is not None:
            self._ki.index_copy_(1, pos, ki.view(torch.uint8) if ks is not None else ki)
        if ks is not None:
            self.ks.index_copy_(1, pos, ks)


def sample_token(logits, temperature, top_k, uniform):
    """
    logits (B, V) float32, uniform (B, V) draws in [0, 1) (None when greedy) -> the next token (B,) long.
    temperature 0: the argmax. Else the Gumbel-max trick: argmax(logits / temperature + g), g = -log(-log u)
    independent Gumbel noise, picks token i with probability softmax(logits / temperature)_i, like
    torch.multinomial, with one fixed-shape argmax and nothing read on the host (a CUDA graph replays it).
    top_k: only the top_k largest logits compete (those tied with the k-th too); top_k=1 is greedy.
    """
    if temperature == 0:
        return argmax(logits)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]                      # (B, 1) the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return argmax(logits - torch.log(-torch.log(uniform)))                   # u = 0 gives -inf: never picked


def argmax(x, pieces=64):
    """x (B, V) float -> (B,) long: x.argmax(-1) (the first index of each row's largest value), in two passes: the
    largest of each of `pieces` pieces of a row, then the largest of those. A compiled step runs a row's argmax as
    one program looping over the whole row, slow at V = 50K; the pieces run side by side."""
    B, V = x.shape
    x = F.pad(x, (0, -V % pieces), value=float("-inf")).view(B, pieces, -1)  # (B, pieces, L), padding never chosen
    best, where = x.max(-1)                                                   # (B, pieces) each piece's first largest
    piece = best.argmax(-1, keepdim=True)                                     # (B, 1) the first piece holding the max
    return piece[:, 0] * x.shape[-1] + where.gather(1, piece)[:, 0]


# inductor's options for a decode step. combo_kernels: independent small kernels (a layer's norms, its routing, its
# cache writes) run as one launch, which a step of ~100 one-token kernels pays for in launches, not in bytes.
# emulate_precision_casts: a fused kernel rounds each intermediate to the dtype the eager step rounds it to, where it
# would otherwise keep float32 (the MoE's float32 partial sums, rounded to bf16 before the residual's add), so the
# compiled step decodes the eager step's greedy tokens.
STEP_OPTIONS = dict(combo_kernels=True, emulate_precision_casts=True)


def compiled_step(fn, backend):
    """
    torch.compile(fn) for the decode step: fullgraph (a graph break would put host work back into the step) and
    dynamic=False (the caches are preallocated, so every call has the same shapes). The compiled step is then
    captured by cuda_graphed like the eager one, not by mode='reduce-overhead': its CUDA graphs skip a function
    that writes into its inputs (the caches, tok, pos, out) and copy the inputs into static buffers each call,
    where cuda_graphed replays on the very tensors that generate holds.
    Compiling happens at the first call; if it fails, one line says why and fn itself runs from then on (tok and
    pos are restored first; the cache and out rows it may have written are written again, with the same values).
    """
    options = STEP_OPTIONS if backend == "inductor" else None
    compiled, chosen = torch.compile(fn, fullgraph=True, dynamic=False, backend=backend, options=options), None

    def call(tok, pos, *args):
        nonlocal chosen
        if chosen is None:                                                   # the first call: compile
            saved = tok.clone(), pos.clone()
            try:
                with _pdl_config(backend, tok):
                    compiled(tok, pos, *args)
                chosen = compiled
                return
            except Exception as e:
                why = " ".join(str(e).split())[:200]
                print(f"torch.compile of the decode step failed, decoding eagerly: {type(e).__name__}: {why}")
                tok.copy_(saved[0])
                pos.copy_(saved[1])
                chosen = fn
        chosen(tok, pos, *args)
    return call


def _pdl_config(backend, tok):
    """The inductor setting under which a decode step of tok (B, 1) compiles: programmatic dependent launch in
    inductor's kernels, as in msa_triton's (msa_triton/common.py; NANOMSA_PDL=0 turns both off), so that each
    kernel starts while the one before finishes; at batch 1 only, on a GPU of compute capability 9 or newer: at
    batch 8 it makes the step slower (dev/decode.md)."""
    cfg = torch._inductor.config.triton
    on = backend == "inductor" and os.environ.get("NANOMSA_PDL", "1").strip() != "0" and hasattr(cfg, "enable_pdl") \
        and tok.is_cuda and tok.shape[0] == 1 and torch.cuda.get_device_capability(tok.device)[0] >= 9
    return torch._inductor.config.patch({"triton.enable_pdl": True}) if on else contextlib.nullcontext()


def cuda_graphed(fn):
    """fn() reads and writes fixed tensors, and may return one. Runs it once on a side stream (compiles the Triton
    kernels and a torch.compile'd function, creates library handles: nothing of that may happen during a capture),
    then captures it in a CUDA graph (capturing runs nothing). Returns (the first call's result, replay) where
    replay() reruns fn on the current contents of its tensors and returns the (reused) output tensor.
    The graph holds only the tensors' addresses, so replay keeps fn, and with it every tensor fn reads (a cache
    made only for fn, a stacked weight held by that cache), alive for as long as replay lives.
    Both runs keep autocast's cache of cast weights off: a graph that read a cached cast would read freed memory
    once the autocast region that cached it ends, and generate replays its graph in later regions too."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    no_cache = lambda: torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                      enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
    with torch.cuda.stream(side), no_cache():
        first = fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), no_cache():
        static = fn()

    def replay():
        graph.replay()
        return static
    replay.fn = fn
    return first, replay
