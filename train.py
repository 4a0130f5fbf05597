"""
Train nanoMSA. nanoGPT's shape: the settings below are plain globals; a config file and --key=value
overrides change them (configurator.py; an unknown key is an error).

  python train.py                              # CUDA: config/train_gpu.py, else config/train_cpu.py
  python train.py config/train_cpu.py --max_iters=100
  python train.py --init_from=resume           # continue exactly where the last checkpoint left off
  Ctrl-C                                       # saves a checkpoint at the current iteration, then stops
  torchrun --standalone --nproc_per_node=2 train.py --batch_size=16 --gradient_accumulation_steps=2   # DDP, 2 GPUs

Total loss = LM + kl_coeff * KL (summed over the MSA layers) + balance_coeff * balance (MoE).
The KL trains only the index branch (it reads x.detach()); the LM loss trains everything else.

The data position is a function of (seed, iteration, micro-step): micro-batch m of iteration i (m counts the
gradient_accumulation_steps micro-steps of all GPUs together) is drawn from default_rng([TRAIN_STREAM, seed, i, m]).
So 1 GPU with gradient_accumulation_steps=2 and 2 GPUs with 1 each train on the same batches, and a resumed run
needs only iter_num to continue exactly: bitwise on a CPU, and on a GPU with --deterministic=True (by default the
GPU's fastest kernels are not deterministic, and two runs of the same seed agree closely, not bitwise).
"""
import json
import math
import os
import signal
import sys
import time
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import data
import recall_eval
from configurator import configure
from model import GPT, GPTConfig, autocast, gpu_peak_flops

# -----------------------------------------------------------------------------------------------
# settings (the defaults here are overridden by config/train_gpu.py or config/train_cpu.py)
out_dir = "out"
init_from = "scratch"         # 'scratch' or 'resume' (from out_dir/ckpt.pt)
data_path = ""                # '' = built-in Shakespeare; else your text file or folder (prepared once, data.prepare)
data_images = ""              # optional folder of 32x32 images with same-named .txt captions ('' = generated shapes)
p_image = data.P_IMAGE        # chance that a packed segment is an image-caption pair rather than text
p_mqar = 0.0                  # chance that a row is the multi-query associative recall task (data.mqar_row)
mqar_distance = "uniform"     # its fact-to-question distances: 'uniform' over the row, or 'log' (log-uniform)
mqar_text_loss = True         # its text tokens are targets too; False: only its answers (a weighting: say so)
p_repeat = 0.0                # chance that a row is an induction warm-up row (data.repeat_row); p_mqar + p_repeat <= 1
# the short-row stages, at the start (the same tokens per iteration, in more, shorter rows):
repeat_iters = 0              # iterations of warm-up rows only, of short_len tokens: the lookup by content forms there
short_iters = 0               # then iterations of the usual mixture in rows that double from short_len towards seq_len
                              # (short_len, 2 short_len, ... < seq_len, an equal share each); then rows of seq_len
short_len = 256
seed = 1337                   # the initial weights and the training batches (the evaluation sets stay: EVAL_SEED)
# model (model.GPTConfig)
n_layer = 6
n_head = 8
n_kv_head = 2
n_embd = 512
index_dim = 64
index_rope = True             # RoPE on the index branch (False: content-only index scores)
attention = "msa"             # 'msa' or 'dense' (every layer dense, nothing else changed)
n_dense_layers = 1
msa_block_size = 64
msa_topk = 4
msa_select = "indexer"        # which blocks: 'indexer' (learned), or the blind controls 'local' and 'random' (no KL)
index_fp8 = False             # index scores (the selection, not the KL) in fp8 e4m3: an fp8 decoding cache
n_expert = 8
expert_topk = 2
shared_expert = True
expert_hidden = 512
rope_theta = 10000.0
tie_embeddings = True         # the LM head reuses the token embedding's matrix; False: a matrix of its own
backend = "auto"              # 'auto' (msa_triton on CUDA if complete, else msa_ref), 'ref', 'triton'
# training
seq_len = 1024
batch_size = 16               # sequences per micro-step and GPU
gradient_accumulation_steps = 1   # total over all GPUs
max_iters = 2000
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
lr_decay_iters = 2000         # cosine from learning_rate down to min_lr, then flat
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
kl_coeff = 1.0
kl_warmup_iters = 0           # the first steps train the indexer with the dense KL (every visible token)
msa_dense_iters = 0           # the first steps run the MSA layers as dense attention, with the dense KL: their attention
                              # learns where to look (the teacher the indexer follows) before it must choose
