"""Loading a model from its source string into a ``BuiltModel``: the zoo, an import path, or a saved file.

Models are built on the CPU; ``BuiltModel.to`` moves them to the device. Every
failure is a ``ModelLoadError`` naming the source and, in its text, the cause:
the chained ``__cause__`` does not survive pickling across the Ray boundary.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import pickle
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from actors.errors import ModelLoadError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")
EXPORT_SUFFIX = ".pt2"
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it at each call
FILE_SUFFIXES = (*TORCHSCRIPT_SUFFIXES, EXPORT_SUFFIX)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One input row: numpy dtype name (e.g. ``"uint8"``) and shape without the batch dimension."""

    dtype: str
    row_shape: tuple[int, ...]


@dataclasses.dataclass
class BuiltModel:
    """A model ready for the pipeline: ``postprocess(model(preprocess(x)))`` on one device."""

    model: nn.Module | Callable[..., Any]
    input_spec: InputSpec
    preprocess: nn.Module | None
    postprocess: nn.Module | None
    name: str

    def to(self, device: torch.device | str) -> BuiltModel:
        for part in (self.model, self.preprocess, self.postprocess):
            if isinstance(part, nn.Module):
                part.to(device)
        return self

    def run(self, x: torch.Tensor) -> Any:
        """``postprocess(model(preprocess(x)))`` on the current stream; the caller chooses grad mode."""
        if self.preprocess is not None:
            x = self.preprocess(x)
        y = self.model(x)
        if self.postprocess is not None:
            y = self.postprocess(y)
        return y

    def weight_bytes(self) -> int:
        """Bytes of the parameters and buffers of every ``nn.Module`` part (0 for a bare callable)."""
        return sum(t.numel() * t.element_size()
                   for part in (self.model, self.preprocess, self.postprocess) if isinstance(part, nn.Module)
                   for t in (*part.parameters(), *part.buffers()))


def load_model(source: str, *, dtype: str = "float32", channels_last: bool = False,
               input_dtype: str | None = None, input_shape: Sequence[int] | None = None,
               postprocess: str | None = None, kwargs: dict[str, Any] | None = None) -> BuiltModel:
    """Build the model ``source`` names, on the CPU.

    ``source`` is ``zoo:NAME``, ``package.module:factory`` (called with ``kwargs``;
    returns an ``nn.Module`` or a ``BuiltModel``), a TorchScript file (``.pt``,
    ``.pth``, ``.ts``) or a ``torch.export`` file (``.pt2``). A bare module needs
    ``input_dtype`` and ``input_shape``; a ``BuiltModel`` from a factory is used
    as returned, so the options that would change it must not be set.
    """
    from actors.zoo import ZOO  # zoo imports InputSpec and BuiltModel from this module

    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    compute_dtype = DTYPES[dtype]
    kwargs = dict(kwargs or {})
    options = dict(compute_dtype=compute_dtype, channels_last=channels_last, postprocess=postprocess)

    if source.startswith("zoo:"):
        name = source.removeprefix("zoo:")
        if name not in ZOO:
            raise ModelLoadError(f"unknown zoo model {name!r}; known: {', '.join(sorted(ZOO))}")
        built = _call(source, "building it", functools.partial(
            ZOO[name], dtype=compute_dtype, channels_last=channels_last, postprocess=postprocess, **kwargs))
        _check_input_spec(source, built.input_spec, input_dtype, input_shape)
        return built

    if source.endswith(FILE_SUFFIXES):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"model file {source!r} does not exist")
        if path.suffix == EXPORT_SUFFIX:
            # The exported graph fixed train/eval behaviour at export time; its module refuses .eval().
            module = _call(source, "torch.export.load", lambda: _load_exported(path))
            return _wrap(source, path.name, module, input_dtype, input_shape, set_eval=False, **options)
        module = _call(source, "torch.jit.load (is it a TorchScript archive from torch.jit.save?)",
                       lambda: torch.jit.load(path, map_location="cpu"))
        return _wrap(source, path.name, module, input_dtype, input_shape, **options)

    module_name, _, attr = source.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"unrecognised model source {source!r}; expected zoo:NAME, package.module:factory, "
                             f"or a file ending in {', '.join(FILE_SUFFIXES)}")
    py_module = _call(source, f"importing module {module_name!r}", lambda: importlib.import_module(module_name))
    try:
        factory = functools.reduce(getattr, attr.split("."), py_module)
    except AttributeError as err:
        raise ModelLoadError(f"model source {source!r}: module {module_name!r} has no attribute {attr!r}") from err
    if not callable(factory):
        raise ModelLoadError(f"model source {source!r}: {attr!r} ({type(factory).__name__}) is not callable")
    result = _call(source, "calling the factory", lambda: factory(**kwargs))
    if isinstance(result, BuiltModel):
        changed = [f"{key}={value!r}" for key, value, default in (
            ("dtype", dtype, "float32"), ("channels_last", channels_last, False),
            ("postprocess", postprocess, None)) if value != default]
        if changed:
            raise ModelLoadError(f"model source {source!r}: the factory returned a BuiltModel, which is used as "
                                 f"returned, so {', '.join(changed)} cannot apply; pass it through kwargs")
        _check_input_spec(source, result.input_spec, input_dtype, input_shape)
        return result
    if isinstance(result, nn.Module):
        return _wrap(source, source, result, input_dtype, input_shape, **options)
    raise ModelLoadError(f"model source {source!r}: the factory returned {type(result).__name__}; "
                         f"expected an nn.Module or a BuiltModel")


