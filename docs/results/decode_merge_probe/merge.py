"""The one-row kernel step before and after a change to ``actors.decode_kernels``, side by side.

"before" is the module at an earlier commit (``KERNELS_BEFORE``, a path to
that decode_kernels.py), at its defaults; "after" is the working tree's, at
its defaults and with each attention block of ``BLOCKS`` (positions an
attention program takes). Per dtype: the device bound of each variant's
graphed step (median of 3), then "before" and the fastest "after" side by
side: synced and interleaved calls and the device bound in alternating rounds
(medians), tokens compared.

    KERNELS_BEFORE=path python docs/results/decode_merge_probe/merge.py LABEL [rounds] [dtype,...]

writes ``$OUT/LABEL.json``.
"""
import importlib.util
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
BLOCKS = (16, 32, 64)
spec = importlib.util.spec_from_file_location("kernels_before", os.environ["KERNELS_BEFORE"])
before = importlib.util.module_from_spec(spec)
spec.loader.exec_module(before)


def generator(model, streams, name):
    gen = Generator(model, streams, GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW, kernels=True))
    if name == "before":
        gen._kernel_step = before.KernelStep(model, ROWS, PROMPT + NEW, pdl=True)
    else:
        configs = {"attention": (int(name.rpartition(" ")[2]), 2)} if "attention" in name else {}
        gen._kernel_step = KernelStep(model, ROWS, PROMPT + NEW, pdl=True, configs=configs)
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
    for name in ["before", "after"] + [f"after, attention {b}" for b in BLOCKS]:
        gen = generator(model, streams, name)
        try:
            gen.device_step_seconds(x, NEW)  # capture, compile, warm
            bounds[name] = 1e6 * statistics.median(gen.device_step_seconds(x, NEW) for _ in range(3))
        finally:
            gen.close()
        print(dtype, name, "device us", round(bounds[name], 1), flush=True)
    fastest = min((n for n in bounds if n.startswith("after")), key=bounds.get)
    gens = {n: generator(model, streams, n) for n in ("before", fastest)}
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
        r = {"variant": n, "step_us": us, "runs_us": {k: [round(1e6 * t, 1) for t in v] for k, v in runs.items()},
             "interleaved_vs_synced": us["synced"] / us["interleaved"],
             "synced_interleaved_identical": bool((tokens[n]["synced"] == tokens[n]["interleaved"]).all()),
             "tokens_equal_to_before": bool((tokens[n]["synced"] == tokens["before"]["synced"]).all())}
        print(dtype, json.dumps({k: v for k, v in r.items() if k != "runs_us"}), flush=True)
        side.append(r)
    return {"dtype": str(dtype), "device_bound_us": bounds, "side_by_side": side}


def main():
    label = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    dtypes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["float32", "bfloat16"]
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        results = [run_dtype(getattr(torch, d), rounds, streams) for d in dtypes]
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"{label}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS,
                   "prompt_len": PROMPT, "new_tokens": NEW, "rounds": rounds, "results": results,
                   "command": "KERNELS_BEFORE=kernels_0e2610d.py python docs/results/decode_merge_probe/merge.py "
                              + " ".join(sys.argv[1:])}, f, indent=1)


if __name__ == "__main__":
    main()
