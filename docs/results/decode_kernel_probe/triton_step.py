"""The batch-1 decode step as hand-written Triton kernels (actors.decode_kernels) against the compiled step.

Per dtype: each kernel's config (block_n or block_l, num_warps) picked by
timing it in a CUDA graph over copies of its weights (or KV caches) that miss
L2 (graph_us), then four generators side by side, timed in alternating rounds:
"compiled" (GenerateConfig(compile=True)), "kernels" (GenerateConfig(kernels=True):
actors.decode_kernels.CONFIGS, programmatic dependent launch), and the kernels
with the configs just tuned, without ("kernels_tuned_no_pdl") and with
("kernels_tuned") programmatic dependent launch.
    python docs/results/decode_kernel_probe/triton_step.py [rounds] [dtype,...]
"""
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import triton
from torch.profiler import ProfilerActivity, profile

from actors.decode import GPT2_SMALL, Decoder, GenerateConfig, Generator, KVCache
from actors.decode_kernels import OneRowStep, attention_kernel
from actors.streams import StreamManager

ROWS, PROMPT, NEW, PROFILED = 1, 16, 256, 50


def graph_us(launch, copies):
    """Microseconds per launch: ``launch(i)`` for each weight copy i, back to back in a CUDA graph (L2 cold)."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for i in range(copies):  # compiles the kernel and warms up
            launch(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            launch(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    runs = []
    for _ in range(7):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        runs.append(1e3 * start.elapsed_time(end) / copies)
    return statistics.median(runs[1:])


def tune(model, length):
    """Each kernel's fastest config, timed in a graph over enough weight copies to miss L2."""
    from types import SimpleNamespace
    block = model.blocks[0]
    timings = {}
    rows = 32  # 12 layers x 32 rows of keys and values: 53 MB in fp32, past L2
    cache = KVCache(model.shape, rows, length, next(model.parameters()).dtype, torch.device("cuda"))
    for t in (cache.keys, cache.values):
        t.normal_()
    pos = torch.tensor([length - 1], device="cuda")
    best_attention = None
    for block_l in (16, 32, 64):
        for warps in (1, 2, 4):
            step = OneRowStep(model, length, pdl=False, configs={"attention": (block_l, warps)})
            step.q.normal_()
            def launch(i):
                attention_kernel[(model.shape.n_head, step.chunks)](
                    step.q, cache.keys[i // rows, i % rows], cache.values[i // rows, i % rows], step.part_m, step.part_l, step.part_acc, pos,
                    block.attn.scale, L=length, HD=step.hd, BLOCK_L=block_l, CHUNKS=step.chunks, PDL=False,
                    num_warps=warps)
            us = timings[f"attention {block_l} {warps}"] = graph_us(launch, model.shape.n_layer * rows)
            if best_attention is None or us < best_attention[0]:
                best_attention = (us, block_l, warps)
    print(f"attention at pos {length - 1}: best block_l={best_attention[1]} warps={best_attention[2]} "
          f"{best_attention[0]:.2f} us", flush=True)
    chosen = {"attention": best_attention[1:]}
    step = OneRowStep(model, length, pdl=False, configs=chosen)
    for t in (step.x, step.q, step.part_m, step.part_l, step.part_acc, step.h):
        t.normal_()
    products = {"qkv": (block.attn.qkv, dict(x=step.x, out=step.q, ln=block.ln_1, cache=(cache.keys[0, 0], cache.values[0, 0]), pos=pos)),
                "proj": (block.attn.proj, dict(x=step.part_m, out=step.x, residual=True, attention=True)),
                "fc": (block.mlp[0], dict(x=step.x, out=step.h, ln=block.ln_2, gelu=True)),
                "proj2": (block.mlp[2], dict(x=step.h, out=step.x, residual=True)),
                "head": (model.lm_head, dict(x=step.x, out=step.vocab_logits, ln=model.ln_f))}
    for name, (linear, kwargs) in products.items():
        n, k = linear.weight.shape
        mb = linear.weight.numel() * linear.weight.element_size() / 1e6
        copies = max(3, int(200 / mb))
        weights = [SimpleNamespace(weight=linear.weight.clone(), bias=None if linear.bias is None else linear.bias.clone())
                   for _ in range(copies)]
        best = None
        for block_n in (1, 2, 4, 8, 16):
            for warps in (1, 2, 4, 8):
                step.configs[name] = (block_n, warps)
                us = timings[f"{name} {block_n} {warps}"] = graph_us(
                    lambda i: step._gemv(name, linear=weights[i], **kwargs), copies)
                if best is None or us < best[0]:
                    best = (us, block_n, warps)
        chosen[name] = step.configs[name] = best[1:]
        del weights
        print(f"{name}: {n}x{k} {mb:.1f} MB best block_n={best[1]} warps={best[2]} {best[0]:.2f} us "
              f"({mb / best[0]:.2f} TB/s)", flush=True)
    return chosen, timings


def check_logits(model, step, x):
    """Max |difference| of the kernels' logits from the eager step's, over 8 steps after a prefill."""
    caches = [KVCache(model.shape, 1, PROMPT + NEW, next(model.parameters()).dtype, torch.device("cuda"))
              for _ in range(2)]
    prompt = torch.as_tensor(x, device="cuda")
    worst, scale = 0.0, 0.0
    with torch.inference_mode():
        for cache in caches:
            model(prompt, cache.view(1))
        tok, pos = prompt[:, -1], torch.tensor([PROMPT], device="cuda")
        for _ in range(8):
            ref = model.step(tok, pos, caches[0].view(1)).float()
            got = step.logits(tok, pos, caches[1].view(1))
            worst = max(worst, (ref - got).abs().max().item())
            scale = max(scale, ref.abs().max().item())
            tok = ref.argmax(-1)
            pos += 1
    return worst, scale


def kernels_per_step(gen, x):
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
    by_name = {}
    for e in kernels:
        n, us = by_name.get(e.name, (0, 0.0))
        by_name[e.name] = (n + 1, us + e.time_range.elapsed_us())
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:12]
    span = max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
    return {"kernels": len(kernels) / PROFILED,
            "kernel_us": sum(e.time_range.elapsed_us() for e in kernels) / PROFILED,
            "span_us": span / PROFILED,
            "top": [[name[:80], n / PROFILED, us / PROFILED] for name, (n, us) in top]}


