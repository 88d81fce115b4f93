"""What a batch-1 generate call costs besides its steps, and what a captured prefill would save.

Per dtype, one generator with the one-row kernels (GenerateConfig(kernels=True)),
GPT-2 small, prompt 16, 256 new tokens, timed in alternating rounds (medians):
synced and interleaved calls of 256 tokens, a call of 1 token (stage, upload,
eager prefill, token choice, output copy: the fixed cost of every call), the
eager reset + prefill alone, the same captured in a CUDA graph and replayed,
and the device bound per step (Generator.device_step_seconds).
    python docs/results/decode_call_probe/call_cost.py [rounds] [dtype,...]
"""
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator
from actors.streams import StreamManager

ROWS, PROMPT, NEW = 1, 16, 256


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_dtype(dtype, rounds, streams):
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    x = np.random.default_rng(ROWS).integers(0, model.shape.vocab_size, (ROWS, PROMPT))
    gen = Generator(model, streams, GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW, kernels=True))
    try:
        with torch.inference_mode():
            for loop in ("synced", "interleaved"):
                gen.generate(x, NEW, loop)
            gen.generate(x, 1, "synced")
            bucket = gen._stage(x, cached=True)

            def eager_prefill():
                with streams.use(gen._compute):
                    gen._reset(bucket, ROWS, PROMPT, NEW, 0)
                    gen._prefill(bucket, PROMPT, 0)

            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                eager_prefill()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                gen._reset(bucket, ROWS, PROMPT, NEW, 0)
                gen._prefill(bucket, PROMPT, 0)
            torch.cuda.synchronize()
            ref_tokens = gen.generate(x, NEW, "synced").tokens
            graph.replay()  # the graphed prefill, then the steps as usual: same tokens?
            torch.cuda.synchronize()
            with streams.use(gen._compute):
                for _ in range(NEW - 1):
                    gen._run_step(bucket, 0)
            torch.cuda.synchronize()
            graphed_same = bool((gen._out[:1, :NEW].cpu().numpy() == ref_tokens).all())
            names = ("synced", "interleaved", "call_1_token", "eager_prefill", "graphed_prefill", "device_step")
            runs = {name: [] for name in names}
            for _ in range(rounds):
                runs["synced"].append(timed(lambda: gen.generate(x, NEW, "synced")))
                runs["interleaved"].append(timed(lambda: gen.generate(x, NEW, "interleaved")))
                runs["call_1_token"].append(statistics.median(timed(lambda: gen.generate(x, 1, "synced"))
                                                              for _ in range(5)))
                runs["eager_prefill"].append(statistics.median(timed(eager_prefill) for _ in range(5)))
                runs["graphed_prefill"].append(statistics.median(timed(graph.replay) for _ in range(5)))
                runs["device_step"].append(gen.device_step_seconds(x, NEW))
    finally:
        gen.close()
    us = {name: 1e6 * statistics.median(r) for name, r in runs.items()}
    fixed = us["call_1_token"]
    steps = NEW - 1
    row = {"dtype": str(dtype), "us": us, "runs_us": {k: [round(1e6 * t, 1) for t in r] for k, r in runs.items()},
           "synced_step_us": us["synced"] / NEW, "interleaved_step_us": us["interleaved"] / NEW,
           "synced_over_device_per_step_us": (us["synced"] - fixed) / steps - us["device_step"],
           "interleaved_over_device_per_step_us": (us["interleaved"] - fixed) / steps - us["device_step"],
           "interleaved_vs_synced": us["synced"] / us["interleaved"],
           "interleaved_vs_synced_without_fixed": (us["synced"] - fixed) / (us["interleaved"] - fixed),
           "graphed_prefill_tokens_same": graphed_same}
    print(json.dumps({k: v for k, v in row.items() if k != "runs_us"}), flush=True)
    return row


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32", "bfloat16"]
    with StreamManager(device=torch.device("cuda", 0)) as streams:
        results = [run_dtype(getattr(torch, d), rounds, streams) for d in dtypes]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS, "prompt_len": PROMPT,
              "new_tokens": NEW, "rounds": rounds, "results": results,
              "command": "python docs/results/decode_call_probe/call_cost.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "call_cost.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
