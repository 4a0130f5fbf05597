"""train.py end to end at a tiny size: exact resume, and clear messages for bad config and checkpoints."""
import json
import os
import runpy
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
from configurator import configure, read_config_file
from model import gpu_peak_flops
from test_checkpoint import evil_checkpoint, fails

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["config/train_cpu.py", "--n_layer=2", "--n_head=2", "--n_kv_head=1", "--n_embd=32", "--index_dim=8",
        "--msa_block_size=8", "--msa_topk=2", "--n_expert=4", "--expert_hidden=32", "--seq_len=64", "--batch_size=2",
        "--gradient_accumulation_steps=2", "--lr_decay_iters=4", "--warmup_iters=1", "--kl_warmup_iters=1",
        "--eval_interval=4", "--eval_iters=1", "--eval_captions=1", "--eval_long_range=1", "--log_interval=1"]


def train(*args, **env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_extra)  # tiny model: one thread is faster, and fair to CI
    r = subprocess.run([sys.executable, "train.py", *TINY, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def run_script(script, *args):
    """Run train.py or sample.py in this process (no interpreter start-up) with these arguments."""
    saved = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = saved


def records(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight"))
    train(f"--out_dir={out}", "--max_iters=4")
    return out


def test_blind_selection_trains(tmp_path):
    """--msa_select=local: a blind control trains (no KL: none logged per layer) and evaluates (captions and the
    long-range questions decode through the caches with the same selection)."""
    out = str(tmp_path)
    r = train(f"--out_dir={out}", "--max_iters=2", "--eval_interval=2", "--msa_select=local")
    assert "(local selection: a blind control, no KL)" in r.stdout
    recs = records(out)
    assert all(rec["kl"] == 0 for rec in recs) and [len(rec["kl_layers"]) for rec in recs if "eval" in rec] == [0, 0]
    assert all(0 < rec["recall_layers"][0] < 1 for rec in recs if "eval" in rec)


def test_resume_continues_exactly(straight, tmp_path):
    out = str(tmp_path)
    train(f"--out_dir={out}", "--max_iters=2")
    with open(os.path.join(out, "log.jsonl"), "a") as f:  # as if the run had gone on past its last checkpoint,
        f.write(json.dumps(dict(iter=3, lm=-1.0)) + "\n" + json.dumps(dict(eval=4, lm=-1.0)) + "\n")
        f.write('{"iter": 4, "lm": 3.')                  # and crashed in the middle of an append
    r = train(f"--out_dir={out}", "--max_iters=4", "--init_from=resume")
    assert "resumed from" in r.stdout and "iteration 2" in r.stdout and "its last line was cut short" in r.stdout
    drop_speed = lambda recs: [{k: v for k, v in rec.items() if k not in ("tok_s", "mfu")} for rec in recs]
    want, got = drop_speed(records(straight)), drop_speed(records(out))
    steps = [rec for rec in want if rec.get("iter", 0) > 2 or rec.get("eval", 0) > 2]
    assert len(steps) == 3  # iterations 3, 4 and the eval at 4
    assert steps == [rec for rec in got if rec.get("iter", 0) > 2 or rec.get("eval", 0) > 2]  # bitwise equal losses
    assert [rec["lm"] for rec in want if "iter" in rec][:2] == [rec["lm"] for rec in got if "iter" in rec][:2]
    # each iteration and evaluation logged once (the records past the checkpoint were dropped); the short run
    # evaluated at its last iteration, 2, which the straight run does not
    assert [rec for rec in got if rec.get("eval") != 2] == want
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))


def test_deterministic_setting_trains_the_same(straight, tmp_path):
    """--deterministic=True (deterministic kernels only: bitwise resume on a GPU) trains, and on a CPU, whose kernels
    are deterministic anyway, logs the very losses of the default run."""
    out = str(tmp_path)
    train(f"--out_dir={out}", "--max_iters=2", "--deterministic=True")
    losses = lambda recs: [(rec["loss"], rec["lm"], rec["kl"]) for rec in recs if "iter" in rec]
    assert losses(records(out)) == losses(records(straight))[:2]


def test_two_processes_match_one_with_accumulation(straight, tmp_path):
    """DDP, gloo between 2 CPU processes (GPUs hidden: it runs on any machine, one GPU or none): 2 processes x 1
    micro-step train on the same batches as 1 process x 2, so every logged loss and eval matches (the data
    position is a function of seed, iteration and micro-step)."""
    hide = dict(CUDA_VISIBLE_DEVICES="")
    one_dir = straight
    if torch.cuda.is_available():  # `straight` ran on the GPU: the one-process side must run on the CPU too
        one_dir = str(tmp_path / "one")
        train(f"--out_dir={one_dir}", "--max_iters=4", **hide)
    env = dict(os.environ, OMP_NUM_THREADS="1", **hide)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *TINY, f"--out_dir={tmp_path / 'two'}", "--max_iters=4"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    one, two = records(one_dir), records(str(tmp_path / "two"))
    assert [sorted(a) for a in one] == [sorted(b) for b in two] and len(one) == 6  # 2 evals, 4 iterations
    for a, b in zip(one, two):
        for k in ("loss", "lm", "kl", "balance"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a, b)
        if "recall_layers" in a:  # eval records only (the keys of a and b are equal, asserted above)
            assert a["recall_layers"] == pytest.approx(b["recall_layers"], rel=1e-5), (a, b)


def script_globals(*args):
    """Run train.py in this process with these arguments and return its globals (after training)."""
    saved = sys.argv
    sys.argv = ["train.py", *args]
    try:
        return runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    finally:
        sys.argv = saved


def test_mfu_counts_the_models_flops(tmp_path):
    """The MFU's FLOPs per token are the model's own count (GPT.flops_per_token, checked against a hand count in
    test_model.py) at train.py's seq_len, with and without the dense KL warm-up and the MSA layers' dense phase."""
    g = script_globals(*TINY, f"--out_dir={tmp_path}", "--max_iters=0")
    model = g["raw_model"]
    both = [(kd, md) for kd in (False, True) for md in (False, True)]
    assert g["fpt"] == {(64, kd, md): model.flops_per_token(64, kd, md) for kd, md in both}
    assert g["fpt"][64, True, True] > g["fpt"][64, True, False] > g["fpt"][64, False, False] > 0
    g = script_globals(*TINY, f"--out_dir={tmp_path}", "--max_iters=0", "--short_len=16", "--short_iters=2")  # short rows
    assert g["fpt"] == {(n, kd, md): model.flops_per_token(n, kd, md) for n in (16, 32, 64) for kd, md in both}


def same(a, b):
    """a and b equal, element for element, through tuples, lists and dicts of tensors, arrays and plain values."""
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_evaluation_sets_do_not_depend_on_the_seed(tmp_path, monkeypatch):
    """Runs of two seeds start from other weights but are scored on the same held-out examples (train.EVAL_SEED):
    the val batches, the captions' images, the long-range questions and the recall rows."""
    import data
    seen = []

    def recording(fn, name):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            if name != "get_batch" or args[0] == "val":
                seen[-1].append((name, out))
            return out
        return wrapped
    names = ("get_batch", "caption_eval_set", "long_range_eval_set", "mqar_eval_set")
    for name in names:
        monkeypatch.setattr(data, name, recording(getattr(data, name), name))
    weights = []
    for s in (1, 2):
        seen.append([])
        g = script_globals(*TINY, f"--out_dir={tmp_path / str(s)}", "--max_iters=0", f"--seed={s}", "--p_mqar=0.5",
                           "--eval_mqar=1")
        weights.append(g["raw_model"].lm_head.weight.detach().clone())
    assert not torch.equal(*weights)                                           # the seed still sets the weights
    assert [n for n, _ in seen[0]] == [n for n, _ in seen[1]] and {n for n, _ in seen[0]} == set(names)
    for (name, a), (_, b) in zip(*seen):
        assert same(a, b), f"{name} differs between the seeds"


def test_recall_config_is_really_sparse():
    """config/train_recall.py: rows of at least 8K tokens, each MSA query reading at most 1/16 of them, and short
    rows (the warm-up, the doublings) that divide the tokens of an iteration."""
    from configurator import read_config_file
    c = read_config_file(os.path.join(ROOT, "config", "train_recall.py"))
    assert c["seq_len"] >= 8192 and 16 * c["msa_topk"] * c["msa_block_size"] <= c["seq_len"]
    assert c["repeat_iters"] > 0 and c["short_iters"] > 0 and c["p_mqar"] > 0 and c["eval_mqar"] > 0
    n = c["short_len"]
    while n < c["seq_len"]:
        assert c["batch_size"] * c["seq_len"] % n == 0
        n *= 2


def test_msa_dense_phase(tmp_path):
    """--msa_dense_iters: the first iterations run the MSA layers densely (logged as dense-msa), then sparse."""
    r = train(f"--out_dir={tmp_path}", "--max_iters=3", "--msa_dense_iters=2", "--kl_warmup_iters=0",
              "--eval_interval=10")
    assert [("dense-msa" in line) for line in r.stdout.splitlines() if line.startswith("iter ")] == [True, True, False]


def test_short_row_stages(tmp_path):
    """--repeat_iters / --short_iters: the first iterations draw short rows (the same tokens per micro-batch): induction
    warm-up rows only, then the usual mixture in rows that double; then rows of seq_len. A run resumed inside the stages continues
    exactly."""
    stages = ["--repeat_iters=2", "--short_iters=1", "--short_len=32", "--p_mqar=0.5", "--eval_interval=4"]
    g = script_globals(*TINY, *stages, f"--out_dir={tmp_path}/g", "--max_iters=0")
    for it in (0, 1):  # every row a repeat row: 4 rows of 32, targets only in their second halves
        x, y, p = g["train_batch"](it, 1)
        assert x.shape == y.shape == (4, 32) and (y[:, :15] < 0).all() and (y[:, 16:] >= 0).float().mean() > 0.7
    x, y, _ = g["train_batch"](2, 0)                                             # the mixture, in short rows
    assert x.shape == (4, 32) and (y[:, :15] >= 0).any()
    assert g["train_batch"](3, 0)[0].shape == (2, 64)
    # the rows double from short_len: 16 and 32 tokens, an equal share of short_iters each, then seq_len
    g = script_globals(*TINY, "--repeat_iters=1", "--short_iters=4", "--short_len=16", f"--out_dir={tmp_path}/r",
                       "--max_iters=0")
    assert [g["row_len"](it) for it in range(7)] == [16, 16, 16, 32, 32, 64, 64]
    assert g["train_batch"](3, 0)[0].shape == (4, 32) and g["train_batch"](1, 0)[0].shape == (8, 16)
    out = str(tmp_path / "straight")
    r = train(f"--out_dir={out}", "--max_iters=4", *stages)
    assert ("short rows for 3 iterations: 2 of induction warm-up rows of 32 tokens, then 1 in rows of 32 tokens; then "
            "rows of 64") in r.stdout
    assert [("rows of 32" in line) for line in r.stdout.splitlines() if line.startswith("iter ")] == [True] * 3 + [False]
    evals = [rec for rec in records(out) if "eval" in rec]                      # the warm-up rows' accuracy, logged
    assert [rec["eval"] for rec in evals] == [0, 4] and all(0 <= rec["repeat"] <= 1 for rec in evals)
    assert sum("| warm-up rows " in line for line in r.stdout.splitlines()) == 2
    part = str(tmp_path / "resumed")
    train(f"--out_dir={part}", "--max_iters=2", "--eval_interval=2", *stages[:-1])
    train(f"--out_dir={part}", "--max_iters=4", "--init_from=resume", *stages)
    losses = lambda d: [rec["loss"] for rec in records(d) if "iter" in rec]
    assert losses(part) == losses(out) and len(losses(out)) == 4


def test_log_holds_eval_metrics(straight):
    ev = [rec for rec in records(straight) if "eval" in rec]
    assert [rec["eval"] for rec in ev] == [0, 4]
    last = ev[-1]
    assert set(last["caption"]) == {"size", "colour", "shape", "position", "all"}
    assert len(last["kl_layers"]) == 1 and len(last["expert_load"]) == 2 and 0 <= last["long_range"] <= 1
    assert len(last["recall_layers"]) == 1 and 0 < last["recall_layers"][0] <= 1 + 1e-6
    assert "repeat" not in last                                             # no warm-up rows in this run: not evaluated
    steps = [rec for rec in records(straight) if "iter" in rec]
    # an MFU only against a known peak: on a GPU that gpu_peak_flops knows, never on a CPU
    peak = torch.cuda.is_available() and gpu_peak_flops(torch.cuda.get_device_name()) is not None
    assert all(rec["tok_s"] > 0 and (0 < rec["mfu"] < 1 if peak else "mfu" not in rec) for rec in steps)


def test_compile_setting_and_mfu_peak(tmp_path, capsys):
    """--compile=True compiles the model on a GPU (lazily: these 0 iterations compile nothing) and is skipped with
    a message on a CPU; CUDA graphs ('reduce-overhead') in one process, gradient accumulation (TINY's 2 micro-steps)
    included; the MFU's peak is the GPU's (or --peak_flops), and on a CPU there is none."""
    g = script_globals(*TINY, f"--out_dir={tmp_path}", "--max_iters=0", "--compile=True")
    out = capsys.readouterr().out
    assert g["graphs"] == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert isinstance(g["model"], torch._dynamo.eval_frame.OptimizedModule) and "compile: skipped" not in out
        assert "compile: mode" not in out
        g = script_globals(*TINY, f"--out_dir={tmp_path / 'a'}", "--max_iters=0", "--compile=True",
                           "--compile_mode=default")
        assert not g["graphs"] and "compile: mode" not in capsys.readouterr().out
        assert g["peak"] == gpu_peak_flops(torch.cuda.get_device_name()) and ("MFU against" in out) == bool(g["peak"])
        g = script_globals(*TINY, f"--out_dir={tmp_path / 'b'}", "--max_iters=0", "--peak_flops=1e14")
        assert g["peak"] == 1e14 and "MFU against 100.0 TFLOP/s" in capsys.readouterr().out
    else:
        assert "compile: skipped on the CPU" in out and g["model"] is g["raw_model"]
        assert g["peak"] is None and "MFU" not in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphs_accumulate_the_gradients_of_every_micro_step(tmp_path):
    """Under CUDA graphs with TINY's 2 micro-steps an iteration, the optimizer gets the sum of both micro-steps'
    gradients, as it does compiled without graphs: after one iteration AdamW's first moments (0.1 x that sum) agree.
    (Without train.py's fold_grads a replay overwrites the first micro-step's gradients before autograd adds to them.)"""
    moments = []
    for mode in ("reduce-overhead", "default"):
        train(f"--out_dir={tmp_path / mode}", "--max_iters=1", "--compile=True", f"--compile_mode={mode}")
        state = checkpoint.load(str(tmp_path / mode / "ckpt.pt"))["optimizer"]["state"]
        moments.append([state[i]["exp_avg"] for i in sorted(state)])
    assert len(moments[0]) == len(moments[1]) > 0
    for a, b in zip(*moments):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-8)


