"""
Sample from a trained nanoMSA model (the checkpoint that train.py leaves in out_dir).

  python sample.py                                        # text, from the default start
  python sample.py --start="ROMEO:" --num_samples=3 --max_new_tokens=200 --temperature=0.8 --top_k=200
  python sample.py --start=FILE:prompt.txt                # the prompt from a file
  python sample.py --image=shape.png                      # caption a 32x32 RGB image
  python sample.py --image=generated                      # caption a freshly drawn shape (its true caption is shown)

  python sample.py --start=FILE:long.txt --decode=dense   # the MSA layers decode densely: sparse vs dense tokens/s
  python sample.py --start=FILE:long.txt --msa_topk=64     # K raised to cover every block: sparse == dense
  python sample.py --start=FILE:long.txt --index_fp8=True  # index keys cached (and scored) in fp8
  python sample.py --demo=recall                          # retrieval: a held-out row of facts, one asked again
  python sample.py --demo=recall --demo_len=32768 --question=3   # a longer row, another question
  python sample.py --compile=False                        # the decode step eager (still CUDA-graphed)

The prompt is prefilled with the sparse forward, which fills the KV caches and the index-key caches;
then each new token selects its blocks from the cached index keys (the same rule as index_topk) and
attends through backend.sparse_decode (with --decode=dense: over the whole cache, the index ignored).
On CUDA the decode step is compiled (torch.compile) and each step is one CUDA-graph replay, with the next
token sampled inside the graph (model.GPT.generate), and the weights are cast to bf16 for decoding. Prints the
first call's seconds (compiling) apart, then tokens/s for the prompt and for the generation.

--demo=recall: a row of held-out text with facts "\\n Bob fox\\n" inserted and asked again later (data.mqar_eval_set,
the recall task of train.py's p_mqar); the prompt ends at one question's key. Prints the model's answer (the greedy
next token) against the truth and, per MSA layer and KV group, the blocks read for the answer token and whether
the fact's block is among them (recall_eval.explain).
"""
import os
import sys
import time

import numpy as np
import torch

import checkpoint
import data
import recall_eval
from configurator import configure
from model import autocast

# -----------------------------------------------------------------------------------------------
out_dir = "out"
start = "\n"            # or "FILE:path.txt"
num_samples = 2
max_new_tokens = 200
temperature = 0.8       # 0: greedy
top_k = 200             # sample among the top_k most likely tokens; 0: among all
seed = 1337
image = ""              # '' for text; a .png path, or 'generated' for a random shape, to caption it
backend = "auto"        # 'auto', 'ref' or 'triton' (see model.get_backend)
decode = "sparse"       # 'sparse' (MSA layers read their selected blocks) or 'dense' (the whole cache)
msa_topk = 0            # > 0: blocks per query instead of the checkpoint's (>= the context's blocks: MSA == dense)
msa_select = ""         # '' (the checkpoint's), 'indexer', or a blind rule 'local' / 'random' (model.GPTConfig)
index_fp8 = False       # True: index scores and the index-key cache in fp8 (half the bytes a long decode step reads);
                        # False keeps the checkpoint's choice
demo = ""               # 'recall': the retrieval demo (above) instead of sampling
demo_len = 0            # recall demo: tokens in the row (0: the checkpoint's training seq_len)
question = -1           # recall demo: which question of the row (-1: the one farthest from its fact)
compile = True          # CUDA: the decode step through torch.compile; False: the eager step (CPU: always eager)
bf16_weights = True     # CUDA: the weights in bf16 (half the bytes a decode step reads); False: fp32, as trained
# -----------------------------------------------------------------------------------------------
configure(globals(), sys.argv[1:])
device = "cuda" if torch.cuda.is_available() else "cpu"
ctx = autocast(device)
torch.manual_seed(seed)

# the settings first, so a wrong one stops the script before the checkpoint is read
for ok, what, got in [(num_samples >= 1, "--num_samples must be >= 1", num_samples),
                      (max_new_tokens >= 1, "--max_new_tokens must be >= 1", max_new_tokens),
                      (temperature >= 0, "--temperature must be >= 0 (0 is greedy)", temperature),
                      (top_k >= 0, "--top_k must be >= 0 (0: no cut)", top_k),
                      (msa_topk >= 0, "--msa_topk must be >= 0 (0: the checkpoint's)", msa_topk),
                      (decode in ("sparse", "dense"), "--decode must be 'sparse' or 'dense'", decode),
                      (demo in ("", "recall"), "--demo must be '' (sampling) or 'recall'", demo),
                      (demo_len >= 0, "--demo_len must be >= 0 (0: the checkpoint's seq_len)", demo_len)]:
    if not ok:
        raise SystemExit(f"{what}, got {got!r}")
if not image and start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"--start=FILE:{start[5:]}: expected a readable UTF-8 text file, got "
                         f"{type(e).__name__}: {e.strerror if isinstance(e, OSError) else e.reason}")

