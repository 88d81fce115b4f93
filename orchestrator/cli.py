"""The ``orchestrator`` command line: run a config, validate configs, run benchmarks.

Exit codes: 0 success, 2 a bad config or input, 1 a failed run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from actors.errors import InputError
from orchestrator.config import RunConfig

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2

BENCHMARKS = {
    "streams": "orchestrator.bench.streams_bench",
    "pipeline": "orchestrator.bench.pipeline_bench",
    "scaling": "orchestrator.bench.scaling_bench",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="orchestrator",
        description="Batch inference on every GPU of a Ray cluster (CPU workers where there is none).",
        epilog="Start with: orchestrator run --config configs/cpu_default.yaml")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the job a config describes and print a summary")
    run.add_argument("--config", required=True, help="a YAML run config (see configs/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="override one config field, e.g. --set pipeline.depth=4 (repeatable)")
    val = sub.add_parser("validate", help="check configs; every bad field is named with its path and why")
    val.add_argument("configs", nargs="+")
    bench = sub.add_parser("bench", help="run a benchmark (needs a GPU); arguments after the name go to it")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "validate":
        return _validate(args.configs)
    if args.command == "bench":
        import importlib

        importlib.import_module(BENCHMARKS[args.name]).main(args.args)
        return EXIT_OK
    try:
        config = RunConfig.from_yaml(args.config, args.overrides)
    except (ValidationError, ValueError, OSError, yaml.YAMLError) as err:
        print(f"{args.config}: {_explain(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return _run(config)


def _explain(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return "invalid config\n" + "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in err.errors())
    return str(err)


def _validate(paths: list[str]) -> int:
    bad = 0
    for path in paths:
        try:
            RunConfig.from_yaml(path)
            print(f"{path}: ok")
        except (ValidationError, ValueError, OSError, yaml.YAMLError) as err:
            bad += 1
            print(f"{path}: {_explain(err)}", file=sys.stderr)
    return EXIT_BAD_INPUT if bad else EXIT_OK


def _inputs(config: RunConfig, worker_info: dict[str, Any]) -> Any:
    from orchestrator.sources import Npy, Parquet, Synthetic

    inp = config.input
    if inp.kind == "npy":
        return Npy(inp.path)
    if inp.kind == "parquet":
        return Parquet(inp.path, inp.column)
    return Synthetic(inp.rows, tuple(worker_info["input_shape"]), worker_info["input_dtype"], inp.seed)


def _run(config: RunConfig) -> int:
    from orchestrator.api import Orchestrator

    if config.dispatch.progress is None:  # a job's log should show progress too
        config = config.model_copy(update={"dispatch": config.dispatch.model_copy(update={"progress": True})})
    started = time.perf_counter()
    try:
        with Orchestrator(config) as orch:
            ids, outputs, failed = [], [], []
            for result in orch.map(_inputs(config, orch.worker_info[0]), ordered=True):
                if result.error is not None:
                    failed.append(str(result.error))
                    continue
                ids.append(np.full(result.rows, result.batch_id, dtype=np.int64))
                outputs.append(result.outputs)
            report = orch.report()
    except (InputError, ValueError, FileNotFoundError) as err:
        print(f"bad input: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as err:
        print(f"run failed: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILED
    report["wall_seconds"] = time.perf_counter() - started
    if config.output.path and outputs:
        write_outputs(config.output.path, np.concatenate(ids), outputs)
    if config.output.report:
        _atomic_write(config.output.report, lambda f: f.write(json.dumps(report, indent=2, default=str).encode()))
    _summary(config, report, failed)
    return EXIT_OK


def _summary(config: RunConfig, report: dict[str, Any], failed: list[str]) -> None:
    d = report["dispatch"]
    print(f"\nran {config.model.source} on {len(report['workers'])} workers: {report['rows']:,} rows in "
          f"{report['seconds']:.2f} s = {report['rows_per_second'] or 0:,.0f} rows/s")
    for w in report["workers"]:
        print(f"  {w['name']} ({w['device']}): {w['rows']:,} rows, {w['bound']['line']}")
    print(f"  batches: {d.get('completed', 0)} completed, {d.get('failed', 0)} failed, {d.get('retried', 0)} retried, "
          f"{d.get('worker_deaths', 0)} worker deaths")
    for line in failed[:10]:
        print(f"  failed: {line}")
    if config.output.path:
        print(f"  outputs: {config.output.path}")
    if config.output.report:
        print(f"  report: {config.output.report}")


def _atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Write through a temporary file in the same directory, then rename: never a half-written final file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_outputs(path: str, batch_ids: np.ndarray, outputs: list[Any]) -> None:
    """Outputs in input order with each row's batch id: ``.npy`` (plus ``.batch_ids.npy``) or ``.parquet``."""
    if not all(isinstance(o, np.ndarray) for o in outputs):
        raise ValueError("output.path supports models with a single tensor output")
    data = np.concatenate(outputs)
    if path.endswith(".npy"):
        _atomic_write(path[:-4] + ".batch_ids.npy", lambda f: np.save(f, batch_ids))
        _atomic_write(path, lambda f: np.save(f, data))
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = data.reshape(len(data), -1)
        column = pa.array(list(flat)) if flat.shape[1] > 1 else pa.array(flat[:, 0])
        table = pa.table({"batch_id": batch_ids, "output": column})
        _atomic_write(path, lambda f: pq.write_table(table, f))
    else:
        raise ValueError(f"output.path must end in .npy or .parquet, got {path!r}")
