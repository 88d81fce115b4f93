"""The one-row step with its MLP as one kernel (OneRowStep(fused_mlp=True)) against the five-kernel layer.

Also two bounds, not correct steps: the five-kernel layer with its second MLP
product left out, and with its attention left out: what a step with one kernel
fewer a layer could take at best, for the MLP fused and for the attention
fused into the qkv product. Run with the persistent probe's harness:
generators side by side, synced and interleaved calls and the device bound per
step, alternating rounds, medians.

    python docs/results/decode_tuning_probe/fusion.py [rounds] [dtype,...]
"""
import json
import os
import sys

import torch

from actors.decode_kernels import OneRowStep
from actors.streams import StreamManager

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "decode_persistent_probe"), os.path.join(HERE, "..", "decode_kernel_probe")]
from persistent import NEW, PROMPT, ROWS, run_dtype  # noqa: E402  (the persistent probe's harness)


class Bound(OneRowStep):
    """OneRowStep with a kernel launch left out of every layer: timing only, its logits are wrong."""

    def __init__(self, model, length, skip, **kwargs):
        super().__init__(model, length, pdl=True, **kwargs)
        self.skip = skip

    def _gemv(self, name, *args, **kwargs):
        if name != self.skip:
            super()._gemv(name, *args, **kwargs)


def step(model, length, skip=None, **kwargs):
    if skip is not None:
        return Bound(model, length, skip, **kwargs)
    return OneRowStep(model, length, pdl=True, **{"fused_mlp": True, **kwargs})


SETTINGS = {
    "fused_mlp_8x4": {"configs": {"mlp": (8, 4)}},
    "fused_mlp_4x4": {"configs": {"mlp": (4, 4)}},
    "fused_mlp_16x8": {"configs": {"mlp": (16, 8)}},
    "bound_no_proj2": {"skip": "proj2"},
    "bound_no_fc": {"skip": "fc"},
}


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32", "bfloat16"]
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        results = [run_dtype(getattr(torch, d), rounds, streams, step_class=step, settings=SETTINGS) for d in dtypes]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS, "prompt_len": PROMPT,
              "new_tokens": NEW, "rounds": rounds, "results": results,
              "command": "python docs/results/decode_tuning_probe/fusion.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "fusion.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