ckpt_path = os.path.join(out_dir, "ckpt.pt")
if not os.path.isfile(ckpt_path):
    raise SystemExit(f"no checkpoint at {ckpt_path}: run `python train.py` first (or pass --out_dir=...)")
overrides = {k: v for k, v in (("msa_topk", msa_topk), ("index_fp8", index_fp8), ("msa_select", msa_select)) if v}
try:
    model, ckpt = checkpoint.load_model(ckpt_path, device, backend, **overrides)
except ValueError as e:  # a damaged file, weights or settings this model.py cannot take: one line
    raise SystemExit(str(e))
if device == "cuda" and bf16_weights:
    model.to(torch.bfloat16)  # matrix products run in bf16 under autocast anyway; the residual stream now too
print(f"loaded {ckpt_path} (iteration {ckpt['iter_num']}), backend {model.backend.__name__}, {decode} decode, "
      f"K={model.cfg.msa_topk} blocks of {model.cfg.msa_block_size}{', fp8 index' if model.cfg.index_fp8 else ''}"
      f"{'' if model.cfg.msa_select == 'indexer' else ', blind selection ' + model.cfg.msa_select}"
      f"{', compiled decode step' if compile and device == 'cuda' else ''}")


def timed(fn):
    """fn() and the seconds it took, the GPU's work included."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.time()
    out = fn()
    sync()
    return out, time.time() - t0


def generate(x, n, **kw):
    """model.generate -> (tokens, seconds for the prompt, seconds for the n new tokens). The prompt is timed alone
    (generate with no new token is the prefill: it draws no random number), then the whole call; the new tokens
    take the difference. On CUDA after one identical call, timed apart: the first call compiles the decode step
    and the Triton kernels, loads the libraries and captures the step's CUDA graph (seconds that are not tokens/s),
    and the timed call replays that graph (generate keeps it in model.decoder)."""
    kw["compile"] = "auto" if compile else False
    if device == "cuda":
        gen = torch.Generator(device=device).manual_seed(seed)
        _, t_first = timed(lambda: model.generate(x, n, **{**kw, "generator": gen}))
        print(f"first call (compiles{' the decode step,' if compile else ''} the Triton kernels): {t_first:.1f}s")
    _, t_prompt = timed(lambda: model.generate(x, 0, **kw))
    out, t_all = timed(lambda: model.generate(x, n, **kw))
    return out, t_prompt, max(t_all - t_prompt, 0.0)


def report(n_seq, n_prompt, n_new, t_prompt, t_new):
    print(f"prompt: {n_seq * n_prompt} tokens in {t_prompt:.3f}s ({n_seq * n_prompt / t_prompt:,.0f} tok/s) | "
          f"generation: {n_seq * n_new} tokens in {t_new:.3f}s ({n_seq * n_new / max(t_new, 1e-9):,.0f} tok/s)")


if demo == "recall":
    n = demo_len or ckpt["config"].get("seq_len", 1024)
    try:
        (row, tasks), = data.mqar_eval_set(1, n, seed=seed)
        task = recall_eval.pick_question(tasks, question)
    except ValueError as e:
        raise SystemExit(f"--demo=recall: {e}")
    q, _, f = task
    print(f"recall demo: {n} held-out tokens holding {len(tasks)} facts, each asked again later; the fact:")
    print(f"  ...{data.decode(row[max(0, f - 12):f + 3].tolist())!r}...")
    print(f"the prompt ends with the question ({q + 1} tokens):\n  ...{data.decode(row[max(0, q - 12):q + 1].tolist())!r}")
    with ctx:
        explained = recall_eval.explain(model, row, task)
    print("\n".join(recall_eval.explain_lines(explained, model.cfg.msa_select)))
elif image:
    if image == "generated":
        img, caption, _ = data.make_shape_image(np.random.default_rng(seed))
        print(f"generated image, true caption: {caption!r}")
    else:
        try:
            img = data.load_image(image)
        except ValueError as e:
            raise SystemExit(f"--image: {e}")  # e names the file, what was expected and what came
    x, p = data.caption_prompt([img], device)                                 # (1, 22), (1, 22, PATCH_DIM)
    with ctx:
        out, t_prompt, t_new = generate(x, 16, temperature=0, patches=p, decode=decode)
    print("caption:", data.decode(out[0, x.shape[1]:].tolist()).split("\n")[0].split("<|endoftext|>")[0].strip())
    report(1, x.shape[1], 16, t_prompt, t_new)
else:
    prompt = data.encode(start)
    if not prompt:
        raise SystemExit("--start must hold at least one token")
    x = torch.tensor([prompt] * num_samples, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with ctx:
        out, t_prompt, t_new = generate(x, max_new_tokens, temperature=temperature, top_k=top_k or None, generator=gen,
                                        decode=decode)
    for row in out.tolist():
        print(data.decode(row))
        print("---------------")
    report(num_samples, len(prompt), max_new_tokens, t_prompt, t_new)
