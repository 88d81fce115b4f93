"""The run configuration: pydantic models that forbid unknown fields, loaded from YAML.

One ``RunConfig`` drives both the Python API and the CLI. YAML goes through
``yaml.safe_load``; dotted overrides (``pipeline.depth=4``) are applied before
validation so that a bad override is reported with its path like any field.
"""
from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from actors.decode import GEMV_MAX_ROWS
from actors.engines import DEFAULT_MODEL, streams_needed
from actors.pipeline import PipelineConfig
from actors.streams import MAX_STREAMS_LIMIT

OUTPUT_SUFFIXES = (".npy", ".parquet")
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which model each worker builds, and how (``actors.models.load_model``)."""

    source: str = Field("zoo:tiny_mlp", description="zoo:NAME, package.module:factory, or a .pt/.pt2 file")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="compute precision")
    channels_last: bool = Field(False, description="channels_last memory format (image models)")
    input_dtype: str | None = Field(None, description="row dtype; needed by a bare nn.Module or TorchScript file")
    input_shape: tuple[Annotated[int, Field(gt=0)], ...] | None = Field(None, description="row shape without the "
                                                                                         "batch dimension")
    postprocess: str | None = Field(None, description="'argmax', 'topkK' (e.g. 'topk5') or 'none'; "
                                                      "default: the model's own ('argmax' for the ResNets)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of a factory or zoo model")
    seed: int = Field(0, description="torch seed set before building, so every worker builds the same random weights")

    @field_validator("input_dtype")
    @classmethod
    def _known_input_dtype(cls, name: str | None) -> str | None:
        from actors.models import input_numpy_dtype

        return None if name is None else input_numpy_dtype(name).name

    @field_validator("postprocess")
    @classmethod
    def _known_postprocess(cls, name: str | None) -> str | None:
        from actors.errors import ModelLoadError
        from actors.zoo import build_postprocess

        if name is not None:
            try:
                build_postprocess(name, torch.float32)
            except ModelLoadError as err:
                raise ValueError(str(err)) from None
        return name

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        from actors.models import FILE_SUFFIXES
        from actors.zoo import ZOO

        if source.startswith("zoo:"):
            name = source.removeprefix("zoo:")
            if name not in ZOO:
                raise ValueError(f"unknown zoo model {name!r}; known: {', '.join('zoo:' + n for n in sorted(ZOO))}")
        elif not (_FACTORY.fullmatch(source) or source.endswith(FILE_SUFFIXES)):
            raise ValueError(f"{source!r} is none of zoo:NAME, package.module:factory, or a model file "
                             f"({', '.join(FILE_SUFFIXES)})")
        return source


class NamedModelConfig(ModelConfig):
    """One of several models every worker hosts (``models:``), on its own streams (actors.engines)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][\w.-]*$", description="what requests name: "
                                                                       "Orchestrator.map(inputs, model=NAME)")
    replicas: int = Field(1, ge=1, le=8, description="pipelines of this model per worker, each on its own compute "
                                                     "stream; a batch goes to the least busy")
    priority: Literal["low", "normal", "high"] = Field("normal", description="CUDA priority of this model's streams: "
                                                                             "its kernels go ahead of lower ones")


class ClusterConfig(_Strict):
    """Where the workers run."""

    address: str | None = Field(None, description="None: RAY_ADDRESS if set (as inside a Ray job), else the cluster "
                                                  "`ray start` left on this machine, else a new local Ray; "
                                                  "'auto' or 'ray://host:port' attaches; 'local' always starts one")
    num_workers: int | None = Field(None, ge=1, description="default: one per GPU, or cpu_workers without GPUs")
    gpus_per_worker: float = Field(1.0, gt=0, le=1, description="a fraction packs several workers on one GPU")
    cpu_workers: int = Field(2, ge=1, description="workers started when the cluster has no GPU")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each worker")
    dashboard_host: str = Field("127.0.0.1", description="dashboard address for a Ray started here; the Orchestrator "
                                                         "starts it without a dashboard, so this has no effect today")
    worker_start_timeout_s: float = Field(120.0, gt=0, description="deadline for every worker to build its model "
                                                                   "and answer (Ray waits forever for resources)")
    max_worker_restarts: int = Field(3, ge=0, description="restarts per worker after it dies")


class GraphSettings(_Strict):
    """CUDA graphs for the compute stage (actors.graphs.GraphConfig); always off on the CPU backend."""

    enabled: bool = Field(False, description="replay a captured graph per batch-size bucket instead of eager "
                                             "kernels; exact only for row-independent (eval-mode) models")
    buckets: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="batch sizes to capture (a batch pads up to the next one); default: powers "
                                        "of two below pipeline.max_batch_rows, and max_batch_rows itself")
    capture: Literal["startup", "first_use"] = Field("startup", description="capture every bucket when the worker "
                                                                             "starts, or each on its first batch")
    warmup_iters: int = Field(3, ge=1, description="eager runs per bucket before its capture")


