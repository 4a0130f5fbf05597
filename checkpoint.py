"""
Checkpoints are data, not code. save() writes one atomically; load() reads it with torch.load(weights_only=True),
which rebuilds only tensors, dicts, lists, tuples, strings, numbers, bools and None: nothing in the file runs.
A file that is not such a checkpoint is refused with a CheckpointError, one line naming the file and what was
expected (the scripts print it and exit). read_log() and trim_log() read and rewrite (atomically too) a run's
log.jsonl, dropping a last line that a crash cut short; load_model() builds the model a checkpoint holds.

  python checkpoint.py convert OLD.pt NEW.pt
      rewrites a checkpoint that holds other objects (numpy values, say) as a safe one. It unpickles OLD.pt
      with the unsafe loader, which runs whatever the file asks: use it only on a file you trust.
"""
import json
import os
import re
import sys
import warnings
from collections import OrderedDict

import numpy as np
import torch

REQUIRED = ("model", "model_args", "iter_num", "config")     # what sample.py and report.py read
RESUME = ("optimizer", "torch_rng", "cuda_rng")              # what train.py --init_from=resume reads too
SAFE = "tensors, dicts, lists, tuples, strings, numbers, bools and None"
EXPECTED = f"a checkpoint written by train.py (a dict of {SAFE})"


class CheckpointError(ValueError):
    """A file that is not a checkpoint the safe loader accepts; the message is one line."""


def _check_plain(obj, where):
    """Raise CheckpointError unless obj holds only what load() accepts, so every saved file loads again. Exact
    types: a numpy float64 is a float subclass, but the safe loader refuses it."""
    if obj is None or isinstance(obj, torch.Tensor) or type(obj) in (str, bool, int, float):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            _check_plain(k, where)
            _check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise CheckpointError(f"cannot save {where}: a {type(obj).__name__}; checkpoints hold only {SAFE}")


def _replace(path, write, mode="wb"):
    """Write path atomically: write(f) into path + '.tmp' in the same folder, flushed to disk, then renamed over
    path. A crash or Ctrl-C leaves either the old file or the new one whole."""
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(path, state):
    """Write state (a dict of tensors and plain values) to path atomically (_replace)."""
    _check_plain(state, "state")
    _replace(path, lambda f: torch.save(state, f))


def _refuse(path, what):
    return CheckpointError(f"{path}: expected {EXPECTED}, got {what}")


def load(path, device="cpu", resume=False):
    """Read a checkpoint of train.py onto device -> dict with the keys REQUIRED (and RESUME if resume=True).
    Raises CheckpointError (one line) for a missing, empty, truncated, foreign or unsafe file, or wrong keys."""
    if not os.path.isfile(path):
        raise _refuse(path, "no such file")
    if os.path.getsize(path) == 0:
        raise _refuse(path, "an empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(512)
    try:
        with warnings.catch_warnings():  # the safe unpickler warns about pickle protocols it reads fine
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # the safe loader refused or could not parse the file: say which, in one line
        msg = str(e)
        unsafe = re.search(r"GLOBAL (\S+)", msg)
        if unsafe:
            raise _refuse(path, f"a file that needs the Python object {unsafe.group(1)} (refused: unpickling "
                                f"objects can run code); if you trust the file, convert it once with "
                                f"python checkpoint.py convert {path} NEW.pt") from None
        if head.startswith(b"PK\x03\x04"):
            raise _refuse(path, "a truncated or damaged torch.save archive") from None
        if _is_text(head):
            raise _refuse(path, "a text file") from None
        raise _refuse(path, f"a file that is not in torch.save's format ({type(e).__name__} while reading it)") from None
    if not isinstance(ckpt, dict):
        raise _refuse(path, f"a {type(ckpt).__name__}, not a dict")
    keys = REQUIRED + (RESUME if resume else ())
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise _refuse(path, f"a dict without the keys {', '.join(map(repr, missing))} (its keys: "
                            f"{', '.join(map(repr, list(ckpt)[:8])) or 'none'})")
    wrong = [f"{k} a {type(ckpt[k]).__name__}" for k, t in (("model", dict), ("model_args", dict), ("iter_num", int),
                                                             ("config", dict)) if not isinstance(ckpt[k], t)]
    if wrong:
        raise _refuse(path, f"{', '.join(wrong)} (expected model, model_args and config dicts, iter_num an int)")
    return ckpt


def load_weights(model, ckpt, path):
    """model.load_state_dict(ckpt["model"]), with a mismatch of names or shapes (a checkpoint of another model.py
    layout or size) refused in one CheckpointError line that names the first differences."""
    own, theirs = model.state_dict(), ckpt["model"]
    missing = [k for k in own if k not in theirs]
    extra = [k for k in theirs if k not in own]
    shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in theirs and isinstance(theirs[k], torch.Tensor) and theirs[k].shape != v.shape]
    if missing or extra or shapes:
        what = "; ".join(f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}" for name, keys in
                         (("missing", missing), ("unexpected", extra), ("shape in file vs model", shapes)) if keys)
        raise CheckpointError(f"{path}: its weights do not fit this model ({what}); expected a checkpoint written by "
                              f"this version of train.py with the same model settings")
    model.load_state_dict(theirs)


