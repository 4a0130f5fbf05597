"""
msa_triton.row_linear, a decode step's dense product (a few rows times a weight matrix), against F.linear in float64:
fp32 in the interpreter, bf16 on a GPU; and the model's use of it (decode steps on CUDA only).
"""
import pytest
import torch
import torch.nn.functional as F

import msa_triton
from msa_triton import rows
from conftest import DEVICE, requires_cuda


@pytest.fixture(autouse=True)
def kernel_takes_eight_rows(monkeypatch):
    # the kernel computes any number of rows; MAX_ROWS is where a call hands them to F.linear instead, a tuning
    # choice: the tests run the kernel for up to 8
    monkeypatch.setattr(rows, "MAX_ROWS", 8)


def check(M, K, N, dtype=torch.float32, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (M,)), K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) / K ** 0.5
    x, w = x.to(DEVICE, dtype), w.to(DEVICE, dtype)
    got = msa_triton.row_linear(x, w)
    want = F.linear(x.double(), w.double())
    assert got.shape == want.shape and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2                     # bf16: one rounding of the fp32 sum
    assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item()
    return got


# (M, K, N): one row (a batch-1 step) at the default model's products, a row count that is not a power of two,
# K and N that are not multiples of the tiles, the most rows the kernel takes
@pytest.mark.parametrize("M,K,N", [(1, 512, 960), (1, 512, 512), (3, 37, 21), (8, 100, 40), (2, 16, 1)])
def test_matches_linear(M, K, N):
    check(M, K, N)


def test_leading_dims_and_strides():
    # x (B, 1, K) as a decode step passes it, and a strided view of x and of w
    check(4, 24, 33, lead=(4, 1))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2 * 40, generator=g).to(DEVICE)[:, ::2]
    w = torch.randn(50, 3 * 40, generator=g).to(DEVICE)[:, 40:80]
    assert not (x.is_contiguous() or w.is_contiguous())
    assert torch.allclose(msa_triton.row_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_strip_in_pieces(monkeypatch):
    # K larger than a program's strip: the kernel loops over pieces of the strip, the last one partial
    monkeypatch.setattr(rows, "MAX_STRIP", 16 * 32)
    check(2, 100, 40)


def test_many_rows_go_to_linear(monkeypatch):
    # past MAX_ROWS the call is F.linear's (the kernel is never launched)
    monkeypatch.setattr(rows, "_row_linear_kernel", None)
    got = check(rows.MAX_ROWS + 1, 16, 8)
    assert got.shape == (rows.MAX_ROWS + 1, 8)


def test_bad_input_raises():
    x, w = torch.randn(2, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    for a, b in ((x, w[:, :5]), (x, w[0]), (x, w.double())):
        with pytest.raises(ValueError):
            msa_triton.row_linear(a, b)


@requires_cuda
@pytest.mark.parametrize("M", [1, 8])
def test_bf16_on_gpu(M):
    check(M, 512, 960, dtype=torch.bfloat16)
    check(M, 512, 50304, dtype=torch.bfloat16, seed=2)


@requires_cuda
def test_compiles_without_graph_break():
    x, w = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16), torch.randn(960, 512, device="cuda",
                                                                                 dtype=torch.bfloat16)
    f = torch.compile(lambda a, b: msa_triton.row_linear(a, b).float().relu(), fullgraph=True)
    assert torch.equal(f(x, w), msa_triton.row_linear(x, w).float().relu())


@requires_cuda
def test_model_decodes_through_it(monkeypatch):
    # the MSA model with the Triton backend on a GPU: every decode step's two products a layer and its logits go
    # through row_linear (a prefill's products do not, its last position's logits do), and the cached decode still
    # equals the full forward (fp32)
    from model import GPT, GPTConfig
    calls = []
    monkeypatch.setattr(msa_triton, "row_linear", lambda x, w: calls.append(w.shape[0]) or rows.row_linear(x, w))
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, index_dim=8, n_dense_layers=1,
                    msa_block_size=4, msa_topk=3, n_expert=4, expert_topk=2, expert_hidden=24, patch_dim=6,
                    img_patch_id=50)
    model = GPT(cfg, backend="triton").cuda().eval()
    x = torch.randint(0, 50, (2, 24), device="cuda")
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_cache(24)
        got = [model(x[:, :8], cache=cache)[0][:, 0]]
        assert calls == [64]                               # a prefill of 8 tokens: its last logits only
        for t in range(8, 24):
            got.append(model(x[:, t:t + 1], cache=cache, pos0=t)[0][:, 0])
    assert len(calls) == 1 + 16 * (2 * 3 + 1)              # 16 steps x (2 products x 3 layers + the logits)
    torch.testing.assert_close(torch.stack(got, 1), full[:, 7:], rtol=1e-4, atol=1e-4)


@requires_cuda
def test_pdl_changes_when_not_what(monkeypatch):
    # programmatic dependent launch (Hopper and newer) changes when a kernel starts, never what it computes: two
    # dependent products, the second reading the first's output, give the same bits with it on and off
    from msa_triton import common
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 512, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(960, 512, device="cuda", generator=g) / 22).to(torch.bfloat16)
    outs = []
    for on in (False, True):
        monkeypatch.setattr(common, "PDL", on)
        outs.append(msa_triton.row_linear(msa_triton.row_linear(x, w)[:, :512], w[:512]))
    assert torch.equal(outs[0], outs[1])
