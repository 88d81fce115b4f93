"""Several named models in one process: engines, their replicas on prioritised streams, routing and stats.

An ``Engine`` is one named model and N replica pipelines. The replicas share
the model's weights and one H2D stream; each has its own compute stream and
its own D2H stream, all at the model's priority (LOW / NORMAL / HIGH through
the StreamManager). Own compute streams let the replicas' kernels, and those of
different models, run side by side; an own D2H stream means a replica's
copy-out waits only on its own compute (a shared one would queue it behind the
other replicas' compute). H2D copies wait on nothing, so sharing that stream
costs no concurrency: a model with N replicas uses ``2 N + 1`` streams.

A batch goes to the replica with the fewest batches in flight; the engine's
lock covers only that choice, and each pipeline's own lock only its own
enqueue, so threads feeding different models (or replicas) never wait for one
another's batches. Stream priority orders kernels on the device; copies run on
the copy engines in arrival order whatever their stream's priority.

``Engines`` holds a worker's engines by name, builds them in order (each
checked against the device memory left, ``actors.memory``) and releases
everything it built on every path.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from actors.bounds import analyse, copy_ceilings
from actors.errors import UnknownModelError
from actors.graphs import GraphStats
from actors.memory import MemoryNeed, fit_model
from actors.models import BuiltModel, load_model
from actors.pipeline import BatchResult, Pipeline, PipelineConfig, PipelineStats, PipelineStreams, add_spell
from actors.streams import Stream, StreamManager, StreamPriority

DEFAULT_MODEL = "default"  # the name of a run's only model when the config has a single ``model:`` section


def streams_needed(replicas: Sequence[int]) -> int:
    """User streams a worker needs for models with these replica counts: ``2 N + 1`` per model."""
    return sum(2 * n + 1 for n in replicas)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """One model of a worker, as plain values (they cross the Ray boundary).

    ``model`` holds ``load_model``'s arguments plus ``source`` and ``seed``.
    """

    name: str
    model: dict[str, Any]
    replicas: int = 1
    priority: str = "normal"  # low | normal | high

    def __post_init__(self) -> None:
        if not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"model {self.name!r}: replicas must be an int >= 1, got {self.replicas!r}")
        if self.priority not in ("low", "normal", "high"):
            raise ValueError(f"model {self.name!r}: priority must be low, normal or high, got {self.priority!r}")


def build_model(model: dict[str, Any]) -> BuiltModel:
    """Seed torch, then build on the CPU what ``model`` (``source``, ``seed`` and ``load_model`` options) names."""
    options = dict(model)
    torch.manual_seed(options.pop("seed", 0))
    return load_model(options.pop("source"), **options)


class Engine:
    """One named model with ``spec.replicas`` pipelines on its own streams; ``submit`` is thread-safe."""

    def __init__(self, spec: EngineSpec, streams: StreamManager, config: PipelineConfig,
                 wrap_model: Callable[[Any], Any] | None = None) -> None:
        """``wrap_model`` replaces the built model (fault injection: ``actors.oom.OomAbove``)."""
        self.spec = spec
        self.name = spec.name
        self.priority = StreamPriority[spec.priority.upper()]
        self._streams = streams
        self._owned: list[Stream] = []
        self.replicas: list[Pipeline] = []
        built = build_model(spec.model)
        self.source, self.model_name = spec.model["source"], built.name
        self.input_spec = built.input_spec
        self.memory: MemoryNeed = fit_model(spec.name, built, config, spec.replicas, streams.device)
        if wrap_model is not None:  # after the memory probe, which runs a full batch: a fault there stops the start
            built.model = wrap_model(built.model)
        try:
            h2d = self._new_stream()
            for _ in range(spec.replicas):
                lanes = PipelineStreams(compute=self._new_stream(), h2d=h2d, d2h=self._new_stream())
                self.replicas.append(Pipeline(built, streams, config, lanes))
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._busy = [0] * len(self.replicas)
        # One bound callback per replica, made once: nothing is allocated per batch for it.
        self._on_done = [functools.partial(self._done, i) for i in range(len(self.replicas))]

    def _new_stream(self) -> Stream:
        stream = self._streams.create_stream(self.priority)
        self._owned.append(stream)
        return stream

    # -- per batch (hot path) -------------------------------------------------------------------
    def submit(self, batch_id: int, array: np.ndarray | torch.Tensor) -> concurrent.futures.Future[BatchResult]:
        """Hand a batch to the least-busy replica; same contract as ``Pipeline.submit``."""
        with self._lock:
            i = min(range(len(self._busy)), key=self._busy.__getitem__)
            self._busy[i] += 1
        try:
            future = self.replicas[i].submit(batch_id, array)
        except BaseException:
            self._done(i)
            raise
        future.add_done_callback(self._on_done[i])
        return future

    def _done(self, replica: int, _future: concurrent.futures.Future | None = None) -> None:
        with self._lock:
            self._busy[replica] -= 1

    # -- reporting --------------------------------------------------------------------------------
    @property
    def broken(self) -> str | None:
        return next((p.broken for p in self.replicas if p.broken), None)

    def info(self) -> dict[str, Any]:
        """What the driver needs to feed this model: its source, input row and set-up."""
        return {"model": self.model_name, "source": self.source, "input_dtype": self.input_spec.dtype,
                "input_shape": list(self.input_spec.row_shape), "replicas": len(self.replicas),
                "priority": self.spec.priority, "memory": self.memory.as_dict()}

    def report(self) -> dict[str, Any]:
        """Counters, stage times and bound over all replicas, plus graph stats and the memory plan."""
        return {**_report([p.stats for p in self.replicas], [p.graphs.stats for p in self.replicas],
                          self._streams.device),
                "replicas": len(self.replicas), "priority": self.spec.priority, "memory": self.memory.as_dict()}

    def timeline(self, process: str) -> list[dict[str, Any]]:
        """Chrome-trace events of every replica with a timeline, one trace process per replica."""
        return [e for i, p in enumerate(self.replicas) if p.timeline
                for e in p.timeline.chrome_trace(f"{process}/{self.name}#{i}")]

    # -- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close every replica (in-flight batches finish), then destroy this engine's streams. Idempotent."""
        for pipeline in self.replicas:
            pipeline.close()
        for stream in self._owned:
            self._streams.destroy_stream(stream)
        self._owned = []


