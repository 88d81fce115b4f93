"""Pinning host memory in place, so a batch goes to the device without a staging copy.

Staging copies every input byte once on the host (pageable -> pinned slot) before
the DMA reads it again; on the transfer-bound MLP that memcpy, not PCIe, binds.
Registering the source memory with ``cudaHostRegister`` lets the DMA read it
where it lies. Measured on an H100 host (torch 2.13): registering touched memory
ran at 30-40 GB/s, H2D from it at 51 GB/s (the pinned ceiling), a one-thread
memcpy into a pinned slot at 10-11 GB/s, a pageable H2D at 9 GB/s.

Two kinds of region are registered, lazily, as batches touch them:

- a shared-memory mapping under ``/dev/shm`` or Ray's object store file (where every
  batch a Ray worker receives lies): mapped for the life of the process and
  reused by object after object, so it is registered one aligned chunk at a
  time and stays registered until the last user lets go. One
  ``cudaMemcpyAsync`` may not span two registrations (CUDA answers "invalid
  argument"), so a batch is copied in pieces split at chunk boundaries; only
  the pipeline copies from that memory in a worker process.
- the buffer of a large numpy array (its base array, when that owns its data or
  maps a file), once the pipeline has read more bytes from it than it holds,
  i.e. from its second pass on: registering costs about what one staged copy
  does, so a single pass is staged. It is registered whole in one call, so that any copy of any part of
  it, the user's own included, stays inside one registration. The array is held
  alive while registered, because freed addresses can be handed to another
  buffer whose pages the stale registration would not cover; when the budget is
  reached, arrays whose last copy the H2D streams have passed are unregistered
  and let go.

Anything else (small arrays, strided views, foreign buffers) is staged as before.

Registration is per process, not per stream or pipeline, so there is one
registry per process (``shared_pinner``), used by every pipeline in it and
emptied when the last one lets go. A failed ``cudaHostRegister`` also leaves
CUDA's last-error set, which torch would report at its next kernel launch; it
is cleared at once, and without a way to clear it pinning stays off.
"""
from __future__ import annotations

import bisect
import ctypes
import dataclasses
import logging
import mmap
import os
import threading
import time
import weakref
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 << 20  # registration granularity of a shared-memory mapping; a multiple of the page size
MIN_ARRAY_BYTES = 64 << 20  # smaller arrays are staged: registering them would not pay back
_REGISTER_DEFAULT, _REGISTER_READ_ONLY = 0, 8  # cudaHostRegisterDefault, cudaHostRegisterReadOnly


@dataclasses.dataclass
class _Region:
    """A span of host memory we may register: a shared-memory mapping or one array's buffer."""

    lo: int
    hi: int
    owner: np.ndarray | None  # the array kept alive while registered; None for a process-long mapping
    chunk_bytes: int  # registration granularity: CHUNK_BYTES for a mapping, the whole span for an array
    fences: dict[int, Any] = dataclasses.field(default_factory=dict)  # per user: event after its last copy
    chunks: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # chunk start -> byte view
    failed: bool = False


