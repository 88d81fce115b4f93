"""Benchmark outputs: saved H100/H200 results re-plot into PNGs; the metrics benchmark's CPU mode writes its JSON."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from orchestrator.bench.plot import plot_file

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "results"


@pytest.mark.parametrize("name, size", [("graphs", (1100, 715)), ("scaling", (1650, 440))])
def test_saved_results_plot_into_a_png_next_to_their_json(tmp_path, name, size):
    src = tmp_path / f"{name}.json"
    shutil.copy(RESULTS / f"{name}.json", src)
    out = plot_file(src)
    assert out == tmp_path / f"{name}.png"
    image = matplotlib.image.imread(out)
    assert (image.shape[1], image.shape[0]) == size
    # not blank: many distinct colours (lines, bars, text), not one background
    assert len({tuple(px) for px in image.reshape(-1, image.shape[2])[::97].tolist()}) > 20


def test_a_benchmark_without_a_plot_is_named(tmp_path):
    path = tmp_path / "streams.json"
    shutil.copy(RESULTS / "streams.json", path)
    with pytest.raises(ValueError, match=r"streams.json: no plot for benchmark 'streams' \(plots: scaling, graphs\)"):
        plot_file(path)
    assert json.loads(path.read_text())["benchmark"] == "streams" and not path.with_suffix(".png").exists()


def test_the_metrics_benchmark_quick_mode_writes_its_json(tmp_path):
    out = tmp_path / "metrics.json"
    r = subprocess.run([sys.executable, "-m", "orchestrator", "bench", "metrics", "--quick", "--out", str(out)],
                       cwd=REPO, env={**os.environ, "RAY_ADDRESS": "local"}, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "metrics" and doc["quick"] is True
    assert [row["metrics_export"] for row in doc["results"]] == ["on", "off"]
    assert all(row["rows_per_s"] > 0 and row["passes"] == 2 for row in doc["results"])
    on, off = (row["rows_per_s"] for row in doc["results"])
    assert doc["on_over_off"] == on / off and doc["passed"] == (on / off >= doc["floor"])
    assert 0 < doc["driver_event_us"] < 1000
    assert doc["nvml_read_ms"] is None or doc["nvml_read_ms"] > 0  # None without a GPU and NVML
