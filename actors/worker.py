"""The Ray actor of one GPU: a thin shell around a StreamManager and its named models (``Engines``).

The actor is threaded: up to ``inflight`` ``infer`` calls run at once, each
submitting its batch to its model's engine and returning when that batch's D2H
has completed, so Ray hands results back in completion order. Calls for
different models share no lock (``actors.engines``). ``ping`` and
``stats`` live in their own concurrency group so that a health check never
queues behind a batch. Constructor arguments are plain values (ray#53727).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from functools import lru_cache
from typing import Any, NoReturn

import numpy as np
import ray
import torch

from actors.bounds import copy_ceilings
from actors.engines import EngineSpec, Engines, streams_needed
from actors.errors import BatchError, InputError, ModelError, PipelineBrokenError, UnknownModelError
from actors.oom import OomAbove, OomSplitter
from actors.pinning import pinned_in_place_stats
from actors.pipeline import BatchResult, PipelineConfig
from actors.streams import StreamManager
from actors.telemetry import GpuTelemetry

log = logging.getLogger(__name__)

CONTROL_GROUP = "control"


class _Faults:
    """Injected faults (see orchestrator.config.FaultConfig); all off by default."""

    def __init__(self, delay_s: float = 0.0, raise_on_batches: list[int] | None = None,
                 exit_after_batches: int | None = None, exit_on_batches: list[int] | None = None,
                 oom_above_rows: int | None = None) -> None:
        self.delay_s = delay_s
        self.raise_on = set(raise_on_batches or ())
        self.exit_after = exit_after_batches
        self.exit_on = set(exit_on_batches or ())
        self.oom_above_rows = oom_above_rows
        self.seen = 0
        self._lock = threading.Lock()

    def before(self, batch_id: int) -> None:
        with self._lock:
            self.seen += 1
            if (self.exit_after is not None and self.seen > self.exit_after) or batch_id in self.exit_on:
                log.error("fault injection: worker exits before batch %d", batch_id)
                os._exit(1)
        if self.delay_s:
            time.sleep(self.delay_s)
        if batch_id in self.raise_on:
            raise ModelError(batch_id, "fault injection: the model raised")


def exit_for_restart(worker: str) -> NoReturn:
    """End the process after a device failure: the CUDA context is poisoned and only a fresh one recovers.

    Ray restarts the actor within its budget and the driver sends the batch again.
    """
    log.error("worker %s: device failure, exiting so Ray restarts the worker", worker)
    os._exit(1)


@lru_cache(maxsize=8)
def _memmap(path: str) -> np.ndarray:
    """One read-only memory map per .npy file per worker process."""
    return np.load(path, mmap_mode="r")


def resolve_rows(source: Any, start: int, stop: int | None) -> np.ndarray | torch.Tensor:
    """The rows ``[start, stop)`` of an in-memory array, a tensor, or a ``.npy`` path (memory-mapped)."""
    if isinstance(source, str):
        source = _memmap(source)
    return source[start:stop]


class GpuWorker:
    """Builds its models on this process's device and runs each batch through its model's engine.

    ``models`` holds one ``EngineSpec`` as a dict per model (``RunConfig.engine_specs``); the first is the default.
    ``metrics_sample_s``: record Prometheus metrics this often (``orchestrator.metrics``); None: never.
    """

    def __init__(self, name: str, models: list[dict[str, Any]], pipeline: dict[str, Any],
                 faults: dict[str, Any] | None = None, metrics_sample_s: float | None = None) -> None:
        self.name = name
        self.faults = _Faults(**(faults or {}))
        gpu_ids = ray.get_gpu_ids() if ray.is_initialized() else []
        if torch.cuda.is_available():
            from torch.backends import cudnn  # imported here: the actor class must pickle

            cudnn.benchmark = True  # batch shapes repeat: autotuned convolutions pay off after one batch
            device = torch.device("cuda", 0)  # Ray narrows CUDA_VISIBLE_DEVICES to this worker's GPU
        else:
            device = torch.device("cpu")
            log.warning("worker %s: no CUDA device visible; running on the CPU backend", name)
        self.gpu_ids = [str(g) for g in gpu_ids]
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        specs = [EngineSpec(**m) for m in models]
        self.streams = StreamManager(max_streams=streams_needed([s.replicas for s in specs]), device=device)
        try:
            config = PipelineConfig(**pipeline)
            limit = self.faults.oom_above_rows
            self.engines = Engines(specs, self.streams, config,
                                   wrap_model=(lambda m: OomAbove(m, limit)) if limit is not None else None)
            self.splitters = {e.name: OomSplitter(e, config.oom_min_rows) for e in self.engines}
        except BaseException:
            self.streams.close()
            raise
        self.telemetry = GpuTelemetry(device)
        self.metrics = None
        if metrics_sample_s:
            try:
                self.metrics = self._start_metrics(metrics_sample_s)
            except BaseException:
                self.close()
                raise

    def _start_metrics(self, sample_s: float) -> Any:
        # Imported here: the orchestrator package imports this module.
        from orchestrator.metrics import WorkerMetrics

        # Copy ceilings are measured now, before any batch, not by the sampler in the middle of the run.
        return WorkerMetrics(self.ping(), self.engines, self.telemetry,
                             copy_ceilings(self.streams.device), sample_s)

    def infer(self, batch_id: int, source: Any, start: int = 0, stop: int | None = None,
              model: str | None = None) -> BatchResult:
        """Run one batch on ``model`` (None: the default); returns when its outputs are back in host memory."""
        try:
            self.faults.before(batch_id)
            try:
                engine = self.engines.get(model)
            except UnknownModelError as err:
                raise InputError(batch_id, str(err)) from err
            return self.splitters[engine.name].run(batch_id, resolve_rows(source, start, stop))
        except PipelineBrokenError:
            exit_for_restart(self.name)
        except BatchError as err:
            raise type(err)(err.batch_id, err.problem, self.name) from err

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ping(self) -> dict[str, Any]:
        """Identity and health; ``models`` maps each model's name to its input row; the top-level
        ``model``/``input_*`` keys describe the default model."""
        models = {e.name: e.info() for e in self.engines}
        return {"name": self.name, "node": socket.gethostname(), "node_id": self.node_id, "pid": os.getpid(),
                "device": str(self.streams.device), "gpu_ids": self.gpu_ids, "broken": self.engines.broken,
                **{k: models[self.engines.default][k] for k in ("model", "input_dtype", "input_shape")},
                "models": models}

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stats(self) -> dict[str, Any]:
        """Counters, per-stage times, the bound analysis and device memory of this worker, all models
        together; ``models`` has the same per model."""
        out = {"name": self.name, "device": str(self.streams.device), **self.engines.report(),
               "telemetry": self.telemetry.read().as_dict(), "pinned_in_place": pinned_in_place_stats(),
               "oom": {"splits": sum(s.splits for s in self.splitters.values()),
                       "min_rows": next(iter(self.splitters.values())).min_rows}}
        if self.streams.is_cuda:
            out["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(self.streams.device)
            out["gpu_memory_reserved_bytes"] = torch.cuda.memory_reserved(self.streams.device)
        return out

    @ray.method(concurrency_group=CONTROL_GROUP)
    def timeline(self) -> list[dict[str, Any]]:
        return [e for engine in self.engines for e in engine.timeline(self.name)]

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.engines.close()
        self.streams.close()


# The Ray actor class. The driver sets max_concurrency (batches in flight), resources and
# restarts per run with ``.options``; control calls get their own two threads.
RemoteGpuWorker = ray.remote(concurrency_groups={CONTROL_GROUP: 2})(GpuWorker)
