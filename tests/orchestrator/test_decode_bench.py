"""The decode benchmark's quick mode runs on the CPU and writes the JSON the GPU run writes."""
from __future__ import annotations

import json

import pytest

from orchestrator.bench import decode_bench
from orchestrator.bench.common import command_line


def test_quick_decode_bench_writes_every_loop_side_by_side(tmp_path):
    out = tmp_path / "decode.json"
    decode_bench.main(["--quick", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["command"] == f"python -m orchestrator.bench.decode_bench --quick --out {out}"
    assert doc["benchmark"] == "decode" and doc["settings"]["quick"] and doc["settings"]["eos_token_id"] is None
    assert [r["batch"] for r in doc["results"]] == [1, 4]
    for row in doc["results"]:
        rates = [row[f"{loop}_tokens_per_s"] for loop in ("naive", "synced", "interleaved")]
        assert all(rate > 0 for rate in rates), row
        ratio = row["interleaved_tokens_per_s"] / row["synced_tokens_per_s"]
        assert abs(row["interleaved_vs_synced"] - ratio) < 1e-9
        assert row["synced_interleaved_identical"] and row["naive_agreement"] == 1.0
        assert row["launched_steps"] == {"naive": 16, "synced": 16, "interleaved": 16}  # no EOS: same steps
        assert row["synced_step_us"] * row["synced_tokens_per_s"] == pytest.approx(1e6 * row["batch"])
        assert not row["compiled"] and row["device_step_us"] is None  # the device bound needs CUDA graphs
    assert set(doc["passed"]) == set(decode_bench.FLOORS)


def test_command_line_is_the_process_arguments_when_main_was_called_from_the_shell(monkeypatch):
    monkeypatch.setattr("sys.argv", ["decode_bench.py", "--compile", "--out", "/tmp/a b.json"])
    assert command_line("orchestrator.bench.decode_bench", None) == (
        "python -m orchestrator.bench.decode_bench --compile --out '/tmp/a b.json'")
    assert command_line("orchestrator.bench.decode_bench", []) == "python -m orchestrator.bench.decode_bench"
