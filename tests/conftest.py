"""Shared hooks: the GPU skip switch; leaving the test process without the interpreter's teardown."""
from __future__ import annotations

import os
import sys

import pytest
import torch

_EXIT_STATUS = pytest.StashKey[int]()


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


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """When pytest is the program, leave with its exit status as soon as it has reported everything.

    A fresh-clone run of the suite on the 2-core CI VM (one of three, 2026-11-23)
    printed "412 passed" and then died of a segfault in the interpreter's teardown
    of the native extensions (torch, Ray, Triton), so the run exited 139. Every
    test had ended and every result was written by then; skipping that teardown
    keeps such a crash from turning a passing run red. Not done when pytest runs
    inside another program (``pytest.main``), whose process is not ours to end.
    """
    if _EXIT_STATUS not in config.stash or os.path.basename(sys.argv[0]) not in ("pytest", "__main__.py"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[_EXIT_STATUS])
