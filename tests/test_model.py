"""model.py and moe.py on the reference path (CPU, float32): MoE dispatch, patch embedding, loss masking, the index branch's
gradients, MSA == dense when every block is selected, the indexer recall, the FLOPs count, and cached decoding
(KVCache) == a full forward."""
import pytest
import torch
import torch.nn.functional as F

import decoding
import msa_ref
from conftest import requires_cuda
from decoding import KVCache
import model as model_module
from model import GPT, GPTConfig, get_backend, gpu_peak_flops, rope, rope_table
from moe import GatherRows, grouped_mm, moe_all_experts, moe_dispatch, swiglu, top_k

PATCH = 50  # the image-patch token id of these tiny models


def tiny(backend="ref", **kw):
    """A small model whose MSA layers are really sparse at T=40: blocks of 4, K=3 of them per query."""
    args = dict(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, index_dim=8, n_dense_layers=1,
                msa_block_size=4, msa_topk=3, n_expert=4, expert_topk=2, expert_hidden=24, patch_dim=6,
                img_patch_id=PATCH)
    args.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args), backend=backend)
    with torch.no_grad():  # index weights large enough that the selection is not a near-tie everywhere
        for name, p in model.named_parameters():
            if ".wi." in name:
                p.normal_(0, 0.3)
    return model


def batch(B=2, T=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, PATCH, (B, T), generator=g)
    x[:, 5:9] = PATCH                                    # an "image" of 4 patches in every row
    y = torch.randint(0, PATCH, (B, T), generator=g)
    y[:, 4:8] = -1                                       # no loss where the target is an image token
    patches = torch.rand(B, T, 6, generator=g)
    return x, y, patches


def test_backend_choice():
    assert get_backend("ref") is msa_ref
    if not torch.cuda.is_available():
        assert get_backend("auto") is msa_ref
    with pytest.raises(ValueError, match="backend must be"):
        get_backend("fast")


def moe_inputs(N, E, k, C, H, dtype, seed=0):
    """x, idx (k distinct experts per token; expert E - 1 chosen by none when k < E), gates, expert weights
    w13 (E, C, 2H), w2 (E, H, C)."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=dtype)
    x = torch.randn(N, C, **kw)
    w13 = torch.randn(E, C, 2 * H, **kw) / C ** 0.5
    w2 = torch.randn(E, H, C, **kw) / H ** 0.5
    free = E - 1 if k < E else E
    idx = torch.stack([torch.randperm(free, generator=g)[:k] for _ in range(N)])
    return x, idx, torch.rand(N, k, **kw), w13, w2


def per_token(x, idx, gate, w13, w2):
    """The naive way: token by token, expert by expert; an expert is silu(x @ w1) * (x @ w3) @ w2 with w1, w3 the
    two halves of w13."""
    H = w2.shape[1]
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[n, j]
            w1, w3 = w13[e, :, :H], w13[e, :, H:]
            out[n] = out[n] + gate[n, j] * ((F.silu(x[n:n + 1] @ w1) * (x[n:n + 1] @ w3)) @ w2[e])[0]
    return out


def all_experts(x, idx, gate, w13, w2):
    """moe_all_experts with moe_dispatch's arguments: the gates as (N, E) weights, 0 where not chosen."""
    return moe_all_experts(x, torch.zeros(idx.shape[0], w13.shape[0], dtype=gate.dtype).scatter(1, idx, gate), w13, w2)


