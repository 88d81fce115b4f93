"""Triton kernels for the decoder's cached step: four products and a split attention a layer.

Per layer: layer norm + qkv product (its keys and values written straight into
the cache at ``pos``); attention over the cache up to ``pos``, split into
chunks of ``BLOCK_L`` positions, each chunk's unnormalised softmax partials
written out; output projection, whose input is those partials merged, +
residual; layer norm + first MLP product + GELU; second MLP product +
residual. Then the final layer norm and the output head.

Each product comes in two forms, by the step's rows. Up to ``GEMV_MAX_ROWS``
rows, a GEMV per row (``gemv_kernel``): a program owns ``BLOCK_N`` output
features and loads their weight rows whole, before anything else, so the
weight's read is in flight while the program builds its input (a layer norm of
the 768-wide residual, or the merged attention), which every program
recomputes: cheaper than a kernel of its own. It does so for each row in turn,
so the weight is read once a step whatever the rows, but the work grows with
them. Past that, tiles: ``input_kernel`` builds the same inputs once, a row a
program, then in ``tiled_kernel`` a program owns ``BLOCK_M`` rows by
``BLOCK_N`` features and walks the input in ``BLOCK_K`` slices through
``tl.dot`` (tensor cores for 2-byte weights). All rows share the position
``pos``. No atomics: every output is summed in one fixed order, so a step
gives the same bits every time it runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from actors.decode import GEMV_MAX_ROWS


@triton.jit
def _gelu_tanh(y):
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return 0.5 * y * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))  # 1 + tanh(u), tanh from exp


@triton.jit
def _await_previous_kernel(PDL: tl.constexpr):
    """Under programmatic dependent launch: let the next kernel start, then wait for the previous one's writes.

    Everything before this call may only read what no kernel of the step writes
    (the weights); the next kernel, started early, waits here in turn, so every
    kernel finishes after all the ones before it.
    """
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def embed_kernel(tok_ptr, pos_ptr, wte_ptr, wpe_ptr, x_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                 PDL: tl.constexpr):
    _await_previous_kernel(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    tok = tl.load(tok_ptr + row)
    pos = tl.load(pos_ptr)
    x = tl.load(wte_ptr + tok * D + offs, mask=mask).to(tl.float32) + \
        tl.load(wpe_ptr + pos * D + offs, mask=mask).to(tl.float32)
    tl.store(x_ptr + row * D + offs, x, mask=mask)


@triton.jit
def _merged_attention(part_m_ptr, part_l_ptr, part_acc_ptr, K: tl.constexpr, K_POW2: tl.constexpr,
                      HD: tl.constexpr, CHUNKS: tl.constexpr):
    """The attention output, features [0, K_POW2) (0 past K): each head's chunk partials merged (softmax over all
    chunks).

    Held as (heads, HD), so each head's chunk maximum and sum are loaded once,
    not once per feature: with one load per feature and chunk each, they were
    most of the merge's loads, and the merge runs in every program of the
    projection (docs/results/decode_merge_probe).
    """
    HEADS: tl.constexpr = K_POW2 // HD  # both powers of two: row h of (HEADS, HD) is features [h HD, (h + 1) HD)
    head = tl.arange(0, HEADS)[:, None]
    live = head < K // HD
    m = tl.full([HEADS, 1], float("-inf"), tl.float32)
    for c in tl.static_range(CHUNKS):
        m = tl.maximum(m, tl.load(part_m_ptr + head * CHUNKS + c, mask=live, other=0.0))
    total = tl.zeros([HEADS, 1], tl.float32)
    acc = tl.zeros([HEADS, HD], tl.float32)
    for c in tl.static_range(CHUNKS):
        weight = tl.exp(tl.load(part_m_ptr + head * CHUNKS + c, mask=live, other=0.0) - m)
        total += weight * tl.load(part_l_ptr + head * CHUNKS + c, mask=live, other=0.0)
        acc += weight * tl.load(part_acc_ptr + (head * CHUNKS + c) * HD + tl.arange(0, HD)[None, :], mask=live,
                                other=0.0)
    return tl.reshape(tl.where(live, acc / total, 0.0), [K_POW2])  # the padding heads: 0, not 0 / 0


@triton.jit
def _row_input(x_ptr, ln_w_ptr, ln_b_ptr, part_l_ptr, part_acc_ptr, eps, row, rk, k_mask,
               K: tl.constexpr, K_POW2: tl.constexpr, LN: tl.constexpr, ATTENTION: tl.constexpr, D: tl.constexpr,
               HD: tl.constexpr, CHUNKS: tl.constexpr):
    """Features ``rk`` (``tl.arange(0, K_POW2)``) of a product's input in row ``row``, float32: x, LN(x), or
    (ATTENTION) the attention merged from its partials (``x_ptr`` holds the chunk maxima)."""
    if ATTENTION:
        parts = row * (D // HD) * CHUNKS
        x = _merged_attention(x_ptr + parts, part_l_ptr + parts, part_acc_ptr + parts * HD, K, K_POW2, HD, CHUNKS)
    else:
        x = tl.load(x_ptr + row * K + rk, mask=k_mask, other=0.0).to(tl.float32)
    if LN:
        mean = tl.sum(x) / K
        centred = tl.where(k_mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred) / K + eps)
        x = centred * rstd * tl.load(ln_w_ptr + rk, mask=k_mask, other=0.0).to(tl.float32) + \
            tl.load(ln_b_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, ln_w_ptr, ln_b_ptr, k_ptr, v_ptr, pos_ptr,
                part_l_ptr, part_acc_ptr, best_ptr, best_index_ptr, eps, N,
                K: tl.constexpr, K_POW2: tl.constexpr, BLOCK_N: tl.constexpr,
                LN: tl.constexpr, ATTENTION: tl.constexpr, BIAS: tl.constexpr, GELU: tl.constexpr,
                RESIDUAL: tl.constexpr, QKV: tl.constexpr, ARGMAX: tl.constexpr,
                D: tl.constexpr, HD: tl.constexpr, L: tl.constexpr, CHUNKS: tl.constexpr, ROWS: tl.constexpr,
                PDL: tl.constexpr):
    """out[r, n] (+)= act(sum_k input[r, k] * w[n, k] + b[n]) for this program's BLOCK_N features, rows r < ROWS.

    input: x, LN(x), or (ATTENTION) the attention merged from its partials
    (``x_ptr`` holds the chunk maxima). QKV: features [0, D) go to ``out``
    (the query), [D, 2D) and [2D, 3D) to the key and value caches
    (rows, heads, L, HD) at position ``pos``. ARGMAX: also this program's
    largest output of each row and its feature (the first, on ties), for
    ``greedy_advance_kernel``. Rows are contiguous in every buffer.
    """
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, K_POW2)
    k_mask = rk < K
    w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
    b = 0.0  # no bias: adding 0 changes nothing
    if BIAS:
        b = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    if QKV:
        pos = tl.load(pos_ptr)  # written by the previous step, which has finished (see KernelStep._layers)
    _await_previous_kernel(PDL)
    for row in tl.static_range(ROWS):  # the weight tile stays in hand from row to row
        if RESIDUAL:  # loaded with the input, not after the product
            residual = tl.load(out_ptr + row * N + rn, mask=n_mask, other=0.0)
        x = _row_input(x_ptr, ln_w_ptr, ln_b_ptr, part_l_ptr, part_acc_ptr, eps, row, rk, k_mask, K, K_POW2, LN,
                       ATTENTION, D, HD, CHUNKS)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1) + b
        if GELU:
            y = _gelu_tanh(y)
        if QKV:
            which = rn // D
            col = rn % D
            cached = row * (D * L) + (col // HD) * (L * HD) + pos * HD + col % HD
            tl.store(out_ptr + row * D + col, y, mask=n_mask & (which == 0))
            tl.store(k_ptr + cached, y, mask=n_mask & (which == 1))
            tl.store(v_ptr + cached, y, mask=n_mask & (which == 2))
        else:
            if RESIDUAL:
                y += residual
            tl.store(out_ptr + row * N + rn, y, mask=n_mask)
        if ARGMAX:
            best, where = tl.max(tl.where(n_mask, y, float("-inf")), axis=0, return_indices=True,
                                 return_indices_tie_break_left=True)
            part = row * tl.num_programs(0) + tl.program_id(0)
            tl.store(best_ptr + part, best)
            tl.store(best_index_ptr + part, tl.program_id(0) * BLOCK_N + where)


@triton.jit
def input_kernel(x_ptr, ln_w_ptr, ln_b_ptr, part_l_ptr, part_acc_ptr, out_ptr, eps,
                 K: tl.constexpr, K_POW2: tl.constexpr, LN: tl.constexpr, ATTENTION: tl.constexpr,
                 D: tl.constexpr, HD: tl.constexpr, CHUNKS: tl.constexpr, PDL: tl.constexpr):
    """A tiled product's input, one row a program, in ``out``'s dtype: built as ``gemv_kernel`` builds it."""
    _await_previous_kernel(PDL)
    row = tl.program_id(0)
    rk = tl.arange(0, K_POW2)
    k_mask = rk < K
    x = _row_input(x_ptr, ln_w_ptr, ln_b_ptr, part_l_ptr, part_acc_ptr, eps, row, rk, k_mask, K, K_POW2, LN,
                   ATTENTION, D, HD, CHUNKS)
    tl.store(out_ptr + row * K + rk, x.to(out_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def tiled_kernel(x_ptr, w_ptr, b_ptr, out_ptr, k_ptr, v_ptr, pos_ptr, best_ptr, best_index_ptr, N,
                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BIAS: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr, QKV: tl.constexpr,
                 ARGMAX: tl.constexpr, D: tl.constexpr, HD: tl.constexpr, L: tl.constexpr, ROWS: tl.constexpr,
                 PRECISION: tl.constexpr, PDL: tl.constexpr):
    """``gemv_kernel``'s outputs for this program's ``BLOCK_M`` rows by ``BLOCK_N`` features, through ``tl.dot``.

    The input ``x`` is plain: a layer norm or merged attention comes from
    ``input_kernel``. It is cast to the weight's dtype for the dot (float32
    weights: ``PRECISION`` "ieee", no TF32); products sum in float32.
    """
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < ROWS
    if BIAS:
        b = tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    if QKV:
        pos = tl.load(pos_ptr)  # written by the previous step, which has finished (see KernelStep._layers)
    _await_previous_kernel(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_mask = rk < K
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
    y = acc
    if BIAS:
        y += b[None, :]
    if GELU:
        y = _gelu_tanh(y)
    mask = m_mask[:, None] & n_mask[None, :]
    if QKV:
        which = rn // D
        col = rn % D
        cached = rm[:, None] * (D * L) + ((col // HD) * (L * HD) + pos * HD + col % HD)[None, :]
        tl.store(out_ptr + rm[:, None] * D + col[None, :], y, mask=mask & (which == 0)[None, :])
        tl.store(k_ptr + cached, y, mask=mask & (which == 1)[None, :])
        tl.store(v_ptr + cached, y, mask=mask & (which == 2)[None, :])
    else:
        if RESIDUAL:
            y += tl.load(out_ptr + rm[:, None] * N + rn[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], y, mask=mask)
    if ARGMAX:
        best, where = tl.max(tl.where(n_mask[None, :], y, float("-inf")), axis=1, return_indices=True,
                             return_indices_tie_break_left=True)
        part = rm * tl.num_programs(0) + tl.program_id(0)
        tl.store(best_ptr + part, best, mask=m_mask)
        tl.store(best_index_ptr + part, tl.program_id(0) * BLOCK_N + where, mask=m_mask)


@triton.jit
def attention_kernel(q_ptr, k_ptr, v_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, pos_ptr, scale,
                     L: tl.constexpr, HD: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKS: tl.constexpr,
                     PDL: tl.constexpr):
    """One head's chunk of positions up to ``pos`` in one row: its score maximum, sum of exp and exp-weighted values.

    The cache rows before ``pos``, written by earlier steps, are read before
    the wait (the step starts after the previous one has finished, see
    ``KernelStep._layers``); the row at ``pos``, which the qkv kernel just
    wrote, after it.
    """
    head = tl.program_id(0)
    chunk = tl.program_id(1)
    row = tl.program_id(2)
    heads = tl.num_programs(0)
    pos = tl.load(pos_ptr)
    rl = chunk * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, HD)
    cache = (row * heads + head) * L * HD
    offs = cache + rl[:, None] * HD + d[None, :]
    k = tl.load(k_ptr + offs, mask=(rl < pos)[:, None], other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=(rl < pos)[:, None], other=0.0).to(tl.float32)
    _await_previous_kernel(PDL)
    q = tl.load(q_ptr + (row * heads + head) * HD + d) * scale
    now = (rl == pos)[:, None]
    k = tl.where(now, tl.load(k_ptr + cache + pos * HD + d).to(tl.float32)[None, :], k)
    v = tl.where(now, tl.load(v_ptr + cache + pos * HD + d).to(tl.float32)[None, :], v)
    valid = rl <= pos
    s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
    m = tl.max(s)  # -inf for a chunk past pos: its weight in the merge is exp(-inf) = 0
    p = tl.where(valid, tl.exp(s - m), 0.0)
    part = (row * heads + head) * CHUNKS + chunk
    tl.store(part_m_ptr + part, m)
    tl.store(part_l_ptr + part, tl.sum(p))
    tl.store(part_acc_ptr + part * HD + d, tl.sum(p[:, None] * v, axis=0))


@triton.jit
def greedy_advance_kernel(best_ptr, best_index_ptr, tokens_ptr, pos_ptr, finished_ptr, out_ptr, step_ptr, flag_ptr,
                          pad, eos, out_stride, PARTS: tl.constexpr, BLOCK: tl.constexpr, EOS: tl.constexpr,
                          ROWS: tl.constexpr, ROW_BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The token choice of ``Generator._advance`` at temperature 0 for ROWS rows, and the position's advance.

    A row's token is its first largest logit (the head's per-program maxima
    merged), or the pad once the row has finished; it is written to the row's
    output column ``step`` and fed to the next step; ``finished`` takes in
    EOS, the flag is whether every row has finished; ``step`` and ``pos`` go
    up by one. One program, ``ROW_BLOCK`` rows at a time: KernelStep.greedy
    takes up to 16, as blocks of fewer rows made the bfloat16 step at 64 rows
    about 45 us slower (docs/results/decode_tiles_probe/README.md).
    """
    _await_previous_kernel(PDL)
    offs = tl.arange(0, BLOCK)
    step = tl.load(step_ptr)
    live = 0
    for first in tl.static_range(0, ROWS, ROW_BLOCK):
        rows = first + tl.arange(0, ROW_BLOCK)
        r_mask = rows < ROWS
        best = tl.load(best_ptr + rows[:, None] * PARTS + offs[None, :], mask=r_mask[:, None] & (offs < PARTS)[None, :],
                       other=float("-inf"))
        _, where = tl.max(best, axis=1, return_indices=True, return_indices_tie_break_left=True)
        finished = tl.load(finished_ptr + rows, mask=r_mask, other=1) != 0  # rows past ROWS count as finished
        token = tl.where(finished, pad, tl.load(best_index_ptr + rows * PARTS + where, mask=r_mask, other=0))
        tl.store(out_ptr + rows * out_stride + step, token, mask=r_mask)
        if EOS:
            finished = finished | (token == eos)
            tl.store(finished_ptr + rows, finished, mask=r_mask)
        tl.store(tokens_ptr + rows, token, mask=r_mask)
        live += tl.sum((finished == 0).to(tl.int32))
    tl.store(flag_ptr, live == 0)
    tl.store(step_ptr, step + 1)
    tl.store(pos_ptr, tl.load(pos_ptr) + 1)


