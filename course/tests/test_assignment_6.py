"""Assignment 6: the experiment. Grades (1) indexer_recall against a loop written from its docstring, and
(2) what `python experiment.py` and you wrote: results.json with a grid of at least 2 values of K and 2 of
bs, sane numbers, the three plots, and REPORT.md with an answer to every question of README.md."""
import json
import math
import os
import re
import xml.etree.ElementTree as ET

import pytest
import torch

import msa_ref
from experiment import indexer_recall

HERE = os.path.dirname(os.path.abspath(__file__))
QUESTIONS = ("Q1", "Q2", "Q3", "Q4")


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def brute_recall(q, k, qi, ki, bs, K):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    chosen = msa_ref.index_topk(qi, ki, bs, K)
    found = total = 0
    for b in range(B):
        for g in range(Hkv):
            for t in range(T):
                local = t // bs
                if local < K:
                    continue
                p = sum(torch.softmax(q[b, g * G + h, t] @ k[b, g, :t + 1].T / math.sqrt(D), 0) for h in range(G)) / G
                mass = [float(p[c * bs:(c + 1) * bs].sum()) for c in range(local)]
                oracle = sorted(range(local), key=lambda c: (-mass[c], c))[:K - 1]
                found += sum(c in chosen[b, g, t].tolist() for c in oracle)
                total += K - 1
    return found / total if total else float("nan")


@pytest.mark.parametrize("B, Hq, Hkv, T, bs, K", [(1, 2, 1, 40, 4, 3), (2, 4, 2, 29, 3, 2), (1, 1, 1, 50, 8, 4)])
def test_indexer_recall(B, Hq, Hkv, T, bs, K):
    q, k, qi, ki = rand(B, Hq, T, 8, seed=1), rand(B, Hkv, T, 8, seed=2), rand(B, Hkv, T, 4, seed=3), rand(B, T, 4, seed=4)
    got = indexer_recall(q, k, qi, ki, bs, K)
    assert isinstance(got, float) and abs(got - brute_recall(q, k, qi, ki, bs, K)) < 1e-9


def test_indexer_recall_bounds_and_undefined():
    """An index branch that copies the main branch (G = 1, qi = q, ki = k) beats a random one; when every
    block is chosen (T <= K * bs) there is nothing to count: nan."""
    q, k = rand(1, 1, 48, 8, seed=5), rand(1, 1, 48, 8, seed=6)
    copy = indexer_recall(q, k, q, k[:, 0], 4, 3)
    chance = indexer_recall(q, k, rand(1, 1, 48, 8, seed=7), rand(1, 48, 8, seed=8), 4, 3)
    assert 0.0 <= chance < copy <= 1.0
    assert math.isnan(indexer_recall(q, k, q, k[:, 0], 16, 3))   # 48 tokens = 3 blocks of 16: all chosen


def load_results():
    path = os.path.join(HERE, "results.json")
    assert os.path.isfile(path), "run `python experiment.py` first: it writes results.json"
    with open(path) as f:
        return json.load(f)


def test_results_cover_a_grid_and_are_sane():
    res = load_results()
    runs = res["runs"]
    assert len({r["K"] for r in runs}) >= 2 and len({r["bs"] for r in runs}) >= 2, "vary both K and the block size"
    vocab_loss = math.log(50304)                                  # the loss of a uniform guess over the vocabulary
    for r in runs:
        assert r["iters"] >= 1 and r["tok_s"] > 0 and r["seconds"] > 0
        assert 0 < r["val_lm"] < vocab_loss + 0.5 and math.isfinite(r["val_kl"]) and r["val_kl"] > -1e-6
        if r["dense"]:   # K * bs >= T: every block chosen, nothing to measure
            assert math.isnan(r["recall"])
        else:
            assert 0 <= r["recall"] <= 1 and 0 <= r["recall_random"] <= 1
    assert not res["quick"], "results.json comes from the --quick smoke run: run the full experiment"
    assert all(r["iters"] >= 50 for r in runs), "the full experiment trains each run for at least 50 steps"


@pytest.mark.parametrize("name", ["loss", "recall", "speed"])
def test_plots(name):
    path = os.path.join(HERE, f"{name}.svg")
    assert os.path.isfile(path), f"{name}.svg is missing: run `python experiment.py`"
    lines = ET.parse(path).getroot().findall(".//{http://www.w3.org/2000/svg}polyline")
    assert any(len(line.get("points").split()) >= 2 for line in lines), f"{name}.svg holds no line"


def test_report_answers_every_question():
    path = os.path.join(HERE, "REPORT.md")
    assert os.path.isfile(path), "write REPORT.md (questions in README.md)"
    text = open(path).read()
    parts = re.split(r"^##\s*(Q\d)\b.*$", text, flags=re.M)
    answers = dict(zip(parts[1::2], parts[2::2]))
    for q in QUESTIONS:
        assert q in answers, f"REPORT.md needs a section '## {q}'"
        assert len(answers[q].split()) >= 30, f"the answer to {q} is too short (30 words at least)"
    assert re.search(r"\d\.\d", text), "quote your measured numbers in REPORT.md"
