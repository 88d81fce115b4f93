"""What every benchmark shares: repeated timing with medians, and the JSON result file."""
from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def median_seconds(run: Callable[[], None], repeats: int, warmup: int = 1, sync: bool = True) -> float:
    """Median wall time of ``run`` over ``repeats`` calls after ``warmup`` calls, device drained each time."""
    def once() -> float:
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


def environment() -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "argv": sys.argv}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
    try:
        import ray
        env["ray"] = ray.__version__
    except ImportError:
        pass
    return env


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces a run of ``module``: its ``argv``, or the process's when ``main`` got None."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def write_result(path: str | Path, name: str, command: str, rows: list[dict[str, Any]], **extra: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "command": command, "environment": environment(), "results": rows, **extra}
    path.write_text(json.dumps(doc, indent=2) + "\n")


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)


def reference_outputs(x: np.ndarray, batch_rows: int, source: str = "zoo:tiny_mlp", seed: int = 0,
                      **options: Any) -> np.ndarray:
    """The model's outputs computed in this process, batch by batch as the workers split ``x``;
    ``options`` go to ``load_model``.

    Split the same way, on one thread like a Ray worker with one CPU, because
    CPU kernels may round differently for another number of rows or threads;
    matched, the comparison is bit-exact.
    """
    from actors.engines import build_model

    built = build_model({"source": source, "seed": seed, **options})
    outs = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for start in range(0, len(x), batch_rows):
                outs.append(built.run(torch.from_numpy(x[start:start + batch_rows])).numpy())
    finally:
        torch.set_num_threads(threads)
    return np.concatenate(outs)
