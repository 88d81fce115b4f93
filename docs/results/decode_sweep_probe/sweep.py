"""The one-row GEMV step's configs re-chosen by timing the whole step, after the per-head merge.

Per dtype, one pass of coordinate descent from ``actors.decode_kernels.configs_for``:
for each one-row config in turn, every candidate of ``CANDIDATES`` is timed
as the device bound (median of 3) of a Generator whose step is ``KernelStep``
with it, and kept when it beats the current best by more than 1%. Then the
defaults and the configs found, side by side: synced and interleaved calls and
the device bound in alternating rounds (medians), tokens compared.

    python docs/results/decode_sweep_probe/sweep.py LABEL [rounds] [dtype,...]

writes ``$OUT/LABEL.json`` (after each dtype).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from probe_harness import Variant, device_bound_us, model_and_prompts, side_by_side, write  # noqa: E402

from actors.decode_kernels import configs_for  # noqa: E402
from actors.streams import StreamManager  # noqa: E402

GEMV = [(b, w) for b in (1, 2, 4, 8, 16) for w in (1, 2, 4, 8)]
CANDIDATES = {"qkv": GEMV, "proj": GEMV, "fc": GEMV, "proj2": GEMV,
              "head": [(b, w) for b in (8, 16, 32, 64) for w in (2, 4, 8)],
              "attention": [(b, w) for b in (32, 64, 128) for w in (1, 2, 4)]}


def run_dtype(dtype, rounds, streams):
    model, x = model_and_prompts(dtype)
    defaults = {name: configs_for(dtype)[name] for name in CANDIDATES}
    best, best_us = dict(defaults), device_bound_us(model, streams, Variant("defaults", defaults), x)
    start_us, trials = best_us, []
    for name, candidates in CANDIDATES.items():
        for candidate in candidates:
            if candidate == best[name]:
                continue
            us = device_bound_us(model, streams, Variant("candidate", {**best, name: candidate}), x)
            trials.append({"kernel": name, "candidate": candidate, "device_us": us})
            if us < best_us * 0.99:
                best, best_us = {**best, name: candidate}, us
        print(dtype, name, best[name], round(best_us, 1), flush=True)
    side = side_by_side(model, streams, [Variant("defaults", defaults), Variant("found", best)], x, rounds)
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
            write(label, {"rows": 1, "rounds": rounds, "results": results,
                          "command": "python docs/results/decode_sweep_probe/sweep.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
