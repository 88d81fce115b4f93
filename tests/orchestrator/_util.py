"""Helpers shared by the driver tests."""
from __future__ import annotations

import numpy as np

from orchestrator import RunConfig
from orchestrator.bench.common import reference_outputs

RAY_GPUS = 4  # logical GPUs of the test cluster (tests/orchestrator/conftest.py)


def reference(x: np.ndarray, batch_rows: int = 64, source: str = "zoo:tiny_mlp", seed: int = 0,
              **options) -> np.ndarray:
    """The single-process reference (``reference_outputs``); ``options`` go to ``load_model``."""
    return reference_outputs(x, batch_rows, source, seed, **options)


def check_exactly_once(results, n_batches: int, x: np.ndarray, batch_rows: int) -> None:
    """Every batch id 0..n_batches-1 ended once, and the outputs equal the single-process reference."""
    ids = [r.batch_id for r in results]
    assert sorted(ids) == list(range(n_batches)), "lost or duplicated batches"
    got = np.concatenate([r.outputs for r in sorted(results, key=lambda r: r.batch_id)])
    np.testing.assert_array_equal(got, reference(x, batch_rows=batch_rows))


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def run_config(batch_rows: int, **sections) -> RunConfig:
    """Two workers, ``batch_rows`` per batch, no progress bar; ``sections`` merge over that."""
    base = {"pipeline": {"max_batch_rows": batch_rows}, "dispatch": {"batch_rows": batch_rows, "progress": False},
            "cluster": {"num_workers": 2, "worker_start_timeout_s": 60}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return RunConfig.model_validate(base)