class HostPinner:
    """Registers source memory on first touch and hands out byte views to copy from; thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.registered_bytes = 0
        self.registrations = 0
        self.evictions = 0
        self._cudart = torch.cuda.cudart()
        self._clear_error = _cuda_error_clearer()
        self._lock = threading.Lock()
        self._users = 0
        self._regions: list[_Region] = []  # sorted by lo, disjoint
        self._copying: dict[int, _Region] = {}  # user -> the region it is enqueuing copies from
        self._reads: dict[int, tuple[weakref.ref, int]] = {}  # arrays not registered yet: address -> bytes read
        self._shm: list[tuple[int, int]] = []  # /dev/shm mappings, read from /proc/self/maps
        self._shm_read_at = -float("inf")

    def pieces(self, array: np.ndarray, user: int) -> list[torch.Tensor] | None:
        """Byte views covering ``array``'s memory, each inside one registration; None: stage it.

        ``user`` (a pipeline, one batch at a time) then enqueues its copies from the
        views and calls ``fenced`` with the event recorded after them. Until then the
        region counts as busy; after, it is unregistered only once every user's latest
        fence on it has completed.
        """
        if not array.flags.c_contiguous or self._clear_error is None:
            return None
        lo = array.ctypes.data
        hi = lo + array.nbytes
        with self._lock:
            region = self._find(lo, hi) or self._new_region(array, lo, hi)
            if region is None or region.failed:
                return None
            views = []
            start = lo
            while start < hi:
                chunk = region.lo + (start - region.lo) // region.chunk_bytes * region.chunk_bytes
                view = region.chunks.get(chunk)
                if view is None and (view := self._register(region, chunk)) is None:
                    return None
                end = min(hi, chunk + view.numel())
                views.append(view[start - chunk:end - chunk])
                start = end
            self._copying[user] = region
            return views

    def fenced(self, user: int, fence: Any) -> None:
        """``user``'s copies from its last ``pieces`` are enqueued, and ``fence`` is recorded after them."""
        with self._lock:
            region = self._copying.pop(user, None)
            if region is not None:
                region.fences[user] = fence

    def acquire(self, budget_bytes: int) -> HostPinner:
        """One more pipeline uses the registry; the budget is the largest any current user asked for."""
        with self._lock:
            if self._users == 0:  # empty since the last user left: start afresh
                self.budget_bytes = self.registrations = self.evictions = 0
            self._users += 1
            self.budget_bytes = max(self.budget_bytes, budget_bytes)
        return self

    def release(self, user: int) -> None:
        """A pipeline is done (its copies have finished); the last one out unregisters everything."""
        with self._lock:
            self._users -= 1
            self._copying.pop(user, None)
            for region in self._regions:
                region.fences.pop(user, None)
            if self._users == 0:
                for region in self._regions:
                    self._unregister(region)
                self._regions = []
                self._reads = {}

    # -- regions ------------------------------------------------------------------------------
    def _find(self, lo: int, hi: int) -> _Region | None:
        i = bisect.bisect_right([r.lo for r in self._regions], lo) - 1
        if i >= 0 and self._regions[i].lo <= lo and hi <= self._regions[i].hi:
            return self._regions[i]
        return None

    def _new_region(self, array: np.ndarray, lo: int, hi: int) -> _Region | None:
        base = array
        while isinstance(base.base, np.ndarray):
            base = base.base
        if base.flags.owndata or isinstance(base.base, mmap.mmap):
            if base.nbytes < MIN_ARRAY_BYTES:
                return None
            start = base.ctypes.data
            if not self._read_before(base, start, hi - lo):
                return None
            region = _Region(start, start + base.nbytes, base, chunk_bytes=base.nbytes)
        else:  # a foreign buffer: in Ray's object store if it lies in a /dev/shm mapping
            mapping = self._shm_mapping(lo, hi)
            if mapping is None:
                return None
            region = _Region(*mapping, owner=None, chunk_bytes=CHUNK_BYTES)  # a mapping starts on a page
        if any(r.lo < region.hi and region.lo < r.hi for r in self._regions):
            return None  # overlaps a region we know (a view of a view): stage rather than double-register
        bisect.insort(self._regions, region, key=lambda r: r.lo)
        return region

    def _read_before(self, base: np.ndarray, start: int, nbytes: int) -> bool:
        """Count a read of ``nbytes`` from ``base``; True once the reads exceed its size (a second pass)."""
        ref, read = self._reads.get(start, (None, 0))
        read = nbytes + (read if ref is not None and ref() is base else 0)
        if read > base.nbytes:
            self._reads.pop(start, None)
            return True
        if len(self._reads) >= 64:  # forget arrays that are gone
            self._reads = {k: v for k, v in self._reads.items() if v[0]() is not None}
        self._reads[start] = (weakref.ref(base), read)
        return False

    def _shm_mapping(self, lo: int, hi: int) -> tuple[int, int] | None:
        # /proc/self/maps is re-read at most once a second: a foreign buffer outside
        # shared memory must not cost a file read per batch.
        for _ in range(2):
            for start, end in self._shm:
                if start <= lo and hi <= end:
                    return start, end
            if time.monotonic() - self._shm_read_at < 1.0:
                return None
            self._shm, self._shm_read_at = _shared_memory_mappings(), time.monotonic()
        return None

    # -- registration -------------------------------------------------------------------------
    def _register(self, region: _Region, chunk: int) -> torch.Tensor | None:
        lo, hi = chunk, min(chunk + region.chunk_bytes, region.hi)
        if hi - lo > self.budget_bytes:
            region.failed = True  # can never fit
            return None
        if self.registered_bytes + (hi - lo) > self.budget_bytes and not self._evict(hi - lo, keep=region):
            return None
        for flags in (_REGISTER_DEFAULT, _REGISTER_READ_ONLY):
            if int(self._cudart.cudaHostRegister(lo, hi - lo, flags)) == 0:
                break
            self._clear_error()
        else:
            region.failed = True
            log.warning("could not pin %d MiB of host memory in place; staging batches from it instead",
                        (hi - lo) >> 20)
            return None
        self.registered_bytes += hi - lo
        self.registrations += 1
        view = torch.from_numpy(np.ctypeslib.as_array((ctypes.c_uint8 * (hi - lo)).from_address(lo)))
        region.chunks[chunk] = view
        return view

    def _evict(self, need: int, keep: _Region) -> bool:
        """Unregister idle array regions (not mappings) until ``need`` more bytes fit the budget."""
        for region in list(self._regions):
            if self.registered_bytes + need <= self.budget_bytes:
                break
            idle = (all(r is not region for r in self._copying.values())
                    and all(fence.query() for fence in region.fences.values()))
            if region is not keep and region.owner is not None and idle:
                self._unregister(region)
                self._regions.remove(region)
                self.evictions += 1
        return self.registered_bytes + need <= self.budget_bytes

    def _unregister(self, region: _Region) -> None:
        for view in region.chunks.values():
            if int(self._cudart.cudaHostUnregister(view.data_ptr())) != 0:
                self._clear_error()
            self.registered_bytes -= view.numel()
        region.chunks.clear()
        region.owner = None

    def as_dict(self) -> dict[str, int]:
        """Counters of the whole process's registry (every pipeline in it shares one)."""
        return {"registered_bytes": self.registered_bytes, "registrations": self.registrations,
                "evictions": self.evictions, "regions": len(self._regions)}


