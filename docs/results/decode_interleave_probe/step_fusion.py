"""Fusing more of the compiled batch-1 step: time per step and kernels per step, variants in turn.

"current": ``Generator`` as it is (the model's step compiled, ``_advance`` eager
kernels inside the same graph). "fused": the whole ``_decode_step`` compiled
(model step, position update, token choice, flag). "attn": the attention's two
matmuls as multiply-and-sums (Inductor fuses them with the softmax and the cache
write, as ``_Linear`` does for the one-row linears). "attn_fused": both.
Inductor's coordinate-descent tuning stays off, so both parities compile to the
same kernels.
    python docs/results/decode_interleave_probe/step_fusion.py [rounds] [variant,...]
"""
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator, _Attention
from actors.streams import StreamManager

ROWS, PROMPT, NEW, PROFILED = 1, 16, 256, 50
ORIGINAL_ATTENTION_STEP = _Attention.step
ATTENTION_SUMS = False  # read when the step is traced, i.e. at a generator's first cached batch


def attention_step(self, x, cache, pos, bias):
    if not (ATTENTION_SUMS and torch.compiler.is_compiling()):
        return ORIGINAL_ATTENTION_STEP(self, x, cache, pos, bias)
    q, k, v = self._split(x)
    cache[0].index_copy_(2, pos, k)
    cache[1].index_copy_(2, pos, v)
    scores = (q * cache[0]).sum(-1) * self.scale + bias  # (rows, heads, length)
    return self._merge((scores.softmax(-1).unsqueeze(-1) * cache[1]).sum(-2, keepdim=True))


_Attention.step = attention_step


def kernels_per_step(gen, x):
    """Kernels, their summed time and the span of ``PROFILED`` back-to-back graph replays, per step."""
    with torch.inference_mode(), gen._streams.use(gen._compute):
        bucket = gen._stage(x, cached=True)
        gen._reset(bucket, ROWS, PROMPT, NEW, 0)
        gen._prefill(bucket, PROMPT, 0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(PROFILED):
                gen._run_step(bucket, 0)
            torch.cuda.synchronize()
    gen._drain()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    by_name = {}
    for e in kernels:
        n, us = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, us + e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    return {"kernels": len(kernels) / PROFILED,
            "kernel_us": sum(e.time_range.elapsed_us() for e in kernels) / PROFILED,
            "span_us": (end - start) / PROFILED,
            "top": [[name[:90], n / PROFILED, us / PROFILED] for name, (n, us) in top]}


def launch_us(gen, x):
    """Host microseconds per graph replay call, ``PROFILED`` calls queued back to back (the GPU lags behind)."""
    with torch.inference_mode(), gen._streams.use(gen._compute):
        bucket = gen._stage(x, cached=True)
        gen._reset(bucket, ROWS, PROMPT, NEW, 0)
        gen._prefill(bucket, PROMPT, 0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(PROFILED):
            gen._run_step(bucket, 0)
        host = time.perf_counter() - t0
    gen._drain()
    return 1e6 * host / PROFILED


def build(name, model, streams):
    gen = Generator(model, streams, GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW, compile=True))
    if name.endswith("fused"):
        gen._model_step = model.step
        gen._decode_step = torch.compile(Generator._decode_step.__get__(gen), fullgraph=True, dynamic=False)
    return gen


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda")
    x = np.random.default_rng(ROWS).integers(0, model.shape.vocab_size, (ROWS, PROMPT))
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["current", "fused", "attn", "attn_fused"]
    global ATTENTION_SUMS
    with StreamManager(device=torch.device("cuda", 0)) as streams:
        gens = {name: build(name, model, streams) for name in names}
        try:
            tokens = {}
            for name, gen in gens.items():  # warm-up: compiles and captures
                ATTENTION_SUMS = name.startswith("attn")
                tokens[name] = {loop: gen.generate(x, NEW, loop).tokens for loop in ("synced", "interleaved")}
            ATTENTION_SUMS = False
            seconds = {name: {"synced": [], "interleaved": []} for name in names}
            device = {name: [] for name in names}
            launch = {name: [] for name in names}
            for _ in range(rounds):  # the variants in turn, so drift hits both
                for name, gen in gens.items():
                    for loop in seconds[name]:
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        gen.generate(x, NEW, loop)
                        seconds[name][loop].append(time.perf_counter() - t0)
                    device[name].append(gen.device_step_seconds(x, NEW))
                    launch[name].append(launch_us(gen, x))
            profiled = {name: kernels_per_step(gen, x) for name, gen in gens.items()}
        finally:
            for gen in gens.values():
                gen.close()
    ref = tokens["current"]["synced"]
    out = []
    for name in names:
        step_us = {loop: 1e6 * statistics.median(s) / NEW for loop, s in seconds[name].items()}
        r = {"variant": name, "device_step_us": 1e6 * statistics.median(device[name]), "step_us": step_us,
             "step_us_runs": {loop: [round(1e6 * t / NEW, 1) for t in s] for loop, s in seconds[name].items()},
             "interleaved_vs_synced": step_us["synced"] / step_us["interleaved"],
             "host_launch_us": statistics.median(launch[name]),
             "tokens_match_current_synced": {loop: bool((t == ref).all()) for loop, t in tokens[name].items()},
             **profiled[name]}
        print(json.dumps({k: v for k, v in r.items() if k != "top"}), flush=True)
        out.append(r)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": ROWS, "prompt_len": PROMPT,
              "new_tokens": NEW, "rounds": rounds, "variants": out,
              "command": "python docs/results/decode_interleave_probe/step_fusion.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "step_fusion.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
