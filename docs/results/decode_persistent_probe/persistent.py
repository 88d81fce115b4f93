"""The batch-1 decode step as one persistent kernel (decode_persistent.py here) against the per-phase kernels.

Per dtype: the persistent step's logits against the eager step's over 8 steps,
then generators side by side (GenerateConfig(kernels=True), the one-row step
replaced before any capture): "kernels" (actors.decode_kernels, CONFIGS, PDL)
and the persistent step at a few settings; synced and interleaved calls and
the device bound per step, timed in alternating rounds, medians.
    python docs/results/decode_persistent_probe/persistent.py [rounds] [dtype,...]
"""
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator
from actors.streams import StreamManager

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "decode_kernel_probe")]
from decode_persistent import PersistentStep  # noqa: E402  (this probe's kernel, next to it)
from triton_step import check_logits  # noqa: E402  (the kernel probe's: 8 steps after a 16-token prompt)

ROWS, PROMPT, NEW = 1, 16, 256  # as triton_step's, whose check_logits runs here
SETTINGS = {"persistent": {}, "persistent_w8": {"num_warps": 8}, "persistent_head32": {"block_head": 32}}


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_dtype(dtype, rounds, streams, step_class=PersistentStep, settings=SETTINGS):
    """``step_class(model, length, **kwargs)`` per entry of ``settings`` against the product's kernels."""
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    x = np.random.default_rng(ROWS).integers(0, model.shape.vocab_size, (ROWS, PROMPT))
    t0 = time.perf_counter()
    worst, scale = check_logits(model, step_class(model, PROMPT + NEW), x)
    print(f"{dtype}: {step_class.__name__} logits vs eager: max |diff| {worst:.3g} (logits up to {scale:.3g}); "
          f"first call {time.perf_counter() - t0:.1f} s", flush=True)
    config = GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW, kernels=True)
    gens = {"kernels": Generator(model, streams, config)}
    for name, kwargs in settings.items():
        gens[name] = Generator(model, streams, config)
        gens[name]._one_row = step_class(model, PROMPT + NEW, **kwargs)
    try:
        tokens = {name: {loop: gen.generate(x, NEW, loop).tokens for loop in ("synced", "interleaved")}
                  for name, gen in gens.items()}
        print("warm", flush=True)
        seconds = {name: {"synced": [], "interleaved": []} for name in gens}
        device = {name: [] for name in gens}
        for _ in range(rounds):
            for name, gen in gens.items():
                for loop in seconds[name]:
                    seconds[name][loop].append(timed(lambda: gen.generate(x, NEW, loop)))
                device[name].append(gen.device_step_seconds(x, NEW))
    finally:
        for gen in gens.values():
            gen.close()
    ref = tokens["kernels"]["synced"]
    out = []
    for name in gens:
        step_us = {loop: 1e6 * statistics.median(s) / NEW for loop, s in seconds[name].items()}
        r = {"dtype": str(dtype), "variant": name, "settings": settings.get(name, {}),
             "device_step_us": 1e6 * statistics.median(device[name]), "step_us": step_us,
             "step_us_runs": {loop: [round(1e6 * t / NEW, 1) for t in s] for loop, s in seconds[name].items()},
             "interleaved_vs_synced": step_us["synced"] / step_us["interleaved"],
             "synced_interleaved_identical": bool((tokens[name]["synced"] == tokens[name]["interleaved"]).all()),
             "agreement_with_kernels": float((tokens[name]["synced"] == ref).mean())}
        print(json.dumps({k: v for k, v in r.items() if k != "step_us_runs"}), flush=True)
        out.append(r)
    return {"dtype": str(dtype), "logits_max_abs_diff": worst, "logits_max_abs": scale, "variants": out}


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32", "bfloat16"]
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        results = [run_dtype(getattr(torch, d), rounds, streams) for d in dtypes]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS, "prompt_len": PROMPT,
              "new_tokens": NEW, "rounds": rounds, "results": results,
              "command": "python docs/results/decode_persistent_probe/persistent.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "persistent.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
