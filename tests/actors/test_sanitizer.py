"""The sanitizer harness (scripts/gpu_sanitize.sh): its negative control on CUDA, its parts on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actors.streams import D2H, StreamManager

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
def test_csan_catches_a_missing_stream_wait():
    """Negative control: a D2H copy that does not wait for the compute stream must be reported.

    Only meaningful under ``TORCH_CUDA_SANITIZER=1`` (the sanitizer must be on from the
    start of the process), so it is skipped otherwise; gpu_sanitize.sh requires it to pass.
    """
    from torch.cuda import _sanitizer as csan

    if not csan.cuda_sanitizer.enabled:
        pytest.skip("runs under TORCH_CUDA_SANITIZER=1 (scripts/gpu_sanitize.sh)")
    with StreamManager(device="cuda") as sm:
        compute, d2h = sm.get_compute_stream(), sm.get_copy_stream(D2H)
        x = torch.randn(1 << 20, device="cuda")
        torch.cuda.synchronize()
        with sm.use(compute):
            y = x * 2
            done = sm.create_event()
            done.record(compute)
        with sm.use(d2h):
            d2h.wait_event(done)  # the pipeline's order: accepted
            y.to("cpu", non_blocking=True)
        torch.cuda.synchronize()
        with sm.use(compute):
            z = x * 3
        with sm.use(d2h), pytest.raises(csan.CUDASanitizerErrors):
            z.to("cpu", non_blocking=True)  # no wait on the compute stream: a race
        torch.cuda.synchronize()


def test_pipeline_run_checks_outputs_and_writes_json_on_the_cpu(tmp_path):
    out = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "scripts/pipeline_run.py", "--model", "zoo:tiny_mlp", "--batches", "3",
                           "--rows", "8", "--graphs", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["ok"] is True
    assert [(c["graphs"], c["batches"], c["rows"]) for c in doc["cases"]] == [(False, 3, 8)]  # no graphs on the CPU
    assert doc["cases"][0]["max_abs_diff"] == 0.0  # the same kernels at the same shapes


def test_gpu_sanitize_refuses_to_pass_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("checks the no-CUDA path")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "scripts/gpu_sanitize.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "torch sees no CUDA device" in proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False and summary["csan"] == {"ran": False} and summary["racecheck"]["cases"] == []
