"""The decoder and the three decode loops: the interleaved loop runs its logic on the CPU backend; CUDA marked gpu."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from actors.decode import GPT2_SMALL, LOOPS, TINY_DECODER, Decoder, DecoderShape, GenerateConfig, Generator, KVCache
from actors.errors import InputError, ModelLoadError
from actors.models import load_model
from actors.streams import StreamManager

N = 24  # new tokens per test generation
PROMPT = 10


@pytest.fixture(scope="module")
def tiny() -> Decoder:
    torch.manual_seed(0)
    return Decoder(TINY_DECODER).eval()


def prompts(rows: int, length: int = PROMPT, seed: int = 0, vocab: int = TINY_DECODER.vocab_size) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (rows, length))


def generator(model: Decoder, device: str = "cpu", **config) -> tuple[StreamManager, Generator]:
    streams = StreamManager(device=device)
    config = {"max_batch": 16, "max_seq_len": PROMPT + N, **config}
    return streams, Generator(model, streams, GenerateConfig(**config))


def run_all(model: Decoder, x: np.ndarray, n: int = N, device: str = "cpu", **config) -> dict:
    streams, gen = generator(model, device, **config)
    with streams, gen:
        return {loop: gen.generate(x, n, loop, batch_id=3) for loop in LOOPS}


def with_eos(reference: np.ndarray, eos: int, pad: int = 0) -> np.ndarray:
    """What the loops must return given the tokens generated without an EOS: cut after each row's first EOS."""
    out = reference.copy()
    for row in out:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            row[hits[0] + 1:] = pad
    return out


# -- the model -------------------------------------------------------------------------------------

def test_cached_steps_match_the_full_forward_pass(tiny):
    """Prefill + KV-cached steps give the logits of recomputing the whole sequence, position by position."""
    tokens = torch.from_numpy(prompts(3, 14, seed=1))
    cache = KVCache(TINY_DECODER, 3, 14, torch.float32, torch.device("cpu"))
    view = cache.view(3)
    with torch.inference_mode():
        cached = [tiny(tokens[:, :5], view)]
        for pos in range(5, 14):
            cached.append(tiny.step(tokens[:, pos], torch.tensor([pos]), view))
        full = [tiny(tokens[:, :length]) for length in range(5, 15)]
    for got, want in zip(cached, full):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert full[0].std() > 0.1  # random weights give non-degenerate logits


@pytest.mark.parametrize("rows", [1, 3])
def test_traced_step_sums_its_linears_and_attention_at_one_row_and_keeps_them_above(tiny, rows):
    """Under torch.compile a one-row step's linears and attention products become multiply-and-sums.

    The traced graph runs eagerly here (a recording backend), so the sums'
    logits are checked against the untraced step on the CPU.
    """
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    tokens = torch.from_numpy(prompts(rows, 6, seed=2))
    traced = torch.compile(tiny.step, backend=record, fullgraph=True, dynamic=False)
    logits = []
    with torch.inference_mode():
        for step in (tiny.step, traced):
            cache = KVCache(TINY_DECODER, rows, 8, torch.float32, torch.device("cpu"))
            tiny(tokens[:, :5], cache.view(rows))
            logits.append(step(tokens[:, 5], torch.tensor([5]), cache.view(rows)))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    assert logits[0].std() > 0.1
    (graph,) = graphs
    linears = [node for node in graph.graph.nodes if node.target is torch._C._nn.linear]
    matmuls = [node for node in graph.graph.nodes if node.target is torch.matmul]
    assert len(linears) == (0 if rows == 1 else 4 * TINY_DECODER.n_layer + 1)
    assert len(matmuls) == (0 if rows == 1 else 2 * TINY_DECODER.n_layer)


def test_gpt2_small_has_gpt2_small_shapes():
    shape = GPT2_SMALL
    assert (shape.vocab_size, shape.n_positions, shape.d_model, shape.n_layer, shape.n_head) == (50257, 1024, 768, 12,
                                                                                                   12)
    with pytest.raises(ValueError, match="multiple of n_head"):
        DecoderShape(d_model=100, n_head=12)


