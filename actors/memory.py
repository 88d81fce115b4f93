"""A model's device memory in a worker, checked against what is free before the model is built.

Need = weights (shared by a model's replicas) + per replica: the pipeline's
device buffers (input slots; with CUDA graphs also the slots' static outputs)
and the activations of one full batch. With CUDA graphs a replica also holds a
graph pool of about one largest-bucket batch's activations beside the cache its
eager runs (warm-up, fallback) use, so activations count twice. Weights and
slots follow from the model and the config; activations are probed by running
one batch of ``max_batch_rows`` rows on the device.

Usable memory is what CUDA reports free plus what torch's caching allocator
holds but does not use, times ``HEADROOM`` (the rest is left for cuBLAS and
cuDNN workspaces and fragmentation). Models of one worker are built one after
another, so each sees what the earlier ones left.

On the CPU backend nothing is checked: host memory is not a device's fixed
budget. The arithmetic is the same and is tested on the CPU.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch
from torch.utils import _pytree as pytree

from actors.errors import ModelMemoryError, first_line
from actors.models import BuiltModel, InputSpec
from actors.pipeline import PipelineConfig

log = logging.getLogger(__name__)

HEADROOM = 0.9  # fraction of the free device memory a worker plans to fill


@dataclasses.dataclass(frozen=True)
class MemoryNeed:
    """What one model will hold on its device, in bytes; ``activation_bytes`` is 0 until probed."""

    model: str
    weight_bytes: int
    slot_bytes: int  # one replica's ring of device buffers
    activation_bytes: int  # one batch of max_batch_rows rows, beyond its input
    replicas: int
    graphs: bool

    @property
    def per_replica_bytes(self) -> int:
        return self.slot_bytes + self.activation_bytes * (2 if self.graphs else 1)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.replicas * self.per_replica_bytes

    def describe(self) -> str:
        mib = 1 << 20
        activations = f"activations {self.activation_bytes / mib:,.0f} MiB" + (" x2 for graphs" if self.graphs else "")
        return (f"weights {self.weight_bytes / mib:,.0f} MiB + {self.replicas} replica(s) x "
                f"(slots {self.slot_bytes / mib:,.0f} MiB + {activations})")

    def as_dict(self) -> dict[str, int | bool]:
        return {**dataclasses.asdict(self), "total_bytes": self.total_bytes}


def torch_dtype(numpy_dtype: str) -> torch.dtype:
    return torch.from_numpy(np.empty(0, np.dtype(numpy_dtype))).dtype


def slot_bytes(spec: InputSpec, config: PipelineConfig, out_row_bytes: int = 0) -> int:
    """Device bytes of one pipeline's ring: ``depth`` input slots, plus static outputs when graphs are on."""
    in_row_bytes = int(np.prod(spec.row_shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize
    out = out_row_bytes if config.graphs.enabled else 0
    return config.depth * config.max_batch_rows * (in_row_bytes + out)


def usable_bytes(device: torch.device) -> int:
    """Device memory a new model may plan to use: free + cached-but-unused, times ``HEADROOM``."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int((free + cached) * HEADROOM)


def check_fits(need: MemoryNeed, usable: int, device: torch.device | str) -> None:
    """Raise ``ModelMemoryError`` naming the model when ``need`` exceeds ``usable`` bytes."""
    if need.total_bytes > usable:
        raise ModelMemoryError(need.model, str(device), need.total_bytes, usable, need.describe())


def probe_activations(built: BuiltModel, rows: int, device: torch.device) -> tuple[int, int]:
    """Peak bytes one batch of ``rows`` zero rows allocates beyond its input, and the output bytes per row.

    Runs the model once on the current stream and synchronises the device (start-up only).
    """
    spec = built.input_spec
    x = torch.zeros((rows, *spec.row_shape), dtype=torch_dtype(spec.dtype), device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        out = built.run(x)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    out_row_bytes = sum(t[0].numel() * t.element_size() for t in pytree.tree_leaves(out)
                        if isinstance(t, torch.Tensor) and t.dim() > 0)
    return peak, out_row_bytes


def fit_model(name: str, built: BuiltModel, config: PipelineConfig, replicas: int,
              device: torch.device) -> MemoryNeed:
    """Check that ``built`` with ``replicas`` pipelines fits on ``device``, then move it there.

    On CUDA: weights and slots are checked before anything moves; then the model
    moves, one full batch is probed, and the whole need is checked against the
    memory that was usable at the start. Raises ``ModelMemoryError`` naming the
    model, also for an out-of-memory during the move or the probe. On the CPU:
    only the arithmetic (activations 0), nothing is checked.
    """
    need = MemoryNeed(name, built.weight_bytes(), slot_bytes(built.input_spec, config), 0, replicas,
                      config.graphs.enabled)
    if device.type != "cuda":
        built.to(device)
        return need
    usable = usable_bytes(device)
    check_fits(need, usable, device)
    try:
        built.to(device)
        activations, out_row_bytes = probe_activations(built, config.max_batch_rows, device)
    except torch.cuda.OutOfMemoryError as err:
        built.to("cpu")
        torch.cuda.empty_cache()
        raise ModelMemoryError(name, str(device), need.total_bytes, usable,
                               f"{need.describe()}; ran out of memory moving it or running one batch of "
                               f"{config.max_batch_rows} rows: {first_line(err)}") from err
    need = dataclasses.replace(need, activation_bytes=activations,
                               slot_bytes=slot_bytes(built.input_spec, config, out_row_bytes))
    try:
        check_fits(need, usable, device)
    except ModelMemoryError:
        built.to("cpu")
        torch.cuda.empty_cache()
        raise
    log.info("model %s: %s = %.2f GiB of %.2f GiB usable", name, need.describe(), need.total_bytes / (1 << 30),
             usable / (1 << 30))
    return need