balance_coeff = 0.01
compile = True                # torch.compile the training step on CUDA (a CPU trains eagerly, with a message)
compile_mode = "reduce-overhead"  # 'reduce-overhead': the compiled step replays as CUDA graphs (no host time between
                              # its kernels); 'default': no graphs. Graphs run in one process (DDP compiles without them)
# evaluation and logging
eval_interval = 250
eval_iters = 20               # val batches per evaluation
eval_captions = 64            # held-out images captioned greedily per evaluation
eval_long_range = 16          # long-range questions per evaluation
eval_mqar = 0                 # held-out recall rows of seq_len tokens per evaluation (recall_eval.mqar_eval): accuracy
                              # by distance, and per MSA layer whether the chosen blocks hold the fact; 0 = none
eval_repeat = 32              # held-out warm-up rows per evaluation (recall_eval.repeat_eval), in a run that has them
log_interval = 10
peak_flops = 0.0              # per GPU, for the MFU: 0 = the GPU's dense bf16 peak by its name (model.gpu_peak_flops)
deterministic = False         # True: deterministic kernels only (torch.use_deterministic_algorithms), so that on a GPU too
                              # the same seed gives the same bits and a resumed run continues bitwise (they can be slower)
# -----------------------------------------------------------------------------------------------
if not any(not a.startswith("--") for a in sys.argv[1:]):  # no config file given: pick the preset
    _preset = "config/train_gpu.py" if torch.cuda.is_available() else "config/train_cpu.py"
    if not torch.cuda.is_available():
        print(f"no CUDA GPU found: running the CPU preset {_preset}")
    sys.argv.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), _preset))
config = configure(globals(), sys.argv[1:])
for _key, _choices in [("init_from", ("scratch", "resume")), ("compile_mode", ("default", "reduce-overhead")),
                       ("mqar_distance", ("uniform", "log"))]:
    if config[_key] not in _choices:
        raise SystemExit(f"config error: {_key} must be {' or '.join(map(repr, _choices))}, got {config[_key]!r}")
for _key, _least in [("batch_size", 1), ("seq_len", 1), ("gradient_accumulation_steps", 1), ("max_iters", 0),
                     ("eval_interval", 1), ("eval_iters", 1), ("eval_captions", 0), ("eval_long_range", 0),
                     ("eval_mqar", 0), ("log_interval", 1)]:
    if config[_key] < _least:
        raise SystemExit(f"config error: {_key} must be >= {_least}, got {config[_key]}")
if not 0 <= p_mqar <= 1:
    raise SystemExit(f"config error: p_mqar must be in [0, 1], got {p_mqar}")
if not (0 <= p_repeat and p_mqar + p_repeat <= 1):
    raise SystemExit(f"config error: p_repeat must be >= 0 and p_mqar + p_repeat <= 1, got {p_repeat} and {p_mqar}")