class PipelineSettings(_Strict):
    """Per-worker pipeline (actors.pipeline.PipelineConfig)."""

    depth: int = Field(3, ge=1, le=16, description="ring slots: copy-in, compute and copy-out overlap")
    max_batch_rows: int = Field(256, ge=1, description="rows per slot")
    staging_threads: int = Field(8, ge=1, le=64, description="host threads copying into and out of pinned memory")
    check_finite: bool = Field(False, description="reject batches with NaN/inf before any device work")
    timing_every: int = Field(16, ge=0, description="time one batch in N with CUDA events (0: never)")
    timeline: bool = Field(False, description="keep per-batch spans for a Chrome trace")
    oom_min_rows: int = Field(1, ge=1, description="a batch that runs the device out of memory is halved and "
                                                   "retried while both halves keep this many rows")
    graphs: GraphSettings = Field(default_factory=GraphSettings)
    pin_in_place_gb: float = Field(16.0, ge=0, description="host memory (Ray's object store, large arrays) registered "
                                                           "with CUDA so batches are copied in without staging; "
                                                           "0: always stage through the pinned slots")

    @model_validator(mode="after")
    def _buckets_fit(self) -> PipelineSettings:
        buckets = self.graphs.buckets
        if buckets and max(buckets) > self.max_batch_rows:
            raise ValueError(f"pipeline.graphs.buckets reaches {max(buckets)}, above "
                             f"pipeline.max_batch_rows={self.max_batch_rows}")
        return self

    def build(self) -> PipelineConfig:
        return PipelineConfig(**self.model_dump())


class DispatchConfig(_Strict):
    """How the driver feeds the workers and hands results back."""

    batch_rows: int = Field(256, ge=1, description="rows per batch when the driver splits an array or file")
    inflight_per_worker: int | None = Field(None, ge=1, description="default: pipeline depth + 1")
    ordered: bool = Field(False, description="yield results in input order (the CLI writes outputs in input "
                                             "order either way)")
    reorder_window: int = Field(64, ge=1, description="max batches dispatched ahead of the oldest unfinished one "
                                                        "in ordered mode (bounds the re-order buffer)")
    batch_timeout_s: float = Field(600.0, gt=0, description="a batch still running after this is treated as hung")
    progress: bool | None = Field(None, description="tqdm progress bar; None: only on a terminal (the CLI logs "
                                                    "progress lines instead when stderr is not a terminal)")


class ErrorConfig(_Strict):
    """What a failed batch does to the run."""

    on_error: Literal["raise", "skip", "retry"] = Field(
        "raise", description="raise: stop the run; skip: record the batch as failed and go on; "
                             "retry: run it again on another worker")
    max_retries: int = Field(2, ge=0, description="with on_error=retry: attempts on other workers before giving up")


_INPUT_KINDS = {".npy": "npy", ".parquet": "parquet"}


