"""Experiment: where the compiled GPT-2 small decode step spends its time, and whether a reduction GEMV helps."""
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator
from actors.streams import StreamManager

ORIG = nn.Linear.forward


def reduce_forward(self, x):
    y = (x.unsqueeze(-2) * self.weight).sum(-1)
    return y if self.bias is None else y + self.bias


def kernel_table(gen, x, n):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen.device_step_seconds(x, n)
    rows = []
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            rows.append((e.key[:70], e.count, e.self_device_time_total))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)
    return total / (n - 1), [(k, c / (n - 1), t / (n - 1)) for k, c, t in rows[:8]]


def main():
    which = sys.argv[1:] or ["linear", "reduce"]
    streams = StreamManager(device=torch.device("cuda", 0))
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = Decoder(GPT2_SMALL).to("cuda", dtype).eval()
        for variant in which:
            nn.Linear.forward = reduce_forward if variant == "reduce" else ORIG
            torch._dynamo.reset()
            for rows in (1, 4):
                x = np.random.default_rng(rows).integers(0, 50257, (rows, 16))
                cfg = GenerateConfig(max_batch=rows, max_seq_len=16 + 256, compile=True)
                t0 = time.perf_counter()
                with Generator(model, streams, cfg) as gen:
                    ref = gen.generate(x, 256, "synced")
                    compile_s = time.perf_counter() - t0
                    dev = sorted(gen.device_step_seconds(x, 256) for _ in range(5))[2]
                    syn = []
                    for _ in range(3):
                        t = time.perf_counter(); gen.generate(x, 256, "synced"); syn.append(time.perf_counter() - t)
                    kt, top = kernel_table(gen, x, 64)
                    tokens = ref.tokens
                r = dict(dtype=str(dtype), variant=variant, rows=rows, device_us=dev * 1e6,
                         synced_us=sorted(syn)[1] / 256 * 1e6, kernel_us=kt, compile_s=compile_s, top=top,
                         tokens_head=tokens[0, :8].tolist())
                out.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "top"}), flush=True)
                for k, c, t in top:
                    print(f"    {t:8.1f} us {c:5.1f}x  {k}", flush=True)
    nn.Linear.forward = ORIG
    os.makedirs(os.environ.get("OUT", "/tmp"), exist_ok=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "step_variants.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
