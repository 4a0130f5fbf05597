"""sample.py on a checkpoint from a one-iteration tiny training, and its messages for bad input; the decode path
of model.py that it runs (CPU tests, and on a GPU the CUDA-graphed step against the eager one): sampling on the
device (sample_token), the compiled decode step against the eager one, no host sync inside a step."""
import gc
import numpy as np
import pytest
import torch
from PIL import Image

import decoding
import msa_triton
from conftest import requires_cuda
from data import encode, save_image
from decoding import KVCache, sample_token
from test_checkpoint import evil_checkpoint, fails
from test_data import png_header
from test_model import PATCH, batch, tiny
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
    with pytest.raises(SystemExit, match="expected a checkpoint written by train.py.* got a dict without the keys"):
        run_script("sample.py", f"--out_dir={tmp_path}")


def test_bad_settings_end_in_one_line(out_dir, tmp_path):
    """Each ends in one line on stderr (what was expected, what came) and a non-zero exit, no traceback."""
    png_header(tmp_path / "huge.png", 15000, 15000)
    png_header(tmp_path / "big.png", 3000, 3000)
    cases = [(["--num_samples=0"], "--num_samples must be >= 1, got 0"),
             (["--top_k=-1"], "--top_k must be >= 0 (0: no cut), got -1"),
             (["--top_k=None"], "top_k expects an int (default 200), got None"),
             (["--temperature=-1"], "--temperature must be >= 0 (0 is greedy), got -1"),
             ([f"--start=FILE:{tmp_path / 'missing.txt'}"],
              f"--start=FILE:{tmp_path / 'missing.txt'}: expected a readable UTF-8 text file, got FileNotFoundError"),
             (["--backend=triton"], "backend='triton' needs a CUDA GPU and none was found"),
             ([f"--image={tmp_path / 'huge.png'}"], f"--image: '{tmp_path / 'huge.png'}': expected a 32x32 image, "
                                                  f"got one of more than"),
             ([f"--image={tmp_path / 'big.png'}"], "expected a 32x32 image, got 3000x3000")]
    for args, msg in cases:  # GPUs hidden and Triton's interpreter off: a machine without CUDA
        line = fails("sample.py", f"--out_dir={out_dir}", *args, env_extra=dict(CUDA_VISIBLE_DEVICES=""),
                     drop_env=("TRITON_INTERPRET",))
        assert msg in line, (args, line)


@pytest.mark.parametrize("kind,got", [("empty", "got an empty file"), ("truncated", "got a truncated or damaged"),
                                      ("text", "got a text file")])
