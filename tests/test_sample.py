"""sample.py end to end on a checkpoint from a one-iteration tiny training, and its messages for bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest

from data import encode, save_image
from test_train import ROOT, train


def sample(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sample"))
    train(f"--out_dir={out}", "--max_iters=1", "--eval_captions=0", "--eval_long_range=0")
    return out


def test_text_and_caption(out_dir, tmp_path):
    r = sample(f"--out_dir={out_dir}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=5", "--seed=3")
    assert r.returncode == 0, r.stderr[-3000:]
    n_prompt = 2 * len(encode("ROMEO:"))
    assert r.stdout.count("ROMEO:") == 2 and f"prompt: {n_prompt} tokens" in r.stdout and "generation: 10 tokens" in r.stdout
    assert sample(f"--out_dir={out_dir}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=5", "--seed=3").stdout \
        .split("prompt:")[0] == r.stdout.split("prompt:")[0]  # the same seed gives the same text
    r = sample(f"--out_dir={out_dir}", "--image=generated")
    assert r.returncode == 0 and "true caption" in r.stdout and "caption:" in r.stdout, r.stderr[-3000:]
    save_image(str(tmp_path / "ok.png"), np.full((32, 32, 3), 200, np.uint8))
    r = sample(f"--out_dir={out_dir}", f"--image={tmp_path / 'ok.png'}")
    assert r.returncode == 0 and "caption:" in r.stdout, r.stderr[-3000:]


def test_bad_input_gives_a_clear_message(out_dir, tmp_path):
    from PIL import Image
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(tmp_path / "small.png")
    for args, msg in [([f"--out_dir={tmp_path}"], "run `python train.py` first"),
                      ([f"--out_dir={out_dir}", f"--image={tmp_path / 'small.png'}"], "expected a 32x32 image, got 32x20"),
                      ([f"--out_dir={out_dir}", "--image=/nonexistent.png"], "not found"),
                      ([f"--out_dir={out_dir}", "--temprature=0.5"], "unknown key 'temprature'")]:
        r = sample(*args)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
    with open(tmp_path / "ckpt.pt", "wb") as f:  # something that is not train.py's checkpoint
        import torch
        torch.save({"weights": torch.zeros(3)}, f)
    r = sample(f"--out_dir={tmp_path}")
    assert r.returncode != 0 and "not a checkpoint written by train.py" in r.stderr
