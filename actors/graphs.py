"""CUDA graphs for the pipeline's compute stage: bucketing, capture, replay and the stream handshake.

Replaying a captured graph launches preprocess + model + postprocess as one
unit, which removes the per-kernel launch cost that dominates small batches.

Buckets. One graph shape per batch-size bucket: by default the powers of two
below ``max_batch_rows`` plus ``max_batch_rows`` itself. A batch runs in the
smallest bucket that holds it; rows ``[rows:bucket]`` of the slot's device input
still hold an earlier batch's data and their results are never read. That is
exact only for row-independent models: eval-mode batchnorm is, train-mode
batchnorm or anything mixing rows is not supported. A batch above the largest
bucket, a model that cannot be captured, and the CPU backend run eager, and each
reason is logged once and kept in the stats.

Graph per (bucket, slot). Each slot of the pipeline's ring owns a device input
buffer that its H2D copy writes. A graph is captured against ``slot.dev_in[:bucket]``
itself, so a replay reads the batch where H2D put it: no copy in. The
alternative, one graph per bucket with its own static input, needs a
device-to-device copy per batch; per-slot graphs cost only more (small) graph
objects, because all of them share one memory pool. Measured on an H100,
ResNet-18 bf16, buckets up to 256: that copy-in adds 3-26 us per replay (3% at
batch 1); depth 3 (27 graphs) holds the same pool memory as depth 1 (9 graphs),
1.5 GB, and captures in 0.2 s once cuDNN has autotuned.

One pool, slot-owned outputs. All graphs capture into one private pool, largest
bucket first, so the pool is about one large graph's activations. Sharing is safe
for everything that only the compute stream touches: every replay runs on that
one stream, in order, so one graph's scratch memory is never in use while
another graph runs. The outputs are different: the D2H stream reads batch n's
outputs while the compute stream replays batch n+1, and a graph's pool-allocated
outputs may lie in memory that another graph (of another slot) uses as scratch.
So each graph ends with a copy of its outputs into static buffers that its slot
owns (allocated outside the pool, ``max_batch_rows`` rows per output leaf); the D2H
stream reads those. The copy is a node inside the graph (no launch, no
allocation; measured at 0.4-2 us per replay, under 0.3%) and makes correctness
independent of capture order, which the pool's reuse does not let us control.

Handshake, no host syncs. The compute stream waits on the slot's consumer-done
event (its previous ``d2h_done``) before a replay overwrites the slot's output
buffers; the pipeline records the produce event (``compute_done``) after the
replay and the D2H stream waits on it. Both waits are device-side. The pipeline
reuses a slot only after the host saw its ``d2h_done``, so today the first wait
is already satisfied; it keeps the graphs correct should that change.

Capture. Each bucket is warmed up ``warmup_iters`` times on a side stream on a
zero input of the bucket's shape (cuDNN autotuning, cuBLAS handles, lazy
initialisation), then captured once per slot on the same side stream, inside
``torch.inference_mode()``, at start-up or when a bucket is first used. Warm-up
never touches the slot buffers, so capturing at first use cannot disturb a batch
in flight. Captured cuBLAS calls keep using the side stream's workspace, so the
side stream waits for the compute stream before a warm-up and the compute
stream waits for the side stream after a capture: the two never run at once.
Capture blocks the host (``torch.cuda.graph`` synchronises the device) and is
never on the steady-state path. ``capture_error_mode="thread_local"`` lets the
pipeline's completion thread keep waiting on events while a first-use capture
runs. A failed capture turns graphs off for the pipeline and is undone in the
caching allocator as well (``_abandon_capture``).
"""
from __future__ import annotations

import bisect
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol

import torch
from torch.utils import _pytree as pytree

from actors.streams import Event, Stream, StreamManager

log = logging.getLogger(__name__)

CaptureWhen = Literal["startup", "first_use"]
CPU_REASON = "CPU backend: CUDA graphs off, running eager"


# -- pure logic: buckets --------------------------------------------------------------------------

