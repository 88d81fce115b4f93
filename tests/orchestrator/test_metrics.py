"""Prometheus metrics: names and labels, the Grafana dashboard against the catalog, and a real scrape.

The scrape tests start their own Ray with a metrics export port and a 1 s report
interval (Ray's default is 10 s), run a real job with one failing batch and one
killed worker, and read Ray's real endpoint over HTTP until the counters match
what the driver saw.
"""
from __future__ import annotations

import collections
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import torch
from _util import rows, run_config

from orchestrator import Orchestrator, RunConfig
from orchestrator.metrics import EXPORT_PREFIX, LABELS, METRICS, PREFIX

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "orchestrator.json"
_UNIT_SUFFIXES = ("_total", "_seconds", "_bytes", "_ratio", "_watts", "_per_second", "_available", "_inflight",
                  "_queued", "_stage", "_captured")
_SCRAPE_DEADLINE_S = 60


# -- names and labels (no Ray) ----------------------------------------------------------------------

def test_metric_names_follow_the_conventions_and_every_metric_has_the_four_labels():
    for name, spec in METRICS.items():
        assert name.startswith(PREFIX) and re.fullmatch(r"[a-z_]+", name), name
        assert name.endswith(_UNIT_SUFFIXES), f"{name}: no unit suffix"
        assert (spec.kind == "counter") == name.endswith("_total"), f"{name}: only counters end in _total"
        assert spec.labels[:4] == LABELS and len(set(spec.labels)) == len(spec.labels), name
        assert not any("batch" in label for label in spec.labels), f"{name}: a batch label is unbounded"
        assert spec.description
    latency = METRICS[PREFIX + "batch_latency_seconds"]
    assert latency.kind == "histogram" and list(latency.boundaries) == sorted(set(latency.boundaries))
    assert latency.exported_names == tuple(f"ray_{PREFIX}batch_latency_seconds_{s}" for s in ("bucket", "count", "sum"))


def _panel_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def _names_in(expr: str) -> set[str]:
    return set(re.findall(rf"\b{EXPORT_PREFIX}{PREFIX}[a-z_]+", expr))


def _spec_of(exported: str):
    return next(s for s in METRICS.values() if exported in s.exported_names)


def test_every_dashboard_query_names_catalogued_metrics_and_labels_and_covers_the_catalog():
    exported = {n: s for s in METRICS.values() for n in s.exported_names}
    used = set()
    for expr in _panel_queries():
        names = _names_in(expr)
        assert names, f"a panel query names no metric of ours: {expr}"
        assert names <= set(exported), f"{expr}: unknown metrics {names - set(exported)}"
        used |= {exported[n].name for n in names}
        known_labels = {label for n in names for label in exported[n].labels} | {"le"}
        for group in re.findall(r"\b(?:by|on) \(([^)]*)\)", expr):
            labels = {g.strip() for g in group.split(",")}
            assert labels <= known_labels, f"{expr}: labels {labels - known_labels} are not on its metrics"
    assert used == set(METRICS), f"metrics on no panel: {set(METRICS) - used}"


def test_the_dashboards_readme_documents_every_metric_with_its_kind_and_extra_labels():
    text = (DASHBOARD.parent / "README.md").read_text()
    rows = re.findall(r"^\| `(ray_\w+)` \| (\w+) \| (\w+) \| ([\w, ]*) \|", text, flags=re.MULTILINE)
    assert {r[0]: (r[1], r[2], tuple(x for x in r[3].replace(" ", "").split(",") if x)) for r in rows} == {
        EXPORT_PREFIX + s.name: (s.kind, s.recorder, s.extra_labels) for s in METRICS.values()}


