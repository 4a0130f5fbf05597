"""sample.py on a checkpoint from a one-iteration tiny training, and its messages for bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from data import encode, save_image
from test_train import run_script, train


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sample"))
    train(f"--out_dir={out}", "--max_iters=1", "--eval_captions=0", "--eval_long_range=0")
    return out


def test_text_and_caption(out_dir, tmp_path, capsys):
    run_script("sample.py", f"--out_dir={out_dir}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=5")
    out = capsys.readouterr().out
    assert out.count("ROMEO:") == 2 and f"prompt: {2 * len(encode('ROMEO:'))} tokens" in out
    assert "generation: 10 tokens" in out and "tok/s" in out
    run_script("sample.py", f"--out_dir={out_dir}", "--image=generated")
    out = capsys.readouterr().out
    assert "true caption: 'a " in out and "caption:" in out
    save_image(str(tmp_path / "ok.png"), np.full((32, 32, 3), 200, np.uint8))
    run_script("sample.py", f"--out_dir={out_dir}", f"--image={tmp_path / 'ok.png'}")
    assert "caption:" in capsys.readouterr().out


def test_bad_input_gives_a_clear_message(out_dir, tmp_path):
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(tmp_path / "small.png")
    for args, msg in [([f"--out_dir={tmp_path}"], "run `python train.py` first"),
                      ([f"--out_dir={out_dir}", f"--image={tmp_path / 'small.png'}"], "expected a 32x32 image, got 32x20"),
                      ([f"--out_dir={out_dir}", "--image=/nonexistent.png"], "not found")]:
        with pytest.raises(SystemExit, match=msg):
            run_script("sample.py", *args)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "ckpt.pt")  # something that is not train.py's checkpoint
    with pytest.raises(SystemExit, match="not a checkpoint written by train.py"):
        run_script("sample.py", f"--out_dir={tmp_path}")