# float64 and float32 rows of 6 (24 bytes) run grouped_mm's batched fallback; float32 rows of 12 and 20 (48 and
# 80 bytes) run F.grouped_mm
@pytest.mark.parametrize("dtype,C,H", [(torch.float64, 12, 20), (torch.float32, 12, 20), (torch.float32, 6, 20)])
@pytest.mark.parametrize("N,E,k", [(1, 4, 2), (5, 8, 2), (37, 5, 2), (64, 8, 3), (9, 4, 4), (1, 3, 3), (6, 8, 8)])
@pytest.mark.parametrize("moe", [moe_dispatch, all_experts])
def test_moe_dispatch_equals_per_token_loop(N, E, k, dtype, C, H, moe):
    """moe_dispatch (and moe_all_experts, its few-token form) computes the naive sum, and its gradients (x, gates,
    every expert's weights: zero for an expert that no token chose), for one token and many, k = 2 .. E."""
    inputs = moe_inputs(N, E, k, C, H, dtype, seed=N + 10 * k)
    a = [t if i == 1 else t.clone().requires_grad_() for i, t in enumerate(inputs)]
    b = [t if i == 1 else t.clone().requires_grad_() for i, t in enumerate(inputs)]
    got, want = moe(*a), per_token(*b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    got.backward(g)
    want.backward(g)
    for i in (0, 2, 3, 4):
        torch.testing.assert_close(a[i].grad, b[i].grad, **tol)
    if k < E:
        assert a[3].grad[E - 1].abs().max() == 0 and a[4].grad[E - 1].abs().max() == 0


def test_moe_dispatch_is_deterministic():
    """The same inputs twice: bitwise the same output and gradients (out.sum().backward(): an expanded gradient)."""
    runs = []
    for _ in range(2):
        x, idx, gate, *ws = moe_inputs(50, 8, 2, 16, 32, torch.float32)
        ps = [x.requires_grad_(), gate.requires_grad_()] + [w.requires_grad_() for w in ws]
        out = moe_dispatch(x, idx, gate, *ws)
        out.sum().backward()
        runs.append([out] + [p.grad for p in ps])
    assert all(torch.equal(u, v) for u, v in zip(*runs))


@pytest.mark.parametrize("N,k", [(1, 1), (7, 1), (7, 2), (5, 3)])
def test_gather_rows_equals_index_select(N, k):
    """GatherRows(x, rows, inverse, k) == x[rows // k], and its backward == index_select's (each row's k gradient
    rows summed, to 1e-15 in float64; the forward bitwise); k = 1: a plain permutation."""
    g = torch.Generator().manual_seed(N + k)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64, requires_grad=True)
    rows = torch.randperm(N * k, generator=g)
    inverse = torch.empty_like(rows).scatter_(0, rows, torch.arange(N * k))
    assert torch.equal(rows[inverse], torch.arange(N * k))
    dout = torch.randn(N * k, 4, generator=g, dtype=torch.float64)
    got = GatherRows.apply(x, rows, inverse, k)
    dx, = torch.autograd.grad(got, x, dout)
    want = x.index_select(0, rows // k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(dx, torch.autograd.grad(want, x, dout)[0], rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype,K", [(torch.float32, 8), (torch.float32, 5), (torch.float64, 8)])
def test_grouped_mm_equals_a_loop_over_groups(dtype, K):
    """grouped_mm (F.grouped_mm, or its batched fallback for unaligned rows and float64): each row times its
    group's matrix, with empty groups first, in the middle and last, and a group of one row."""
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(9, K, generator=g, dtype=dtype), torch.randn(5, K, 4 * K, generator=g, dtype=dtype)
    ends = torch.tensor([0, 1, 1, 9, 9], dtype=torch.int32)
    torch.testing.assert_close(grouped_mm(a, w, ends), torch.cat([a[:1] @ w[1], a[1:] @ w[3]]))


@pytest.mark.parametrize("N,E,k", [(1, 8, 2), (37, 8, 2), (5, 4, 4), (6, 3, 1)])
def test_top_k_equals_torch_topk(N, E, k):
    """moe.top_k == logits.topk(k): the values and indices, largest first; ties (repeated logits) go to the lower
    index; the gradient reaches the chosen logits alone."""
    g = torch.Generator().manual_seed(N)
    logits = torch.randn(N, E, generator=g, dtype=torch.float64)
    logits[0, 1] = logits[0, 0] = logits[0].max() + 1                  # a tie at the top of row 0
    logits.requires_grad_()
    values, indices = top_k(logits, k)
    want_v, want_i = logits.topk(k, -1)
    torch.testing.assert_close(values, want_v, rtol=0, atol=0)
    assert torch.equal(indices[1:], want_i[1:]) and indices[0, :2].tolist() == [0, 1][:k]
    values.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits).scatter(1, indices, 1.0))


