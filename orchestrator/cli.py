"""The ``orchestrator`` command line: run a config, validate configs, run benchmarks.

Exit codes: 0 success, 2 a bad config or input, 1 a failed run.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml
from pydantic import ValidationError

from actors.errors import InputError
from actors.pipeline import concat_outputs
from orchestrator.config import InputConfig, RunConfig, describe_errors
from orchestrator.report import chrome_trace, render, summarize

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
EXIT_INTERRUPTED = 130

BENCHMARKS = {
    "streams": ("orchestrator.bench.streams_bench", "copy+compute requests on 1, 2 and 4 streams of one GPU"),
    "pipeline": ("orchestrator.bench.pipeline_bench", "one GPU from pageable numpy: GPU-only vs a serial loop "
                                                      "vs the pipeline"),
    "graphs": ("orchestrator.bench.graphs_bench", "CUDA graphs vs eager in the pipeline, per batch size"),
    "metrics": ("orchestrator.bench.metrics_bench", "a job with Prometheus metrics on vs off, and what one "
                                                    "recording costs (--quick runs without a GPU)"),
    "multistream": ("orchestrator.bench.multistream_bench", "a small model on 1, 2 and 4 streams of one GPU; a HIGH-"
                                                            "priority model's latency under a LOW flood (--smoke: CPU)"),
    "scaling": ("orchestrator.bench.scaling_bench", "1..N GPUs: this project vs hand-written Ray actors vs Ray "
                                                    "Data (--smoke runs without a GPU)"),
    "decode": ("orchestrator.bench.decode_bench", "decode tokens/s: naive vs synced vs interleaved loops "
                                                  "(--quick runs without a GPU)"),
    "faults": ("orchestrator.bench.fault_table", "fault drills on CPU workers with the real Ray: lost, duplicated, "
                                                 "time to recover (no GPU needed)"),
}

_SUMMARY_WORKERS = 8  # worker lines in the summary; the rest are in the JSON report
_SUMMARY_FAILURES = 5

_DESCRIPTION = """\
Batch inference on every GPU of a Ray cluster: one worker per GPU (two CPU
workers when there is none), each overlapping copies and compute, fed by one
driver. A run is described by one YAML config (see configs/ and the README's
"Configuration" section).

