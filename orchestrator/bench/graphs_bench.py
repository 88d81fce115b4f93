"""CUDA graphs vs eager in the pipeline: ResNet-18 and the MLP, per batch size, from pageable numpy.

Per model, two pipelines share the built model: one eager, one with CUDA graphs
(default buckets: powers of two up to the largest batch size, captured at
start-up). For each batch size both run the same feed of pageable host arrays
through ``Pipeline.map``; timed runs alternate between the two so that clock
and thermal drift hit both alike. Rows/s is the median over repeats; ``ratio``
is graphs over eager. Parity: the first batch's outputs, graphs vs eager.

Floors: ResNet-18 graphs >= 2x eager at batch <= 8; graphs never below 0.97x
eager at any size.

    python -m orchestrator.bench.graphs_bench --out docs/results/graphs.json   # and graphs.png
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from actors.graphs import GraphConfig
from actors.pipeline import Pipeline, PipelineConfig
from actors.streams import StreamManager
from actors.zoo import ZOO
from orchestrator.bench.common import command_line, median_seconds, print_table, write_result
from orchestrator.bench.plot import plot_after_bench

SIZES = (1, 2, 4, 8, 16, 32, 64, 256)
FLOORS = {"resnet18 graphs vs eager at batch <= 8": 2.0, "graphs vs eager at any batch size": 0.97}
_POOL = 4  # distinct host arrays per batch size, so no run re-reads one cached buffer


def _pool(spec, rows: int) -> list[np.ndarray]:
    rng = np.random.default_rng(rows)
    shape = (rows, *spec.row_shape)
    if spec.dtype == "uint8":
        return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(_POOL)]
    return [rng.standard_normal(shape, dtype=np.float32) for _ in range(_POOL)]


def _batches(rows: int) -> int:
    """Batches per timed run: ~8k rows, but enough batches to fill the ring and few enough to stay short."""
    return max(32, min(300, 8192 // rows))


def _parity(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs difference for floats, fraction of differing entries otherwise."""
    if a.dtype.kind == "f":
        return float(np.abs(a.astype(np.float64) - b).max())
    return float((a != b).mean())


def bench_model(name: str, sizes: list[int], repeats: int, depth: int, staging_threads: int) -> tuple[list[dict], dict]:
    device = torch.device("cuda", 0)
    built = ZOO[name](dtype=torch.bfloat16, channels_last=True).to(device)
    base = dict(depth=depth, max_batch_rows=max(sizes), staging_threads=staging_threads, timing_every=0)
    rows_out = []
    with StreamManager(device=device) as sm_eager, StreamManager(device=device) as sm_graphs:
        eager = Pipeline(built, sm_eager, PipelineConfig(**base))
        graphs = Pipeline(built, sm_graphs, PipelineConfig(**base, graphs=GraphConfig(enabled=True)))
        with eager, graphs:
            for rows in sizes:
                pool = _pool(built.input_spec, rows)
                feed = list(enumerate(pool[i % _POOL] for i in range(_batches(rows))))
                parity = _parity(graphs.submit(0, pool[0]).result().outputs, eager.submit(0, pool[0]).result().outputs)
                runs = {"eager": lambda: list(eager.map(feed)), "graphs": lambda: list(graphs.map(feed))}
                for run in runs.values():
                    run()  # warm: cuDNN autotuning for eager, first replays for graphs
                seconds: dict[str, list[float]] = {label: [] for label in runs}
                for _ in range(repeats):
                    for label, run in runs.items():
                        seconds[label].append(median_seconds(run, 1, warmup=0))
                rate = {label: rows * len(feed) / statistics.median(s) for label, s in seconds.items()}
                rows_out.append({"model": name, "batch": rows, "eager_rows_per_s": rate["eager"],
                                 "graphs_rows_per_s": rate["graphs"], "ratio": rate["graphs"] / rate["eager"],
                                 "parity": parity})
            stats = graphs.graphs.stats.as_dict()
    return rows_out, stats


def check_floors(rows: list[dict]) -> dict[str, bool]:
    """Each floor in FLOORS against the rows it covers (a floor with no rows measured fails)."""
    small_resnet = [r for r in rows if r["model"] == "resnet18" and r["batch"] <= 8]
    covered = {"resnet18 graphs vs eager at batch <= 8": small_resnet, "graphs vs eager at any batch size": rows}
    return {floor: bool(rs) and min(r["ratio"] for r in rs) >= FLOORS[floor] for floor, rs in covered.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,mlp")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--staging-threads", type=int, default=8)
    parser.add_argument("--out", default="docs/results/graphs.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("graphs_bench needs a CUDA device")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rows, graph_stats = [], {}
    for name in args.models.split(","):
        model_rows, graph_stats[name] = bench_model(name, sizes, args.repeats, args.depth, args.staging_threads)
        rows += model_rows
        print_table(rows, ["model", "batch", "eager_rows_per_s", "graphs_rows_per_s", "ratio", "parity"])
    passed = check_floors(rows)
    for floor, ok in passed.items():
        print(f"{'PASS' if ok else 'FAIL'}  {floor} (floor {FLOORS[floor]})")
    write_result(args.out, "graphs", command_line("orchestrator.bench.graphs_bench", argv), rows,
                 floors=FLOORS, passed=passed, graph_stats=graph_stats)
    plot_after_bench(args.out)
    return rows


if __name__ == "__main__":
    main()
