"""StreamManager (RFC 0004): the streams and events of one device, on CUDA or the CPU.

The manager owns three built-in streams (compute, H2D copy, D2H copy) and up to
``max_streams`` user streams, plus every event it hands out. ``close()`` drops
them all; it is idempotent and the manager is a context manager.

Priorities: CUDA orders stream priorities so that a *lower* number is a
*higher* priority, and the default (0) is the lowest. torch reports the range as
``(least, greatest)``, e.g. ``(0, -3)`` on Hopper. The mapping used here is
``LOW -> least`` (0, the default), ``NORMAL -> one step above least`` (-1) and
``HIGH -> greatest`` (-3): three distinct priorities whenever the device offers
three levels, which every CUDA device since Kepler does.

The built-in compute stream is HIGH, the two copy streams NORMAL (RFC table).

Note on torch streams: ``torch.cuda.Stream()`` draws from a per-priority pool of
32 CUDA streams round-robin. Handles are therefore cheap to create and never
leak, but after many create/destroy cycles two live handles can share one CUDA
stream; correctness is unaffected, only concurrency between those two.

CPU backend (``device="cpu"`` or no CUDA): the same API with honest semantics.
Work runs in program order on the calling thread, so a stream is always idle,
synchronising returns at once, a device-side wait is a no-op, and an event is
complete as soon as it is recorded. ``CpuEvent.elapsed_time`` uses the host
clock at record time, which on the CPU is also the time the work before it ended.
"""
from __future__ import annotations

import contextlib
import enum
import threading
import time
from collections.abc import Iterator
from typing import Union

import torch

from actors.errors import CudaError, StreamLimitError

MAX_STREAMS_LIMIT = 16
H2D, D2H = 0, 1


