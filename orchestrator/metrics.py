"""Prometheus metrics, exported the Ray way: every metric this project records is defined here.

Metrics go through ``ray.util.metrics``: each process hands them to its node's
Ray metrics agent, which serves them with Ray's own at
``http://NODE:METRICS_EXPORT_PORT/metrics`` (the port of ``ray start
--metrics-export-port``, listed in ``ray.nodes()``). So one Prometheus scrape
config, the one Ray's docs give, collects ours from every node, and ours sit
next to Ray's in Grafana; ``prometheus_client`` would need a port per worker
process and its own service discovery. Ray puts ``ray_`` in front of each name
(``EXPORT_PREFIX``) and exports every few seconds (``metrics_report_interval_ms``,
10 s by default), not at once.

Two recorders, neither on the per-batch GPU path:

* ``DriverMetrics`` hears the dispatch loop's events (a counter add or a
  histogram observation, about 2 us each, per collected batch) and samples
  in-flight gauges every ``sample_s``.
* ``WorkerMetrics`` runs a thread in each worker that reads the pipeline's
  aggregated stats, the bound analysis and NVML every ``sample_s``.

Every metric carries the labels ``worker``, ``gpu``, ``node`` and ``model`` (``worker_labels``).
"""
from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

from actors.bounds import CopyCeilings, analyse
from actors.engines import DEFAULT_MODEL, Engines, merge_graph_stats, merge_stats
from actors.errors import BatchError
from actors.telemetry import GpuTelemetry, PeriodicThread
from orchestrator.dispatch import DispatchEvents, WorkerRecord

PREFIX = "orchestrator_"
EXPORT_PREFIX = "ray_"  # what Ray's exporter puts in front of every ray.util.metrics name
LABELS = ("worker", "gpu", "node", "model")

# Dispatch-to-collection latency of one batch, in seconds: 1 ms to 10 min.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 600.0)


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One metric: its name (with ``PREFIX``), kind, meaning, labels beyond ``LABELS``, and who records it.

    ``gpu_only`` metrics exist only where there is a GPU: NVML readings and CUDA-graph counters.
    """

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    recorder: Literal["driver", "worker"]
    extra_labels: tuple[str, ...] = ()
    gpu_only: bool = False
    boundaries: tuple[float, ...] = ()

    @property
    def labels(self) -> tuple[str, ...]:
        return LABELS + self.extra_labels

    @property
    def exported_names(self) -> tuple[str, ...]:
        """The names a scrape of Ray's endpoint shows (a histogram is three series)."""
        name = EXPORT_PREFIX + self.name
        if self.kind == "histogram":
            return (name + "_bucket", name + "_count", name + "_sum")
        return (name,)


def _spec(*args: Any, **kwargs: Any) -> MetricSpec:
    return MetricSpec(PREFIX + args[0], *args[1:], **kwargs)


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    # -- the driver: dispatch events ---------------------------------------------------------------
    _spec("batches_completed_total", "counter", "Batches whose results reached the driver", "driver"),
    _spec("rows_completed_total", "counter", "Rows whose results reached the driver", "driver"),
    _spec("batch_latency_seconds", "histogram", "Seconds from sending a batch to a worker to collecting its "
          "result (Ray approximates the sum from bucket midpoints)", "driver", boundaries=_LATENCY_BUCKETS),
    _spec("batch_errors_total", "counter", "Runs of a batch that raised, retried or not; label error: the "
          "error's class", "driver", extra_labels=("error",)),
    _spec("batch_retries_total", "counter", "Batches sent again after an error or a worker death", "driver"),
    _spec("batches_failed_total", "counter", "Batches that ended as an error", "driver"),
    _spec("worker_deaths_total", "counter", "Worker process deaths seen by the driver", "driver"),
    _spec("batches_inflight", "gauge", "Batches sent to the worker and not yet collected", "driver"),
    _spec("batches_queued", "gauge", "In-flight batches beyond the worker's pipeline depth: waiting for a "
          "ring slot", "driver"),
    # -- each worker: pipeline and bound -----------------------------------------------------------
    _spec("stage_seconds_total", "counter", "Seconds spent in each stage by the timed batches (one in "
          "pipeline.timing_every); divide by timed_rows_total for seconds per row", "worker",
          extra_labels=("stage",)),
    _spec("timed_rows_total", "counter", "Rows of the timed batches", "worker"),
    _spec("stage_capacity_rows_per_second", "gauge", "Rows/s each stage sustains alone (timed batches)", "worker",
          extra_labels=("stage",)),
    _spec("binding_stage", "gauge", "1 for the stage that binds the worker's throughput, 0 for the others",
          "worker", extra_labels=("stage",)),
    _spec("bound_ratio", "gauge", "Achieved rows/s over what the binding stage allows at its ceiling (the "
          "measured copy bandwidth for h2d and d2h)", "worker"),
    _spec("graph_replays_total", "counter", "Batches computed by replaying a CUDA graph", "worker", gpu_only=True),
    _spec("graph_eager_batches_total", "counter", "Batches computed eagerly although CUDA graphs are enabled "
          "(fallbacks)", "worker", gpu_only=True),
    _spec("graphs_captured", "gauge", "CUDA graphs captured and in use", "worker", gpu_only=True),
    # -- each worker: NVML ---------------------------------------------------------------------------
    _spec("gpu_telemetry_available", "gauge", "1 when NVML reads this worker's GPU, 0 when it cannot (no gpu_* "
          "readings are then exported)", "worker"),
    _spec("gpu_utilization_ratio", "gauge", "Fraction of NVML's last sample period in which a kernel ran",
          "worker", gpu_only=True),
    _spec("gpu_memory_used_bytes", "gauge", "GPU memory in use (all processes)", "worker", gpu_only=True),
    _spec("gpu_memory_total_bytes", "gauge", "GPU memory in all", "worker", gpu_only=True),
    _spec("gpu_power_watts", "gauge", "Board power draw", "worker", gpu_only=True),
    _spec("gpu_pcie_tx_bytes_per_second", "gauge", "PCIe traffic from the GPU (NVML, 20 ms window)", "worker",
          gpu_only=True),
    _spec("gpu_pcie_rx_bytes_per_second", "gauge", "PCIe traffic to the GPU (NVML, 20 ms window)", "worker",
          gpu_only=True),
)}


