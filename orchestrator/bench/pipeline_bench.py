"""One GPU fed from pageable host numpy: GPU-only vs a serial loop vs the pipeline.

- gpu_only: the batches already sit on the device; preprocess + model +
  postprocess in a loop. The compute bound.
- serial: what a hand-written worker does: ``torch.from_numpy(x).cuda()``,
  model, ``.cpu()``, one batch after another.
- pipeline: ``actors.pipeline.Pipeline`` from the same pageable arrays, with
  large sources pinned in place (the default; the MLP's 128 MiB batches
  qualify, the ResNets' 38 MiB ones are staged), and ``_staged`` with pinning
  off, every batch copied into a pinned slot first.
- pipeline ``_cold`` (MLP only): each timed pass reads a fresh 5 GiB array the
  pipeline has never seen, so registering it is paid inside the pass; the plain
  variant re-reads a pool that stays registered, as a Ray worker re-reads its
  object store.

For the transfer-bound MLP the reference is the H2D bound instead: the pinned
H2D bandwidth measured on this device over the bytes of one input row.

    python -m orchestrator.bench.pipeline_bench --out docs/results/pipeline.json
"""
from __future__ import annotations

import argparse
import contextlib
import statistics

import numpy as np
import torch

from actors.bounds import analyse, copy_ceilings
from actors.pipeline import Pipeline, PipelineConfig
from actors.streams import StreamManager
from actors.zoo import ZOO
from orchestrator.bench.common import command_line, median_seconds, print_table, write_result

WORKLOADS = {
    # name: (zoo entry, batch rows, batches per timed run, host pool size)
    "resnet50": ("resnet50", 256, 40, 6),
    "resnet18": ("resnet18", 256, 80, 6),
    "mlp": ("mlp", 8192, 40, 4),
}


def _pool(spec, rows: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (rows, *spec.row_shape)
    if spec.dtype == "uint8":
        return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(count)]


def _forward(built, x: torch.Tensor):
    if built.preprocess is not None:
        x = built.preprocess(x)
    y = built.model(x)
    return built.postprocess(y) if built.postprocess is not None else y


def bench_workload(name: str, repeats: int, staging_threads: list[int], depth: int) -> list[dict]:
    """Variants run interleaved, one pass each per round, so clock or thermal drift hits them alike."""
    entry, rows, batches, pool_size = WORKLOADS[name]
    device = torch.device("cuda", 0)
    built = ZOO[entry](dtype=torch.bfloat16, channels_last=True).to(device)
    pool = _pool(built.input_spec, rows, pool_size)
    feed = [pool[i % pool_size] for i in range(batches)]

    with torch.inference_mode():
        dev_pool = [torch.from_numpy(a).to(device) for a in pool]
        ref = _forward(built, dev_pool[0]).float().cpu().numpy()

    def gpu_only() -> None:
        with torch.inference_mode():
            for i in range(batches):
                _forward(built, dev_pool[i % pool_size])

    # The serial loop reads its own copies: the pipeline pins the pool in place, and a
    # hand-written loop over pinned memory would no longer be the pageable baseline.
    serial_pool = [a.copy() for a in pool]

    def serial() -> None:
        with torch.inference_mode():
            for i in range(batches):
                a = serial_pool[i % pool_size]
                _forward(built, torch.from_numpy(a).to(device)).cpu()

    variants = {"gpu_only": gpu_only, "serial": serial}
    extra: dict[str, dict] = {}
    fresh: list[np.ndarray] = []  # the cold variant's source, laid anew before each of its passes
    with contextlib.ExitStack() as stack:
        sm = stack.enter_context(StreamManager())
        kinds = [("", 16.0), ("_staged", 0.0)] + ([("_cold", 16.0)] if name == "mlp" else [])
        for threads in staging_threads:
            for suffix, pin_gb in kinds:
                cfg = PipelineConfig(depth=depth, max_batch_rows=rows, staging_threads=threads, timing_every=8,
                                     pin_in_place_gb=pin_gb)
                p = stack.enter_context(Pipeline(built, sm, cfg))
                first = p.submit(0, pool[0]).result().outputs
                parity = float(np.abs(first.astype(np.float64) - ref).max()) if first.dtype.kind == "f" else \
                    float((first != ref).mean())
                label = f"pipeline_{threads}t{suffix}"
                if suffix == "_cold":
                    variants[label] = lambda p=p: list(p.map((i, fresh[0][i * rows:(i + 1) * rows])
                                                             for i in range(batches)))
                else:
                    variants[label] = lambda p=p: list(p.map(enumerate(feed)))
                extra[label] = {"pipeline": p, "parity_vs_gpu_only": parity, "staging_threads": threads,
                                "pin_in_place_gb": pin_gb}
        times: dict[str, list[float]] = {label: [] for label in variants}
        for rnd in range(repeats + 1):  # round 0 warms up
            for label, fn in variants.items():
                if label in extra:
                    extra[label]["pipeline"].stats.reset()
                if label.endswith("_cold"):
                    fresh[:] = [np.concatenate(feed)]  # new pages, written (touched) like loaded data
                seconds = median_seconds(fn, 1, warmup=0)
                if rnd:
                    times[label].append(seconds)
        results = []
        for label, ts in times.items():
            row = {"workload": name, "variant": label, "rows_per_s": rows * batches / statistics.median(ts),
                   "pass_rows_per_s": [rows * batches / t for t in ts]}
            if label in extra:
                info = extra[label]
                row["bound"] = analyse(info["pipeline"].stats, copy_ceilings(device)).line  # of the last pass
                row["parity_vs_gpu_only"] = info["parity_vs_gpu_only"]
                row["staging_threads"] = info["staging_threads"]
                row["pin_in_place_gb"] = info["pin_in_place_gb"]
                if info["pipeline"].pinner is not None:
                    row["pinned_in_place"] = info["pipeline"].pinner.as_dict()
            results.append(row)
    gpu_only_rate = results[0]["rows_per_s"]
    for r in results:
        r["vs_gpu_only"] = r["rows_per_s"] / gpu_only_rate
    if name == "mlp":
        c = copy_ceilings(device)
        h2d_bound = c.h2d_gbps * 1e9 / (4 * built.input_spec.row_shape[0])
        for r in results:
            r["vs_h2d_bound"] = r["rows_per_s"] / h2d_bound
        results.append({"workload": name, "variant": "h2d_bound", "rows_per_s": h2d_bound,
                        "bound": f"pinned H2D {c.h2d_gbps:.1f} GB/s, D2H {c.d2h_gbps:.1f} GB/s"})
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="resnet50,resnet18,mlp")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--staging-threads", default="8", help="comma list: one pipeline variant per count")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--out", default="docs/results/pipeline.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("pipeline_bench needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    rows = []
    for name in args.workloads.split(","):
        threads = [int(t) for t in args.staging_threads.split(",")]
        rows += bench_workload(name, args.repeats, threads, args.depth)
        print_table(rows, ["workload", "variant", "rows_per_s", "vs_gpu_only", "vs_h2d_bound", "bound"])
    write_result(args.out, "pipeline", command_line("orchestrator.bench.pipeline_bench", argv), rows,
                 floors={"resnet pipeline vs gpu_only": 0.95, "mlp pipeline vs h2d_bound": 0.80})
    return rows


if __name__ == "__main__":
    main()
