"""Several streams and models on one GPU: throughput on 1, 2 and 4 streams, and priority under load.

Throughput. A workload that underfills the GPU: by default ResNet-50 (bf16,
channels_last) at batch 4 with CUDA graphs (one bucket, 4); ``--model`` and
``--batch`` pick another zoo image model. Why not ResNet-18 at batch 8: on an
H100 its graphs, replayed back to back on 4 streams from one thread with no
pipeline at all, reach only 1.77x one stream (2 streams 1.42x): the GPU itself
overlaps it less than the 1.8x floor. ResNet-50 at batch 4 reaches 1.98x that
way (batch 1: 2.57x, 8: 1.53x). One ``Engine`` per stream count k
= 1, 2, 4, with k replicas, each replica a pipeline on its own compute stream
(``actors.engines``). k feeder threads each keep ``--window`` batches in flight
through ``Engine.submit`` from pageable numpy, as a worker's Ray threads do;
each batch goes to the least-busy replica. The three engines live side by side
in one process and their timed runs alternate, so drift hits all alike; rows/s
is the median over repeats. Parity: the first batches' class ids on k streams
against 1 stream. Floors (RFC 0004): 2 streams >= 1.3x, 4 streams >= 1.8x.
Next to them, the device ceiling (GPU only, no host pipeline: ``device_ceiling``),
which is where the "why not ResNet-18 at batch 8" figures come from.

Priority. A HIGH-priority copy of the small model (graphs) takes one batch at
a time (a closed loop with 2 ms between batches); its latency alone and then
while a LOW-priority ResNet-50 at batch 64 (two replicas, graphs, two feeder
threads) keeps the GPU busy. Control: the same probe model at LOW priority,
equal to the flood's, measured in the same flood (probes alternate between the
two). Two latencies, p50 and p99 in ms: end to end (submit to outputs in host
memory, host threads included) and on the GPU (the batch's compute span from
its CUDA events: what stream priority can change).

    python -m orchestrator.bench.multistream_bench --out docs/results/multistream.json

``--smoke`` runs a tiny version on the CPU backend (tiny MLPs, few batches) to
check the script end to end; its numbers say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from actors.engines import Engine, Engines, EngineSpec, build_model, streams_needed
from actors.pipeline import PipelineConfig
from actors.streams import StreamManager
from orchestrator.bench.common import command_line, print_table, write_result

STREAMS = (1, 2, 4)
FLOORS = {"2": 1.3, "4": 1.8}
_POOL = 8  # distinct host arrays fed round-robin, so no run re-reads one cached buffer
_THINK_S = 0.002  # the latency probe's pause between batches


def _workload(smoke: bool, model: str, batch: int) -> dict[str, Any]:
    if smoke:
        small = {"source": "zoo:tiny_mlp"}
        return {"small": small, "flood": small, "batch": 8, "flood_batch": 64, "graphs": False,
                "batches": 64, "probes": 20, "repeats": 2}
    image = {"dtype": "bfloat16", "channels_last": True}
    return {"small": {"source": model, **image}, "flood": {"source": "zoo:resnet50", **image},
            "batch": batch, "flood_batch": 64, "graphs": True, "batches": max(200, 12_000 // batch),
            "probes": 300, "repeats": 5}


def _pool(spec, rows: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (rows, *spec.row_shape)
    if spec.dtype == "uint8":
        return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(_POOL)]
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(_POOL)]


def _feed(engine: Engine, arrays: list[np.ndarray], batches: int, threads: int, window: int) -> float:
    """Seconds to run ``batches`` batches from ``threads`` threads, each keeping ``window`` in flight."""
    def feeder(first: int) -> None:
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        for i in range(first, batches, threads):
            pending.append(engine.submit(i, arrays[i % len(arrays)]))
            if len(pending) >= window:
                pending.popleft().result()
        for f in pending:
            f.result()

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        t0 = time.perf_counter()
        for f in [pool.submit(feeder, t) for t in range(threads)]:
            f.result()
        return time.perf_counter() - t0


def _config(max_rows: int, buckets: tuple[int, ...], graphs: bool, depth: int, timed: bool = False) -> PipelineConfig:
    return PipelineConfig(depth=depth, max_batch_rows=max_rows, timing_every=int(timed),
                          graphs={"enabled": graphs, "buckets": buckets})


def throughput(work: dict[str, Any], device: torch.device, window: int, depth: int) -> list[dict[str, Any]]:
    batch = work["batch"]
    config = _config(batch, (batch,), work["graphs"], depth)
    managers = [StreamManager(max_streams=streams_needed([k]), device=device) for k in STREAMS]
    engines: list[Engine] = []
    try:
        for k, sm in zip(STREAMS, managers):
            engines.append(Engine(EngineSpec(f"streams-{k}", work["small"], replicas=k), sm, config))
        arrays = _pool(engines[0].input_spec, batch, seed=0)
        firsts = {}
        for k, engine in zip(STREAMS, engines):
            firsts[k] = np.concatenate([engine.submit(i, a).result().outputs for i, a in enumerate(arrays)])
            _feed(engine, arrays, min(work["batches"], 200), k, window)  # warm: first replays, host caches
        seconds: dict[int, list[float]] = {k: [] for k in STREAMS}
        for _ in range(work["repeats"]):
            for k, engine in zip(STREAMS, engines):
                seconds[k].append(_feed(engine, arrays, work["batches"], k, window))
        rows = []
        for k in STREAMS:
            rate = batch * work["batches"] / statistics.median(seconds[k])
            base = rows[0]["rows_per_s"] if rows else rate
            rows.append({"part": "throughput", "streams": k, "rows_per_s": rate, "batches_per_s": rate / batch,
                         "speedup": rate / base, "parity_mismatch": float((firsts[k] != firsts[1]).mean())})
        return rows
    finally:
        for engine in engines:
            engine.close()
        for sm in managers:
            sm.close()


def device_ceiling(work: dict[str, Any], device: torch.device, rounds: int = 4) -> list[dict[str, Any]]:
    """What the GPU alone gives: per stream count k, k CUDA graphs of the whole model (its inputs
    already on the device) replayed round-robin on k streams from one thread, no pipeline. The
    pipeline's speedups are read against these."""
    batch = work["batch"]
    built = build_model(work["small"]).to(device)
    rows = []
    with torch.inference_mode():
        for k in STREAMS:
            lanes = [torch.cuda.Stream(device) for _ in range(k)]
            graphs = []
            for lane in lanes:
                x = torch.from_numpy(_pool(built.input_spec, batch, seed=len(graphs))[0]).to(device)
                lane.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(lane):
                    for _ in range(3):
                        built.run(x)  # warm-up: cuDNN picks its kernels
                lane.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=lane):
                    built.run(x)
                graphs.append((graph, x))
            replays = max(60, work["batches"] // (4 * k))
            rates = []
            for _ in range(rounds + 1):  # the first round warms up
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                for _ in range(replays):
                    for lane, (graph, _x) in zip(lanes, graphs):
                        with torch.cuda.stream(lane):
                            graph.replay()
                torch.cuda.synchronize(device)
                rates.append(replays * k * batch / (time.perf_counter() - t0))
            rate = statistics.median(rates[1:])
            base = rows[0]["rows_per_s"] if rows else rate
            rows.append({"part": "device ceiling", "streams": k, "rows_per_s": rate, "batches_per_s": rate / batch,
                         "speedup": rate / base})
            del graphs
    return rows


def _percentiles(samples: list[tuple[float, float]]) -> dict[str, float]:
    wall, gpu = (np.array(s) for s in zip(*samples))
    return {"p50_ms": float(np.percentile(wall, 50)), "p99_ms": float(np.percentile(wall, 99)),
            "mean_ms": float(wall.mean()),
            "gpu_p50_ms": float(np.percentile(gpu, 50)), "gpu_p99_ms": float(np.percentile(gpu, 99))}


def _latency(submit: Callable[[int], Any]) -> tuple[float, float]:
    """(end-to-end ms, the batch's compute span on the GPU in ms)."""
    t0 = time.perf_counter()
    result = submit(0).result()
    return (time.perf_counter() - t0) * 1e3, result.stage_ms["compute"]


def priority(work: dict[str, Any], device: torch.device, window: int,
             depth: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    batch, flood_batch = work["batch"], work["flood_batch"]
    config = _config(flood_batch, (batch, flood_batch), work["graphs"], depth, timed=True)
    specs = [EngineSpec("flood", work["flood"], replicas=2, priority="low"),
             EngineSpec("probe-high", work["small"], priority="high"),
             EngineSpec("probe-low", work["small"], priority="low")]
    with StreamManager(max_streams=streams_needed([s.replicas for s in specs]), device=device) as sm:
        engines = Engines(specs, sm, config)
        try:
            flood, high, low = (engines.get(s.name) for s in specs)
            probe_x = _pool(high.input_spec, batch, seed=1)[0]
            flood_x = _pool(flood.input_spec, flood_batch, seed=2)
            submit_high = functools.partial(high.submit, array=probe_x)
            submit_low = functools.partial(low.submit, array=probe_x)
            for _ in range(20):  # warm
                _latency(submit_high)
                _latency(submit_low)
            flood_alone_s = _feed(flood, flood_x, 40, 2, window)
            alone = {"high": [], "low": []}
            for _ in range(work["probes"]):
                alone["high"].append(_latency(submit_high))
                time.sleep(_THINK_S)
                alone["low"].append(_latency(submit_low))
                time.sleep(_THINK_S)
            loaded: dict[str, list[float]] = {"high": [], "low": []}
            stop = threading.Event()
            flood_rows = [0]

            def flood_loop(first: int) -> None:
                pending: collections.deque[concurrent.futures.Future] = collections.deque()
                i = first
                while not stop.is_set():
                    pending.append(flood.submit(i, flood_x[i % len(flood_x)]))
                    i += 2
                    if len(pending) >= window:
                        flood_rows[0] += pending.popleft().result().rows
                for f in pending:
                    f.result()

            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                loops = [pool.submit(flood_loop, t) for t in range(2)]
                try:
                    time.sleep(0.5)  # the flood reaches its steady state
                    t0, rows0 = time.perf_counter(), flood_rows[0]
                    for _ in range(work["probes"]):
                        loaded["high"].append(_latency(submit_high))
                        time.sleep(_THINK_S)
                        loaded["low"].append(_latency(submit_low))
                        time.sleep(_THINK_S)
                    flood_rate = (flood_rows[0] - rows0) / (time.perf_counter() - t0)
                finally:
                    stop.set()
                for f in loops:
                    f.result()
        finally:
            engines.close()
    rows = []
    for who, label in (("high", "HIGH"), ("low", "LOW (= flood)")):
        for state, samples in (("alone", alone[who]), ("under LOW flood", loaded[who])):
            rows.append({"part": "priority", "probe_priority": label, "state": state, **_percentiles(samples)})
    for row in rows:
        alone_row = next(r for r in rows if r["probe_priority"] == row["probe_priority"] and r["state"] == "alone")
        row["p50_vs_alone"] = row["p50_ms"] / alone_row["p50_ms"]
        row["p99_vs_alone"] = row["p99_ms"] / alone_row["p99_ms"]
        row["gpu_p50_vs_alone"] = row["gpu_p50_ms"] / alone_row["gpu_p50_ms"]
    flood_info = {"flood_alone_rows_per_s": 40 * flood_batch / flood_alone_s,
                  "flood_rows_per_s_while_probed": flood_rate}
    return rows, flood_info


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=4, help="batches each feeder thread keeps in flight")
    parser.add_argument("--depth", type=int, default=3, help="ring slots per replica")
    parser.add_argument("--model", default="zoo:resnet50", help="the small model (a zoo image model)")
    parser.add_argument("--batch", type=int, default=4, help="its batch rows")
    parser.add_argument("--smoke", action="store_true", help="tiny MLPs on the CPU backend (checks the script only)")
    parser.add_argument("--out", default="docs/results/multistream.json")
    args = parser.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
        from torch.backends import cudnn

        cudnn.benchmark = True  # as the workers do
    else:
        raise SystemExit("multistream_bench needs a CUDA device (or --smoke)")
    work = _workload(args.smoke, args.model, args.batch)
    rows = throughput(work, device, args.window, args.depth)
    if device.type == "cuda":
        rows += device_ceiling(work, device)
    print_table(rows, ["part", "streams", "rows_per_s", "batches_per_s", "speedup", "parity_mismatch"])
    latency_rows, flood_info = priority(work, device, args.window, args.depth)
    print_table(latency_rows, ["probe_priority", "state", "p50_ms", "p99_ms", "gpu_p50_ms", "gpu_p99_ms",
                               "p50_vs_alone", "gpu_p50_vs_alone"])
    print("flood:", flood_info)
    workload = {"throughput": f"{work['small']['source']} at batch {work['batch']}, graphs={work['graphs']}",
                "priority": f"probe {work['small']['source']} at batch {work['batch']} vs flood "
                            f"{work['flood']['source']} at batch {work['flood_batch']} (2 replicas, LOW)",
                "batches_per_run": work["batches"], "probes": work["probes"], "repeats": work["repeats"],
                "window": args.window, "depth": args.depth, "device": str(device), **flood_info}
    write_result(args.out, "multistream", command_line("orchestrator.bench.multistream_bench", argv),
                 rows + latency_rows, workload=workload, floors=FLOORS)
    return rows + latency_rows


if __name__ == "__main__":
    main()
