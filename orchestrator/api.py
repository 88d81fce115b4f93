"""Orchestrator: the Python batch-inference API (and generation, with a ``decode`` config section).

Attaches to a Ray cluster (or starts a local one), starts one worker per GPU
(CPU workers when the cluster has none), feeds them through the Dispatcher and
shuts down exactly what it started.

    with Orchestrator(RunConfig()) as orch:
        outputs = orch.run(np.random.rand(10_000, 16).astype("float32"))
        print(orch.report()["bound"])
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray

from actors.decode_worker import RemoteDecodeWorker
from actors.errors import OrchestratorError, UnknownModelError, first_line
from actors.pipeline import concat_outputs
from actors.worker import RemoteGpuWorker
from orchestrator.config import RunConfig
from orchestrator.dispatch import Dispatcher, DispatchStats, Result, WorkerRecord, in_order
from orchestrator.metrics import DriverMetrics, metrics_endpoints
from orchestrator.sources import batches

log = logging.getLogger(__name__)

# close() waits this long for killed workers to be gone (cancellation must return within 10 s).
_CLOSE_DEADLINE_S = 8.0
# report() and timeline() wait this long for each worker's answer (control calls: never queued behind batches).
_ASK_TIMEOUT_S = 30.0


class WorkerStartError(OrchestratorError, RuntimeError):
    """Workers did not start: not enough resources, or the model failed to build."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class Orchestrator:
    """A context manager owning a set of GPU workers on a Ray cluster."""

    def __init__(self, config: RunConfig | None = None, **overrides: Any) -> None:
        """``overrides`` are dotted-free shortcuts for sections, e.g. ``model={"source": "zoo:resnet50"}``."""
        base = (config or RunConfig()).model_dump()
        for section, values in overrides.items():
            if section not in base:
                raise ValueError(f"unknown config section {section!r}; sections: {sorted(base)}")
            base[section] = {**base[section], **values}
        self.config = RunConfig.model_validate(base)
        self.workers: list[WorkerRecord] = []
        self._started_ray = False
        self._dispatch_stats: list[DispatchStats] = []  # one per map, kept for report()
        self._rows_done = 0
        self._seconds = 0.0  # wall time with at least one map running (concurrent maps counted once)
        self._maps_running = 0
        self._busy_since = 0.0
        self._clock = threading.Lock()

    # -- lifetime -----------------------------------------------------------------------------------
    def __enter__(self) -> Orchestrator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        cluster = self.config.cluster
        if not ray.is_initialized():
            if cluster.address in (None, "local"):  # may start a Ray here: no dashboard, our metrics port
                ray.init(address=cluster.address, include_dashboard=False, dashboard_host=cluster.dashboard_host,
                         log_to_driver=True, configure_logging=False,
                         _metrics_export_port=self.config.metrics.export_port)
            else:
                ray.init(address=cluster.address, log_to_driver=True, configure_logging=False)
            self._started_ray = True
        try:
            self._start_workers()
        except BaseException:
            self.close()
            raise

    def _start_workers(self) -> None:
        cluster = self.config.cluster
        gpus = ray.cluster_resources().get("GPU", 0)
        per = cluster.gpus_per_worker if gpus else 0
        count = cluster.num_workers or (int(gpus / per) if gpus else cluster.cpu_workers)
        if gpus and count * per > gpus + 1e-9:
            raise WorkerStartError(f"you requested {count} workers x {per:g} GPU = {count * per:g} GPUs but the cluster "
                                   f"has {gpus:g}; lower cluster.num_workers or cluster.gpus_per_worker")
        if not gpus:
            log.warning("the cluster has no GPU: starting %d CPU workers (CPU backend)", count)
        # Every model gets its own window of Ray threads, so one model's flood cannot hold another's batches back.
        window = sum(self.config.window(name) for name in self.config.model_names)
        models = self.config.engine_specs()
        pipeline = self.config.pipeline.model_dump()
        faults = {name: f.model_dump() for name, f in self.config.faults.items()}
        metrics = self.config.metrics
        sample_s = metrics.sample_s if metrics.export else None
        options = dict(num_gpus=per, num_cpus=cluster.cpus_per_worker, max_restarts=cluster.max_worker_restarts,
                       max_task_retries=0)
        decode = self.config.decode.model_dump() if self.config.decode else None
        for i in range(count):
            name = f"worker-{i}"
            if decode is None:
                actor = RemoteGpuWorker.options(max_concurrency=window, **options).remote(
                    name, models, pipeline, faults.get(name), sample_s)
            else:  # one generation at a time: the worker's KV cache holds one batch
                actor = RemoteDecodeWorker.options(max_concurrency=1, **options).remote(
                    name, self.config.model.model_dump(), decode, self.config.pipeline.max_batch_rows,
                    faults.get(name))
            self.workers.append(WorkerRecord(name, actor))
        pings = [w.actor.ping.remote() for w in self.workers]
        ready, not_ready = ray.wait(pings, num_returns=len(pings), timeout=cluster.worker_start_timeout_s)
        if not_ready:
            have = ray.available_resources()
            raise WorkerStartError(
                f"{len(not_ready)} of {count} workers did not start within {cluster.worker_start_timeout_s:g} s "
                f"(each asks for {per:g} GPU and {cluster.cpus_per_worker:g} CPU; the cluster has "
                f"{have.get('GPU', 0):g} GPU and {have.get('CPU', 0):g} CPU free)")
        try:
            self.worker_info = ray.get(ready)
        except Exception as err:
            # Ray's text holds the worker's traceback; its last line is the error itself.
            cause = str(err).strip().splitlines()[-1]
            what = (f"model {models[0]['model']['source']!r}" if len(models) == 1 else
                    "models " + ", ".join(f"{s['name']}={s['model']['source']!r}" for s in models))
            raise WorkerStartError(f"a worker failed to build its {what}: {cause}") from err
        log.info("started %d workers: %s", count, [(i["name"], i["device"], i["gpu_ids"]) for i in self.worker_info])
        self.driver_metrics = DriverMetrics(self.worker_info,
                                            depth=self.config.pipeline.depth, sample_s=metrics.sample_s,
                                            export=metrics.export)

    def close(self) -> None:
        """Kill the workers this orchestrator started and, if it started Ray, shut Ray down. Idempotent."""
        for worker in self.workers:
            try:
                ray.kill(worker.actor, no_restart=True)
            except Exception as err:  # already gone: nothing left to release
                log.debug("kill %s: %s", worker.name, err)
        _await_deaths([w.actor for w in self.workers], deadline_s=_CLOSE_DEADLINE_S)
        self.workers = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
        self._started_ray = False

    # -- work ------------------------------------------------------------------------------------------
    def map(self, inputs: Any, *, ordered: bool | None = None, batch_rows: int | None = None,
            model: str | None = None) -> Iterator[Result]:
        """Yield each batch's Result as it completes (or in input order with ``ordered=True``).

        ``model`` names one of the config's ``models`` (None: the first, or the only ``model``).
        Maps of different models may run at once, each with its own in-flight window. Bad
        arguments raise here, not at the first ``next``. Leaving the loop early (``break``)
        cancels the calls still queued and frees the input.
        """
        if not self.workers:
            raise RuntimeError("Orchestrator is not started; use it as a context manager")
        cfg = self.config
        model = self._model_name(model)
        ordered = cfg.dispatch.ordered if ordered is None else ordered
        rows = batch_rows or cfg.dispatch.batch_rows
        if rows > cfg.pipeline.max_batch_rows:
            raise ValueError(f"batch_rows={rows} exceeds pipeline.max_batch_rows={cfg.pipeline.max_batch_rows}")
        return self._results(inputs, model, ordered, rows)

    def _results(self, inputs: Any, model: str, ordered: bool, rows: int) -> Iterator[Result]:
        cfg = self.config
        progress = _progress_bar(cfg.dispatch.progress, _total_rows(inputs))
        dispatcher = Dispatcher(
            self.workers, window=cfg.window(model), model=model, on_error=cfg.errors.on_error,
            max_retries=cfg.errors.max_retries, batch_timeout_s=cfg.dispatch.batch_timeout_s,
            probe_timeout_s=cfg.cluster.worker_start_timeout_s,
            max_ahead=cfg.dispatch.reorder_window if ordered else None,
            on_result=(lambda r: progress.update(r.rows)) if progress else None,
            events=self.driver_metrics.events(model))
        self._dispatch_stats.append(dispatcher.stats)
        stream = dispatcher.run(batches(inputs, rows))
        self._map_started()
        try:
            for result in in_order(stream) if ordered else stream:
                if result.error is None:
                    with self._clock:  # maps of several models count from their own threads
                        self._rows_done += result.rows
                yield result
        finally:
            self._map_ended()
            dispatcher.close()
            if progress:
                progress.close()

    def _map_started(self) -> None:
        with self._clock:
            if self._maps_running == 0:
                self._busy_since = time.perf_counter()
            self._maps_running += 1

    def _map_ended(self) -> None:
        with self._clock:
            self._maps_running -= 1
            if self._maps_running == 0:
                self._seconds += time.perf_counter() - self._busy_since

    def generate(self, prompts: Any, *, ordered: bool | None = None,
                 batch_rows: int | None = None) -> Iterator[Result]:
        """Yield each batch of prompts' Result as it completes; needs a ``decode`` section in the config.

        ``prompts`` is any input ``map`` takes, with int64 rows of token ids. A
        Result's ``outputs`` are the batch's tokens, ``(rows, decode.max_new_tokens)``
        int64, ``decode.pad_token_id`` after each row's EOS. ``run(prompts)`` gives
        all of them in input order.
        """
        if self.config.decode is None:
            raise RuntimeError("generate needs a decode section in the config (decode.max_new_tokens, ...); "
                               "without one the workers run batch inference")
        return self.map(prompts, ordered=ordered, batch_rows=batch_rows)

    def run(self, inputs: Any, *, batch_rows: int | None = None, model: str | None = None) -> Any:
        """All outputs in input order, concatenated along rows (same tree as the model's outputs)."""
        results = list(self.map(inputs, ordered=True, batch_rows=batch_rows, model=model))
        skipped = [r.batch_id for r in results if r.error is not None]
        if skipped:  # errors.on_error=skip: the outputs no longer line up with the inputs row for row
            log.warning("run: %d batches failed and were skipped (ids %s%s); their rows are missing from the "
                        "outputs (map() gives each batch's id)", len(skipped), skipped[:10],
                        ", ..." if len(skipped) > 10 else "")
        outputs = [r.outputs for r in results if r.error is None]
        return concat_outputs(outputs) if outputs else None

    def _model_name(self, model: str | None) -> str:
        names = self.config.model_names
        if model is None:
            return names[0]
        if model not in names:
            raise UnknownModelError(model, names)
        return model

    def report(self) -> dict[str, Any]:
        """Throughput, per-worker figures (stage times, bound analysis), per-model totals and dispatch counters."""
        per_worker = self._ask_workers("stats")
        dispatch: dict[str, Any] = {}
        for stats in self._dispatch_stats:
            for key, value in vars(stats).items():
                dispatch[key] = dispatch.get(key, [] if isinstance(value, list) else 0) + value
        return {
            "rows": self._rows_done,
            "seconds": self._seconds,
            "rows_per_second": self._rows_done / self._seconds if self._seconds else None,
            "workers": per_worker,
            "bound": [w["bound"]["line"] for w in per_worker if "bound" in w],  # decode workers have none
            "models": _per_model(per_worker),
            "dispatch": dispatch,
            "dispatch_per_worker": self.driver_metrics.as_dict(),
            "metrics_endpoints": metrics_endpoints() if self.config.metrics.export else [],
        }

    def timeline(self) -> list[dict[str, Any]]:
        """Chrome-trace events of every worker (needs ``pipeline.timeline=True``)."""
        return [e for trace in self._ask_workers("timeline") for e in trace]

    def _ask_workers(self, method: str) -> list[Any]:
        """``method``'s answer from every live worker; one that died or does not answer in time is left out."""
        answers = []
        for worker, ref in [(w, getattr(w.actor, method).remote()) for w in self.workers if w.live]:
            try:
                answers.append(ray.get(ref, timeout=_ASK_TIMEOUT_S))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as err:
                # died or hung since the last batch; the next run notices
                log.warning("worker %s did not answer %s(): %s", worker.name, method, first_line(err))
        return answers


