"""The fault-table script (orchestrator/bench/fault_table.py) runs and writes its JSON: a smoke test."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # about 35 s: a two-node cluster and two runs
def test_fault_table_quick_run_writes_the_table(tmp_path):
    out = tmp_path / "faults.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.bench.fault_table", "--quick", "--only", "oom",
                           "--batches", "60", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "faults" and "lost" in doc["definitions"]
    [row] = doc["results"]
    assert row["drill"] == "oom" and row["runs"] == 1 and row["batches"] == 60
    assert (row["lost"], row["duplicated"], row["errors"], row["wrong"]) == (0, 0, 0, 0) and row["ok"] is True
    assert row["oom_splits"] > 0 and isinstance(row["time_to_recover_s"], float)
