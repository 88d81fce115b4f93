"""NVML telemetry of one worker's GPU, sampled off the hot path, and the thread that samples it.

``GpuTelemetry.read()`` asks NVML (nvidia-ml-py) for utilisation, memory,
power and PCIe throughput of the device this process computes on. Without NVML
(the CPU backend, a container without the driver library, a GPU NVML cannot
name) every read says ``available=False`` and why; nothing raises. A field the
GPU does not support (power or PCIe counters on some parts) is ``None``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GpuSample:
    """One NVML reading; every number is None when NVML is unavailable or the GPU does not report it."""

    available: bool
    reason: str | None = None  # why telemetry is unavailable
    utilization_ratio: float | None = None  # fraction of the last sample period a kernel ran
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_watts: float | None = None
    pcie_tx_bytes_per_second: float | None = None  # device to host
    pcie_rx_bytes_per_second: float | None = None  # host to device

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=1)
def _nvml() -> Any:
    """The initialised pynvml module, once per process; raises the NVMLError that says why not."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml


class GpuTelemetry:
    """Reads NVML for one torch device. Construction never raises; an unusable device reads as unavailable."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._handle: Any = None
        self._nvml: Any = None
        self.reason: str | None = None
        if device.type != "cuda":
            self.reason = f"no NVML on a {device.type} device"
            return
        try:
            self._nvml = _nvml()
            self._handle = self._find_handle()
        except Exception as err:  # pynvml raises one NVMLError subclass per cause (library missing, no driver, ...)
            self.reason = f"NVML unavailable: {type(err).__name__}: {err}"
            log.warning("%s; GPU telemetry off for %s", self.reason, device)

    @property
    def available(self) -> bool:
        return self._handle is not None

    def _find_handle(self) -> Any:
        """NVML numbers GPUs physically, CUDA after CUDA_VISIBLE_DEVICES: match by UUID, else by PCI bus id."""
        nvml = self._nvml
        props = torch.cuda.get_device_properties(self.device)
        uuid = str(getattr(props, "uuid", ""))
        if uuid:
            try:
                return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
            except nvml.NVMLError as err:
                log.info("NVML does not know UUID %s (%s); trying the PCI bus id", uuid, err)
        bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
        return nvml.nvmlDeviceGetHandleByPciBusId(bus)

    def read(self) -> GpuSample:
        """One reading (about 20 ms: NVML's PCIe counters sample a 20 ms window). Call it off the hot path."""
        if not self.available:
            return GpuSample(available=False, reason=self.reason)
        nvml, handle = self._nvml, self._handle
        memory = self._optional(nvml.nvmlDeviceGetMemoryInfo, handle)
        util = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, handle)
        tx_kbps = self._optional(nvml.nvmlDeviceGetPcieThroughput, handle, nvml.NVML_PCIE_UTIL_TX_BYTES)
        rx_kbps = self._optional(nvml.nvmlDeviceGetPcieThroughput, handle, nvml.NVML_PCIE_UTIL_RX_BYTES)
        return GpuSample(
            available=True,
            utilization_ratio=None if util is None else util.gpu / 100.0,
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            power_watts=None if power_mw is None else power_mw / 1000.0,
            pcie_tx_bytes_per_second=None if tx_kbps is None else tx_kbps * 1024.0,
            pcie_rx_bytes_per_second=None if rx_kbps is None else rx_kbps * 1024.0,
        )

    def _optional(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, or None where this GPU does not support it (or it fails this once)."""
        try:
            return call(*args)
        except self._nvml.NVMLError:
            return None


class PeriodicThread:
    """Calls ``fn`` every ``interval_s`` on a daemon thread until ``close``; an exception is logged, not fatal.

    ``close`` stops the thread and joins it (the call in progress finishes first). Idempotent.
    """

    def __init__(self, fn: Callable[[], None], interval_s: float, name: str) -> None:
        if interval_s <= 0:
            raise ValueError(f"PeriodicThread {name!r}: interval_s must be > 0, got {interval_s!r}")
        self._fn, self._interval_s = fn, interval_s
        self._stop = threading.Event()
        self._failures: set[str] = set()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._fn()
            except Exception as err:
                kind = type(err).__name__
                if kind not in self._failures:  # once per kind: a failing sampler must not flood the log
                    self._failures.add(kind)
                    log.exception("%s: sampling failed (%s); it keeps trying", self._thread.name, kind)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
