"""The run configuration: pydantic models that forbid unknown fields, loaded from YAML.

One ``RunConfig`` drives both the Python API and the CLI. YAML goes through
``yaml.safe_load``; dotted overrides (``pipeline.depth=4``) are applied before
validation so that a bad override is reported with its path like any field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from actors.pipeline import PipelineConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which model each worker builds, and how."""

    source: str = Field("zoo:tiny_mlp", description="zoo:NAME, package.module:factory, or a .pt/.pt2 file")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    channels_last: bool = False
    input_dtype: str | None = None
    input_shape: tuple[int, ...] | None = None
    postprocess: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    seed: int = Field(0, description="torch seed set before building, so every worker builds the same random weights")


class ClusterConfig(_Strict):
    """Where the workers run."""

    address: str | None = Field(None, description="None starts a local Ray; 'auto' or 'ray://host:port' attaches")
    num_workers: int | None = Field(None, ge=1, description="default: one per GPU, or cpu_workers without GPUs")
    gpus_per_worker: float = Field(1.0, gt=0, le=1)
    cpu_workers: int = Field(2, ge=1, description="workers started when the cluster has no GPU")
    cpus_per_worker: float = Field(1.0, gt=0)
    dashboard_host: str = "127.0.0.1"
    worker_start_timeout_s: float = Field(120.0, gt=0)
    max_worker_restarts: int = Field(3, ge=0, description="restarts per worker after it dies")


class PipelineSettings(_Strict):
    """Per-worker pipeline (actors.pipeline.PipelineConfig)."""

    depth: int = Field(3, ge=1, le=16)
    max_batch_rows: int = Field(256, ge=1)
    staging_threads: int = Field(8, ge=1, le=64)
    check_finite: bool = False
    timing_every: int = Field(16, ge=0)
    timeline: bool = False

    def build(self) -> PipelineConfig:
        return PipelineConfig(**self.model_dump())


class DispatchConfig(_Strict):
    """How the driver feeds the workers and hands results back."""

    batch_rows: int = Field(256, ge=1, description="rows per batch when the driver splits an array or file")
    inflight_per_worker: int | None = Field(None, ge=1, description="default: pipeline depth + 1")
    ordered: bool = False
    reorder_window: int = Field(64, ge=1, description="max batches dispatched ahead of the oldest unfinished one "
                                                        "in ordered mode (bounds the re-order buffer)")
    batch_timeout_s: float = Field(600.0, gt=0, description="a batch still running after this is treated as hung")
    progress: bool | None = Field(None, description="tqdm progress bar; None: only on a terminal")


class ErrorConfig(_Strict):
    """What a failed batch does to the run."""

    on_error: Literal["raise", "skip", "retry"] = "raise"
    max_retries: int = Field(2, ge=0, description="with on_error=retry: attempts on other workers before giving up")


class InputConfig(_Strict):
    """Where the CLI reads its inputs (the Python API takes them as an argument instead)."""

    kind: Literal["synthetic", "npy", "parquet"] = "synthetic"
    path: str | None = None
    column: str | None = None
    rows: int = Field(4096, ge=1, description="synthetic: total rows")
    seed: int = 0

    @model_validator(mode="after")
    def _path_needed(self) -> InputConfig:
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"input.path is required for input.kind={self.kind!r}")
        return self


class OutputConfig(_Strict):
    path: str | None = Field(None, description="where the CLI writes outputs (.npy or .parquet); None: not written")
    report: str | None = Field(None, description="where the CLI writes the JSON run report")


class FaultConfig(_Strict):
    """Fault injection for tests and drills, per worker name; nothing is injected by default."""

    delay_s: float = Field(0.0, ge=0, description="sleep this long before each batch (a slow worker)")
    raise_on_batches: list[int] = Field(default_factory=list, description="the model raises on these batch ids")
    exit_after_batches: int | None = Field(None, ge=0, description="the worker process exits after this many batches")


class RunConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    errors: ErrorConfig = Field(default_factory=ErrorConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    faults: dict[str, FaultConfig] = Field(default_factory=dict, description="keyed by worker name, e.g. worker-0")

    @field_validator("pipeline")
    @classmethod
    def _pipeline_builds(cls, v: PipelineSettings) -> PipelineSettings:
        v.build()
        return v

    @model_validator(mode="after")
    def _batches_fit_the_pipeline(self) -> RunConfig:
        if self.dispatch.batch_rows > self.pipeline.max_batch_rows:
            raise ValueError(f"dispatch.batch_rows={self.dispatch.batch_rows} exceeds "
                             f"pipeline.max_batch_rows={self.pipeline.max_batch_rows}")
        return self

    @property
    def inflight_per_worker(self) -> int:
        return self.dispatch.inflight_per_worker or self.pipeline.depth + 1

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
        return cls.from_dict(data, overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
        data = dict(data)
        for item in overrides or []:
            apply_override(data, item)
        return cls.model_validate(data)


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` to nested ``data``; the value is parsed as YAML (``4``, ``true``, ``[1, 2]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} must look like section.field=value")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
        else:
            child = node[part] = dict(child)
        node = child
    node[leaf] = yaml.safe_load(raw)