@pytest.mark.parametrize("change, what", [("--n_embd=48", "n_embd: checkpoint 32 vs config 48"),
                                          ("--learning_rate=0.5", "learning_rate: checkpoint 0.003 vs config 0.5"),
                                          ("--seed=2", "seed: checkpoint 1337 vs config 2"),
                                          ("--p_mqar=0.5", "p_mqar: checkpoint 0.0 vs config 0.5")])
def test_checkpoint_from_another_config(straight, change, what):
    """A resume continues the run exactly, so the model and what sets the batches and the schedule must be the
    checkpoint's (max_iters may grow: the other resume tests)."""
    with pytest.raises(SystemExit, match=f"comes from another config .{what}"):
        run_script("train.py", *TINY, f"--out_dir={straight}", "--max_iters=6", "--init_from=resume", change)


def test_checkpoint_older_than_a_config_key_resumes(straight, tmp_path, capsys):
    # a checkpoint written before GPTConfig had a key (here index_fp8) holds that key's default: it resumes
    ckpt = checkpoint.load(os.path.join(straight, "ckpt.pt"), resume=True)
    del ckpt["model_args"]["index_fp8"]
    checkpoint.save(os.path.join(tmp_path, "ckpt.pt"), ckpt)
    run_script("train.py", *TINY, f"--out_dir={tmp_path}", "--max_iters=5", "--init_from=resume")
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [(["--n_layers=3"], "unknown key 'n_layers'"),
                                      (["--init_from=resume", "--out_dir=/nonexistent/x"], "no checkpoint at"),
                                      (["--data_path=/nonexistent/corpus.txt"], "does not exist"),
                                      (["--eval_iters=0"], "eval_iters must be >= 1, got 0")])
