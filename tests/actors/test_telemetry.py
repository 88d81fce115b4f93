"""NVML telemetry: unavailable without NVML (for real, where the library is missing), real readings on a GPU,
and the sampling thread."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from actors.telemetry import GpuTelemetry, PeriodicThread, _nvml


def _nvml_loads() -> bool:
    try:
        _nvml()
        return True
    except Exception:
        return False


def test_a_cpu_device_reads_as_unavailable_with_a_reason():
    sample = GpuTelemetry(torch.device("cpu")).read()
    assert not sample.available and sample.reason == "no NVML on a cpu device"
    assert all(v is None for k, v in sample.as_dict().items() if k not in ("available", "reason"))


@pytest.mark.skipif(_nvml_loads(), reason="NVML loads on this machine; this test needs a machine without it")
def test_without_the_nvml_library_a_cuda_device_reads_as_unavailable_and_nothing_raises():
    """The real failure: pynvml cannot find libnvidia-ml on this machine."""
    telemetry = GpuTelemetry(torch.device("cuda", 0))
    sample = telemetry.read()
    assert not telemetry.available and not sample.available
    assert sample.reason.startswith("NVML unavailable: NVMLError") and sample.memory_total_bytes is None


@pytest.mark.gpu
def test_nvml_reads_this_gpu_and_sees_an_allocation():
    device = torch.device("cuda", 0)
    telemetry = GpuTelemetry(device)
    assert telemetry.available, telemetry.reason
    before = telemetry.read()
    total = torch.cuda.get_device_properties(device).total_memory
    # NVML counts memory the driver reserves that CUDA does not report as total: allow 5%.
    assert abs(before.memory_total_bytes - total) <= 0.05 * total, (before.memory_total_bytes, total)
    block = torch.empty(1 << 30, dtype=torch.uint8, device=device).fill_(1)
    torch.cuda.synchronize(device)
    after = telemetry.read()
    assert after.memory_used_bytes - before.memory_used_bytes >= 0.9 * (1 << 30), (before, after)
    assert 0.0 <= after.utilization_ratio <= 1.0
    assert after.power_watts is None or 5.0 < after.power_watts < 2000.0
    del block


def test_periodic_thread_samples_repeatedly_survives_an_error_and_stops_on_close():
    calls: list[float] = []
    first = threading.Event()

    def sample() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            first.set()
            raise RuntimeError("one bad sample")

    thread = PeriodicThread(sample, 0.02, "test-sampler")
    try:
        assert first.wait(5)
        deadline = time.monotonic() + 5
        while len(calls) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        thread.close()
    assert len(calls) >= 4, "the sampler stopped after its first error"
    stopped_at = len(calls)
    time.sleep(0.1)
    assert len(calls) == stopped_at and not thread._thread.is_alive()
    thread.close()  # idempotent


def test_periodic_thread_rejects_a_non_positive_interval():
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        PeriodicThread(lambda: None, 0, "bad")