# the short rows' lengths: short_len doubling below seq_len (none without the short-row stages)
RAMP = [short_len << k for k in range(32) if 0 < short_len << k < seq_len] if repeat_iters + short_iters else []
if repeat_iters < 0 or short_iters < 0 or (repeat_iters + short_iters and not (
        16 <= short_len <= seq_len and all(batch_size * seq_len % n == 0 for n in RAMP))):
    raise SystemExit(f"config error: expected repeat_iters, short_iters >= 0 and short_len in [16, seq_len] whose "
                     f"doublings below seq_len divide batch_size * seq_len = {batch_size * seq_len}; got "
                     f"{repeat_iters}, {short_iters}, {short_len}")
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:  # NCCL between GPUs; gloo between CPU processes (how the CI test checks DDP without a GPU)
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if torch.cuda.is_available() else "cpu"
    if "cuda" in device:
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world:
        raise SystemExit(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of the {world} GPUs")
    gradient_accumulation_steps //= world
else:
    rank, world = 0, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
master = rank == 0
say = print if master else (lambda *a, **k: None)
tokens_per_iter = gradient_accumulation_steps * world * batch_size * seq_len
say(f"tokens per iteration: {tokens_per_iter:,}")
torch.manual_seed(seed)
if deterministic:  # before the first matrix product: cuBLAS reads its workspace setting when it starts
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)  # also makes torch.compile generate no atomic adds and skip autotuning
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ctx = autocast(device)
try:  # the data, and one row of every kind and length this run draws: a setting no row fits stops here
    data.prepare(data_path or None, data_images or None)
    for _n in {seq_len, *RAMP}:
        for _mqar, _repeat in [(0.0, 0.0)] + [(1.0, 0.0)] * (p_mqar > 0) + [(0.0, 1.0)] * (p_repeat > 0):
            data.get_batch("train", 1, _n, np.random.default_rng(0), "cpu", p_image, _mqar, mqar_distance,
                           mqar_text_loss, _repeat)
    if repeat_iters:
        data.get_batch("train", 1, short_len, np.random.default_rng(0), "cpu", p_image, 0.0, p_repeat=1.0)
    if eval_long_range:
        data.long_range_eval_set(1, seq_len)
except ValueError as e:
    raise SystemExit(f"data error: {e}")
RUN_KEYS = ("seed", "seq_len", "batch_size", "gradient_accumulation_steps", "learning_rate", "min_lr", "warmup_iters",
            "lr_decay_iters", "weight_decay", "beta1", "beta2", "grad_clip", "kl_coeff", "kl_warmup_iters",
            "msa_dense_iters", "balance_coeff", "data_path", "data_images", "p_image", "p_mqar", "mqar_distance",
            "mqar_text_loss", "p_repeat", "repeat_iters", "short_iters", "short_len")  # what a resume must keep
TRAIN_STREAM = 0x7A1  # tags the training batches' seeds, apart from evaluate()'s and data.py's eval sets
EVAL_SEED = 1337      # the evaluation sets' seed, whatever --seed is: runs of several seeds are scored on the same
                      # held-out examples, so their differences are the models', not the examples'

# model -----------------------------------------------------------------------------------------
model_args = {f.name: config[f.name] for f in fields(GPTConfig) if f.name in config}
model_args.update(vocab_size=data.VOCAB_SIZE, patch_dim=data.PATCH_DIM, img_patch_id=data.IMG_PATCH)
ckpt_path, log_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.jsonl")
iter_num = 0
if init_from == "resume":
    if not os.path.isfile(ckpt_path):
        raise SystemExit(f"--init_from=resume: no checkpoint at {ckpt_path}; train from scratch first")
    try:
        ckpt = checkpoint.load(ckpt_path, device, resume=True)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"--init_from=resume: {e}")
    defaults = {f.name: f.default for f in fields(GPTConfig)}                 # for keys older checkpoints lack
    diff = {k: (ckpt["model_args"].get(k, defaults[k]), v) for k, v in model_args.items()
            if ckpt["model_args"].get(k, defaults[k]) != v}
    # besides the model, an exact resume needs the same batches (their seeds, sizes and mixture) and schedule;
    # max_iters may grow, and evaluation, logging and speed settings may change
    diff.update({k: (ckpt["config"][k], config[k]) for k in RUN_KEYS if ckpt["config"].get(k, config[k]) != config[k]})
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise SystemExit(f"the checkpoint {ckpt_path} comes from another config ({what}); "
                         f"resume with the config it was trained with, or use another out_dir")
