"""train.py end to end at a tiny size: exact resume, and clear messages for bad config and checkpoints."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

from configurator import configure

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


def test_resume_continues_exactly(straight, tmp_path):
    out = str(tmp_path)
    train(f"--out_dir={out}", "--max_iters=2")
    r = train(f"--out_dir={out}", "--max_iters=4", "--init_from=resume")
    assert "resumed from" in r.stdout and "iteration 2" in r.stdout
    drop_speed = lambda recs: [{k: v for k, v in rec.items() if k not in ("tok_s", "mfu")} for rec in recs]
    want, got = drop_speed(records(straight)), drop_speed(records(out))
    steps = [rec for rec in want if rec.get("iter", 0) > 2 or rec.get("eval", 0) > 2]
    assert len(steps) == 3  # iterations 3, 4 and the eval at 4
    assert steps == [rec for rec in got if rec.get("iter", 0) > 2 or rec.get("eval", 0) > 2]  # bitwise equal losses
    assert [rec["lm"] for rec in want if "iter" in rec][:2] == [rec["lm"] for rec in got if "iter" in rec][:2]
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))


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
        assert a.get("recall_layers") == pytest.approx(b.get("recall_layers"), rel=1e-5)


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
    test_model.py) at train.py's seq_len, with and without the dense KL warm-up."""
    g = script_globals(*TINY, f"--out_dir={tmp_path}", "--max_iters=0")
    model = g["raw_model"]
    assert g["fpt"] == {kd: model.flops_per_token(g["seq_len"], kl_dense=kd) for kd in (False, True)}
    assert g["fpt"][True] > g["fpt"][False] > 0


def test_log_holds_eval_metrics(straight):
    ev = [rec for rec in records(straight) if "eval" in rec]
    assert [rec["eval"] for rec in ev] == [0, 4]
    last = ev[-1]
    assert set(last["caption"]) == {"size", "colour", "shape", "position", "all"}
    assert len(last["kl_layers"]) == 1 and len(last["expert_load"]) == 2 and 0 <= last["long_range"] <= 1
    assert len(last["recall_layers"]) == 1 and 0 < last["recall_layers"][0] <= 1 + 1e-6
    steps = [rec for rec in records(straight) if "iter" in rec]
    assert all(0 < rec["mfu"] < 1 and rec["tok_s"] > 0 for rec in steps)


def test_checkpoint_from_another_config(straight):
    with pytest.raises(SystemExit, match="comes from another config .n_embd: checkpoint 32 vs config 48"):
        run_script("train.py", *TINY, f"--out_dir={straight}", "--max_iters=6", "--init_from=resume", "--n_embd=48")


def test_checkpoint_older_than_a_config_key_resumes(straight, tmp_path, capsys):
    # a checkpoint written before GPTConfig had a key (here index_fp8) holds that key's default: it resumes
    ckpt = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=False)
    del ckpt["model_args"]["index_fp8"]
    torch.save(ckpt, os.path.join(tmp_path, "ckpt.pt"))
    run_script("train.py", *TINY, f"--out_dir={tmp_path}", "--max_iters=5", "--init_from=resume")
    assert "resumed from" in capsys.readouterr().out


@pytest.mark.parametrize("args,msg", [(["--n_layers=3"], "unknown key 'n_layers'"),
                                      (["--init_from=resume", "--out_dir=/nonexistent/x"], "no checkpoint at"),
                                      (["--data_path=/nonexistent/corpus.txt"], "does not exist")])
def test_bad_input_gives_a_clear_message(args, msg):
    with pytest.raises(SystemExit, match=msg):  # SystemExit(message): the user sees the message, no traceback
        run_script("train.py", *TINY, *args)


def test_configurator(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("seq_len = 128\nname = 'x'\n")
    settings = dict(seq_len=64, lr=1e-3, name="a", flag=True, top_k=None)
    assert configure(settings, [str(cfg), "--lr=1", "--flag=False", "--top_k=5", "--name=out-shapes"]) == \
        dict(seq_len=128, lr=1.0, name="out-shapes", flag=False, top_k=5)
    for argv, msg in [(["--seq_len=abc"], "seq_len expects a int"), (["--lr"], "expected --key=value"),
                      (["missing.py"], "config file 'missing.py' not found"), (["--sequence=3"], "unknown key 'sequence'")]:
        with pytest.raises(SystemExit, match=msg):
            configure(dict(settings), argv)
    cfg.write_text("n_layers = 3\n")
    with pytest.raises(SystemExit, match=f"unknown key 'n_layers' in {cfg}"):
        configure(dict(settings), [str(cfg)])


def test_configurator_help_lists_settings(capsys):
    settings = dict(__doc__="Train something.", seq_len=64, name="a")
    with pytest.raises(SystemExit) as e:
        configure(settings, ["--seq_len=3", "--help"])
    assert e.value.code == 0 and settings["seq_len"] == 64                     # nothing applied
    out = capsys.readouterr().out
    assert out.startswith("Train something.") and "seq_len = 64" in out and "name = 'a'" in out