class Engines:
    """A worker's engines by name; the first is the default. Built in order; closes what it built on failure."""

    def __init__(self, specs: Sequence[EngineSpec], streams: StreamManager, config: PipelineConfig,
                 wrap_model: Callable[[Any], Any] | None = None) -> None:
        if not specs:
            raise ValueError("Engines needs at least one model")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        self._engines: dict[str, Engine] = {}
        try:
            for spec in specs:
                self._engines[spec.name] = Engine(spec, streams, config, wrap_model)
        except BaseException:
            self.close()
            raise
        self.default = names[0]
        self.device = streams.device

    @property
    def names(self) -> list[str]:
        return list(self._engines)

    def get(self, name: str | None = None) -> Engine:
        """The engine named ``name`` (the default one for None); ``UnknownModelError`` lists the known names."""
        engine = self._engines.get(self.default if name is None else name)
        if engine is None:
            raise UnknownModelError(name, self.names)
        return engine

    def __iter__(self):
        return iter(self._engines.values())

    @property
    def broken(self) -> str | None:
        return next((e.broken for e in self if e.broken), None)

    @property
    def pipelines(self) -> list[Pipeline]:
        """Every replica of every model."""
        return [p for e in self for p in e.replicas]

    def report(self) -> dict[str, Any]:
        """All models together (same keys as one pipeline's report), and ``models``: each model's own."""
        pipelines = self.pipelines
        return {**_report([p.stats for p in pipelines], [p.graphs.stats for p in pipelines], self.device),
                "models": {e.name: e.report() for e in self}}

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines = {}


# -- merging the stats of several pipelines ---------------------------------------------------------

def merge_stats(stats: Sequence[PipelineStats]) -> PipelineStats:
    """One PipelineStats over pipelines that ran side by side: counters summed, busy spells their union.

    Stage times are combined so that each stage's capacity (timed rows per
    second of stage time) is the sum of the pipelines' capacities, as the
    pipelines run at once: the bound analysis then compares the achieved rate
    with what the stage sustains in all of them together. One pipeline's stats
    come back unchanged.
    """
    merged = PipelineStats()
    for s in stats:
        for field in ("batches", "rows", "bytes_in", "bytes_out", "timed_batches", "timed_rows"):
            setattr(merged, field, getattr(merged, field) + getattr(s, field))
    for stage in merged.stage_ms_total:
        capacity = sum(s.timed_rows / s.stage_ms_total[stage] for s in stats if s.stage_ms_total[stage] > 0)
        merged.stage_ms_total[stage] = merged.timed_rows / capacity if capacity else 0.0
    for start, end in sorted(spell for s in stats for spell in list(s.busy)):
        add_spell(merged.busy, start, end)
    return merged


def merge_graph_stats(stats: Sequence[GraphStats]) -> dict[str, Any]:
    """Graph stats summed over pipelines; buckets of the first, fallback reasons of all (once each)."""
    out = GraphStats(enabled=any(s.enabled for s in stats), buckets=list(stats[0].buckets) if stats else [])
    for s in stats:
        for field in ("captured", "capture_seconds", "graph_memory_bytes", "replays", "eager_batches"):
            setattr(out, field, getattr(out, field) + getattr(s, field))
        out.fallback_reasons += [r for r in s.fallback_reasons if r not in out.fallback_reasons]
    return out.as_dict()


def _report(stats: Sequence[PipelineStats], graphs: Sequence[GraphStats], device: torch.device) -> dict[str, Any]:
    merged = merge_stats(stats)
    return {**merged.as_dict(), "bound": analyse(merged, copy_ceilings(device)).as_dict(),
            "graphs": merge_graph_stats(graphs)}
