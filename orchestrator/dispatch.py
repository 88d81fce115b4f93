"""Dispatch and collection: in-flight windows, least-loaded choice, ray.wait, retries.

One loop owns all bookkeeping. Each live worker holds at most ``window``
batches; a new batch goes to the least-loaded live worker; results are
collected with ``ray.wait`` (always with a timeout) as they complete, so a slow
worker never holds back a fast one. Every batch ends exactly once, as a result
or as an error naming it: a ledger keyed by batch id drops late duplicates, a
dead worker's batches are dispatched again, and a batch that keeps killing
workers is failed instead of looping. Input order is a thin view
(``in_order``) over the same completion stream.

A dispatcher feeds one model (``model``, a name the workers know). It counts
its own batches in flight per worker, so dispatchers for different models
running at once each keep their own window: a flood of one model cannot take
the window of another.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from actors.errors import BatchError, InputError, ModelError, OrchestratorError, first_line, one_line
from actors.pipeline import BatchResult
from orchestrator.sources import Batch

log = logging.getLogger(__name__)

# ray.wait wakes at least this often to check batch deadlines and worker probes.
_WAIT_S = 1.0


class NoWorkersError(OrchestratorError, RuntimeError):
    """Every worker is dead and none can be restarted; completed results were already handed out."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)

    def __str__(self) -> str:
        return f"no worker can run: {self.args[0]}"


@dataclasses.dataclass
class Result:
    """One batch's end: its outputs, or (with ``on_error='skip'``) the error that ended it."""

    batch_id: int
    rows: int
    outputs: Any
    worker: str | None
    stage_ms: dict[str, float] | None = None
    error: BatchError | None = None


@dataclasses.dataclass(eq=False)
class WorkerRecord:
    """The driver's view of one worker actor, shared by every dispatcher of an Orchestrator.

    Dispatchers of different models run on their own threads and may see the
    same death at once, so the suspect/probe/give-up transitions happen under a
    lock and each probe is settled once, by whoever holds its ref.
    """

    name: str
    actor: Any
    gone: str | None = None  # why the driver gave up on it: None while it may still run batches
    deaths: int = 0
    probe: Any = None  # an ObjectRef of ping() while the worker is suspected dead
    probe_since: float = 0.0
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def alive(self) -> bool:
        return self.gone is None

    @property
    def live(self) -> bool:
        """Alive and not suspected dead: it may be given batches."""
        return self.alive and self.probe is None

    def suspect(self) -> bool:
        """A call on it failed with the actor's death: start probing it. False if that death was already seen."""
        with self._lock:
            if not self.live:
                return False
            self.deaths += 1
            self.probe, self.probe_since = self.actor.ping.remote(), time.monotonic()
            return True

    def settle_probe(self, ref: Any) -> None:
        """``ref``, a probe that is ready, says whether the worker is back, still restarting, or dead for good.

        A ref that is no longer the current probe was settled by another dispatcher: nothing to do.
        """
        with self._lock:
            if ref is not self.probe:
                return
            self.probe = None
            try:
                ray.get(ref, timeout=0)
                log.warning("worker %s is back after a restart", self.name)
            except ActorUnavailableError:
                # Still restarting: ask again (the probe deadline still applies).
                self.probe = self.actor.ping.remote()
            except Exception as err:  # ActorDiedError once Ray's restart budget is spent
                self.gone = f"{self.name} is dead ({first_line(err)})"
                log.error("worker %s is gone: %s", self.name, first_line(err))

    def expire_probe(self, now: float, timeout_s: float) -> None:
        """Give the worker up if it has not answered a probe within ``timeout_s`` of dying."""
        with self._lock:
            if self.probe is None or now - self.probe_since <= timeout_s:
                return
            ray.cancel(self.probe, force=False)
            self.probe = None
            self.gone = f"{self.name} was not back {timeout_s:.0f} s after dying"
            log.error("worker %s did not come back within %.0f s", self.name, timeout_s)


@dataclasses.dataclass
class _Call:
    batch: Batch
    worker: WorkerRecord
    started: float


@dataclasses.dataclass
class DispatchStats:
    dispatched: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    duplicates_dropped: int = 0
    worker_deaths: int = 0
    hung_batches: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


class DispatchEvents:
    """What the dispatch loop tells an observer (``orchestrator.metrics.DriverMetrics``); no-ops here.

    Hooks run on the loop's thread, once per event: they must be cheap and never block.
    """

    def completed(self, worker: str, rows: int, latency_s: float) -> None:
        """A batch's result reached the driver, ``latency_s`` after it was sent."""

    def error(self, worker: str, error: BatchError) -> None:
        """A run of a batch raised (whether or not it is retried)."""

    def retried(self, worker: str) -> None:
        """A batch that failed or lost ``worker`` goes back into the queue."""

    def gave_up(self, worker: str) -> None:
        """A batch ended as an error."""

    def worker_died(self, worker: str) -> None:
        """``worker``'s process died (Ray may restart it)."""

    def tick(self, inflight: Mapping[WorkerRecord, int]) -> None:
        """Called on every pass of the loop (at least once a second) with this dispatcher's batches in
        flight per worker, to sample gauges at its own rate."""