# -- a real job, a real scrape ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def metrics_port():
    """A Ray of this module's own, exporting metrics on a known port every second."""
    # Ray's metrics agent runs only with ray[default]'s dependencies (the GPU machine's Ray bundle lacks
    # some of them); ray._private.metrics_agent imports opencensus and prometheus_client.
    for module in ("aiohttp", "opencensus", "prometheus_client"):
        pytest.importorskip(module, reason=f"Ray's metrics agent needs ray[default] ({module})")
    if ray.is_initialized():
        ray.shutdown()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False, configure_logging=False,
             log_to_driver=False, _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 1000})
    yield port
    ray.shutdown()  # tests/orchestrator/conftest.py starts its own Ray again for the next module


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Each of our series in Prometheus text format: name -> [(labels, value)]."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)\{(.*)\} (\S+)", line)
        if m and m.group(1).startswith(EXPORT_PREFIX + PREFIX):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2)))
            series.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return series


def _total(series, name: str, **match: str) -> float:
    return sum(v for labels, v in series.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


def _scrape_until(url: str, check) -> tuple[dict, list[str]]:
    """Scrape until ``check`` finds no problem (Ray exports with a delay) or the deadline passes."""
    end = time.monotonic() + _SCRAPE_DEADLINE_S
    while True:
        series = _scrape(url)
        problems = check(series)
        if not problems or time.monotonic() > end:
            return series, problems
        time.sleep(1)


def _run_and_check(port: int, config, gpu: bool) -> None:
    """Batch 3 raises on every worker (skipped); worker-0 is killed mid-run and Ray restarts it.

    64 batches of 64 rows run eager with graphs on (above the largest bucket, 32); the last,
    of 20 rows, replays a graph. The scrape happens inside the Orchestrator: the workers'
    samplers must outlive the job.
    """
    with Orchestrator(config) as orch:
        done = rows_done = 0
        for result in orch.map(rows(64 * 64 + 20, seed=3)):
            if result.error is None:
                done, rows_done = done + 1, rows_done + result.rows
                if done == 8:
                    ray.kill(orch.workers[0].actor, no_restart=False)
        report = orch.report()
        d = report["dispatch"]
        assert (d["failed"], d["worker_deaths"]) == (1, 1) and d["retried"] >= 1, d
        assert report["metrics_endpoints"] == [f"http://{ray.util.get_node_ip_address()}:{port}/metrics"]
        names = {n for s in METRICS.values() if gpu or not s.gpu_only for n in s.exported_names}
        wanted = {n for expr in _panel_queries() for n in _names_in(expr)} & names
        expected = {
            "rows_completed_total": rows_done, "batches_completed_total": done, "batch_latency_seconds_count": done,
            "batch_errors_total": 1, "batches_failed_total": 1, "worker_deaths_total": 1,
            "batch_retries_total": d["retried"],
        }

        def check(series: dict) -> list[str]:
            problems = [f"not exported: {n}" for n in sorted(wanted - set(series))]
            problems += [f"{n} = {_total(series, EXPORT_PREFIX + PREFIX + n)}, expected {v}"
                         for n, v in expected.items() if _total(series, EXPORT_PREFIX + PREFIX + n) != v]
            available = {labels["worker"]: v for labels, v in series.get(f"ray_{PREFIX}gpu_telemetry_available", [])}
            if set(available) != {"worker-0", "worker-1"} or set(available.values()) != {float(gpu)}:
                problems.append(f"gpu_telemetry_available by worker: {available}")
            return problems

        series, problems = _scrape_until(report["metrics_endpoints"][0], check)
    assert not problems, problems
    for labels, _ in series[f"ray_{PREFIX}rows_completed_total"]:
        assert labels["worker"] in {"worker-0", "worker-1"} and labels["model"] == "tiny_mlp"
        assert labels["node"] == socket.gethostname() and (labels["gpu"] != "none") == gpu
    assert _total(series, f"ray_{PREFIX}batch_errors_total", error="ModelError") == 1
    assert {labels["stage"] for labels, _ in series[f"ray_{PREFIX}stage_seconds_total"]} == {"stage", "h2d",
                                                                                            "compute", "d2h"}
    # Exactly one stage binds in each worker process (worker-1 was never killed, so it surely has one).
    binding = collections.Counter((labels["worker"], labels["WorkerId"]) for labels, v in
                                  series[f"ray_{PREFIX}binding_stage"] if v == 1.0)
    assert set(binding.values()) == {1} and "worker-1" in {w for w, _ in binding}, binding


def _config(gpu: bool):
    faults = {"raise_on_batches": [3]}
    return run_config(64, errors={"on_error": "skip", "max_retries": 2}, metrics={"sample_s": 0.5},
                      cluster={"num_workers": 2, "gpus_per_worker": 0.5, "worker_start_timeout_s": 90},
                      pipeline={"graphs": {"enabled": gpu, "buckets": [1, 2, 4, 8, 16, 32]}, "timing_every": 4},
                      faults={"worker-0": {**faults, "delay_s": 0.02}, "worker-1": faults})


def test_every_metric_a_dashboard_panel_names_is_exported_by_a_real_job(metrics_port):
    """On the CPU backend NVML and CUDA-graph metrics cannot exist: telemetry_available says 0 instead."""
    if torch.cuda.is_available():
        pytest.skip("the GPU variant below covers this on a GPU machine")
    _run_and_check(metrics_port, _config(gpu=False), gpu=False)


@pytest.mark.gpu
def test_every_metric_a_dashboard_panel_names_is_exported_by_a_real_gpu_job(metrics_port):
    _run_and_check(metrics_port, _config(gpu=True), gpu=True)


def test_each_model_of_a_multi_model_worker_is_exported_under_its_own_model_label(metrics_port):
    """Two models on each worker: driver and worker series split by the config's model names."""
    models = [{"name": "small", "source": "zoo:tiny_mlp", "seed": 1},
              {"name": "wide", "source": "zoo:mlp", "kwargs": {"in_features": 16, "hidden": 24, "out_features": 5},
               "replicas": 2}]
    base = run_config(32, metrics={"sample_s": 0.5}, pipeline={"timing_every": 2},
                      cluster={"num_workers": 2, "gpus_per_worker": 0.5, "worker_start_timeout_s": 90})
    config = RunConfig.model_validate({**base.model_dump(exclude={"model"}), "models": models})
    with Orchestrator(config) as orch:
        done = {name: sum(r.rows for r in orch.map(rows(32 * n + 7, seed=n), model=name))
                for name, n in (("small", 12), ("wide", 20))}
        url = orch.report()["metrics_endpoints"][0]
        name = f"{EXPORT_PREFIX}{PREFIX}"

        def check(series: dict) -> list[str]:
            problems = [f"rows of {m}: {_total(series, name + 'rows_completed_total', model=m)}, expected {n}"
                        for m, n in done.items() if _total(series, name + "rows_completed_total", model=m) != n]
            for metric in ("timed_rows_total", "bound_ratio", "gpu_telemetry_available"):
                got = {(labels["worker"], labels["model"]) for labels, _ in series.get(name + metric, [])
                       if labels["model"] in done}  # the module's earlier job left tiny_mlp series
                want = {(w, m) for w in ("worker-0", "worker-1") for m in done}
                problems += [f"{metric}: series {sorted(got)}"] if got != want else []
            return problems

        series, problems = _scrape_until(url, check)
    assert not problems, problems
    assert {labels["model"] for labels, _ in series[name + "stage_seconds_total"]} >= {"small", "wide"}


def test_a_local_ray_started_for_address_local_exports_on_the_configured_port():
    """``cluster.address: local`` starts a Ray like the default does: no dashboard, metrics on ``export_port``."""
    for module in ("aiohttp", "opencensus", "prometheus_client"):
        pytest.importorskip(module, reason=f"Ray's metrics agent needs ray[default] ({module})")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = f"""
import urllib.request
from orchestrator import Orchestrator, RunConfig
config = RunConfig.model_validate({{"cluster": {{"address": "local", "cpu_workers": 1}},
                                   "metrics": {{"export_port": {port}}}, "dispatch": {{"progress": False}}}})
with Orchestrator(config) as orch:
    import ray
    assert ray.is_initialized()
    text = urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    print("scraped", len(text) > 0)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0 and "scraped True" in done.stdout, done.stderr[-2000:]