@functools.lru_cache(maxsize=None)
def _ray_metric(name: str) -> Any:
    """The ``ray.util.metrics`` object of ``name``, made once per process."""
    from ray.util.metrics import Counter, Gauge, Histogram

    spec = METRICS[name]
    if spec.kind == "counter":
        return Counter(spec.name, spec.description, tag_keys=spec.labels)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.description, tag_keys=spec.labels)
    return Histogram(spec.name, spec.description, boundaries=list(spec.boundaries), tag_keys=spec.labels)


def _metric(short: str) -> Any:
    return _ray_metric(PREFIX + short)


def worker_labels(info: dict[str, Any], model: str) -> dict[str, str]:
    """The four labels of a worker's series about ``model`` (a name ``map`` takes), from its ``ping()`` answer.

    ``model`` is the config's name for it, or, for a lone ``model`` (named ``default``) and for a
    decode worker, the built model's name (``tiny_mlp``, ``gpt2_small``).
    """
    built = info.get("models", {}).get(model, info)["model"]
    return {**_placement(info), "model": built if model == DEFAULT_MODEL else model}


def _placement(info: dict[str, Any]) -> dict[str, str]:
    """Where a worker runs: its ``worker``, ``gpu`` and ``node`` labels."""
    return {"worker": info["name"], "gpu": ",".join(info["gpu_ids"]) or "none", "node": info["node"]}


def metrics_endpoints() -> list[str]:
    """Ray's Prometheus endpoint on every live node of the connected cluster."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


# -- the driver ------------------------------------------------------------------------------------

@dataclasses.dataclass
class WorkerTally:
    """The driver's per-worker counts for the run report (the Prometheus counters count the same events)."""

    batches: int = 0
    rows: int = 0
    errors: int = 0
    retries: int = 0
    failed: int = 0
    deaths: int = 0


