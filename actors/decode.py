"""Autoregressive decode: a GPT-2-shaped decoder in plain torch and three decode loops over it.

``Decoder`` is a decoder-only transformer with random weights (GPT-2 small by
default). ``Generator`` runs it on one device with a static KV cache and offers
three loops that produce the same tokens for the same prompts and seed:

- ``naive``: no cache; each step recomputes the whole sequence (O(N^2)), and
  the host reads ``finished.all()`` after every step.
- ``synced``: a static, pre-allocated KV cache and fixed shapes, so one step is
  a CUDA graph replay; the host still reads ``finished.all()`` after every step
  (``.item()``: a host sync per token, the GPU idles while the host decides).
- ``interleaved``: the synced step on two streams in ping-pong (seed 002).
  Step t runs on lane ``t % 2`` after a device-side wait on step t-1; right
  after it, the same lane copies step t's all-finished flag into pinned host
  memory (non-blocking) and records an event. The host then launches step t+1
  and only then waits for step t's flag, so the GPU computes step t+1 while the
  host checks step t. It stops at most one step late; that step's tokens are
  pads, since every row had finished (see below).

Semantics shared by all three: step 0 is the prefill (the prompt's forward
pass); every step picks a token per row (greedy, or seeded Gumbel-max sampling
at ``temperature > 0``); a row that has finished emits ``pad_token_id``; a row
finishes when it emits ``eos_token_id``. Tokens are ``(rows, max_new_tokens)``,
pads after each row's EOS. Sampling noise is a counter-based hash of (seed,
batch id, row, step, token id) computed on the device, so it is identical in
every loop, inside or outside a graph, and needs no RNG state.

Each step's two graphs (one per parity) write their all-finished flag into
their own device slot, so lane ``p``'s flag copy never races the other lane's
next step. Step 0 (the reset and the prefill) replays as a graph of its own
per bucket and prompt length, for the first ``GenerateConfig.prefill_graphs``
such pairs of up to 4,096 prompt tokens; it reads the batch's rows and id from
the device, so one graph serves every batch of its pair. All graphs share one
memory pool: they never run at once, since each step waits on the previous
one. A batch pads up to a bucket of ``actors.graphs.buckets_for(max_batch)``;
padded rows start finished. With ``GenerateConfig(kernels=True)`` a bucket's
step is ``actors.decode_kernels``' Triton kernels (greedy: the token choice
too) inside the same graphs: every bucket for 2-byte weights, buckets of up to
``GEMV_MAX_ROWS`` rows for float32 ones. On the
CPU backend the same code runs eagerly: streams are program order and events
complete when recorded (``actors.streams``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from actors.errors import InputError, PipelineBrokenError, one_line
from actors.graphs import bucket_for, buckets_for
from actors.streams import StreamManager, StreamPriority

log = logging.getLogger(__name__)

Loop = Literal["naive", "synced", "interleaved"]
LOOPS: tuple[Loop, ...] = ("naive", "synced", "interleaved")


# -- the model ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """Sizes of a decoder-only transformer; the defaults are GPT-2 small."""

    vocab_size: int = 50257
    n_positions: int = 1024
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "d_model", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DecoderShape.{name} must be an int >= 1, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(f"DecoderShape.d_model={self.d_model} must be a multiple of n_head={self.n_head}")


GPT2_SMALL = DecoderShape()
TINY_DECODER = DecoderShape(vocab_size=256, n_positions=256, d_model=64, n_layer=2, n_head=4)

# The most rows actors.decode_kernels runs as GEMVs, and so for float32 weights at all
# (``GenerateConfig.kernels``); more run as tiles. Here, not there, so it is read without importing Triton.
# Each GEMV program loops over the rows one by one, so that step grows with them: GPT-2 small fp32 on an
# H100, device us a step, GEMVs against the compiled model step: 2 rows 340 vs 810, 4 rows 635 vs 788,
# 8 rows 1,378 vs 1,077 (docs/results/decode_kernel_rows.json).
GEMV_MAX_ROWS = 4


def _sums_products(x: torch.Tensor) -> bool:
    """Whether the step's products with ``x`` run as multiply-and-sums: one row, while ``torch.compile`` traces.

    Inductor fuses a sum with its neighbours into one reduction kernel; eagerly,
    and at two or more rows, the products stay cuBLAS calls (see ``_Linear``).
    """
    return x.numel() == x.shape[-1] and torch.compiler.is_compiling()


class _Linear(nn.Linear):
    """``nn.Linear`` that, for one row under ``torch.compile``, is a multiply-and-sum.

    cuBLAS runs a one-row product as a GEMV kernel of its own; as a sum over the
    input features, Inductor fuses it with the layer norm before it and the
    GELU after it into reduction kernels. The compiled GPT-2 small step at batch
    1 (fp32, H100) went from 597 to 515 us (docs/results/decode_linear_before_after.json).
    At 4 rows the sum reads the weight once per row and was slower (1,032 vs
    790 us, docs/results/decode_step_probe), and eagerly it would materialise a
    (rows, out, in) product: those keep cuBLAS.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _sums_products(x):
            return super().forward(x)
        y = (x.unsqueeze(-2) * self.weight).sum(-1)
        return y if self.bias is None else y + self.bias


