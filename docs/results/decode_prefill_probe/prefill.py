"""What a one-row generate call's fixed cost is made of: the prefill graph's kernels, and the rest of the call.

The interleaved loop at one row runs 4 (bf16) to 8 (fp32) us a token over
the device bound, the call's fixed cost spread over 256 tokens
(``../decode_overhead_probe/``). Per dtype, a generator as the benchmark builds
it (``kernels=True, compile=True``; one row, prompt 16): the wall time of a
one-token synced call (medians of 20), the device time of step 0's graph
alone (CUDA events, medians of 20), and that graph's kernels traced with
``torch.profiler`` (10 replays; each kernel's total over them, top 15).

    python docs/results/decode_prefill_probe/prefill.py LABEL [dtype,...]

writes ``$OUT/LABEL.json``. It calls ``Generator._stage`` and ``_start`` as
they are at the commit that adds it.
"""
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from probe_harness import NEW, PROMPT, write  # noqa: E402

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator  # noqa: E402
from actors.streams import StreamManager  # noqa: E402


def measure(streams, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    x = np.random.default_rng(1).integers(0, model.shape.vocab_size, (1, PROMPT))
    config = GenerateConfig(max_batch=1, max_seq_len=PROMPT + NEW, kernels=True, compile=True)
    with Generator(model, streams, config) as gen:
        gen.generate(x, NEW, "synced")
        walls = []
        for _ in range(20):
            t0 = time.perf_counter()
            gen.generate(x, 1, "synced")
            walls.append(time.perf_counter() - t0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        device = []
        with torch.inference_mode(), streams.use(gen._compute):
            bucket = gen._stage(x, 0, cached=True)
            for _ in range(20):
                start.record(gen._compute)
                gen._start(bucket, PROMPT)
                end.record(gen._compute)
                end.synchronize()
                device.append(start.elapsed_time(end) / 1e3)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    gen._start(bucket, PROMPT)
                torch.cuda.synchronize()
        kernels = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = kernels.setdefault(e.name, {"us": 0.0, "count": 0})
                k["us"] += e.device_time / 10
                k["count"] += 1
        top = sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:15]
        out = {"dtype": str(dtype), "one_token_call_ms": 1e3 * statistics.median(walls),
               "prefill_graph_device_ms": 1e3 * statistics.median(device),
               "prefill_kernels_us_per_replay": sum(k["us"] for k in kernels.values()),
               "kernels_per_replay": sum(k["count"] for k in kernels.values()) / 10,
               "top_kernels": [{"name": n[:120], "us_per_replay": round(k["us"], 1), "count_per_replay": k["count"] / 10}
                               for n, k in top]}
        print({k: v for k, v in out.items() if k != "top_kernels"}, flush=True)
        for t in out["top_kernels"]:
            print("  ", t, flush=True)
        return out


def main():
    label = sys.argv[1]
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32", "bfloat16"]
    with StreamManager(device=torch.device("cuda", 0), max_streams=16) as streams:
        results = [measure(streams, getattr(torch, name)) for name in dtypes]
    write(label, {"rows": 1, "results": results,
                  "command": "python docs/results/decode_prefill_probe/prefill.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
