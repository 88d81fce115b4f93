"""Shared hooks: the GPU skip switch."""
from __future__ import annotations

import os

import pytest
import torch


def _gpu_tests_required() -> bool:
    """On the GPU machine (``ORCH_GPU_TESTS=1``) a missing CUDA device must fail GPU tests, never skip them."""
    return os.environ.get("ORCH_GPU_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available() or _gpu_tests_required():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (set ORCH_GPU_TESTS=1 to make this a failure)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if "gpu" in item.keywords and _gpu_tests_required() and not torch.cuda.is_available():
        pytest.fail("ORCH_GPU_TESTS=1 but torch sees no CUDA device")