def test_zoo_decoders_build_and_predict_the_first_generated_token(tiny):
    torch.manual_seed(0)
    built = load_model("zoo:tiny_decoder", kwargs={"prompt_len": PROMPT})
    assert built.input_spec.dtype == "int64" and built.input_spec.row_shape == (PROMPT,)
    x = prompts(4, seed=2)
    with torch.inference_mode():
        next_token = built.postprocess(built.model(torch.from_numpy(x))).numpy()  # batch inference: argmax
    np.testing.assert_array_equal(next_token, run_all(built.model, x)["synced"].tokens[:, 0])
    assert load_model("zoo:tiny_decoder", kwargs={"n_layer": 3}).model.shape.n_layer == 3
    with pytest.raises(ModelLoadError, match="prompt_len"):
        load_model("zoo:tiny_decoder", kwargs={"prompt_len": 0})


# -- the three loops agree --------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_three_loops_give_identical_tokens(tiny, rows, temperature):
    x = prompts(rows, seed=rows)
    results = run_all(tiny, x, temperature=temperature, seed=5)
    naive = results["naive"]
    assert naive.tokens.shape == (rows, N) and naive.tokens.dtype == np.int64
    assert len(np.unique(naive.tokens)) > 5  # not a constant stream
    for loop in ("synced", "interleaved"):
        np.testing.assert_array_equal(results[loop].tokens, naive.tokens, err_msg=loop)
        assert (results[loop].steps, results[loop].launched) == (N, N)


def test_sampling_is_seeded_by_seed_batch_and_row(tiny):
    x = np.repeat(prompts(1, seed=9), 4, axis=0)  # four identical prompts
    streams, gen = generator(tiny, temperature=1.0, seed=1)
    with streams, gen:
        a, b = gen.generate(x, N, batch_id=0).tokens, gen.generate(x, N, batch_id=0).tokens
        other_batch = gen.generate(x, N, batch_id=1).tokens
    np.testing.assert_array_equal(a, b)
    assert len({tuple(row) for row in a}) == 4  # same prompt, different rows: different samples
    assert (a != other_batch).any()
    other_seed = run_all(tiny, x, temperature=1.0, seed=2)["interleaved"].tokens
    greedy = run_all(tiny, x)["interleaved"].tokens
    assert (run_all(tiny, x, temperature=1.0, seed=1)["interleaved"].tokens != other_seed).any()
    assert (greedy == greedy[0]).all() and (a != greedy).any()


def test_padding_rows_of_a_bucket_do_not_change_the_real_rows(tiny):
    x = prompts(4, seed=4)
    three = run_all(tiny, x[:3])  # 3 rows run in the bucket of 4
    four = run_all(tiny, x)
    for loop in LOOPS:
        np.testing.assert_array_equal(three[loop].tokens, four[loop].tokens[:3], err_msg=loop)


# -- end of sequence --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tiny) -> tuple[np.ndarray, np.ndarray]:
    """8 prompts and their tokens without an EOS."""
    x = prompts(8, seed=11)
    return x, run_all(tiny, x)["naive"].tokens


def check_eos(tiny, x: np.ndarray, ref: np.ndarray, eos: int) -> dict:
    want = with_eos(ref, eos, pad=1)
    results = run_all(tiny, x, eos_token_id=eos, pad_token_id=1)
    for loop, r in results.items():
        np.testing.assert_array_equal(r.tokens, want, err_msg=loop)
        hit = want == eos
        np.testing.assert_array_equal(r.lengths, np.where(hit.any(1), hit.argmax(1) + 1, N), err_msg=loop)
    return results


