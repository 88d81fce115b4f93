"""The per-device pipeline: pinned staging, H2D, compute and D2H on their own streams.

A ring of ``depth`` slots, each owning its pinned host input, device input and
pinned host outputs. ``submit`` validates a batch, stages it into the next free
slot (or, when its memory can be pinned in place, copies straight from it:
``actors.pinning``), and enqueues H2D -> compute -> D2H, chained by events, without blocking
on the device. A completion thread waits on each batch's ``d2h_done`` event in
submission order (``Event.synchronize`` releases the GIL, so the other threads
run meanwhile; CUDA's default scheduling spins that thread's core while it
waits), copies the outputs out of the slot, frees the slot and resolves the
batch's future. Batch n+1 copies in while batch n computes and batch n-1 copies out.

Allocator safety: the device input is owned by the slot; model outputs are
allocated on the compute stream and read by the D2H stream, so each is marked
with ``record_stream`` and the caching allocator keeps its memory until the
D2H copy has finished. With CUDA graphs on, compute replays a graph captured
against the slot's own buffers instead (``actors.graphs``).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from actors.errors import (BatchError, DeviceMemoryError, InputError, ModelError, PipelineBrokenError, first_line,
                           one_line)
from actors.graphs import GraphConfig, GraphRunner, buckets_for
from actors.models import BuiltModel
from actors.pinning import shared_pinner
from actors.streams import D2H, H2D, Stream, StreamManager

log = logging.getLogger(__name__)

# Below this many bytes one thread stages the batch: splitting costs more than it saves.
_PARALLEL_STAGING_BYTES = 4 << 20
_STAGES = ("stage", "h2d", "compute", "d2h")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    depth: int = 3
    max_batch_rows: int = 256
    staging_threads: int = 8  # host copies in and out of pinned slots; 8 kept an H100 busy (docs/results)
    check_finite: bool = False
    timing_every: int = 16  # time one batch in this many with CUDA events (0: never)
    timeline: bool = False  # keep per-batch spans for a Chrome-trace timeline (timed batches only)
    graphs: GraphConfig = dataclasses.field(default_factory=GraphConfig)  # CUDA graphs for compute (actors.graphs)
    pin_in_place_gb: float = 16.0  # host memory registered in place for zero-copy H2D (actors.pinning); 0: stage
    oom_min_rows: int = 1  # a batch out of device memory is halved while both halves keep this many rows (actors.oom)


    def __post_init__(self) -> None:
        for name, low in (("depth", 1), ("max_batch_rows", 1), ("staging_threads", 1), ("timing_every", 0),
                          ("oom_min_rows", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ValueError(f"PipelineConfig.{name} must be an int >= {low}, got {value!r}")
        if not isinstance(self.pin_in_place_gb, (int, float)) or self.pin_in_place_gb < 0:
            raise ValueError(f"PipelineConfig.pin_in_place_gb must be a number >= 0, got {self.pin_in_place_gb!r}")
        # A mapping arrives from YAML and across the Ray boundary, where configs travel as plain values.
        try:
            graphs = GraphConfig(**self.graphs) if isinstance(self.graphs, Mapping) else self.graphs
        except TypeError as err:
            raise ValueError(f"PipelineConfig.graphs: {err}") from err
        if not isinstance(graphs, GraphConfig):
            raise ValueError(f"PipelineConfig.graphs must be a GraphConfig or a mapping, got {self.graphs!r}")
        object.__setattr__(self, "graphs", graphs)
        try:
            buckets_for(self.max_batch_rows, graphs.buckets)
        except ValueError as err:
            raise ValueError(f"PipelineConfig.graphs.buckets: {err}") from err


@dataclasses.dataclass(frozen=True)
class PipelineStreams:
    """The three streams one pipeline runs on, all from one StreamManager.

    By default a pipeline takes the manager's built-ins (compute HIGH, copies
    NORMAL). Several pipelines in one process (``actors.engines``) each get their
    own compute and D2H streams, so their kernels run side by side and each
    replica's copy-out waits only on its own compute.
    """

    compute: Stream
    h2d: Stream
    d2h: Stream

    @classmethod
    def builtin(cls, streams: StreamManager) -> PipelineStreams:
        return cls(streams.get_compute_stream(), streams.get_copy_stream(H2D), streams.get_copy_stream(D2H))


@dataclasses.dataclass
class BatchResult:
    """One finished batch: outputs as numpy arrays (same tree as the model's), owned by the caller."""

    batch_id: int
    rows: int
    outputs: Any
    stage_ms: dict[str, float] | None = None  # per-stage times when this batch was timed


# -- output trees: a tensor, or tuples/lists/dicts of them ------------------------------------

def concat_outputs(parts: list[Any]) -> Any:
    """Concatenate output trees of numpy arrays (tuples, lists or dicts of them) along rows."""
    first = parts[0]
    if isinstance(first, np.ndarray):
        return np.concatenate(parts)
    if isinstance(first, dict):
        return {k: concat_outputs([p[k] for p in parts]) for k in first}
    return _sequence(type(first), [concat_outputs(list(leaves)) for leaves in zip(*parts)])


def _sequence(kind: type, items: list[Any]) -> Any:
    """A tuple, list or namedtuple of ``kind`` holding ``items`` (a namedtuple takes them as arguments)."""
    return kind(*items) if hasattr(kind, "_fields") else kind(items)


def _flatten(obj: Any, path: str = "output") -> tuple[list[torch.Tensor], Any]:
    if isinstance(obj, torch.Tensor):
        return [obj], None
    if isinstance(obj, (tuple, list)):
        leaves, specs = [], []
        for i, item in enumerate(obj):
            sub, spec = _flatten(item, f"{path}[{i}]")
            leaves += sub
            specs.append((len(sub), spec))
        return leaves, (type(obj), specs)
    if isinstance(obj, dict):
        leaves, specs = [], []
        for key, item in obj.items():
            sub, spec = _flatten(item, f"{path}[{key!r}]")
            leaves += sub
            specs.append((key, len(sub), spec))
        return leaves, (dict, specs)
    raise TypeError(f"{path}: model outputs must be tensors, tuples, lists or dicts of tensors, got {type(obj).__name__}")


def _unflatten(spec: Any, leaves: list[Any]) -> Any:
    if spec is None:
        return leaves[0]
    kind, parts = spec
    if kind is dict:
        out, i = {}, 0
        for key, count, sub in parts:
            out[key] = _unflatten(sub, leaves[i:i + count])
            i += count
        return out
    items, i = [], 0
    for count, sub in parts:
        items.append(_unflatten(sub, leaves[i:i + count]))
        i += count
    return _sequence(kind, items)


class _Slot:
    """One ring slot: the buffers and events one batch owns from staging to completion."""

    def __init__(self, index: int, host_in: torch.Tensor, dev_in: torch.Tensor,
                 host_out: list[torch.Tensor], streams: StreamManager) -> None:
        self.index = index
        self.host_in, self.dev_in, self.host_out = host_in, dev_in, host_out
        self.host_in_np = host_in.numpy()
        self.dev_in_bytes = dev_in.view(-1).view(torch.uint8)  # target of copies from memory pinned in place
        self.host_out_np = [t.numpy() for t in host_out]
        ev = lambda: streams.create_event(enable_timing=True)  # noqa: E731
        self.h2d_start, self.h2d_done = ev(), ev()
        self.compute_start, self.compute_done = ev(), ev()
        self.d2h_start, self.d2h_done = ev(), ev()


@dataclasses.dataclass
class _InFlight:
    slot: _Slot
    batch_id: int
    rows: int
    future: concurrent.futures.Future
    timed: bool
    stage_ms: float
    stage_start: float
    source: np.ndarray  # held until completion: a copy may read it in place until then


class Pipeline:
    """Runs one model on one device over a ring of slots; usable without Ray.

    ``submit`` is thread-safe and returns a future per batch; it blocks only
    while every slot is in flight. ``close`` waits for in-flight batches, stops
    the completion thread and drops the slots' pinned and device buffers.
    """

    def __init__(self, built: BuiltModel, streams: StreamManager, config: PipelineConfig | None = None,
                 lanes: PipelineStreams | None = None) -> None:
        self.config = config or PipelineConfig()
        self.streams = streams
        self.device = streams.device
        self.name = built.name
        self.spec = built.input_spec
        self._in_dtype = np.dtype(self.spec.dtype)
        self._row_shape = tuple(self.spec.row_shape)
        self._compute_fn = self._eager_compute
        self._built = built.to(self.device)
        lanes = lanes or PipelineStreams.builtin(streams)
        self._h2d, self._compute, self._d2h = lanes.h2d, lanes.compute, lanes.d2h
        self._submit_lock = threading.Lock()
        self._inflight: queue.Queue[_InFlight | None] = queue.Queue()
        self._counter = itertools.count()
        self._closed = False
        self._broken: str | None = None
        self.stats = PipelineStats()
        self._out_spec, out_rows = self._probe_outputs()
        self._slots = [self._make_slot(i, out_rows) for i in range(self.config.depth)]
        self.graphs = GraphRunner(self.config.graphs, streams, self._slots, self.config.max_batch_rows,
                                  self._run_model, self._eager_compute, self.name, self._compute)
        if self.config.graphs.enabled:
            self._compute_fn = self.graphs.compute
        self._free = threading.Semaphore(self.config.depth)
        self._cursor = 0
        self._staging = concurrent.futures.ThreadPoolExecutor(self.config.staging_threads, thread_name_prefix="staging")
        pin_budget = int(self.config.pin_in_place_gb * (1 << 30))
        self.pinner = shared_pinner(pin_budget) if streams.is_cuda and pin_budget else None
        self.timeline = _Timeline(streams, self._compute) if self.config.timeline else None
        self._completion = threading.Thread(target=self._complete_loop, name=f"completion-{self.name}", daemon=True)
        self._completion.start()

    # -- set-up ---------------------------------------------------------------------------------
    def _random_rows(self, rows: int) -> torch.Tensor:
        shape = (rows, *self.spec.row_shape)
        if self._in_dtype.kind in "ui":
            info = np.iinfo(self._in_dtype)
            arr = np.random.default_rng(0).integers(max(info.min, -128), min(info.max, 127) + 1, shape, dtype=self._in_dtype)
        else:
            arr = np.random.default_rng(0).standard_normal(shape).astype(self._in_dtype)
        return torch.from_numpy(arr).to(self.device)

    def _probe_outputs(self) -> tuple[Any, list[tuple[tuple[int, ...], torch.dtype]]]:
        """Run the model once on random rows to learn the output tree and row shapes."""
        rows = min(2, self.config.max_batch_rows)
        try:
            with torch.inference_mode():
                leaves, spec = _flatten(self._run_model(self._random_rows(rows)))
        except Exception as err:  # a broken model: say which, since a worker may host several
            raise ModelError(-1, f"model {self.name!r} failed its start-up run on {rows} random rows: "
                                 f"{type(err).__name__}: {err}") from err
        shapes = []
        for i, leaf in enumerate(leaves):
            if leaf.dim() == 0 or leaf.shape[0] != rows:
                raise ModelError(-1, f"model {self.name!r}: output leaf {i} has shape {tuple(leaf.shape)}; "
                                     f"every output must have the batch's rows ({rows}) as its first dimension")
            shapes.append((tuple(leaf.shape[1:]), leaf.dtype))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return spec, shapes

    def _make_slot(self, index: int, out_rows: list[tuple[tuple[int, ...], torch.dtype]]) -> _Slot:
        n = self.config.max_batch_rows
        pin = self.device.type == "cuda"
        in_dtype = torch.from_numpy(np.empty(0, self._in_dtype)).dtype
        host_in = torch.empty((n, *self.spec.row_shape), dtype=in_dtype, pin_memory=pin)
        dev_in = torch.empty_like(host_in, device=self.device) if pin else host_in
        host_out = [torch.empty((n, *shape), dtype=dtype, pin_memory=pin) for shape, dtype in out_rows]
        return _Slot(index, host_in, dev_in, host_out, self.streams)

    def _run_model(self, x: torch.Tensor) -> Any:
        return self._built.run(x)

    # -- per batch (hot path) -------------------------------------------------------------------
    def validate(self, batch_id: int, array: np.ndarray | torch.Tensor) -> np.ndarray:
        """Check a batch against the model's input spec; return it as a numpy array. No device work."""
        if isinstance(array, torch.Tensor):
            if array.device.type != "cpu":
                raise InputError(batch_id, f"expected a host array, got a tensor on {array.device}")
            array = array.numpy()
        elif not isinstance(array, np.ndarray):
            raise InputError(batch_id, f"expected a numpy array or torch tensor, got {type(array).__name__}")
        if array.dtype != self._in_dtype or array.shape[1:] != self._row_shape or array.ndim == 0:
            expected = f"{self._in_dtype.name} (N, {', '.join(map(str, self._row_shape))})"
            raise InputError(batch_id, f"expected {expected}, got {array.dtype.name} {tuple(array.shape)}")
        rows = array.shape[0]
        if rows == 0:
            raise InputError(batch_id, "empty batch (0 rows)")
        if rows > self.config.max_batch_rows:
            raise InputError(batch_id, f"{rows} rows exceed max_batch_rows={self.config.max_batch_rows}")
        if self.config.check_finite and self._in_dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).reshape(rows, -1).any(axis=1).argmax())
            raise InputError(batch_id, f"non-finite values (first in row {bad})")
        return array

    def submit(self, batch_id: int, array: np.ndarray | torch.Tensor) -> concurrent.futures.Future[BatchResult]:
        """Validate, stage and enqueue one batch; the future resolves when its D2H completes.

        Raises ``InputError`` (before any device work) or ``ModelError`` (the model
        raised while enqueuing); either way the pipeline stays usable.
        """
        array = self.validate(batch_id, array)
        if self._broken:
            raise PipelineBrokenError(self._broken)
        if self._closed:
            raise RuntimeError(f"pipeline {self.name!r} is closed")
        rows = array.shape[0]
        self._free.acquire()
        with self._submit_lock:
            if self._closed:  # closed while this batch waited for a slot
                self._free.release()
                raise RuntimeError(f"pipeline {self.name!r} is closed")
            slot = self._slots[self._cursor]
            try:
                item = self._enqueue(slot, batch_id, array, rows)
            except BaseException as err:
                self._settle_failed_enqueue(slot, batch_id, err)
                raise
            self._cursor = (self._cursor + 1) % len(self._slots)
            # Inside the lock: the completion thread must see batches in slot order, or it
            # frees a later slot first and the ring hands out a slot still in flight.
            self._inflight.put(item)
        return item.future

    def _settle_failed_enqueue(self, slot: _Slot, batch_id: int, err: BaseException) -> None:
        """Free the slot of a batch whose enqueue raised; a device failure breaks the pipeline.

        The slot's H2D may still be reading its pinned input, and kernels the model
        enqueued before it raised may still be reading the slot's device input: both
        finish before the next batch writes there. Those waits also tell a batch's own
        error from a device failure: after a sticky CUDA error (a device-side assert,
        an illegal address; it may have come from an earlier batch or another stream)
        every wait fails, and the batch goes back as ``PipelineBrokenError``, like the
        batches in flight, not as a ``ModelError`` of its own.
        """
        try:
            slot.h2d_done.synchronize()
            slot.compute_done.record(self._compute)
            slot.compute_done.synchronize()
        except Exception as sync_err:
            raise self._break(batch_id, sync_err) from err
        finally:
            self._free.release()

    def _break(self, batch_id: int, err: BaseException) -> PipelineBrokenError:
        """Mark the pipeline unusable after a device failure seen on ``batch_id``; the error to raise."""
        self._broken = self._broken or one_line(err)
        log.error("pipeline %s: device failure on batch %s: %s", self.name, batch_id, err)
        return PipelineBrokenError(self._broken)

    def _enqueue(self, slot: _Slot, batch_id: int, array: np.ndarray, rows: int) -> _InFlight:
        timed = self.config.timing_every > 0 and next(self._counter) % self.config.timing_every == 0
        t0 = time.perf_counter()
        in_place = self.pinner.pieces(array, id(self)) if self.pinner is not None else None
        if in_place is None:
            self._copy_rows(slot.host_in_np[:rows], array)
        t1 = time.perf_counter()
        streams = self.streams
        if timed:
            slot.h2d_start.record(self._h2d)
        try:
            if in_place is not None:
                with streams.use(self._h2d):
                    offset = 0
                    for piece in in_place:
                        slot.dev_in_bytes[offset:offset + piece.numel()].copy_(piece, non_blocking=True)
                        offset += piece.numel()
            elif slot.dev_in is not slot.host_in:
                with streams.use(self._h2d):
                    slot.dev_in[:rows].copy_(slot.host_in[:rows], non_blocking=True)
        finally:  # after whatever copies were enqueued, errors included: the region may not go before them
            slot.h2d_done.record(self._h2d)
            if in_place is not None:
                self.pinner.fenced(id(self), slot.h2d_done)
        self._compute.wait_event(slot.h2d_done)
        if timed:
            slot.compute_start.record(self._compute)
        try:
            with streams.use(self._compute), torch.inference_mode():
                leaves, spec = _flatten(self._compute_fn(slot, rows))
        except torch.OutOfMemoryError as err:
            raise DeviceMemoryError(batch_id, f"model {self.name!r} ran out of device memory at {rows} rows: "
                                              f"{first_line(err)}") from err
        except Exception as err:
            raise ModelError(batch_id, f"model {self.name!r} raised {type(err).__name__}: {err}") from err
        if spec != self._out_spec or len(leaves) != len(slot.host_out):
            raise ModelError(batch_id, f"model {self.name!r} returned a different output structure than at start-up")
        for i, (leaf, host) in enumerate(zip(leaves, slot.host_out)):
            if leaf.shape[:1] != (rows,) or leaf.shape[1:] != host.shape[1:]:
                raise ModelError(batch_id, f"model {self.name!r} output {i} has shape {tuple(leaf.shape)} for {rows} "
                                           f"rows; expected ({rows}, {', '.join(map(str, host.shape[1:]))})")
        slot.compute_done.record(self._compute)
        self._d2h.wait_event(slot.compute_done)
        if timed:
            slot.d2h_start.record(self._d2h)
        with streams.use(self._d2h):
            for leaf, host in zip(leaves, slot.host_out):
                host[:rows].copy_(leaf, non_blocking=True)
                if streams.is_cuda:
                    leaf.record_stream(self._d2h)
        slot.d2h_done.record(self._d2h)
        return _InFlight(slot, batch_id, rows, concurrent.futures.Future(), timed, (t1 - t0) * 1e3, t0, array)

    def _eager_compute(self, slot: _Slot, rows: int) -> Any:
        return self._run_model(slot.dev_in[:rows])

    def _copy_rows(self, dst: np.ndarray, src: np.ndarray) -> None:
        """Copy host rows (pageable <-> pinned), split across the staging threads when large.

        ``np.copyto`` releases the GIL, so the chunks really run in parallel.
        """
        rows = src.shape[0]
        if src.nbytes < _PARALLEL_STAGING_BYTES or self.config.staging_threads == 1:
            np.copyto(dst, src)
            return
        bounds = np.linspace(0, rows, self.config.staging_threads + 1, dtype=int)
        chunks = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        list(self._staging.map(lambda ab: np.copyto(dst[ab[0]:ab[1]], src[ab[0]:ab[1]]), chunks))

    # -- completion -------------------------------------------------------------------------------
    def _complete_loop(self) -> None:
        """End every in-flight batch in slot order: free its slot and settle its future, whatever happens.

        Nothing may escape: with this thread gone, every later batch would wait forever.
        """
        while (item := self._inflight.get()) is not None:
            try:
                outcome: BatchResult | Exception = self._finish(item)
            except Exception as err:
                outcome = err
            self._free.release()
            if not item.future.set_running_or_notify_cancel():
                continue  # its caller cancelled it
            if isinstance(outcome, Exception):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    def _finish(self, item: _InFlight) -> BatchResult:
        """Wait for one batch's D2H and copy its outputs out of the slot."""
        if self._broken:
            raise PipelineBrokenError(self._broken)
        slot = item.slot
        try:
            slot.d2h_done.synchronize()
            stage_ms = self._record_timing(item) if item.timed else None
        except Exception as err:  # a device fault poisons the context: nothing after it is trusted
            raise self._break(item.batch_id, err) from err
        try:
            outputs = [np.empty_like(host[:item.rows]) for host in slot.host_out_np]
            for out, host in zip(outputs, slot.host_out_np):
                self._copy_rows(out, host[:item.rows])
        except Exception as err:  # host memory, not the device: this batch fails, the pipeline goes on
            raise BatchError(item.batch_id, f"copying its outputs to host memory failed: {one_line(err)}") from err
        self.stats.add(item.rows, slot.host_in[:item.rows].nbytes, sum(o.nbytes for o in outputs), item.stage_start)
        return BatchResult(item.batch_id, item.rows, _unflatten(self._out_spec, outputs), stage_ms)

    def _record_timing(self, item: _InFlight) -> dict[str, float]:
        slot = item.slot
        times = {
            "stage": item.stage_ms,
            "h2d": slot.h2d_start.elapsed_time(slot.h2d_done),
            "compute": slot.compute_start.elapsed_time(slot.compute_done),
            "d2h": slot.d2h_start.elapsed_time(slot.d2h_done),
        }
        self.stats.add_timing(times, item.rows)
        if self.timeline is not None:
            self.timeline.add(item, slot)
        return times

    # -- convenience --------------------------------------------------------------------------------
    def map(self, batches: Iterable[tuple[int, np.ndarray | torch.Tensor]]) -> Iterator[BatchResult]:
        """Submit ``(batch_id, array)`` pairs, yielding results in submission order as they complete."""
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        for batch_id, array in batches:
            pending.append(self.submit(batch_id, array))
            while pending and pending[0].done():
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def close(self) -> None:
        """Finish in-flight batches, stop the completion thread, release buffers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._submit_lock:
            self._inflight.put(None)
        self._completion.join()
        if self.pinner is not None:
            self.pinner.release(id(self))
        self.graphs.close()
        self._staging.shutdown(wait=True)
        self._slots = []

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def broken(self) -> str | None:
        """Why the device context is unusable, or None."""
        return self._broken


# A spell with no batch in flight longer than this is idle time (between maps, say), left out
# of the achieved rate; shorter gaps count, as they are the feeding's own slack.
IDLE_GAP_S = 1.0


def add_spell(spells: list[list[float]], start: float, end: float) -> None:
    """Add ``[start, end]`` to ``spells`` (starts in order): extend the last one, or open one after an idle gap."""
    if spells and start - spells[-1][1] <= IDLE_GAP_S:
        spells[-1][1] = max(spells[-1][1], end)
    else:
        spells.append([start, end])


class PipelineStats:
    """Counters and sampled stage times; updated by the completion thread only.

    ``busy`` holds the spells with batches in flight, ``[start, end]`` in
    ``time.perf_counter`` seconds: batches start and end in submission order, so
    each one extends the last spell or, after an idle gap, opens the next.
    """

    def __init__(self) -> None:
        self.batches = 0
        self.rows = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.busy: list[list[float]] = []
        self.timed_batches = 0
        self.timed_rows = 0
        self.stage_ms_total = dict.fromkeys(_STAGES, 0.0)

    def add(self, rows: int, bytes_in: int, bytes_out: int, started: float) -> None:
        self.batches += 1
        self.rows += rows
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        add_spell(self.busy, started, time.perf_counter())

    def add_timing(self, times: dict[str, float], rows: int) -> None:
        self.timed_batches += 1
        self.timed_rows += rows
        for stage, ms in times.items():
            self.stage_ms_total[stage] += ms

    def reset(self) -> None:
        self.__init__()

    @property
    def busy_seconds(self) -> float:
        return sum(end - start for start, end in list(self.busy))

    def as_dict(self) -> dict[str, Any]:
        per_row = {s: (t / self.timed_rows if self.timed_rows else None) for s, t in self.stage_ms_total.items()}
        return {
            "batches": self.batches,
            "rows": self.rows,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "busy_seconds": self.busy_seconds,
            "rows_per_second": self.rows / self.busy_seconds if self.busy_seconds else None,
            "timed_batches": self.timed_batches,
            "stage_ms_per_row": per_row,
        }


class _Timeline:
    """Per-batch spans of timed batches, relative to an origin event, for a Chrome trace."""

    def __init__(self, streams: StreamManager, compute: Stream) -> None:
        if streams.is_cuda:
            torch.cuda.synchronize(streams.device)
        self.origin_host = time.perf_counter()
        self.origin = streams.insert_event(compute, streams.create_event(enable_timing=True))
        self.spans: collections.deque[tuple[int, str, float, float]] = collections.deque(maxlen=200_000)

    def add(self, item: _InFlight, slot: _Slot) -> None:
        o = self.origin
        stage0 = (item.stage_start - self.origin_host) * 1e3
        self.spans.append((item.batch_id, "stage", stage0, stage0 + item.stage_ms))
        for name, (a, b) in (("h2d", (slot.h2d_start, slot.h2d_done)),
                             ("compute", (slot.compute_start, slot.compute_done)),
                             ("d2h", (slot.d2h_start, slot.d2h_done))):
            self.spans.append((item.batch_id, name, o.elapsed_time(a), o.elapsed_time(b)))

    def chrome_trace(self, process: str) -> list[dict[str, Any]]:
        """Trace events (``ph: X``), one track (tid) per stream, times in microseconds."""
        return [{"name": f"batch {bid}", "cat": stream, "ph": "X", "pid": process, "tid": stream,
                 "ts": start * 1e3, "dur": max(end - start, 0.0) * 1e3, "args": {"batch_id": bid}}
                for bid, stream, start, end in self.spans]