try:
    model = GPT(GPTConfig(**model_args), backend=backend).to(device)
except ValueError as e:  # GPTConfig.check (e.g. n_embd not a multiple of n_head) or model.get_backend
    raise SystemExit(f"config error: {e}")
say(f"model: {model.num_params() / 1e6:.2f}M parameters, backend {model.backend.__name__}, attention {attention}"
    f"{'' if msa_select == 'indexer' or attention == 'dense' else f' ({msa_select} selection: a blind control, no KL)'}")
decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and expert weights decay; norms, biases don't
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                              lr=learning_rate, betas=(beta1, beta2), fused="cuda" in device)
if init_from == "resume":
    try:
        checkpoint.load_weights(model, ckpt, ckpt_path)
    except checkpoint.CheckpointError as e:
        raise SystemExit(f"--init_from=resume: {e}")
    optimizer.load_state_dict(ckpt["optimizer"])
    iter_num = ckpt["iter_num"]
    if iter_num > max_iters:
        raise SystemExit(f"--init_from=resume: {ckpt_path} is at iteration {iter_num}, past max_iters={max_iters}; "
                         f"pass a larger --max_iters")
    torch.set_rng_state(ckpt["torch_rng"].cpu())
    if "cuda" in device and ckpt["cuda_rng"] is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
    say(f"resumed from {ckpt_path} at iteration {iter_num}")
    del ckpt
raw_model = model
graphs = False  # whether the compiled step replays as CUDA graphs
if compile and "cuda" not in device:
    say("compile: skipped on the CPU (torch.compile is for the GPU; the CPU preset trains eagerly)")
elif compile:
    graphs = compile_mode == "reduce-overhead" and not ddp
    if compile_mode == "reduce-overhead" and not graphs:
        say("compile: mode 'default' (CUDA graphs run in one process, not under DDP)")
    # training's forward and backward (evaluation and generation use raw_model); static shapes: the short-row
    # stages and the rows of seq_len compile once each, instead of one graph generalised over every length
    raw_model.rope_reach(seq_len)  # the RoPE tables' rows are read, not computed, in the compiled step
    model = torch.compile(model, dynamic=False, mode="reduce-overhead" if graphs else None)
if ddp:  # the only buffers, the RoPE tables, are equal on every rank: nothing to broadcast each step
    model = DDP(model, device_ids=[torch.device(device).index] if "cuda" in device else None, broadcast_buffers=False)


def fold_grads(sums, last):
    """Under CUDA graphs each replay of the backward writes the gradients into the same buffers, which .grad holds: a
    second micro-step would overwrite the first one's gradients before autograd adds to them. So each micro-step's
    gradients are added into sums (parameter -> a tensor of our own) and .grad cleared; the last puts the sums back."""
    for w in raw_model.parameters():
        if w.grad is not None:
            sums[w] = sums[w].add_(w.grad) if w in sums else w.grad.clone()
        w.grad = sums.pop(w, None) if last else None


grad_sums = {}  # fold_grads' sums, empty between iterations


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def caption_accuracy(n):
    """Greedy captions of n held-out images, all in one batch -> {attribute: fraction right, 'all': all four right}."""
    evalset = data.caption_eval_set(n, seed=EVAL_SEED)
    x, p = data.caption_prompt([img for img, _, _ in evalset], device)        # (n, 22), (n, 22, PATCH_DIM)
    with ctx:
        out = raw_model.generate(x, max_new_tokens=12, temperature=0, patches=p, compile=False)  # see long_range
    right = {}
    for row, (_, _, attrs) in zip(out[:, x.shape[1]:].tolist(), evalset):
        scores = data.score_caption(data.decode(row), attrs)
        for k, ok in list(scores.items()) + [("all", all(scores.values()))]:
            right[k] = right.get(k, 0) + ok / n
    return right


