"""The one-row kernel step's device bound under tile overrides, then the fastest side by side with the loops.

Per dtype: for each entry of ``VARIANTS`` (overrides of ``actors.decode_kernels``'
configs for that dtype), a Generator whose one-row step is ``KernelStep`` with
those overrides; the device bound of its graphed step (median of 3). Then the
defaults and the fastest override side by side: synced and interleaved calls
and the device bound in alternating rounds (medians), tokens compared.

    python docs/results/decode_chain_probe/variants.py LABEL [rounds] [dtype,...]

writes ``LABEL.json`` (run once per version of the kernels, under its own label).
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
VARIANTS = {"defaults": {}, "attention 32, 2": {"attention": (32, 2)}, "attention 64, 2": {"attention": (64, 2)},
            "attention 32, 4": {"attention": (32, 4)}, "attention 64, 4": {"attention": (64, 4)},
            "attention 16, 2": {"attention": (16, 2)}}


def generator(model, streams, overrides):
    gen = Generator(model, streams, GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW, kernels=True))
    gen._kernel_step = KernelStep(model, PROMPT + NEW, pdl=True, configs=overrides)
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
    for name, overrides in VARIANTS.items():
        gen = generator(model, streams, overrides)
        try:
            gen.device_step_seconds(x, NEW)  # capture, compile, warm
            bounds[name] = 1e6 * statistics.median(gen.device_step_seconds(x, NEW) for _ in range(3))
        finally:
            gen.close()
        print(dtype, name, "device us", round(bounds[name], 1), flush=True)
    fastest = min((n for n in bounds if n != "defaults"), key=bounds.get)
    gens = {n: generator(model, streams, VARIANTS[n]) for n in ("defaults", fastest)}
    try:
        tokens = {n: {loop: gen.generate(x, NEW, loop).tokens for loop in ("synced", "interleaved")}
                  for n, gen in gens.items()}
        seconds = {n: {"synced": [], "interleaved": [], "device": []} for n in gens}
        for _ in range(rounds):
            for n, gen in gens.items():
                for loop in ("synced", "interleaved"):
                    seconds[n][loop].append(timed(lambda: gen.generate(x, NEW, loop)) / NEW)
                seconds[n]["device"].append(gen.device_step_seconds(x, NEW))
    finally:
        for gen in gens.values():
            gen.close()
    side = []
    for n, runs in seconds.items():
        us = {k: 1e6 * statistics.median(v) for k, v in runs.items()}
        r = {"variant": n, "overrides": VARIANTS[n], "step_us": us,
             "runs_us": {k: [round(1e6 * t, 1) for t in v] for k, v in runs.items()},
             "interleaved_vs_synced": us["synced"] / us["interleaved"],
             "synced_interleaved_identical": bool((tokens[n]["synced"] == tokens[n]["interleaved"]).all()),
             "tokens_equal_to_defaults": bool((tokens[n]["synced"] == tokens["defaults"]["synced"]).all())}
        print(dtype, json.dumps({k: v for k, v in r.items() if k != "runs_us"}), flush=True)
        side.append(r)
    return {"dtype": str(dtype), "device_bound_us": bounds, "side_by_side": side,
            "first_tokens": tokens["defaults"]["synced"][0, :32].tolist()}


def main():
    label = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    dtypes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["float32", "bfloat16"]
    results = []
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        for d in dtypes:
            results.append(run_dtype(getattr(torch, d), rounds, streams))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"{label}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS,
                   "prompt_len": PROMPT, "new_tokens": NEW, "rounds": rounds, "results": results,
                   "command": "python docs/results/decode_chain_probe/variants.py " + " ".join(sys.argv[1:])},
                  f, indent=1)


if __name__ == "__main__":
    main()
