"""A local Ray cluster with four logical GPUs, started once and restarted if a test shut it down.

Four, so that a module-wide Orchestrator on two of them leaves room for tests that start their own.
"""
from __future__ import annotations

import pytest
import ray
from _util import RAY_GPUS


@pytest.fixture
def ray_local():
    if not ray.is_initialized():
        ray.init(num_cpus=16, num_gpus=RAY_GPUS, include_dashboard=False, configure_logging=False,
                 log_to_driver=False)
    yield
    # Left running for the next test: starting Ray costs seconds.


def pytest_sessionfinish(session, exitstatus):
    if ray.is_initialized():
        ray.shutdown()
