"""Split-and-retry of a batch that runs the device out of memory, and the fault that fakes one.

The caching allocator raises ``torch.OutOfMemoryError`` on the host while the
model is being enqueued, so the pipeline reports it synchronously
(``DeviceMemoryError``) and the batch never reaches its D2H copy. Here such a
batch is halved and each half run on its own, recursively, while both halves
keep at least ``min_rows`` rows: at most log2(rows / min_rows) levels, so it
never loops. When even a part of ``min_rows`` rows does not fit (or cannot be
halved), the batch fails with an error naming it.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch
from torch import nn

from actors.engines import Engine
from actors.errors import DeviceMemoryError
from actors.pipeline import BatchResult, Pipeline, concat_outputs

log = logging.getLogger(__name__)


class OomSplitter:
    """Runs batches through an engine (or one pipeline), halving any that runs the device out of memory;
    thread-safe."""

    def __init__(self, runner: Engine | Pipeline, min_rows: int = 1) -> None:
        if min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {min_rows}")
        self.runner = runner
        self.min_rows = min_rows
        self.splits = 0  # halvings done, over every batch
        self._lock = threading.Lock()

    def run(self, batch_id: int, rows: np.ndarray | torch.Tensor) -> BatchResult:
        """Run one batch; returns when its outputs (all its rows, in order) are in host memory."""
        try:
            return self.runner.submit(batch_id, rows).result()
        except DeviceMemoryError as err:
            n = len(rows)
            if n < 2 * self.min_rows:
                raise DeviceMemoryError(batch_id, f"out of device memory at {n} rows and cannot be split further "
                                                  f"(pipeline.oom_min_rows={self.min_rows}): {err.problem}") from err
        # Split outside the except block: the error's traceback holds the failed attempt's device tensors.
        self._count(batch_id, n)
        half = (n + 1) // 2
        first = self.run(batch_id, rows[:half])
        second = self.run(batch_id, rows[half:])
        return BatchResult(batch_id, n, concat_outputs([first.outputs, second.outputs]))

    def _count(self, batch_id: int, rows: int) -> None:
        with self._lock:
            self.splits += 1
            first = self.splits == 1
        if first:
            log.warning("pipeline %s: batch %d ran out of device memory at %d rows; splitting it in halves (down to "
                        "%d rows). Later splits are counted in the worker's stats, not logged.",
                        self.runner.name, batch_id, rows, self.min_rows)

    def stats(self) -> dict[str, int]:
        return {"splits": self.splits, "min_rows": self.min_rows}


class OomAbove(nn.Module):
    """Fault injection (``faults.<worker>.oom_above_rows``): the model raises ``torch.OutOfMemoryError``
    on a call with more than ``limit`` rows, as the caching allocator would, before any kernel runs."""

    def __init__(self, model: nn.Module | Any, limit: int) -> None:
        super().__init__()
        self.model = model
        self.limit = limit

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"fault injection: {x.shape[0]} rows > oom_above_rows={self.limit}")
        return self.model(x, *args, **kwargs)
