"""How close a pipeline runs to its hardware bound, and which stage binds.

Copy ceilings (pinned H2D and D2H bandwidth) are measured once per device per
process and cached. A pipeline's steady-state rate is bounded by its slowest
stage; the stage times come from the pipeline's sampled CUDA events.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics

import torch

from actors.pipeline import PipelineStats

_CEILING_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class CopyCeilings:
    h2d_gbps: float
    d2h_gbps: float


@functools.lru_cache(maxsize=None)
def copy_ceilings(device: torch.device) -> CopyCeilings | None:
    """Pinned copy bandwidth of ``device`` in GB/s (median of 5 copies of 256 MiB); None on the CPU."""
    if device.type != "cuda":
        return None
    host = torch.empty(_CEILING_BYTES, dtype=torch.uint8, pin_memory=True).random_()
    dev = torch.empty(_CEILING_BYTES, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))  # the buffers were made on the current stream

    def rate(dst: torch.Tensor, src: torch.Tensor) -> float:
        times = []
        with torch.cuda.stream(stream):
            for _ in range(6):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                end.record(stream)
                end.synchronize()
                times.append(start.elapsed_time(end))
        return _CEILING_BYTES / (statistics.median(times[1:]) * 1e-3) / 1e9

    return CopyCeilings(h2d_gbps=rate(dev, host), d2h_gbps=rate(host, dev))


@dataclasses.dataclass(frozen=True)
class BoundReport:
    binding_stage: str | None
    achieved_rows_per_second: float | None
    stage_capacity_rows_per_second: dict[str, float]
    bound_rows_per_second: float | None  # what the binding stage allows at its hardware ceiling
    fraction_of_bound: float | None
    line: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def analyse(stats: PipelineStats, ceilings: CopyCeilings | None) -> BoundReport:
    """Name the binding stage and how close the achieved rate comes to what it allows.

    For H2D and D2H the bound is the measured copy ceiling (the hardware limit);
    for staging and compute it is the stage's own measured rate.
    """
    achieved = stats.rows / stats.busy_seconds if stats.busy_seconds else None
    if not stats.timed_rows or achieved is None:
        return BoundReport(None, achieved, {}, None, None, "no timed batches yet")
    capacity = {s: stats.timed_rows / (ms * 1e-3) for s, ms in stats.stage_ms_total.items() if ms > 0}
    stage = min(capacity, key=capacity.get)
    bytes_per_row = {"h2d": stats.bytes_in / stats.rows, "d2h": stats.bytes_out / stats.rows}
    if stage in bytes_per_row and ceilings is not None:
        ceiling_gbps = ceilings.h2d_gbps if stage == "h2d" else ceilings.d2h_gbps
        bound = ceiling_gbps * 1e9 / bytes_per_row[stage]
        got_gbps = achieved * bytes_per_row[stage] / 1e9
        line = (f"{stage.upper()}-bound: {got_gbps:.1f} of {ceiling_gbps:.1f} GB/s, "
                f"{100 * achieved / bound:.0f}%")
    else:
        bound = capacity[stage]
        line = (f"{stage}-bound: {achieved:,.0f} of {bound:,.0f} rows/s that the {stage} stage sustains alone, "
                f"{100 * achieved / bound:.0f}%")
    return BoundReport(stage, achieved, capacity, bound, achieved / bound, line)