def long_range_accuracy(n):
    """Fraction of long-range questions answered exactly (greedy)."""
    ok = 0
    for prompt, answer in data.long_range_eval_set(n, seq_len, seed=EVAL_SEED):
        with ctx:
            # the eager decode step: the prompts' lengths vary, and each new length would compile the step again
            out = raw_model.generate(torch.tensor([prompt], device=device), len(answer), temperature=0, compile=False)
        ok += out[0, len(prompt):].tolist() == list(answer)
    return ok / n


@torch.no_grad()
def evaluate():
    """Val losses on the same eval_iters batches in every evaluation and run (a private rng from EVAL_SEED: the
    training stream is untouched), per-layer KL, indexer recall (the dense teacher's attention mass inside the chosen
    blocks) and expert load, caption accuracy, long-range accuracy and recall (MQAR) by distance, needle recall."""
    model.eval()
    r = np.random.default_rng([EVAL_SEED, rank, 1])
    acc = {}
    for _ in range(eval_iters):
        x, y, p = data.get_batch("val", batch_size, seq_len, r, device, p_image)
        with ctx:
            _, losses = raw_model(x, y, p)
            recall = raw_model.indexer_recall(x, p)                             # (n_msa,)
        if recall.numel():  # only a model with MSA layers has a recall
            losses["recall_layers"] = recall
        for k in ("lm", "kl", "balance", "kl_layers", "recall_layers", "expert_load"):
            if k in losses:
                acc[k] = acc.get(k, 0) + losses[k].detach().float() / eval_iters
    res = {k: v.tolist() for k, v in acc.items()}
    if master:
        res["caption"] = caption_accuracy(eval_captions) if eval_captions else {}
        res["long_range"] = long_range_accuracy(eval_long_range) if eval_long_range else None
        if eval_mqar:
            n = row_len(iter_num)  # in the short-row stages as many tokens in short rows: has the recall formed there?
            res["mqar"] = recall_eval.mqar_eval(raw_model, eval_mqar * seq_len // n, n, seed=EVAL_SEED,
                                                batch_size=batch_size * seq_len // n)
        if eval_repeat and (repeat_iters or p_repeat):  # has the lookup by content formed?
            n = short_len if repeat_iters else seq_len
            res["repeat"] = recall_eval.repeat_eval(raw_model, eval_repeat, n, seed=EVAL_SEED, batch_size=batch_size)
    model.train()
    return res


def log(record):
    if master:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def row_len(it):
    """The rows' length at iteration `it`: short_len in the warm-up; in the next short_iters iterations each length
    of RAMP in turn (a model that has learnt a lookup at 256 tokens loses it at a sudden jump to 8K, and keeps it
    through doublings); seq_len after them."""
    if it < repeat_iters:
        return short_len
    k = (it - repeat_iters) * len(RAMP) // short_iters if short_iters else len(RAMP)
    return RAMP[k] if k < len(RAMP) else seq_len


def train_batch(it, micro):
    """Micro-batch `micro` (0 .. gradient_accumulation_steps - 1 of this rank) of iteration `it`. Its seed names
    its place in the global order, rank by rank: the same batches whatever the number of GPUs. The short-row
    stages hold the tokens per micro-batch: batch_size * seq_len // row_len(it) rows."""
    m = rank * gradient_accumulation_steps + micro
    T, warm = row_len(it), it < repeat_iters                                  # warm: every row a warm-up row
    return data.get_batch("train", batch_size * seq_len // T, T, np.random.default_rng([TRAIN_STREAM, seed, it, m]),
                          device, p_image, 0.0 if warm else p_mqar, mqar_distance, mqar_text_loss,
                          1.0 if warm else p_repeat)


def save_checkpoint():
    """Everything a resume needs, as tensors and plain values only (checkpoint.load reads nothing else), written
    atomically: a crash or a second Ctrl-C never leaves half a file."""
    if master:
        state = dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), iter_num=iter_num,
                     model_args=model_args, config=config,
                     torch_rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state() if "cuda" in device else None)
        checkpoint.save(ckpt_path, state)