def test_bad_input_gives_a_clear_message(args, msg):
    with pytest.raises(SystemExit, match=msg):  # SystemExit(message): the user sees the message, no traceback
        run_script("train.py", *TINY, *args)


@pytest.mark.parametrize("args,msg", [
    (["--n_head=3"], "config error: bad model config: n_embd=32 must be a multiple of n_head=3"),
    (["--msa_topk=0"], "config error: bad model config: msa_topk must be an int >= 1, got 0"),
    (["--batch_size=0"], "config error: batch_size must be >= 1, got 0"),
    (["--msa_select=window"], "config error: bad model config: msa_select must be one of 'indexer', 'local', 'random', "
                              "got 'window'"),
    (["--p_mqar=1.5"], "config error: p_mqar must be in [0, 1], got 1.5"),
    (["--mqar_distance=far"], "config error: mqar_distance must be 'uniform' or 'log', got 'far'"),
    (["--compile_mode=max-autotune"], "config error: compile_mode must be 'default' or 'reduce-overhead', got 'max-autotune'"),
    (["--p_mqar=0.5", "--p_repeat=0.6"], "config error: p_repeat must be >= 0 and p_mqar + p_repeat <= 1, got 0.6 and 0.5"),
    (["--repeat_iters=5", "--short_len=128"], "config error: expected repeat_iters, short_iters >= 0 and short_len in "
                                              "[16, seq_len] whose doublings below seq_len divide batch_size * seq_len "
                                              "= 128; got 5, 0, 128"),
    (["--repeat_iters=5", "--short_len=8"], "config error: expected repeat_iters, short_iters >= 0 and short_len in "
                                            "[16, seq_len] whose doublings below seq_len divide batch_size * seq_len "
                                            "= 128; got 5, 0, 8"),
    (["--short_iters=5", "--short_len=24"], "config error: expected repeat_iters, short_iters >= 0 and short_len in "
                                            "[16, seq_len] whose doublings below seq_len divide batch_size * seq_len "
                                            "= 128; got 0, 5, 24"),
    (["--backend=triton"], "config error: backend='triton' needs a CUDA GPU and none was found")])