def test_damaged_checkpoint_ends_in_one_line(out_dir, tmp_path, kind, got):
    raw = open(f"{out_dir}/ckpt.pt", "rb").read()
    (tmp_path / "ckpt.pt").write_bytes({"empty": b"", "truncated": raw[:len(raw) // 2], "text": b"hello\n"}[kind])
    line = fails("sample.py", f"--out_dir={tmp_path}")
    assert line.startswith(f"{tmp_path / 'ckpt.pt'}: expected a checkpoint written by train.py") and got in line


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "created"
    evil_checkpoint(tmp_path / "ckpt.pt", marker)
    line = fails("sample.py", f"--out_dir={tmp_path}")
    assert line.startswith(f"{tmp_path / 'ckpt.pt'}: expected a checkpoint") and "posix.system" in line
    assert not marker.exists()


# -----------------------------------------------------------------------------------------------
# the decode path of model.py that sample.py runs: sync-free MoE, dense decoding, the CUDA graph

def test_sample_dense_decode_equals_sparse_when_k_covers_everything(out_dir, capsys):
    # 6 + 40 tokens in blocks of 8: K = 8 selects every block, so sparse and dense decoding agree greedily
    runs = {}
    for decode in ("sparse", "dense"):
        run_script("sample.py", f"--out_dir={out_dir}", "--start=ROMEO:", "--num_samples=2", "--max_new_tokens=40",
                   "--temperature=0", "--msa_topk=8", f"--decode={decode}")
        out = capsys.readouterr().out
        assert f"{decode} decode, K=8" in out and "generation: 80 tokens" in out
        runs[decode] = [line for line in out.splitlines()  # the samples, not the timings
                        if "tok/s" not in line and "decode, K=" not in line and "first call" not in line]
    assert runs["sparse"] == runs["dense"]
    with pytest.raises(SystemExit, match="--decode must be 'sparse' or 'dense'"):
        run_script("sample.py", f"--out_dir={out_dir}", "--decode=fast")


def test_moe_layer_same_whatever_the_token_count():
    # the same layer on the same tokens: one and a few at a time (decoding), then all at once (training); one
    # moe_dispatch for all of them
    moe = tiny().blocks[0].moe
    x = torch.randn(2, 64, 32)
    whole, _, load = moe(x)
    for n in (1, 8):
        parts = [moe(x[:, i:i + n]) for i in range(0, 64, n)]                 # 2 * n tokens each
        torch.testing.assert_close(torch.cat([p[0] for p in parts], 1), whole, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.stack([p[2] for p in parts]).mean(0), load)


def test_generate_dense_decode():
    """decode='dense': MSA layers attend to the whole cache. With K covering every block that is what sparse
    decoding computes too; with a sparse K it is not (so the option really changes the attention)."""
    x, _, _ = batch()
    x = x[:, :11].clamp(max=PATCH - 1)
    everything = tiny(msa_topk=10).eval()                  # 10 blocks of 4 >= 11 + 20 tokens
    sparse = everything.generate(x, 20, temperature=0)
    dense = everything.generate(x, 20, temperature=0, decode="dense")
    assert torch.equal(sparse, dense)
    model = tiny().eval()                                  # K = 3 blocks of 4 < 31 tokens
    xs = batch()[0].clamp(max=PATCH - 1)                   # (B, 40) text only
    with torch.no_grad():
        last = []
        for dense_decode in (False, True):                 # prefill 30 tokens, decode the one at position 30
            cache = [KVCache(40, dense=dense_decode) for _ in model.blocks]
            model(xs[:, :30], cache=cache)
            last.append(model(xs[:, 30:31], cache=cache, pos0=torch.tensor([30]))[0])
    assert (last[0] - last[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="decode must be"):
        model.generate(x, 2, decode="fast")


def gpu_tiny(**kw):
    """tiny() with head dims of 16 (the Triton kernels' smallest tile), on the GPU, with the Triton kernels."""
    return tiny(backend="triton", n_embd=64, index_dim=16, expert_hidden=32, **kw).cuda().eval()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["msa", "dense"])
def test_graphed_decode_step_equals_eager_step(dtype, attention):
    """The decode step captured once (decoding.cuda_graphed) and replayed with new token ids and positions gives
    the eager step's logits, step after step, and both equal the full forward's (the selection is sparse)."""
    model = gpu_tiny(attention=attention)
    x, _, patches = (t.cuda() for t in batch())
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.no_grad(), autocast:
        full = model(x, patches=patches)[0].float()                           # (B, T, V)
        caches = []
        for _ in range(2):                                                    # one for the graph, one eager
            caches.append([KVCache(40) for _ in model.blocks])
            model(x[:, :9], patches=patches[:, :9], cache=caches[-1])
        tok, pos = x.new_zeros(2, 1), torch.zeros(1, dtype=torch.long, device="cuda")
        graphed = lambda: model(tok, cache=caches[0], pos0=pos)[0][:, -1].float()
        replay, got, want = None, [], []
        for t in range(9, 40):
            tok.copy_(x[:, t:t + 1])
            pos.fill_(t)
            if replay is None:
                g, replay = decoding.cuda_graphed(graphed)
            else:
                g = replay()
            got.append(g.clone())
            want.append(model(x[:, t:t + 1], cache=caches[1], pos0=t)[0][:, -1].float())
    got, want = torch.stack(got, 1), torch.stack(want, 1)                     # (B, 31, V)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(got, full[:, 9:], rtol=10 * tol, atol=10 * tol)


@requires_cuda
def test_generate_on_gpu_equals_reforward():
    # greedy generation through the graphed step == re-running the whole sequence (float32), sparse K
    model = gpu_tiny()
    x = batch()[0][:, :11].clamp(max=PATCH - 1).cuda()
    out = model.generate(x, max_new_tokens=25, temperature=0)
    ref = x
    with torch.no_grad():
        for _ in range(25):
            ref = torch.cat([ref, model(ref)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)
    dense = model.generate(x, max_new_tokens=25, temperature=0, decode="dense")
    assert dense.shape == out.shape and torch.equal(dense[:, :11], x)


# -----------------------------------------------------------------------------------------------
# sampling on the device, and the compiled decode step (GPT.generate's compile)

@pytest.fixture
def fresh_dynamo():
    """Each test compiles its own decode steps: torch._dynamo's cache (and its limit of 8 shapes per function)
    starts empty."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_argmax_in_pieces_equals_torch_argmax():
    """decoding.argmax: the first index of the largest value, as torch.argmax, for rows not a multiple of the pieces,
    ties inside a piece and across pieces, -inf entries, one row and several."""
    from decoding import argmax
    g = torch.Generator().manual_seed(0)
    for V in (1, 5, 64, 100, 50304):
        x = torch.randn(3, V, generator=g)
        x[1] = x[1].round()                                                    # many ties
        x[2, : V // 2] = float("-inf")
        assert torch.equal(argmax(x), x.argmax(-1)), V
    x = torch.zeros(2, 300)
    x[0, [7, 150, 299]] = 1.0                                                  # equal maxima in three pieces
    x[1, [150, 151]] = 2.0                                                     # two in one piece
    assert argmax(x).tolist() == [7, 150] == x.argmax(-1).tolist()
    assert torch.equal(argmax(x, pieces=7), x.argmax(-1))


def test_sample_token_draws_from_the_softmax():
    """The Gumbel-max trick draws token i with probability softmax(logits / temperature)_i; top_k renormalises
    over the k largest; temperature 0 and top_k=1 are the argmax."""
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 1.5]])
    n = 40000
    g = torch.Generator().manual_seed(0)
    for temperature, top_k in ((1.0, None), (0.5, None), (2.0, 2)):
        u = torch.rand(n, 5, generator=g)
        got = torch.bincount(sample_token(logits.expand(n, 5), temperature, top_k, u), minlength=5) / n
        want = logits[0] / temperature
        if top_k is not None:
            want = want.masked_fill(want < want.topk(top_k).values[-1], float("-inf"))
        torch.testing.assert_close(got, want.softmax(-1), rtol=0, atol=0.01)  # ~5 standard errors
    many = torch.randn(64, 100, generator=g)
    u = torch.rand(64, 100, generator=g)
    assert torch.equal(sample_token(many, 0, None, None), many.argmax(-1))
    assert torch.equal(sample_token(many, 0.7, 1, u), many.argmax(-1))
    assert not torch.equal(sample_token(many, 0.7, None, u), many.argmax(-1))


def generate_both(model, x, n, compile="aot_eager", seed=None, **kw):
    """model.generate eagerly and with the compiled step -> (eager tokens, compiled tokens); seed: each call
    samples with a generator of that seed."""
    gen = lambda: None if seed is None else torch.Generator(device=x.device).manual_seed(seed)
    return tuple(model.generate(x, n, compile=c, generator=gen(), **kw) for c in (False, compile))


@pytest.mark.parametrize("kw,decode", [({}, "sparse"), ({}, "dense"), (dict(attention="dense"), "sparse"),
                                       (dict(msa_select="local"), "sparse"), (dict(index_fp8=True), "sparse")])
def test_compiled_step_same_greedy_tokens(fresh_dynamo, kw, decode):
    """The decode step through torch.compile (aot_eager: dynamo's trace of the whole step, fullgraph, run
    eagerly) gives the eager step's greedy tokens, for sparse and dense decoding, a dense model, a blind
    selection and an fp8 index cache. The selection is sparse (K * bs = 12 < 31 tokens)."""
    model = tiny(**kw).eval()
    x = batch()[0][:, :11].clamp(max=PATCH - 1)
    eager, compiled = generate_both(model, x, 20, temperature=0, decode=decode)
    assert eager.shape == (2, 31) and torch.equal(eager[:, :11], x)
    assert torch.equal(compiled, eager)


def test_sampling_is_seeded_and_the_same_on_both_paths(fresh_dynamo):
    """With a seeded generator: the same tokens on every call and on both paths; another seed, other tokens;
    top_k=1 is greedy."""
    model = tiny().eval()
    x = batch()[0][:, :11].clamp(max=PATCH - 1)
    eager, compiled = generate_both(model, x, 20, seed=3, temperature=0.8, top_k=20)
    seeded = lambda s: model.generate(x, 20, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(s))
    assert torch.equal(compiled, eager) and torch.equal(seeded(3), eager) and not torch.equal(seeded(4), eager)
    greedy = model.generate(x, 20, temperature=0, compile=False)
    for tokens in generate_both(model, x, 20, seed=5, temperature=1.5, top_k=1):
        assert torch.equal(tokens, greedy)


def test_compiled_step_with_inductor(fresh_dynamo):
    """The default backend (inductor, C++ kernels on a CPU) samples the eager step's tokens (one compile: the
    greedy case is aot_eager's above, and inductor's on a GPU below)."""
    model = tiny(n_layer=2).eval()
    x = batch()[0][:, :11].clamp(max=PATCH - 1)
    eager, compiled = generate_both(model, x, 12, compile=True, seed=3, temperature=1.0, top_k=20)
    assert torch.equal(compiled, eager)


def test_step_options_round_as_the_eager_step(fresh_dynamo):
    """decoding.STEP_OPTIONS: where the eager step rounds an intermediate to bf16 (the MoE's fp32 partial sums, cast
    before the residual's add and the next norm), the compiled step's fused kernel rounds it too, so both give the
    same bits. (Without emulate_precision_casts, inductor keeps the sum in fp32 and the two differ.) On a GPU when
    there is one, where decode steps run; inductor's CPU code emulates the casts from torch 2.13 on (2.11's does not)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 13):
        pytest.skip(f"inductor's CPU code emulates the casts from torch 2.13 on, this is {torch.__version__}")
    def tail(part, x, w):
        out = part[0]
        for s in range(1, part.shape[0]):
            out = out + part[s]
        y = x + out.to(x.dtype)
        return torch.nn.functional.rms_norm(y.float(), (y.shape[-1],), w).to(x.dtype), y
    g = torch.Generator().manual_seed(0)
    args = [a.to(dev) for a in (torch.randn(16, 8, 512, generator=g), torch.randn(8, 512, generator=g).bfloat16(),
                                torch.ones(512))]
    compiled = torch.compile(tail, fullgraph=True, dynamic=False, options=decoding.STEP_OPTIONS)(*args)
    for a, b in zip(compiled, tail(*args)):
        assert torch.equal(a, b)


def test_failed_compile_decodes_eagerly(fresh_dynamo, capsys):
    """A backend that fails: one line says so, and the eager step gives the tokens."""
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")
    model = tiny().eval()
    x = batch()[0][:, :11].clamp(max=PATCH - 1)
    eager, got = generate_both(model, x, 6, compile=broken, temperature=0)
    assert torch.equal(got, eager)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("torch.compile of the decode step failed, decoding eagerly:")
    assert "no compiler here" in out[0]


def generate_fresh(model, *args, **kw):
    """model.generate from a state of its own (self.decoder dropped before and after the call)."""
    model.decoder = None
    try:
        return model.generate(*args, **kw)
    finally:
        model.decoder = None


@pytest.mark.parametrize("decode", ["sparse", "dense"])
def test_generate_keeps_its_state_for_the_next_call(decode):
    """A second call of the same shape reuses the first one's caches and step (self.decoder) and gives a fresh
    state's tokens: another prompt; a shorter prompt of the same total length, whose cache still holds the first
    call's keys past it; sampling; weights changed in place since (the stacked decode weights follow). The first
    call's tokens are not overwritten. Another shape, setting, weight dtype or RoPE table builds a new state."""
    model = tiny().eval()
    x = batch()[0][:, :21].clamp(max=PATCH - 1)
    y = batch(seed=2)[0][:, :21].clamp(max=PATCH - 1)
    first = model.generate(x, 19, temperature=0, decode=decode)
    kept = first.clone()
    for before, (prompt, n), kw in [(x, (y, 19), dict(temperature=0)), (x, (y[:, :15], 25), dict(temperature=0)),
                                    (y[:, :17], (x[:, :17], 23), dict(temperature=0.8, top_k=20))]:
        seeded = lambda: dict(generator=torch.Generator().manual_seed(1)) if kw["temperature"] else {}
        model.generate(before, prompt.shape[1] + n - before.shape[1], decode=decode, **kw, **seeded())
        st = model.decoder
        got = model.generate(prompt, n, decode=decode, **kw, **seeded())
        assert model.decoder is st                                           # the same state, reused
        assert torch.equal(got, generate_fresh(model, prompt, n, decode=decode, **kw, **seeded()))
    assert torch.equal(first, kept)
    model.generate(x, 19, temperature=0, decode=decode)
    st = model.decoder
    with torch.no_grad():
        torch.manual_seed(5)
        for block in model.blocks:                                           # new q, k, v and index weights
            for w in (block.attn.wqkv.weight, block.attn.wi.weight) if block.attn.learned else (block.attn.wqkv.weight,):
                w.normal_(std=0.3)
    got = model.generate(y, 19, temperature=0, decode=decode)
    assert model.decoder is st and torch.equal(got, generate_fresh(model, y, 19, temperature=0, decode=decode))
    model.generate(y, 19, temperature=0, decode=decode)
    st = model.decoder
    model.generate(y, 19, temperature=0.5, decode=decode)                    # another setting: a new state
    assert model.decoder is not st
    st = model.decoder
    model.double()
    model.generate(y, 19, temperature=0.5, decode=decode)                    # other weights: a new state
    assert model.decoder is not st and model.decoder.cache[0].k.dtype == torch.float64
    st = model.decoder
    model.rope_reach(2 * model.rope_n)                                       # new RoPE tables: a new state
    model.generate(y, 19, temperature=0.5, decode=decode)
    assert model.decoder is not st
    assert model.generate(y, 0).shape == (2, 21) and model.decoder.key[1] == 40   # a prefill alone keeps the state


@requires_cuda
@pytest.mark.parametrize("attention,decode", [("msa", "sparse"), ("msa", "dense"), ("dense", "sparse")])
def test_compiled_graphed_equals_eager_on_gpu(fresh_dynamo, attention, decode):
    """On CUDA, the compiled step (inductor) captured in a CUDA graph gives the eager graphed step's tokens,
    greedy and seeded sampling, float32."""
    model = gpu_tiny(attention=attention)
    x = batch()[0][:, :11].clamp(max=PATCH - 1).cuda()
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=10)):
        eager, compiled = generate_both(model, x, 25, compile=True, seed=7, decode=decode, **kw)
        assert torch.equal(compiled, eager), kw


