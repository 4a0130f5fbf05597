"""
msa_triton's functions as custom ops (torch.ops.nanomsa.*), the checking mode, and no host sync.
On the CPU (Triton interpreter, fp32, tiny shapes): torch.library.opcheck of every op (schema, fake
implementation, autograd registration, AOT dispatch with dynamic shapes); torch.compile(fullgraph=True) of
each public function, of the MSA step with its backward and of a tiny MSA model's training forward (no graph
break); the eager backward fills no zero gradients for the outputs no loss uses; the checking mode raises on bad
values, and with it off bad values are harmless.
On a GPU (requires_cuda), at the repository model's shape (Hq=8, Hkv=2, D=Di=64, bs=64, K=4, B=2, T=1024, bf16):
each function under torch.cuda.set_sync_debug_mode("error"); the MSA step captured in a CUDA graph and replayed
on new inputs; torch.compile (inductor) equal to eager.
"""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import msa_ref
import msa_triton
from msa_triton import attention, common, cross_entropy, decode, experts, index, rows, tile
from conftest import DEVICE, rand_inputs, requires_cuda
from test_msa_triton import random_block_idx

# (B, Hq, Hkv, T, D, Di, bs, K): B > 1, T not a multiple of bs, G = 2
SHAPE = (2, 4, 2, 21, 16, 16, 8, 3)


def case(shape=SHAPE, dtype=torch.float32, device=DEVICE, seed=0):
    """q, k, v, qi, ki and the selection block_idx of msa_ref.index_topk (the local block, -1 padding)."""
    B, Hq, Hkv, T, D, Di, bs, K = shape
    q, k, v, qi, ki = rand_inputs(B, Hq, Hkv, T, D, Di, dtype=dtype, device=device, seed=seed)
    return q, k, v, qi, ki, msa_ref.index_topk(qi.float(), ki.float(), bs, K)


def decode_case(B=2, Hq=4, Hkv=2, Tmax=21, D=16, Di=16, lens=(21, 9), dtype=torch.float32, device=DEVICE, seed=0):
    """q (B, Hq, D), qi (B, Hkv, Di), caches and cache_lens for sparse_decode."""
    q, k, v, qi, ki = rand_inputs(B, Hq, Hkv, Tmax, D, Di, dtype=dtype, device=device, seed=seed)
    return q[:, :, 0], qi[:, :, 0], k, v, ki, torch.tensor(lens, device=device, dtype=torch.int32)


def new_key(B=2, Di=16):
    """ki_new (B, Di) for sparse_decode: the new token's index key, which the call writes into the cache."""
    return torch.randn(B, Di, generator=torch.Generator().manual_seed(6)).to(DEVICE)


@pytest.fixture(params=["kv", "tile"])
def path(request):
    """Both paths of sparse_attention and kl_loss (tile.FORCE overrides the shape rule)."""
    prev, tile.FORCE = tile.FORCE, request.param
    yield request.param
    tile.FORCE = prev


@pytest.fixture
def checks_off():
    prev = msa_triton.checks(False)
    yield
    msa_triton.checks(prev)


def grads(x):
    return [t.detach().clone().requires_grad_() for t in x]


# ---------------------------------------------------------------------------------------------
# the ops: registered once, and what torch.library.opcheck asks of them

def test_ops_registered_once():
    for name in ("index_topk", "sparse_attention_fwd", "sparse_attention_bwd", "kl_loss", "sparse_decode",
                 "linear_cross_entropy", "sparse_attention_tile_fwd", "sparse_attention_tile_bwd", "kl_loss_tile",
                 "kl_loss_grads", "expert_mix", "expert_all", "row_linear", "sparse_decode_write"):
        assert hasattr(torch.ops.nanomsa, name), name
    op = torch.ops.nanomsa.sparse_attention_fwd.default
    importlib.reload(attention)                                                # importing again registers nothing
    assert torch.ops.nanomsa.sparse_attention_fwd.default is op