def test_eos_at_the_first_step_of_one_row(tiny, reference):
    x, ref = reference
    eos = int(ref[0, 0])
    results = check_eos(tiny, x, ref, eos)
    assert (results["naive"].tokens[0, 1:] == 1).all()
    assert (results["naive"].lengths > 1).any()  # the other rows went on


@pytest.mark.parametrize("rows", [1, 3])
def test_eos_at_the_first_step_of_every_row_stops_interleaved_one_step_late(tiny, reference, rows):
    x, ref = reference
    x = np.repeat(x[:1], rows, axis=0)  # 3 rows run in the bucket of 4: the padding row must not hold the stop
    results = check_eos(tiny, x, np.repeat(ref[:1], rows, axis=0), int(ref[0, 0]))
    for loop, r in results.items():
        assert r.steps == 1, loop
        assert r.launched == (2 if loop == "interleaved" else 1), loop


def test_eos_at_the_limit(tiny, reference):
    x, ref = reference
    # A row whose last token appears nowhere earlier in it: it finishes at exactly the last step.
    row = next(r for r in range(len(ref)) if ref[r, -1] not in ref[r, :-1])
    results = check_eos(tiny, x[row:row + 1], ref[row:row + 1], int(ref[row, -1]))
    for loop, r in results.items():
        assert (r.steps, r.launched, r.lengths[0]) == (N, N, N), loop


def test_eos_never_emitted(tiny, reference):
    x, ref = reference
    eos = int(np.setdiff1d(np.arange(TINY_DECODER.vocab_size), ref)[0])
    for loop, r in check_eos(tiny, x, ref, eos).items():
        np.testing.assert_array_equal(r.tokens, ref, err_msg=loop)
        assert (r.steps, r.launched) == (N, N) and (r.lengths == N).all(), loop


# -- bad input ---------------------------------------------------------------------------------------

BAD_PROMPTS = [
    (np.zeros((0, PROMPT), np.int64), "empty prompts: shape (0, 10)"),
    (np.zeros((3, 0), np.int64), "empty prompts: shape (3, 0)"),
    (np.array([[1, 2, -1]]), "token id -1 (prompt 0, position 2) is outside the vocabulary 0..255"),
    (np.array([[1, 2], [3, 256]]), "token id 256 (prompt 1, position 1) is outside the vocabulary 0..255"),
    (np.ones((2, PROMPT + 1), np.int64), f"prompt length {PROMPT + 1} + max_new_tokens {N} = {PROMPT + 1 + N} is "
                                         f"too long for the KV cache of {PROMPT + N} positions"),
    (np.ones((17, PROMPT), np.int64), "17 prompts, more than the 16 rows"),
    (np.ones((2, PROMPT), np.float32), "token ids must be integers, got float32"),
    (np.ones(PROMPT, np.int64), "must be a 2-D array"),
]


@pytest.mark.parametrize(("bad", "why"), BAD_PROMPTS, ids=[w.split(":")[0][:24] for _, w in BAD_PROMPTS])
def test_bad_prompts_get_an_error_naming_the_batch(tiny, bad, why):
    streams, gen = generator(tiny)
    with streams, gen:
        with pytest.raises(InputError) as info:
            gen.generate(bad, N, batch_id=7)
        assert str(info.value).startswith("batch 7: ") and why in str(info.value), str(info.value)
        np.testing.assert_array_equal(gen.generate(prompts(2), N).tokens.shape, (2, N))  # still usable


def test_bad_settings_are_refused(tiny):
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 2"):
        GenerateConfig(max_batch=1, max_seq_len=1)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        GenerateConfig(max_batch=1, max_seq_len=8, temperature=-1.0)
    with pytest.raises(ValueError, match="prefill_graphs must be an int >= 0"):
        GenerateConfig(max_batch=1, max_seq_len=8, prefill_graphs=-1)
    with StreamManager(device="cpu") as streams:
        with pytest.raises(ValueError, match="eos_token_id=256 is outside the model's vocabulary"):
            Generator(tiny, streams, GenerateConfig(max_batch=1, max_seq_len=8, eos_token_id=256))
        with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
            Generator(tiny, streams, GenerateConfig(max_batch=1, max_seq_len=257))
        with Generator(tiny, streams, GenerateConfig(max_batch=1, max_seq_len=8)) as gen:
            with pytest.raises(ValueError, match="loop must be one of"):
                gen.generate(prompts(1, 2), 2, "fast")
            with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
                gen.generate(prompts(1, 2), 0)


