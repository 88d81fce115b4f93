"""Where the one-row kernel step's time goes: each kernel's place in the PDL chain, from a CUPTI trace.

Per dtype: ``STEPS`` graphed steps replayed back to back under
``torch.profiler`` (CUDA activity only), and the same replays untraced for
comparison. A step's kernels run in a fixed order (embed; qkv, attention,
proj, fc, proj2 per layer; head; greedy), so each traced kernel is named by
its place. For each kernel: its duration, its start and end relative to the
previous kernel's end (with programmatic dependent launch a kernel starts
before the one before it ends), and the end-to-end increment, which is what
it adds to the step. Medians over the layers and the traced steps.

    python docs/results/decode_chain_probe/chain.py [dtype,...]
"""
import json
import os
import statistics
import sys

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator
from actors.streams import StreamManager

ROWS, PROMPT, NEW, STEPS = 1, 16, 256, 40
LAYER = ("qkv", "attention", "proj", "fc", "proj2")


def names(layers):
    return ["embed", *[k for _ in range(layers) for k in LAYER], "head", "greedy"]


def replay(gen, bucket, steps, trace):
    with torch.inference_mode(), gen._streams.use(gen._compute):
        gen._start(bucket, PROMPT)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if trace:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    gen._run_step(bucket, 0)
                torch.cuda.synchronize()
            return prof
        start.record()
        for _ in range(steps):
            gen._run_step(bucket, 0)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / steps


def run_dtype(dtype, streams):
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    x = np.random.default_rng(ROWS).integers(0, model.shape.vocab_size, (ROWS, PROMPT))
    order = names(GPT2_SMALL.n_layer)
    with Generator(model, streams, GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW, kernels=True)) as gen:
        gen.generate(x, NEW, "synced")  # capture, compile, warm
        with torch.inference_mode():
            bucket = gen._stage(x, 0, cached=True)
        untraced = statistics.median(replay(gen, bucket, STEPS, False) for _ in range(3))
        prof = replay(gen, bucket, STEPS, True)
        gen._drain()
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    per_step = len(order)
    assert len(kernels) == STEPS * per_step, (len(kernels), STEPS * per_step)
    rows = {name: {"duration": [], "start_after_prev_end": [], "end_increment": []} for name in dict.fromkeys(order)}
    graph_gaps, steps_us = [], []
    for s in range(STEPS):
        step = kernels[s * per_step:(s + 1) * per_step]
        steps_us.append(step[-1][1] - step[0][0])
        if s:
            graph_gaps.append(step[0][0] - kernels[s * per_step - 1][1])
        for j, (start, end, _) in enumerate(step):
            r = rows[order[j]]
            r["duration"].append(end - start)
            if j:
                r["start_after_prev_end"].append(start - step[j - 1][1])
                r["end_increment"].append(end - step[j - 1][1])
    summary = {name: {k: statistics.median(v) if v else None for k, v in r.items()} | {"count_per_step": order.count(name)}
               for name, r in rows.items()}
    total = {name: s["count_per_step"] * s["end_increment"] for name, s in summary.items() if s["end_increment"]}
    out = {"dtype": str(dtype), "untraced_step_us": untraced, "traced_step_span_us": statistics.median(steps_us),
           "graph_gap_us": statistics.median(graph_gaps), "kernels": summary,
           "increment_per_step_us": total, "increments_sum_us": sum(total.values())}
    print(json.dumps(out, indent=1), flush=True)
    return out


def main():
    dtypes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["float32", "bfloat16"]
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        results = [run_dtype(getattr(torch, d), streams) for d in dtypes]
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "chain.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS,
                   "prompt_len": PROMPT, "new_tokens": NEW, "traced_steps": STEPS, "results": results,
                   "command": "python docs/results/decode_chain_probe/chain.py " + " ".join(sys.argv[1:])},
                  f, indent=1)


if __name__ == "__main__":
    main()