class _Attention(nn.Module):
    def __init__(self, shape: DecoderShape) -> None:
        super().__init__()
        self.n_head = shape.n_head
        self.scale = (shape.d_model // shape.n_head) ** -0.5
        self.qkv = _Linear(shape.d_model, 3 * shape.d_model)
        self.proj = _Linear(shape.d_model, shape.d_model)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows, length, _ = x.shape
        return self.qkv(x).view(rows, length, 3, self.n_head, -1).permute(2, 0, 3, 1, 4).unbind(0)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        rows, _, length, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(rows, length, -1))

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Causal attention over all of ``x``; writes its keys and values into ``cache[:, :, :length]`` if given."""
        q, k, v = self._split(x)
        if cache is not None:
            cache[0][:, :, :x.shape[1]].copy_(k)
            cache[1][:, :, :x.shape[1]].copy_(v)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], pos: torch.Tensor,
             bias: torch.Tensor) -> torch.Tensor:
        """One new position: writes its key and value at ``pos`` (a device tensor), attends to the cache up to it.

        ``bias`` is 0 up to ``pos`` and -inf after. Two matmuls and a softmax, not
        ``scaled_dot_product_attention``: its fused kernels tile 64 queries at a
        time, and with one query they took 39 of a layer's 90 us (fp32, batch 1, H100).
        For one row under ``torch.compile`` the matmuls are multiply-and-sums, as in
        ``_Linear``: Inductor fuses them with the cache write and the softmax, and
        the two copies a layer that cuBLAS's batched GEMVs needed go. The compiled
        GPT-2 small step at batch 1 went from 514 to 490 us (fp32, H100,
        docs/results/decode_attention_before_after.json); more rows keep the
        matmuls (not measured).
        """
        q, k, v = self._split(x)
        cache[0].index_copy_(2, pos, k)
        cache[1].index_copy_(2, pos, v)
        if _sums_products(x):
            scores = (q * cache[0]).sum(-1) * self.scale + bias  # (rows, heads, length)
            return self._merge((scores.softmax(-1).unsqueeze(-1) * cache[1]).sum(-2, keepdim=True))
        scores = torch.add(bias, torch.matmul(q, cache[0].transpose(-1, -2)), alpha=self.scale)
        return self._merge(torch.matmul(scores.softmax(-1), cache[1]))


class _Block(nn.Module):
    def __init__(self, shape: DecoderShape) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(shape.d_model)
        self.attn = _Attention(shape)
        self.ln_2 = nn.LayerNorm(shape.d_model)
        self.mlp = nn.Sequential(_Linear(shape.d_model, 4 * shape.d_model), nn.GELU(approximate="tanh"),
                                 _Linear(4 * shape.d_model, shape.d_model))

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))

    def step(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], pos: torch.Tensor,
             bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.step(self.ln_1(x), cache, pos, bias)
        return x + self.mlp(self.ln_2(x))


class Decoder(nn.Module):
    """A GPT-2-style decoder with random weights (GPT-2's initialisation).

    The output head is not tied to the token embedding: with random weights a
    tied head makes greedy decode repeat its last input token forever.
    ``forward`` returns the logits of the last position only; both it and
    ``step`` are free of host syncs, so ``step`` can be captured in a CUDA graph.
    """

    def __init__(self, shape: DecoderShape = GPT2_SMALL) -> None:
        super().__init__()
        self.shape = shape
        self.wte = nn.Embedding(shape.vocab_size, shape.d_model)
        self.wpe = nn.Embedding(shape.n_positions, shape.d_model)
        self.blocks = nn.ModuleList(_Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.lm_head = _Linear(shape.d_model, shape.vocab_size, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                continue  # biases zero, LayerNorm weights one: PyTorch's defaults except Linear bias
            # GPT-2: N(0, 0.02), residual projections scaled down by sqrt(2 * n_layer).
            scaled = name.endswith(("attn.proj.weight", "mlp.2.weight"))
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * shape.n_layer) if scaled else 0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, cache: KVCacheView | None = None) -> torch.Tensor:
        """Logits ``(rows, vocab)`` of the last position of ``tokens`` ``(rows, length)``; fills ``cache`` if given."""
        x = self.wte(tokens) + self.wpe.weight[:tokens.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        return self.lm_head(self.ln_f(x[:, -1]))

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCacheView) -> torch.Tensor:
        """Logits ``(rows, vocab)`` after feeding ``tokens`` ``(rows,)`` at ``pos`` (a 1-element device tensor)."""
        x = (self.wte(tokens) + self.wpe(pos)).unsqueeze(1)
        bias = torch.where(cache.positions <= pos, 0.0, float("-inf")).to(x.dtype)
        for i, block in enumerate(self.blocks):
            x = block.step(x, cache.layers[i], pos, bias)
        return self.lm_head(self.ln_f(x[:, -1]))


# -- the KV cache ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KVCacheView:
    """The first ``rows`` rows of a KV cache: per layer a (keys, values) pair of ``(rows, heads, length, head_dim)``."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    positions: torch.Tensor  # arange(length) on the device, for the attention mask


class KVCache:
    """Static keys and values for ``max_rows`` sequences of up to ``length`` positions, zero-filled.

    Zero, not empty: attention multiplies masked-out values by a zero weight,
    and uninitialised memory could hold NaN (0 * NaN is NaN).
    """

    def __init__(self, shape: DecoderShape, max_rows: int, length: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        size = (shape.n_layer, max_rows, shape.n_head, length, shape.d_model // shape.n_head)
        self.keys = torch.zeros(size, dtype=dtype, device=device)
        self.values = torch.zeros(size, dtype=dtype, device=device)
        self.positions = torch.arange(length, device=device)

    def view(self, rows: int) -> KVCacheView:
        """Views of the first ``rows`` rows; each layer's view is contiguous, so a graph can capture it."""
        return KVCacheView([(self.keys[i, :rows], self.values[i, :rows]) for i in range(self.keys.shape[0])],
                           self.positions)


# -- sampling noise -------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
# Step 0 replays as a graph only up to this many prompt tokens (bucket rows x prompt length): its graph keeps
# its activations in the graphs' pool for the generator's life, and what it saves is the launches (about 2 ms
# of a GPT-2 small batch-1 call on an H100, docs/results/decode_call_probe), small against a long prefill.
_PREFILL_GRAPH_TOKENS = 4096


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 ``x`` in ``[0, 2**32)`` (products stay below 2**63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


# -- the generator --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """What a ``Generator`` is built for. ``max_seq_len`` is the KV cache length: prompt + new tokens must fit."""

    max_batch: int
    max_seq_len: int
    eos_token_id: int | None = None
    pad_token_id: int = 0
    temperature: float = 0.0  # 0: greedy; above: seeded Gumbel-max sampling of softmax(logits / temperature)
    seed: int = 0
    graphs: bool = True  # replay each step as a CUDA graph (always eager on the CPU backend)
    compile: bool = False  # fuse the cached step's kernels with torch.compile before its capture (CUDA only)
    kernels: bool = False  # the cached step as actors.decode_kernels' (float32: up to GEMV_MAX_ROWS; CUDA only)
    warmup_iters: int = 2  # eager steps per parity before a bucket's capture
    # (bucket, prompt length) pairs whose reset + prefill replay as a CUDA graph, each captured at its first
    # batch; later pairs run eagerly. 0: every prefill eager.
    prefill_graphs: int = 8

    def __post_init__(self) -> None:
        for name, low in (("max_batch", 1), ("max_seq_len", 2), ("pad_token_id", 0), ("warmup_iters", 1),
                          ("prefill_graphs", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"GenerateConfig.{name} must be an int >= {low}, got {value!r}")
        if self.eos_token_id is not None and (isinstance(self.eos_token_id, bool) or self.eos_token_id < 0):
            raise ValueError(f"GenerateConfig.eos_token_id must be None or an int >= 0, got {self.eos_token_id!r}")
        if not self.temperature >= 0:
            raise ValueError(f"GenerateConfig.temperature must be >= 0, got {self.temperature!r}")


@dataclasses.dataclass
class DecodeResult:
    """One batch's generation; arrays are the caller's."""

    tokens: np.ndarray  # (rows, max_new_tokens) int64; pad_token_id after a row's EOS
    lengths: np.ndarray  # (rows,) tokens generated per row, EOS included
    steps: int  # steps whose tokens count: until every row had finished, or max_new_tokens
    launched: int  # steps computed: steps + 1 when the interleaved loop stopped one step late
    loop: str


@dataclasses.dataclass
class DecodeStats:
    """Counters of one generator, updated once per batch (never per step)."""

    graphs: bool = False  # whether steps replay CUDA graphs
    compiled: bool = False  # whether the cached step runs torch.compile's fused kernels
    kernels: bool = False  # whether cached steps run actors.decode_kernels (float32: up to GEMV_MAX_ROWS)
    graphs_captured: int = 0  # the steps' (one per bucket and parity)
    prefill_graphs_captured: int = 0
    capture_seconds: float = 0.0
    fallback_reason: str | None = None
    batches: int = 0
    sequences: int = 0
    tokens: int = 0  # generated tokens up to and including each row's EOS
    steps: int = 0
    extra_steps: int = 0  # steps computed after every row had finished (interleaved: at most one per batch)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Generator:
    """Runs the three decode loops of one ``Decoder`` on one device; one batch at a time (not thread-safe).

    Owns the KV cache, the step's device state, pinned host buffers, two lane
    streams (created on ``streams``) and the CUDA graphs (one per bucket and
    parity, captured at a bucket's first cached batch). ``close`` releases them.
    """

    def __init__(self, model: Decoder, streams: StreamManager, config: GenerateConfig) -> None:
        shape = model.shape
        for name in ("eos_token_id", "pad_token_id"):
            token = getattr(config, name)
            if token is not None and token >= shape.vocab_size:
                raise ValueError(f"{name}={token} is outside the model's vocabulary (0..{shape.vocab_size - 1})")
        if config.max_seq_len > shape.n_positions:
            raise ValueError(f"max_seq_len={config.max_seq_len} exceeds the model's {shape.n_positions} positions")
        self.model = model
        self.config = config
        self.buckets = buckets_for(config.max_batch)
        self._streams = streams
        self._compute = streams.get_compute_stream()
        self.stats = DecodeStats(graphs=config.graphs and streams.is_cuda, compiled=config.compile and streams.is_cuda,
                                 kernels=config.kernels and streams.is_cuda)
        if (config.graphs or config.compile or config.kernels) and not streams.is_cuda:
            self.stats.fallback_reason = "CPU backend: CUDA graphs, compile and kernels off, running eager"
        # Inductor without its own CUDA graphs: the step is captured in ours. Static shapes, one
        # compilation per bucket; past dynamo's recompile limit (8 shapes) a bucket's step runs eager kernels.
        self._model_step = (torch.compile(model.step, fullgraph=True, dynamic=False) if self.stats.compiled
                            else model.step)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._prefills: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # by (bucket, prompt length)
        self._views: dict[int, KVCacheView] = {}
        self._side: torch.cuda.Stream | None = None
        self._pool: Any = None
        self._closed = False
        self._broken: str | None = None
        rows, length, device = config.max_batch, config.max_seq_len, streams.device
        dtype = next(model.parameters()).dtype
        pinned = streams.is_cuda
        if streams.is_cuda:
            # The lanes do not wait on other streams: the weights, moved to the device on the
            # current stream, must be in place before a lane reads them.
            torch.cuda.current_stream(device).synchronize()
        with torch.inference_mode(), streams.use(self._compute):
            self._cache = KVCache(shape, rows, length, dtype, device)
            self._seq = torch.zeros(rows, length, dtype=torch.long, device=device)  # prompts; the naive loop appends
            self._prompt_dev = torch.zeros(rows * length, dtype=torch.long, device=device)
            self._out = torch.zeros(rows, length, dtype=torch.long, device=device)
            self._tokens = torch.zeros(rows, dtype=torch.long, device=device)  # the token each step feeds
            self._pos = torch.zeros(1, dtype=torch.long, device=device)  # where that token's key/value go
            self._step = torch.zeros(1, dtype=torch.long, device=device)  # the output column each step writes
            self._finished = torch.zeros(rows, dtype=torch.bool, device=device)
            self._flags = torch.zeros(2, dtype=torch.bool, device=device)  # all finished, one slot per parity
            self._row_keys = torch.zeros(rows, dtype=torch.long, device=device)
            self._row_index = torch.arange(rows, device=device)
            self._batch = torch.zeros(2, dtype=torch.long, device=device)  # rows, batch id: the reset reads them here
            self._vocab_keys = torch.arange(shape.vocab_size, device=device) * 0x9E3779B & _M32
            self._host_prompts = torch.zeros(rows * length, dtype=torch.long, pin_memory=pinned)
            self._host_out = torch.zeros(rows * length, dtype=torch.long, pin_memory=pinned)
            self._host_flags = torch.zeros(2, dtype=torch.bool, pin_memory=pinned)
            self._host_batch = torch.zeros(2, dtype=torch.long, pin_memory=pinned)
            self._kernel_step = None
            if self.stats.kernels:
                from actors.decode_kernels import KernelStep  # imports Triton: CUDA only
                self._kernel_step = KernelStep(model, rows, length,
                                               pdl=torch.cuda.get_device_capability(device)[0] >= 9)
        self._host_flags_np = self._host_flags.numpy()
        self._host_batch_np = self._host_batch.numpy()
        self._compute.synchronize()  # the buffers exist before any lane touches them
        self._step_done = (streams.create_event(), streams.create_event())
        self._flag_copied = (streams.create_event(), streams.create_event())
        self._out_copied = streams.create_event()
        self._drained = streams.create_event()
        self._lanes = (streams.create_stream(StreamPriority.HIGH),)
        try:
            self._lanes += (streams.create_stream(StreamPriority.HIGH),)
        except BaseException:
            streams.destroy_stream(self._lanes[0])
            raise

    # -- public ---------------------------------------------------------------------------------
    def generate(self, prompts: np.ndarray | torch.Tensor, max_new_tokens: int, loop: Loop = "interleaved",
                 batch_id: int = 0) -> DecodeResult:
        """Generate up to ``max_new_tokens`` tokens for each row of ``prompts`` (int, ``(rows, prompt_len)``).

        Host-blocking: returns when the tokens are in host memory. ``batch_id``
        names the batch in errors and keys the sampling noise. The interleaved
        loop's only host waits are one event per step (the lagged flag read) and
        the final copy of the tokens. After a device failure (a sticky CUDA error,
        from this batch or anything else in the process) this and every later
        call raise ``PipelineBrokenError``: only a fresh process recovers.
        """
        if self._closed:
            raise RuntimeError("Generator is closed")
        if self._broken:
            raise PipelineBrokenError(self._broken)
        if loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        prompts = self._check(prompts, max_new_tokens, batch_id)
        rows, prompt_len = prompts.shape
        started = time.perf_counter()
        with torch.inference_mode():
            try:
                bucket = self._stage(prompts, batch_id, cached=loop != "naive")
                run = {"naive": self._naive, "synced": self._synced, "interleaved": self._interleaved}[loop]
                host_out = self._host_out[:bucket * max_new_tokens].view(bucket, max_new_tokens)
                steps, launched, last = run(bucket, prompt_len, max_new_tokens)
                with self._streams.use(last):
                    host_out.copy_(self._out[:bucket, :max_new_tokens].contiguous(), non_blocking=True)
                    self._out_copied.record(last)
                self._out_copied.synchronize()
            except BaseException as err:
                self._settle_failed(batch_id, err)
                raise
        tokens = host_out[:rows].numpy().copy()
        lengths = self._lengths(tokens)
        self._count(rows, int(lengths.sum()), steps, launched, time.perf_counter() - started)
        return DecodeResult(tokens, lengths, steps, launched, loop)

    def device_step_seconds(self, prompts: np.ndarray | torch.Tensor, max_new_tokens: int) -> float:
        """GPU seconds per cached step: the steps of one batch replayed back to back on one stream, no host check.

        What the GPU alone takes, timed by CUDA events: the bound the interleaved
        loop approaches, and (with the synced loop's time per step) the most that
        hiding the end-of-sequence check can win. For benchmarks; CUDA graphs only.
        """
        if self._closed:
            raise RuntimeError("Generator is closed")
        if not self.stats.graphs:
            raise RuntimeError("device_step_seconds times graph replays: it needs CUDA and graphs on")
        prompts = self._check(prompts, max_new_tokens, -1)
        if max_new_tokens < 2:
            raise ValueError("device_step_seconds needs max_new_tokens >= 2: step 0 is the prefill")
        prompt_len = prompts.shape[1]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.inference_mode(), self._streams.use(self._compute):
            bucket = self._stage(prompts, 0, cached=True)
            try:
                self._start(bucket, prompt_len)
                start.record(self._compute)
                for _ in range(max_new_tokens - 1):
                    self._run_step(bucket, 0)
                end.record(self._compute)
                end.synchronize()
            finally:
                self._drain()
        return start.elapsed_time(end) / 1e3 / (max_new_tokens - 1)

    def close(self) -> None:
        """Wait for the lanes, destroy them and drop the graphs and buffers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for lane in self._lanes:
            self._streams.destroy_stream(lane)  # waits for its queued work
        if self._side is not None:
            self._side.synchronize()
        self._graphs.clear()
        self._prefills.clear()
        self._views.clear()
        self._pool = self._side = None
        self._cache = self._seq = self._out = self._host_prompts = self._host_out = None

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def broken(self) -> str | None:
        """Why the device context is unusable, or None."""
        return self._broken

    def _settle_failed(self, batch_id: int, err: BaseException) -> None:
        """Wait out a failed batch's queued work; if the waits fail too, the device has: break.

        A batch's own error (out of memory while capturing, say) leaves the device
        usable, and the waits succeed. After a sticky CUDA error every wait fails,
        and the batch goes back as ``PipelineBrokenError``, not as the raw error.
        """
        try:
            self._drain()
        except Exception as sync_err:
            self._broken = self._broken or one_line(sync_err)
            log.error("decode: device failure on batch %s: %s", batch_id, sync_err)
            raise PipelineBrokenError(self._broken) from err

    def _drain(self) -> None:
        """Wait for all work this generator queued: the next batch's loop may run on another stream.

        Event waits, not ``Stream.synchronize``: those raise under sync debug mode "error".
        """
        for stream in (self._compute, *self._lanes):
            self._drained.record(stream)
            self._drained.synchronize()

    def _stage(self, prompts: np.ndarray, batch_id: int, cached: bool) -> int:
        """Capture the graphs a cached loop needs, copy the prompts and the batch into pinned memory; the bucket."""
        rows, prompt_len = prompts.shape
        bucket = bucket_for(rows, self.buckets)
        if cached and self.stats.graphs:
            if (bucket, 0) not in self._graphs:
                self._capture(bucket)
            if ((bucket, prompt_len) not in self._prefills and len(self._prefills) < self.config.prefill_graphs
                    and bucket * prompt_len <= _PREFILL_GRAPH_TOKENS):
                self._capture_prefill(bucket, prompt_len)
        staged = self._host_prompts[:bucket * prompt_len].view(bucket, prompt_len)
        staged.numpy()[:rows] = prompts  # the rows may be a read-only view of Ray's object store
        staged[rows:].zero_()
        self._host_batch_np[:] = rows, batch_id
        return bucket

    # -- checks ---------------------------------------------------------------------------------
    def _check(self, prompts: Any, max_new_tokens: int, batch_id: int) -> np.ndarray:
        """``prompts`` as int64 numpy, or an InputError naming the batch and what is wrong."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.detach().cpu().numpy()
        prompts = np.asarray(prompts)
        if prompts.ndim != 2:
            raise InputError(batch_id, f"prompts must be a 2-D array (rows, prompt_len) of token ids, "
                                       f"got shape {prompts.shape}")
        if prompts.dtype.kind not in "iu":
            raise InputError(batch_id, f"token ids must be integers, got {prompts.dtype}")
        rows, prompt_len = prompts.shape
        if rows == 0 or prompt_len == 0:
            raise InputError(batch_id, f"empty prompts: shape {prompts.shape}; each batch needs at least one prompt "
                                       f"of at least one token")
        if rows > self.config.max_batch:
            raise InputError(batch_id, f"{rows} prompts, more than the {self.config.max_batch} rows the KV cache "
                                       f"holds (max_batch_rows)")
        vocab = self.model.shape.vocab_size
        outside = (prompts < 0) | (prompts >= vocab)
        if outside.any():
            row, col = np.argwhere(outside)[0]
            raise InputError(batch_id, f"token id {prompts[row, col]} (prompt {row}, position {col}) is outside "
                                       f"the vocabulary 0..{vocab - 1}; {int(outside.sum())} ids are")
        if prompt_len + max_new_tokens > self.config.max_seq_len:
            raise InputError(batch_id, f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = "
                                       f"{prompt_len + max_new_tokens} is too long for the KV cache of "
                                       f"{self.config.max_seq_len} positions (max_seq_len)")
        return prompts.astype(np.int64, copy=False)

    def _lengths(self, tokens: np.ndarray) -> np.ndarray:
        if self.config.eos_token_id is None:
            return np.full(len(tokens), tokens.shape[1], np.int64)
        hit = tokens == self.config.eos_token_id
        return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, tokens.shape[1]).astype(np.int64)

    def _count(self, rows: int, tokens: int, steps: int, launched: int, seconds: float) -> None:
        s = self.stats
        s.batches += 1
        s.sequences += rows
        s.tokens += tokens
        s.steps += launched
        s.extra_steps += launched - steps
        s.seconds += seconds

    # -- the step (device work only: captured as a graph, or run eagerly) ----------------------
    def _reset(self, bucket: int, prompt_len: int) -> None:
        """Upload the staged prompts and batch, reset the step state, on the current stream.

        Device work only, the batch's rows and id read from the device: one CUDA
        graph of it serves every batch of its bucket and prompt length.
        """
        staged = self._host_prompts[:bucket * prompt_len]
        uploaded = self._prompt_dev[:bucket * prompt_len]
        uploaded.copy_(staged, non_blocking=True)
        self._batch.copy_(self._host_batch, non_blocking=True)
        rows, batch_id = self._batch[0], self._batch[1]
        self._seq[:bucket, :prompt_len].copy_(uploaded.view(bucket, prompt_len))
        self._out[:bucket].fill_(self.config.pad_token_id)
        torch.ge(self._row_index[:bucket], rows, out=self._finished[:bucket])  # padding rows: never block the stop
        self._pos.fill_(prompt_len)
        self._step.zero_()
        if self.config.temperature > 0:
            row_ids = self._row_index[:bucket] + batch_id * self.config.max_batch
            self._row_keys[:bucket].copy_(_mix32((row_ids * 0x2545F49 + self.config.seed) & _M32))

    def _choose(self, logits: torch.Tensor, rows: int) -> torch.Tensor:
        if self.config.temperature == 0:
            return logits.argmax(dim=-1)
        key = _mix32(self._row_keys[:rows, None] ^ _mix32(self._step * 0x27D4EB2D & _M32))
        bits = _mix32((key + self._vocab_keys) & _M32) >> 8
        uniform = (bits.to(torch.float32) + 0.5) * 2.0 ** -24
        gumbel = -torch.log(-torch.log(uniform))
        return (logits.float() / self.config.temperature + gumbel).argmax(dim=-1)

    def _advance(self, logits: torch.Tensor, rows: int, parity: int) -> None:
        """Pick each row's token, write it to the output column ``step``, update ``finished`` and the flag."""
        finished = self._finished[:rows]
        token = torch.where(finished, self.config.pad_token_id, self._choose(logits, rows))
        self._out[:rows].index_copy_(1, self._step, token.unsqueeze(1))
        if self.config.eos_token_id is not None:
            finished.logical_or_(token == self.config.eos_token_id)
        self._flags[parity].copy_(finished.all())
        self._tokens[:rows].copy_(token)
        self._step.add_(1)

    def _prefill(self, bucket: int, prompt_len: int) -> None:
        """Step 0 of the cached loops, eagerly: the reset, then the prompt's forward pass.

        The pass fills the cache (same kernels as naive step 0); its flag goes to parity 0.
        """
        self._reset(bucket, prompt_len)
        self._advance(self.model(self._seq[:bucket, :prompt_len], self._view(bucket)), bucket, 0)

    def _start(self, bucket: int, prompt_len: int) -> None:
        """Step 0 of the cached loops: the pair's graph of ``_prefill`` if it has one, else ``_prefill``."""
        graph = self._prefills.get((bucket, prompt_len))
        if graph is None:
            self._prefill(bucket, prompt_len)
        else:
            graph.replay()

    def _decode_step(self, rows: int, parity: int) -> None:
        """Steps 1.. of the cached loops; what a graph captures."""
        kernels = self._kernel_step if self._kernel_step is not None and rows <= self._kernel_step.max_rows else None
        if kernels is not None and self.config.temperature == 0:
            kernels.greedy(self._tokens[:rows], self._pos, self._view(rows), self._finished[:rows], self._out[:rows],
                           self._step, self._flags[parity:parity + 1], self.config.pad_token_id,
                           self.config.eos_token_id)
            return
        step = kernels.logits if kernels is not None else self._model_step
        logits = step(self._tokens[:rows], self._pos, self._view(rows))
        self._pos.add_(1)
        self._advance(logits, rows, parity)

    def _run_step(self, rows: int, parity: int) -> None:
        if self.stats.graphs:
            self._graphs[(rows, parity)].replay()
        else:
            self._decode_step(rows, parity)

    def _view(self, rows: int) -> KVCacheView:
        view = self._views.get(rows)
        if view is None:
            view = self._views[rows] = self._cache.view(rows)
        return view

    # -- the three loops: each returns (steps, launched, the stream that ran the last step) ----
    def _naive(self, bucket: int, prompt_len: int, n: int) -> tuple[int, int, Any]:
        stream = self._compute
        with self._streams.use(stream):
            self._reset(bucket, prompt_len)
            for t in range(n):
                self._advance(self.model(self._seq[:bucket, :prompt_len + t]), bucket, 0)
                if t + 1 < n:
                    if self._flags[0].item():  # host sync: every step
                        return t + 1, t + 1, stream
                    self._seq[:bucket, prompt_len + t].copy_(self._tokens[:bucket])
        return n, n, stream

    def _synced(self, bucket: int, prompt_len: int, n: int) -> tuple[int, int, Any]:
        stream = self._compute
        with self._streams.use(stream):
            for t in range(n):
                if t == 0:
                    self._start(bucket, prompt_len)
                else:
                    self._run_step(bucket, 0)
                if t + 1 < n and self._flags[0].item():  # host sync: every step
                    return t + 1, t + 1, stream
        return n, n, stream

    def _interleaved(self, bucket: int, prompt_len: int, n: int) -> tuple[int, int, Any]:
        streams, lanes = self._streams, self._lanes
        for t in range(n):
            p = t % 2
            lane = lanes[p]
            if t > 0:
                streams.wait_event(lane, self._step_done[1 - p])  # device-side: step t follows step t-1
            with streams.use(lane):
                if t == 0:
                    self._start(bucket, prompt_len)
                else:
                    self._run_step(bucket, p)
                self._step_done[p].record(lane)
                self._host_flags[p].copy_(self._flags[p], non_blocking=True)
                self._flag_copied[p].record(lane)
            if t > 0:
                # Step t is queued behind step t-1: the GPU runs it while the host reads step t-1's flag.
                self._flag_copied[1 - p].synchronize()
                if self._host_flags_np[1 - p]:
                    return t, t + 1, lane  # step t ran past the stop: every row had finished, its tokens are pads
        return n, n, lanes[(n - 1) % 2]

    # -- capture --------------------------------------------------------------------------------
    def _capture(self, rows: int) -> None:
        """Warm up and capture the step at ``rows`` rows, one graph per parity. Host-blocking; clobbers the state."""
        with self._capturing(f"the step at {rows} rows"):
            for _ in range(self.config.warmup_iters):
                self._pos.zero_()  # keep the warm-up's writes inside the cache and the output
                self._step.zero_()
                for parity in (0, 1):
                    self._decode_step(rows, parity)
            for parity in (0, 1):
                self._graphs[(rows, parity)] = self._graph_of(functools.partial(self._decode_step, rows, parity))
                self.stats.graphs_captured += 1

    def _capture_prefill(self, bucket: int, prompt_len: int) -> None:
        """Warm up and capture step 0 at ``bucket`` rows of ``prompt_len`` tokens. Host-blocking; clobbers the state."""
        with self._capturing(f"step 0 at {bucket} rows of {prompt_len} tokens"):
            self._prefill(bucket, prompt_len)
            self._prefills[(bucket, prompt_len)] = self._graph_of(functools.partial(self._prefill, bucket, prompt_len))
            self.stats.prefill_graphs_captured += 1

    @contextlib.contextmanager
    def _capturing(self, what: str) -> Iterator[None]:
        """Warm-ups and captures on the side stream (it keeps cuBLAS's workspace); then waits for them and logs.

        The wait matters: the loops run on other streams, and the staging that
        follows rewrites the pinned buffers a warm-up read.
        """
        started = time.perf_counter()
        if self._side is None:
            self._side = torch.cuda.Stream(self._streams.device)
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.stream(self._side):
            yield
        self._side.synchronize()
        seconds = time.perf_counter() - started
        self.stats.capture_seconds += seconds
        log.info("decode: captured %s in %.2f s", what, seconds)

    def _graph_of(self, work: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """``work`` captured on the side stream into the shared pool (inside ``_capturing``, after a warm-up)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._side, capture_error_mode="thread_local"):
            work()
        return graph