_shared: HostPinner | None = None
_shared_lock = threading.Lock()


def shared_pinner(budget_bytes: int) -> HostPinner:
    """This process's registry, with one more user; give it back with ``release``."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = HostPinner(budget_bytes)
        return _shared.acquire(budget_bytes)


def pinned_in_place_stats() -> dict[str, int] | None:
    """This process's registry counters, or None where no pipeline has pinned anything."""
    return _shared.as_dict() if _shared is not None else None


def _cuda_error_clearer():
    """``cudaGetLastError`` of the CUDA runtime torch loaded, or None where it cannot be found."""
    candidates = [None]  # the global namespace, where torch's wheels load their CUDA libraries
    with open("/proc/self/maps") as maps:
        candidates += sorted({line.split()[-1] for line in maps if "libcudart.so" in line})
    for name in candidates:
        try:
            return ctypes.CDLL(name).cudaGetLastError
        except (OSError, AttributeError):
            continue
    log.warning("CUDA runtime library not found: batches are staged, not pinned in place")
    return None


def _shared_memory_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's shared mappings of files under /dev/shm, or of Ray's
    object store wherever it lies (Ray falls back to /tmp when /dev/shm is too small)."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) == 6 else ""
            if fields[1][3] == "s" and (path.startswith("/dev/shm/") or os.path.basename(path).startswith("plasma")):
                lo, hi = fields[0].split("-")
                spans.append((int(lo, 16), int(hi, 16)))
    return spans