def test_compile_caches_keyed_by_the_source(monkeypatch, tmp_path):
    """torch.compile's cache key carries a hash of the package's source (common._tag_compile_caches), so a warm cache
    never replays an edited op's old backward; importing again adds nothing, and a user's own tag stays."""
    config = torch.compiler.config                                            # (a config module: set, not patched)
    tag = config.cache_key_tag
    assert len([t for t in tag.split() if t.startswith("nanomsa-")]) == 1
    try:
        common._tag_compile_caches()
        assert config.cache_key_tag == tag
        config.cache_key_tag = "mine"
        common._tag_compile_caches()
        assert config.cache_key_tag == f"mine {tag.split()[-1]}"
        copy = tmp_path / "common.py"                                         # an edit of one file: another tag
        copy.write_text(open(common.__file__).read() + "\n# an edit\n")
        monkeypatch.setattr(common, "__file__", str(copy))
        common._tag_compile_caches()
        assert config.cache_key_tag.split()[-1] != tag.split()[-1]
    finally:
        config.cache_key_tag = tag


def opcheck_cases():
    bs, K = SHAPE[6], SHAPE[7]
    q, k, v, qi, ki, bi = case()
    out, lse, lists = torch.ops.nanomsa.sparse_attention_fwd(q, k, v, bi, bs)
    tout, tlse, reads = torch.ops.nanomsa.sparse_attention_tile_fwd(q, k, v, bi, bs, tile.ROWS)
    dout = torch.randn_like(out)
    dq, dk, dv, dqi, dki = grads((q, k, v, qi, ki))
    dcase = decode_case()
    h, w = (torch.randn(n, 8, dtype=torch.float64).float().to(DEVICE) for n in (13, 11))
    y = torch.tensor([1, 2, -1, 4, 0, 10, 3, 3, -1, 7, 8, 9, 5], device=DEVICE)
    g = torch.Generator().manual_seed(5)                                      # 3 tokens, C = 32, E = 4 + 1, H = 16
    x, router, w13, w2 = (torch.randn(*shape, generator=g).to(DEVICE)
                          for shape in ((3, 32), (4, 32), (5, 32, 32), (5, 16, 32)))
    return {
        "index_topk": (torch.ops.nanomsa.index_topk, (qi, ki, bs, K, False)),
        "sparse_attention_fwd": (torch.ops.nanomsa.sparse_attention_fwd, (dq, dk, dv, bi, bs)),
        "sparse_attention_bwd": (torch.ops.nanomsa.sparse_attention_bwd, (q, k, v, out, lse, dout, None, lists, bs)),
        "sparse_attention_bwd_dlse": (torch.ops.nanomsa.sparse_attention_bwd,
                                      (q, k, v, out, lse, dout, torch.randn_like(lse), lists, bs)),
        "kl_loss": (torch.ops.nanomsa.kl_loss, (q, k, dqi, dki, bi, bs, None, True, [])),
        "kl_loss_lse": (torch.ops.nanomsa.kl_loss, (q, k, dqi, dki, bi, bs, lse, True, [])),
        "kl_loss_lists": (torch.ops.nanomsa.kl_loss, (q, k, dqi, dki, bi, bs, lse, True, lists)),
        "kl_loss_nograd": (torch.ops.nanomsa.kl_loss, (q, k, qi, ki, bi, bs, lse, False, [])),
        "kl_loss_grads": (torch.ops.nanomsa.kl_loss_grads, (qi.transpose(1, 2).contiguous().transpose(1, 2), ki,
                                                            torch.tensor(0.75, device=DEVICE))),
        "sparse_attention_tile_fwd": (torch.ops.nanomsa.sparse_attention_tile_fwd, (dq, dk, dv, bi, bs, tile.ROWS)),
        "sparse_attention_tile_bwd": (torch.ops.nanomsa.sparse_attention_tile_bwd,
                                      (q, k, v, tout, tlse, dout, None, [bi, reads], bs, tile.ROWS)),
        "sparse_attention_tile_bwd_dlse": (torch.ops.nanomsa.sparse_attention_tile_bwd,
                                           (q, k, v, tout, tlse, dout, torch.randn_like(tlse), [bi, reads], bs,
                                            tile.ROWS)),
        "kl_loss_tile": (torch.ops.nanomsa.kl_loss_tile, (q, k, dqi, dki, bi, bs, None, True, [])),
        "kl_loss_tile_lse": (torch.ops.nanomsa.kl_loss_tile, (q, k, dqi, dki, bi, bs, tlse, True, [])),
        "sparse_decode": (torch.ops.nanomsa.sparse_decode, (*dcase, 8, K, None)),
        "sparse_decode_write": (torch.ops.nanomsa.sparse_decode_write, (*decode_case(), 8, K, None, new_key())),
        "linear_cross_entropy": (torch.ops.nanomsa.linear_cross_entropy,
                                 (h.requires_grad_(), w.requires_grad_(), y, True, True, torch.float32)),
        "expert_mix": (torch.ops.nanomsa.expert_mix, (x, router, 2, w13, w2)),
        "expert_all": (torch.ops.nanomsa.expert_all, (x, router, 2, w13, w2)),
        "row_linear": (torch.ops.nanomsa.row_linear, (x[:1], w13[0].T.contiguous())),
    }


