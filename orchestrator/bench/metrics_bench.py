"""What Prometheus metrics cost: a job with ``metrics.export`` on vs off, and the price of each recording.

The job is ``Orchestrator.map`` over batches already in the object store (a pool
of refs cycled), one worker per GPU. Settings alternate (on, off, on, off, ...),
each in a fresh Orchestrator with one warm-up pass and ``passes`` timed passes;
rows/s is the median pass. Also timed: the driver's per-batch recording (two
counter adds and a histogram observation) and one NVML read of the GPU.

Floor: export on >= 0.98x export off (metrics must not cost throughput).

    python -m orchestrator.bench.metrics_bench --out docs/results/metrics.json
    python -m orchestrator.bench.metrics_bench --quick --out /tmp/metrics.json   # CPU, tiny: a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import ray
import torch

from actors.telemetry import GpuTelemetry
from orchestrator.api import Orchestrator
from orchestrator.bench.common import command_line, print_table, write_result
from orchestrator.config import RunConfig
from orchestrator.metrics import DriverMetrics

FLOOR = 0.98
_POOL = 8  # distinct batches in the object store, cycled


def _config(model: str, batch_rows: int, export: bool, quick: bool) -> RunConfig:
    model_cfg = {"source": model} if quick else {"source": model, "dtype": "bfloat16", "channels_last": True}
    return RunConfig.model_validate({
        "model": model_cfg, "pipeline": {"max_batch_rows": batch_rows},
        "dispatch": {"batch_rows": batch_rows, "progress": False}, "metrics": {"export": export, "sample_s": 1.0},
        "cluster": {"worker_start_timeout_s": 300}})


def _pool(info: dict[str, Any], batch_rows: int) -> list[Any]:
    rng = np.random.default_rng(0)
    shape, dtype = (batch_rows, *info["input_shape"]), np.dtype(info["input_dtype"])
    if dtype.kind in "ui":
        return [ray.put(rng.integers(0, 256, shape, dtype=dtype)) for _ in range(_POOL)]
    return [ray.put(rng.standard_normal(shape).astype(dtype)) for _ in range(_POOL)]


def _run_setting(config: RunConfig, batches: int, passes: int) -> list[float]:
    """Rows/s of each timed pass, in a fresh Orchestrator."""
    rates = []
    with Orchestrator(config) as orch:
        refs = _pool(orch.worker_info[0], config.dispatch.batch_rows)
        feed = [refs[i % _POOL] for i in range(batches)]
        for i in range(passes + 1):  # the first pass warms up (cuDNN autotuning, first allocations)
            t0 = time.perf_counter()
            rows = sum(r.rows for r in orch.map(feed))
            if i:
                rates.append(rows / (time.perf_counter() - t0))
    return rates


def _driver_event_us(n: int = 20000) -> float:
    """Microseconds per completed batch recorded by the driver (Ray must be initialised)."""
    info = {"name": "w", "gpu_ids": ["0"], "node": "bench", "model": "bench"}
    events = DriverMetrics([info], depth=3, sample_s=5.0, export=True).events("bench")
    t0 = time.perf_counter()
    for _ in range(n):
        events.completed("w", 256, 0.01)
    return (time.perf_counter() - t0) / n * 1e6


def _nvml_read_ms() -> float | None:
    if not torch.cuda.is_available():
        return None
    telemetry = GpuTelemetry(torch.device("cuda", 0))
    if not telemetry.available:
        return None
    t0 = time.perf_counter()
    for _ in range(5):
        telemetry.read()
    return (time.perf_counter() - t0) / 5 * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="zoo:resnet18")
    parser.add_argument("--batch-rows", type=int, default=256)
    parser.add_argument("--batches", type=int, default=400, help="batches per timed pass")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="on/off alternations")
    parser.add_argument("--quick", action="store_true", help="tiny MLP on CPU workers, a few batches (no GPU)")
    parser.add_argument("--out", default="docs/results/metrics.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch_rows, args.batches, args.passes, args.rounds = "zoo:tiny_mlp", 64, 40, 2, 1
    elif not torch.cuda.is_available():
        raise SystemExit("metrics_bench needs a CUDA device (or --quick)")
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        rates: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(args.rounds):
            for setting in ("on", "off"):
                config = _config(args.model, args.batch_rows, setting == "on", args.quick)
                rates[setting] += _run_setting(config, args.batches, args.passes)
        event_us = _driver_event_us()
    finally:
        ray.shutdown()
    rows = [{"model": args.model, "batch_rows": args.batch_rows, "metrics_export": setting,
             "rows_per_s": statistics.median(r), "passes": len(r)} for setting, r in rates.items()]
    ratio = rows[0]["rows_per_s"] / rows[1]["rows_per_s"]
    print_table(rows, ["model", "batch_rows", "metrics_export", "rows_per_s", "passes"])
    nvml_ms = _nvml_read_ms()
    print(f"export on / off: {ratio:.3f} (floor {FLOOR}); driver recording {event_us:.1f} us per batch; "
          f"NVML read {'-' if nvml_ms is None else f'{nvml_ms:.1f} ms'}")
    write_result(args.out, "metrics", command_line("orchestrator.bench.metrics_bench", argv), rows,
                 on_over_off=ratio, floor=FLOOR, passed=ratio >= FLOOR, driver_event_us=event_us,
                 nvml_read_ms=nvml_ms, quick=args.quick)
    return rows


if __name__ == "__main__":
    main()