def run_dtype(dtype, rounds, streams):
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    x = np.random.default_rng(ROWS).integers(0, model.shape.vocab_size, (ROWS, PROMPT))
    configs, timings = tune(model, PROMPT + NEW)
    worst, scale = check_logits(model, OneRowStep(model, PROMPT + NEW, pdl=False, configs=configs), x)
    print(f"{dtype}: kernels' logits vs eager: max |diff| {worst:.3g} (logits up to {scale:.3g})", flush=True)
    config = GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW)
    gens = {"compiled": Generator(model, streams, dataclasses.replace(config, compile=True)),
            "kernels_tuned_no_pdl": Generator(model, streams, dataclasses.replace(config, kernels=True)),
            "kernels_tuned": Generator(model, streams, dataclasses.replace(config, kernels=True)),
            "kernels": Generator(model, streams, dataclasses.replace(config, kernels=True))}
    gens["kernels_tuned_no_pdl"]._one_row = OneRowStep(model, PROMPT + NEW, pdl=False, configs=configs)
    gens["kernels_tuned"]._one_row = OneRowStep(model, PROMPT + NEW, pdl=True, configs=configs)
    try:
        tokens = {name: {loop: gen.generate(x, NEW, loop).tokens for loop in ("synced", "interleaved")}
                  for name, gen in gens.items()}
        seconds = {name: {"synced": [], "interleaved": []} for name in gens}
        device = {name: [] for name in gens}
        for _ in range(rounds):
            for name, gen in gens.items():
                for loop in seconds[name]:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    gen.generate(x, NEW, loop)
                    seconds[name][loop].append(time.perf_counter() - t0)
                device[name].append(gen.device_step_seconds(x, NEW))
        profiled = {name: kernels_per_step(gen, x) for name, gen in gens.items()}
    finally:
        for gen in gens.values():
            gen.close()
    ref = tokens["compiled"]["synced"]
    out = []
    for name in gens:
        step_us = {loop: 1e6 * statistics.median(s) / NEW for loop, s in seconds[name].items()}
        r = {"dtype": str(dtype), "variant": name, "device_step_us": 1e6 * statistics.median(device[name]),
             "step_us": step_us,
             "step_us_runs": {loop: [round(1e6 * t / NEW, 1) for t in s] for loop, s in seconds[name].items()},
             "interleaved_vs_synced": step_us["synced"] / step_us["interleaved"],
             "synced_interleaved_identical": bool((tokens[name]["synced"] == tokens[name]["interleaved"]).all()),
             "agreement_with_compiled": float((tokens[name]["synced"] == ref).mean()),
             **profiled[name]}
        print(json.dumps({k: v for k, v in r.items() if k not in ("top", "step_us_runs")}), flush=True)
        out.append(r)
    return {"dtype": str(dtype), "configs": configs, "gemv_us": timings, "logits_max_abs_diff": worst,
            "logits_max_abs": scale, "variants": out}


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32"]
    with StreamManager(device=torch.device("cuda", 0)) as streams:
        results = [run_dtype(getattr(torch, d), rounds, streams) for d in dtypes]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rows": ROWS, "prompt_len": PROMPT, "new_tokens": NEW, "rounds": rounds, "results": results,
              "command": "python docs/results/decode_kernel_probe/triton_step.py " + " ".join(sys.argv[1:])}
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "triton_step.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
