"""The Ray actor of one GPU for generation: a thin shell around a StreamManager and a decode Generator.

Generation is its own workload, so it has its own actor next to ``GpuWorker``
with the same driver-facing calls: ``infer(batch_id, source, start, stop)``
(prompts in, tokens out, as a ``BatchResult``), ``ping``, ``stats`` and
``timeline`` in their own concurrency group. One batch runs at a time: the
worker's KV cache holds one batch. Constructor arguments are plain values.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import ray
import torch

from actors.decode import Decoder, GenerateConfig, Generator
from actors.errors import BatchError, ModelLoadError, PipelineBrokenError
from actors.models import load_model
from actors.pipeline import BatchResult
from actors.streams import StreamManager
from actors.worker import CONTROL_GROUP, _Faults, exit_for_restart, resolve_rows


class DecodeWorker:
    """Builds one decoder on this process's device and generates tokens for batches of prompts."""

    def __init__(self, name: str, model: dict[str, Any], decode: dict[str, Any], max_batch_rows: int,
                 faults: dict[str, Any] | None = None) -> None:
        self.name = name
        self.faults = _Faults(**(faults or {}))
        self.gpu_ids = [str(g) for g in (ray.get_gpu_ids() if ray.is_initialized() else [])]
        # Ray narrows CUDA_VISIBLE_DEVICES to this worker's GPU.
        self.streams = StreamManager(device="cuda:0" if torch.cuda.is_available() else "cpu")
        try:
            model = dict(model)
            source = model.pop("source")
            torch.manual_seed(model.pop("seed", 0))
            built = load_model(source, **model)
            if not isinstance(built.model, Decoder):
                raise ModelLoadError(f"model source {source!r} built {type(built.model).__name__}; decode needs an "
                                     f"actors.decode.Decoder (zoo:gpt2_small, zoo:tiny_decoder, or a factory "
                                     f"returning one)")
            self.spec = built.input_spec
            decode = dict(decode)
            self.max_new_tokens = decode.pop("max_new_tokens")
            self.loop = decode.pop("loop")
            max_seq_len = decode.pop("max_seq_len") or self.spec.row_shape[0] + self.max_new_tokens
            self.model_name = built.name
            self.source = source
            self.generator = Generator(built.model.to(self.streams.device), self.streams,
                                       GenerateConfig(max_batch=max_batch_rows, max_seq_len=max_seq_len, **decode))
        except BaseException:
            self.streams.close()
            raise
        self.rows = 0

    def infer(self, batch_id: int, source: Any, start: int = 0, stop: int | None = None,
              model: str | None = None) -> BatchResult:
        """Generate for one batch of prompts; returns the tokens ``(rows, max_new_tokens)`` in host memory.

        ``model`` is the name the driver routes by; a decode worker hosts its one decoder under any name
        (the config allows decode with a single ``model`` section only).
        """
        try:
            self.faults.before(batch_id)
            result = self.generator.generate(resolve_rows(source, start, stop), self.max_new_tokens, self.loop,
                                             batch_id)
        except PipelineBrokenError:
            exit_for_restart(self.name)
        except BatchError as err:
            raise type(err)(err.batch_id, err.problem, self.name) from err
        self.rows += len(result.tokens)
        return BatchResult(batch_id, len(result.tokens), result.tokens)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def ping(self) -> dict[str, Any]:
        return {"name": self.name, "node": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.streams.device), "gpu_ids": self.gpu_ids, "model": self.model_name,
                "source": self.source, "input_dtype": self.spec.dtype, "input_shape": list(self.spec.row_shape)}

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stats(self) -> dict[str, Any]:
        """Rows, the generator's counters and a one-line summary (``decode.line``)."""
        s = self.generator.stats
        rate = f"{s.tokens / s.seconds:,.0f} tokens/s" if s.seconds else "no batch yet"
        line = (f"decode ({self.loop} loop, {'CUDA graphs' if s.graphs else 'eager'}): {s.tokens:,} tokens in "
                f"{s.steps:,} steps, {rate}")
        return {"name": self.name, "device": str(self.streams.device), "rows": self.rows,
                "decode": {**s.as_dict(), "line": line}}

    @ray.method(concurrency_group=CONTROL_GROUP)
    def timeline(self) -> list[dict[str, Any]]:
        return []  # decode keeps no per-batch spans

    def close(self) -> None:
        self.generator.close()
        self.streams.close()


RemoteDecodeWorker = ray.remote(concurrency_groups={CONTROL_GROUP: 2})(DecodeWorker)
