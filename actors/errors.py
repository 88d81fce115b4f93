"""The project's error hierarchy, rooted in one base class.

Every error keeps its constructor arguments in ``args`` and builds its text in
``__str__``, so it survives pickling across the Ray actor boundary unchanged.
"""
from __future__ import annotations


class OrchestratorError(Exception):
    """Base class of every error this project raises on purpose."""


class StreamLimitError(OrchestratorError, RuntimeError):
    """More user streams alive than the manager's ``max_streams`` allows."""

    def __init__(self, alive: int, limit: int) -> None:
        super().__init__(alive, limit)
        self.alive, self.limit = alive, limit

    def __str__(self) -> str:
        return (f"stream limit reached: {self.alive} user streams alive, max_streams={self.limit}; "
                f"destroy a stream or raise max_streams (at most 16)")


class CudaError(OrchestratorError, RuntimeError):
    """A CUDA call failed; carries CUDA's own message."""

    def __init__(self, what: str, cuda_message: str) -> None:
        super().__init__(what, cuda_message)
        self.what, self.cuda_message = what, cuda_message

    def __str__(self) -> str:
        return f"{self.what} failed: {self.cuda_message}"


class ModelLoadError(OrchestratorError, ValueError):
    """A model could not be loaded or built from its source."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class BatchError(OrchestratorError):
    """One batch failed; names the batch (and the worker, once known)."""

    def __init__(self, batch_id: int, problem: str, worker: str | None = None) -> None:
        super().__init__(batch_id, problem, worker)
        self.batch_id, self.problem, self.worker = batch_id, problem, worker

    def __str__(self) -> str:
        where = f" on worker {self.worker}" if self.worker else ""
        return f"batch {self.batch_id}{where}: {self.problem}"


class InputError(BatchError, ValueError):
    """A batch was rejected before any device work: wrong dtype, shape, empty, non-finite."""


class ModelError(BatchError, RuntimeError):
    """The model (or its pre/post-processing) raised on one batch; other batches are unaffected."""


class DeviceMemoryError(ModelError):
    """The device ran out of memory on one batch; the same batch in smaller parts may fit."""


class PipelineBrokenError(OrchestratorError, RuntimeError):
    """The device context failed (e.g. a device-side assert); the process must exit to recover."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause

    def __str__(self) -> str:
        return f"pipeline unusable after a device failure: {self.cause}"


class UnknownModelError(OrchestratorError, LookupError):
    """A request named a model that this worker or config does not have."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name, known)
        self.name, self.known = name, known

    def __str__(self) -> str:
        return f"unknown model {self.name!r}; known: {', '.join(repr(k) for k in self.known)}"


class ModelMemoryError(OrchestratorError, RuntimeError):
    """A model would not fit in the device memory left when it is built (raised at start-up, not mid-run)."""

    def __init__(self, model: str, device: str, need_bytes: int, free_bytes: int, detail: str) -> None:
        super().__init__(model, device, need_bytes, free_bytes, detail)
        self.model, self.device, self.need_bytes, self.free_bytes, self.detail = \
            model, device, need_bytes, free_bytes, detail

    def __str__(self) -> str:
        gib = 1 << 30
        return (f"model {self.model!r} does not fit on {self.device}: needs about {self.need_bytes / gib:.2f} GiB "
                f"({self.detail}), {self.free_bytes / gib:.2f} GiB usable; lower its replicas, "
                f"pipeline.max_batch_rows or pipeline.depth, or give it a GPU of its own")


def first_line(err: BaseException) -> str:
    """The first line of an error's text (Ray's and CUDA's run on with tracebacks and hints), or its type."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def one_line(err: BaseException) -> str:
    """``Type: first line`` of an error: what it was, when it is reported as another error's cause."""
    return f"{type(err).__name__}: {first_line(err)}"
