"""The decode kernels (actors.decode_kernels) against the eager step, run by Triton's interpreter on the CPU.

``TRITON_INTERPRET=1`` must be set before Triton decorates the kernels, and
would also turn the GPU tests' Inductor kernels into interpreted ones, so the
checks run in a fresh process. On CUDA the same kernels are compiled; the GPU
tests in test_decode.py check their tokens there.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

PRELUDE = textwrap.dedent("""
    import torch
    from actors.decode import Decoder, DecoderShape, KVCache
    from actors.decode_kernels import KernelStep, greedy_advance_kernel

    torch.manual_seed(0)
    # Head size 32; 3 heads, so the width (96) is not a power of two: the kernels pad it to 128 (4 heads).
    # Vocabulary and cache length not multiples of the kernels' blocks.
    SHAPE = DecoderShape(vocab_size=300, n_positions=64, d_model=96, n_layer=2, n_head=3)
    LENGTH, PROMPT = 21, 7
    # Larger blocks than CONFIGS' (the interpreter runs program by program); 3 attention chunks, the last partial;
    # tiles (float32 ones, asked for: exact, so the tightest check) of 16 rows: 20 rows take two, the second partial.
    CONFIGS = {"qkv": (32, 4), "proj": (16, 4), "fc": (64, 4), "proj2": (16, 4), "head": (32, 4), "attention": (8, 2),
               "qkv tiles": (64, 64, 4, 1), "proj tiles": (32, 64, 4, 1), "fc tiles": (128, 64, 4, 1),
               "proj2 tiles": (32, 128, 4, 1), "head tiles": (64, 64, 4, 1), "block_m": 16}
    model = Decoder(SHAPE).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # biases and layer norms away from their zero and one defaults
                p.add_(0.1 * torch.randn_like(p))
    ROWS = ROWS_VALUE
    prompt = torch.randint(0, SHAPE.vocab_size, (ROWS, PROMPT))
""")

LOGITS = PRELUDE + textwrap.dedent("""
    want_cache, got_cache = (KVCache(SHAPE, ROWS, LENGTH, torch.float32, torch.device("cpu")) for _ in range(2))
    step = KernelStep(model, ROWS, LENGTH, pdl=False, configs=CONFIGS, tiles=True)
    with torch.inference_mode():
        for cache in (want_cache, got_cache):
            model(prompt, cache.view(ROWS))
        token, pos = prompt[:, -1].contiguous(), torch.tensor([PROMPT])
        for _ in range(LENGTH - PROMPT):
            want = model.step(token, pos, want_cache.view(ROWS))
            got = step.logits(token, pos, got_cache.view(ROWS))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert want.std() > 0.1
            token, pos = want.argmax(-1), pos + 1
    torch.testing.assert_close(got_cache.keys, want_cache.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_cache.values, want_cache.values, rtol=1e-5, atol=1e-5)
    print("ok")
""")

# The product's tiles for weights of DTYPE against Decoder.step in float32 on the same (rounded) weights.
PRODUCT_TILES = PRELUDE + textwrap.dedent("""
    import copy
    from actors.decode_kernels import configs_for

    DTYPE, TOL = getattr(torch, "DTYPE_NAME"), TOL_VALUE
    weights = copy.deepcopy(model).to(DTYPE)
    reference = copy.deepcopy(weights).float()
    want_cache = KVCache(SHAPE, ROWS, LENGTH, torch.float32, torch.device("cpu"))
    got_cache = KVCache(SHAPE, ROWS, LENGTH, DTYPE, torch.device("cpu"))
    step = KernelStep(weights, ROWS, LENGTH, pdl=False)
    assert step.configs == configs_for(DTYPE)
    with torch.inference_mode():
        reference(prompt, want_cache.view(ROWS))
        weights(prompt, got_cache.view(ROWS))
        token, pos = prompt[:, -1].contiguous(), torch.tensor([PROMPT])
        for _ in range(LENGTH - PROMPT):
            want = reference.step(token, pos, want_cache.view(ROWS))
            torch.testing.assert_close(step.logits(token, pos, got_cache.view(ROWS)), want, rtol=TOL, atol=TOL)
            token, pos = want.argmax(-1), pos + 1
    print("ok")
