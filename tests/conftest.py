"""Shared fixtures: the GPU skip switch and a session-scoped local Ray cluster."""
from __future__ import annotations

import os

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    if os.environ.get("ORCH_GPU_TESTS") == "1":
        # On the GPU machine a missing CUDA device must fail, never pass as skipped.
        fail = pytest.mark.usefixtures("_cuda_required")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(fail)
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (set ORCH_GPU_TESTS=1 to make this a failure)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def _cuda_required() -> None:
    pytest.fail("ORCH_GPU_TESTS=1 but torch sees no CUDA device")
