"""The run report: a per-worker summary for the JSON and a rich table for the terminal, and the timeline file.

``summarize`` reduces ``Orchestrator.report()`` to what a person reads first:
rows/s overall and per worker, per-stage time per row, the binding stage and
how close the worker runs to its ceiling, CUDA-graph counts, errors and GPU
utilisation. ``render`` prints the same as a table. ``chrome_trace`` turns the
workers' timeline events into a Chrome-trace/Perfetto file: one process per
worker, one track per stream.
"""
from __future__ import annotations

import sys
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.table import Table

_LOG_WIDTH = 132  # rich's 80 columns would wrap the table in a job's log


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The summary of an ``Orchestrator.report()`` (plain values, for the JSON report)."""
    driver = report.get("dispatch_per_worker", {})
    workers = []
    for w in report.get("workers", []):
        if "bound" not in w:  # a decode worker: its own line in the report (``decode``)
            continue
        bound, graphs, tally = w["bound"], w["graphs"], driver.get(w["name"], {})
        per_row = w["stage_ms_per_row"]
        workers.append({
            "worker": w["name"], "node": tally.get("node"), "gpu": tally.get("gpu"), "device": w["device"],
            "rows": w["rows"], "rows_per_second": w["rows_per_second"],
            "stage_us_per_row": {s: None if ms is None else ms * 1e3 for s, ms in per_row.items()},
            "binding_stage": bound["binding_stage"], "fraction_of_bound": bound["fraction_of_bound"],
            "bound": bound["line"],
            "graphs": ({"replays": graphs["replays"], "eager_batches": graphs["eager_batches"],
                        "captured": graphs["captured"]} if graphs["enabled"] else None),
            "errors": tally.get("errors", 0), "retries": tally.get("retries", 0), "failed": tally.get("failed", 0),
            "gpu_utilization_ratio": w.get("telemetry", {}).get("utilization_ratio"),
        })
    dispatch = report.get("dispatch", {})
    return {
        "rows": report.get("rows", 0), "seconds": report.get("seconds"), "rows_per_second": report.get("rows_per_second"),
        "batches": {k: dispatch.get(k, 0) for k in ("completed", "failed", "retried", "worker_deaths")},
        "workers": workers, "timeline": report.get("timeline"),
    }


def _num(value: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(summary: dict[str, Any], file: IO[str] | None = None, max_workers: int = 8) -> None:
    """Print the summary's per-worker table (at most ``max_workers`` rows; the JSON has them all)."""
    file = file or sys.stdout
    console = Console(file=file, width=None if file.isatty() else _LOG_WIDTH)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    workers = summary["workers"]
    stages = list(workers[0]["stage_us_per_row"]) if workers else []
    for name, justify in (("worker", "left"), ("node/\ngpu", "left"), ("rows", "right"), ("rows/s", "right"),
                          *((f"{s}\nus/row", "right") for s in stages), ("binds", "left"), ("of\nbound", "right"),
                          ("graphs\nreplay/eager", "right"), ("errors", "right"), ("GPU\nutil", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    for w in workers[:max_workers]:
        graphs = w["graphs"]
        table.add_row(
            w["worker"], f"{w['node'] or '?'}/{w['gpu'] or w['device']}", f"{w['rows']:,}", _num(w["rows_per_second"]),
            *(_num(w["stage_us_per_row"].get(s), "{:,.2f}") for s in stages),
            w["binding_stage"] or "-", _num(w["fraction_of_bound"], "{:.0%}"),
            f"{graphs['replays']:,}/{graphs['eager_batches']:,}" if graphs else "off",
            f"{w['errors']:,}", _num(w["gpu_utilization_ratio"], "{:.0%}"))
    if len(workers) > max_workers:
        table.add_row(f"... {len(workers) - max_workers} more", *[""] * (len(table.columns) - 1))
    console.print(table)


def chrome_trace(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A Chrome-trace/Perfetto document from ``Orchestrator.timeline()`` events.

    Each worker becomes a process and each stream a thread (track) in it, with
    integer ids and ``process_name``/``thread_name`` metadata, which both Perfetto
    and chrome://tracing read; tracks keep the order their streams first appear
    in (a batch's stages in pipeline order). Times stay relative to each worker's
    own start.
    """
    pids: dict[str, int] = {}
    tids: dict[tuple[str, str], int] = {}
    out: list[dict[str, Any]] = []
    for event in events:
        worker, stream = str(event["pid"]), str(event["tid"])
        if worker not in pids:
            pids[worker] = len(pids) + 1
            out.append({"ph": "M", "name": "process_name", "pid": pids[worker], "tid": 0, "args": {"name": worker}})
        if (worker, stream) not in tids:
            tids[worker, stream] = sum(w == worker for w, _ in tids) + 1
            out.append({"ph": "M", "name": "thread_name", "pid": pids[worker], "tid": tids[worker, stream],
                        "args": {"name": stream}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": pids[worker], "tid": tids[worker, stream],
                        "args": {"sort_index": tids[worker, stream]}})
        out.append({**event, "pid": pids[worker], "tid": tids[worker, stream]})
    return {"traceEvents": out, "displayTimeUnit": "ms"}
