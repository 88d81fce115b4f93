"""Experiment 2: synced vs interleaved vs device for step variants at batch 1."""
import json, os, sys, time
import numpy as np
import torch
from torch import nn
import torch._inductor.config as icfg
from actors.decode import GPT2_SMALL, Decoder, Generator
from actors.streams import StreamManager
from orchestrator.bench.decode_bench import bench_batch

ORIG = nn.Linear.forward


def reduce_forward(self, x):
    if not torch.compiler.is_compiling():
        return ORIG(self, x)
    y = (x.unsqueeze(-2) * self.weight).sum(-1)
    return y if self.bias is None else y + self.bias


ORIG_DECODE_STEP = Generator._decode_step


def whole_init(self, *a, **k):
    ORIG_INIT(self, *a, **k)
    if self.stats.compiled:
        self._model_step = self.model.step
        self._decode_step = torch.compile(ORIG_DECODE_STEP.__get__(self))


ORIG_INIT = Generator.__init__

VARIANTS = {
    "fp32_linear": (torch.float32, False, False, False),
    "fp32_reduce_cd": (torch.float32, True, True, False),
    "bf16_linear": (torch.bfloat16, False, False, False),
    "bf16_linear_cd": (torch.bfloat16, False, True, False),
    "bf16_reduce": (torch.bfloat16, True, False, False),
    "bf16_reduce_cd": (torch.bfloat16, True, True, False),
    "bf16_reduce_cd_whole": (torch.bfloat16, True, True, True),
}


def main():
    names = sys.argv[2:] or list(VARIANTS)
    sizes = [int(s) for s in sys.argv[1].split(",")]
    out = []
    with StreamManager(device=torch.device("cuda", 0)) as streams:
        for name in names:
            dtype, reduce, cd, whole = VARIANTS[name]
            nn.Linear.forward = reduce_forward if reduce else ORIG
            icfg.coordinate_descent_tuning = cd
            Generator.__init__ = whole_init if whole else ORIG_INIT
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
            for rows in sizes:
                t0 = time.perf_counter()
                r = bench_batch(model, streams, rows, 16, 256, 5, ("synced", "interleaved"), True)
                r["variant"] = name
                r["wall_s"] = time.perf_counter() - t0
                out.append(r)
                print(name, rows, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()
                                   if k in ("device_step_us", "synced_step_us", "interleaved_step_us",
                                            "interleaved_vs_synced", "synced_vs_device", "wall_s",
                                            "synced_interleaved_identical", "compiled")}, flush=True)
            del model
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "step_variants2.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