exit codes: 0 success, 2 a bad config or input, 1 a failed run (or failed batches
            with errors.on_error=skip), 130 interrupted"""

_EXAMPLES = """\
examples:
  orchestrator run --config configs/cpu_default.yaml
  orchestrator run --config configs/resnet50.yaml --set input.rows=100000 --set pipeline.depth=4
  orchestrator validate configs/*.yaml
  orchestrator bench pipeline --help

on a running Ray cluster (the job attaches to it):
  ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      orchestrator run --config configs/cpu_default.yaml --set output.path=/shared/out.npy

'python -m orchestrator' is the same command."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="orchestrator", description=_DESCRIPTION, epilog=_EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run", help="run the job a config describes and print a summary",
        description="Run the job a config describes: start (or attach to) Ray and the workers, stream the inputs "
                    "through them, write the outputs and the JSON report atomically, and print a summary. "
                    "Progress goes to stderr: a bar on a terminal, a line every metrics.log_every_s otherwise.")
    run.add_argument("--config", required=True, metavar="CONFIG.yaml", help="a YAML run config (see configs/)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="override one config field; the value is YAML: --set pipeline.depth=4, "
                          "--set faults.worker-0.raise_on_batches=[0], --set output.path= (null); a number "
                          "indexes a list: --set models.1.replicas=3. Repeatable")
    val = sub.add_parser(
        "validate", help="check configs without running them",
        description="Check each config; every bad field is named with its dotted path and why. Exit 2 if any is bad.")
    val.add_argument("configs", nargs="+", metavar="CONFIG.yaml")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="apply this override to every config first (repeatable)")
    benchmarks = {name: what for name, (module, what) in BENCHMARKS.items() if importlib.util.find_spec(module)}
    bench = sub.add_parser(
        "bench", help="run a benchmark (needs a GPU); its JSON goes under docs/results/",
        description="Benchmarks:\n" + "\n".join(f"  {name:9} {what}" for name, what in benchmarks.items())
                    + "\n\nArguments after the name go to the benchmark: orchestrator bench pipeline --help",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("name", choices=list(benchmarks))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return _validate(args.configs, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        importlib.import_module(BENCHMARKS[args.name][0]).main(args.args)
        return EXIT_OK
    try:
        config = RunConfig.from_yaml(args.config, args.overrides)
    except (ValidationError, ValueError, OSError, yaml.YAMLError) as err:
        print(f"{args.config}: {_explain(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return _run(config)
    except KeyboardInterrupt:
        print("interrupted: no outputs written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _explain(err: Exception) -> str:
    if isinstance(err, ValidationError):
        lines = describe_errors(err)
        return f"invalid config ({len(lines)} problem{'s' * (len(lines) > 1)})\n" + "\n".join(f"  {x}" for x in lines)
    return str(err)


def _validate(paths: list[str], overrides: list[str]) -> int:
    bad = 0
    for path in paths:
        try:
            RunConfig.from_yaml(path, overrides)
        except (ValidationError, ValueError, OSError, yaml.YAMLError) as err:
            bad += 1
            print(f"{path}: {_explain(err)}", file=sys.stderr)
            continue
        print(f"{path}: ok")
    return EXIT_BAD_INPUT if bad else EXIT_OK


# -- inputs ---------------------------------------------------------------------------------------

class _BadInput(ValueError):
    """The input a config names cannot be read, or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class _Input:
    """An input checked before any worker starts: what it is and how many rows it has."""

    config: InputConfig
    rows: int | None
    dtype: str | None = None  # npy: known from the header, so checked against the model before dispatch
    row_shape: tuple[int, ...] | None = None

    def describe(self) -> str:
        rows = f"{self.rows:,} rows" if self.rows else "all rows"
        return f"{rows} ({'synthetic' if self.config.kind == 'synthetic' else self.config.path})"

    def check_fits(self, info: dict[str, Any]) -> None:
        want_dtype, want_shape = info["input_dtype"], tuple(info["input_shape"])
        if self.dtype is not None and (self.dtype != want_dtype or self.row_shape != want_shape):
            raise _BadInput(f"input.path {self.config.path}: rows are {self.dtype} {self.row_shape}, the model "
                            f"{info['model']!r} takes {want_dtype} {want_shape}")

    def source(self, info: dict[str, Any]) -> Any:
        from orchestrator.sources import Npy, Parquet, Synthetic

        inp = self.config
        if inp.kind == "npy":
            return Npy(inp.path)
        if inp.kind == "parquet":
            return Parquet(inp.path, inp.column)
        return Synthetic(inp.rows, tuple(info["input_shape"]), info["input_dtype"], inp.seed)


def _open_input(inp: InputConfig) -> _Input:
    """Check that the input can be read before Ray starts: a missing file costs no cluster start-up."""
    if inp.kind == "synthetic":
        return _Input(inp, inp.rows)
    path = Path(inp.path)
    if not path.is_file():
        raise _BadInput(f"input.path {inp.path}: no such file")
    if inp.kind == "npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise _BadInput(f"input.path {inp.path}: not a readable .npy file ({err})") from err
        if not isinstance(arr, np.ndarray) or arr.ndim == 0 or len(arr) == 0:
            raise _BadInput(f"input.path {inp.path}: holds no rows (shape {getattr(arr, 'shape', None)})")
        return _Input(inp, len(arr), arr.dtype.name, tuple(arr.shape[1:]))
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise _BadInput(f"input.path {inp.path}: not a readable Parquet file ({err})") from err
    names = meta.schema_arrow.names
    if inp.column is None and len(names) != 1:
        raise _BadInput(f"input.path {inp.path}: has columns {names}; name the one to read (input.column)")
    if inp.column is not None and inp.column not in names:
        raise _BadInput(f"input.path {inp.path}: no column {inp.column!r}; it has {names}")
    if meta.metadata.num_rows == 0:
        raise _BadInput(f"input.path {inp.path}: holds no rows")
    return _Input(inp, meta.metadata.num_rows)


# -- the run --------------------------------------------------------------------------------------

class _ProgressLog:
    """Progress lines for a log that is not a terminal (a Ray job's log, CI): every ``every_s`` and at the end.

    ``update`` only adds and compares numbers; a line is printed at most every ``every_s``.
    """

    def __init__(self, total: int | None, every_s: float, stream: IO[str]) -> None:
        self.total, self.every_s, self.stream = total, every_s, stream
        self.rows = self.failed = 0
        self.started: float | None = None

    def start(self) -> None:
        """Count rates from now: the first batch is dispatched once the workers are up."""
        self.started = time.monotonic()
        self._next = self.started + self.every_s

    def update(self, rows: int, failed: bool = False) -> None:
        if self.started is None:
            self.start()
        self.rows += rows
        self.failed += failed
        if self.every_s and time.monotonic() >= self._next:
            self.emit()
            self._next = time.monotonic() + self.every_s

    def emit(self) -> None:
        if self.started is None:  # nothing was dispatched
            return
        elapsed = time.monotonic() - self.started
        of = f"/{self.total:,} rows ({100 * self.rows / self.total:.0f}%)" if self.total else " rows"
        print(f"progress: {self.rows:,}{of}, {self.rows / elapsed if elapsed else 0:,.0f} rows/s, "
              f"{self.failed} failed batches", file=self.stream, flush=True)


@dataclasses.dataclass
class _Outcome:
    status: str = "ok"  # ok | incomplete (skipped batches) | failed | bad input
    error: str | None = None
    failed: list[str] = dataclasses.field(default_factory=list)
    rows_written: int = 0

    @property
    def exit_code(self) -> int:
        return {"ok": EXIT_OK, "bad input": EXIT_BAD_INPUT}.get(self.status, EXIT_FAILED)


def _run(config: RunConfig) -> int:
    from orchestrator.api import Orchestrator

    try:
        inp = _open_input(config.input)
    except _BadInput as err:
        print(f"bad input: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    progress_log = None
    if config.dispatch.progress is None:
        # A bar on a terminal; in a log, \r-redrawn bars are unreadable, so print lines instead.
        tty = sys.stderr.isatty()
        if not tty:
            progress_log = _ProgressLog(inp.rows, config.metrics.log_every_s, sys.stderr)
        config = config.model_copy(update={"dispatch": config.dispatch.model_copy(update={"progress": tty})})
    if config.output.timeline and not config.pipeline.timeline:
        config = config.model_copy(update={"pipeline": config.pipeline.model_copy(update={"timeline": True})})

    started = time.perf_counter()
    outcome = _Outcome()
    report: dict[str, Any] = {}
    parts: tuple[np.ndarray, list[Any]] = (np.empty(0, np.int64), [])
    try:
        with Orchestrator(config) as orch:
            first = orch.worker_info[0]
            info = first["models"][config.input_model] if "models" in first else first  # a decode worker: one model
            print(f"running {info['source']} on {len(orch.workers)} workers: {inp.describe()}, "
                  f"{config.dispatch.batch_rows:,} rows per batch", file=sys.stderr, flush=True)
            try:
                inp.check_fits(info)
                parts = _collect(orch, inp.source(info), config, outcome, progress_log)
            except (_BadInput, InputError) as err:
                outcome.status, outcome.error = "bad input", str(err)
            except Exception as err:
                outcome.status, outcome.error = "failed", f"{type(err).__name__}: {err}"
            finally:
                if progress_log:
                    progress_log.emit()
            report = _safe_report(orch)
            if config.output.timeline:
                report["timeline"] = _write_timeline(orch, config.output.timeline)
    except Exception as err:  # Ray or the workers did not start
        outcome.status, outcome.error = "failed", f"{type(err).__name__}: {err}"
    report.update(status=outcome.status, error=outcome.error, failed_batches=outcome.failed,
                  wall_seconds=time.perf_counter() - started, config=config.model_dump(mode="json"))
    if outcome.status in ("ok", "incomplete") and config.output.path:
        try:
            outcome.rows_written = write_outputs(config.output.path, *parts)
        except (OSError, ValueError) as err:
            outcome.status, outcome.error = "failed", f"writing {config.output.path}: {err}"
            report.update(status=outcome.status, error=outcome.error)
    report["exit_code"] = outcome.exit_code
    report["summary"] = summarize(report)
    if outcome.error:
        print(f"{outcome.status}: {outcome.error}", file=sys.stderr, flush=True)
    if config.output.report:
        try:
            _atomic_write(config.output.report,
                          lambda f: f.write(json.dumps(report, indent=2, default=str).encode() + b"\n"))
        except OSError as err:
            print(f"could not write the report {config.output.report}: {err}", file=sys.stderr)
    _summary(config, report, outcome)
    return outcome.exit_code


def _collect(orch: Any, source: Any, config: RunConfig, outcome: _Outcome,
             progress_log: _ProgressLog | None) -> tuple[np.ndarray, list[Any]]:
    """Run every batch; return each row's batch id and the outputs, both in input order."""
    done: list[tuple[int, int, Any]] = []
    if progress_log:
        progress_log.start()
    for result in orch.map(source, ordered=config.dispatch.ordered, model=config.input_model):
        if progress_log:
            progress_log.update(result.rows, result.error is not None)
        if result.error is not None:
            outcome.status = "incomplete"
            outcome.failed.append(str(result.error))
            continue
        if not done and config.output.path:
            _check_writable(config.output.path, result.outputs)  # fail now, not after the whole run
        done.append((result.batch_id, result.rows, result.outputs))
    done.sort(key=lambda d: d[0])
    ids = np.concatenate([np.full(rows, batch_id, np.int64) for batch_id, rows, _ in done]) if done else \
        np.empty(0, np.int64)
    return ids, [outputs for _, _, outputs in done]


def _safe_report(orch: Any) -> dict[str, Any]:
    try:
        return orch.report()
    except Exception as err:  # workers lost with the failure: the report says so instead
        return {"report_error": f"{type(err).__name__}: {err}"}


def _write_timeline(orch: Any, path: str) -> str | None:
    """Write the workers' timeline as a Chrome trace; the path, or None (and why, on stderr) if it failed."""
    try:
        trace = chrome_trace(orch.timeline())
        _atomic_write(path, lambda f: f.write(json.dumps(trace).encode() + b"\n"))
    except Exception as err:  # a lost worker or an unwritable path: the run's result stands
        print(f"could not write the timeline {path}: {type(err).__name__}: {err}", file=sys.stderr)
        return None
    return path


def _summary(config: RunConfig, report: dict[str, Any], outcome: _Outcome) -> None:
    """At most about 20 lines, whatever the number of workers and failures; the JSON report has the rest.

    The per-worker part is the run report's table (``orchestrator.report.render``).
    """
    rate = report.get("rows_per_second")
    source = {s["name"]: s["model"]["source"] for s in config.engine_specs()}[config.input_model]
    print(f"\n{outcome.status.upper()}: {source}, {report.get('rows', 0):,} rows in "
          f"{report['wall_seconds']:.1f} s"
          + (f" ({report['seconds']:.2f} s of inference, {rate:,.0f} rows/s)" if rate else ""), flush=True)
    if report["summary"]["workers"]:
        render(report["summary"], sys.stdout, max_workers=_SUMMARY_WORKERS)
    decoders = [w for w in report.get("workers", []) if "decode" in w]
    lines = [f"  {w['name']} ({w['device']}): {w['rows']:,} rows; {w['decode']['line']}"
             for w in decoders[:_SUMMARY_WORKERS]]
    if len(decoders) > _SUMMARY_WORKERS:
        lines.append(f"  ... and {len(decoders) - _SUMMARY_WORKERS} more workers")
    models = report.get("models") or {}
    if len(models) > 1:
        for name, m in models.items():
            lines.append(f"  model {name} (priority {m['priority']}, replicas per worker {m['replicas']}): "
                         f"{m['rows']:,} rows, {m['rows_per_second']:,.0f} rows/s")
    d = report.get("dispatch") or {}
    if d:
        lines.append(f"  batches: {d.get('completed', 0)} completed, {d.get('failed', 0)} failed, "
                     f"{d.get('retried', 0)} retried; {d.get('worker_deaths', 0)} worker deaths")
    for line in outcome.failed[:_SUMMARY_FAILURES]:
        lines.append(f"  failed: {line}")
    if len(outcome.failed) > _SUMMARY_FAILURES:
        lines.append(f"  ... and {len(outcome.failed) - _SUMMARY_FAILURES} more failed batches")
    if outcome.error:
        lines.append(f"  error: {outcome.error}")
    if config.output.path:
        written = f"{outcome.rows_written:,} rows" if outcome.rows_written else "not written"
        lines.append(f"  outputs: {config.output.path} ({written})")
    if config.output.report:
        lines.append(f"  report: {config.output.report}")
    if report.get("timeline"):
        lines.append(f"  timeline: {report['timeline']} (Chrome trace: open in https://ui.perfetto.dev)")
    lines.append(f"  exit code {outcome.exit_code}")
    print("\n".join(lines), flush=True)


# -- outputs --------------------------------------------------------------------------------------

# mkstemp creates 0600 files; the outputs get the mode any new file would (0666 less the umask).
_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through a hidden temporary file (``.NAME.XXXX.tmp``) in the same directory, then rename.

    The final name only ever holds a complete file: a crash or kill mid-write leaves at
    most the temporary file. The data is fsynced before the rename, so a power loss
    cannot leave a renamed but empty file either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _columns(outputs: list[Any]) -> dict[str, np.ndarray]:
    """Named output columns, rows concatenated: ``output``, or ``output_0``.. for a tuple, ``output_KEY`` for a dict."""
    if not isinstance(outputs[0], (np.ndarray, tuple, list, dict)):
        raise ValueError(f"cannot write outputs of type {type(outputs[0]).__name__}")
    merged = concat_outputs(outputs)
    if isinstance(merged, np.ndarray):
        return {"output": merged}
    return {f"output_{k}": v for k, v in (merged.items() if isinstance(merged, dict) else enumerate(merged))}


def _check_writable(path: str, outputs: Any) -> None:
    if path.endswith(".npy") and not isinstance(outputs, np.ndarray):
        raise _BadInput(f"output.path {path}: a .npy file holds one array, the model returns "
                        f"{type(outputs).__name__} of {len(outputs)}; write .parquet (one column each)")


def write_outputs(path: str, batch_ids: np.ndarray, outputs: list[Any]) -> int:
    """Write outputs in input order with each row's batch id; return the rows written.

    ``.npy``: the outputs, and the ids in ``NAME.batch_ids.npy`` (written first, so a
    complete ``NAME.npy`` always comes with its ids). ``.parquet``: a ``batch_id``
    column and one column per output (a row of several values is a fixed-size list;
    the row shapes are in the schema metadata under ``row_shapes``).
    """
    if not outputs:
        raise ValueError("no batch completed: nothing to write")
    columns = _columns(outputs)
    rows = len(next(iter(columns.values())))
    if rows != len(batch_ids):
        raise ValueError(f"{rows} output rows but {len(batch_ids)} batch ids")
    if path.endswith(".npy"):
        if list(columns) != ["output"]:
            raise ValueError(f"a .npy file holds one array; the model returns {len(columns)} outputs: write .parquet")
        _atomic_write(path[:-4] + ".batch_ids.npy", lambda f: np.save(f, batch_ids))
        _atomic_write(path, lambda f: np.save(f, columns["output"]))
    elif path.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrays, shapes = {"batch_id": pa.array(batch_ids)}, {}
        for name, data in columns.items():
            shapes[name] = list(data.shape[1:])
            flat = np.ascontiguousarray(data).reshape(len(data), -1)
            arrays[name] = (pa.array(flat[:, 0]) if data.ndim == 1
                            else pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1]))
        table = pa.table(arrays).replace_schema_metadata({"row_shapes": json.dumps(shapes)})
        _atomic_write(path, lambda f: pq.write_table(table, f))
    else:
        raise ValueError(f"output.path must end in .npy or .parquet, got {path!r}")
    return rows
