"""Assignment 5: the MoE layer (moe.py): moe_dispatch (each expert runs once on the tokens that chose it)
and MoE.forward (top-k routing, gates, shared expert, expert load and the Switch-style balance loss),
compared with a per-token loop written from the docstrings."""
import pytest
import torch

from conftest import assert_close
from model import GPTConfig
from moe import MoE, moe_dispatch, swiglu


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def per_token(x, idx, gate, w13, w2):
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[n, j])
            out[n] += gate[n, j] * swiglu(x[n:n + 1], w13[e], w2[e])[0]
    return out


def test_dispatch_matches_per_token_loop():
    N, C, H, E, k = 23, 6, 5, 5, 2
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(N)])   # expert 4 gets no token
    gate = torch.rand(N, k, generator=g, dtype=torch.float64)
    x, w13, w2 = rand(N, C, seed=2), rand(E, C, 2 * H, seed=3), rand(E, H, C, seed=5)
    assert_close(moe_dispatch(x, idx, gate, w13, w2), per_token(x, idx, gate, w13, w2), what="moe_dispatch")


def layer(shared, E=4, k=2, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=1, n_embd=8, n_expert=E, expert_topk=k, expert_hidden=6, shared_expert=shared)
    return MoE(cfg).double()


@pytest.mark.parametrize("shared, E, k", [(True, 4, 2), (False, 5, 3)])
def test_forward_matches_the_definition(shared, E, k):
    moe = layer(shared, E, k)
    x = rand(2, 7, 8, seed=6)
    out, balance, load = moe(x)
    xf = x.reshape(14, 8)
    logits = xf @ moe.router.weight.T                                           # (N, E)
    top, idx = logits.topk(k, dim=-1)
    gate = top.softmax(-1)                                                      # a softmax over the chosen experts
    want = per_token(xf, idx, gate, moe.w13[:E], moe.w2[:E])
    if shared:                                                                  # stored after the routed experts
        want = want + swiglu(xf, moe.w13[E], moe.w2[E])
    assert_close(out, want.view(2, 7, 8), what="out")
    f = torch.bincount(idx.reshape(-1), minlength=E).double() / idx.numel()    # fraction of assignments
    P = logits.softmax(-1).mean(0)                                              # mean router probability
    assert_close(load.double(), f, what="load")
    assert_close(balance.double(), E * (f * P).sum(), what="balance")
    assert abs(float(load.sum()) - 1) < 1e-9


def test_balance_is_one_for_a_uniform_router_and_grows_with_imbalance():
    moe = layer(False)
    x = rand(1, 32, 8, seed=7)
    with torch.no_grad():
        moe.router.weight.zero_()
    assert abs(float(moe(x)[1].detach()) - 1) < 1e-9
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[5.0] * 8, [4.0] * 8, [0.0] * 8, [0.0] * 8]))
    x = rand(1, 32, 8, seed=8).abs()                                            # every token prefers experts 0, 1
    _, balance, load = moe(x)
    assert load.tolist() == [0.5, 0.5, 0.0, 0.0] and float(balance.detach()) > 1.5


def test_balance_gradient_pushes_load_off_the_busiest_expert():
    """The load fractions f are counts (no gradient); P is differentiable: a step down the balance loss
    lowers the router probability of the most loaded expert and reaches no expert weight."""
    moe = layer(False, seed=3)
    x = rand(1, 40, 8, seed=9)
    _, balance, load = moe(x)
    busiest = int(load.argmax())
    balance.backward()
    assert moe.w13.grad is None or float(moe.w13.grad.abs().sum()) == 0
    before = (x.reshape(40, 8) @ moe.router.weight.T).softmax(-1)[:, busiest].mean()
    with torch.no_grad():
        moe.router.weight -= 0.5 * moe.router.weight.grad
    after = (x.reshape(40, 8) @ moe.router.weight.T).softmax(-1)[:, busiest].mean()
    assert after < before
