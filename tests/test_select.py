"""The blind selections (msa_ref.select_fixed / fixed_block_idx, model.GPTConfig.msa_select): the controls with
K blocks per query and no learned choice. Their layout is index_topk's (DESIGN.md section 1); the model runs,
trains and decodes with them on both backends."""
import pytest
import torch

import msa_ref
import msa_triton
from conftest import DEVICE, requires_cuda
from decoding import KVCache
from model import GPT, GPTConfig

RULES = ("local", "random")


def check_layout(idx, T, bs, K, rule):
    """Every row of idx (B, Hkv, T, K): earlier blocks, the local block in the last valid slot, then -1; distinct."""
    assert idx.dtype == torch.int32 and idx.shape[2:] == (T, K)
    for row, t in ((r, t) for bh in idx.reshape(-1, T, K).tolist() for t, r in enumerate(bh)):
        l = t // bs
        valid = [b for b in row if b >= 0]
        n = len(valid)
        assert row == valid + [-1] * (K - n), (t, row)                        # -1 only as trailing padding
        assert valid[-1] == l and all(b < l for b in valid[:-1]), (t, row)    # local last, the rest earlier
        assert len(set(valid)) == n, (t, row)
        if rule == "random" or l + 1 <= K:
            assert n == min(K, l + 1), (t, row)
        else:                                                                 # 'local' past the dense start: the
            assert valid == ([0] + list(range(l - K + 2, l + 1)) if K >= 2 else [l]), (t, row)  # sink, window


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("T,bs,K", [(40, 4, 3), (37, 4, 3), (1, 4, 3), (29, 3, 1), (50, 5, 2), (20, 4, 5), (19, 4, 8)])
def test_layout(rule, T, bs, K):
    """T not a multiple of bs, T=1, K=1, K=2, and K * bs >= T (every visible block: dense_block_idx's set)."""
    idx = msa_ref.fixed_block_idx(2, 3, T, bs, K, rule, generator=torch.Generator().manual_seed(0))
    check_layout(idx, T, bs, K, rule)
    if K * bs >= T:
        dense = msa_ref.dense_block_idx(2, 3, T, bs)                          # (2, 3, T, nb), nb <= K
        pad = torch.full((2, 3, T, K - dense.shape[3]), -1, dtype=torch.int32)
        torch.testing.assert_close(idx.sort(-1).values, torch.cat([dense, pad], -1).sort(-1).values)