def _check_sizes(sizes: Sequence[int]) -> list[int]:
    """``sizes`` as a sorted, deduplicated list; ValueError unless they are ints >= 1, at least one."""
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (tuple, list)):
        raise ValueError(f"bucket sizes must be a list or tuple of ints, got {sizes!r}")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"bucket sizes must be ints >= 1, got {size!r} in {list(sizes)}")
    if not sizes:
        raise ValueError("bucket sizes must not be empty (leave them unset for powers of two)")
    return sorted(set(sizes))


def buckets_for(max_rows: int, sizes: Sequence[int] | None = None) -> list[int]:
    """The batch-size buckets for batches of up to ``max_rows`` rows, ascending.

    ``sizes=None`` gives the powers of two below ``max_rows`` and ``max_rows``
    itself (100 -> 1, 2, ..., 64, 100). Given sizes are sorted and deduplicated;
    each must be an int in ``1..max_rows``.
    """
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an int >= 1, got {max_rows!r}")
    if sizes is None:
        return [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows] + [max_rows]
    buckets = _check_sizes(sizes)
    if buckets[-1] > max_rows:
        raise ValueError(f"bucket size {buckets[-1]} exceeds max_batch_rows={max_rows}; "
                         f"lower the bucket or raise max_batch_rows")
    return buckets