""")

GREEDY = PRELUDE + textwrap.dedent("""
    def reference(row, eos):
        '''Generator._decode_step at temperature 0 for one row: tokens from the eager step.'''
        cache = KVCache(SHAPE, 1, LENGTH, torch.float32, torch.device("cpu"))
        model(prompt[row:row + 1], cache.view(1))
        token, pos, finished, out = prompt[row:row + 1, -1], PROMPT, False, []
        for _ in range(LENGTH - PROMPT):
            choice = 0 if finished else int(model.step(token, torch.tensor([pos]), cache.view(1)).argmax(-1))
            out.append(choice)
            finished = finished or choice == eos
            token, pos = torch.tensor([choice]), pos + 1
        return out

    steps = LENGTH - PROMPT
    with torch.inference_mode():
        model.wte.weight.mul_(50)  # the tokens, not the randomised biases, steer each row's choices
        free = reference(0, None)
        hit = next(i for i in range(1, steps) if free[i] not in free[:i])  # EOS at a step after the first
        eos = free[hit]
        # Row 0 stops at EOS; the other rows are live ones or, as the generator's padding rows, start finished.
        live = [True] + [LIVE] * (ROWS - 1)
        want = [reference(row, eos) if live[row] else [0] * steps for row in range(ROWS)]
        assert want[0][:hit + 1] == free[:hit + 1] and want[0][hit + 1:] == [0] * (steps - hit - 1) != free[hit + 1:]
        want_flags = [all(not live[row] or eos in want[row][:t + 1] for row in range(ROWS)) for t in range(steps)]
        step = KernelStep(model, ROWS, LENGTH, pdl=False, configs=CONFIGS, tiles=True)
        cache = KVCache(SHAPE, ROWS, LENGTH, torch.float32, torch.device("cpu"))
        model(prompt, cache.view(ROWS))
        tokens, pos = prompt[:, -1].clone(), torch.tensor([PROMPT])
        finished, flag = torch.tensor([not row_live for row_live in live]), torch.zeros(1, dtype=torch.bool)
        out, column = torch.full((ROWS + 1, LENGTH), -1), torch.zeros(1, dtype=torch.long)
        flags = []
        for _ in range(steps):
            step.greedy(tokens, pos, cache.view(ROWS), finished, out[:ROWS], column, flag, 0, eos)
            flags.append(bool(flag))
    assert out[:ROWS, :steps].tolist() == want, (out[:ROWS, :steps].tolist(), want)
    assert (out[:, steps:] == -1).all() and (out[ROWS] == -1).all()  # nothing written past the rows' columns
    assert flags == want_flags, (flags, want_flags)
    assert flags[hit] == (not LIVE or ROWS == 1) and not any(flags[:hit]), (flags, hit, want)
    assert finished.tolist() == [not row_live or eos in row for row_live, row in zip(live, want)]
    assert int(column) == steps and int(pos) == LENGTH and tokens.tolist() == [row[-1] for row in want]

    # The head's partial maxima: a tie between two programs goes to the first one's index.
    best = torch.tensor([0.5, 2.0, 1.0, 2.0])
    index = torch.tensor([3, 17, 40, 9])
    for already, expected in ((False, 17), (True, 5)):
        tokens, pos, finished = torch.tensor([1]), torch.tensor([4]), torch.tensor([already])
        out, column, flag = torch.zeros(6, dtype=torch.long), torch.tensor([2]), torch.zeros(1, dtype=torch.bool)
        greedy_advance_kernel[(1,)](best, index, tokens, pos, finished, out, column, flag, 5, 17, 6,
                                    PARTS=4, BLOCK=4, EOS=True, ROWS=1, ROW_BLOCK=1, PDL=False)
        assert out.tolist() == [0, 0, expected, 0, 0, 0] and int(tokens) == expected
        assert bool(finished) and bool(flag) and int(column) == 3 and int(pos) == 5
    # Rows in blocks smaller than ROWS (past 16 rows): each row its own maxima; the flag waits for every block.
    best = torch.tensor([[0.5, 2.0, 1.0, 2.0], [3.0, 2.0, 1.0, 0.0]])
    index = torch.tensor([[3, 17, 40, 9], [8, 1, 2, 3]])
    tokens, pos, finished = torch.tensor([1, 1]), torch.tensor([4]), torch.tensor([False, False])
    out, column, flag = torch.zeros(2, 6, dtype=torch.long), torch.tensor([2]), torch.ones(1, dtype=torch.bool)
    greedy_advance_kernel[(1,)](best, index, tokens, pos, finished, out, column, flag, 5, 17, 6,
                                PARTS=4, BLOCK=4, EOS=True, ROWS=2, ROW_BLOCK=1, PDL=False)
    assert out[:, 2].tolist() == [17, 8] and tokens.tolist() == [17, 8]
    assert finished.tolist() == [True, False] and not bool(flag)
    print("ok")