def test_local_holds_sink_and_local_block():
    idx = msa_ref.fixed_block_idx(1, 2, 64, 4, 4, "local")                    # (1, 2, 64, 4)
    t = torch.arange(64)
    assert bool((idx == 0).any(-1).all()) and bool((idx == (t // 4)[:, None].int()).any(-1).all())
    assert torch.equal(idx[0, 0], idx[0, 1])                                  # every group alike


def test_random_reproducible_and_uniform():
    """A generator makes the draw reproducible; seeds differ; torch's global RNG serves when none is given.
    Each earlier block is drawn with probability (K - 1) / l."""
    draw = lambda seed: msa_ref.fixed_block_idx(2, 2, 80, 4, 4, "random", generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))
    torch.manual_seed(5)
    a = msa_ref.fixed_block_idx(2, 2, 80, 4, 4, "random")
    torch.manual_seed(5)
    assert torch.equal(a, msa_ref.fixed_block_idx(2, 2, 80, 4, 4, "random"))
    # query 79 (l = 19): 3 of the blocks 0..18, over 4000 draws each block ~ 4000 * 3 / 19 = 632 times
    idx = msa_ref.select_fixed(torch.full((4000,), 79), 1, 1, 4, 4, "random", torch.Generator().manual_seed(0))
    counts = torch.bincount(idx[0, 0, :, :3].reshape(-1).long(), minlength=20)
    assert counts[19] == 0 and bool((idx[0, 0, :, 3] == 19).all())
    assert counts[:19].min() > 540 and counts[:19].max() < 730, counts


def test_select_fixed_at_positions():
    """select_fixed at some positions (as decoding calls it, one (1,) position) = fixed_block_idx's rows there."""
    full = msa_ref.fixed_block_idx(2, 2, 30, 4, 3, "local")
    pos = torch.tensor([0, 7, 13, 29])
    assert torch.equal(msa_ref.select_fixed(pos, 2, 2, 4, 3, "local"), full[:, :, pos])
    assert torch.equal(msa_ref.select_fixed(pos[2:3], 2, 2, 4, 3, "local"), full[:, :, 13:14])
    check_layout(msa_ref.select_fixed(torch.arange(30), 2, 2, 4, 3, "random"), 30, 4, 3, "random")


def test_facade_and_bad_values():
    assert msa_triton.fixed_block_idx is msa_ref.fixed_block_idx and msa_triton.select_fixed is msa_ref.select_fixed
    for rule in ("indexer", "window", None):
        with pytest.raises(ValueError, match="rule must be 'local' or 'random'"):
            msa_ref.fixed_block_idx(1, 1, 8, 4, 2, rule)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        msa_ref.fixed_block_idx(1, 1, 8, 4, 0, "local")
    for bad in ("Local", "", "dense", 1):
        with pytest.raises(ValueError, match="msa_select must be one of 'indexer', 'local', 'random'"):
            GPTConfig(msa_select=bad).check()


# ---------------------------------------------------------------------------------------------
# the model with a blind rule

def tiny(backend="ref", **kw):
    args = dict(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, index_dim=8, n_dense_layers=1,
                msa_block_size=4, msa_topk=3, n_expert=4, expert_topk=2, expert_hidden=24, patch_dim=6, img_patch_id=50)
    args.update(kw)
    torch.manual_seed(0)
    return GPT(GPTConfig(**args), backend=backend)


def same_dense(msa):
    """The attention='dense' model with msa's weights (the index branch left out)."""
    dense = tiny(attention="dense")
    dense.load_state_dict({k: v for k, v in msa.state_dict().items() if ".wi." not in k})
    return dense


def batch(B=2, T=40):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (B, T), generator=g), torch.randint(0, 50, (B, T), generator=g)


@pytest.mark.parametrize("rule", RULES)
def test_model_trains_without_kl(rule):
    """No KL (kl_layers empty, kl 0), the LM loss backpropagates, the unused index branch is frozen; the forward
    equals MSA over fixed_block_idx's blocks, checked through K * bs >= T (every block: the dense model)."""
    model = tiny(msa_select=rule)
    x, y = batch()
    _, losses = model(x, y)
    assert losses["kl_layers"].numel() == 0 and losses["kl"].item() == 0
    (losses["lm"] + 1.0 * losses["kl"] + 0.01 * losses["balance"]).backward()   # train.py's total loss
    for name, p in model.named_parameters():
        if "patch_proj" in name:                                                # no image in this batch
            continue
        assert (p.grad is None) == (".wi." in name) and p.requires_grad == (p.grad is not None), name
    rec = model.indexer_recall(x)                                               # the blind blocks' teacher mass
    assert rec.shape == (2,) and bool(((rec > 0) & (rec < 1)).all())
    assert model.flops_per_token(40) < tiny().flops_per_token(40)               # no index branch to pay for
    every, dense = tiny(msa_select=rule, msa_topk=10), same_dense(model)        # 10 * 4 >= 40
    torch.testing.assert_close(every(x, y)[1]["lm"], dense(x, y)[1]["lm"])
    torch.testing.assert_close(every.indexer_recall(x), torch.ones(2))


def test_local_decode_equals_full_forward():
    """'local' decodes through the caches as the forward selects: every step's logits equal the full forward's."""
    model = tiny(msa_select="local").eval()
    x, _ = batch()
    with torch.no_grad():
        full, _ = model(x)
        cache = [KVCache(40) for _ in model.blocks]
        step, _ = model(x[:, :9], cache=cache)
        got = [step[:, 0]]
        for t in range(9, 40):
            got.append(model(x[:, t:t + 1], cache=cache, pos0=torch.tensor([t]))[0][:, 0])
    torch.testing.assert_close(torch.stack(got, 1), full[:, 8:], rtol=1e-4, atol=1e-4)
    assert all(c.ki is None for c in cache)                                     # no index keys to cache
    assert (full - tiny().eval()(x)[0]).abs().max() > 1e-3                      # not the indexer's blocks


def test_random_decode_runs():
    """'random' draws afresh at every decoding step: generate runs, and with K * bs >= T it is the dense model's."""
    x = batch()[0][:, :11]
    out = tiny(msa_select="random").eval().generate(x, 6, temperature=0)
    assert out.shape == (2, 17) and torch.equal(out[:, :11], x) and int(out.max()) < 64
    every = tiny(msa_select="random", msa_topk=5).eval()
    dense = same_dense(every).eval()
    assert torch.equal(every.generate(x, 6, temperature=0), dense.generate(x, 6, temperature=0))


@pytest.mark.parametrize("rule", RULES)
def test_triton_backend_matches_ref(rule):
    """Both backends select with the same function: with the same RNG state, the same losses (the interpreter on a
    CPU, a tiny shape)."""
    ref, tri = tiny(msa_select=rule), tiny("triton", msa_select=rule)
    ref.to(DEVICE), tri.to(DEVICE)
    assert tri.backend is msa_triton
    x, y = (t[:1, :24].to(DEVICE) for t in batch())
    p = torch.rand(1, 24, 6).to(DEVICE)                                         # given: no host check for patches
    torch.manual_seed(3)
    _, want = ref(x, y, patches=p)
    torch.manual_seed(3)
    _, got = tri(x, y, patches=p)
    torch.testing.assert_close(got["lm"], want["lm"], rtol=1e-4, atol=1e-5)
    assert got["kl_layers"].numel() == 0
    got["lm"].backward()


@requires_cuda
@pytest.mark.parametrize("rule", RULES)
def test_blind_decode_in_a_cuda_graph(rule):
    """On a GPU, generate() captures a decode step in a CUDA graph: the blind selection (a fresh draw per replay for
    'random') runs inside it. 'local': every greedy token is the full forward's argmax there (up to rounding)."""
    model = tiny("triton", msa_select=rule).to("cuda").eval()
    x = batch()[0][:, :11].cuda()
    out = model.generate(x, 8, temperature=0)
    assert out.shape == (2, 19) and torch.equal(out[:, :11], x) and int(out.max()) < 64
    if rule == "local":
        with torch.no_grad():
            logits = model(out[:, :-1])[0][:, 10:].float()                     # (2, 8, V) predicting out[:, 11:]
        chosen = logits.gather(-1, out[:, 11:, None]).squeeze(-1)              # (2, 8)
        assert (logits.amax(-1) - chosen).max() < 1e-3
