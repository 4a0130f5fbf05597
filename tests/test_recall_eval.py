"""recall_eval on tiny random models: the machinery, not the answers. Accuracy against an oracle and a hand-computed
case, the distance bins, needle recall against the forward's own block_idx and blind rules' known blocks, the
teacher's block mass against brute force, and the needle grid."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import msa_ref
import recall_eval
from test_model import tiny


def lm(**kw):
    """A tiny model that reads GPT-2 tokens (blocks of 4, K=3: really sparse on rows of 64-128 tokens)."""
    return tiny(vocab_size=data.VOCAB_SIZE, img_patch_id=data.IMG_PATCH, **kw).eval()


def oracle_logits(x, at, wrong=lambda t: False):
    """The induction step done by hand: at each position t of at (B, P), a one-hot on the token after the previous
    occurrence of the bigram (x[t - 1], x[t]); on a token one higher where wrong(t)."""
    logits = torch.zeros(*at.shape, data.VOCAB_SIZE)
    for b in range(at.shape[0]):
        row = x[b].tolist()
        for p, t in enumerate(at[b].tolist()):
            j = max(j for j in range(1, t) if row[j - 1:j + 1] == row[t - 1:t + 1])
            logits[b, p, row[j + 1] + wrong(t)] = 1.0
    return logits


def with_oracle(monkeypatch, wrong=lambda t: False):
    real = recall_eval.run_model

    def run(model, x, at=None, patches=None):
        logits, inputs = real(model, x, at, patches)
        return oracle_logits(x, at, wrong), inputs
    monkeypatch.setattr(recall_eval, "run_model", run)


def mixed_rows(n):
    """Recall rows and needle rows of one length: 4 questions a row, or one (score pads them into a batch)."""
    return data.mqar_eval_set(3, n, seed=2) + data.niah_eval_set(2, n, 0.5, seed=2)


def test_oracle_answers_everything(monkeypatch):
    n = 128
    rows = mixed_rows(n)
    with_oracle(monkeypatch)
    s = recall_eval.score(lm(), rows, batch_size=2)                       # batches of 2, 2 and 1 rows
    N = sum(len(t) for _, t in rows)
    assert N == 3 * n // data.MQAR_EVERY + 2 and s["correct"].shape == (N,) and s["correct"].all()
    assert list(s["distance"]) == [q - f for _, tasks in rows for q, _, f in tasks]
    res = recall_eval.summarize(s)
    assert res["acc"] == 1.0 and res["questions"] == N and sum(res["count_bins"]) == N
    assert all(a == 1.0 for a in res["acc_bins"] if a is not None)
    assert s["tokens"] == len(rows) * n and s["seconds"] > 0 and s["layers"] == [1, 2]


def test_repeat_eval_counts_the_copied_tokens(monkeypatch):
    """repeat_eval: 1 for an oracle of the next token, 0 for one a token off, in [0, 1] for a real tiny model; the
    copied tokens are the ones counted (an oracle right only there still scores 1)."""
    n, rows = 40, data.repeat_eval_set(5, 41, seed=3)
    real = recall_eval.run_model
    for off, only_copies, want in ((0, False, 1.0), (1, False, 0.0), (0, True, 1.0)):
        def run(model, x, at=None, patches=None, off=off, only_copies=only_copies):
            assert torch.equal(x, torch.stack([torch.from_numpy(r[:-1]) for r, _ in rows]))  # one batch of the 5 rows
            nxt = torch.stack([torch.from_numpy(r[1:]) for r, _ in rows])                      # (5, n) the next tokens
            if only_copies:  # wrong wherever the next token is not a copied one
                nxt = torch.where(torch.stack([torch.from_numpy(m[1:]) for _, m in rows]), nxt, nxt + 1)
            return F.one_hot(nxt + off, data.VOCAB_SIZE + 1).float(), {}
        monkeypatch.setattr(recall_eval, "run_model", run)
        assert recall_eval.repeat_eval(lm(), 5, n, seed=3, batch_size=5) == want
    monkeypatch.setattr(recall_eval, "run_model", real)
    assert 0 <= recall_eval.repeat_eval(lm(), 3, n, seed=3, batch_size=2) <= 1


def test_accuracy_and_bins_by_hand(monkeypatch):
    """The oracle is wrong at odd positions: accuracy overall and per bin equal a direct count."""
    n, n_bins = 128, 5
    rows = mixed_rows(n)
    with_oracle(monkeypatch, wrong=lambda t: t % 2)
    res = recall_eval.summarize(recall_eval.score(lm(), rows, batch_size=3), n_bins)
    qs = [(q, q - f) for _, tasks in rows for q, _, f in tasks]
    assert res["acc"] == pytest.approx(np.mean([q % 2 == 0 for q, _ in qs]))
    assert res["bin_edges"] == [0, 25.6, 51.2, 76.8, 102.4, 128]
    for i in range(n_bins):
        lo, hi = res["bin_edges"][i:i + 2]
        inside = [q % 2 == 0 for q, d in qs if lo <= d < hi]
        assert res["count_bins"][i] == len(inside)
        assert res["acc_bins"][i] == (pytest.approx(np.mean(inside)) if inside else None)
    assert 0 < res["acc"] < 1 and sum(res["count_bins"]) == len(qs)


def test_run_model_logits_are_the_forwards():
    model = lm()
    x = torch.from_numpy(np.stack([r for r, _ in data.mqar_eval_set(2, 64, seed=3)]))  # (2, 64)
    at = torch.tensor([[5, 63, 0], [17, 17, 40]])
    logits, inputs = recall_eval.run_model(model, x, at)
    full = model(x)[0]                                                     # (2, 64, V)
    torch.testing.assert_close(logits, full.gather(1, at[..., None].expand(-1, -1, full.shape[-1])))
    assert sorted(inputs) == [1, 2] and all(h.shape == (2, 64, 32) and pos.shape == (64,) for h, pos in inputs.values())
    assert recall_eval.run_model(model, x)[0] is None
    assert not model.norm_f._forward_hooks and not model.blocks[1].attn._forward_hooks  # hooks removed


def test_needle_recall_is_the_forwards_selection(monkeypatch):
    """hit[b, p, l, g] is whether the block of f + 1 is in the block_idx that the forward itself computed (recorded
    by wrapping index_topk) for the question's position; selection_at returns those blocks."""
    model = lm()
    rows = data.mqar_eval_set(2, 96, seed=4)
    x = torch.from_numpy(np.stack([r for r, _ in rows]))
    q = torch.tensor([[t[0] for t in tasks] for _, tasks in rows])        # (2, 3)
    f = torch.tensor([[t[2] for t in tasks] for _, tasks in rows])
    seen, original = [], msa_ref.index_topk
    monkeypatch.setattr(msa_ref, "index_topk", lambda *a, **kw: seen.append(original(*a, **kw)) or seen[-1])
    with torch.no_grad():
        model(x)
    forward = seen[:]                                                      # one block_idx per MSA layer
    _, inputs = recall_eval.run_model(model, x, q)
    hit, mass = recall_eval.needle_stats(model, inputs, q, f)              # (2, 3, 2, 2)
    sel = recall_eval.selection_at(model, inputs, q)
    assert len(forward) == 2 and hit.shape == mass.shape == (2, 3, 2, 2)
    for l, layer in enumerate([1, 2]):
        for b in range(2):
            for p in range(3):
                for g in range(2):
                    blocks = forward[l][b, g, q[b, p]].tolist()
                    assert sel[layer][b, g, p].tolist() == blocks
                    assert hit[b, p, l, g].item() == ((f[b, p].item() + 1) // 4 in blocks)
    assert 0 < hit.float().mean() < 1                                      # really sparse: some hits, some misses


@pytest.mark.parametrize("K", [1, 2, 3])
def test_needle_recall_of_the_local_rule(K):
    """A blind rule's blocks are known: 'local' reads block 0, the K - 2 blocks before the local one and the local
    block (every visible block while it is among the first K)."""
    n, bs = 128, 4
    rows = data.mqar_eval_set(2, n, seed=5) + data.niah_eval_set(3, n, 0.1, seed=5)
    s = recall_eval.score(lm(msa_select="local", msa_topk=K), rows, batch_size=4)
    want = []
    for _, tasks in rows:
        for q, _, f in tasks:
            nb, lb = (f + 1) // bs, q // bs
            want.append(nb == lb or lb < K or (K >= 2 and (nb == 0 or nb > lb - K + 1)))
    assert s["hit"].shape == (len(want), 2, 2)
    np.testing.assert_array_equal(s["hit"], np.array(want)[:, None, None].repeat(2, 1).repeat(2, 2))


def test_every_block_selected_finds_every_needle():
    """K covering every block: the oracle selection; needle recall is 1 in every layer and group."""
    res = recall_eval.mqar_eval(lm(msa_topk=32), 2, 128, seed=6)
    assert np.array(res["needle_recall"]).shape == (2, 2) and np.all(np.array(res["needle_recall"]) == 1.0)
    assert all(r is None or r == [1.0, 1.0] for r in res["needle_recall_bins"])


def test_teacher_block_mass_against_brute_force():
    model = lm()
    x = torch.from_numpy(data.mqar_eval_set(1, 70, seed=7)[0][0][None])   # T=70: the last block is partial
    at = torch.tensor([[0, 3, 4, 37, 69]])
    _, inputs = recall_eval.run_model(model, x, at)
    mass = recall_eval.teacher_block_mass(model, inputs, at, chunk=2)      # chunks of 2 queries
    for i, (h, pos) in inputs.items():
        q, k, _ = model.blocks[i].attn.qkv(h, pos)                         # (1, 4, T, 8), (1, 2, T, 8)
        assert mass[i].shape == (1, 2, 5, 18)
        for g in range(2):
            for p, t in enumerate(at[0].tolist()):
                heads = [(q[0, h_, t] @ k[0, g, :t + 1].T / 8 ** 0.5).softmax(-1) for h_ in (2 * g, 2 * g + 1)]
                w = torch.stack(heads).mean(0)                             # (t + 1,)
                want = torch.zeros(18).index_add_(0, torch.arange(t + 1) // 4, w)
                torch.testing.assert_close(mass[i][0, g, p], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mass[i].sum(-1), torch.ones(1, 2, 5))


def test_accuracy_split_by_whether_some_group_reads_the_needle():
    """summarize: needle_any is the share of questions whose fact's block some group of the layer reads; acc_read
    and acc_missed the accuracy on those questions and on the rest (None where there are none)."""
    hit = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 0]], [[0, 1], [1, 1]], [[1, 1], [0, 0]]], bool)  # (N=4, L=2, Hkv=2)
    s = dict(n=64, layers=[1, 2], hit=hit, mass=hit.astype(np.float32), correct=np.array([1, 0, 1, 0], bool),
             distance=np.array([3, 10, 40, 60]))
    r = recall_eval.summarize(s)
    assert r["needle_any"] == [0.75, 0.25]
    assert r["acc_read"] == [2 / 3, 1.0] and r["acc_missed"] == [0.0, 1 / 3]
    s["hit"] = np.ones_like(hit)
    assert recall_eval.summarize(s)["acc_missed"] == [None, None]
    assert "accuracy when some group reads it / when none does 0.50/- 0.50/-" in recall_eval.summary_line(
        recall_eval.summarize(s))