class DriverMetrics:
    """The driver's per-worker counts of dispatch events, over every map of an Orchestrator.

    Each map's ``Dispatcher`` reports to ``events(model)``, which counts that model's
    events and, when ``export`` is on, records Prometheus metrics under its labels.
    Maps of different models run on their own threads, so each model counts apart.
    """

    def __init__(self, infos: list[dict[str, Any]], depth: int, sample_s: float, export: bool) -> None:
        self.infos = {i["name"]: i for i in infos}
        self.depth = depth
        self.sample_s = sample_s
        self.export = export
        self._events: dict[str, ModelEvents] = {}
        self._lock = threading.Lock()

    def events(self, model: str) -> ModelEvents:
        with self._lock:
            if model not in self._events:
                self._events[model] = ModelEvents(self, {name: worker_labels(info, model)
                                                         for name, info in self.infos.items()})
            return self._events[model]

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Per worker: where it runs and its counts, all models together."""
        with self._lock:
            models = list(self._events.values())
        counts = [f.name for f in dataclasses.fields(WorkerTally)]
        return {name: {**_placement(info), **{k: sum(getattr(m.tallies[name], k) for m in models) for k in counts}}
                for name, info in self.infos.items()}


class ModelEvents(DispatchEvents):
    """One model's dispatch events: counted per worker, exported under ``labels`` (per worker).

    Gauges of in-flight and queued batches are sampled every ``sample_s`` on the
    loop's tick; two maps of the same model at once overwrite each other's.
    """

    def __init__(self, metrics: DriverMetrics, labels: dict[str, dict[str, str]]) -> None:
        self.labels = labels
        self.tallies = {name: WorkerTally() for name in labels}
        self.depth = metrics.depth
        self.sample_s = metrics.sample_s
        self.export = metrics.export
        self._next_sample = 0.0
        self._error_labels: dict[tuple[str, str], dict[str, str]] = {}
        if self.export:
            self._completed, self._rows = _metric("batches_completed_total"), _metric("rows_completed_total")
            self._latency = _metric("batch_latency_seconds")

    def completed(self, worker: str, rows: int, latency_s: float) -> None:
        tally = self.tallies[worker]
        tally.batches += 1
        tally.rows += rows
        if self.export:
            tags = self.labels[worker]
            self._completed.inc(1, tags)
            self._rows.inc(rows, tags)
            self._latency.observe(latency_s, tags)

    def error(self, worker: str, error: BatchError) -> None:
        self.tallies[worker].errors += 1
        if self.export:
            key = (worker, type(error).__name__)
            if key not in self._error_labels:
                self._error_labels[key] = {**self.labels[worker], "error": key[1]}
            _metric("batch_errors_total").inc(1, self._error_labels[key])

    def retried(self, worker: str) -> None:
        self.tallies[worker].retries += 1
        if self.export:
            _metric("batch_retries_total").inc(1, self.labels[worker])

    def gave_up(self, worker: str) -> None:
        self.tallies[worker].failed += 1
        if self.export:
            _metric("batches_failed_total").inc(1, self.labels[worker])

    def worker_died(self, worker: str) -> None:
        self.tallies[worker].deaths += 1
        if self.export:
            _metric("worker_deaths_total").inc(1, self.labels[worker])

    def tick(self, inflight: Mapping[WorkerRecord, int]) -> None:
        if not self.export:
            return
        now = time.monotonic()
        if now < self._next_sample:
            return
        self._next_sample = now + self.sample_s
        for w, count in inflight.items():
            tags = self.labels[w.name]
            _metric("batches_inflight").set(count, tags)
            _metric("batches_queued").set(max(0, count - self.depth), tags)


# -- a worker --------------------------------------------------------------------------------------

class WorkerMetrics:
    """Records one worker's pipeline stats, bound and NVML readings every ``sample_s`` on its own thread.

    Each model's series carry its own ``model`` label (``worker_labels``); the GPU's
    readings are set under every model's labels, the same values (dashboards take
    the max per GPU). Counters are fed the growth of the pipelines' cumulative
    counts since the last sample; the pipelines are not touched. ``close`` stops the thread.
    """

    def __init__(self, info: dict[str, Any], engines: Engines, telemetry: GpuTelemetry,
                 ceilings: CopyCeilings | None, sample_s: float) -> None:
        self.engines = engines
        self.labels = {e.name: worker_labels(info, e.name) for e in engines}
        self.telemetry = telemetry
        self.ceilings = ceilings
        self._seen: dict[tuple[str, str, str], float] = {}
        self._stage_labels: dict[tuple[str, str], dict[str, str]] = {}
        self._thread = PeriodicThread(self.sample, sample_s, f"metrics-{info['name']}")

    def close(self) -> None:
        self._thread.close()

    def _stage_tags(self, model: str, stage: str) -> dict[str, str]:
        key = (model, stage)
        if key not in self._stage_labels:
            self._stage_labels[key] = {**self.labels[model], "stage": stage}
        return self._stage_labels[key]

    def _add(self, short: str, total: float, tags: dict[str, str], model: str, key: str = "") -> None:
        """Increase counter ``short`` by how much ``total`` (a cumulative count) grew since the last sample."""
        seen = self._seen.get((short, model, key), 0.0)
        if total > seen:
            _metric(short).inc(total - seen, tags)
            self._seen[(short, model, key)] = total

    def sample(self) -> None:
        for engine in self.engines:
            self._sample_model(engine.name, engine.replicas)
        gpu = self.telemetry.read()
        for labels in self.labels.values():
            _metric("gpu_telemetry_available").set(float(gpu.available), labels)
            for field in ("utilization_ratio", "memory_used_bytes", "memory_total_bytes", "power_watts",
                          "pcie_tx_bytes_per_second", "pcie_rx_bytes_per_second"):
                _metric("gpu_" + field).set(getattr(gpu, field), labels)  # None (unsupported) sets nothing

    def _sample_model(self, model: str, replicas: list[Any]) -> None:
        labels = self.labels[model]
        stats = merge_stats([p.stats for p in replicas])
        for stage, ms in list(stats.stage_ms_total.items()):
            self._add("stage_seconds_total", ms / 1e3, self._stage_tags(model, stage), model, stage)
        self._add("timed_rows_total", stats.timed_rows, labels, model)
        bound = analyse(stats, self.ceilings)
        for stage, capacity in bound.stage_capacity_rows_per_second.items():
            _metric("stage_capacity_rows_per_second").set(capacity, self._stage_tags(model, stage))
            _metric("binding_stage").set(float(stage == bound.binding_stage), self._stage_tags(model, stage))
        _metric("bound_ratio").set(bound.fraction_of_bound, labels)
        graphs = merge_graph_stats([p.graphs.stats for p in replicas])
        if graphs["enabled"]:
            self._add("graph_replays_total", graphs["replays"], labels, model)
            self._add("graph_eager_batches_total", graphs["eager_batches"], labels, model)
            _metric("graphs_captured").set(graphs["captured"], labels)
