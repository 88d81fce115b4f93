"""Fault drills on the CPU with the real Ray: each fault, then a check that every batch id ended exactly once.

Runs on a cluster of two logical nodes with one fake GPU each (``orchestrator.bench.cluster``),
so one worker per node and a node can be removed. Each drill streams ``tiny_mlp`` batches
through two slowed workers (``delay_s``, so that a run lasts long enough to break), injects
its fault, and counts per run:

- ended: batch ids that ended, the fewest over the runs (all of them, except under cancellation);
- lost: batch ids that never ended (neither a result nor an error naming them); under
  cancellation, only those among the ones delivered before the context was left;
- duplicated: extra ends of a batch id the caller saw;
- errors: batches that ended as an error, as the drill's policy expects (skip, poison);
- wrong: results whose outputs differ from the single-process reference by more than
  rtol=1e-5, atol=1e-6 (a split batch runs other row counts, so exact equality is not expected);
- time_to_recover_s: the run's extra wall time over a clean run of the same batches and
  window (medians over runs of each; on a busy machine differences below about 0.5 s are
  noise, and can be negative); for cancellation, the time from leaving the ``Orchestrator``
  context mid-run until every worker process has exited.

    python -m orchestrator.bench.fault_table --out docs/results/faults.json
    python -m orchestrator.bench.fault_table --quick --only exit,oom --out /tmp/faults.json   # the smoke test
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray

from orchestrator import Orchestrator, Result, RunConfig
from orchestrator.bench.cluster import FakeGpuCluster, fake_gpu_cluster
from orchestrator.bench.common import command_line, print_table, reference_outputs, write_result

BATCH_ROWS = 32
DELAY_S = 0.02  # per batch and worker thread
FAULT_AFTER = 30  # results before a mid-run fault


@dataclasses.dataclass
class Drill:
    """One fault: config sections added to the clean run's, and what the driver does mid-run."""

    name: str
    fault: str  # what happens, for the table
    sections: dict[str, Any] = dataclasses.field(default_factory=dict)  # merged into the run config
    faults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # faults.<worker>, beyond the delay
    action: Callable[[Orchestrator, FakeGpuCluster], None] | None = None  # after FAULT_AFTER results
    background: Callable[[Orchestrator, threading.Event], None] | None = None  # a thread for the whole run
    errors_expected: int = 0
    batches_factor: int = 1  # a longer run for the repeated fault
    cancel: bool = False


def _kill_worker_1(orch: Orchestrator, _: FakeGpuCluster) -> None:
    ray.kill(orch.workers[1].actor, no_restart=False)


def _remove_node_of_worker_0(orch: Orchestrator, cluster: FakeGpuCluster) -> None:
    cluster.remove_node(ray.get(orch.workers[0].actor.ping.remote(), timeout=60)["node_id"])


def _kill_every_2_s(orch: Orchestrator, stop: threading.Event) -> None:
    rng = random.Random(0)
    while not stop.wait(2.0):
        ray.kill(rng.choice(orch.workers).actor, no_restart=False)


DRILLS = [
    Drill("exit", "worker process exits (os._exit) every 30 batches it runs",
          faults={"worker-0": {"exit_after_batches": 30}}),
    Drill("kill", "actor killed (ray.kill) mid-run", action=_kill_worker_1),
    Drill("node", "node removed mid-run (the run finishes on the other node)", action=_remove_node_of_worker_0),
    Drill("retry", "model raises on 10 batches, on_error=retry", sections={"errors": {"on_error": "retry"}},
          faults={"worker-0": {"raise_on_batches": list(range(10, 20))}}),
    Drill("skip", "model raises on 3 batches, on_error=skip", sections={"errors": {"on_error": "skip"}},
          faults={w: {"raise_on_batches": [10, 11, 12]} for w in ("worker-0", "worker-1")}, errors_expected=3),
    Drill("poison", "poison batch kills every worker that runs it, on_error=skip",
          sections={"errors": {"on_error": "skip", "max_retries": 1}, "dispatch": {"inflight_per_worker": 1}},
          faults={w: {"exit_on_batches": [15]} for w in ("worker-0", "worker-1")}, errors_expected=1),
    Drill("oom", "GPU out of memory above 8 rows (split in halves)",
          faults={"worker-0": {"oom_above_rows": 8}}),
    Drill("cancel", "cancellation: leaving the Orchestrator context mid-run", cancel=True),
    Drill("killer", "a random worker killed every 2 s", background=_kill_every_2_s, batches_factor=8),
]