@requires_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_graph_replayed_in_later_calls_on_gpu(fresh_dynamo, compile):
    """On CUDA a second call of the same shape replays the first call's graph, each call in an autocast region of
    its own (float32 weights, bf16 autocast: the graph holds no cast cached by an ended region), and gives a fresh
    state's tokens, greedy and sampled."""
    model = gpu_tiny()
    x = batch()[0][:, :11].clamp(max=PATCH - 1).cuda()
    y = batch(seed=2)[0][:, :11].clamp(max=PATCH - 1).cuda()
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=10)):
        seeded = lambda: dict(generator=torch.Generator(device="cuda").manual_seed(3)) if kw["temperature"] else {}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model.generate(x, 25, compile=compile, **kw, **seeded())
        replay = model.decoder.replay
        torch.cuda.empty_cache()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model.generate(y, 25, compile=compile, **kw, **seeded())
        assert model.decoder.replay is replay
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.equal(got, generate_fresh(model, y, 25, compile=compile, **kw, **seeded())), kw


@requires_cuda
def test_graph_keeps_what_it_reads_alive():
    """A graph holds addresses only: replay keeps fn alive, and with it a tensor that only fn holds, which would
    otherwise be freed after the capture and its memory handed to the next tensor of its size."""
    def make():
        w = torch.arange(1 << 20, device="cuda", dtype=torch.float32)       # held by fn alone
        out = torch.empty_like(w)
        return decoding.cuda_graphed(lambda: torch.mul(w, 2, out=out))[1]
    replay = make()
    gc.collect()
    junk = torch.full((1 << 20,), -7.0, device="cuda")                      # w's size: its block, were it free
    assert torch.equal(replay(), 2 * torch.arange(1 << 20, device="cuda", dtype=torch.float32))
    del junk