class _Ledger:
    """Which batch ids have ended; memory bounded by how far completion runs out of order."""

    def __init__(self) -> None:
        self.floor = 0  # every id below has ended
        self._above: set[int] = set()

    def end(self, batch_id: int) -> bool:
        """Mark ``batch_id`` ended; False if it had already ended (a duplicate)."""
        if batch_id < self.floor or batch_id in self._above:
            return False
        self._above.add(batch_id)
        while self.floor in self._above:
            self._above.remove(self.floor)
            self.floor += 1
        return True


class Dispatcher:
    """Feeds batches to workers and yields each batch's end in completion order."""

    def __init__(self, workers: list[WorkerRecord], *, window: int, on_error: str = "raise", max_retries: int = 2,
                 batch_timeout_s: float = 600.0, probe_timeout_s: float = 120.0, max_ahead: int | None = None,
                 on_result: Callable[[Result], None] | None = None, model: str | None = None,
                 events: DispatchEvents | None = None) -> None:
        if not workers:
            raise ValueError("Dispatcher needs at least one worker")
        self.workers = workers
        self.window = window
        self.on_error = on_error
        self.max_retries = max_retries
        self.batch_timeout_s = batch_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.max_ahead = max_ahead
        self.on_result = on_result
        self.model = model
        self.stats = DispatchStats()
        self.events = events or DispatchEvents()
        # This dispatcher's batches in flight, every worker present (0 too): handed to events.tick as is.
        self._inflight: collections.Counter[WorkerRecord] = collections.Counter({w: 0 for w in workers})
        self._pending: dict[Any, _Call] = {}
        self._retry: collections.deque[Batch] = collections.deque()
        self._attempts: collections.Counter[int] = collections.Counter()
        self._avoid: dict[int, WorkerRecord] = {}
        self._ledger = _Ledger()
        self._taken = 0  # batches drawn from the source so far

    def close(self) -> None:
        """Let go of a run that was left before its end (a ``break``, an error): cancel the calls still
        queued on workers and drop every reference, so the input and outputs can be freed. Keeps ``stats``."""
        for ref in self._pending:
            ray.cancel(ref)  # a queued call is dropped; one already running finishes and is discarded
        self._pending.clear()
        self._retry.clear()
        self._avoid.clear()
        self._attempts.clear()

    # -- the loop -------------------------------------------------------------------------------
    def run(self, source: Iterator[Batch]) -> Iterator[Result]:
        source = iter(source)
        exhausted = False
        while True:
            exhausted = self._fill(source, exhausted)
            if not self._pending and exhausted and not self._retry:
                return  # a worker still restarting is no reason to wait; the next run goes on probing it
            probes = {probe: w for w in self.workers if (probe := w.probe) is not None}
            if not self._pending and not probes:
                if not self._live():
                    raise NoWorkersError(self._death_summary(exhausted))
                continue
            waitables = [*self._pending, *probes]
            ready, _ = ray.wait(waitables, num_returns=1, timeout=_WAIT_S)
            if ready:
                ready, _ = ray.wait(waitables, num_returns=len(waitables), timeout=0)
            for ref in ready:
                if ref in probes:
                    probes[ref].settle_probe(ref)
                else:
                    yield from self._collect(ref)
            self._check_deadlines()
            self.events.tick(self._inflight)

    def _live(self) -> list[WorkerRecord]:
        return [w for w in self.workers if w.live]

    def _fill(self, source: Iterator[Batch], exhausted: bool) -> bool:
        """Dispatch until every live worker's window is full; returns whether the source is exhausted."""
        while True:
            live = [w for w in self._live() if self._inflight[w] < self.window]
            if not live:
                return exhausted
            if self._retry:
                batch = self._retry.popleft()
            else:
                if exhausted or self._too_far_ahead():
                    return exhausted
                batch = next(source, None)
                if batch is None:
                    return True
                self._taken += 1
            avoid = self._avoid.get(batch.batch_id)
            choices = [w for w in live if w is not avoid]
            if not choices and len(self._live()) > 1:
                # Only the worker it failed on has room: wait for another one to free up.
                self._retry.appendleft(batch)
                return exhausted
            self._send(batch, min(choices or live, key=self._inflight.__getitem__))

    def _too_far_ahead(self) -> bool:
        if self.max_ahead is None:
            return False
        return self._taken >= self._ledger.floor + self.max_ahead

    def _send(self, batch: Batch, worker: WorkerRecord) -> None:
        ref = worker.actor.infer.remote(batch.batch_id, batch.source, batch.start, batch.stop, self.model)
        self._pending[ref] = _Call(batch, worker, time.monotonic())
        self._inflight[worker] += 1
        self.stats.dispatched += 1

    # -- outcomes --------------------------------------------------------------------------------
    def _collect(self, ref: Any) -> Iterator[Result]:
        call = self._pending.pop(ref)
        self._inflight[call.worker] -= 1
        batch_id = call.batch.batch_id
        try:
            out: BatchResult = ray.get(ref, timeout=0)
        except RayActorError as err:
            yield from self._worker_died(call, err)
            return
        except RayTaskError as err:
            cause = err.cause
            if not isinstance(cause, BatchError):
                cause = ModelError(batch_id, one_line(cause), call.worker.name)
            yield from self._failed(call, cause)
            return
        if not self._ledger.end(batch_id):
            self.stats.duplicates_dropped += 1
            return
        self.stats.completed += 1
        self.events.completed(call.worker.name, out.rows, time.monotonic() - call.started)
        result = Result(batch_id, out.rows, out.outputs, call.worker.name, out.stage_ms)
        if self.on_result:
            self.on_result(result)
        yield result

    def _failed(self, call: _Call, error: BatchError) -> Iterator[Result]:
        batch_id = call.batch.batch_id
        self.events.error(call.worker.name, error)
        retryable = self.on_error == "retry" and not isinstance(error, InputError)
        if retryable and self._attempts[batch_id] < self.max_retries:
            self._attempts[batch_id] += 1
            self._avoid[batch_id] = call.worker
            self._retry.append(call.batch)
            self.stats.retried += 1
            self.events.retried(call.worker.name)
            log.warning("%s; retrying elsewhere (attempt %d of %d)", error, self._attempts[batch_id], self.max_retries)
            return
        yield from self._end_with_error(call, error)

    def _end_with_error(self, call: _Call, error: BatchError) -> Iterator[Result]:
        """End a batch as an error: yielded as an error Result with ``skip``, raised otherwise."""
        batch_id = call.batch.batch_id
        if not self._ledger.end(batch_id):
            self.stats.duplicates_dropped += 1
            return
        self.stats.failed += 1
        self.stats.errors.append(str(error))
        self.events.gave_up(call.worker.name)
        if self.on_error == "skip":
            log.warning("%s; skipped", error)
            result = Result(batch_id, call.batch.rows or 0, None, call.worker.name, error=error)
            if self.on_result:
                self.on_result(result)
            yield result
            return
        raise error

    def _worker_died(self, call: _Call, err: Exception) -> Iterator[Result]:
        """Re-dispatch the dead worker's batch; fail it (named) once it has taken too many workers down.

        Every batch in flight on a worker that dies is counted, since which one killed it is unknown.
        """
        worker, batch = call.worker, call.batch
        if worker.suspect():
            self.stats.worker_deaths += 1
            self.events.worker_died(worker.name)
            log.warning("worker %s died (%s); re-dispatching its batches", worker.name, first_line(err))
        self._attempts[batch.batch_id] += 1
        deaths = self._attempts[batch.batch_id]
        if deaths > self.max_retries:  # the first run and max_retries re-runs all killed a worker
            error = BatchError(batch.batch_id, f"{deaths} workers died running this batch; giving up on it",
                               worker.name)
            yield from self._end_with_error(call, error)
            return
        self._avoid[batch.batch_id] = worker
        self._retry.append(batch)
        self.stats.retried += 1
        self.events.retried(worker.name)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for call in list(self._pending.values()):
            if now - call.started > self.batch_timeout_s and call.worker.live:
                self.stats.hung_batches += 1
                log.error("batch %d on worker %s exceeded batch_timeout_s=%.0f; killing the worker",
                          call.batch.batch_id, call.worker.name, self.batch_timeout_s)
                ray.kill(call.worker.actor, no_restart=False)
                call.started = now  # its failure arrives as RayActorError and is re-dispatched
        for worker in self.workers:
            worker.expire_probe(now, self.probe_timeout_s)

    def _death_summary(self, exhausted: bool) -> str:
        gone = "; ".join(w.gone for w in self.workers if w.gone)
        unrun = sorted(b.batch_id for b in self._retry)
        never = "" if exhausted else f"every batch from {self._taken} on"
        left = ", ".join(filter(None, [", ".join(map(str, unrun)), never])) or "none"
        return (f"all {len(self.workers)} workers died and none could be restarted: {gone} "
                f"({self.stats.worker_deaths} deaths, {self.stats.completed} batches completed before; "
                f"batches not run: {left})")


def in_order(results: Iterator[Result]) -> Iterator[Result]:
    """Re-order a completion stream of batch ids 0, 1, 2, ... into input order."""
    buffer: dict[int, Result] = {}
    next_id = 0
    for result in results:
        buffer[result.batch_id] = result
        while next_id in buffer:
            yield buffer.pop(next_id)
            next_id += 1
    if buffer:
        raise RuntimeError(f"batches {sorted(buffer)[:5]} completed but batch {next_id} never did")