def read_log(path):
    """A run's log.jsonl -> (its records, dicts in order; whether its last line was dropped). A last line that is not
    JSON is a record cut short by a crash in the middle of an append, and is dropped; a bad line anywhere else raises
    ValueError naming the file and the line."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                return records, True
            raise ValueError(f"{path} line {i + 1}: expected a JSON record of train.py, got {line.strip()[:60]!r}")
    return records, False


def trim_log(path, last_iter):
    """Drop from a run's log.jsonl the records past iteration last_iter (a run that went on after its last
    checkpoint) and a last line cut short by a crash, so that a resumed run logs each iteration and evaluation once;
    rewritten atomically. Returns whether such a line was dropped."""
    records, cut = read_log(path)
    step = lambda rec: rec["iter"] if "iter" in rec else rec.get("eval", 0)  # a training record or an eval's
    keep = [rec for rec in records if step(rec) <= last_iter]
    if cut or len(keep) < len(records):
        _replace(path, lambda f: f.writelines(json.dumps(rec) + "\n" for rec in keep), "w")
    return cut


def load_model(path, device="cpu", backend="auto", **overrides):
    """A checkpoint of train.py -> (GPT with its weights, in eval mode on device; the checkpoint dict). overrides
    replace entries of its model_args (sample.py's --msa_topk, ...). Every failure is one ValueError line: a missing
    or damaged file or weights of another layout (CheckpointError), a config the model refuses (GPTConfig.check,
    model.get_backend), or model_args that this model.py does not know (a checkpoint of another version)."""
    from model import GPT, GPTConfig                                           # model.py needs nothing from here
    ckpt = load(path, device)
    try:
        model = GPT(GPTConfig(**dict(ckpt["model_args"], **overrides)), backend=backend)
    except TypeError as e:
        raise CheckpointError(f"{path} does not fit this model.py (written by another version?): "
                              f"{' '.join(str(e).split())[:300]}") from None
    except ValueError as e:
        raise ValueError(f"config error: {e}") from None
    load_weights(model, ckpt, path)
    return model.eval().to(device), ckpt


def _is_text(head):
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\n\r\t" for c in text)


def _plain(obj, where="state"):
    """What the unsafe loader returned -> the same made of SAFE types (numpy arrays become tensors, numpy scalars
    Python numbers); anything else is an error."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return tuple(items) if isinstance(obj, tuple) else items
    _check_plain(obj, where)
    return obj


def convert(old, new):
    """Load old with the unsafe loader (it runs what the file asks: only for a file you trust), write new safely."""
    try:
        state = torch.load(old, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{old}: cannot be read even by the unsafe loader ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); expected {EXPECTED}") from None
    save(new, _plain(state))
    return load(new)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "convert":
        raise SystemExit("usage: python checkpoint.py convert OLD.pt NEW.pt  (OLD.pt is unpickled with the unsafe "
                         f"loader: only for a file you trust); got {' '.join(sys.argv[1:]) or 'no arguments'}")
    try:
        ckpt = convert(sys.argv[2], sys.argv[3])
    except CheckpointError as e:
        raise SystemExit(str(e))
    print(f"wrote {sys.argv[3]} (iteration {ckpt['iter_num']}): it loads with weights_only=True")