def test_moe_layer_routing_and_balance():
    model = tiny()
    moe = model.blocks[0].moe
    x = torch.randn(2, 7, 32)
    out, balance, load = moe(x)
    xf = x.reshape(14, 32)
    logits = moe.router(xf)
    top, idx = logits.topk(2, -1)
    assert moe.w13.shape == (5, 32, 48) and moe.w2.shape == (5, 24, 32)    # 4 routed experts, then the shared one
    want = moe_dispatch(xf, idx, top.softmax(-1), moe.w13[:4], moe.w2[:4]) + swiglu(xf, moe.w13[4], moe.w2[4])
    torch.testing.assert_close(out.reshape(14, 32), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(load, torch.bincount(idx.reshape(-1), minlength=4) / 28.0)  # 14 tokens x 2 experts
    torch.testing.assert_close(balance, 4 * (load * logits.softmax(-1).mean(0)).sum())  # Switch: E * sum f_e P_e
    # the balance loss pushes router probability away from overloaded experts
    balance.backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    bare, no_balance, no_load = moe(x, stats=False)            # a forward without targets skips them
    assert no_balance is None and no_load is None and torch.equal(bare, out)


def test_rope_rotates_dim_pairs():
    """rope with rope_table: dims i and i + d/2 form the complex number x_i + j x_{i+d/2}, turned by the angle
    pos * theta^(-i / (d/2)) (float64 reference); any positions, any leading dims, x's dtype kept."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 8, generator=g)
    pos = torch.tensor([0, 3, 7, 100, 2])
    angle = pos[:, None].double() * 500.0 ** (-torch.arange(4, dtype=torch.float64) / 4)  # (T, d/2)
    z = torch.complex(x[..., :4].double(), x[..., 4:].double()) * torch.polar(torch.ones_like(angle), angle)
    table = rope_table(pos, 8, 500.0)
    assert all(t.shape == (5, 8) and t.dtype == torch.float32 for t in table)
    torch.testing.assert_close(rope(x, table), torch.cat([z.real, z.imag], -1).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope(x[0, 0], table), rope(x, table)[0, 0])                # (T, d): an index key
    assert torch.equal(rope(x, table)[..., 0, :], x[..., 0, :])                            # position 0: unturned
    half = rope(x.bfloat16(), table)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), rope(x.bfloat16().float(), table), rtol=1e-2, atol=1e-2)


def test_rope_table_exact_at_long_positions():
    """rope_table is the float64 rotation rounded once to float32, also where a float32 angle would be far off
    (position 40,000: its float32 angle is off by up to 2e-3 radians)."""
    pos = torch.tensor([0, 1, 32767, 32768, 40000, 131071])
    angle = pos[:, None].double() * 10000.0 ** (-torch.arange(32, dtype=torch.float64) / 32)  # (T, d/2)
    cos, sin = rope_table(pos, 64, 10000.0)
    assert torch.equal(cos, torch.cat([angle.cos(), angle.cos()], -1).float())
    assert torch.equal(sin, torch.cat([-angle.sin(), angle.sin()], -1).float())


def test_rope_rows_read_from_tables_that_casts_leave_exact():
    """GPT keeps rope_table's rows for positions 0 .. rope_n - 1 as buffers of their int32 bits: equal to rope_table's
    float32 tables after a bf16 cast of the model, and not in the state dict (checkpoints do not change)."""
    model = tiny().to(torch.bfloat16)
    cos, sin = rope_table(torch.arange(model.rope_n), 8, model.cfg.rope_theta)
    assert model.rope_n >= 8192 and torch.equal(model.rope_8[0].view(torch.float32), cos)
    assert torch.equal(model.rope_8[1].view(torch.float32), sin)
    assert not [k for k in model.state_dict() if "rope" in k]


@pytest.mark.parametrize("compiled", [False, True])
def test_rope_rows_past_the_tables_are_computed(compiled, monkeypatch):
    """A forward past the tables' reach, eager or compiled, computes its rows and leaves the tables as they are
    (only rope_reach grows them); its loss is that of a model whose tables covered the positions from the start."""
    x, y, patches = batch()                                                    # (B, 40)
    want = tiny(attention="dense")(x, y, patches)[1]["lm"]
    monkeypatch.setattr(model_module, "ROPE_REACH", 16)
    short = tiny(attention="dense")
    run = torch.compile(short, fullgraph=True, backend="eager") if compiled else short
    assert short.rope_n == 16
    got = run(x, y, patches)[1]["lm"]
    assert short.rope_n == 16
    assert torch.equal(got, want)


@requires_cuda
def test_rope_table_compiled_as_eager():
    """On a GPU the table torch.compile builds equals the eager one bit for bit at positions up to 128K, for the
    widths 64 and 128: a compiled decode step writes the keys the eager step writes."""
    pos = torch.arange(0, 131072, 3, device="cuda")
    compiled = torch.compile(rope_table, fullgraph=True, dynamic=False)
    for d in (64, 128):
        assert all(torch.equal(a, b) for a, b in zip(compiled(pos, d, 10000.0), rope_table(pos, d, 10000.0)))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_dispatch_on_gpu(dtype):
    """On the GPU: moe_dispatch == the per-token loop, forward and backward (an expert without tokens); in bf16 on
    compute capability 9.x / 10.x (F.grouped_mm's kernel) it never waits on the host; a CUDA graph captures it
    (float32: the batched fallback) and replays it with new routing."""
    N, E, k, C, H = 300, 8, 2, 64, 128
    inputs = [t.cuda() for t in moe_inputs(N, E, k, C, H, torch.float32)]
    a = [t if i == 1 else (t if i == 2 else t.to(dtype)).requires_grad_() for i, t in enumerate(inputs)]
    b = [t if i == 1 else t.detach().float().requires_grad_() for i, t in enumerate(a)]  # gates stay float32
    g = torch.randn(N, C, device="cuda")
    kernel = dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10)
    torch.cuda.set_sync_debug_mode("error" if kernel else 0)
    try:
        got = moe_dispatch(*a)
        got.backward(g.to(dtype))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = per_token(*b)
    want.backward(g)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)

    def close(x, y):  # bf16: elementwise where the sums are short, by norm for the gates' gradient (a sum over C)
        if dtype == torch.float32:
            torch.testing.assert_close(x, y, **tol)
        else:
            assert (x.float() - y).norm() <= 1e-2 * y.norm(), (x.float() - y).norm() / y.norm()
    close(got.float(), want)
    for i in (0, 2, 3, 4):
        close(a[i].grad.float(), b[i].grad)
    assert a[3].grad[E - 1].abs().max() == 0
    with torch.no_grad():
        static = [t.detach().clone() for t in a]
        first, replay = decoding.cuda_graphed(lambda: moe_dispatch(*static))
        torch.testing.assert_close(first, got.detach(), rtol=0, atol=0)
        static[1].copy_(torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(N)]))  # new routing
        torch.testing.assert_close(replay().float(), moe_dispatch(*static).float(), **tol)


def test_compile_traces_training():
    """torch.compile traces a training forward and loss: the dense arm in one graph (fullgraph, no graph break),
    the MSA arm on msa_ref (graph breaks allowed there); same losses and gradients as eager."""
    x, y, patches = batch()
    for attention, fullgraph in (("dense", True), ("msa", False)):
        eager, compiled = tiny(attention=attention), tiny(attention=attention)
        run = torch.compile(compiled, fullgraph=fullgraph, backend="eager")
        for model in (eager, run):
            _, losses = model(x, y, patches)
            (losses["lm"] + losses["kl"] + 0.01 * losses["balance"]).backward()
        torch.testing.assert_close(run(x, y, patches)[1]["lm"], eager(x, y, patches)[1]["lm"], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gpu_peak_flops_by_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB") == gpu_peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("NVIDIA RTX A1000") is None and gpu_peak_flops("NVIDIA GeForce RTX 4090") is None


def test_patch_embedding_and_checks():
    model = tiny()
    x, y, patches = batch()
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    logits, _ = model(x, patches=patches)
    is_patch = x == PATCH
    torch.testing.assert_close(seen["h"][is_patch], model.patch_proj(patches[is_patch]))
    torch.testing.assert_close(seen["h"][~is_patch], model.wte(x[~is_patch]))
    # pixels away from IMG_PATCH positions are ignored; pixels of a patch change what follows it
    p2 = patches.clone()
    p2[~is_patch] = 7.0
    torch.testing.assert_close(model(x, patches=p2)[0], logits)
    p2[0, 6] += 1.0
    changed = (model(x, patches=p2)[0] - logits).abs().amax(-1)  # (B, T)
    assert changed[0, :6].max() == 0 and changed[0, 6:].min() > 0 and changed[1].max() == 0
    with pytest.raises(ValueError, match="no patches"):
        model(x)
    with pytest.raises(ValueError, match="patches must be"):
        model(x, patches=patches[:, :, :5])
    with pytest.raises(ValueError, match="y must have"):
        model(x, y[:, :-1], patches)


def test_loss_is_on_text_only():
    model = tiny()
    x, y, patches = batch()
    logits, _ = model(x, patches=patches)                                    # (B, T, V)
    final = []                                                               # the LM head's input, (B, T, C)
    model.norm_f.register_forward_hook(lambda mod, args, out: final.append(out) or out.retain_grad())
    none, losses = model(x, y, patches)
    keep = y != -1
    assert none is None and (~keep).any()                                    # with targets no logits come back
    torch.testing.assert_close(losses["lm"], F.cross_entropy(logits[keep], y[keep]))
    losses["lm"].backward()                                                  # no gradient from untargeted positions
    assert final[-1].grad[~keep].abs().max() == 0 and final[-1].grad[keep].abs().sum() > 0


def test_untied_head_has_its_own_matrix():
    """tie_embeddings=False: the LM head and the token embedding are two matrices (V * C more parameters), each
    trained by its own gradient: the embedding's rows of tokens absent from x get none, the head's every row
    (the softmax reaches every word). The default ties them: one matrix. A state dict round-trips."""
    tied, untied = tiny(), tiny(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight and untied.lm_head.weight is not untied.wte.weight
    V, C = untied.cfg.vocab_size, untied.cfg.n_embd
    assert untied.num_params() == tied.num_params() + V * C
    x, y, patches = batch()
    untied(x, y, patches)[1]["lm"].backward()
    absent = torch.ones(V, dtype=torch.bool)
    absent[x.unique()] = False                                               # (V,) tokens that x never holds
    assert absent.any() and untied.wte.weight.grad[absent].abs().max() == 0
    assert (untied.lm_head.weight.grad.abs().sum(1) > 0).all()
    copy = tiny(tie_embeddings=False)
    copy.load_state_dict(untied.state_dict())
    torch.testing.assert_close(copy(x, patches=patches)[0], untied(x, patches=patches)[0], rtol=0, atol=0)


def test_index_branch_learns_from_kl_only():
    model = tiny()
    x, y, patches = batch()
    _, losses = model(x, y, patches)
    assert losses["kl_layers"].shape == (2,) and losses["kl"].item() > 0
    attn = model.blocks[1].attn
    losses["lm"].backward(retain_graph=True)
    assert attn.wi.weight.grad is None and attn.wqkv.weight.grad is not None
    model.zero_grad()
    losses["kl"].backward()
    Hkv, Di = model.cfg.n_kv_head, model.cfg.index_dim                  # wi: the index queries' rows, then the key's
    assert attn.wi.weight.grad[:Hkv * Di].abs().sum() > 0 and attn.wi.weight.grad[Hkv * Di:].abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if ".wi." not in n)


def test_msa_equals_dense_when_every_block_is_selected():
    """K * bs >= T: MSA selects everything, so the model equals attention='dense' with the same weights;
    and the dense-warm-up KL equals the sparse KL."""
    msa = tiny(msa_topk=10)              # 10 blocks of 4 >= T = 40
    dense = tiny(msa_topk=10, attention="dense")
    assert not any(".wi." in n for n, _ in dense.named_parameters())
    dense.load_state_dict({k: v for k, v in msa.state_dict().items() if ".wi." not in k})
    x, y, patches = batch()
    lm, lo = msa(x, y, patches)
    ld, lod = dense(x, y, patches)
    torch.testing.assert_close(lm, ld, rtol=1e-4, atol=1e-5)
    assert lod["kl_layers"].numel() == 0 and lod["kl"].item() == 0
    torch.testing.assert_close(msa(x, y, patches, kl_dense=True)[1]["kl"], lo["kl"])


def test_msa_dense_phase_attends_densely():
    """msa_dense=True (train.py's msa_dense_iters): the MSA layers attend to every visible token, so the model equals
    attention='dense' with the same weights though K * bs < T; the index branch learns from the dense KL (the same
    as kl_dense gives), still from the KL alone; a blind rule runs dense with no KL. The FLOP count follows."""
    x, y, patches = batch()                                       # T = 40; K = 3 blocks of 4: really sparse
    dense = tiny(attention="dense")
    for select in ("indexer", "local"):
        msa = tiny(msa_select=select)
        dense.load_state_dict({k: v for k, v in msa.state_dict().items() if ".wi." not in k})
        _, lo = msa(x, y, patches, msa_dense=True)
        torch.testing.assert_close(lo["lm"], dense(x, y, patches)[1]["lm"], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(lo["lm"], msa(x, y, patches)[1]["lm"])      # the sparse forward differs
        if select == "local":
            assert lo["kl_layers"].numel() == 0
            continue
        # the first MSA layer's input is the same in both forwards (the next ones' differ by what it read)
        torch.testing.assert_close(lo["kl_layers"][0], msa(x, y, patches, kl_dense=True)[1]["kl_layers"][0])
        attn = msa.blocks[1].attn
        lo["lm"].backward(retain_graph=True)
        assert attn.wi.weight.grad is None and attn.wqkv.weight.grad is not None
        msa.zero_grad()
        lo["kl"].backward()
        assert all(p.grad is None for n, p in msa.named_parameters() if ".wi." not in n)
    T, msa, everything = 40, tiny(), tiny(msa_topk=10)            # 10 blocks of 4: every block read
    scoring = 2 * (2 * 2 * 8 * (T + 1) / 2)                       # 2 MSA layers x 2 Hkv Di (t + 1), t averaged
    assert msa.flops_per_token(T, msa_dense=True) == pytest.approx(everything.flops_per_token(T) - scoring, rel=1e-12)
    assert everything.flops_per_token(T) > msa.flops_per_token(T, True)      # (msa_dense chooses nothing: no scores)
    assert tiny(msa_select="local").flops_per_token(T, msa_dense=True) == pytest.approx(dense.flops_per_token(T),
                                                                                       rel=1e-12)


def test_recall_is_the_teachers_mass_in_the_chosen_blocks():
    """indexer_recall per MSA layer: the dense softmax(q . k) mass inside the selected blocks, averaged over batch,
    heads and queries (computed here by brute force from the layer's own q, k and msa_ref's selection); 1 when K
    covers every block. The forward itself computes no recall, in training or in eval."""
    model = tiny().eval()
    x, y, patches = batch()
    seen = {}
    attn = model.blocks[2].attn
    attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], pos=args[1]))
    with torch.no_grad():
        _, losses = model(x, y, patches)
        a, cfg = seen["x"], model.cfg
        B, T, _ = a.shape
        D, G = cfg.n_embd // cfg.n_head, cfg.n_head // cfg.n_kv_head
        table = rope_table(seen["pos"], D, cfg.rope_theta)
        wq, wk, _ = attn.wqkv.weight.split([cfg.n_head * D, cfg.n_kv_head * D, cfg.n_kv_head * D])
        q = rope((a @ wq.t()).view(B, T, cfg.n_head, D).transpose(1, 2), table)
        k = rope((a @ wk.t()).view(B, T, cfg.n_kv_head, D).transpose(1, 2), table)
        qi, ki = attn.index_branch(a, seen["pos"])
        idx = msa_ref.index_topk(qi, ki, cfg.msa_block_size, cfg.msa_topk)           # (B, Hkv, T, K)
        inside = msa_ref.support_mask(idx, cfg.msa_block_size, torch.arange(T), T)   # (B, Hkv, T, T)
        p = torch.softmax((q @ k.repeat_interleave(G, 1).transpose(-1, -2)) / D ** 0.5
                          + torch.full((T, T), float("-inf")).triu(1), -1)          # (B, Hq, T, T)
        want = (p * inside.repeat_interleave(G, 1)).sum(-1).mean()
    recall = model.indexer_recall(x, patches)
    assert recall.shape == (2,) and recall.dtype == torch.float32 and "recall_layers" not in losses
    torch.testing.assert_close(recall[1], want, rtol=1e-5, atol=1e-6)
    assert 0.3 < want < 0.99                           # really sparse: some mass is missed
    model.train()
    torch.testing.assert_close(model.indexer_recall(x, patches), recall)  # no dropout: the mode does not matter
    assert "recall_layers" not in model(x, y, patches)[1]
    torch.testing.assert_close(tiny(msa_topk=10).indexer_recall(x, patches), torch.ones(2))
    assert tiny(attention="dense").indexer_recall(x, patches).shape == (0,)  # no MSA layer, no recall
    with pytest.raises(ValueError, match="no patches"):
        model.indexer_recall(x)


def test_flops_per_token_hand_count():
    """GPT.flops_per_token against counts taken from the built model's parameters and from msa_ref's own
    selection (the keys each query of an MSA layer attends); K * bs >= T makes MSA's attention count the dense one."""
    model = tiny(n_layer=3, n_dense_layers=1)                     # 2 MSA layers; bs = 4, K = 3
    cfg, T = model.cfg, 40
    Hq, Hkv, D, Di, E, bs, K = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head, cfg.index_dim, cfg.n_expert, \
        cfg.msa_block_size, cfg.msa_topk
    # matmul weights, from the parameters: index branch x4 (it reads x.detach(): no input gradient), the rest x6
    six = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("wqkv.weight", "wo.weight", "router.weight")))
    # the experts: E routed + 1 shared in w13 and w2, of which a token runs expert_topk + 1
    six += sum(p.numel() * (cfg.expert_topk + 1) // (E + 1) for n, p in model.named_parameters()
               if n.endswith(("w13", "w2")))
    six += model.lm_head.weight.numel()                           # tied with wte: counted once, as the head
    four = sum(p.numel() for n, p in model.named_parameters() if n.endswith("wi.weight"))
    n_msa = 2
    torch.manual_seed(0)
    idx = msa_ref.index_topk(torch.randn(1, Hkv, T, Di), torch.randn(1, T, Di), bs, K)[0, 0]   # (T, K)
    t = torch.arange(T)[:, None]
    keys = torch.where(idx >= 0, torch.clamp(t - idx * bs + 1, 0, bs), 0).sum(1).double().mean().item()
    dense_keys = (T + 1) / 2
    want = 6 * six + 4 * four + 12 * Hq * D * ((cfg.n_layer - n_msa) * dense_keys + n_msa * keys) \
        + n_msa * (2 * Hkv * Di * dense_keys + (2 * Hq * D + 6 * Hkv * Di) * keys)
    assert model.flops_per_token(T) == pytest.approx(want, rel=1e-9)
    kl_extra = n_msa * (2 * Hq * D + 6 * Hkv * Di) * (dense_keys - keys)  # the dense warm-up's support: every key
    assert model.flops_per_token(T, kl_dense=True) == pytest.approx(want + kl_extra, rel=1e-9)
    dense = tiny(attention="dense")                               # every layer dense: no index branch
    assert dense.flops_per_token(T) == pytest.approx(6 * six + 12 * Hq * D * cfg.n_layer * dense_keys, rel=1e-9)


def test_flops_per_token_msa_equals_dense_when_every_block_is_read():
    """K * bs >= T: every query of an MSA layer reads every visible key, so MSA's FLOPs are the dense model's plus
    the index branch's (its weights, its scores over every visible key, the KL over the same support, which
    kl_dense then does not change)."""
    T = 40
    msa, dense = tiny(msa_topk=10), tiny(msa_topk=10, attention="dense")   # 10 blocks of 4 = 40 tokens
    cfg = msa.cfg
    C, Hq, Hkv, D, Di = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head, cfg.index_dim
    n_msa, keys = 2, (T + 1) / 2
    index = n_msa * (4 * (C * Hkv * Di + C * Di) + (2 * Hkv * Di + 2 * Hq * D + 6 * Hkv * Di) * keys)
    assert msa.flops_per_token(T) == pytest.approx(dense.flops_per_token(T) + index, rel=1e-12)
    assert msa.flops_per_token(T, kl_dense=True) == msa.flops_per_token(T)
    assert dense.flops_per_token(T, kl_dense=True) == dense.flops_per_token(T)
    assert tiny().flops_per_token(T) < msa.flops_per_token(T)     # K = 3 blocks of 4 < 40: fewer keys


def test_index_branch_without_rope_reads_content_only():
    """index_rope=False: the index queries and keys of a token are the same at every position (content-only scores),
    so shifting the positions leaves them alike; with RoPE (the default) they move. The main branch rotates either way."""
    for index_rope in (False, True):
        attn = tiny(index_rope=index_rope).blocks[1].attn
        h = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(3))
        qi, ki = attn.index_branch(h, torch.arange(12))
        qi2, ki2 = attn.index_branch(h, torch.arange(12) + 37)
        assert qi.shape == (2, 2, 12, 8) and ki.shape == (2, 12, 8)
        assert torch.equal(qi, qi2) and torch.equal(ki, ki2) if not index_rope else not torch.allclose(ki, ki2)
        if not index_rope:
            torch.testing.assert_close(ki, h @ attn.wi.weight[-8:].t())      # the key's rows come last in wi
        assert not torch.allclose(attn.qkv(h, torch.arange(12))[1], attn.qkv(h, torch.arange(12) + 37)[1])


