"""The decode benchmark's quick mode runs on the CPU and writes the JSON the GPU run writes."""
from __future__ import annotations

import json

from orchestrator.bench import decode_bench


def test_quick_decode_bench_writes_every_loop_side_by_side(tmp_path):
    out = tmp_path / "decode.json"
    decode_bench.main(["--quick", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "decode" and doc["settings"]["quick"] and doc["settings"]["eos_token_id"] is None
    assert [r["batch"] for r in doc["results"]] == [1, 4]
    for row in doc["results"]:
        rates = [row[f"{loop}_tokens_per_s"] for loop in ("naive", "synced", "interleaved")]
        assert all(rate > 0 for rate in rates), row
        ratio = row["interleaved_tokens_per_s"] / row["synced_tokens_per_s"]
        assert abs(row["interleaved_vs_synced"] - ratio) < 1e-9
        assert row["synced_interleaved_identical"] and row["naive_agreement"] == 1.0
        assert row["launched_steps"] == {"naive": 16, "synced": 16, "interleaved": 16}  # no EOS: same steps
    assert set(doc["passed"]) == set(decode_bench.FLOORS)
