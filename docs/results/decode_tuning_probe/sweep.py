"""Tile configs of the one-row step's kernels, chosen by timing the whole step (not each kernel alone).

Per dtype, coordinate descent from ``actors.decode_kernels.CONFIGS``: for each
kernel in turn, every candidate (rows or positions per program, warps) is
timed as the device bound of a Generator whose one-row step uses it, and the
fastest is kept when it beats the current best by more than 1%. Then the fused
MLP (``OneRowStep(fused_mlp=True)``) is tried at a few tiles with the rest at
the best found. Finally the original and the chosen configs are timed side by
side, synced and interleaved calls as well, in alternating rounds (medians).

    python docs/results/decode_tuning_probe/sweep.py [dtype,...]
"""
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator
from actors.decode_kernels import CONFIGS, OneRowStep
from actors.streams import StreamManager

ROWS, PROMPT, NEW = 1, 16, 256
GEMV = [(b, w) for b in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)]
CANDIDATES = {"qkv": GEMV, "proj": GEMV, "fc": GEMV, "proj2": GEMV, "head": [(b, w) for b in (8, 16, 32, 64)
                                                                             for w in (2, 4, 8)],
              "attention": [(b, w) for b in (8, 16, 32, 64) for w in (1, 2, 4)]}
MLP = [(8, 4), (16, 4), (16, 8), (32, 8)]


def generator(model, streams, configs, fused_mlp=False):
    gen = Generator(model, streams, GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW, kernels=True))
    gen._one_row = OneRowStep(model, PROMPT + NEW, pdl=True, configs=configs, fused_mlp=fused_mlp)
    return gen


def device_us(model, streams, x, configs, fused_mlp=False, repeats=3):
    gen = generator(model, streams, configs, fused_mlp)
    try:
        gen.device_step_seconds(x, NEW)  # capture, compile, warm
        return 1e6 * statistics.median(gen.device_step_seconds(x, NEW) for _ in range(repeats))
    finally:
        gen.close()


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(model, streams, x, variants, rounds=5):
    gens = {name: generator(model, streams, configs, fused) for name, (configs, fused) in variants.items()}
    try:
        tokens = {name: {loop: gen.generate(x, NEW, loop).tokens for loop in ("synced", "interleaved")}
                  for name, gen in gens.items()}
        seconds = {name: {"synced": [], "interleaved": [], "device": []} for name in gens}
        for _ in range(rounds):
            for name, gen in gens.items():
                for loop in ("synced", "interleaved"):
                    seconds[name][loop].append(timed(lambda: gen.generate(x, NEW, loop)) / NEW)
                seconds[name]["device"].append(gen.device_step_seconds(x, NEW))
    finally:
        for gen in gens.values():
            gen.close()
    ref = tokens["CONFIGS"]["synced"]
    out = {}
    for name, s in seconds.items():
        us = {k: 1e6 * statistics.median(v) for k, v in s.items()}
        out[name] = {"configs": variants[name][0], "fused_mlp": variants[name][1], "step_us": us,
                     "runs_us": {k: [round(1e6 * t, 1) for t in v] for k, v in s.items()},
                     "interleaved_vs_synced": us["synced"] / us["interleaved"],
                     "synced_interleaved_identical": bool((tokens[name]["synced"] == tokens[name]["interleaved"]).all()),
                     "agreement_with_configs": float((tokens[name]["synced"] == ref).mean())}
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "runs_us"}), flush=True)
    return out


def sweep(dtype, streams):
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    x = np.random.default_rng(ROWS).integers(0, model.shape.vocab_size, (ROWS, PROMPT))
    best = dict(CONFIGS)
    best_us = device_us(model, streams, x, best)
    trials = [{"configs": dict(best), "device_us": best_us}]
    print(dtype, "start", best_us, flush=True)
    for kernel, candidates in CANDIDATES.items():
        times = {}
        for cand in candidates:
            configs = {**best, kernel: cand}
            try:
                times[cand] = device_us(model, streams, x, configs)
            except Exception as err:  # a tile Triton cannot build (registers, shared memory)
                print(kernel, cand, "failed:", str(err).splitlines()[0][:200], flush=True)
                continue
            trials.append({"configs": configs, "device_us": times[cand]})
        fastest = min(times, key=times.get)
        print(dtype, kernel, {str(k): round(v, 1) for k, v in sorted(times.items(), key=lambda kv: kv[1])[:5]},
              flush=True)
        if times[fastest] < best_us * 0.99:
            best, best_us = {**best, kernel: fastest}, times[fastest]
    fused = {}
    for cand in MLP:
        configs = {**best, "mlp": cand}
        fused[cand] = device_us(model, streams, x, configs, fused_mlp=True)
        trials.append({"configs": configs, "fused_mlp": True, "device_us": fused[cand]})
    print(dtype, "fused mlp", {str(k): round(v, 1) for k, v in fused.items()}, "unfused best", round(best_us, 1),
          flush=True)
    variants = {"CONFIGS": (dict(CONFIGS), False), "tuned": (best, False)}
    fastest = min(fused, key=fused.get)
    variants["tuned_fused_mlp"] = ({**best, "mlp": fastest}, True)
    return {"dtype": str(dtype), "best": best, "trials": trials, "side_by_side": side_by_side(model, streams, x, variants)}


def main():
    dtypes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["bfloat16", "float32"]
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        results = []
        for d in dtypes:
            results.append(sweep(getattr(torch, d), streams))
            with open(os.path.join(os.environ.get("OUT", "/tmp"), "sweep.json"), "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS,
                           "prompt_len": PROMPT, "new_tokens": NEW, "results": results,
                           "command": "python docs/results/decode_tuning_probe/sweep.py " + " ".join(sys.argv[1:])},
                          f, indent=1, default=str)


if __name__ == "__main__":
    main()