@pytest.mark.parametrize("name", list(opcheck_cases()))
def test_opcheck(name):
    op, args = opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# torch.compile traces each public function whole (fullgraph=True: a graph break is an error)

def compiled(fn, backend="eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


def msa_step(q, k, v, qi, ki, bs, K):
    """The MSA part of a training step as model.py runs it: the selection (no grad), then the attention and the KL
    loss given its lse in one call (sparse_attention_kl, which shares the attention's work lists with the KL)."""
    with torch.no_grad():
        bi = msa_triton.index_topk(qi, ki, bs, K)
    return msa_triton.sparse_attention_kl(q, k, v, qi, ki, bi, bs)


def msa_step_apart(q, k, v, qi, ki, bs, K):
    """The same step through the two functions called one after the other."""
    with torch.no_grad():
        bi = msa_triton.index_topk(qi, ki, bs, K)
    out, lse = msa_triton.sparse_attention(q, k, v, bi, bs)
    return out, lse, msa_triton.kl_loss(q, k, qi, ki, bi, bs, lse=lse)


def msa_step_ref(q, k, v, qi, ki, bs, K):
    with torch.no_grad():
        bi = msa_ref.index_topk(qi, ki, bs, K)
    return msa_ref.sparse_attention_kl(q, k, v, qi, ki, bi, bs)


def step_grads(step, q, k, v, qi, ki, bs, K, dout):
    """(out, lse, kl) of step and the gradients of (out . dout + kl) with respect to q, k, v, qi, ki."""
    x = grads((q, k, v, qi, ki))
    out, lse, kl = step(*x, bs, K)
    g = torch.autograd.grad((out * dout).sum() + kl, x)
    return [t.detach() for t in (out, lse, kl, *g)]


def test_sparse_attention_kl(path):
    """sparse_attention_kl equals sparse_attention then kl_loss given its lse (bitwise: the same kernels, and on the
    KV-outer path the same work lists, built once) and msa_ref's, in value and gradients."""
    B, Hq, Hkv, T, D, Di, bs, K = SHAPE
    q, k, v, qi, ki, _ = case()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = step_grads(msa_step, q, k, v, qi, ki, bs, K, dout)
    for a, b in zip(got, step_grads(msa_step_apart, q, k, v, qi, ki, bs, K, dout)):
        assert torch.equal(a, b)
    for a, b in zip(got, step_grads(msa_step_ref, q, k, v, qi, ki, bs, K, dout)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def eager_calls(q, k, v, qi, ki, bs, K, dout):
    """Every eager call the model makes, with the gradients of the differentiable ones: the MSA step (both functions
    and sparse_attention_kl), sparse_decode (and with ki_new), linear_cross_entropy, row_linear and expert_mix (both of
    its paths)."""
    D = q.shape[3]
    res = step_grads(msa_step, q, k, v, qi, ki, bs, K, dout) + step_grads(msa_step_apart, q, k, v, qi, ki, bs, K, dout)
    res.append(msa_triton.sparse_decode(*decode_case(), 8, K))
    dcase = decode_case()
    res += [msa_triton.sparse_decode(*dcase, 8, K, ki_new=new_key()), dcase[4]]            # and the cache it wrote
    h, w = grads((q.reshape(-1, D)[:30], k.reshape(-1, D)[:7]))
    ce = msa_triton.linear_cross_entropy(h, w, torch.arange(30, device=DEVICE) % 8 - 1)
    res += [ce.detach(), *torch.autograd.grad(ce, (h, w))]
    g = torch.Generator().manual_seed(5)                                      # 3 tokens, C = 32, E = 4, H = 16
    x, router, w13, w2 = (torch.randn(*shape, generator=g).to(DEVICE)
                          for shape in ((3, 32), (4, 32), (4, 32, 32), (4, 16, 32)))
    res += [msa_triton.row_linear(x, w13[0].T), msa_triton.expert_mix(x, router, 2, w13, w2),  # all the experts
            msa_triton.expert_mix(x[:1], router, 2, w13, w2)]                                 # the chosen ones
    return res


def test_eager_calls_skip_the_dispatcher(path, monkeypatch):
    """An eager call on real tensors runs the op's function without the dispatcher (common._Op: directly, or through
    an autograd.Function built from the op's own backward), with the same results, bitwise, as a call of the custom
    op itself, gradients included."""
    B, Hq, Hkv, T, D, Di, bs, K = SHAPE
    q, k, v, qi, ki, _ = case()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ops = {op for mod in (attention, common, tile, index, decode, cross_entropy, experts, rows)
           for op in vars(mod).values() if isinstance(op, common._Op)}
    assert len(ops) == 14                                 # every op of the package; a new one needs a call above
    monkeypatch.setattr(common._Op, "__call__", lambda self, *args: self.op(*args))
    want = eager_calls(q, k, v, qi, ki, bs, K, dout)                           # through the custom ops
    monkeypatch.undo()

    def no_dispatch(*args):
        raise AssertionError("an eager call reached the dispatcher")
    for op in ops:
        monkeypatch.setattr(op, "op", no_dispatch)
    got = eager_calls(q, k, v, qi, ki, bs, K, dout)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i


# (B, Hq, Hkv, T, D, Di, bs, K), selection: T = 1; G = 1 and K = 1 (the local block alone); block 0 in every token's
# list (a sink) beside shuffled random blocks
KL_EDGES = [((1, 2, 1, 1, 16, 16, 8, 2), "index"), ((2, 2, 2, 19, 16, 16, 8, 1), "index"),
            ((1, 4, 2, 40, 16, 16, 8, 3), "sink")]


@pytest.mark.parametrize("shape,kind", KL_EDGES)
def test_sparse_attention_kl_edges(path, shape, kind):
    """sparse_attention_kl against msa_ref's at the edges, values and gradients, on both paths."""
    B, Hq, Hkv, T, D, Di, bs, K = shape
    q, k, v, qi, ki, bi = case(shape, seed=2)
    if kind == "sink":
        bi = random_block_idx(B, Hkv, T, bs, K, seed=3)
        bi[..., 0] = 0
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    res = []
    for impl in (msa_triton, msa_ref):
        x = grads((q, k, v, qi, ki))
        out, lse, kl = impl.sparse_attention_kl(*x, bi, bs)
        res.append([out, lse, kl, *torch.autograd.grad((out * dout).sum() + kl, x)])
    for name, a, b in zip(("out", "lse", "kl", "dq", "dk", "dv", "dqi", "dki"), *res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_compile_each_function_without_graph_break(path):
    B, Hq, Hkv, T, D, Di, bs, K = SHAPE
    q, k, v, qi, ki, bi = case()
    fns = {
        "index_topk": (lambda qi, ki: msa_triton.index_topk(qi, ki, bs, K), (qi, ki)),
        "sparse_attention": (lambda q, k, v, bi: msa_triton.sparse_attention(q, k, v, bi, bs), (q, k, v, bi)),
        "kl_loss": (lambda q, k, qi, ki, bi: msa_triton.kl_loss(q, k, qi, ki, bi, bs), (q, k, qi, ki, bi)),
        "sparse_attention_kl": (lambda *a: msa_triton.sparse_attention_kl(*a, bs), (q, k, v, qi, ki, bi)),
        "sparse_decode": (lambda *a: msa_triton.sparse_decode(*a, 8, K), decode_case()),
        "sparse_decode_write": (lambda *a: msa_triton.sparse_decode(*a[:-1], 8, K, ki_new=a[-1]),
                                (*decode_case(), new_key())),
        "linear_cross_entropy": (lambda h, w, y: msa_triton.linear_cross_entropy(h, w, y),
                                 (q.reshape(-1, D)[:30], k.reshape(-1, D)[:7], torch.arange(30, device=DEVICE) % 8 - 1)),
    }
    for name, (fn, args) in fns.items():
        want, got = fn(*args), compiled(fn)(*args)
        for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            assert torch.equal(a, b), name


class _Ops(TorchDispatchMode):
    """Records the name of every aten op run below autograd while it is active."""
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_backward_makes_no_zero_gradients(path):
    """The ops' outputs that no loss uses (lse, the work lists, kl_loss's and linear_cross_entropy's saved
    gradients) get no gradient in the eager backward: autograd would otherwise fill a tensor of zeros for each
    (a launch and a memory pass on a GPU) that the backward ignores."""
    B, Hq, Hkv, T, D, Di, bs, K = SHAPE
    q, k, v, qi, ki, _ = case()
    x = grads((q, k, v, qi, ki))
    out, _, kl = msa_step(*x, bs, K)
    ce = msa_triton.linear_cross_entropy(x[0].reshape(-1, D)[:30], x[1].reshape(-1, D)[:7],
                                         torch.arange(30, device=DEVICE) % 8 - 1)
    with _Ops() as ops:
        (out.sum() + kl + ce).backward()
    assert not [n for n in ops.names if n.split(".")[0] in ("zeros", "zeros_like", "fill_", "full", "zero_")], ops.names


def test_kl_loss_scales_its_gradients(path):
    """kl_loss's backward multiplies the gradients its forward computed by the loss's incoming gradient (here 2.5 and
    -0.5) and returns them in qi's and ki's dtypes (ki in float64: cast to float32 for the kernels, its gradient
    back)."""
    B, Hq, Hkv, T, D, Di, bs, K = SHAPE
    q, k, _, qi, ki, bi = case()
    for scale, ki_dtype in ((2.5, torch.float32), (-0.5, torch.float64)):
        got = grads((qi, ki.to(ki_dtype)))
        ref = grads((qi.double(), ki.double()))
        g = torch.autograd.grad(msa_triton.kl_loss(q, k, *got, bi, bs) * scale, got)
        r = torch.autograd.grad(msa_ref.kl_loss(q.double(), k.double(), *ref, bi, bs) * scale, ref)
        assert g[0].dtype == torch.float32 and g[1].dtype == ki_dtype
        for a, b in zip(g, r):
            assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compile_msa_step_with_backward(backend, path):
    """The MSA step traced whole, forward and backward (aot_eager: through the fake implementations and the
    registered autograd, as inductor traces it; inductor: compiled, here to C++ around the ops), equal to eager."""
    B, Hq, Hkv, T, D, Di, bs, K = SHAPE
    q, k, v, qi, ki, _ = case()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want = step_grads(msa_step, q, k, v, qi, ki, bs, K, dout)
    got = step_grads(compiled(msa_step, backend), q, k, v, qi, ki, bs, K, dout)
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_tiny_model_training_forward():
    """A tiny MSA model with backend='triton' (the interpreter on a CPU): its training forward (losses included)
    traces without a graph break and equals the eager one. Patches are given: without them the embedding checks
    the tokens for image patches on the host."""
    from model import GPT, GPTConfig
    cfg = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, index_dim=16, n_dense_layers=1,
               msa_block_size=8, msa_topk=2, n_expert=4, expert_topk=2, expert_hidden=16, patch_dim=6, img_patch_id=50)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**cfg), backend="triton").to(DEVICE)
    assert model.backend is msa_triton
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 50, (1, 24), generator=g).to(DEVICE) for _ in range(2))
    patches = torch.rand(1, 24, 6, generator=g).to(DEVICE)
    _, want = model(x, y, patches=patches)
    _, got = compiled(model)(x, y, patches=patches)
    for key in ("lm", "kl", "balance"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    got["lm"].backward()                                                       # the backward runs through the ops


# ---------------------------------------------------------------------------------------------
# the checking mode: bad values raise in it; outside it they are dropped (block ids) or clamped (lengths)

def test_checking_mode_switch(monkeypatch):
    assert common._CHECKS is True                                              # conftest.py turns it on
    prev = msa_triton.checks(None)
    try:
        assert common._checking(torch.zeros(1))                                # default: on for CPU tensors
        msa_triton.checks(False)
        assert not common._checking(torch.zeros(1))
    finally:
        msa_triton.checks(prev)
    with pytest.raises(ValueError, match="True, False or None"):
        msa_triton.checks("yes")


def bad_block_idx(bi, nb):
    """bi with some ids out of range (nb, nb + 5, -2, -7) and the same with those replaced by -1."""
    bad = bi.clone()
    bad[0, 0, 3, 0], bad[1, 1, 20, 1], bad[0, 1, 10, 2], bad[1, 0, 0, 1] = nb, nb + 5, -2, -7
    return bad, torch.where((bad < 0) | (bad >= nb), -1, bad)


def test_bad_block_idx_raises_in_checking_mode(path):
    B, Hq, Hkv, T, D, Di, bs, K = SHAPE
    q, k, v, qi, ki, bi = case()
    bad, _ = bad_block_idx(bi, -(-T // bs))
    with pytest.raises(ValueError, match="block_idx entries"):
        msa_triton.sparse_attention(q, k, v, bad, bs)
    with pytest.raises(ValueError, match="block_idx entries"):
        msa_triton.kl_loss(q, k, qi, ki, bad, bs)
    with pytest.raises(ValueError, match="block_idx entries"):
        msa_ref.sparse_attention(q, k, v, bad, bs)                             # msa_ref checks always


def test_bad_block_idx_ignored_without_checks(checks_off, path):
    """Out-of-range ids (>= nb, < -1) are dropped from the work lists: the result of the same ids set to -1."""
    B, Hq, Hkv, T, D, Di, bs, K = SHAPE
    q, k, v, qi, ki, bi = case()
    bad, clean = bad_block_idx(bi, -(-T // bs))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    x = grads((q, k, v))
    out, lse = msa_triton.sparse_attention(*x, bad, bs)
    got = (out, lse, *torch.autograd.grad(out, x, dout))
    x = grads((q, k, v))
    rout, rlse = msa_ref.sparse_attention(*x, clean, bs)
    for a, b in zip(got, (rout, rlse, *torch.autograd.grad(rout, x, dout))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    xi = grads((qi, ki))
    kl = msa_triton.kl_loss(q, k, *xi, bad, bs)
    got = (kl, *torch.autograd.grad(kl, xi))
    xi = grads((qi, ki))
    rkl = msa_ref.kl_loss(q, k, *xi, clean, bs)
    for a, b in zip(got, (rkl, *torch.autograd.grad(rkl, xi))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bad_cache_lens(checks_off):
    """Outside the checking mode lengths are clamped to [1, Tmax] by the kernels; in it (and in msa_ref) they raise."""
    q, qi, k, v, ki, lens = decode_case(lens=(25, 0))
    got = msa_triton.sparse_decode(q, qi, k, v, ki, lens, 8, 3)
    want = msa_ref.sparse_decode(q, qi, k, v, ki, lens.clamp(1, k.shape[2]), 8, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    msa_triton.checks(True)
    with pytest.raises(ValueError, match="cache_lens must lie in"):
        msa_triton.sparse_decode(q, qi, k, v, ki, lens, 8, 3)
    with pytest.raises(ValueError, match="cache_lens must lie in"):
        msa_ref.sparse_decode(q, qi, k, v, ki, lens, 8, 3)


# ---------------------------------------------------------------------------------------------
# on the GPU, at the repository model's shape

MODEL = (2, 8, 2, 1024, 64, 64, 64, 4)


def gpu_case(seed=0):
    return case(MODEL, dtype=torch.bfloat16, device="cuda", seed=seed)


@pytest.fixture
def gpu_checks_default():
    prev = msa_triton.checks(None)                                             # off on CUDA: the hot path
    yield
    msa_triton.checks(prev)


@requires_cuda
def test_no_host_sync(gpu_checks_default, path):
    """Every function, forward and backward, with torch.cuda.set_sync_debug_mode('error'): a synchronizing
    CUDA call raises. One warm-up call first (Triton compiles on it)."""
    B, Hq, Hkv, T, D, Di, bs, K = MODEL
    q, k, v, qi, ki, _ = gpu_case()
    dout = torch.randn_like(q)
    dcase = decode_case(B, Hq, Hkv, T, D, Di, lens=(T, 300), dtype=torch.bfloat16, device="cuda")
    h = torch.randn(B * T, 512, device="cuda", requires_grad=True)
    w = torch.randn(1000, 512, device="cuda", requires_grad=True)
    y = torch.randint(-1, 1000, (B * T,), device="cuda")

    def run():
        step_grads(msa_step, q, k, v, qi, ki, bs, K, dout)
        step_grads(msa_step_apart, q, k, v, qi, ki, bs, K, dout)
        xi = grads((qi, ki))
        torch.autograd.grad(msa_triton.kl_loss(q, k, *xi, msa_triton.index_topk(qi, ki, bs, K), bs), xi)  # no lse
        msa_triton.sparse_decode(*dcase, bs, K)
        ki8, ks = msa_ref.fp8_quantize(dcase[4])                              # an fp8 cache, the new key written
        msa_triton.sparse_decode(*dcase[:4], ki8, dcase[5], bs, K, ki_scale=ks, ki_new=dcase[4][:, 0])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = msa_triton.linear_cross_entropy(h, w, y)
        torch.autograd.grad(loss, (h, w))

    run()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@requires_cuda
def test_msa_step_in_a_cuda_graph(gpu_checks_default, path):
    """index_topk + sparse_attention forward and backward + kl_loss (given the lse) forward and backward,
    captured once, replayed on new inputs copied into the static tensors: equal to the eager step."""
    B, Hq, Hkv, T, D, Di, bs, K = MODEL
    static = [t.clone() for t in gpu_case(seed=0)[:5]]
    dout = torch.randn_like(static[0])

    def step():
        return step_grads(msa_step, *static, bs, K, dout)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):                                                     # compiles the kernels
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        new = gpu_case(seed=seed)[:5]
        for s, n in zip(static, new):
            s.copy_(n)
        graph.replay()
        want = step_grads(msa_step, *new, bs, K, dout)
        for a, b in zip(outs, want):                                           # the same kernels on the same data
            torch.testing.assert_close(a.float(), b.float(), rtol=1e-3, atol=1e-3)


@requires_cuda
def test_inductor_compile_equals_eager(gpu_checks_default, path):
    """torch.compile (inductor) of the MSA step with the backward, and of sparse_decode: equal to eager."""
    B, Hq, Hkv, T, D, Di, bs, K = MODEL
    q, k, v, qi, ki, _ = gpu_case(seed=3)
    dout = torch.randn_like(q)
    want = step_grads(msa_step, q, k, v, qi, ki, bs, K, dout)
    got = step_grads(compiled(msa_step, "inductor"), q, k, v, qi, ki, bs, K, dout)
    for a, b in zip(want, got):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2)
    dc = decode_case(B, Hq, Hkv, T, D, Di, lens=(T, 300), dtype=torch.bfloat16, device="cuda")
    dec = lambda *a: msa_triton.sparse_decode(*a, bs, K)
    torch.testing.assert_close(compiled(dec, "inductor")(*dc), dec(*dc), rtol=0, atol=0)