@requires_cuda
def test_kept_graph_survives_a_dynamo_reset(fresh_dynamo):
    """torch._dynamo.reset() drops the compiled step's code; the kept graph replays kernels and memory of its own,
    so a later call (replaying it) still gives a fresh state's tokens, also after the freed memory is reused."""
    model = gpu_tiny()
    x = batch()[0][:, :11].clamp(max=PATCH - 1).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = generate_fresh(model, x, 25, temperature=0)
        model.generate(x, 25, temperature=0)
        replay = model.decoder.replay
        torch._dynamo.reset()
        gc.collect()
        junk = torch.full((1 << 26,), -7, dtype=torch.int32, device="cuda")      # 256 MB over what was freed
        del junk
        got = model.generate(x, 25, temperature=0)
    assert model.decoder.replay is replay
    assert torch.equal(got, want)


@requires_cuda
@pytest.mark.parametrize("decode", ["sparse", "dense"])
def test_decode_step_waits_on_nothing(fresh_dynamo, decode):
    """The decode step (eager and compiled, un-graphed and replayed) and the uniforms' draw never sync with the
    host: torch.cuda.set_sync_debug_mode('error') turns a sync into an error. The checking mode (a sync) is off."""
    model = gpu_tiny()
    x = batch()[0][:, :11].clamp(max=PATCH - 1).cuda()
    prev = msa_triton.checks(False)
    try:
        with torch.no_grad():
            cache = [KVCache(40, dense=decode == "dense") for _ in model.blocks]
            model(x[:, :10], cache=cache)                                       # positions 0..9
            tok, pos = x[:, 10:].clone(), torch.tensor([10], device="cuda")    # the step's token, at 10
            out = torch.zeros(2, 40, dtype=torch.long, device="cuda")
            u = torch.empty(2, model.cfg.vocab_size, device="cuda")
            gen = torch.Generator(device="cuda").manual_seed(0)
            compiled = decoding.compiled_step(model.decode_step, "inductor")
            for step in (model.decode_step, compiled):
                step(tok, pos, cache, out, u.uniform_(generator=gen), 1.0, 5)    # warm-up (compiles)
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    for _ in range(3):
                        step(tok, pos, cache, out, u.uniform_(generator=gen), 1.0, 5)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            replay = decoding.cuda_graphed(lambda: compiled(tok, pos, cache, out, u, 1.0, 5))[1]
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(5):
                    u.uniform_(generator=gen)
                    replay()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            assert pos.item() == 10 + 2 * 4 + 1 + 5 and int(out[:, 11:pos.item() + 1].max()) < model.cfg.vocab_size
    finally:
        msa_triton.checks(prev)