class InputConfig(_Strict):
    """Where the CLI reads its inputs (the Python API takes them as an argument instead)."""

    kind: Literal["synthetic", "npy", "parquet"] = Field(
        "synthetic", description="default: npy or parquet from the suffix of path, else synthetic")
    path: str | None = Field(None, description="npy/parquet: the file (on several nodes, on a shared file system)")
    column: str | None = Field(None, description="parquet: the column to read (needed when there are several)")
    model: str | None = Field(None, description="the model (a name from models) the CLI's input goes to; "
                                                 "default: the first")
    rows: int = Field(4096, ge=1, description="synthetic: total rows (ignored for files)")
    seed: int = Field(0, description="synthetic: random seed (ignored for files)")

    @model_validator(mode="before")
    @classmethod
    def _kind_from_suffix(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") is None and isinstance(data.get("path"), str):
            kind = _INPUT_KINDS.get(Path(data["path"]).suffix)
            if kind is None:
                raise ValueError(f"input.path {data['path']!r}: set input.kind (npy or parquet); the suffix does "
                                 f"not say which")
            data = {**data, "kind": kind}
        return data

    @model_validator(mode="after")
    def _fields_match_kind(self) -> InputConfig:
        # A path or column that the kind ignores would silently run on the wrong data; rows and
        # seed are only ever synthetic settings, so a file config may keep them.
        if self.kind == "synthetic" and self.path:
            raise ValueError(f"input.path is set but input.kind is 'synthetic'; set input.kind to npy or parquet, "
                             f"or leave it out to take it from the suffix of {self.path!r}")
        if self.kind != "synthetic" and not self.path:
            raise ValueError(f"input.path is required for input.kind={self.kind!r}")
        if self.column is not None and self.kind != "parquet":
            raise ValueError(f"input.column is only read for parquet, not input.kind={self.kind!r}")
        return self


class OutputConfig(_Strict):
    """What the CLI writes, each file atomically (a temporary file, then a rename)."""

    path: str | None = Field(None, description="outputs in input order with their batch ids: .npy (plus "
                                               ".batch_ids.npy) or .parquet; None: not written")
    report: str | None = Field(None, description="the JSON run report")
    timeline: str | None = Field(None, description="a Chrome-trace/Perfetto JSON of the timed batches, one track "
                                                   "per stream per worker; setting it turns on pipeline.timeline")

    @field_validator("path")
    @classmethod
    def _known_suffix(cls, path: str | None) -> str | None:
        if path is not None and not path.endswith(OUTPUT_SUFFIXES):
            raise ValueError(f"must end in .npy or .parquet, got {path!r}")
        return path


class MetricsConfig(_Strict):
    """What a run tells while it runs: progress lines and Prometheus metrics (orchestrator.metrics)."""

    log_every_s: float = Field(10.0, ge=0, description="the CLI prints a progress line (rows, rows/s, failures) "
                                                       "this often when stderr is not a terminal, e.g. in a Ray "
                                                       "job's log; 0: only the last one")
    export: bool = Field(True, description="record Prometheus metrics through Ray (ray.util.metrics), served on "
                                           "each node's Ray metrics endpoint")
    sample_s: float = Field(5.0, gt=0, description="workers sample their pipeline stats and NVML, and the driver "
                                                   "its in-flight gauges, this often")
    export_port: int | None = Field(None, ge=1, le=65535, description="the metrics port of a Ray the Orchestrator "
                                                                      "starts itself (None: Ray picks one); "
                                                                      "for a cluster: ray start "
                                                                      "--metrics-export-port")


class DecodeConfig(_Strict):
    """Autoregressive decode instead of batch inference (DESIGN.md, "Autoregressive decode").

    Each worker runs ``actors.decode.Generator`` on the model (a decoder:
    ``zoo:gpt2_small``, ``zoo:tiny_decoder`` or a factory returning
    ``actors.decode.Decoder``); the input rows are int64 prompts and each row's
    output is its ``max_new_tokens`` generated tokens, ``pad_token_id`` after its EOS.
    """

    max_new_tokens: int = Field(..., ge=1, description="tokens generated per prompt at most")
    eos_token_id: int | None = Field(None, ge=0, description="a sequence ends at this token; None: never early")
    pad_token_id: int = Field(0, ge=0, description="emitted by a sequence after its EOS")
    loop: Literal["naive", "synced", "interleaved"] = Field(
        "interleaved", description="interleaved: two streams in ping-pong, the end-of-sequence check of step t "
                                   "overlaps step t+1; synced: a host sync per token; naive: no KV cache")
    max_seq_len: int | None = Field(None, ge=2, description="KV cache positions per sequence (prompt + new "
                                                            "tokens); default: the model's prompt length + "
                                                            "max_new_tokens")
    temperature: float = Field(0.0, ge=0, description="0: greedy; above: seeded sampling")
    seed: int = Field(0, ge=0, description="sampling seed; the noise is keyed by (seed, batch id, row, step)")
    graphs: bool = Field(True, description="replay each decode step as a CUDA graph (off on the CPU backend)")
    compile: bool = Field(False, description="fuse the decode step's kernels with torch.compile before its capture "
                                             "(CUDA only; compiles once per batch-size bucket, needs a C compiler)")
    kernels: bool = Field(False, description="decode steps run hand-written Triton kernels "
                                             "(actors.decode_kernels; CUDA only; float32 weights: batch-size "
                                             f"buckets of up to {GEMV_MAX_ROWS} rows)")
    prefill_graphs: int = Field(8, ge=0, description="(batch-size bucket, prompt length) pairs whose step 0 "
                                                     "(reset + prefill) replays as a CUDA graph, each captured "
                                                     "at its first batch, up to 4,096 prompt tokens; 0: eager")


class FaultConfig(_Strict):
    """Fault injection for tests and drills, per worker name; nothing is injected by default."""

    delay_s: float = Field(0.0, ge=0, description="sleep this long before each batch (a slow worker)")
    raise_on_batches: list[int] = Field(default_factory=list, description="the model raises on these batch ids")
    exit_after_batches: int | None = Field(None, ge=0, description="the worker process exits after this many batches")
    exit_on_batches: list[int] = Field(default_factory=list,
                                       description="the worker process exits when it receives these batch ids "
                                                   "(a poison batch)")
    oom_above_rows: int | None = Field(None, ge=2, description="the model raises torch.OutOfMemoryError on calls "
                                                               "with more rows (at least 2: the worker probes its "
                                                               "model with 2 rows at start-up)")


class RunConfig(_Strict):
    """A whole run. Sections are validated in this order, so a cross-section check sees the earlier ones."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    models: list[NamedModelConfig] | None = Field(None, min_length=1, description="several models per worker, "
                                                                                  "instead of model")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    pipeline: PipelineSettings = Field(default_factory=PipelineSettings)
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
    errors: ErrorConfig = Field(default_factory=ErrorConfig)
    input: InputConfig = Field(default_factory=InputConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    decode: DecodeConfig | None = Field(None, description="autoregressive decode instead of batch inference")
    faults: dict[str, FaultConfig] = Field(default_factory=dict, description="keyed by worker name, e.g. worker-0")

    @field_validator("models")
    @classmethod
    def _models_fit_a_worker(cls, models: list[NamedModelConfig] | None,
                             info: ValidationInfo) -> list[NamedModelConfig] | None:
        if models is None:
            return models
        # A default model section is allowed beside models, so a dumped config validates again.
        if info.data.get("model", ModelConfig()) != ModelConfig():
            raise ValueError("set either model (one model) or models (several), not both")
        names = [m.name for m in models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"names must be unique; {', '.join(map(repr, twice))} appear more than once")
        need = streams_needed([m.replicas for m in models])
        if need > MAX_STREAMS_LIMIT:
            raise ValueError(f"{sum(m.replicas for m in models)} replicas of {len(models)} models need {need} "
                             f"streams (2 per replica + 1 per model), a worker has {MAX_STREAMS_LIMIT}; "
                             f"lower the replicas")
        return models

    @field_validator("decode")
    @classmethod
    def _decode_has_one_model(cls, v: DecodeConfig | None, info: ValidationInfo) -> DecodeConfig | None:
        if v is not None and info.data.get("models"):
            raise ValueError("decode runs the one decoder of the model section; models (several) is for batch "
                             "inference")
        return v

    @field_validator("pipeline")
    @classmethod
    def _pipeline_builds(cls, v: PipelineSettings) -> PipelineSettings:
        v.build()
        return v

    @field_validator("dispatch")
    @classmethod
    def _batches_fit_the_pipeline(cls, v: DispatchConfig, info: ValidationInfo) -> DispatchConfig:
        pipeline = info.data.get("pipeline")
        if pipeline and v.batch_rows > pipeline.max_batch_rows:
            raise ValueError(f"dispatch.batch_rows={v.batch_rows} exceeds "
                             f"pipeline.max_batch_rows={pipeline.max_batch_rows}")
        return v

    @field_validator("input")
    @classmethod
    def _input_model_exists(cls, v: InputConfig, info: ValidationInfo) -> InputConfig:
        if v.model is None or "models" not in info.data:
            return v
        models = info.data["models"]
        names = [m.name for m in models] if models else [DEFAULT_MODEL]
        if v.model not in names:
            raise ValueError(f"input.model: {v.model!r} is not a model of this config; known: "
                             f"{', '.join(map(repr, names))}")
        return v

    @property
    def inflight_per_worker(self) -> int:
        """Batches in flight per worker for one pipeline (a model's window is this times its replicas)."""
        return self.dispatch.inflight_per_worker or self.pipeline.depth + 1

    @property
    def model_names(self) -> list[str]:
        """The models every worker hosts; the first is the default."""
        return [m.name for m in self.models] if self.models else [DEFAULT_MODEL]

    @property
    def input_model(self) -> str:
        """The model the CLI's input goes to: ``input.model``, else the first."""
        return self.input.model or self.model_names[0]

    def engine_specs(self) -> list[dict[str, Any]]:
        """Each model as plain values for the worker (``actors.engines.EngineSpec``); a lone ``model`` is
        named ``default``, with one replica at normal priority."""
        if not self.models:
            return [{"name": DEFAULT_MODEL, "model": self.model.model_dump(), "replicas": 1, "priority": "normal"}]
        return [{"name": m.name, "model": m.model_dump(exclude={"name", "replicas", "priority"}),
                 "replicas": m.replicas, "priority": m.priority} for m in self.models]

    def window(self, model: str) -> int:
        """The in-flight window of ``model`` on each worker: ``inflight_per_worker`` per replica."""
        replicas = {m.name: m.replicas for m in self.models} if self.models else {DEFAULT_MODEL: 1}
        return self.inflight_per_worker * replicas[model]

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> RunConfig:
        """Load ``path`` with ``yaml.safe_load``, apply dotted ``overrides``, then validate.

        A key given twice in one mapping is an error: ``safe_load`` would keep the last silently.
        """
        text = Path(path).read_text()
        if twice := _keys_given_twice(text):
            raise ValueError(f"keys given twice (only the last would count): {', '.join(twice)}")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError(f"the top level must be a mapping of sections, got {type(data).__name__}")
        return cls.from_dict(data, overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
        data = dict(data)
        for item in overrides or []:
            apply_override(data, item)
        return cls.model_validate(data)


def _keys_given_twice(text: str) -> list[str]:
    """Each key repeated within one mapping, as ``'key' (lines a and b)``, read from YAML's node graph
    (``yaml.compose`` with the safe loader builds no Python objects)."""
    found: list[tuple[int, str]] = []
    pending = [yaml.compose(text, Loader=yaml.SafeLoader)]
    seen: set[int] = set()  # an alias shares its anchor's node, and may point back up the tree
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            pending.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            line_of: dict[str, int] = {}
            for key, value in node.value:
                pending.append(value)
                if not isinstance(key, yaml.ScalarNode):
                    continue
                line = key.start_mark.line + 1
                if key.value in line_of:
                    found.append((line_of[key.value], f"{key.value!r} (lines {line_of[key.value]} and {line})"))
                else:
                    line_of[key.value] = line
    return [entry for _, entry in sorted(found)]


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` to nested ``data``; the value is parsed as YAML (``4``, ``true``, ``[1, 2]``, ``null``).

    A number indexes a list (``models.1.replicas=3``). Sections and lists on the path are copied,
    never mutated, so ``data``'s nested values may be shared. An empty value (``output.path=``) is ``null``.
    """
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ValueError(f"override {item!r} must look like section.field=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: the value is not valid YAML: {err}") from err
    node: dict[str, Any] | list[Any] = data
    for depth, part in enumerate(parts[:-1]):
        where = _key_in(node, part, item, parts[:depth])
        child = node[where] if isinstance(node, list) else node.get(where)
        if child is None and parts[depth + 1].isdigit():
            raise ValueError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is not set, so it has no item "
                             f"{parts[depth + 1]}; give the whole list")
        if not isinstance(child, (dict, list, type(None))):
            raise ValueError(f"override {item!r}: {'.'.join(parts[:depth + 1])} is {child!r}, not a section")
        node[where] = child = {} if child is None else type(child)(child)
        node = child
    node[_key_in(node, parts[-1], item, parts[:-1])] = value


def _key_in(node: dict[str, Any] | list[Any], part: str, item: str, path: list[str]) -> Any:
    """``part`` as a key of ``node``: itself in a section, an index in a list (which must exist)."""
    if not isinstance(node, list):
        return part
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"override {item!r}: {'.'.join(path)} is a list of {len(node)}; {part!r} is not one "
                         f"of its indexes")
    return int(part)


def describe_errors(err: ValidationError) -> list[str]:
    """One line per bad field: its dotted path, what is wrong, and the value given.

    An unknown field also names the closest known one, so a typo reads as one. A
    cross-field check reports on its section and names the fields in its text.
    """
    lines = []
    for e in err.errors():
        loc = ".".join(map(str, e["loc"])) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = _fields_at(e["loc"][:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            msg = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
            if known:
                msg += f"; known: {', '.join(known)}"
        elif e["type"] == "value_error":  # this module's own checks name the field and the value
            if msg.startswith(loc + "."):
                lines.append(msg)
                continue
        elif not isinstance(e.get("input"), dict):
            shown = repr(e.get("input"))
            msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
        lines.append(f"{loc}: {msg}")
    return lines


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model at ``loc`` inside a RunConfig; the key under a dict section is skipped."""
    model: Any = RunConfig
    key_next = False
    for part in loc:
        if key_next:  # e.g. the worker name in faults.worker-0.delay_s
            key_next = False
            continue
        if isinstance(part, int):  # an item of a list section, e.g. models.0.name
            continue
        if model is None or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        key_next = typing.get_origin(annotation) is dict
        model = _model_in(annotation)
    return list(model.model_fields) if model is not None and not key_next else []


def _model_in(annotation: Any) -> Any:
    """The pydantic model an annotation holds: ``X``, ``X | None`` or ``dict[str, X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in reversed(typing.get_args(annotation)):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
