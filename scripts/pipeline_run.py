"""A short pipeline run for the sanitizers (scripts/gpu_sanitize.sh): a few batches of a zoo model.

Each batch runs through the Pipeline (eager, and with ``--graphs`` also replaying
CUDA graphs) and is compared with the same model called directly on the device.
Writes a JSON summary; exits 1 when an output differs. Runs on the CPU backend
too (graphs are then off), which is how its smoke test runs it.

    python scripts/pipeline_run.py --model zoo:tiny_mlp --graphs --out out/pipeline_run.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from actors.models import load_model
from actors.pipeline import Pipeline, PipelineConfig
from actors.streams import StreamManager


def _direct(built, x: torch.Tensor) -> torch.Tensor:
    """The model called directly, on the default stream: the reference, independent of the pipeline's code."""
    if built.preprocess is not None:
        x = built.preprocess(x)
    y = built.model(x)
    return built.postprocess(y) if built.postprocess is not None else y


def run_case(source: str, batches: int, rows: int, graphs: bool, device: torch.device) -> dict:
    torch.manual_seed(0)
    built = load_model(source, postprocess="none")
    spec = built.input_spec
    rng = np.random.default_rng(0)
    shape = (rows, *spec.row_shape)
    if np.dtype(spec.dtype).kind == "u":
        data = [rng.integers(0, 256, shape, dtype=spec.dtype) for _ in range(batches)]
    else:
        data = [rng.standard_normal(shape).astype(spec.dtype) for _ in range(batches)]
    cfg = PipelineConfig(depth=2, max_batch_rows=rows, timing_every=1,
                         graphs={"enabled": graphs, "buckets": (rows,), "warmup_iters": 1})
    with StreamManager(device=device) as sm, Pipeline(built, sm, cfg) as pipeline:
        got = [r.outputs for r in pipeline.map(enumerate(data))]
        with torch.inference_mode():
            want = [_direct(built, torch.from_numpy(x).to(device)).float().cpu().numpy() for x in data]
    diff = max(float(np.max(np.abs(g.astype(np.float32) - w))) for g, w in zip(got, want))
    scale = max(float(np.max(np.abs(w))) for w in want)
    return {"model": source, "graphs": graphs, "batches": batches, "rows": rows, "max_abs_diff": diff,
            "ok": diff <= 1e-3 * max(scale, 1.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:tiny_mlp")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--graphs", action="store_true", help="also run with CUDA graphs (CUDA only)")
    parser.add_argument("--out", default="out/pipeline_run.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cases = [run_case(args.model, args.batches, args.rows, False, device)]
    if args.graphs and device.type == "cuda":
        cases.append(run_case(args.model, args.batches, args.rows, True, device))
    doc = {"device": str(device), "cases": cases, "ok": all(c["ok"] for c in cases)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
