"""The compiled step at 16 and 64 rows in bf16 (what ``decode_bench --compile --kernels --dtype bfloat16`` runs there).

Its device bound, then 20 graphed steps, from mid-generation (position 116),
traced with ``torch.profiler``: kernels a step, their summed time, the span,
and the 14 kernels with the most time a step. Prints; the output of the run
quoted in the README is ``batched_profile_bf16.txt``.

    python docs/results/decode_chain_probe/batched_profile.py
"""
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator
from actors.streams import StreamManager

PROMPT, NEW, STEPS = 16, 256, 20


def run(dtype, rows):
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    x = np.random.default_rng(rows).integers(0, model.shape.vocab_size, (rows, PROMPT))
    with StreamManager(device=torch.device("cuda", 0)) as streams, Generator(model, streams, GenerateConfig(max_batch=rows, max_seq_len=PROMPT + NEW, compile=True, kernels=True)) as gen:
        gen.generate(x, NEW, "synced")
        dev = gen.device_step_seconds(x, NEW) * 1e6
        with torch.inference_mode():
            bucket = gen._stage(x, 0, cached=True)
        with torch.inference_mode(), gen._streams.use(gen._compute):
            gen._start(bucket, PROMPT)
            for _ in range(100):
                gen._run_step(bucket, 0)  # move pos to mid-generation
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(STEPS):
                    gen._run_step(bucket, 0)
                torch.cuda.synchronize()
        gen._drain()
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by = {}
    for e in ev:
        n, t = by.get(e.name, (0, 0.0)); by[e.name] = (n + 1, t + e.time_range.elapsed_us())
    span = (max(e.time_range.end for e in ev) - min(e.time_range.start for e in ev)) / STEPS
    print(dtype, rows, "device us", round(dev, 1), "kernels/step", len(ev) / STEPS, "kernel us/step", round(sum(e.time_range.elapsed_us() for e in ev) / STEPS, 1), "span", round(span, 1))
    for name, (n, t) in sorted(by.items(), key=lambda kv: -kv[1][1])[:14]:
        print("   %7.1f us  x%5.1f  %s" % (t / STEPS, n / STEPS, name[:110]))
if __name__ == "__main__":
    for rows in (16, 64):
        run(torch.bfloat16, rows)