""")


def interpret(script: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


def test_a_head_size_the_kernels_cannot_tile_is_refused():
    from actors.decode import Decoder, DecoderShape
    from actors.decode_kernels import KernelStep
    with pytest.raises(ValueError, match="power-of-two head size.*96 / 4 = 24"):
        KernelStep(Decoder(DecoderShape(vocab_size=50, n_positions=16, d_model=96, n_layer=1, n_head=4)), 1, 16,
                   pdl=False)


def test_rows_past_the_steps_buffers_are_refused_before_any_launch():
    """Float32 weights run GEMVs only (up to 4 rows) unless tiles are asked for; 2-byte weights take tiles too."""
    from actors.decode import Decoder, DecoderShape, KVCache
    from actors.decode_kernels import KernelStep
    shape = DecoderShape(vocab_size=50, n_positions=16, d_model=64, n_layer=1, n_head=2)
    model = Decoder(shape)
    assert KernelStep(copy.deepcopy(model).half(), 6, 16, pdl=False).max_rows == 6
    assert KernelStep(model, 6, 16, pdl=False, tiles=True).max_rows == 6
    assert KernelStep(model, 2, 16, pdl=False).max_rows == 2
    step = KernelStep(model, 6, 16, pdl=False)
    assert step.max_rows == step.x.shape[0] == step.vocab_logits.shape[0] == 4
    cache = KVCache(shape, 5, 16, torch.float32, torch.device("cpu"))
    pos = torch.tensor([3])
    with pytest.raises(ValueError, match="runs 1 to 4 rows, got 5"):
        step.logits(torch.zeros(5, dtype=torch.long), pos, cache.view(5))
    with pytest.raises(ValueError, match="contiguous"):
        step.logits(torch.zeros(2, 3, dtype=torch.long)[:, -1], pos, cache.view(2))


def rows(script: str, n: int, live: bool = True) -> str:
    return script.replace("ROWS_VALUE", str(n)).replace("LIVE", str(live))


@pytest.mark.parametrize("n", [1, 3, 6, 20], ids=["gemv_1", "gemv_3", "tiles_6", "tiles_20"])
def test_kernels_give_the_eager_steps_logits_and_cache(n):
    """Logits and KV cache of the kernels' step match ``Decoder.step``, step after step up to the cache's end.

    GEMVs up to ``GEMV_MAX_ROWS`` (4) rows, tiles past it: one partial tile of
    16 rows at 6, two at 20.
    """
    interpret(rows(LOGITS, n))


@pytest.mark.parametrize("dtype, tol, n", [("float32", 1e-5, 2), ("bfloat16", 2e-3, 2), ("float16", 1e-3, 6)],
                         ids=["gemv_float32", "gemv_bfloat16", "tiles_float16"])
def test_the_products_tiles_give_the_float32_steps_logits(dtype, tol, n):
    """``configs_for`` each dtype, from its weights (one attention chunk here at 2-byte weights' 64 positions).

    2-byte weights: the reference is the float32 step on the same rounded
    weights; the kernels sum in float32 too, but the prefill's cache is in the
    weights' dtype, and tiles round their inputs to it for ``tl.dot`` (float16:
    about 2e-4 off here, against logits of about 0.7). The tiles at bfloat16 are
    checked on CUDA only (test_decode.py): Triton 3.9's interpreter gets
    ``tl.dot`` of bfloat16 wrong (about 1e10 off on a 16 x 16 product).
    """
    interpret(rows(PRODUCT_TILES, n).replace("DTYPE_NAME", dtype).replace("TOL_VALUE", repr(tol)))


@pytest.mark.parametrize("n, live", [(1, True), (3, True), (3, False), (6, True), (20, False)],
                         ids=["one_row", "three_rows", "padded", "tiles_6", "tiles_20_padded"])
def test_greedy_step_chooses_writes_and_stops_as_the_generator_does(n, live):
    """Greedy tokens, output columns, EOS, the all-finished flag, pads after it; ties go to the first index.

    ``padded``: rows after the first start finished, as a bucket's padding rows
    do, so the flag follows the first row alone. Past 4 rows the products are
    tiles and the choice walks the rows in blocks of 16.
    """
    interpret(rows(GREEDY, n, live))
