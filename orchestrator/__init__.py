"""Batch inference on many GPUs with Ray: the driver's public API."""
from __future__ import annotations

from actors.errors import BatchError, InputError, ModelError, ModelMemoryError, OrchestratorError, UnknownModelError
from orchestrator.api import Orchestrator, WorkerStartError
from orchestrator.config import RunConfig
from orchestrator.dispatch import NoWorkersError, Result
from orchestrator.sources import Npy, Parquet, Synthetic

__all__ = [
    "BatchError", "InputError", "ModelError", "ModelMemoryError", "NoWorkersError", "Npy", "Orchestrator", "OrchestratorError",
    "Parquet", "Result", "RunConfig", "Synthetic", "UnknownModelError", "WorkerStartError",
]
