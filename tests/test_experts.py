"""
msa_triton.expert_mix, a decode step's MoE layer (routing, then the experts reading only the chosen ones), against
moe.MoE's routing and moe.moe_all_experts (the batched product over every expert) in float64: fp32 in the
interpreter, bf16 weights on a GPU; and the MoE layer's choice of it (CUDA, no gradient, no statistics, fewer
(token, expert) pairs than experts).
"""
import pytest
import torch

import moe
import msa_triton
from conftest import DEVICE, requires_cuda


def inputs(N, C, H, E, shared=True, seed=0, dtype=torch.float32):
    """x (N, C), router (E, C), w13 (E', C, 2H), w2 (E', H, C), E' = E + shared."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    router = torch.randn(E, C, generator=g, dtype=torch.float64) / C ** 0.5
    Ep = E + int(shared)
    w13 = torch.randn(Ep, C, 2 * H, generator=g, dtype=torch.float64) / C ** 0.5
    w2 = torch.randn(Ep, H, C, generator=g, dtype=torch.float64) / H ** 0.5
    return [t.to(DEVICE, dtype) for t in (x, router, w13, w2)]


def reference(x, router, k, w13, w2):
    """moe.MoE's few-token path in float64: logits rounded to x's dtype (a product in that dtype), top k, softmax
    gates rounded the same way, 1 for the shared experts, then moe_all_experts. Returns out (N, C), weight (N, E')."""
    N, E = x.shape[0], router.shape[0]
    logits = (x.double() @ router.double().t()).to(x.dtype).double()
    top, idx = moe.top_k(logits, k)
    gate = top.softmax(-1).to(x.dtype).double()
    weight = torch.ones(N, w13.shape[0], dtype=torch.float64, device=x.device)
    weight[:, :E] = torch.zeros(N, E, dtype=torch.float64, device=x.device).scatter(1, idx, gate)
    return moe.moe_all_experts(x.double(), weight, w13.double(), w2.double()), weight


def check(N, C, H, E, k, shared=True, dtype=torch.float32, seed=0):
    x, router, w13, w2 = inputs(N, C, H, E, shared, seed, dtype)
    got = msa_triton.expert_mix(x, router, k, w13, w2)
    want, _ = reference(x, router, k, w13, w2)
    assert got.shape == want.shape and got.dtype == x.dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"relative error {err:.2e} at N={N} C={C} H={H} E={E} k={k}"
    return got, want


# (N, C, H, E, k): one token (batch-1 decoding), several; C and H not multiples of the kernels' blocks; k = 1;
# every expert chosen (k = E); the chosen experts' path (pairs fewer than experts) and the all-experts path
@pytest.mark.parametrize("N,C,H,E,k", [(1, 64, 48, 8, 2), (3, 40, 20, 4, 2), (2, 24, 70, 5, 1), (2, 16, 16, 3, 3),
                                        (4, 24, 70, 5, 1)])
def test_equals_moe_routing_and_all_experts(N, C, H, E, k):
    check(N, C, H, E, k)


def test_no_shared_expert():
    check(3, 32, 24, 4, 2, shared=False)


@pytest.mark.parametrize("N", [2, 3])                                         # the chosen experts' path, all experts'
def test_routing_ties_go_to_the_lower_expert(N):
    """Two experts with equal logits: the lower index is chosen (moe.top_k's order); with k = 1 only it is read, and
    the output is that expert's alone (gate 1) plus the shared one."""
    x, router, w13, w2 = inputs(N, 32, 16, 4, seed=1)
    router[2] = router[1] = router.abs().sum(0)                               # experts 1 and 2 tie, above 0 and 3
    x = x.abs()
    got = msa_triton.expert_mix(x, router, 1, w13, w2)
    want, weight = reference(x, router, 1, w13, w2)
    assert weight[:, 1].eq(1).all() and weight[:, 2].eq(0).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("N", [1, 2])                                         # the chosen experts' path, all experts'
def test_views_of_stacked_weights(N):
    """The MoE layer passes its (E + 1, ...) parameters whole; slices and a non-contiguous x and router work too."""
    x, router, w13, w2 = inputs(N, 32, 16, 4)
    xt = torch.cat([x, x], 1)[:, ::2]                                          # (N, C), stride 2 along C
    rt = torch.cat([router, router], 1)[:, ::2]
    assert not xt.is_contiguous() and not rt.is_contiguous()
    got = msa_triton.expert_mix(xt, rt[:3], 2, w13[:4], w2[:4])
    want, _ = reference(xt, rt[:3], 2, w13[:4], w2[:4])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_strips_in_pieces(monkeypatch):
    """The chosen experts' path: a strip larger than MAX_STRIP elements runs in pieces (here C and the hidden slices
    in several, and the router's C)."""
    from msa_triton import experts
    monkeypatch.setattr(experts, "MAX_STRIP", 256)                            # 16 features, 4 hidden units a piece
    check(1, 40, 72, 4, 2)


def test_all_experts_in_pieces(monkeypatch):
    """The all-experts path with small tiles: C in three pieces of 16 (the last partial), hidden units and output
    columns in tiles of 16 (H and C not multiples), slices of the stacked hidden units in two pieces (the last
    partial), more tokens than one tile of 16 rows."""
    from msa_triton import experts
    for name in ("ALL_UP_COLS", "ALL_UP_C", "ALL_DOWN_COLS", "ALL_DOWN_K"):
        monkeypatch.setattr(experts, name, 16)
    check(3, 40, 72, 4, 2)
    check(17, 40, 24, 5, 3)


def test_all_experts_at_the_most_tokens():
    """As many tokens as MoE.forward sends to expert_mix (moe.MOE_FEW_TOKENS): 64 rows of one product."""
    check(moe.MOE_FEW_TOKENS, 32, 16, 4, 2)


@pytest.mark.parametrize("N", [1, 3])                                         # the chosen experts' path, all experts'
def test_weights_of_another_dtype(N):
    """Weights in float32 with x in float16 (a model's float32 parameters under autocast): the products take the
    weights rounded to x's dtype, as autocast rounds them."""
    x, router, w13, w2 = inputs(N, 32, 16, 4)
    x, router = x.half(), router.half()
    got = msa_triton.expert_mix(x, router, 2, w13, w2)
    want, _ = reference(x, router, 2, w13.half(), w2.half())
    assert got.dtype == torch.float16
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < 5e-3, f"relative error {err:.2e}"


def test_bad_shapes():
    x, router, w13, w2 = inputs(2, 16, 8, 4)
    with pytest.raises(ValueError, match=r"expert_mix wants x \(N, C\), router \(E, C\), 1 <= k <= E"):
        msa_triton.expert_mix(x, router[:, :15], 2, w13, w2)
    with pytest.raises(ValueError, match="expert_mix wants"):
        msa_triton.expert_mix(x, router, 5, w13, w2)                           # k > E
    with pytest.raises(ValueError, match="expert_mix wants"):
        msa_triton.expert_mix(x, torch.cat([router, router]), 2, w13, w2)      # more routed experts than w13 holds
    with pytest.raises(ValueError, match="expert_mix wants"):
        msa_triton.expert_mix(x, router, 2, w13[:, :, :15], w2)
    with pytest.raises(ValueError, match="expert_mix wants"):
        msa_triton.expert_mix(x[0], router, 2, w13, w2)


@requires_cuda
@pytest.mark.parametrize("N", [1, 4, 8])
def test_bf16_on_gpu(N):
    """The default model's expert shapes (C=512, H=1024, 8 experts + a shared one, top-2) with bf16 weights."""
    check(N, 512, 1024, 8, 2, dtype=torch.bfloat16)


@requires_cuda
def test_moe_layer_picks_it_for_decoding():
    """MoE.forward takes the backend's expert_mix for a few tokens (up to moe.MOE_FEW_TOKENS) without a gradient or
    statistics on CUDA: one token (its chosen experts' path) and two (every expert's), the same output as its own
    routing and moe_all_experts, to rounding; and its own path with a gradient, with statistics, or for more tokens."""
    from model import GPTConfig
    cfg = GPTConfig(n_embd=64, expert_hidden=32, n_expert=4, expert_topk=2, shared_expert=True, n_layer=2)
    calls = []
    layer = moe.MoE(cfg, lambda *a: calls.append(len(a[0])) or msa_triton.expert_mix(*a)).to(DEVICE)
    x, x2 = torch.randn(1, 1, 64, device=DEVICE), torch.randn(1, 2, 64, device=DEVICE)
    with torch.no_grad():
        fast, fast2 = layer(x, stats=False)[0], layer(x2, stats=False)[0]
        layer(torch.randn(1, moe.MOE_FEW_TOKENS + 1, 64, device=DEVICE), stats=False)
        with_stats = layer(x)[0]
    slow, slow2 = layer(x, stats=False)[0], layer(x2, stats=False)[0]           # with a gradient
    assert calls == [1, 2]
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast2, slow2.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(with_stats, slow.detach())