@pytest.mark.parametrize("rows", [1, 2])
def test_compile_graphs_and_kernels_fall_back_to_eager_on_the_cpu_backend(tiny, rows):
    x = prompts(rows, seed=8)
    want = run_all(tiny, x, graphs=False)["synced"]
    streams, gen = generator(tiny, compile=True, kernels=True)
    with streams, gen:
        assert not gen.stats.compiled and not gen.stats.graphs and not gen.stats.kernels
        assert "kernels off" in gen.stats.fallback_reason
        np.testing.assert_array_equal(gen.generate(x, N, "interleaved").tokens, want.tokens)
        with pytest.raises(RuntimeError, match="needs CUDA and graphs on"):
            gen.device_step_seconds(x, N)


def test_the_generator_releases_its_streams(tiny):
    with StreamManager(device="cpu") as streams:
        gen = Generator(tiny, streams, GenerateConfig(max_batch=2, max_seq_len=8))
        assert streams.active_streams() == 2
        gen.close()
        gen.close()
        assert streams.active_streams() == 0
        with pytest.raises(RuntimeError, match="closed"):
            gen.generate(prompts(1, 2), 2)


# -- CUDA ------------------------------------------------------------------------------------------

def _cuda_model(shape: DecoderShape, dtype: torch.dtype = torch.float32) -> Decoder:
    torch.manual_seed(0)
    return Decoder(shape).eval().to("cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny", "gpt2_small"])
@pytest.mark.parametrize("rows", [1, 8])
def test_three_loops_give_identical_tokens_on_cuda(name, rows):
    shape = TINY_DECODER if name == "tiny" else GPT2_SMALL
    x = prompts(rows, seed=rows, vocab=shape.vocab_size)
    streams, gen = generator(_cuda_model(shape), "cuda", eos_token_id=None)
    with streams, gen:
        results = {loop: gen.generate(x, N, loop) for loop in LOOPS}
        assert gen.stats.graphs and gen.stats.graphs_captured == 2  # one bucket, one graph per parity
    for loop in ("synced", "interleaved"):
        np.testing.assert_array_equal(results[loop].tokens, results["naive"].tokens, err_msg=loop)