def bucket_for(rows: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket (``buckets`` ascending) that holds ``rows``, or None above the largest."""
    i = bisect.bisect_left(buckets, rows)
    return buckets[i] if i < len(buckets) else None


# -- config and stats -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """CUDA graphs for the compute stage; off by default, and always off on the CPU backend.

    ``buckets=None`` means powers of two up to the pipeline's ``max_batch_rows``
    (see ``buckets_for``); a list is sorted and deduplicated. ``capture`` is
    ``"startup"`` (every bucket when the pipeline is built) or ``"first_use"``
    (a bucket when its first batch arrives; that batch waits for the capture).
    """

    enabled: bool = False
    buckets: tuple[int, ...] | None = None
    capture: CaptureWhen = "startup"
    warmup_iters: int = 3  # eager runs per bucket before capture; cuDNN autotuning must not happen inside one

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"GraphConfig.enabled must be a bool, got {self.enabled!r}")
        if self.buckets is not None:
            try:
                buckets = _check_sizes(self.buckets)
            except ValueError as err:
                raise ValueError(f"GraphConfig.buckets: {err}") from err
            object.__setattr__(self, "buckets", tuple(buckets))
        if self.capture not in ("startup", "first_use"):
            raise ValueError(f"GraphConfig.capture must be 'startup' or 'first_use', got {self.capture!r}")
        if isinstance(self.warmup_iters, bool) or not isinstance(self.warmup_iters, int) or self.warmup_iters < 1:
            raise ValueError(f"GraphConfig.warmup_iters must be an int >= 1, got {self.warmup_iters!r}")


@dataclasses.dataclass
class GraphStats:
    """What the graphs cost and how batches ran; written only by the thread that submits batches.

    ``captured`` and ``graph_memory_bytes`` describe the graphs in use (both drop
    to 0 if capture fails and graphs are abandoned); ``graph_memory_bytes`` is
    the growth of ``torch.cuda.memory_reserved`` across capture, cache emptied on
    both sides: the shared pool, the slots' output buffers and the side stream's
    cuBLAS workspace. ``eager_batches`` counts batches that ran eager while graphs
    were enabled; each distinct reason is in ``fallback_reasons`` once.
    """

    enabled: bool = False
    buckets: list[int] = dataclasses.field(default_factory=list)
    captured: int = 0
    capture_seconds: float = 0.0
    graph_memory_bytes: int = 0
    replays: int = 0
    eager_batches: int = 0
    fallback_reasons: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- capture and replay ---------------------------------------------------------------------------

class SlotBuffers(Protocol):
    """What a graph needs of a pipeline slot: its index, its device input, its consumer-done event."""

    index: int
    dev_in: torch.Tensor
    d2h_done: Event


class GraphRunner:
    """The compute hook of one pipeline: replays a captured graph per (bucket, slot), eager otherwise.

    Built by the pipeline after its slots; captures at once when
    ``config.capture == "startup"``. ``compute(slot, rows)`` is called with the
    pipeline's compute stream current. ``close`` drops the graphs, their pool and
    the output buffers; call it once no replay is pending.
    """

    def __init__(self, config: GraphConfig, streams: StreamManager, slots: Sequence[SlotBuffers], max_rows: int,
                 run_model: Callable[[torch.Tensor], Any], eager: Callable[[Any, int], Any], name: str,
                 compute: Stream | None = None) -> None:
        self.config = config
        self.buckets = buckets_for(max_rows, config.buckets)
        self.stats = GraphStats(enabled=config.enabled, buckets=list(self.buckets))
        self._name = name
        self._streams = streams
        self._slots = list(slots)
        self._max_rows = max_rows
        self._run_model = run_model
        self._eager = eager
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._outs: dict[int, list[torch.Tensor]] = {}  # slot index -> static outputs, max_rows rows each
        self._treespec: pytree.TreeSpec | None = None
        self._pool: Any = None
        self._side: torch.cuda.Stream | None = None
        self._compute = compute or streams.get_compute_stream()  # the pipeline's compute stream
        self._above_reason = f"batches above the largest bucket ({self.buckets[-1]} rows) run eager"
        self._active = config.enabled
        if not config.enabled:
            return
        if not streams.is_cuda:
            self._give_up(CPU_REASON)
        elif config.capture == "startup":
            self._capture(self.buckets)

    @property
    def active(self) -> bool:
        """True while batches within the buckets replay graphs (enabled, on CUDA, capture not failed)."""
        return self._active

    def bucket(self, rows: int) -> int | None:
        """The bucket a batch of ``rows`` replays in, or None if it runs eager."""
        return bucket_for(rows, self.buckets) if self._active else None

    # -- per batch (hot path) -------------------------------------------------------------------
    def compute(self, slot: SlotBuffers, rows: int) -> Any:
        """Run the compute stage for ``rows`` rows of ``slot.dev_in`` on the current (compute) stream.

        Replay: the compute stream waits on ``slot.d2h_done`` (device-side), then
        the graph is replayed; nothing blocks the host, nothing is allocated on the
        device. Returns views ``[:rows]`` of the slot's static outputs, in the
        model's output tree; they stay valid until the slot's next replay. Eager
        fallback returns the model's own outputs. The first batch of a bucket
        under ``capture="first_use"`` captures it first (host-blocking).
        """
        bucket = self.bucket(rows)
        if bucket is None:
            if self._active:
                self._note(self._above_reason)
            self.stats.eager_batches += 1
            return self._eager(slot, rows)
        graph = self._graphs.get((bucket, slot.index))
        if graph is None:
            self._capture([bucket])
            graph = self._graphs.get((bucket, slot.index))
            if graph is None:  # capture failed: graphs are off from now on
                self.stats.eager_batches += 1
                return self._eager(slot, rows)
        self._compute.wait_event(slot.d2h_done)
        graph.replay()
        self.stats.replays += 1
        return pytree.tree_unflatten([out[:rows] for out in self._outs[slot.index]], self._treespec)

    # -- capture --------------------------------------------------------------------------------
    def _capture(self, buckets: Sequence[int]) -> None:
        """Warm up and capture ``buckets`` (largest first) for every slot; any failure turns graphs off."""
        device = self._streams.device
        t0 = time.perf_counter()
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved(device)
        bucket = None
        try:
            if self._side is None:
                # One side stream for every warm-up and capture: captured cuBLAS calls keep its workspace.
                # Its priority is the compute stream's: torch instantiates graphs with
                # cudaGraphInstantiateFlagUseNodePriority (pytorch#167346), so replayed kernels run at the
                # priority they were captured at, not at that of the stream they are replayed on.
                self._side = torch.cuda.Stream(device, priority=self._compute.priority)
                self._pool = torch.cuda.graph_pool_handle()
            self._side.wait_stream(torch.cuda.current_stream(device))
            self._side.wait_stream(self._compute)
            # Our own stream context: it restores the caller's stream even when capture_end raises,
            # which leaves torch.cuda.graph's inner stream context un-exited.
            with torch.inference_mode(), torch.cuda.stream(self._side):
                for bucket in sorted(buckets, reverse=True):
                    self._capture_bucket(bucket)
            self._compute.wait_stream(self._side)
        except Exception as err:
            self._abandon_capture()
            where = "" if bucket is None else f" at {bucket} rows"
            self._give_up(f"capture failed{where}, running eager: {type(err).__name__}: {err}")
            return
        finally:
            self.stats.capture_seconds += time.perf_counter() - t0
        torch.cuda.empty_cache()
        self.stats.graph_memory_bytes += torch.cuda.memory_reserved(device) - reserved

    def _capture_bucket(self, bucket: int) -> None:
        """Warm up on a zero input of the bucket's shape, then capture one graph per slot. Side stream current."""
        x = torch.zeros_like(self._slots[0].dev_in[:bucket])
        for _ in range(self.config.warmup_iters):
            out = self._run_model(x)
        leaves, treespec = pytree.tree_flatten(out)
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] != bucket:
                what = tuple(leaf.shape) if isinstance(leaf, torch.Tensor) else type(leaf).__name__
                raise ValueError(f"output leaf {i} is {what}; every output must have the batch's rows first")
        if self._treespec is None:
            self._treespec = treespec
            with torch.cuda.stream(self._compute):
                # Allocated on the stream that writes them, outside the pool: the slot owns them.
                self._outs = {slot.index: [torch.empty((self._max_rows, *leaf.shape[1:]), dtype=leaf.dtype,
                                                       device=leaf.device) for leaf in leaves]
                              for slot in self._slots}
        elif treespec != self._treespec:
            raise ValueError(f"the output structure at {bucket} rows differs from the first bucket captured")
        for slot in self._slots:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, stream=self._side, capture_error_mode="thread_local"):
                for leaf, static in zip(pytree.tree_leaves(self._run_model(slot.dev_in[:bucket])),
                                        self._outs[slot.index]):
                    static[:bucket].copy_(leaf)
            self._graphs[(bucket, slot.index)] = graph
            self.stats.captured += 1

    def _abandon_capture(self) -> None:
        """Undo what a capture that failed inside ``torch.cuda.graph`` leaves in the caching allocator.

        torch's ``capture_end`` stops routing allocations to the pool only after
        ``cudaStreamEndCapture`` succeeds. After an invalidated capture the allocator
        still counts a capture as underway: ``empty_cache`` then frees nothing, and
        no block marked with ``record_stream`` (every eager output here) is ever
        reused. Ending the routing and dropping the pool reference the capture took
        restores it. Nothing to undo when the failure came before ``capture_begin``
        reached the allocator, or after ``capture_end`` released it.
        """
        if self._pool is None:
            return
        index = self._streams.device.index
        try:
            torch._C._cuda_endAllocateToPool(index, self._pool)
        except RuntimeError:  # no capture into this pool is underway
            return
        torch._C._cuda_releasePool(index, self._pool)

    def _give_up(self, reason: str) -> None:
        """Turn graphs off for good: drop what was captured and say why (once)."""
        self._active = False
        self._release()
        self.stats.captured = 0
        self.stats.graph_memory_bytes = 0
        self._note(reason)

    def _note(self, reason: str) -> None:
        """Record and log a reason for running eager, once per distinct reason."""
        if reason not in self.stats.fallback_reasons:
            self.stats.fallback_reasons.append(reason)
            log.warning("pipeline %s: %s", self._name, reason)

    def _release(self) -> None:
        # The output buffers were allocated on the compute stream and the pipeline marked them
        # with record_stream for D2H, so the allocator reuses them only after both are done.
        self._graphs.clear()
        self._outs = {}
        self._pool = None
        self._side = None

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop graphs, pool and output buffers (``empty_cache`` then returns them); idempotent.

        Call after every replay has completed: the pipeline does so after its
        completion thread has seen the last batch's ``d2h_done``.
        """
        self._active = False
        self._release()
        self._slots = []
