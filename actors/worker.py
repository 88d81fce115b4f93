"""The Ray actor of one GPU: a thin shell around a StreamManager and a Pipeline.

The actor is threaded: up to ``inflight`` ``infer`` calls run at once, each
submitting its batch to the pipeline and returning when that batch's D2H has
completed, so Ray hands results back in completion order. ``ping`` and
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
from typing import Any

import numpy as np
import ray
import torch

from actors.bounds import analyse, copy_ceilings
from actors.errors import BatchError, ModelError, PipelineBrokenError
from actors.models import load_model
from actors.oom import OomAbove, OomSplitter
from actors.pipeline import BatchResult, Pipeline, PipelineConfig
from actors.streams import StreamManager

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
    """Builds one model on this process's device and runs batches through the pipeline."""

    def __init__(self, name: str, model: dict[str, Any], pipeline: dict[str, Any],
                 faults: dict[str, Any] | None = None) -> None:
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
        self.streams = StreamManager(device=device)
        try:
            model = dict(model)
            torch.manual_seed(model.pop("seed", 0))
            built = load_model(model.pop("source"), **model)
            if self.faults.oom_above_rows is not None:
                built.model = OomAbove(built.model, self.faults.oom_above_rows)
            self.pipeline = Pipeline(built, self.streams, PipelineConfig(**pipeline))
            self.splitter = OomSplitter(self.pipeline, self.pipeline.config.oom_min_rows)
        except BaseException:
            self.streams.close()
            raise

    def infer(self, batch_id: int, source: Any, start: int = 0, stop: int | None = None) -> BatchResult:
        """Run one batch; returns when its outputs are back in host memory."""
        try:
            self.faults.before(batch_id)
            return self.splitter.run(batch_id, resolve_rows(source, start, stop))
        except PipelineBrokenError:
            # The CUDA context is poisoned; only a fresh process recovers. Ray restarts
            # the actor within its budget and the driver re-dispatches this batch.
            log.error("worker %s: device failure, exiting so Ray restarts the worker", self.name)
            os._exit(1)
        except BatchError as err:
            raise type(err)(err.batch_id, err.problem, self.name) from err

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ping(self) -> dict[str, Any]:
        return {"name": self.name, "node": socket.gethostname(), "node_id": self.node_id, "pid": os.getpid(),
                "device": str(self.streams.device), "gpu_ids": self.gpu_ids, "broken": self.pipeline.broken,
                "model": self.pipeline.name, "input_dtype": self.pipeline.spec.dtype,
                "input_shape": list(self.pipeline.spec.row_shape)}

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stats(self) -> dict[str, Any]:
        """Counters, per-stage times, the bound analysis and device memory of this worker."""
        stats = self.pipeline.stats
        out = {"name": self.name, "device": str(self.streams.device), **stats.as_dict(),
               "bound": analyse(stats, copy_ceilings(self.streams.device)).as_dict(),
               "graphs": self.pipeline.graphs.stats.as_dict(), "oom": self.splitter.stats()}
        if self.streams.is_cuda:
            out["gpu_memory_allocated_bytes"] = torch.cuda.memory_allocated(self.streams.device)
            out["gpu_memory_reserved_bytes"] = torch.cuda.memory_reserved(self.streams.device)
        return out

    @ray.method(concurrency_group=CONTROL_GROUP)
    def timeline(self) -> list[dict[str, Any]]:
        return self.pipeline.timeline.chrome_trace(self.name) if self.pipeline.timeline else []

    def close(self) -> None:
        self.pipeline.close()
        self.streams.close()


# The Ray actor class. The driver sets max_concurrency (batches in flight), resources and
# restarts per run with ``.options``; control calls get their own two threads.
RemoteGpuWorker = ray.remote(concurrency_groups={CONTROL_GROUP: 2})(GpuWorker)
