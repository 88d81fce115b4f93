"""The one-row kernels with each GEMV prefetching a later GEMV's weight into L2 (``KernelStep(prefetch_ahead=)``).

Per dtype: the device bound of the graphed step (median of 3) for each
prefetch distance (0 = off) and cap on the bytes one target prefetches; then
the off setting and the two fastest side by side, synced and interleaved calls
too, in alternating rounds (medians). Tokens are compared with the off
setting's (prefetching changes no arithmetic).

    python docs/results/decode_prefetch_probe/prefetch.py [rounds] [dtype,...]
"""
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator
from actors.decode_kernels import KernelStep
from actors.streams import StreamManager

ROWS, PROMPT, NEW = 1, 16, 256
MB = 1 << 20
SETTINGS = [(0, 0), (1, 16 * MB), (2, 16 * MB), (3, 16 * MB), (4, 16 * MB), (6, 16 * MB), (2, 4 * MB),
            (2, 48 * MB)]


def generator(model, streams, ahead, cap):
    gen = Generator(model, streams, GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW, kernels=True))
    gen._kernel_step = KernelStep(model, PROMPT + NEW, pdl=True, prefetch_ahead=ahead, prefetch_cap=cap)
    return gen


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_dtype(dtype, rounds, streams):
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    x = np.random.default_rng(ROWS).integers(0, model.shape.vocab_size, (ROWS, PROMPT))
    bounds = {}
    for ahead, cap in SETTINGS:
        gen = generator(model, streams, ahead, cap)
        try:
            gen.device_step_seconds(x, NEW)  # capture, compile, warm
            bounds[(ahead, cap)] = 1e6 * statistics.median(gen.device_step_seconds(x, NEW) for _ in range(3))
        finally:
            gen.close()
        print(dtype, "ahead", ahead, "cap MB", cap // MB, "device us", round(bounds[(ahead, cap)], 1), flush=True)
    fastest = sorted((s for s in bounds if s != (0, 0)), key=bounds.get)[:2]
    gens = {s: generator(model, streams, *s) for s in [(0, 0), *fastest]}
    try:
        tokens = {s: {loop: gen.generate(x, NEW, loop).tokens for loop in ("synced", "interleaved")}
                  for s, gen in gens.items()}
        seconds = {s: {"synced": [], "interleaved": [], "device": []} for s in gens}
        for _ in range(rounds):
            for s, gen in gens.items():
                for loop in ("synced", "interleaved"):
                    seconds[s][loop].append(timed(lambda: gen.generate(x, NEW, loop)) / NEW)
                seconds[s]["device"].append(gen.device_step_seconds(x, NEW))
    finally:
        for gen in gens.values():
            gen.close()
    ref = tokens[(0, 0)]["synced"]
    side = []
    for s, runs in seconds.items():
        us = {k: 1e6 * statistics.median(v) for k, v in runs.items()}
        r = {"prefetch_ahead": s[0], "prefetch_cap_mb": s[1] // MB, "step_us": us,
             "runs_us": {k: [round(1e6 * t, 1) for t in v] for k, v in runs.items()},
             "interleaved_vs_synced": us["synced"] / us["interleaved"],
             "synced_interleaved_identical": bool((tokens[s]["synced"] == tokens[s]["interleaved"]).all()),
             "tokens_equal_to_off": bool((tokens[s]["synced"] == ref).all())}
        print(dtype, json.dumps({k: v for k, v in r.items() if k != "runs_us"}), flush=True)
        side.append(r)
    return {"dtype": str(dtype), "device_bound_us": [{"prefetch_ahead": a, "prefetch_cap_mb": c // MB, "us": us}
                                                     for (a, c), us in bounds.items()], "side_by_side": side}


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32", "bfloat16"]
    results = []
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        for d in dtypes:
            results.append(run_dtype(getattr(torch, d), rounds, streams))
            with open(os.path.join(os.environ.get("OUT", "/tmp"), "prefetch.json"), "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS,
                           "prompt_len": PROMPT, "new_tokens": NEW, "rounds": rounds, "results": results,
                           "command": "python docs/results/decode_prefetch_probe/prefetch.py " + " ".join(sys.argv[1:])},
                          f, indent=1)


if __name__ == "__main__":
    main()