def _load_exported(path: Path) -> nn.Module:
    """``torch.export.load(path).module()``, without unpickling anything but tensors.

    ``torch.export.load`` unpickles parts of the archive freely: payloads flagged
    ``use_pickle`` and older layouts with ``torch.load(weights_only=False)``,
    sample inputs that fail a weights-only load by falling back to it, opaque
    constants with ``pickle.loads``, any of which runs code. Constants that are
    not plain tensors are refused here, and every ``torch.load`` inside is
    forced to ``weights_only=True`` (``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read at
    each call; the worker loads one model at a time at start-up).
    """
    from torch.export.pt2_archive.constants import TENSOR_CONSTANT_FILENAME_PREFIX

    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.endswith("_constants_config.json"):
                continue
            for fqn, entry in json.loads(archive.read(name)).get("config", {}).items():
                if not str(entry.get("path_name", "")).startswith(TENSOR_CONSTANT_FILENAME_PREFIX):
                    raise ModelLoadError(f"constant {fqn!r} is a pickled Python object ({entry.get('path_name')}); "
                                         f"only tensor constants are loaded")
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        return torch.export.load(path).module()
    except pickle.UnpicklingError as err:
        raise ModelLoadError("the archive holds pickled Python objects, not only tensors: refused, since "
                             "unpickling them could run code") from err
    finally:
        if previous is None:
            del os.environ[_FORCE_WEIGHTS_ONLY]
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def _call(source: str, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:
        detail = str(err) if isinstance(err, ModelLoadError) else f"{type(err).__name__}: {err}"
        raise ModelLoadError(f"model source {source!r}: {what} failed: {detail}") from err


def input_numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype ``name`` means, if torch has it too (input rows are handed to torch as they are)."""
    try:
        dtype = np.dtype(name)
        torch.from_numpy(np.empty(0, dtype))
    except TypeError as err:
        raise ValueError(f"input_dtype {name!r} is not a numpy dtype that torch accepts") from err
    return dtype


def _input_spec(source: str, input_dtype: str | None, input_shape: Sequence[int] | None) -> InputSpec:
    for field, value, example in (("input_dtype", input_dtype, "'float32'"), ("input_shape", input_shape, "[16]")):
        if value is None:
            raise ModelLoadError(f"model source {source!r} gives a bare module, so {field} is required "
                                 f"(for one input row, without the batch dimension, e.g. {example})")
    try:
        np_dtype = input_numpy_dtype(input_dtype)
    except ValueError as err:
        raise ModelLoadError(f"model source {source!r}: {err}") from err
    if isinstance(input_shape, (str, bytes)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in input_shape):
        raise ModelLoadError(f"model source {source!r}: input_shape {input_shape!r} must be a sequence of "
                             f"positive ints (one row, without the batch dimension)")
    return InputSpec(np_dtype.name, tuple(int(d) for d in input_shape))


def _check_input_spec(source: str, spec: InputSpec, input_dtype: str | None,
                      input_shape: Sequence[int] | None) -> None:
    """A model that brings its own input spec may be given one only if it is the same."""
    if input_dtype is not None and _input_spec(source, input_dtype, spec.row_shape).dtype != spec.dtype:
        raise ModelLoadError(f"model source {source!r} takes {spec.dtype} input; input_dtype={input_dtype!r} "
                             f"cannot change that")
    if input_shape is not None and tuple(input_shape) != spec.row_shape:
        raise ModelLoadError(f"model source {source!r} takes rows of shape {spec.row_shape}; "
                             f"input_shape={tuple(input_shape)!r} cannot change that")


def _wrap(source: str, name: str, module: nn.Module, input_dtype: str | None, input_shape: Sequence[int] | None,
          *, compute_dtype: torch.dtype, channels_last: bool, postprocess: str | None,
          set_eval: bool = True) -> BuiltModel:
    from actors.zoo import Cast, build_postprocess

    spec = _input_spec(source, input_dtype, input_shape)
    if set_eval:
        module.eval()
    module.to(compute_dtype)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    host_dtype = torch.from_numpy(np.empty(0, spec.dtype)).dtype
    # Integer inputs (token ids, raw pixels) are the model's business; float inputs must match its weights.
    preprocess = Cast(compute_dtype) if host_dtype.is_floating_point and host_dtype != compute_dtype else None
    post = _call(source, "building its postprocess", lambda: build_postprocess(postprocess or "none", compute_dtype))
    return BuiltModel(model=module, input_spec=spec, preprocess=preprocess, postprocess=post, name=name)
