"""The one-row GEMV step's configs re-chosen by timing the whole step, after the per-head merge.

Per dtype, one pass of coordinate descent from ``actors.decode_kernels.configs_for``:
for each one-row config in turn, every candidate of ``CANDIDATES`` is timed
as the device bound (median of 3) of a Generator whose step is ``KernelStep``
with it, and kept when it beats the current best by more than 1%. Then the
defaults and the configs found, side by side: synced and interleaved calls and
the device bound in alternating rounds (medians), tokens compared.

    python docs/results/decode_sweep_probe/sweep.py LABEL [rounds] [dtype,...]

writes ``$OUT/LABEL.json``.
"""
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator
from actors.decode_kernels import KernelStep, configs_for
from actors.streams import StreamManager

ROWS, PROMPT, NEW = 1, 16, 256
GEMV = [(b, w) for b in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)]
CANDIDATES = {"qkv": GEMV, "proj": GEMV, "fc": GEMV, "proj2": GEMV,
              "head": [(b, w) for b in (8, 16, 32, 64) for w in (2, 4, 8)],
              "attention": [(b, w) for b in (32, 64, 128) for w in (1, 2, 4)]}


def generator(model, streams, configs):
    gen = Generator(model, streams, GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW, kernels=True))
    gen._kernel_step = KernelStep(model, ROWS, PROMPT + NEW, pdl=True, configs=configs)
    return gen


def device_us(model, streams, x, configs):
    gen = generator(model, streams, configs)
    try:
        gen.device_step_seconds(x, NEW)  # capture, compile, warm
        return 1e6 * statistics.median(gen.device_step_seconds(x, NEW) for _ in range(3))
    finally:
        gen.close()


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_dtype(dtype, rounds, streams):
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    x = np.random.default_rng(ROWS).integers(0, model.shape.vocab_size, (ROWS, PROMPT))
    defaults = {name: configs_for(dtype)[name] for name in CANDIDATES}
    best, best_us = dict(defaults), device_us(model, streams, x, defaults)
    start_us, trials = best_us, []
    for name, candidates in CANDIDATES.items():
        for candidate in candidates:
            if candidate == best[name]:
                continue
            us = device_us(model, streams, x, {**best, name: candidate})
            trials.append({"kernel": name, "candidate": candidate, "device_us": us})
            if us < best_us * 0.99:
                best, best_us = {**best, name: candidate}, us
        print(dtype, name, best[name], round(best_us, 1), flush=True)
    variants = {"defaults": defaults, "found": best}
    gens = {n: generator(model, streams, c) for n, c in variants.items()}
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
        r = {"variant": n, "configs": variants[n], "step_us": us,
             "runs_us": {k: [round(1e6 * t, 1) for t in v] for k, v in runs.items()},
             "interleaved_vs_synced": us["synced"] / us["interleaved"],
             "synced_interleaved_identical": bool((tokens[n]["synced"] == tokens[n]["interleaved"]).all()),
             "tokens_equal_to_defaults": bool((tokens[n]["synced"] == tokens["defaults"]["synced"]).all())}
        print(dtype, json.dumps({k: v for k, v in r.items() if k != "runs_us"}), flush=True)
        side.append(r)
    return {"dtype": str(dtype), "start_device_us": start_us, "found_device_us": best_us, "trials": trials,
            "side_by_side": side}


def main():
    label = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    dtypes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["bfloat16", "float32"]
    results = []
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        for d in dtypes:
            results.append(run_dtype(getattr(torch, d), rounds, streams))
            with open(os.path.join(os.environ.get("OUT", "/tmp"), f"{label}.json"), "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS,
                           "prompt_len": PROMPT, "new_tokens": NEW, "rounds": rounds, "results": results,
                           "command": "python docs/results/decode_sweep_probe/sweep.py " + " ".join(sys.argv[1:])},
                          f, indent=1)


if __name__ == "__main__":
    main()
