"""report.py's retrieval modes (mqar, needle, niah) and sample.py --demo=recall on tiny CPU runs trained with
recall rows: they run end to end, their tables hold what recall_eval computes, bad input gets one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data
import recall_eval
import report
from test_train import ROOT, run_script, train

RUN = ["--max_iters=2", "--eval_interval=2", "--p_mqar=0.5", "--eval_captions=0", "--eval_long_range=0", "--eval_mqar=2",
       "--repeat_iters=1", "--short_len=32"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three 2-iteration arms of the tiny config of test_train: dense, MSA with the indexer, MSA with 'local'."""
    out = {arm: str(tmp_path_factory.mktemp(arm.replace(" ", "-"))) for arm in ("dense", "msa indexer", "msa local")}
    for arm, d in out.items():
        train(f"--out_dir={d}", *RUN, "--attention=dense" if arm == "dense" else f"--msa_select={arm.split()[1]}")
    return out


def cli(*args):
    r = subprocess.run([sys.executable, "report.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def is_png(path, least=10_000):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > least


def test_mqar_plot_and_table(runs, tmp_path):
    png = tmp_path / "mqar.png"
    out = cli("mqar", *runs.values(), f"--png={png}", "--mqar_questions=40")
    assert is_png(png)
    for d in runs.values():  # what the third panel draws: each evaluation's recall and warm-up rows' accuracy
        (it, acc), (it_w, warm) = report.through_training(report.read_log(d)[1])
        assert it == it_w == [0, 2] and all(0 <= a <= 1 for a in acc + warm)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| arm")}
    assert set(rows) == {"dense", "msa indexer", "msa local", "questions"}
    for arm, d in runs.items():
        cells = rows[arm]
        evals = [json.loads(line) for line in open(os.path.join(d, "log.jsonl")) if '"eval"' in line]
        assert cells[0] == d and cells[1] == "2" and float(cells[2]) == pytest.approx(evals[-1]["lm"], abs=1e-4)
        assert float(cells[3].replace(",", "")) > 0                     # training tokens/s after the short rows
        cells = cells[:3] + cells[4:]
        assert 0 <= float(cells[3]) <= 1 and len(cells) == 4 + 8 + 4
        assert all((c == "-") == (arm == "dense") for c in cells[-4:])    # needle columns: MSA arms only
    assert rows["questions"][4] == "40" and sum(map(int, rows["questions"][5:13])) == 40  # 20 rows of 64 tokens
    # the local arm's needle recall is what recall_eval computes for its model on the same rows
    model, cfg = report.load_model(runs["msa local"])
    want = recall_eval.mqar_eval(model, 20, 64, seed=0)
    assert rows["msa local"][-4] == f"{np.mean(want['needle_recall']):.2f}"
    assert rows["msa local"][-2] == f"{want['needle_any'][0]:.2f}"


def test_recall_through_training_reads_the_log():
    """report.through_training: the recall accuracy and the warm-up rows' accuracy at each evaluation that has them."""
    evals = [dict(eval=0, lm=9.0), dict(eval=2, mqar=dict(acc=0.25), repeat=0.5), dict(eval=4, mqar=dict(acc=1.0))]
    assert report.through_training(evals) == (([2, 4], [0.25, 1.0]), ([2], [0.5]))
    assert report.through_training(evals[:1]) == (([], []), ([], []))


def test_needle_figure(runs, tmp_path, capsys, monkeypatch):
    png = tmp_path / "needle.png"
    out = cli("needle", f"--out_dir={runs['msa indexer']}", f"--png={png}", "--question=0")
    assert is_png(png, 5_000) and "layer 1 group 0:" in out and "truth" in out
    monkeypatch.setattr(report, "question", -1)
    e = report.plot_needle(runs["msa indexer"], str(tmp_path / "far.png"))
    (row, tasks), = data.mqar_eval_set(1, 64, seed=0)
    assert (e["q"], e["f"]) == max(((q, f) for q, _, f in tasks), key=lambda t: t[0] - t[1])   # the farthest
    assert e["needle"] == (e["f"] + 1) // 8 and e["local"] == e["q"] // 8
    assert e["hit"][1] == [e["needle"] in e["blocks"][1][0]] and e["blocks"][1][0][-1] == e["local"]
    assert e["mass"][1].shape == (1, e["local"] + 1) and e["mass"][1].sum() == pytest.approx(1, abs=1e-5)


def test_niah_table_and_heatmap(runs, tmp_path):
    png = tmp_path / "niah.png"
    out = cli("niah", runs["dense"], runs["msa indexer"], f"--png={png}", "--niah_rows=1", "--niah_scales=0.5,2")
    assert is_png(png)
    rows = [line for line in out.splitlines() if line.startswith("| 32 |") or line.startswith("| 128 |")]
    assert len(rows) == 4 and all(len(r.split("|")) == 10 + 4 + 1 for r in rows)
    assert rows[0].split("|")[-3].strip() == "-" and rows[2].split("|")[-3].strip() != "-"  # needle recall: MSA only
    assert all(float(r.split("|")[-2].replace(",", "")) > 0 for r in rows)                # tokens/s


@pytest.mark.parametrize("args,msg", [(["mqar", "/nonexistent"], "log.jsonl not found"),
                                      (["mqar", "EMPTYLOG"], "holds no evaluation"),
                                      (["mqar"], "usage: python report.py"),
                                      (["needle", "--out_dir=DENSE"], "has no MSA layer"),
                                      (["needle", "--out_dir=MSA", "--question=9"],
                                       r"question must be -1 \(the farthest\) or in \[0, 2\), got 9"),
                                      (["niah", "DENSE", "--niah_scales=0,1"], "niah_scales must be positive numbers"),
                                      (["niah", "DENSE", "--niah_scales=0.01"], "expected n >= 8 tokens"),
                                      (["niah", "/nonexistent"], "ckpt.pt not found")])
def test_bad_input_gives_a_clear_message(runs, tmp_path, monkeypatch, args, msg):
    (tmp_path / "log.jsonl").write_text(json.dumps(dict(iter=1, lm=1.0)) + "\n")
    swap = {"DENSE": runs["dense"], "MSA": runs["msa indexer"], "EMPTYLOG": str(tmp_path)}  # a log without evals
    for k in ("niah_scales", "question"):
        monkeypatch.setattr(report, k, getattr(report, k))                # main() sets them: restored after
    for k, v in swap.items():
        args = [a.replace(k, v) for a in args]
    with pytest.raises(SystemExit, match=msg):
        report.main(args)


def test_sample_recall_demo(runs, capsys):
    run_script("sample.py", f"--out_dir={runs['msa indexer']}", "--demo=recall", "--demo_len=200", "--question=1")
    out = capsys.readouterr().out
    (row, tasks), = data.mqar_eval_set(1, 200, seed=1337)                 # sample.py's seed
    q, a, f = tasks[1]
    assert f"holding {len(tasks)} facts" in out and f"fact at token {f} " in out and f"question at token {q} " in out
    assert f"truth {data.decode(a.tolist())!r}" in out and "layer 1 group 0:" in out
    run_script("sample.py", f"--out_dir={runs['dense']}", "--demo=recall")
    assert "no MSA layer" in capsys.readouterr().out
    for args, msg in [(["--demo=recal"], "--demo must be '' \\(sampling\\) or 'recall', got 'recal'"),
                      (["--demo=recall", "--demo_len=9"], "--demo=recall: mqar_row: n=9 tokens hold at most 0 pairs"),
                      (["--demo=recall", "--question=7"], "--demo=recall: question must be -1")]:
        with pytest.raises(SystemExit, match=msg):
            run_script("sample.py", f"--out_dir={runs['msa indexer']}", *args)
