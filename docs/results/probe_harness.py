"""What the decode probes share: a kernel-step generator, its device bound, and variants timed side by side.

A variant is a name, the ``KernelStep`` settings it runs with (``configs``
overrides), a ``setup`` called before each of its runs (for process-wide
state, such as the L2 set-aside) and the step class (``step``: another
module's ``KernelStep``, for kernels changed in the probe; by default the
product's; ``changed`` makes one from a copy of the product's module edited
as text). Side by side means alternating rounds of synced and interleaved
calls and the device bound, medians, with the tokens of every variant
compared with the first's; ``bounds_then_side_by_side`` times every
variant's device bound first and sets the fastest candidate beside the first.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

import actors.decode_kernels as product
from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator

PROMPT, NEW = 16, 256


@dataclass
class Variant:
    name: str
    configs: dict = field(default_factory=dict)
    setup: Callable[[], None] = lambda: None
    step: type = product.KernelStep


def changed(name: str, *edits: tuple[str, str]) -> type:
    """``KernelStep`` of a copy of the product's module with ``edits`` (old, new) applied, each exactly once."""
    source = open(product.__file__).read()
    for old, new in edits:
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(), f"{name}.py")  # Triton reads a kernel's source from its file
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.KernelStep


def model_and_prompts(dtype: torch.dtype, rows: int = 1):
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    return model, np.random.default_rng(rows).integers(0, model.shape.vocab_size, (rows, PROMPT))


def generator(model, streams, variant: Variant, rows: int = 1) -> Generator:
    gen = Generator(model, streams, GenerateConfig(max_batch=rows, max_seq_len=PROMPT + NEW, kernels=True))
    gen._kernel_step = variant.step(model, rows, PROMPT + NEW, pdl=True, configs=variant.configs)
    return gen


def device_bound_us(model, streams, variant: Variant, x, repeats: int = 3) -> float:
    """The variant's graphed step alone, us: the median of ``repeats`` after one warm-up (capture, compile)."""
    variant.setup()
    gen = generator(model, streams, variant, len(x))
    try:
        gen.device_step_seconds(x, NEW)
        return 1e6 * statistics.median(gen.device_step_seconds(x, NEW) for _ in range(repeats))
    finally:
        gen.close()


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(model, streams, variants: list[Variant], x, rounds: int) -> list[dict]:
    """Each variant's synced and interleaved calls and device bound, us a step, in ``rounds`` alternating rounds."""
    gens = {}
    try:
        for v in variants:
            v.setup()
            gens[v.name] = generator(model, streams, v, len(x))
        tokens, seconds = {}, {v.name: {"synced": [], "interleaved": [], "device": []} for v in variants}
        for v in variants:
            v.setup()
            tokens[v.name] = {loop: gens[v.name].generate(x, NEW, loop).tokens for loop in ("synced", "interleaved")}
        for _ in range(rounds):
            for v in variants:
                v.setup()
                gen = gens[v.name]
                for loop in ("synced", "interleaved"):
                    seconds[v.name][loop].append(_timed(lambda: gen.generate(x, NEW, loop)) / NEW)
                seconds[v.name]["device"].append(gen.device_step_seconds(x, NEW))
    finally:
        for gen in gens.values():
            gen.close()
    first = tokens[variants[0].name]["synced"]
    out = []
    for v in variants:
        us = {k: 1e6 * statistics.median(t) for k, t in seconds[v.name].items()}
        out.append({"variant": v.name, "configs": v.configs, "step_us": us,
                    "runs_us": {k: [round(1e6 * t, 1) for t in ts] for k, ts in seconds[v.name].items()},
                    "interleaved_vs_synced": us["synced"] / us["interleaved"],
                    "synced_interleaved_identical": bool((tokens[v.name]["synced"]
                                                          == tokens[v.name]["interleaved"]).all()),
                    "tokens_equal_to_first": bool((tokens[v.name]["synced"] == first).all())})
        print(json.dumps({k: val for k, val in out[-1].items() if k != "runs_us"}), flush=True)
    return out


def bounds_then_side_by_side(streams, dtype_name: str, variants: list[Variant], candidates: list[Variant],
                             rounds: int) -> dict:
    """One dtype: every variant's device bound (two alternating passes), then the first variant and the
    fastest of ``candidates`` side by side."""
    model, x = model_and_prompts(getattr(torch, dtype_name))
    passes = {v.name: [] for v in variants}
    for _ in range(2):
        for v in variants:
            passes[v.name].append(device_bound_us(model, streams, v, x))
    print(dtype_name, {n: [round(u, 1) for u in us] for n, us in passes.items()}, flush=True)
    fastest = min(candidates, key=lambda v: statistics.median(passes[v.name]))
    return {"dtype": dtype_name, "device_bound_us": {n: statistics.median(us) for n, us in passes.items()},
            "passes_us": passes, "side_by_side": side_by_side(model, streams, [variants[0], fastest], x, rounds)}


def write(label: str, payload: dict) -> None:
    """``payload`` with the device and torch version, as ``$OUT/LABEL.json``."""
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"{label}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "prompt_len": PROMPT,
                   "new_tokens": NEW, **payload}, f, indent=1)