@pytest.mark.gpu
def test_synced_and_interleaved_agree_in_bfloat16_on_cuda():
    """Both replay the same graphs, so even in bfloat16 the tokens are identical (naive may round differently)."""
    x = prompts(4, seed=3, vocab=GPT2_SMALL.vocab_size)
    streams, gen = generator(_cuda_model(GPT2_SMALL, torch.bfloat16), "cuda", temperature=0.7)
    with streams, gen:
        np.testing.assert_array_equal(gen.generate(x, N, "interleaved").tokens, gen.generate(x, N, "synced").tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, tol", [(2, 0.01), (6, 0.02)], ids=["gemv", "tiles"])
def test_bfloat16_kernels_give_the_float32_steps_logits_on_cuda(rows, tol):
    """The kernels at bfloat16's tiles, compiled: GPT-2 small against the float32 step on the same weights.

    The kernels sum in float32 but read a bfloat16 cache; through them, synced
    and interleaved give the same tokens. Past 4 rows the tiles also round each
    product's input to bfloat16 (2^-9 relative) for the tensor cores: at 6 rows
    the largest error was 0.013 on an H100, hence their wider tolerance.
    """
    from actors.decode_kernels import KernelStep, configs_for
    model = _cuda_model(GPT2_SMALL, torch.bfloat16)
    reference = copy.deepcopy(model).float()
    x = torch.as_tensor(prompts(rows, seed=5, vocab=GPT2_SMALL.vocab_size), device="cuda")
    length = PROMPT + N
    want_cache, got_cache = (KVCache(GPT2_SMALL, rows, length, dtype, torch.device("cuda"))
                             for dtype in (torch.float32, torch.bfloat16))
    step = KernelStep(model, rows, length, pdl=torch.cuda.get_device_capability()[0] >= 9)
    assert step.configs == configs_for(torch.bfloat16)
    with torch.inference_mode():
        reference(x, want_cache.view(rows))
        model(x, got_cache.view(rows))
        token, pos = x[:, -1].contiguous(), torch.tensor([PROMPT], device="cuda")
        for _ in range(N):
            want = reference.step(token, pos, want_cache.view(rows))
            torch.testing.assert_close(step.logits(token, pos, got_cache.view(rows)), want, rtol=tol, atol=tol)
            token, pos = want.argmax(-1), pos + 1
    streams, gen = generator(model, "cuda", kernels=True)
    with streams, gen:
        assert gen.stats.kernels
        synced = gen.generate(x.cpu().numpy(), N, "synced")
        np.testing.assert_array_equal(gen.generate(x.cpu().numpy(), N, "interleaved").tokens, synced.tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [False, True], ids=["model_step", "kernels"])
@pytest.mark.parametrize("eos_at", [None, 5])
def test_interleaved_syncs_the_host_only_for_the_lagged_flag_read(eos_at, kernels):
    """Under sync debug mode "error" every synchronising CUDA call raises; event waits are not such calls.

    The synced loop's per-token ``.item()`` raises there (the check works); the
    interleaved loop's host waits are event synchronisations only: one per step
    on the flag copy into pinned memory, and the final copy of the tokens. With
    ``kernels`` the step, EOS and flag included, is actors.decode_kernels'.
    """
    x = prompts(4, seed=6, vocab=GPT2_SMALL.vocab_size)
    streams, gen = generator(_cuda_model(GPT2_SMALL), "cuda", kernels=kernels)
    with streams, gen:
        eos = None if eos_at is None else int(gen.generate(x[:1], N, "synced").tokens[0, eos_at])
    streams, gen = generator(_cuda_model(GPT2_SMALL), "cuda", eos_token_id=eos, kernels=kernels)
    with streams, gen:
        want = gen.generate(x[:1], N, "synced")  # captures the graphs outside the checked region
        assert gen._host_flags.is_pinned()  # a non-blocking copy into pageable memory would sync silently
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = gen.generate(x[:1], N, "interleaved")
            with pytest.raises(RuntimeError, match="synchronizing CUDA operation"):
                gen.generate(x[:1], N, "synced")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        np.testing.assert_array_equal(got.tokens, want.tokens)
        assert got.steps == want.steps and got.launched == want.steps + (eos is not None)
        np.testing.assert_array_equal(gen.generate(x[:1], N, "interleaved").tokens, want.tokens)  # usable after


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8])  # one row: the linears are Inductor's sums, not cuBLAS's GEMVs
def test_compiled_step_gives_the_tokens_of_the_eager_step_on_cuda(rows):
    """The compiled step replays in the same two graphs; synced and interleaved stay identical.

    Against the eager step, Inductor's fused reductions round differently, so
    greedy fp32 tokens may part at a near-tie: at least 95% must agree.
    """
    x = prompts(rows, seed=9, vocab=GPT2_SMALL.vocab_size)
    model = _cuda_model(GPT2_SMALL)
    streams, gen = generator(model, "cuda")
    with streams, gen:
        eager = gen.generate(x, N, "synced").tokens
    streams, gen = generator(model, "cuda", compile=True)
    with streams, gen:
        synced, interleaved = gen.generate(x, N, "synced"), gen.generate(x, N, "interleaved")
        assert gen.stats.compiled and gen.stats.graphs_captured == 2
        np.testing.assert_array_equal(interleaved.tokens, synced.tokens)
        assert (synced.tokens == eager).mean() >= 0.95


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_kernels_give_the_tokens_of_the_eager_step_on_cuda(temperature):
    """Float32 buckets of up to 4 rows run actors.decode_kernels (greedy: the token choice too); bigger, the model step.

    1 row, and 3 rows in a bucket of 4 (a padding row); 9 rows make a bucket of
    16, which runs the model step: the eager tokens exactly. The kernels sum in
    another order than the eager step's cuBLAS calls, so fp32 tokens may part
    at a near-tie: at least 95% must agree.
    """
    x = prompts(9, seed=11, vocab=GPT2_SMALL.vocab_size)
    model = _cuda_model(GPT2_SMALL)
    streams, gen = generator(model, "cuda", temperature=temperature)
    with streams, gen:
        eager = {rows: gen.generate(x[:rows], N, "synced").tokens for rows in (1, 3, 9)}
    streams, gen = generator(model, "cuda", temperature=temperature, kernels=True)
    with streams, gen:
        assert gen.stats.kernels
        for rows in (1, 3):
            synced, interleaved = gen.generate(x[:rows], N, "synced"), gen.generate(x[:rows], N, "interleaved")
            np.testing.assert_array_equal(interleaved.tokens, synced.tokens)
            assert (synced.tokens == eager[rows]).mean() >= 0.95, rows
        np.testing.assert_array_equal(gen.generate(x, N, "synced").tokens, eager[9])
        np.testing.assert_array_equal(gen.generate(x, N, "interleaved").tokens, eager[9])


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_graphed_step_zero_gives_the_tokens_of_the_eager_one_on_cuda(temperature):
    """Step 0's graph reads each batch's prompts, rows and id when it replays: one graph serves a bucket's every batch.

    Batches of 3 and 4 rows (both bucket 4; at 3, a padding row), other prompts
    of the same length, the same prompts under another batch id (the sampling
    noise's key), and a second prompt length, past the one graph allowed.
    """
    model = _cuda_model(GPT2_SMALL)
    a, b = (prompts(4, PROMPT, seed=seed, vocab=GPT2_SMALL.vocab_size) for seed in (1, 2))
    shorter = prompts(3, PROMPT - 3, seed=3, vocab=GPT2_SMALL.vocab_size)
    calls = [(a[:3], 5), (a, 6), (b[:3], 7), (shorter, 8), (a[:3], 9)]
    tokens = {}
    for graphs in (0, 1):
        streams, gen = generator(model, "cuda", temperature=temperature, prefill_graphs=graphs)
        with streams, gen:
            tokens[graphs] = [gen.generate(x, N, loop, batch_id).tokens
                              for x, batch_id in calls for loop in ("synced", "interleaved")]
            assert gen.stats.prefill_graphs_captured == graphs and len(gen._prefills) == graphs
    for eager, graphed in zip(tokens[0], tokens[1]):
        np.testing.assert_array_equal(graphed, eager)
    assert not np.array_equal(tokens[1][0], tokens[1][4])  # prompts b reached the graph
    if temperature > 0:
        assert not np.array_equal(tokens[1][0], tokens[1][8])  # so did batch id 9


@pytest.mark.gpu
def test_device_step_seconds_times_the_replays_and_leaves_the_generator_usable():
    x = prompts(4, seed=10, vocab=GPT2_SMALL.vocab_size)
    streams, gen = generator(_cuda_model(GPT2_SMALL), "cuda")
    with streams, gen:
        want = gen.generate(x, N, "interleaved").tokens
        seconds = gen.device_step_seconds(x, N)
        assert 1e-6 < seconds < 0.1  # a GPT-2 small step is tens to hundreds of microseconds
        np.testing.assert_array_equal(gen.generate(x, N, "interleaved").tokens, want)