class StreamPriority(enum.Enum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"


class CpuStream:
    """A stream on the CPU backend: work is already done when the call returns."""

    device = torch.device("cpu")

    def __init__(self, priority: int = 0) -> None:
        self.priority = priority

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def wait_event(self, event: CpuEvent) -> None:
        pass

    def wait_stream(self, stream: CpuStream) -> None:
        pass

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        event = event or CpuEvent()
        event.record(self)
        return event

    def __repr__(self) -> str:
        return f"<CpuStream {id(self):#x} priority={self.priority}>"


class CpuEvent:
    """An event on the CPU backend: complete once recorded; times with the host clock."""

    def __init__(self, enable_timing: bool = False) -> None:
        self._recorded_at: float | None = None

    def record(self, stream: CpuStream | None = None) -> None:
        self._recorded_at = time.perf_counter()

    def query(self) -> bool:
        return self._recorded_at is not None

    def synchronize(self) -> None:
        pass

    def wait(self, stream: CpuStream | None = None) -> None:
        pass

    def elapsed_time(self, end: CpuEvent) -> float:
        """Milliseconds from this event's record to ``end``'s record."""
        if self._recorded_at is None or end._recorded_at is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return (end._recorded_at - self._recorded_at) * 1e3


Stream = Union[torch.cuda.Stream, CpuStream]
Event = Union[torch.cuda.Event, CpuEvent]


def _resolve_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be a CUDA device or 'cpu', got {device}")
    return device


class StreamManager:
    """Owns the streams and events of one device; thread-safe."""

    def __init__(self, max_streams: int = 8, device: torch.device | str | int | None = None) -> None:
        if isinstance(max_streams, bool) or not isinstance(max_streams, int) or not 1 <= max_streams <= MAX_STREAMS_LIMIT:
            raise ValueError(f"max_streams must be an int in 1..{MAX_STREAMS_LIMIT}, got {max_streams!r}")
        self.max_streams = max_streams
        self.device = _resolve_device(device)
        self.is_cuda = self.device.type == "cuda"
        self._lock = threading.Lock()
        self._user: dict[int, Stream] = {}
        # Strong references, dropped by close(). Not a WeakSet: weak references to
        # torch.cuda.Event can dangle after the event is freed (pytorch#183403).
        self._events: list[Event] = []
        self._created = 0
        self._closed = False
        if self.is_cuda:
            least, greatest = torch.cuda.Stream.priority_range()
            # torch returns (least, greatest) with greatest <= least numerically.
            self._priorities = {
                StreamPriority.LOW: least,
                StreamPriority.NORMAL: max(least - 1, greatest),
                StreamPriority.HIGH: greatest,
            }
        else:
            self._priorities = {StreamPriority.LOW: 0, StreamPriority.NORMAL: -1, StreamPriority.HIGH: -2}
        self._compute = self._new_stream(StreamPriority.HIGH)
        self._copy = (self._new_stream(StreamPriority.NORMAL), self._new_stream(StreamPriority.NORMAL))

    def priority_value(self, priority: StreamPriority) -> int:
        """The backend's numeric priority for ``priority`` (lower is higher on CUDA)."""
        return self._priorities[StreamPriority(priority)]

    # -- streams --------------------------------------------------------------
    def _new_stream(self, priority: StreamPriority) -> Stream:
        value = self._priorities[priority]
        if not self.is_cuda:
            return CpuStream(value)
        try:
            return torch.cuda.Stream(device=self.device, priority=value)
        except RuntimeError as err:
            raise CudaError(f"creating a {priority.name} stream on {self.device}", str(err)) from err

    def get_compute_stream(self) -> Stream:
        self._check_open()
        return self._compute

    def get_copy_stream(self, index: int = H2D) -> Stream:
        """Index 0 is the host-to-device stream, 1 the device-to-host stream."""
        self._check_open()
        if index not in (H2D, D2H):
            raise ValueError(f"copy stream index must be 0 (H2D) or 1 (D2H), got {index!r}")
        return self._copy[index]

    def create_stream(self, priority: StreamPriority = StreamPriority.NORMAL) -> Stream:
        if not isinstance(priority, StreamPriority):
            raise ValueError(f"priority must be a StreamPriority (LOW, NORMAL, HIGH), got {priority!r}")
        with self._lock:
            self._check_open()
            if len(self._user) >= self.max_streams:
                raise StreamLimitError(len(self._user), self.max_streams)
            stream = self._new_stream(priority)
            self._user[id(stream)] = stream
            self._created += 1
            return stream

    def destroy_stream(self, stream: Stream) -> None:
        """Forget a user stream after waiting for its queued work (host-blocking)."""
        with self._lock:
            owned = self._user.get(id(stream))
            if owned is None or owned is not stream:
                raise ValueError(f"{stream!r} is not a live user stream of this manager "
                                 f"(not a stream, not created here, or already destroyed)")
            del self._user[id(stream)]
        stream.synchronize()

    def active_streams(self) -> int:
        """User-created streams alive now (built-ins not counted)."""
        with self._lock:
            return len(self._user)

    def live_events(self) -> int:
        """Events created by this manager and held until ``close``."""
        with self._lock:
            return len(self._events)

    def total_streams_created(self) -> int:
        """User streams created over the manager's lifetime."""
        with self._lock:
            return self._created

    def _all_streams(self) -> list[Stream]:
        with self._lock:
            return [self._compute, *self._copy, *self._user.values()]

    def _check_owned(self, stream: Stream) -> None:
        if stream is self._compute or stream is self._copy[0] or stream is self._copy[1]:
            return
        with self._lock:
            if self._user.get(id(stream)) is not stream:
                raise ValueError(f"{stream!r} is not a live stream of this manager")

    # -- synchronisation -------------------------------------------------------
    def sync_stream(self, stream: Stream) -> None:
        """Block the host until every call queued on ``stream`` has finished."""
        self._check_owned(stream)
        stream.synchronize()

    def sync_all_streams(self) -> None:
        """Block the host until every managed stream is idle."""
        for stream in self._all_streams():
            stream.synchronize()

    def create_event(self, enable_timing: bool = False) -> Event:
        """A new event owned by this manager and held until ``close``: create per-slot events once, not per batch."""
        with self._lock:
            self._check_open()
            event = torch.cuda.Event(enable_timing=enable_timing) if self.is_cuda else CpuEvent(enable_timing)
            self._events.append(event)
            return event

    def insert_event(self, stream: Stream, event: Event | None = None) -> Event:
        """Record ``event`` (a new one if None) on ``stream``. Does not block the host.

        The event completes when all work queued on ``stream`` before this call
        has finished. Pass a preallocated event on hot paths: ``None`` creates one.
        """
        self._check_owned(stream)
        if event is None:
            event = self.create_event()
        event.record(stream)
        return event

    def wait_event(self, stream: Stream, event: Event) -> None:
        """Make future work on ``stream`` wait for ``event``. Device-side: the host does not block."""
        self._check_owned(stream)
        stream.wait_event(event)

    @contextlib.contextmanager
    def use(self, stream: Stream) -> Iterator[Stream]:
        """Make ``stream`` current for torch ops in this thread; restores the previous one on exit.

        On the per-batch path (several times a batch): ``torch.cuda.stream`` looks the
        device up through Python helpers on every entry, about a third of the
        pipeline's host time per batch at ResNet-18 batch 8 (cProfile, H100). When
        the stream's device is the current one, this switches with the two C calls
        that ``torch.cuda.set_stream`` and ``current_stream`` end in.
        """
        if not self.is_cuda:
            yield stream
            return
        if torch._C._cuda_getDevice() != stream.device_index:
            with torch.cuda.stream(stream):  # also switches the current device, and back
                yield stream
            return
        previous = torch._C._cuda_getCurrentStream(stream.device_index)
        torch._C._cuda_setStream(stream_id=stream.stream_id, device_index=stream.device_index,
                                 device_type=stream.device_type)
        try:
            yield stream
        finally:
            torch._C._cuda_setStream(stream_id=previous[0], device_index=previous[1], device_type=previous[2])

    # -- lifetime --------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("StreamManager is closed")

    def close(self) -> None:
        """Wait for all managed streams, then release every stream and event. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = [self._compute, *self._copy, *self._user.values()]
            self._user.clear()
            self._events.clear()
        for stream in streams:
            stream.synchronize()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> StreamManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"StreamManager(device={self.device}, max_streams={self.max_streams}, "
                f"active={len(self._user)}, closed={self._closed})")