# By the weights' dtype. GEMVs: (block_n, num_warps) per product, and (block_l, num_warps) for the
# attention: for GPT-2 small on an H100, the fastest of a coordinate descent that timed the whole step,
# graphed, per candidate (docs/results/decode_tuning_probe; timing each kernel alone chose slower steps).
# Tiles: (block_n, block_k, num_warps, num_stages) per product ("... tiles"), and the most rows a tile
# takes ("block_m"; fewer rows take the next power of two, at least 16, tl.dot's least). Any shape runs
# with them; other shapes may have faster ones. Re-chosen once the merge went per head: float32's attention
# 64 positions, not 16 (docs/results/decode_merge_probe); proj2 at 4 warps, bf16's proj at 8
# (docs/results/decode_sweep_probe).
_TILES = {"qkv tiles": (32, 128, 4, 3), "proj tiles": (16, 128, 4, 3), "fc tiles": (32, 128, 4, 3),
          "proj2 tiles": (16, 256, 4, 3), "head tiles": (64, 128, 4, 3), "block_m": 64}
CONFIGS = {
    torch.float32: {"qkv": (4, 1), "proj": (8, 4), "fc": (8, 2), "proj2": (2, 4), "head": (16, 4),
                    "attention": (64, 2), **_TILES},
    torch.bfloat16: {"qkv": (4, 1), "proj": (16, 8), "fc": (8, 1), "proj2": (4, 4), "head": (16, 4),
                     "attention": (64, 2), **_TILES},
}


