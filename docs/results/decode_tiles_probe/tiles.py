"""The tiled kernel step's device bound under tile overrides, at 16 and 64 rows.

For each dtype and row count, a Generator whose step is ``KernelStep`` with
each entry of ``VARIANTS`` (overrides of ``actors.decode_kernels``' configs),
and the compiled model step for reference: the device bound of the graphed
step (``Generator.device_step_seconds``, median of 3), GPT-2 small, prompt 16,
256 new tokens.

    python docs/results/decode_tiles_probe/tiles.py LABEL [dtype,...] [rows,...] [variant;...]

writes ``LABEL.json``.
"""
import json
import os
import statistics
import sys

import numpy as np
import torch

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator
from actors.decode_kernels import KernelStep
from actors.streams import StreamManager

PROMPT, NEW = 16, 256
VARIANTS = {
    "defaults": {},
    "qkv 64, 128, 4, 3": {"qkv tiles": (64, 128, 4, 3)},
    "qkv 16, 128, 4, 3": {"qkv tiles": (16, 128, 4, 3)},
    "fc 64, 128, 4, 3": {"fc tiles": (64, 128, 4, 3)},
    "fc 16, 128, 4, 3": {"fc tiles": (16, 128, 4, 3)},
    "proj2 32, 256, 4, 3": {"proj2 tiles": (32, 256, 4, 3)},
    "proj2 16, 128, 4, 4": {"proj2 tiles": (16, 128, 4, 4)},
    "head 128, 128, 8, 3": {"head tiles": (128, 128, 8, 3)},
    "head 32, 128, 4, 3": {"head tiles": (32, 128, 4, 3)},
    "proj 32, 64, 4, 1": {"proj tiles": (32, 64, 4, 1)},
    "block_m 16": {"block_m": 16},
}


def bound(model, streams, rows, x, overrides=None, compiled=False):
    config = GenerateConfig(max_batch=rows, max_seq_len=PROMPT + NEW, kernels=not compiled, compile=compiled)
    gen = Generator(model, streams, config)
    try:
        if not compiled:
            gen._kernel_step = KernelStep(model, rows, PROMPT + NEW, pdl=True, configs=overrides)
        gen.device_step_seconds(x, NEW)  # capture, compile, warm
        return 1e6 * statistics.median(gen.device_step_seconds(x, NEW) for _ in range(3))
    finally:
        gen.close()


def main():
    label = sys.argv[1]
    dtypes = [getattr(torch, d) for d in (sys.argv[2] if len(sys.argv) > 2 else "bfloat16").split(",")]
    sizes = [int(r) for r in (sys.argv[3] if len(sys.argv) > 3 else "16,64").split(",")]
    variants = {name: VARIANTS[name] for name in (sys.argv[4].split(";") if len(sys.argv) > 4 else VARIANTS)}
    results = []
    with StreamManager(device=torch.device("cuda", 0)) as streams:
        for dtype in dtypes:
            torch.manual_seed(0)
            model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
            for rows in sizes:
                x = np.random.default_rng(rows).integers(0, model.shape.vocab_size, (rows, PROMPT))
                us = {"compiled model step": bound(model, streams, rows, x, compiled=True)}
                print(dtype, rows, "compiled model step", round(us["compiled model step"], 1), flush=True)
                for name, overrides in variants.items():
                    us[name] = bound(model, streams, rows, x, overrides)
                    print(dtype, rows, name, round(us[name], 1), flush=True)
                results.append({"dtype": str(dtype), "rows": rows, "device_step_us": us})
    out = os.path.join(os.environ.get("OUT", "."), f"{label}.json")
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "prompt": PROMPT, "new_tokens": NEW,
                   "variants": variants, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
