"""checkpoint.py: atomic save, and a load that reads checkpoints as data (weights_only=True). A crafted file whose
unpickling would run code is refused without running it; every file that is not a checkpoint gets one line.
The helpers here (evil_checkpoint, fails) also serve test_train, test_sample and test_report."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = "expected a checkpoint written by train.py"


class _Touch:
    """Unpickling this runs os.system('touch MARKER'): what a malicious checkpoint can do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_checkpoint(path, marker):
    """A checkpoint with every key train.py writes, plus one value whose unpickling creates the file marker."""
    torch.save(dict(model={"w": torch.zeros(2)}, model_args={}, iter_num=1, config={}, optimizer={},
                    torch_rng=torch.get_rng_state(), cuda_rng=None, extra=_Touch(marker)), path)


def fails(script, *args, env_extra=None, drop_env=()):
    """Run `python script args` in the repository; it must exit non-zero with exactly one line on stderr and no
    traceback. Returns that line."""
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    return lines[0]


def plain_state():
    """What train.py saves, from a small model and optimizer after one step."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return dict(model=model.state_dict(), optimizer=opt.state_dict(), iter_num=7, model_args=dict(n_layer=2),
                config=dict(out_dir="out", lr=1e-3, compile=False, data_path="", top_k=None),
                torch_rng=torch.get_rng_state(), cuda_rng=None)


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "created"
    evil_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(str(tmp_path / "evil.pt"))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "evil.pt") in msg and EXPECTED in msg
    assert "posix.system" in msg and "python checkpoint.py convert" in msg
    assert not marker.exists()
    # the file really is dangerous: the unsafe loader runs its command
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_save_then_load_round_trip(tmp_path):
    state = plain_state()
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, state)
    assert os.listdir(tmp_path) == ["ckpt.pt"]                      # no .tmp left behind
    got = checkpoint.load(path, resume=True)
    assert got["iter_num"] == 7 and got["config"] == state["config"] and got["cuda_rng"] is None
    assert torch.equal(got["torch_rng"], state["torch_rng"])
    for k, v in state["model"].items():
        assert torch.equal(got["model"][k], v)
    assert got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])


def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, plain_state())
    before = open(path, "rb").read()

    def broken(obj, f):  # a crash halfway through writing
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, plain_state())
    assert open(path, "rb").read() == before                        # the old checkpoint is whole


def test_save_refuses_what_the_safe_loader_cannot_read(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot save state\['config'\]\['lr'\]: a float64"):
        checkpoint.save(str(tmp_path / "ckpt.pt"), dict(plain_state(), config=dict(lr=np.float64(1e-3))))
    assert not (tmp_path / "ckpt.pt").exists()


def test_files_that_are_not_checkpoints_get_one_line(tmp_path):
    good = str(tmp_path / "good.pt")
    checkpoint.save(good, plain_state())
    raw = open(good, "rb").read()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "text.pt").write_text("n_layer = 4\nthis is not a checkpoint\n")
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps({"model": 1}))
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "keys.pt")
    torch.save(dict(plain_state(), iter_num="7"), tmp_path / "types.pt")
    for name, got in [("missing.pt", "got no such file"), ("empty.pt", "got an empty file"),
                      ("truncated.pt", "got a truncated or damaged torch.save archive"), ("text.pt", "got a text file"),
                      ("pickle.pt", "got a file that is not in torch.save's format"),
                      ("tensor.pt", "got a Tensor, not a dict"),
                      ("keys.pt", "got a dict without the keys 'model', 'model_args', 'iter_num', 'config' "
                                  "(its keys: 'weights')"),
                      ("types.pt", "got iter_num a str")]:
        path = str(tmp_path / name)
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: {EXPECTED}") and got in msg and "\n" not in msg, msg
        assert isinstance(e.value, ValueError)
    # sample.py needs the model; a resume needs the optimizer and the rng states too
    partial = str(tmp_path / "partial.pt")
    checkpoint.save(partial, {k: v for k, v in plain_state().items() if k not in ("optimizer", "torch_rng")})
    assert checkpoint.load(partial)["iter_num"] == 7
    with pytest.raises(checkpoint.CheckpointError, match="without the keys 'optimizer', 'torch_rng' "):
        checkpoint.load(partial, resume=True)


def test_a_checkpoint_written_before_the_safe_loader_still_loads(tmp_path):
    # the old train.py wrote torch.save(state, ...) of the same plain values: the safe loader reads it as it is
    torch.save(plain_state(), tmp_path / "old.pt")
    assert checkpoint.load(str(tmp_path / "old.pt"), resume=True)["iter_num"] == 7


def test_convert_command(tmp_path):
    old, new = str(tmp_path / "old.pt"), str(tmp_path / "new.pt")
    torch.save(dict(plain_state(), iter_num=np.int64(7), extra=np.arange(3)), old)  # numpy values: not safe
    with pytest.raises(checkpoint.CheckpointError, match=f"python checkpoint.py convert {old} NEW.pt"):
        checkpoint.load(old)
    r = subprocess.run([sys.executable, "checkpoint.py", "convert", old, new], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "wrote" in r.stdout, r.stderr
    got = checkpoint.load(new, resume=True)
    assert got["iter_num"] == 7 and type(got["iter_num"]) is int and torch.equal(got["extra"], torch.arange(3))
    assert "usage: python checkpoint.py convert OLD.pt NEW.pt" in fails("checkpoint.py", "convert", old)


def test_weights_of_another_layout_get_one_line(tmp_path):
    """load_weights: a checkpoint whose weights do not fit the model (names of an older model.py, another size) is
    refused in one line naming the differences; fitting weights load."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    good = dict(plain_state(), model=torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)).state_dict())
    checkpoint.load_weights(model, good, "good.pt")
    assert torch.equal(model[1].weight, good["model"]["1.weight"])
    renamed = dict(good, model={k.replace("1.", "wq."): v for k, v in good["model"].items()})
    resized = dict(good, model=dict(good["model"], **{"1.weight": torch.zeros(5, 3)}))
    for state, got in [(renamed, "missing: 1.weight, 1.bias; unexpected: wq.weight, wq.bias"),
                       (resized, "shape in file vs model: 1.weight (5, 3) vs (2, 3)")]:
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.load_weights(model, state, "old.pt")
        msg = str(e.value)
        assert msg.startswith("old.pt: its weights do not fit this model (") and got in msg and "\n" not in msg, msg
