"""report.py on tiny CPU runs: the curves of two arms, and a selection heatmap that equals the forward's selection."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import data
import report
from model import autocast
from test_checkpoint import evil_checkpoint, fails
from test_train import ROOT, train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-iteration MSA run and the same with --attention=dense (the tiny config of test_train)."""
    out = {arm: str(tmp_path_factory.mktemp(arm)) for arm in ("msa", "dense")}
    for arm, d in out.items():
        train(f"--out_dir={d}", "--max_iters=2", "--eval_interval=2", f"--attention={arm}")
    return out


def test_curves_png_and_summary(runs, tmp_path):
    png = tmp_path / "curves.png"
    r = subprocess.run([sys.executable, "report.py", "curves", runs["msa"], runs["dense"], f"--png={png}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = r.stdout.splitlines()
    msa, dense = [line for line in table if line.startswith("| msa")], [line for line in table if line.startswith("| dense")]
    assert len(msa) == len(dense) == 1
    assert msa[0].split("|")[2].strip() == "2"                      # the last eval was at iteration 2
    assert msa[0].split("|")[5].strip() != "-" and dense[0].split("|")[5].strip() == "-"  # recall: MSA arm only


def test_heatmap_is_the_forward_selection(runs, monkeypatch):
    """selection_maps recomputes the selection from hooked layer inputs; it must equal what the forward itself
    selected (recorded here by wrapping backend.index_topk), block by block."""
    model, cfg = report.load_model(runs["msa"])
    x, _, patches = data.get_batch("val", 1, cfg["seq_len"], np.random.default_rng(5), report.device, cfg["p_image"])
    seen = []
    original = model.backend.index_topk
    monkeypatch.setattr(model.backend, "index_topk", lambda *a, **kw: seen.append(original(*a, **kw)) or seen[-1])
    with torch.no_grad(), autocast(x.device):                          # as selection_maps runs it (bf16 on a GPU)
        model(x, patches=patches)
    n_forward = len(seen)
    maps = report.selection_maps(model, x, patches)
    assert n_forward == len(maps) == 1 and list(maps) == [1]            # layer 0 is dense, layer 1 is MSA
    m = maps[1]                                                         # (Hkv, nb, nb)
    T, bs, K = cfg["seq_len"], cfg["msa_block_size"], cfg["msa_topk"]
    nb = -(-T // bs)
    idx = seen[0][0].long()                                             # (Hkv, T, K) the forward's selection
    want = np.zeros((idx.shape[0], nb, nb))
    for g in range(idx.shape[0]):
        for t in range(T):
            for b in idx[g, t].tolist():
                if b >= 0:
                    want[g, t // bs, b] += 1 / bs
    np.testing.assert_allclose(m, want, atol=1e-6)
    assert np.allclose(np.diagonal(m, axis1=1, axis2=2), 1)             # the local block: always selected
    assert np.all(np.triu(m, 1) == 0)                                   # never a future block
    np.testing.assert_allclose(m.sum(-1), np.minimum(K, np.arange(nb) + 1)[None].repeat(m.shape[0], 0), atol=1e-5)


def test_heatmap_png(runs, tmp_path):
    png = tmp_path / "heat.png"
    r = subprocess.run([sys.executable, "report.py", "heatmap", f"--out_dir={runs['msa']}", f"--png={png}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,msg", [(["heatmap", "--out_dir=DENSE"], "has no MSA layer"),
                                      (["heatmap", "--out_dir=/nonexistent"], "ckpt.pt not found"),
                                      (["curves", "/nonexistent", "DENSE"], "log.jsonl not found"),
                                      (["curves", "DENSE"], "usage: python report.py"),
                                      (["heatmap", "--bins=3"], "unknown key 'bins'")])
def test_bad_input_gives_a_clear_message(runs, args, msg):
    with pytest.raises(SystemExit, match=msg):  # SystemExit(message): the user sees the message, no traceback
        report.main([a.replace("DENSE", runs["dense"]) for a in args])


def test_logs_and_checkpoints_of_other_runs_give_one_line(runs, tmp_path):
    """A log with no evaluation yet, a log with a damaged line inside, a checkpoint whose model_args this model.py
    does not know: one line each."""
    (tmp_path / "log.jsonl").write_text(json.dumps(dict(iter=1, lm=3.0, tok_s=1.0)) + "\n")
    png = f"--png={tmp_path / 'curves.png'}"
    with pytest.raises(SystemExit, match="log.jsonl holds no evaluation yet"):
        report.main(["curves", str(tmp_path), runs["dense"], png])
    (tmp_path / "log.jsonl").write_text('{"iter": 1}\nnot json\n{"iter": 2}\n')
    with pytest.raises(SystemExit, match="log.jsonl line 2: expected a JSON record of train.py"):
        report.main(["curves", str(tmp_path), runs["dense"], png])
    assert not (tmp_path / "curves.png").exists()                             # nothing drawn from a bad log
    ckpt = checkpoint.load(os.path.join(runs["dense"], "ckpt.pt"))
    ckpt["model_args"]["n_wings"] = 2
    checkpoint.save(str(tmp_path / "ckpt.pt"), ckpt)
    with pytest.raises(SystemExit, match="does not fit this model.py .written by another version"):
        report.main(["recall", f"--out_dir={tmp_path}"])


def test_max_pool_keeps_one_block_stripes():
    m = np.zeros((10, 10))
    m[:, 7] = 0.5                                                  # a one-block column stripe
    m[3, 3] = 1.0
    p = report.max_pool(m, 4)                                      # 10 -> 3 cells per side (last one padded)
    assert p.shape == (3, 3) and p[0, 0] == 1.0
    np.testing.assert_array_equal(p[:, 1], [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(report.max_pool(m, 1), m)


def test_recall_vs_best(runs):
    """At every position, the indexer recall equals the recall train.py logs (GPT.indexer_recall, computed there from
    the attention kernels' lse); the best recall equals a brute-force loop (the heaviest K-1 earlier blocks of the
    group's teacher plus the local block) and is at least the indexer's; with every block selectable both are 1."""
    model, cfg = report.load_model(runs["msa"])
    T, bs, K = cfg["seq_len"], cfg["msa_block_size"], cfg["msa_topk"]
    x, y, patches = data.get_batch("val", 1, T, np.random.default_rng(7), report.device, cfg["p_image"])
    tol = 1e-5 if report.device == "cpu" else 1e-2                       # a GPU computes the report under bf16 autocast
    (got, best), = report.recall_vs_best(model, x, patches, n_queries=T, chunk=5).values()
    with torch.no_grad(), autocast(x.device):
        logged = model.indexer_recall(x, patches)                           # (n_msa,), what train.py logs
        (h, pos), = report.msa_layer_inputs(model, x, patches).values()
        q, k, _ = model.blocks[1].attn.qkv(h, pos)                          # (1, Hq, T, D), (1, Hkv, T, D)
    assert got == pytest.approx(logged[0].item(), abs=tol)
    Hkv, G = k.shape[1], q.shape[1] // k.shape[1]
    want = []
    for g in range(Hkv):
        for t in range(T):
            p = (q[0, g * G:(g + 1) * G, t] @ k[0, g, :t + 1].T / q.shape[-1] ** 0.5).softmax(-1).mean(0)  # (t+1,)
            earlier = sorted((p[b * bs:(b + 1) * bs].sum().item() for b in range(t // bs)), reverse=True)
            want.append(p[t // bs * bs:].sum().item() + sum(earlier[:K - 1]))
    assert best == pytest.approx(np.mean(want), abs=tol) and got <= best + 1e-6
    model.cfg.msa_topk = -(-T // bs)                                     # every block: both recalls are 1
    (got_all, best_all), = report.recall_vs_best(model, x, patches, n_queries=16).values()
    assert got_all == pytest.approx(1.0, abs=tol) and best_all == pytest.approx(1.0, abs=tol)


def test_recall_cli(runs):
    r = subprocess.run([sys.executable, "report.py", "recall", f"--out_dir={runs['msa']}", "--n_queries=8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    row = [line for line in r.stdout.splitlines() if line.startswith("| 1 |")]
    assert len(row) == 1 and 0 <= float(row[0].split("|")[2]) <= float(row[0].split("|")[3]) <= 1
    r = subprocess.run([sys.executable, "report.py", "recall", f"--out_dir={runs['dense']}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no MSA layer" in r.stderr


@pytest.mark.parametrize("mode", ["heatmap", "recall"])
def test_checkpoint_that_runs_code_is_refused(tmp_path, mode):
    marker = tmp_path / "created"
    evil_checkpoint(tmp_path / "ckpt.pt", marker)
    line = fails("report.py", mode, f"--out_dir={tmp_path}")
    assert line.startswith(f"report error: {tmp_path / 'ckpt.pt'}: expected a checkpoint") and "posix.system" in line
    assert not marker.exists()