@dataclasses.dataclass
class RunOutcome:
    seconds: float
    results: list[Result]
    dispatch: dict[str, Any]
    oom_splits: int
    cancel_seconds: float | None = None


def _config(drill: Drill, clean: bool) -> RunConfig:
    sections: dict[str, Any] = {
        "pipeline": {"max_batch_rows": BATCH_ROWS},
        "dispatch": {"batch_rows": BATCH_ROWS, "progress": False},
        "cluster": {"num_workers": 2, "max_worker_restarts": 20, "worker_start_timeout_s": 120},
        "faults": {w: {"delay_s": DELAY_S} for w in ("worker-0", "worker-1")},
    }
    for key, value in drill.sections.items():
        sections[key] = {**sections.get(key, {}), **value}
    if not clean:
        for worker, fault in drill.faults.items():
            sections["faults"][worker] = {**sections["faults"][worker], **fault}
    return RunConfig.model_validate(sections)


def _run(drill: Drill, x: np.ndarray, cluster: FakeGpuCluster, clean: bool) -> RunOutcome:
    """One run of ``x`` with the drill's policy; with its fault unless ``clean``."""
    while len(cluster.node_ids) < 2:  # a node drill removed one
        cluster.add_node()
    faulty = not clean
    orch = Orchestrator(_config(drill, clean))
    orch.start()
    stop = threading.Event()
    thread = None
    if faulty and drill.background is not None:
        thread = threading.Thread(target=drill.background, args=(orch, stop), daemon=True)
    results: list[Result] = []
    try:
        started = time.monotonic()
        if thread is not None:
            thread.start()
        stream = orch.map(x)
        for result in stream:
            results.append(result)
            if faulty and len(results) == FAULT_AFTER:
                if drill.action is not None:
                    drill.action(orch, cluster)
                if drill.cancel:
                    return _cancel(orch, stream, results, started)
        seconds = time.monotonic() - started
        stop.set()
        if thread is not None:
            thread.join()
        report = orch.report()
        return RunOutcome(seconds, results, report["dispatch"], sum(w["oom"]["splits"] for w in report["workers"]))
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        orch.close()