# Ctrl-C (SIGINT) sets a flag that the loop reads between iterations, where the model, the optimizer and the
# data position agree: the checkpoint saved there resumes exactly. In one process a second Ctrl-C stops at once
# without saving (the last checkpoint stays whole); under torchrun every process may get the signal twice (from
# the terminal and from torchrun), so there it only sets the flag.
interrupted = False


def on_sigint(signum, frame):
    global interrupted
    if interrupted and not ddp:
        print(f"interrupted again: stopped without saving; {ckpt_path} holds the last saved iteration",
              file=sys.stderr)
        raise SystemExit(130)
    interrupted = True


def stop_requested():
    """Whether some process got Ctrl-C. Under DDP all of them stop at the same iteration: the flag is all-reduced
    (a host sync), so the loop asks only every log_interval iterations."""
    if not ddp:
        return interrupted
    flag = torch.tensor([float(interrupted)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# training loop ---------------------------------------------------------------------------------
if master:
    os.makedirs(out_dir, exist_ok=True)
if init_from == "resume" and master and os.path.isfile(log_path):  # records past the checkpoint go
    try:
        if checkpoint.trim_log(log_path, iter_num):
            say(f"{log_path}: its last line was cut short (a crash while it was written): dropped")
    except ValueError as e:
        raise SystemExit(f"--init_from=resume: {e}")
start_iter, t_start = iter_num, time.time()
fpt = {(T, kd, md): raw_model.flops_per_token(T, kd, md) for T in {seq_len, *RAMP} for kd in (False, True)
       for md in (False, True)}
say(f"model FLOPs per token: {fpt[seq_len, False, False] / 1e9:.2f} G ({fpt[seq_len, True, False] / 1e9:.2f} G with "
    f"the dense KL warm-up, {fpt[seq_len, True, True] / 1e9:.2f} G with the MSA layers dense)")
if repeat_iters + short_iters:
    say(f"short rows for {repeat_iters + short_iters} iterations: {repeat_iters} of induction warm-up rows of "
        f"{short_len} tokens, then {short_iters} in rows of {', '.join(map(str, RAMP))} tokens; then rows of {seq_len}")
peak = None  # FLOP/s per GPU for the MFU: none on a CPU, nor on a GPU of unknown peak (unless peak_flops is set)
if "cuda" in device:
    gpu = torch.cuda.get_device_name(device)
    peak = peak_flops if peak_flops > 0 else gpu_peak_flops(gpu)
    say(f"MFU against {peak / 1e12:.1f} TFLOP/s per GPU ({gpu})" if peak else
        f"MFU: unknown peak for {gpu} (set --peak_flops=<dense bf16 FLOP/s per GPU> to print it)")
x, y, p = train_batch(iter_num, 0)
t_last, tokens_since, flops_since = time.time(), 0, 0.0
signal.signal(signal.SIGINT, on_sigint)
while True:
    lr = get_lr(iter_num)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and (iter_num > start_iter or init_from == "scratch"):
        t_eval = time.time()
        res = evaluate()
        if master:
            cap = res["caption"]
            load = np.array(res["expert_load"])  # (n_layer, E), each row sums to 1
            recall = " ".join(f"{v:.3f}" for v in res.get("recall_layers", []))
            warm = f" | warm-up rows {res['repeat']:.3f}" if "repeat" in res else ""
            say(f"eval {iter_num}: val lm {res['lm']:.4f} | kl {res['kl']:.4f} (per layer {' '.join(f'{v:.3f}' for v in res['kl_layers'])})"
                f"{f' | recall per layer {recall}' if recall else ''}"
                f" | balance {res['balance']:.3f}, expert load max/min {load.max() / max(load.min(), 1e-9):.2f}"
                f" | captions {' '.join(f'{k} {v:.2f}' for k, v in cap.items())} | long-range {res['long_range']}"
                f"{warm}"
                f" | {time.time() - t_eval:.1f}s")
            if "mqar" in res:
                say("  " + recall_eval.summary_line(res["mqar"]))
            log(dict(eval=iter_num, **res))
        save_checkpoint()
        t_last += time.time() - t_eval  # eval time does not count in tokens/s
    if iter_num == max_iters:
        break
    if (not ddp or iter_num % log_interval == 0) and stop_requested():
        save_checkpoint()
        if master:
            print(f"interrupted: saved {ckpt_path} at iteration {iter_num}; continue with --init_from=resume",
                  file=sys.stderr)
        raise SystemExit(130)
    kl_dense, msa_dense = iter_num < kl_warmup_iters, iter_num < msa_dense_iters
    parts = 0  # (loss, lm, kl, balance) averaged over this iteration's micro-steps (of all GPUs, at log time)
    for micro in range(gradient_accumulation_steps):
        if ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro == gradient_accumulation_steps - 1
        if graphs:  # a new step: the last replay's outputs (read already) may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with ctx:
            _, losses = model(x, y, p, kl_dense=kl_dense, msa_dense=msa_dense)
            loss = losses["lm"] + kl_coeff * losses["kl"] + balance_coeff * losses["balance"]
        parts = parts + torch.stack([loss, losses["lm"], losses["kl"], losses["balance"]]).detach().float()
        # the next micro-batch, drawn while the GPU works on this one
        x, y, p = train_batch(iter_num, micro + 1) if micro + 1 < gradient_accumulation_steps else \
            train_batch(iter_num + 1, 0)
        (loss / gradient_accumulation_steps).backward()
        if graphs and gradient_accumulation_steps > 1:
            fold_grads(grad_sums, last=micro == gradient_accumulation_steps - 1)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    iter_num += 1
    tokens_since += tokens_per_iter
    flops_since += tokens_per_iter * fpt[row_len(iter_num - 1), kl_dense, msa_dense]
    if iter_num % log_interval == 0 or iter_num == max_iters:
        if ddp:
            dist.all_reduce(parts)  # sum over the GPUs
        parts = (parts / gradient_accumulation_steps / world).tolist()
        rec = dict(iter=iter_num, lr=lr, **dict(zip(("loss", "lm", "kl", "balance"), parts)))
        dt = time.time() - t_last
        tok_s = tokens_since / dt
        speed = dict(tok_s=tok_s) if peak is None else dict(tok_s=tok_s, mfu=flops_since / dt / (peak * world))
        eta = (max_iters - iter_num) * tokens_per_iter / tok_s
        mfu = f", MFU {100 * speed['mfu']:.1f}%" if "mfu" in speed else ""
        say(f"iter {iter_num}/{max_iters}: loss {rec['loss']:.4f} (lm {rec['lm']:.4f} kl {rec['kl']:.4f} "
            f"balance {rec['balance']:.3f}{' dense-msa' if msa_dense else ' dense-kl' if kl_dense else ''}) | "
            f"lr {lr:.2e} | "
            f"{f'rows of {row_len(iter_num - 1)} | ' if row_len(iter_num - 1) != seq_len else ''}"
            f"{tok_s:,.0f} tok/s{mfu} | ETA {eta / 60:.1f} min")
        log(dict(rec, **speed))
        t_last, tokens_since, flops_since = time.time(), 0, 0.0
say(f"done: {iter_num - start_iter} iterations in {(time.time() - t_start) / 60:.1f} min; checkpoint {ckpt_path}")
if ddp:
    dist.destroy_process_group()
