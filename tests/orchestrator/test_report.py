"""The run report (summary, rich table) and the Chrome-trace timeline file, on the CPU backend."""
from __future__ import annotations

import collections
import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from actors.models import load_model
from actors.pipeline import Pipeline, PipelineConfig
from actors.streams import StreamManager
from orchestrator.report import chrome_trace, render

REPO = Path(__file__).resolve().parents[2]
STAGES = ["stage", "h2d", "compute", "d2h"]


def _worker_trace(name: str, batches: int, seed: int) -> list[dict]:
    """A real pipeline's timeline events (every batch timed) on the CPU backend."""
    torch.manual_seed(0)
    x = np.random.default_rng(seed).standard_normal((batches * 32, 16)).astype(np.float32)
    with StreamManager(device="cpu") as sm, \
            Pipeline(load_model("zoo:tiny_mlp"), sm, PipelineConfig(timing_every=1, timeline=True)) as p:
        list(p.map((i, x[i * 32:(i + 1) * 32]) for i in range(batches)))
        return p.timeline.chrome_trace(name)


def test_chrome_trace_has_one_named_track_per_stream_per_worker_in_pipeline_order():
    events = _worker_trace("worker-0", 6, seed=1) + _worker_trace("worker-1", 4, seed=2)
    doc = json.loads(json.dumps(chrome_trace(events)))  # what the file holds
    meta = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    processes = {e["pid"]: e["args"]["name"] for e in meta if e["name"] == "process_name"}
    assert sorted(processes.values()) == ["worker-0", "worker-1"]
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    for pid in processes:
        assert [threads[k] for k in sorted(k for k in threads if k[0] == pid)] == STAGES
    assert all(isinstance(e["pid"], int) and isinstance(e["tid"], int) for e in doc["traceEvents"])
    assert len(spans) == len(events) == (6 + 4) * 4
    for span in spans:  # every span sits on its own stream's track, in its own worker
        assert threads[span["pid"], span["tid"]] == span["cat"] and span["dur"] >= 0
    per_batch = collections.defaultdict(dict)
    for span in spans:
        per_batch[processes[span["pid"]], span["args"]["batch_id"]][span["cat"]] = span
    assert len(per_batch) == 10
    for stages in per_batch.values():
        # The CPU backend runs the streams in program order: each stage starts after the one before ends.
        for before, after in itertools.pairwise(STAGES[1:]):
            assert stages[after]["ts"] >= stages[before]["ts"] + stages[before]["dur"] - 1.0  # 1 us of rounding


def test_a_cpu_run_prints_the_table_and_writes_the_summary_and_the_timeline(tmp_path):
    sets = {"input.rows": 4096, "dispatch.batch_rows": 256, "pipeline.timing_every": 2,
            "output.report": tmp_path / "report.json", "output.timeline": tmp_path / "trace.json"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    r = subprocess.run([sys.executable, "-m", "orchestrator", "run", "--config", "configs/cpu_default.yaml",
                        "--set", "output.path=", *args], cwd=REPO, env={**os.environ, "RAY_ADDRESS": "local"},
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    summary = report["summary"]
    assert summary["rows"] == 4096 and summary["rows_per_second"] > 0 and summary["batches"]["completed"] == 16
    assert summary["timeline"] == str(tmp_path / "trace.json")
    workers = summary["workers"]
    assert sorted(w["worker"] for w in workers) == ["worker-0", "worker-1"]
    assert sum(w["rows"] for w in workers) == 4096
    for w in workers:
        assert w["rows_per_second"] > 0 and w["errors"] == 0 and w["graphs"] is None
        assert list(w["stage_us_per_row"]) == STAGES and w["stage_us_per_row"]["compute"] > 0
        assert w["binding_stage"] in STAGES and w["bound"].startswith(f"{w['binding_stage']}-bound")
        assert w["node"] and w["gpu"] == "none" and w["gpu_utilization_ratio"] is None  # no NVML on the CPU
    # the terminal: the table under the status line, and where the timeline went
    out = r.stdout.strip().splitlines()
    assert out[0].startswith("OK: zoo:tiny_mlp, 4,096 rows") and len(out) <= 20
    assert "rows/s" in out[2] and any(line.startswith("worker-0 ") for line in out)
    assert f"  timeline: {tmp_path / 'trace.json'} (Chrome trace: open in https://ui.perfetto.dev)" in out

    trace = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    threads = collections.Counter(e["pid"] for e in trace if e["name"] == "thread_name")
    assert len(threads) == 2 and set(threads.values()) == {4}  # two workers, four tracks each
    names = {e["pid"]: e["args"]["name"] for e in trace if e["name"] == "process_name"}
    # One trace process per model replica, named worker/model#replica.
    assert set(names.values()) == {"worker-0/default#0", "worker-1/default#0"}
    timed = collections.Counter(names[e["pid"]].split("/")[0] for e in trace
                                if e["ph"] == "X" and e["cat"] == "compute")
    # every timed batch (one in two of each worker's) is on the timeline
    assert timed == {w["name"]: (w["batches"] + 1) // 2 for w in report["workers"]}

    # more workers than the table shows: the rest are counted in one row
    many = {**summary, "workers": [{**workers[0], "worker": f"w{i}"} for i in range(11)]}
    buffer = io.StringIO()
    render(many, buffer, max_workers=8)
    lines = buffer.getvalue().splitlines()
    assert sum(line.startswith("w") for line in lines) == 8 + 1 and "... 3 more" in lines[-1]