def configs_for(dtype: torch.dtype) -> dict:
    """``CONFIGS`` for weights of ``dtype``: two-byte types (float16 too) take bfloat16's, the others float32's."""
    return CONFIGS[torch.bfloat16 if dtype.itemsize == 2 else torch.float32]


class KernelStep:
    """The decode step of a ``Decoder`` for up to ``max_rows`` rows, as the kernels above (CUDA; Triton).

    ``logits`` is ``Decoder.step`` (float32 logits); ``greedy`` is that, the
    position's advance and ``Generator._advance`` at temperature 0, with no
    other kernels. The rows are those of ``tokens``; each row count compiles
    its own kernels. Owns the step's activation buffers, so a CUDA graph of it
    keeps its addresses. ``pdl``: programmatic dependent launch (sm90 and
    later), so each kernel reads its weights while the one before it finishes.
    ``configs`` overrides entries of ``configs_for`` the weights' dtype.
    ``max_rows`` is ``rows`` with ``tiles`` (the default for 2-byte weights),
    else at most ``GEMV_MAX_ROWS``: float32 tiles are exact but slow.
    """

    def __init__(self, model, rows: int, length: int, pdl: bool, configs: dict | None = None,
                 tiles: bool | None = None) -> None:
        shape = model.shape
        head_size = shape.d_model // shape.n_head
        if head_size & (head_size - 1):
            raise ValueError(f"the decode kernels need a power-of-two head size (d_model / n_head), got "
                             f"{shape.d_model} / {shape.n_head} = {head_size}")
        self.model = model
        dtype = model.wte.weight.dtype
        # Float32 tiles (tl.dot's FMA "ieee" path) made the step 2-11x slower than the compiled model
        # step on an H100: GPT-2 small at 8, 16, 64 rows, 4,526 / 2,650 / 13,544 against 1,071 / 1,179 /
        # 1,855 us (docs/results/decode_tiles_probe/tiles_fp32.json).
        self.max_rows = rows if (dtype.itemsize == 2 if tiles is None else tiles) else min(rows, GEMV_MAX_ROWS)
        self.pdl = pdl
        self.configs = {**configs_for(dtype), **(configs or {})}
        self.precision = "ieee" if dtype == torch.float32 else "tf32"  # tf32: ignored at 2 bytes
        self.d, self.hd, self.length = shape.d_model, head_size, length
        self.chunks = triton.cdiv(length, self.configs["attention"][0])
        parts = max(triton.cdiv(shape.vocab_size, self.configs[name][0]) for name in ("head", "head tiles"))
        device = model.wte.weight.device
        f32 = {"dtype": torch.float32, "device": device}
        rows, heads = self.max_rows, shape.n_head
        self.x = torch.empty(rows, self.d, **f32)
        self.q = torch.empty(rows, self.d, **f32)
        self.part_m = torch.empty(rows, heads, self.chunks, **f32)
        self.part_l = torch.empty(rows, heads, self.chunks, **f32)
        self.part_acc = torch.empty(rows, heads, self.chunks, self.hd, **f32)
        self.h = torch.empty(rows, model.blocks[0].mlp[0].out_features, **f32)  # the MLP's hidden width
        # A tiled product's input (a layer norm, the merged attention), in the weights' dtype.
        self.inputs = torch.empty(rows, self.d, dtype=dtype, device=device)
        self.vocab_logits = torch.empty(rows, shape.vocab_size, **f32)
        self.best = torch.empty(rows, parts, **f32)
        self.best_index = torch.empty(rows, parts, dtype=torch.long, device=device)

    def logits(self, tokens, pos, cache):
        """``Decoder.step(tokens, pos, cache)``: the logits ``(rows, vocab)``, float32 (a view of a buffer)."""
        rows, _ = self._layers(tokens, pos, cache, argmax=False)
        return self.vocab_logits[:rows]

    def greedy(self, tokens, pos, cache, finished, out, step, flag, pad: int, eos: int | None) -> None:
        """One greedy step, in place: feeds ``tokens`` at ``pos``, then as ``Generator._advance``.

        ``out`` is the rows' output tokens ``(rows, columns)``, ``step`` the
        column this step writes, ``flag`` whether every row has finished (one
        element each).
        """
        rows, parts = self._layers(tokens, pos, cache, argmax=True)
        greedy_advance_kernel[(1,)](
            self.best, self.best_index, tokens, pos, finished, out, step, flag, pad, -1 if eos is None else eos,
            out.stride(0), PARTS=parts, BLOCK=triton.next_power_of_2(parts), EOS=eos is not None,
            ROWS=rows, ROW_BLOCK=min(triton.next_power_of_2(rows), 16), PDL=self.pdl, num_warps=4,
            launch_pdl=self.pdl)

    def _layers(self, tokens, pos, cache, argmax: bool) -> tuple[int, int]:
        """The kernels up to the head's logits (and their per-program maxima); returns the rows and the maxima a row."""
        rows = tokens.shape[0]
        if not 1 <= rows <= self.max_rows:
            raise ValueError(f"this KernelStep runs 1 to {self.max_rows} rows, got {rows}")
        if not tokens.is_contiguous():
            raise ValueError("the decode kernels index the rows of tokens: pass a contiguous tensor")
        m = self.model
        block_l, warps = self.configs["attention"]
        # Launched without PDL: it starts once everything before it has finished, and so does the rest of
        # the step, which can then read the previous step's writes (the cache rows, ``pos``) before its waits.
        embed_kernel[(rows,)](tokens, pos, m.wte.weight, m.wpe.weight, self.x, D=self.d,
                              BLOCK_D=triton.next_power_of_2(self.d), PDL=self.pdl, launch_pdl=False)
        for block, (keys, values) in zip(m.blocks, cache.layers):
            self._product("qkv", rows, self.x, block.attn.qkv, self.q, ln=block.ln_1, cache=(keys, values), pos=pos)
            attention_kernel[(block.attn.n_head, self.chunks, rows)](
                self.q, keys, values, self.part_m, self.part_l, self.part_acc, pos, block.attn.scale,
                L=self.length, HD=self.hd, BLOCK_L=block_l, CHUNKS=self.chunks, PDL=self.pdl, num_warps=warps,
                launch_pdl=self.pdl)
            self._product("proj", rows, self.part_m, block.attn.proj, self.x, residual=True, attention=True)
            self._product("fc", rows, self.x, block.mlp[0], self.h, ln=block.ln_2, gelu=True)
            self._product("proj2", rows, self.h, block.mlp[2], self.x, residual=True)
        parts = self._product("head", rows, self.x, m.lm_head, self.vocab_logits, ln=m.ln_f, argmax=argmax)
        return rows, parts

    def _product(self, name, rows, x, linear, out, ln=None, gelu=False, residual=False, cache=None, pos=None,
                 attention=False, argmax=False) -> int:
        """One product of the step: GEMVs up to ``GEMV_MAX_ROWS`` rows; past that, its input then tiles.

        Returns its programs along the features: with ``argmax``, the maxima a row.
        """
        n, k = linear.weight.shape
        keys, values = cache if cache is not None else (out, out)
        # A pointer the flags leave unread gets any tensor.
        bias = linear.bias if linear.bias is not None else linear.weight
        pos = pos if pos is not None else x
        ln_w, ln_b, eps = (ln.weight, ln.bias, ln.eps) if ln is not None else (x, x, 0.0)
        shared = dict(BIAS=linear.bias is not None, GELU=gelu, RESIDUAL=residual, QKV=cache is not None,
                      ARGMAX=argmax, D=self.d, HD=self.hd, L=self.length, ROWS=rows, PDL=self.pdl,
                      launch_pdl=self.pdl)
        if rows <= GEMV_MAX_ROWS:
            block_n, warps = self.configs[name]
            programs = triton.cdiv(n, block_n)
            gemv_kernel[(programs,)](
                x, linear.weight, bias, out, ln_w, ln_b, keys, values, pos, self.part_l, self.part_acc, self.best,
                self.best_index, eps, n, K=k, K_POW2=triton.next_power_of_2(k), BLOCK_N=block_n, LN=ln is not None,
                ATTENTION=attention, CHUNKS=self.chunks, num_warps=warps, **shared)
            return programs
        if ln is not None or attention:
            input_kernel[(rows,)](x, ln_w, ln_b, self.part_l, self.part_acc, self.inputs, eps, K=k,
                                  K_POW2=triton.next_power_of_2(k), LN=ln is not None, ATTENTION=attention, D=self.d,
                                  HD=self.hd, CHUNKS=self.chunks, PDL=self.pdl, num_warps=4, launch_pdl=self.pdl)
            x = self.inputs
        block_n, block_k, warps, stages = self.configs[f"{name} tiles"]
        block_m = min(self.configs["block_m"], max(16, triton.next_power_of_2(rows)))
        programs = triton.cdiv(n, block_n)
        tiled_kernel[(programs, triton.cdiv(rows, block_m))](
            x, linear.weight, bias, out, keys, values, pos, self.best, self.best_index, n, K=k, BLOCK_M=block_m,
            BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=self.precision, num_warps=warps, num_stages=stages, **shared)
        return programs