def _cancel(orch: Orchestrator, stream: Iterator[Result], results: list[Result], started: float) -> RunOutcome:
    """Leave the run as a ``with`` block would mid-run; time until every worker process has exited."""
    pids = [info["pid"] for info in ray.get([w.actor.ping.remote() for w in orch.workers], timeout=60)]
    left = time.monotonic()
    stream.close()
    orch.close()
    deadline = left + 10.0  # the bound for cancellation
    while any(_running(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker processes {pids} still run 10 s after the Orchestrator context was left")
        time.sleep(0.01)
    return RunOutcome(left - started, results, {}, 0, time.monotonic() - left)


def _running(pid: int) -> bool:
    """Whether the process runs (a zombie does not): Linux /proc; the cluster's nodes all run on this machine."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _count(outcome: RunOutcome, n_batches: int, want: np.ndarray, cancelled: bool) -> dict[str, int]:
    ends = collections.Counter(r.batch_id for r in outcome.results)
    expected = set(ends) if cancelled else set(range(n_batches))  # a cancelled run ends what it delivered
    wrong = 0
    for r in outcome.results:
        if r.error is None:
            rows = want[r.batch_id * BATCH_ROWS:(r.batch_id + 1) * BATCH_ROWS]
            wrong += not np.allclose(r.outputs, rows, rtol=1e-5, atol=1e-6)
    return {
        "lost": sum(1 for i in expected if ends[i] == 0),
        "duplicated": sum(c - 1 for c in ends.values() if c > 1),
        "errors": sum(r.error is not None for r in outcome.results),
        "wrong": wrong,
        "ended": len(ends),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fault drills on CPU with real Ray; writes the fault table.")
    parser.add_argument("--runs", type=int, default=2, help="runs per fault")
    parser.add_argument("--batches", type=int, default=None,
                        help="batches per run, x8 for the repeated-kill drill (default 240; 120 with --quick)")
    parser.add_argument("--only", default=None, help=f"comma-separated drills: {','.join(d.name for d in DRILLS)}")
    parser.add_argument("--quick", action="store_true", help="one run per drill and fewer batches (the smoke test)")
    parser.add_argument("--out", default="docs/results/faults.json")
    args = parser.parse_args(argv)
    runs = 1 if args.quick else args.runs
    base = args.batches or (120 if args.quick else 240)
    chosen = set(args.only.split(",")) if args.only else {d.name for d in DRILLS}
    unknown = chosen - {d.name for d in DRILLS}
    if unknown:
        parser.error(f"unknown drills {sorted(unknown)}; known: {[d.name for d in DRILLS]}")
    drills = [d for d in DRILLS if d.name in chosen]
    rows = []
    clean_seconds: dict[tuple[int, int | None], float] = {}
    with fake_gpu_cluster(nodes=2, gpus_per_node=1, cpus_per_node=1) as cluster:
        for drill in drills:
            n = base * drill.batches_factor
            x = np.random.default_rng(n).standard_normal((n * BATCH_ROWS, 16)).astype(np.float32)
            want = reference_outputs(x, BATCH_ROWS)
            window = drill.sections.get("dispatch", {}).get("inflight_per_worker")
            if not drill.cancel and (n, window) not in clean_seconds:
                cleans = [_run(drill, x, cluster, clean=True) for _ in range(runs)]
                for clean in cleans:
                    assert _count(clean, n, want, False) == {"lost": 0, "duplicated": 0, "errors": 0, "wrong": 0,
                                                             "ended": n}, "a clean run is wrong"
                clean_seconds[(n, window)] = statistics.median(c.seconds for c in cleans)
            outcomes = [_run(drill, x, cluster, clean=False) for _ in range(runs)]
            counts = [_count(o, n, want, drill.cancel) for o in outcomes]
            if drill.cancel:
                recover = statistics.median(o.cancel_seconds for o in outcomes)
            else:
                recover = statistics.median(o.seconds for o in outcomes) - clean_seconds[(n, window)]
            row = {
                "fault": drill.fault,
                "drill": drill.name,
                "runs": runs,
                "batches": n,
                "ended": min(c["ended"] for c in counts),  # fewer than batches only where a run was cancelled
                "lost": sum(c["lost"] for c in counts),
                "duplicated": sum(c["duplicated"] for c in counts),
                "errors": sum(c["errors"] for c in counts),
                "wrong": sum(c["wrong"] for c in counts),
                "time_to_recover_s": round(recover, 2),
                "worker_deaths": sum(o.dispatch.get("worker_deaths", 0) for o in outcomes),
                "retried": sum(o.dispatch.get("retried", 0) for o in outcomes),
                "late_duplicates_dropped": sum(o.dispatch.get("duplicates_dropped", 0) for o in outcomes),
                "oom_splits": sum(o.oom_splits for o in outcomes),
            }
            row["ok"] = (row["lost"] == 0 and row["duplicated"] == 0 and row["wrong"] == 0
                         and row["errors"] == drill.errors_expected * runs)
            rows.append(row)
            print_table([row], ["drill", "runs", "batches", "lost", "duplicated", "errors", "wrong",
                                "time_to_recover_s", "ok"])
    columns = ["fault", "runs", "batches", "ended", "lost", "duplicated", "errors", "wrong", "time_to_recover_s",
               "worker_deaths", "retried", "late_duplicates_dropped", "oom_splits", "ok"]
    print()
    print_table(rows, columns)
    write_result(args.out, "faults", command_line("orchestrator.bench.fault_table", argv), rows,
                 definitions=__doc__.split("counts per run:")[1].split("    python -m")[0].strip(),
                 setup={"batch_rows": BATCH_ROWS, "delay_s_per_batch": DELAY_S, "workers": 2,
                        "nodes": "2 logical nodes, 1 fake GPU each", "model": "zoo:tiny_mlp (CPU backend)",
                        "clean_run_seconds": {f"{n} batches, window {w or 'default'}": round(s, 2)
                                              for (n, w), s in clean_seconds.items()}})
    if not all(r["ok"] for r in rows):
        raise SystemExit("some drill lost, duplicated or corrupted batches: see the table")


if __name__ == "__main__":
    main()
