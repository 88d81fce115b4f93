"""A layer as one kernel of counter-chained stages (decode_dataflow.py here) against the five-kernel layer.

Per dtype, the persistent probe's harness: the step's logits against the eager
step's, then generators side by side (GenerateConfig(kernels=True), the one-row
step replaced before any capture): "kernels" (actors.decode_kernels) and
DataflowStep at each setting below; synced and interleaved calls and the
device bound per step, alternating rounds, medians. Then each compiled
layer_kernel's registers and spills.
    python docs/results/decode_dataflow_probe/dataflow.py [rounds] [dtype,...]
"""
import json
import os
import sys

import torch
import triton

from actors.streams import StreamManager

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "decode_persistent_probe")]
from decode_dataflow import DataflowStep, layer_kernel  # noqa: E402  (this probe's kernel)
from persistent import NEW, PROMPT, ROWS, run_dtype  # noqa: E402  (the persistent probe's harness)

# Rows per program of each product, positions per attention program, warps; LAYER_CONFIG's defaults otherwise.
SETTINGS = {"dataflow": {},
            "dataflow_w2": {"layer_config": {"qkv": 2, "proj": 2, "fc": 2, "warps": 2}},
            "dataflow_w8": {"layer_config": {"qkv": 8, "proj": 8, "fc": 8, "proj2": 2, "warps": 8}},
            "dataflow_rows8": {"layer_config": {"qkv": 8, "proj": 8, "fc": 8, "proj2": 2}}}


def compiled_kernels():
    out = []
    for cached in layer_kernel.device_caches.values():
        for key, compiled in cached[0].items():
            compiled._init_handles()
            out.append({"key": str(key)[:300], "num_warps": compiled.metadata.num_warps,
                        "registers": compiled.n_regs, "spills": compiled.n_spills})
    return out


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32", "bfloat16"]
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        results = [run_dtype(getattr(torch, d), rounds, streams, DataflowStep, SETTINGS) for d in dtypes]
    kernels = compiled_kernels()
    for k in kernels:
        print({key: v for key, v in k.items() if key != "key"}, flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rows": ROWS, "prompt_len": PROMPT, "new_tokens": NEW, "rounds": rounds, "results": results,
              "layer_kernels": kernels,
              "command": "python docs/results/decode_dataflow_probe/dataflow.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "dataflow.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
