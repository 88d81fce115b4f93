"""Scaling across GPUs: this project vs hand-written Ray actors vs Ray Data, side by side.

Inputs are already in the object store (one ObjectRef per batch, a pool cycled
``passes`` times), and every method consumes the same refs on the same GPUs:

- gpu_only: one actor per GPU times preprocess + model + postprocess on batches
  already on its device; the sum over GPUs is the compute bound.
- handwritten: one ``num_gpus=1`` actor per GPU doing ``torch.from_numpy(x).cuda()``,
  model, ``.cpu()``; the driver submits every batch round-robin and ``ray.get``s them.
- ray_data: ``ray.data.from_numpy_refs(refs).map_batches(Model, batch_size=B,
  num_gpus=1, concurrency=N, batch_format="numpy", zero_copy_batch=True)``, as
  Ray Data's batch-inference guide recommends (batch size as large as fits,
  one actor per GPU, numpy batches, no copy of read-only batches).
- orchestrator: ``Orchestrator.map`` over the refs.

    python -m orchestrator.bench.scaling_bench --gpus 1,2 --out docs/results/scaling.json
    (writes docs/results/scaling.png next to it)
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import ray
import ray.data
import torch

from orchestrator.bench.common import command_line, print_table, write_result
from orchestrator.bench.plot import plot_after_bench

# name: (model source, dtype, channels_last, batch rows, batches in the pool, passes over the pool)
WORKLOADS = {
    "resnet50": ("zoo:resnet50", "bfloat16", True, 256, 24, 3),
    "resnet18": ("zoo:resnet18", "bfloat16", True, 256, 24, 6),
    "mlp": ("zoo:mlp", "bfloat16", False, 8192, 16, 8),
    "tiny_mlp": ("zoo:tiny_mlp", "float32", False, 512, 8, 2),  # --smoke: runs on CPU workers
}


METHODS = ("gpu_only", "handwritten", "ray_data", "orchestrator")


def _model_args(source: str, dtype: str, channels_last: bool) -> dict[str, Any]:
    return {"source": source, "dtype": dtype, "channels_last": channels_last}


def _build(args: dict[str, Any]):
    from torch.backends import cudnn  # imported here: Ray Data pickles the class, and cudnn does not pickle

    from actors.models import load_model

    cudnn.benchmark = True  # as in every method compared here, the orchestrator's workers included
    torch.manual_seed(0)
    args = dict(args)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return load_model(args.pop("source"), **args).to(device), device


def _forward(built, x: torch.Tensor):
    if built.preprocess is not None:
        x = built.preprocess(x)
    y = built.model(x)
    return built.postprocess(y) if built.postprocess is not None else y


class Handwritten:
    """What users write by hand: one actor per GPU, a serial copy-in, forward, copy-out."""

    def __init__(self, model_args: dict[str, Any]) -> None:
        self.built, self.device = _build(model_args)

    def infer(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return _forward(self.built, torch.from_numpy(x).to(self.device)).cpu().numpy()

    def gpu_only(self, sample: np.ndarray, batches: int, repeats: int) -> float:
        """Rows/s of the model on batches already on this device (median of ``repeats``)."""
        with torch.inference_mode():
            xs = [torch.from_numpy(sample).to(self.device) for _ in range(2)]
            rates = []
            for r in range(repeats + 1):
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(batches):
                    _forward(self.built, xs[i % 2])
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                if r:  # the first round warms up
                    rates.append(len(sample) * batches / (time.perf_counter() - t0))
        return statistics.median(rates)


class RayDataModel:
    """The Ray Data UDF: the same serial copy-in, forward, copy-out, on numpy batches."""

    def __init__(self, model_args: dict[str, Any]) -> None:
        self.built, self.device = _build(model_args)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(batch["data"]).to(self.device)
            return {"out": _forward(self.built, x).cpu().numpy()}


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: model build, cuDNN autotuning, object transfer
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, gpus: int, repeats: int, per_gpu: float, methods: list[str]) -> list[dict[str, Any]]:
    source, dtype, channels_last, rows, pool, passes = WORKLOADS[name]
    model_args = _model_args(source, dtype, channels_last)
    rng = np.random.default_rng(0)
    from actors.models import load_model
    spec = load_model(source).input_spec
    shape = (rows, *spec.row_shape)
    make = (lambda: rng.integers(0, 256, shape, dtype=np.uint8)) if spec.dtype == "uint8" else \
        (lambda: rng.standard_normal(shape, dtype=np.float32))
    refs = [ray.put(make()) for _ in range(pool)]
    feed = refs * passes
    total_rows = rows * len(feed)
    out: list[dict[str, Any]] = []

    def record(method: str, seconds: float | None, rate: float | None = None) -> None:
        out.append({"workload": name, "gpus": gpus, "method": method,
                    "rows_per_s": rate if rate is not None else total_rows / seconds})
        print(f"  {name} x{gpus} {method}: {out[-1]['rows_per_s']:,.0f} rows/s", flush=True)

    if "gpu_only" in methods or "handwritten" in methods:
        actor_cls = ray.remote(num_gpus=per_gpu)(Handwritten)
        actors = [actor_cls.remote(model_args) for _ in range(gpus)]
        if "gpu_only" in methods:
            sample = ray.get(refs[0])
            record("gpu_only", None, sum(ray.get([a.gpu_only.remote(sample, 2 * pool, repeats) for a in actors])))
        if "handwritten" in methods:
            record("handwritten", _timed(
                lambda: ray.get([actors[i % gpus].infer.remote(r) for i, r in enumerate(feed)]), repeats))
        for a in actors:
            ray.kill(a)

    def ray_data() -> float:
        """Rows/s from the first output batch on: each execution starts its own actor pool,
        and that start-up is left out, as it is for the other methods (their actors persist)."""
        ds = ray.data.from_numpy_refs(feed).map_batches(
            RayDataModel, fn_constructor_args=(model_args,), batch_size=rows, num_gpus=per_gpu, concurrency=gpus,
            batch_format="numpy", zero_copy_batch=True)
        first = None
        counted = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if first is None:
                first = time.perf_counter()
            else:
                counted += len(batch["out"])
        return counted / (time.perf_counter() - first)

    if "ray_data" in methods:
        ray_data()  # warm-up
        record("ray_data", None, statistics.median(ray_data() for _ in range(repeats)))

    if "orchestrator" in methods:
        from orchestrator import Orchestrator, RunConfig

        cfg = RunConfig.model_validate({
            "model": model_args, "cluster": {"num_workers": gpus, "gpus_per_worker": per_gpu or 1.0},
            "pipeline": {"max_batch_rows": rows}, "dispatch": {"batch_rows": rows, "progress": False}})
        with Orchestrator(cfg) as orch:
            record("orchestrator", _timed(lambda: sum(1 for _ in orch.map(feed)), repeats))
            report = orch.report()
            out[-1]["bound"] = report["bound"]
            out[-1]["pinned_in_place"] = [w["pinned_in_place"] for w in report["workers"]]
    return out


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the same method on 1 GPU, and against gpu_only and handwritten on as many GPUs."""
    by = {(r["workload"], r["gpus"], r["method"]): r["rows_per_s"] for r in rows}
    for r in rows:
        for key, ref in (("vs_1_gpu", (r["workload"], 1, r["method"])),
                         ("vs_gpu_only", (r["workload"], r["gpus"], "gpu_only")),
                         ("vs_handwritten", (r["workload"], r["gpus"], "handwritten"))):
            r[key] = r["rows_per_s"] / by[ref] if ref in by else None


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="resnet50,resnet18,mlp")
    parser.add_argument("--gpus", default="1,2", help="GPU counts to run, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU workers with fake GPUs (no CUDA)")
    parser.add_argument("--out", default="docs/results/scaling.json")
    args = parser.parse_args(argv)
    counts = [int(g) for g in args.gpus.split(",")]
    if args.smoke:
        workloads, per_gpu = ["tiny_mlp"], 0.0
        ray.init(num_cpus=8, num_gpus=max(counts), include_dashboard=False)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("scaling_bench needs CUDA devices (or --smoke)")
        workloads, per_gpu = args.workloads.split(","), 1.0
        ray.init(include_dashboard=False)
    rows = []
    try:
        for name in workloads:
            for gpus in counts:
                rows += bench(name, gpus, args.repeats, per_gpu, args.methods.split(","))
    finally:
        ray.shutdown()
    add_ratios(rows)
    print_table(rows, ["workload", "gpus", "method", "rows_per_s", "vs_1_gpu", "vs_gpu_only", "vs_handwritten"])
    write_result(args.out, "scaling", command_line("orchestrator.bench.scaling_bench", argv), rows,
                 ray_data_arguments="batch_size=B, num_gpus=1, concurrency=N, batch_format='numpy', "
                                    "zero_copy_batch=True",
                 floors={"1 gpu vs gpu_only (resnets)": 0.95, "2 gpus vs 1 gpu": 1.9,
                         "vs handwritten": {"resnet50": 1.3, "resnet18": 1.5, "mlp": 3.0}})
    plot_after_bench(args.out)
    return rows


if __name__ == "__main__":
    # Run through the importable module: Ray pickles classes defined in __main__ by
    # value, and torch.backends.cudnn inside them does not pickle.
    from orchestrator.bench import scaling_bench

    scaling_bench.main()
