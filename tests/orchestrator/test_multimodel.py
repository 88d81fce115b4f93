"""Several models per worker through the driver: routing by name, per-model results and report (real local Ray)."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import ray
import yaml
from _util import RAY_GPUS, reference, rows, run_config

from orchestrator import InputError, Orchestrator, RunConfig, Synthetic, UnknownModelError

pytestmark = pytest.mark.usefixtures("ray_local")

MLP = {"in_features": 16, "hidden": 24, "out_features": 5}
MODELS = [{"name": "small", "source": "zoo:tiny_mlp", "seed": 1},
          {"name": "wide", "source": "zoo:mlp", "kwargs": MLP, "seed": 2, "replicas": 2, "priority": "high"}]


def want(name: str, x: np.ndarray) -> np.ndarray:
    if name == "small":
        return reference(x, seed=1)
    return reference(x, source="zoo:mlp", seed=2, kwargs=MLP)


@pytest.fixture(scope="module")
def orch():
    if not ray.is_initialized():
        ray.init(num_cpus=16, num_gpus=RAY_GPUS, include_dashboard=False, configure_logging=False, log_to_driver=False)
    config = RunConfig.model_validate({**run_config(64).model_dump(exclude={"model"}), "models": MODELS})
    with Orchestrator(config) as o:
        yield o


def test_every_worker_hosts_every_model_and_says_how_to_feed_it(orch):
    for info in orch.worker_info:
        assert list(info["models"]) == ["small", "wide"]
        assert info["models"]["wide"]["input_shape"] == [16] and info["models"]["wide"]["replicas"] == 2
        assert info["models"]["wide"]["priority"] == "high"
        assert info["models"]["wide"]["source"] == "zoo:mlp"
        assert info["model"] == "tiny_mlp"  # top-level keys: the default (first) model


@pytest.mark.parametrize("name", ["small", "wide", None])
def test_each_model_equals_its_own_serial_reference(orch, name):
    x = rows(700, seed=5)
    np.testing.assert_array_equal(orch.run(x, model=name), want(name or "small", x))


def test_two_models_mapped_at_once_from_two_threads(orch):
    inputs = {"small": rows(900, seed=6), "wide": rows(900, seed=7)}
    before = orch.report()  # the module's orchestrator: earlier tests' maps are in it too
    got: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            got[name] = orch.run(inputs[name], model=name)
        except BaseException as err:  # surfaced below: an assert in a thread would be lost
            errors.append(err)

    threads = [threading.Thread(target=run, args=(n,)) for n in inputs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for name, x in inputs.items():
        np.testing.assert_array_equal(got[name], want(name, x))
    report = orch.report()
    for name in inputs:
        assert report["models"][name]["rows"] - before["models"].get(name, {"rows": 0})["rows"] == 900
    # The driver's per-worker counts take both models' threads together: 15 batches of each.
    for key, total in (("batches", 30), ("rows", 1800)):
        assert sum(w[key] - before["dispatch_per_worker"][n][key]
                   for n, w in report["dispatch_per_worker"].items()) == total
    assert report["models"]["wide"]["replicas"] == 2 and len(report["models"]["wide"]["bound"]) == 2
    for w in report["workers"]:  # a worker's totals are its models' sums
        assert w["rows"] == sum(m["rows"] for m in w["models"].values())


def test_an_unknown_model_name_fails_before_dispatch_listing_the_known_ones(orch):
    with pytest.raises(UnknownModelError, match=r"unknown model 'nope'; known: 'small', 'wide'"):
        next(orch.map(rows(10), model="nope"))


def test_a_worker_asked_for_an_unknown_model_rejects_the_batch_by_name(orch):
    worker = orch.workers[0].actor
    with pytest.raises(InputError, match=r"batch 7 on worker worker-0: unknown model 'nope'"):
        ray.get(worker.infer.remote(7, rows(4), 0, None, "nope"))
    assert ray.get(worker.infer.remote(8, rows(4), 0, None, "wide")).rows == 4


# -- the command line and the benchmark ---------------------------------------------------------------

def test_cli_runs_the_input_through_the_model_the_config_names(tmp_path):
    from test_cli import orchestrator as cli_run  # the CLI in a subprocess with its own local Ray

    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({
        "models": MODELS, "input": {"model": "wide", "rows": 512, "seed": 3},
        "pipeline": {"max_batch_rows": 128}, "dispatch": {"batch_rows": 128},
        "output": {"path": str(tmp_path / "out.npy"), "report": str(tmp_path / "report.json")}}))
    r = cli_run("run", "--config", str(config))
    assert r.returncode == 0, r.stderr[-3000:]
    syn = Synthetic(512, (16,), "float32", seed=3)
    x = np.concatenate([syn.batch(i, a, a + 128) for i, a in enumerate(range(0, 512, 128))])
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"),
                               reference(x, batch_rows=128, source="zoo:mlp", seed=2, kwargs=MLP), rtol=1e-5, atol=1e-6)
    summary = r.stdout.strip().splitlines()
    assert summary[0].startswith("OK: zoo:mlp, 512 rows")
    assert any(line.startswith("  model wide (priority high, replicas per worker 2): 512 rows") for line in summary)
    assert any(line.startswith("  model small (priority normal, replicas per worker 1): 0 rows") for line in summary)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["models"]["wide"]["rows"] == 512 and report["models"]["small"]["rows"] == 0


def test_multistream_bench_smoke_writes_its_json(tmp_path):
    from orchestrator.bench import multistream_bench

    out = tmp_path / "multistream.json"
    multistream_bench.main(["--smoke", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "multistream" and doc["floors"] == {"2": 1.3, "4": 1.8}
    assert doc["command"].startswith("python -m orchestrator.bench.multistream_bench --smoke")
    through = [r for r in doc["results"] if r["part"] == "throughput"]
    assert [r["streams"] for r in through] == [1, 2, 4] and through[0]["speedup"] == 1.0
    assert all(r["rows_per_s"] > 0 and r["parity_mismatch"] == 0.0 for r in through)
    latency = [r for r in doc["results"] if r["part"] == "priority"]
    assert {(r["probe_priority"], r["state"]) for r in latency} == {
        (p, s) for p in ("HIGH", "LOW (= flood)") for s in ("alone", "under LOW flood")}
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in latency)
    assert doc["workload"]["flood_rows_per_s_while_probed"] > 0