def test_dense_model_has_no_needle_recall():
    s = recall_eval.score(lm(attention="dense"), data.mqar_eval_set(2, 64, seed=8))
    assert s["layers"] == [] and s["hit"].shape == (4, 0, 2)
    res = recall_eval.summarize(s)
    assert res["needle_recall"] == res["needle_mass"] == res["needle_recall_bins"] == res["needle_any"] == []


def test_niah_grid():
    grid = recall_eval.niah_grid(lm(), [32, 80], depths=(0.0, 0.5, 0.9), n_rows=3, max_tokens=100)
    assert grid["lengths"] == [32, 80] and grid["depths"] == [0.0, 0.5, 0.9]
    assert np.array(grid["acc"]).shape == np.array(grid["needle_recall"]).shape == (2, 3)
    assert all(v > 0 for v in grid["tok_s"])
    full = recall_eval.niah_grid(lm(msa_topk=20), [80], depths=(0.0, 0.9), n_rows=2)
    assert full["needle_recall"] == [[1.0, 1.0]]                           # K covers all 20 blocks
    assert recall_eval.niah_grid(lm(attention="dense"), [40], depths=(0.5,), n_rows=1)["needle_recall"] == [None]


def test_rows_of_several_lengths_are_refused():
    with pytest.raises(ValueError, match=r"expected rows of one length, got lengths \[64, 65\]"):
        recall_eval.score(lm(), data.mqar_eval_set(1, 64) + data.mqar_eval_set(1, 65))