def _per_model(per_worker: list[dict[str, Any]]) -> dict[str, Any]:
    """Each model's rows and batches over all workers, its summed worker rates, and each worker's bound line."""
    out: dict[str, Any] = {}
    for w in per_worker:
        for name, m in w.get("models", {}).items():  # decode workers report no models
            entry = out.setdefault(name, {"rows": 0, "batches": 0, "rows_per_second": 0.0, "replicas": m["replicas"],
                                          "priority": m["priority"], "bound": []})
            entry["rows"] += m["rows"]
            entry["batches"] += m["batches"]
            entry["rows_per_second"] += m["rows_per_second"] or 0.0
            entry["bound"].append(f"{w['name']}: {m['bound']['line']}")
    return out


def _await_deaths(actors: list[Any], deadline_s: float) -> None:
    """Return once every actor is dead (``ray.kill`` is asynchronous) or the deadline passes."""
    end = time.monotonic() + deadline_s
    alive = list(actors)
    while alive and time.monotonic() < end:
        probes = {a.ping.remote(): a for a in alive}
        done, pending = ray.wait(list(probes), num_returns=len(probes), timeout=min(1.0, end - time.monotonic()))
        alive = [probes[ref] for ref in pending]
        for ref in done:
            try:
                ray.get(ref)
                alive.append(probes[ref])  # it still answers: the kill has not landed yet
            except ray.exceptions.RayActorError:
                pass
        if alive:
            time.sleep(0.05)
    if alive:
        log.warning("%d workers still alive %.0f s after being killed", len(alive), deadline_s)


def _total_rows(inputs: Any) -> int | None:
    if hasattr(inputs, "shape") and getattr(inputs, "ndim", 0) > 0:
        return int(inputs.shape[0])
    return getattr(inputs, "rows", None) if isinstance(getattr(inputs, "rows", None), int) else None


def _progress_bar(setting: bool | None, total: int | None) -> Any:
    enabled = sys.stderr.isatty() if setting is None else setting
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", unit_scale=True, desc="inference", file=sys.stderr)