def test_bad_settings_end_in_one_line(args, msg):
    # GPUs hidden and Triton's interpreter off: --backend=triton is what a user asks for on a machine without CUDA
    line = fails("train.py", *TINY, *args, "--out_dir=/nonexistent/never-written",
                 env_extra=dict(CUDA_VISIBLE_DEVICES=""), drop_env=("TRITON_INTERPRET",))
    assert line.startswith(msg), line


def test_resume_refuses_a_checkpoint_that_runs_code(tmp_path):
    marker = tmp_path / "created"
    evil_checkpoint(tmp_path / "ckpt.pt", marker)
    line = fails("train.py", *TINY, f"--out_dir={tmp_path}", "--init_from=resume")
    assert line.startswith(f"--init_from=resume: {tmp_path / 'ckpt.pt'}: expected a checkpoint written by train.py")
    assert "posix.system" in line and not marker.exists()


@pytest.mark.parametrize("kind,got", [("empty", "got an empty file"), ("truncated", "got a truncated or damaged"),
                                      ("text", "got a text file")])
def test_resume_refuses_a_damaged_checkpoint(straight, tmp_path, kind, got):
    raw = open(os.path.join(straight, "ckpt.pt"), "rb").read()
    (tmp_path / "ckpt.pt").write_bytes({"empty": b"", "truncated": raw[:len(raw) // 2], "text": b"hello\n"}[kind])
    with pytest.raises(SystemExit) as e:
        run_script("train.py", *TINY, f"--out_dir={tmp_path}", "--init_from=resume")
    assert str(e.value).startswith(f"--init_from=resume: {tmp_path / 'ckpt.pt'}: expected a checkpoint")
    assert got in str(e.value) and "\n" not in str(e.value)


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(straight, tmp_path):
    """SIGINT after the first logged iteration: train.py saves at the iteration it reached, says so in one line
    and exits with 130; the resumed run's log then equals the uninterrupted run's (each record once)."""
    out = str(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "train.py", *TINY, f"--out_dir={out}", "--max_iters=1000"], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.startswith("iter 1/"):
                p.send_signal(signal.SIGINT)
                break
        stdout, stderr = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    n = checkpoint.load(os.path.join(out, "ckpt.pt"), resume=True)["iter_num"]
    assert stderr.strip() == f"interrupted: saved {os.path.join(out, 'ckpt.pt')} at iteration {n}; continue with " \
                             f"--init_from=resume"
    assert 1 <= n <= 4  # the uninterrupted run to compare with stops at 4
    assert [rec["iter"] for rec in records(out) if "iter" in rec] == list(range(1, n + 1))
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
    train(f"--out_dir={out}", "--max_iters=4", "--init_from=resume")
    drop_speed = lambda recs: [{k: v for k, v in rec.items() if k not in ("tok_s", "mfu")} for rec in recs]
    assert drop_speed(records(out)) == drop_speed(records(straight))  # bitwise equal losses, no duplicates


def test_configurator(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("seq_len = 128\nname = 'x'\n")
    settings = dict(seq_len=64, lr=1e-3, name="a", flag=True, top_k=None)
    assert configure(settings, [str(cfg), "--lr=1", "--flag=False", "--top_k=5", "--name=out-shapes"]) == \
        dict(seq_len=128, lr=1.0, name="out-shapes", flag=False, top_k=5)
    assert configure(dict(settings), ["--seq_len=5", str(cfg)])["seq_len"] == 5     # the override wins, wherever it is
    assert configure(dict(settings, top_k=None), ["--top_k=None"])["top_k"] is None  # None where the default is None
    for argv, msg in [(["--seq_len=abc"], "seq_len expects an int"), (["--lr"], "expected --key=value"),
                      (["--seq_len=None"], "seq_len expects an int .*, got None"),
                      (["missing.py"], "config file 'missing.py' not found"), (["--sequence=3"], "unknown key 'sequence'")]:
        with pytest.raises(SystemExit, match=msg):
            configure(dict(settings), argv)
    cfg.write_text("n_layers = 3\n")
    with pytest.raises(SystemExit, match=f"unknown key 'n_layers' in {cfg}"):
        configure(dict(settings), [str(cfg)])


@pytest.mark.parametrize("text,line,got", [
    ("seq_len = 128\nimport os\n", 2, "import os"),
    ("# a comment\nseq_len = int('3')\n", 2, "seq_len = int('3')"),
    ("seq_len = 128\nos.system('touch MARKER')\n", 2, "os.system('touch MARKER')"),
    ("seq_len = 128\nname = seq_len * 2\n", 2, "name = seq_len * 2"),
    ("seq_len = name = 3\n", 1, "seq_len = name = 3"),
    ("def f():\n    pass\n", 1, "def f():")])
def test_config_files_are_read_not_run(tmp_path, monkeypatch, text, line, got):
    """A config file holds `name = <literal>` lines and comments; anything else is refused, naming the file and
    line, and nothing in it runs."""
    monkeypatch.chdir(tmp_path)
    cfg, marker = tmp_path / "c.py", "created"
    cfg.write_text(text.replace("MARKER", marker))
    with pytest.raises(SystemExit) as e:
        configure(dict(seq_len=64, name="a"), [str(cfg)])
    msg = str(e.value)
    assert msg.startswith(f"config error: {cfg} line {line}: expected `name = <literal>`") and "\n" not in msg
    assert msg.endswith(f"got `{got.replace('MARKER', marker)}`"), msg
    assert not os.path.exists(marker)
    cfg.write_text("seq_len = = 3\n")
    with pytest.raises(SystemExit, match=f"config error: {cfg} line 1: expected lines `name = <literal>` and comments"):
        configure(dict(seq_len=64, name="a"), [str(cfg)])
    cfg.write_text("# the values may be any literal\nseq_len = -3  # negative\nname = 'x' 'y'\n")
    assert configure(dict(seq_len=64, name="a"), [str(cfg)]) == dict(seq_len=-3, name="xy")


def test_config_presets_are_literal_assignments():
    for name in sorted(os.listdir(os.path.join(ROOT, "config"))):
        assert read_config_file(os.path.join(ROOT, "config", name))


def test_configurator_help_lists_settings(capsys):
    settings = dict(__doc__="Train something.", seq_len=64, name="a")
    with pytest.raises(SystemExit) as e:
        configure(settings, ["--seq_len=3", "--help"])
    assert e.value.code == 0 and settings["seq_len"] == 64                     # nothing applied
    out = capsys.readouterr().out
    assert out.startswith("Train something.") and "seq_len = 64" in out and "name = 'a'" in out


def test_mqar_evaluation_is_logged(straight, tmp_path):
    """--eval_mqar=N: each evaluation scores N held-out recall rows (recall_eval.mqar_eval), logs the numbers and
    prints one line; the default (0) logs none."""
    out = str(tmp_path)
    r = train(f"--out_dir={out}", "--max_iters=2", "--eval_interval=2", "--p_mqar=0.5", "--eval_mqar=3")
    evals = [rec for rec in records(out) if "eval" in rec]
    assert len(evals) == 2 and all("mqar" in rec for rec in evals)
    m = evals[-1]["mqar"]
    assert m["questions"] == 3 * 64 // 32 == sum(m["count_bins"]) and len(m["acc_bins"]) == 8 and 0 <= m["acc"] <= 1
    assert m["layers"] == [1] and np.array(m["needle_recall"]).shape == np.array(m["needle_mass"]).shape == (1, 1)
    lines = [line for line in r.stdout.splitlines() if "mqar acc" in line]
    assert len(lines) == 2 and "needle recall per MSA layer" in lines[-1] and "(6 questions)" in lines[-1]
    assert not any("mqar" in rec for rec in records(straight))
