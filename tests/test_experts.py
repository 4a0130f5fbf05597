"""
msa_triton.expert_mix, a decode step's experts reading only the chosen ones, against moe.moe_all_experts (the
batched product over every expert) in float64: fp32 in the interpreter, bf16 weights on a GPU; and the MoE layer's
choice of it (CUDA, no gradient, fewer (token, expert) pairs than experts).
"""
import pytest
import torch

import moe
import msa_triton
from conftest import DEVICE, requires_cuda


def inputs(N, C, H, E, k, shared=True, seed=0, dtype=torch.float32):
    """x (N, C), weight (N, E + shared): each token's k gates (softmax of random logits) at random experts, 0
    elsewhere, 1 for the shared expert; w13 (E', C, 2H), w2 (E', H, C)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64)
    Ep = E + int(shared)
    w13 = torch.randn(Ep, C, 2 * H, generator=g, dtype=torch.float64) / C ** 0.5
    w2 = torch.randn(Ep, H, C, generator=g, dtype=torch.float64) / H ** 0.5
    idx = torch.rand(N, E, generator=g).argsort(1)[:, :k]                     # k distinct experts a token
    gate = torch.randn(N, k, generator=g, dtype=torch.float64).softmax(-1)
    weight = torch.zeros(N, Ep, dtype=torch.float64).scatter(1, idx, gate)
    if shared:
        weight[:, E] = 1.0
    return [t.to(DEVICE, dtype) for t in (x, w13, w2)] + [weight.to(DEVICE, torch.float32)]


def check(N, C, H, E, k, shared=True, dtype=torch.float32, seed=0):
    x, w13, w2, weight = inputs(N, C, H, E, k, shared, seed, dtype)
    got = msa_triton.expert_mix(x, weight, w13, w2)
    want = moe.moe_all_experts(x.double(), weight.double(), w13.double(), w2.double())
    assert got.shape == want.shape and got.dtype == x.dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < tol, f"relative error {err:.2e} at N={N} C={C} H={H} E={E} k={k}"
    return got, want


# (N, C, H, E, k): one token (batch-1 decoding), several; C and H not multiples of the kernels' blocks; k = 1;
# every expert chosen (k = E)
@pytest.mark.parametrize("N,C,H,E,k", [(1, 64, 48, 8, 2), (3, 40, 20, 4, 2), (2, 24, 70, 5, 1), (2, 16, 16, 3, 3)])
def test_equals_all_experts(N, C, H, E, k):
    check(N, C, H, E, k)


def test_no_shared_expert_and_unchosen_rows():
    """Without a shared expert; a token whose weights are all 0 gets zeros (nothing of its rows is read)."""
    x, w13, w2, weight = inputs(3, 32, 24, 4, 2, shared=False)
    weight[1] = 0
    got = msa_triton.expert_mix(x, weight, w13, w2)
    want = moe.moe_all_experts(x.double(), weight.double(), w13.double(), w2.double())
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_views_of_stacked_weights():
    """The MoE layer passes its (E + 1, ...) parameters whole; slices and a non-contiguous x work too."""
    x, w13, w2, weight = inputs(2, 32, 16, 4, 2)
    xt = torch.cat([x, x], 1)[:, ::2]                                          # (N, C), stride 2 along C
    assert not xt.is_contiguous()
    got = msa_triton.expert_mix(xt, weight[:, :4], w13[:4], w2[:4])
    want = moe.moe_all_experts(xt.double(), weight[:, :4].double(), w13[:4].double(), w2[:4].double())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_strips_in_pieces(monkeypatch):
    """A strip larger than MAX_STRIP elements runs in pieces (here C and the hidden slices in several)."""
    from msa_triton import experts
    monkeypatch.setattr(experts, "MAX_STRIP", 256)                            # 16 features, 4 hidden units a piece
    check(2, 40, 72, 4, 2)


def test_bad_shapes():
    x, w13, w2, weight = inputs(2, 16, 8, 4, 2)
    with pytest.raises(ValueError, match=r"expert_mix wants x \(N, C\), weight \(N, E\)"):
        msa_triton.expert_mix(x, weight[:, :3], w13, w2)
    with pytest.raises(ValueError, match="expert_mix wants"):
        msa_triton.expert_mix(x, weight, w13[:, :, :15], w2)
    with pytest.raises(ValueError, match="expert_mix wants"):
        msa_triton.expert_mix(x[0], weight, w13, w2)


@requires_cuda
@pytest.mark.parametrize("N", [1, 4])
def test_bf16_on_gpu(N):
    """The default model's expert shapes (C=512, H=1024, 8 experts + a shared one, top-2) with bf16 weights."""
    check(N, 512, 1024, 8, 2, dtype=torch.bfloat16)


@requires_cuda
def test_moe_layer_picks_it_for_decoding():
    """MoE.forward takes the backend's expert_mix for one token without a gradient on CUDA (the same output as
    moe_all_experts to rounding), and moe_all_experts with a gradient or once the tokens' (token, expert) pairs are
    as many as the experts (here 2 tokens x (2 + 1) >= 4 + 1)."""
    from model import GPTConfig
    cfg = GPTConfig(n_embd=64, expert_hidden=32, n_expert=4, expert_topk=2, shared_expert=True, n_layer=2)
    calls = []
    layer = moe.MoE(cfg, lambda *a: calls.append(len(a[0])) or msa_triton.expert_mix(*a)).to(DEVICE)
    x = torch.randn(1, 1, 64, device=DEVICE)
    with torch.no_grad():
        fast = layer(x, stats=False)[0]
        layer(torch.randn(1, 2, 64, device=DEVICE), stats=False)
    slow = layer(x, stats=False)[0]                                            # with a gradient
    assert calls == [1]
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-4, atol=1e-5)
