"""Where the interleaved loop's time over the device bound goes, at one row on the kernel step.

The interleaved loop of ``actors.decode.Generator`` rebuilt here with two
switches: the lanes (two streams in ping-pong, as shipped, or one stream) and
the flag (``copy``: each step's flag copied to pinned memory after the step,
as shipped; ``mapped``: the step's last kernel writes it straight into pinned
host memory, graphs of its own; ``none``: no flag at all, the host waits on
the step's event only, a bound). Timed in alternating rounds with the shipped
synced and interleaved loops and the device bound (the step's graph replayed
back to back on one stream). Each variant's tokens are checked against the
shipped synced loop's. Then the device bound itself, on one stream with no
host waits, under the same changes between steps: both parities' graphs in
turn (as the loops run them) or parity 0's only (as the bound does), with or
without the loop's event record and wait after each step.

    python docs/results/decode_overhead_probe/overhead.py LABEL [rounds] [dtype,...]

writes ``LABEL.json``.
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
VARIANTS = [(lanes, flag) for lanes in ("two", "one") for flag in ("copy", "mapped", "none")]


def mapped_graphs(gen, host_flags):
    """The step's graphs (one per parity) with the flag written into ``host_flags`` by the greedy kernel."""
    kernels, rows = gen._kernel_step, ROWS
    graphs = []
    side = torch.cuda.Stream()
    with torch.inference_mode(), torch.cuda.stream(side):
        for parity in (0, 1):
            def step(parity=parity):
                kernels.greedy(gen._tokens[:rows], gen._pos, gen._view(rows), gen._finished[:rows], gen._out[:rows],
                               gen._step, host_flags[parity:parity + 1], gen.config.pad_token_id,
                               gen.config.eos_token_id)
            gen._pos.zero_()
            gen._step.zero_()
            step()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                step()
            graphs.append(graph)
    side.synchronize()
    return graphs


def run_loop(gen, x, lanes, flag, graphs, host_flags, events):
    """One batch of ``NEW`` tokens through the rebuilt interleaved loop; its tokens."""
    step_done, flag_ready = events
    with torch.inference_mode():
        bucket = gen._stage(x, 0, cached=True)
        for t in range(NEW):
            p = t % 2
            lane = lanes[p]
            if t > 0:
                lane.wait_event(step_done[1 - p])
            with torch.cuda.stream(lane):
                if t == 0:
                    gen._start(bucket, PROMPT)
                    if flag == "mapped":
                        host_flags[0].copy_(gen._flags[0], non_blocking=True)
                else:
                    graphs[p].replay()
                step_done[p].record(lane)
                if flag == "copy":
                    host_flags[p].copy_(gen._flags[p], non_blocking=True)
                flag_ready[p].record(lane)
            if t > 0:
                flag_ready[1 - p].synchronize()
                if flag != "none":
                    assert not host_flags.numpy()[1 - p]  # no EOS: never finished
        flag_ready[(NEW - 1) % 2].synchronize()
    return gen._out[:ROWS, :NEW].cpu().numpy()


def device_loop(gen, x, graphs, alternate, events):
    """Seconds per step: the step's graphs replayed back to back on one stream, timed by CUDA events."""
    stream = torch.cuda.Stream(priority=-1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    between = [torch.cuda.Event(), torch.cuda.Event()]
    with torch.inference_mode(), torch.cuda.stream(stream):
        bucket = gen._stage(x, 0, cached=True)
        gen._start(bucket, PROMPT)
        start.record(stream)
        for t in range(1, NEW):
            p = t % 2 if alternate else 0
            if events:
                stream.wait_event(between[1 - p])
            graphs[p].replay()
            if events:
                between[p].record(stream)
        end.record(stream)
        end.synchronize()
    return start.elapsed_time(end) / 1e3 / (NEW - 1)


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_dtype(dtype, rounds, streams):
    torch.manual_seed(0)
    model = Decoder(GPT2_SMALL).eval().to("cuda", dtype)
    x = np.random.default_rng(ROWS).integers(0, model.shape.vocab_size, (ROWS, PROMPT))
    gen = Generator(model, streams, GenerateConfig(max_batch=ROWS, max_seq_len=PROMPT + NEW, kernels=True))
    host_flags = torch.zeros(2, dtype=torch.bool, pin_memory=True)
    two = (torch.cuda.Stream(priority=-1), torch.cuda.Stream(priority=-1))
    events = ([torch.cuda.Event(), torch.cuda.Event()], [torch.cuda.Event(), torch.cuda.Event()])
    try:
        reference = gen.generate(x, NEW, "synced").tokens  # captures the shipped graphs
        shipped = [gen._graphs[(ROWS, 0)], gen._graphs[(ROWS, 1)]]
        mapped = mapped_graphs(gen, host_flags)
        calls = {"synced": lambda: gen.generate(x, NEW, "synced"),
                 "interleaved": lambda: gen.generate(x, NEW, "interleaved")}
        tokens_match = {}
        for lanes, flag in VARIANTS:
            name = f"{lanes} lanes, flag {flag}"
            pair = two if lanes == "two" else (two[0], two[0])
            graphs = mapped if flag == "mapped" else shipped
            calls[name] = lambda pair=pair, flag=flag, graphs=graphs: run_loop(gen, x, pair, flag, graphs,
                                                                                host_flags, events)
            tokens_match[name] = bool((calls[name]() == reference).all())
        bounds = {f"device, {'both parities' if alternate else 'parity 0'}{', events' if events else ''}":
                  (lambda alternate=alternate, events=events: device_loop(gen, x, shipped, alternate, events))
                  for alternate in (False, True) for events in (False, True)}
        seconds = {name: [] for name in (*calls, "device", *bounds)}
        for _ in range(rounds):
            for name, call in calls.items():
                seconds[name].append(timed(call) / NEW)
            seconds["device"].append(gen.device_step_seconds(x, NEW))
            for name, bound in bounds.items():
                seconds[name].append(bound())
    finally:
        gen.close()
    us = {name: 1e6 * statistics.median(v) for name, v in seconds.items()}
    result = {"dtype": str(dtype), "step_us": us,
              "over_device_us": {name: v - us["device"] for name, v in us.items()},
              "synced_over": {name: us["synced"] / v for name, v in us.items()},
              "runs_us": {name: [round(1e6 * t, 1) for t in v] for name, v in seconds.items()},
              "tokens_match_synced": tokens_match}
    for name, v in us.items():
        print(dtype, f"{name:28s} {v:7.1f} us  +{v - us['device']:5.1f}  synced/this {us['synced'] / v:.3f}",
              flush=True)
    print(dtype, "tokens match:", tokens_match, flush=True)
    return result


def main():
    label = sys.argv[1]
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    dtypes = [getattr(torch, d) for d in (sys.argv[3] if len(sys.argv) > 3 else "float32,bfloat16").split(",")]
    with StreamManager(device=torch.device("cuda", 0)) as streams:
        results = [run_dtype(dtype, rounds, streams) for dtype in dtypes]
    out = os.path.join(os.environ.get("OUT", "."), f"{label}.json")
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": ROWS, "prompt": PROMPT, "new_tokens": NEW,
                   "rounds": rounds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