@pytest.mark.parametrize("attention,fp8,index_rope", [("msa", False, True), ("dense", False, True), ("msa", True, True),
                                                      ("msa", False, False)])
def test_cached_decode_equals_full_forward(attention, fp8, index_rope):
    """Prefill 9 tokens (an image inside), then decode 31 more one at a time through the caches: every step's
    logits equal the full forward's at that position (the selection is sparse: K * bs = 12 < 40). index_fp8:
    the index-key cache holds e4m3 keys and scales, and the forward selects with fp8 scores too. index_rope=False:
    the cached index keys are unrotated, as the forward's. Caches with and without the stacked projection weight
    (GPT.new_cache, as generate makes them; KVCache's default: each projection its own product)."""
    model = tiny(attention=attention, index_fp8=fp8, index_rope=index_rope).eval()
    x, _, patches = batch()
    stacked = model.new_cache(40)
    assert [c.w is not None for c in stacked] == [block.attn.learned for block in model.blocks]
    with torch.no_grad():
        full, _ = model(x, patches=patches)                        # (B, T, V)
    for cache in ([KVCache(40) for _ in model.blocks], stacked):
        with torch.no_grad():
            step, _ = model(x[:, :9], patches=patches[:, :9], cache=cache)
            got = [step[:, 0]]
            for t in range(9, 40):
                step, _ = model(x[:, t:t + 1], cache=cache, pos0=t)
                got.append(step[:, 0])
        torch.testing.assert_close(torch.stack(got, 1), full[:, 8:], rtol=1e-4, atol=1e-4)
    C, Hkv = model.cfg.n_embd, model.cfg.n_kv_head
    assert all(c.k.shape == c.v.shape == (2, Hkv, 40, C // model.cfg.n_head) for c in cache)
    sparse = [c for c, block in zip(cache, model.blocks) if block.attn.sparse]
    assert len(sparse) == (2 if attention == "msa" else 0) and all(c.ki is None for c in cache if c not in sparse)
    for c in sparse:
        assert c.ki.shape == (2, 40, model.cfg.index_dim)
        assert (c.ki.dtype, c.ks is not None) == ((torch.float8_e4m3fn, True) if fp8 else (torch.float32, False))
    if fp8:  # the fp8 scores select other blocks here than the bf16 ones: the cache had to follow them
        assert not torch.allclose(full, tiny(attention=attention).eval()(x, patches=patches)[0], atol=1e-3)


def test_kv_cache_write_and_dense_flag():
    """KVCache.write puts each chunk at its positions (a (1,) device tensor as a CUDA graph passes it, or a range).
    dense=True: an MSA layer decodes over the whole cache. Prefilling one token and decoding every other one
    through dense caches is then exactly the attention='dense' model with the same weights; without the flag it
    is the MSA model's full forward."""
    c = KVCache(6)
    k, v, ki = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.randn(2, 4, 7)
    c.write(torch.arange(1, 5), k, v, ki)
    c.write(torch.tensor([5]), k[:, :, :1], v[:, :, :1], ki[:, :1])
    assert c.k.shape == (2, 3, 6, 5) and c.ki.shape == (2, 6, 7) and c.ks is None and not c.dense
    torch.testing.assert_close(c.k[:, :, 1:5], k)
    torch.testing.assert_close(c.v[:, :, 5], v[:, :, 0])
    torch.testing.assert_close(c.ki[:, 1:5], ki)
    assert c.k[:, :, 0].abs().max() == 0                  # not written yet
    msa, dense = tiny(), tiny(attention="dense")          # K = 3 blocks of 4 < 40: MSA really differs from dense
    dense.load_state_dict({k: v for k, v in msa.state_dict().items() if ".wi." not in k})
    msa.eval()
    x = batch()[0].clamp(max=PATCH - 1)                   # (B, 40) text only
    with torch.no_grad():
        for flag, want in ((True, dense(x)[0]), (False, msa(x)[0])):
            cache = [KVCache(40, dense=flag) for _ in msa.blocks]
            got = [msa(x[:, t:t + 1], cache=cache, pos0=torch.tensor([t]))[0][:, 0] for t in range(40)]
            torch.testing.assert_close(torch.stack(got, 1), want, rtol=1e-4, atol=1e-4)
    assert (dense(x)[0] - msa(x)[0]).abs().max() > 1e-3


def test_generate_greedy_equals_reforward():
    model = tiny().eval()
    x, _, _ = batch()
    x = x[:, :11].clamp(max=PATCH - 1)
    out = model.generate(x, max_new_tokens=6, temperature=0)
    ref = x
    with torch.no_grad():
        for _ in range(6):
            ref = torch.cat([ref, model(ref)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert isinstance(out, torch.Tensor) and torch.equal(out, ref)
    g = torch.Generator().manual_seed(3)
    sampled = model.generate(x, 5, temperature=1.0, top_k=3, generator=g)
    assert isinstance(sampled, torch.Tensor) and sampled.shape == (2, 16) and torch.equal(sampled[:, :11], x)
    assert torch.equal(model.generate(x, 0), x)            # no new token: the prompt back
    for prompt, n in ((x, -1), (x[:, :0], 3), (x[0], 3)):  # one line, not a shape error from deep inside
        with pytest.raises(ValueError, match="expected a prompt idx .B, T0 >= 1. and max_new_tokens >= 0"):
            model.generate(prompt, n)


def test_cached_call_of_several_tokens_is_a_prefill():
    """A cached call of T > 1 tokens attends within its tokens only: from pos0 > 0 it would leave the cache out.
    A position held in a tensor is a decode step's and needs its cache."""
    model = tiny().eval()
    x = batch()[0].clamp(max=PATCH - 1)                                      # text tokens only
    cache = model.new_cache(40, "sparse")
    with torch.no_grad():
        model(x[:, :8], cache=cache)
        with pytest.raises(ValueError, match="a cached call of T > 1 tokens is a prefill and starts at pos0 = 0"):
            model(x[:, 8:12], cache=cache, pos0=8)
        with pytest.raises(ValueError, match="pos0 as a tensor is a decode step's position and comes with a cache"):
            model(x[:, 8:9], pos0=torch.tensor([8]))


def test_bad_config():
    for kw, msg in [(dict(n_kv_head=3), "multiple of n_kv_head"), (dict(attention="sparse"), "attention must be"),
                    (dict(expert_topk=5), "expert_topk"), (dict(n_dense_layers=4), "n_dense_layers"),
                    (dict(n_head=0), "n_head must be an int >= 1, got 0"),       # before any check divides by it
                    (dict(index_dim=-2), "index_dim must be an int >= 1, got -2"),
                    (dict(expert_hidden=0), "expert_hidden must be an int >= 1, got 0")]:
        with pytest.raises(ValueError, match=msg):
            tiny(**kw)
