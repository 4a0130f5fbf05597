"""
linear_cross_entropy, the LM loss both backends expose: msa_triton's chunked, fused version against
msa_ref's two-line definition (value and gradients), in fp32 under the interpreter and in bf16 under
autocast on a GPU.
"""
import pytest
import torch

import msa_ref
import msa_triton
from conftest import DEVICE, requires_cuda


def inputs(N, C, V, seed=0, ignore=0.25):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=g, dtype=torch.float64)
    w = torch.randn(V, C, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y = torch.where(torch.rand(N, generator=g) < ignore, -1, y)               # -1: no loss at that row
    y[0] = V - 1                                                               # the last class, edge of the mask
    return h.to(DEVICE, torch.float32), w.to(DEVICE, torch.float32), y.to(DEVICE)


def both(h, w, y, autocast=False):
    """(loss, dh, dw) of msa_triton and of msa_ref from the same leaves."""
    out = []
    for fn in (msa_triton.linear_cross_entropy, msa_ref.linear_cross_entropy):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(hh, ww, y)
        loss.backward()
        out.append((loss.detach(), hh.grad, ww.grad))
    return out


# (N, C, V, chunk elements): one chunk; several chunks with a short last one; V above BLOCK_V (two sweeps
# of 4096 columns with a masked tail); N = 1
@pytest.mark.parametrize("N,C,V,chunk", [(9, 16, 50, 2 ** 29), (23, 8, 70, 5 * 70), (5, 4, 5000, 2 ** 29),
                                         (1, 8, 33, 2 ** 29)])
def test_equals_reference(N, C, V, chunk, monkeypatch):
    monkeypatch.setattr(msa_triton.cross_entropy, "CE_CHUNK_ELEMS", chunk)
    (loss, dh, dw), (rloss, rdh, rdw) = both(*inputs(N, C, V))
    torch.testing.assert_close(loss, rloss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh, rdh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw, rdw, rtol=1e-4, atol=1e-6)


def test_no_scored_row():
    """Every target -1: the mean over no row is NaN, as msa_ref's, and the gradients are zero, as msa_ref's (no
    0 * inf NaN to poison the weights of a step whose micro-batch had nothing to score)."""
    h, w, y = inputs(5, 8, 40)
    (loss, dh, dw), (rloss, rdh, rdw) = both(h, w, torch.full_like(y, -1))
    assert loss.isnan() and rloss.isnan()
    for a, b in ((dh, rdh), (dw, rdw)):
        assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))


def test_ignored_rows_and_bad_targets():
    h, w, y = inputs(6, 8, 40, ignore=0.0)
    y[2] = -1
    hh = h.clone().requires_grad_()
    msa_triton.linear_cross_entropy(hh, w, y).backward()
    assert hh.grad[2].abs().max() == 0 and hh.grad[1].abs().max() > 0        # no loss, no gradient at row 2
    for bad in (40, -2):                                                       # outside [-1, V): NaN, not a wrong number
        y[3] = bad
        assert msa_triton.linear_cross_entropy(h, w, y).isnan()
    with pytest.raises(ValueError, match="same C"):
        msa_triton.linear_cross_entropy(h, w[:, :4], y)
    with pytest.raises(ValueError, match="integer targets"):
        msa_triton.linear_cross_entropy(h, w, y[:5])


def count_matmuls(fn):
    """fn()'s result and the matrix products it ran (aten::mm), inside the custom op too (a profiler sees nested calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.name == "aten::mm" for e in prof.events())


def test_no_gradient_work_without_grad():
    """Under torch.no_grad() (evaluation) only the logits are multiplied out: 1 matmul per chunk, not 3."""
    h, w, y = inputs(7, 8, 30)
    h.requires_grad_()
    for grad, want in ((False, 1), (True, 3)):
        with torch.set_grad_enabled(grad):
            loss, n = count_matmuls(lambda: msa_triton.linear_cross_entropy(h, w.requires_grad_(), y))
        assert n == want, (grad, n)
    torch.testing.assert_close(loss.detach(), msa_ref.linear_cross_entropy(h, w, y).detach())


@requires_cuda
def test_bf16_autocast_matches_reference(monkeypatch):
    """The model's case: fp32 h and w under bf16 autocast, V = 50304, three chunks."""
    monkeypatch.setattr(msa_triton.cross_entropy, "CE_CHUNK_ELEMS", 1000 * 50304)
    h, w, y = inputs(3000, 256, 50304)
    (loss, dh, dw), (rloss, rdh, rdw) = both(h, w, y, autocast=True)
    torch.testing.assert_close(loss, rloss, rtol=2e-3, atol=2e-3)
    for got, ref in ((dh, rdh), (dw, rdw)):                                   # bf16 products: ~1e-2 relative
        assert ((got - ref).norm() / ref.norm()).item() < 2e-2
