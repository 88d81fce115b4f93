"""Probe (README here): the decoder's one-row cached step as one persistent Triton kernel, grid barriers between phases.

Correct, and slower than actors.decode_kernels' kernel per phase with programmatic
dependent launch; kept as the record of that experiment, not used by the product.

A step is a chain of phases, each needing all of the one before: per layer
qkv (layer norm + product; keys and values into the cache at ``pos``), the
attention (chunks of ``BLOCK_L`` positions, unnormalised softmax partials),
the output projection (the partials merged; + residual), fc (layer norm +
product + GELU) and proj2 (+ residual); then the head (final layer norm,
logits, each program's largest) and, greedy, the token choice. Separate
kernels pay a launch and a drain at each of these ~60 boundaries. Here one
program per SM runs them all: at each phase it first loads its weight tile,
then waits at a grid barrier for the phase before, so the weights stream in
while the previous phase finishes.

The barrier is a monotonic counter: each program adds one after each phase
(release), and phase p waits until the counter reaches this step's base + p x
programs (acquire). The base is the counter at the step's start rounded down
to a multiple of ``stride``; the last phase pads the counter up to the next
multiple, so the next step starts on a fresh base without a reset. Cooperative
launch guarantees every program is resident, so the barrier cannot deadlock.
Data another program wrote in this kernel is loaded past L1 (``.cg``): L1 is
not coherent. No atomics on data: each output is summed in one fixed order,
so a step gives the same bits every time it runs.

``one_launch=False`` runs each phase as a launch of its own, without barriers:
Triton's interpreter runs a launch's programs one after another, so it cannot
run a grid barrier; the phases, their tiles and their stores are the same.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# The per-layer pointers of the table, in this order.
LAYER_TENSORS = ("ln_1.weight", "ln_1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                 "attn.proj.bias", "ln_2.weight", "ln_2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                 "mlp.2.bias")
PHASES_PER_LAYER = 5


@triton.jit
def _gelu_tanh(y):
    u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
    return 0.5 * y * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))  # 1 + tanh(u), tanh from exp


@triton.jit
def _arrive(counter_ptr, BARRIER: tl.constexpr):
    if BARRIER:
        tl.debug_barrier()  # every thread's stores of the phase happen before the release
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(counter_ptr, target, BARRIER: tl.constexpr):
    if BARRIER:
        while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
            pass
        tl.debug_barrier()


@triton.jit
def _layer_ptr(table_ptr, layer, which: tl.constexpr, like):
    """The ``which``-th tensor of ``LAYER_TENSORS`` for ``layer``, typed as ``like`` (a weight pointer)."""
    return tl.load(table_ptr + layer * 12 + which).to(like.dtype)


@triton.jit
def _rows(pid, ROWS: tl.constexpr, N, BLOCK: tl.constexpr):
    """This program's output features: ``ROWS`` from ``pid * ROWS``, in a block of ``BLOCK`` (masked)."""
    r = tl.arange(0, BLOCK)
    rn = pid * ROWS + r
    return rn, (r < ROWS) & (rn < N)


@triton.jit
def _tile(w_ptr, rn, n_mask, K: tl.constexpr, K_POW2: tl.constexpr):
    rk = tl.arange(0, K_POW2)
    return tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_mask[:, None] & (rk < K)[None, :], other=0.0)


@triton.jit
def _shared(ptr, K: tl.constexpr, K_POW2: tl.constexpr):
    """A vector other programs wrote in this kernel: loaded past L1."""
    rk = tl.arange(0, K_POW2)
    return tl.load(ptr + rk, mask=rk < K, other=0.0, cache_modifier=".cg").to(tl.float32)


@triton.jit
def _vector(ptr, K: tl.constexpr, K_POW2: tl.constexpr):
    """A parameter vector (no kernel writes it), as float32."""
    rk = tl.arange(0, K_POW2)
    return tl.load(ptr + rk, mask=rk < K, other=0.0).to(tl.float32)


@triton.jit
def _layer_norm(x, weight, bias, eps, K: tl.constexpr, K_POW2: tl.constexpr):
    k_mask = tl.arange(0, K_POW2) < K
    mean = tl.sum(x) / K
    centred = tl.where(k_mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred) / K + eps)
    return centred * rstd * weight + bias


@triton.jit
def _product(w, x, bias):
    return tl.sum(w.to(tl.float32) * x[None, :], axis=1) + bias


@triton.jit
def _merged_attention(part_m_ptr, part_l_ptr, part_acc_ptr, D: tl.constexpr, D_POW2: tl.constexpr,
                      HD: tl.constexpr, CHUNKS: tl.constexpr):
    """The attention output (D features): each head's chunk partials merged (softmax over all chunks)."""
    rk = tl.arange(0, D_POW2)
    k_mask = rk < D
    head = rk // HD
    m = tl.full(rk.shape, float("-inf"), tl.float32)
    for c in tl.static_range(CHUNKS):
        m = tl.maximum(m, tl.load(part_m_ptr + head * CHUNKS + c, mask=k_mask, other=0.0, cache_modifier=".cg"))
    total = tl.zeros(rk.shape, tl.float32)
    acc = tl.zeros(rk.shape, tl.float32)
    for c in tl.static_range(CHUNKS):
        weight = tl.exp(tl.load(part_m_ptr + head * CHUNKS + c, mask=k_mask, other=0.0, cache_modifier=".cg") - m)
        total += weight * tl.load(part_l_ptr + head * CHUNKS + c, mask=k_mask, other=0.0, cache_modifier=".cg")
        acc += weight * tl.load(part_acc_ptr + (head * CHUNKS + c) * HD + rk % HD, mask=k_mask, other=0.0,
                                cache_modifier=".cg")
    return tl.where(k_mask, acc / total, 0.0)  # the padding features: 0, not 0 / 0


@triton.jit
def _qkv_phase(table_ptr, layer, wte_ptr, wpe_ptr, tokens_ptr, pos, x_ptr, q_ptr, keys_ptr, values_ptr, cache_layer,
               eps, pid, counter_ptr, target, D: tl.constexpr, D_POW2: tl.constexpr, HD: tl.constexpr,
               L: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    """Layer norm and the qkv product; the keys and values straight into the cache at ``pos``."""
    rn, n_mask = _rows(pid, ROWS, 3 * D, BLOCK)
    w = _tile(_layer_ptr(table_ptr, layer, 2, wte_ptr), rn, n_mask, D, D_POW2)
    ln_w = _vector(_layer_ptr(table_ptr, layer, 0, wte_ptr), D, D_POW2)
    ln_b = _vector(_layer_ptr(table_ptr, layer, 1, wte_ptr), D, D_POW2)
    bias = tl.load(_layer_ptr(table_ptr, layer, 3, wte_ptr) + rn, mask=n_mask, other=0.0).to(tl.float32)
    rk = tl.arange(0, D_POW2)
    x = tl.zeros([D_POW2], tl.float32)
    if layer == 0:  # the embedding (of the token the step before wrote): every program computes it, one stores it
        token = tl.load(tokens_ptr)
        x = tl.load(wte_ptr + token * D + rk, mask=rk < D, other=0.0).to(tl.float32) + \
            tl.load(wpe_ptr + pos * D + rk, mask=rk < D, other=0.0).to(tl.float32)
        if pid == 0:
            tl.store(x_ptr + rk, x, mask=rk < D)
    _wait(counter_ptr, target, BARRIER)
    if layer > 0:
        x = _shared(x_ptr, D, D_POW2)
    y = _product(w, _layer_norm(x, ln_w, ln_b, eps, D, D_POW2), bias)
    which = rn // D
    col = rn % D
    cached = cache_layer + (col // HD) * (L * HD) + pos * HD + col % HD
    tl.store(q_ptr + col, y, mask=n_mask & (which == 0))
    tl.store(keys_ptr + cached, y, mask=n_mask & (which == 1))
    tl.store(values_ptr + cached, y, mask=n_mask & (which == 2))


@triton.jit
def _attention_phase(q_ptr, keys_ptr, values_ptr, cache_layer, pos, scale, part_m_ptr, part_l_ptr, part_acc_ptr,
                     pid, counter_ptr, target, NH: tl.constexpr, HD: tl.constexpr, L: tl.constexpr,
                     BLOCK_L: tl.constexpr, CHUNKS: tl.constexpr, PROGRAMS: tl.constexpr, BARRIER: tl.constexpr):
    """Each (head, chunk of positions up to ``pos``): its score maximum, sum of exp and exp-weighted values."""
    _wait(counter_ptr, target, BARRIER)
    d = tl.arange(0, HD)
    for item in range(pid, NH * CHUNKS, PROGRAMS):
        head = item // CHUNKS
        rl = (item % CHUNKS) * BLOCK_L + tl.arange(0, BLOCK_L)
        valid = rl <= pos
        offs = cache_layer + head * L * HD + rl[:, None] * HD + d[None, :]
        k = tl.load(keys_ptr + offs, mask=valid[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
        v = tl.load(values_ptr + offs, mask=valid[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
        q = tl.load(q_ptr + head * HD + d, cache_modifier=".cg") * scale
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m = tl.max(s)  # -inf for a chunk past pos: its weight in the merge is exp(-inf) = 0
        p = tl.where(valid, tl.exp(s - m), 0.0)
        tl.store(part_m_ptr + item, m)
        tl.store(part_l_ptr + item, tl.sum(p))
        tl.store(part_acc_ptr + item * HD + d, tl.sum(p[:, None] * v, axis=0))


@triton.jit
def _proj_phase(table_ptr, layer, wte_ptr, x_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, pid, counter_ptr, target,
                D: tl.constexpr, D_POW2: tl.constexpr, HD: tl.constexpr, CHUNKS: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    """The output projection of the merged attention, + residual."""
    rn, n_mask = _rows(pid, ROWS, D, BLOCK)
    w = _tile(_layer_ptr(table_ptr, layer, 4, wte_ptr), rn, n_mask, D, D_POW2)
    bias = tl.load(_layer_ptr(table_ptr, layer, 5, wte_ptr) + rn, mask=n_mask, other=0.0).to(tl.float32)
    _wait(counter_ptr, target, BARRIER)
    y = _product(w, _merged_attention(part_m_ptr, part_l_ptr, part_acc_ptr, D, D_POW2, HD, CHUNKS), bias)
    y += tl.load(x_ptr + rn, mask=n_mask, other=0.0, cache_modifier=".cg")
    tl.store(x_ptr + rn, y, mask=n_mask)


@triton.jit
def _fc_phase(table_ptr, layer, wte_ptr, x_ptr, h_ptr, eps, pid, counter_ptr, target, D: tl.constexpr,
              D_POW2: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    """Layer norm, the first MLP product, GELU."""
    rn, n_mask = _rows(pid, ROWS, 4 * D, BLOCK)
    w = _tile(_layer_ptr(table_ptr, layer, 8, wte_ptr), rn, n_mask, D, D_POW2)
    ln_w = _vector(_layer_ptr(table_ptr, layer, 6, wte_ptr), D, D_POW2)
    ln_b = _vector(_layer_ptr(table_ptr, layer, 7, wte_ptr), D, D_POW2)
    bias = tl.load(_layer_ptr(table_ptr, layer, 9, wte_ptr) + rn, mask=n_mask, other=0.0).to(tl.float32)
    _wait(counter_ptr, target, BARRIER)
    y = _gelu_tanh(_product(w, _layer_norm(_shared(x_ptr, D, D_POW2), ln_w, ln_b, eps, D, D_POW2), bias))
    tl.store(h_ptr + rn, y, mask=n_mask)


@triton.jit
def _proj2_phase(table_ptr, layer, wte_ptr, x_ptr, h_ptr, pid, counter_ptr, target, D: tl.constexpr,
                 H_POW2: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    """The second MLP product, + residual."""
    rn, n_mask = _rows(pid, ROWS, D, BLOCK)
    w = _tile(_layer_ptr(table_ptr, layer, 10, wte_ptr), rn, n_mask, 4 * D, H_POW2)
    bias = tl.load(_layer_ptr(table_ptr, layer, 11, wte_ptr) + rn, mask=n_mask, other=0.0).to(tl.float32)
    _wait(counter_ptr, target, BARRIER)
    y = _product(w, _shared(h_ptr, 4 * D, H_POW2), bias)
    y += tl.load(x_ptr + rn, mask=n_mask, other=0.0, cache_modifier=".cg")
    tl.store(x_ptr + rn, y, mask=n_mask)


@triton.jit
def _head_phase(head_ptr, lnf_w_ptr, lnf_b_ptr, x_ptr, logits_ptr, best_ptr, best_index_ptr, eps, pid, counter_ptr,
                target, D: tl.constexpr, D_POW2: tl.constexpr, V: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr, GREEDY: tl.constexpr, BARRIER: tl.constexpr):
    """Final layer norm and the logits of this program's ``ROWS`` tokens, in tiles of ``BLOCK``; greedy: their largest."""
    r = tl.arange(0, BLOCK)
    first = pid * ROWS
    w = _tile(head_ptr, first + r, (r < ROWS) & (first + r < V), D, D_POW2)
    ln_w = _vector(lnf_w_ptr, D, D_POW2)
    ln_b = _vector(lnf_b_ptr, D, D_POW2)
    _wait(counter_ptr, target, BARRIER)
    x = _layer_norm(_shared(x_ptr, D, D_POW2), ln_w, ln_b, eps, D, D_POW2)
    best = tl.full((), float("-inf"), tl.float32)
    best_index = first
    for offset in range(0, ROWS, BLOCK):
        rn = first + offset + r
        n_mask = (offset + r < ROWS) & (rn < V)
        # The next tile's load is in flight while this one is summed.
        w_next = _tile(head_ptr, rn + BLOCK, (offset + BLOCK + r < ROWS) & (rn + BLOCK < V), D, D_POW2)
        y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        tl.store(logits_ptr + rn, y, mask=n_mask)
        if GREEDY:
            tile_best, where = tl.max(tl.where(n_mask, y, float("-inf")), axis=0, return_indices=True,
                                      return_indices_tie_break_left=True)
            better = tile_best > best  # strictly: a later tile as large keeps the first index
            best_index = tl.where(better, first + offset + where, best_index)
            best = tl.where(better, tile_best, best)
        w = w_next
    if GREEDY:
        tl.store(best_ptr + pid, best)
        tl.store(best_index_ptr + pid, best_index)


@triton.jit
def _advance_phase(best_ptr, best_index_ptr, tokens_ptr, pos_ptr, pos, finished_ptr, out_ptr, step_ptr, flag_ptr,
                   pad, eos, pid, counter_ptr, target, PROGRAMS: tl.constexpr, PROGRAMS_POW2: tl.constexpr,
                   EOS: tl.constexpr, BARRIER: tl.constexpr):
    """``Generator._advance`` at temperature 0 for the row, and the position's advance (program 0).

    The token is the first largest logit (the programs' maxima merged), or the
    pad once the row has finished; it is written to the output column ``step``
    and fed to the next step; ``finished`` takes in EOS and the flag copies it.
    """
    _wait(counter_ptr, target, BARRIER)
    if pid == 0:
        offs = tl.arange(0, PROGRAMS_POW2)
        best = tl.load(best_ptr + offs, mask=offs < PROGRAMS, other=float("-inf"), cache_modifier=".cg")
        _, where = tl.max(best, axis=0, return_indices=True, return_indices_tie_break_left=True)
        finished = tl.load(finished_ptr) != 0
        token = tl.where(finished, pad, tl.load(best_index_ptr + where, cache_modifier=".cg"))
        step = tl.load(step_ptr)
        tl.store(out_ptr + step, token)
        if EOS:
            finished = finished | (token == eos)
            tl.store(finished_ptr, finished)
        tl.store(flag_ptr, finished)
        tl.store(tokens_ptr, token)
        tl.store(step_ptr, step + 1)
        tl.store(pos_ptr, pos + 1)


@triton.jit
def step_kernel(table_ptr, wte_ptr, wpe_ptr, lnf_w_ptr, lnf_b_ptr, head_ptr, keys_ptr, values_ptr, cache_stride,
                tokens_ptr, pos_ptr, x_ptr, q_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, h_ptr, logits_ptr,
                best_ptr, best_index_ptr, counter_ptr, finished_ptr, out_ptr, step_ptr, flag_ptr,
                pad, eos, eps, scale, first_phase, last_phase,
                N_LAYER: tl.constexpr, D: tl.constexpr, NH: tl.constexpr, HD: tl.constexpr, L: tl.constexpr,
                V: tl.constexpr, D_POW2: tl.constexpr, H_POW2: tl.constexpr, BLOCK_L: tl.constexpr,
                CHUNKS: tl.constexpr, PROGRAMS: tl.constexpr, PROGRAMS_POW2: tl.constexpr,
                ROWS_QKV: tl.constexpr, BLOCK_QKV: tl.constexpr, ROWS_D: tl.constexpr, BLOCK_D: tl.constexpr,
                ROWS_FC: tl.constexpr, BLOCK_FC: tl.constexpr, ROWS_HEAD: tl.constexpr, BLOCK_HEAD: tl.constexpr,
                LAST: tl.constexpr, STRIDE: tl.constexpr, GREEDY: tl.constexpr, EOS: tl.constexpr,
                BARRIER: tl.constexpr):
    """Phases ``first_phase`` to ``last_phase - 1`` of a step whose last phase is ``LAST`` (module docstring)."""
    pid = tl.program_id(0)
    HEAD_PHASE: tl.constexpr = N_LAYER * 5
    pos = tl.load(pos_ptr, cache_modifier=".cg")
    base = 0
    if BARRIER:
        base = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") // STRIDE * STRIDE
    for phase in range(first_phase, last_phase):
        layer = phase // 5
        kind = phase % 5
        cache_layer = layer.to(tl.int64) * cache_stride
        target = base + phase * PROGRAMS
        if phase == HEAD_PHASE:
            _head_phase(head_ptr, lnf_w_ptr, lnf_b_ptr, x_ptr, logits_ptr, best_ptr, best_index_ptr, eps, pid,
                        counter_ptr, target, D, D_POW2, V, ROWS_HEAD, BLOCK_HEAD, GREEDY, BARRIER)
        elif phase > HEAD_PHASE:
            if GREEDY:  # else not compiled: the greedy pointers are stand-ins
                _advance_phase(best_ptr, best_index_ptr, tokens_ptr, pos_ptr, pos, finished_ptr, out_ptr, step_ptr,
                               flag_ptr, pad, eos, pid, counter_ptr, target, PROGRAMS, PROGRAMS_POW2, EOS, BARRIER)
        elif kind == 0:
            _qkv_phase(table_ptr, layer, wte_ptr, wpe_ptr, tokens_ptr, pos, x_ptr, q_ptr, keys_ptr, values_ptr,
                       cache_layer, eps, pid, counter_ptr, target, D, D_POW2, HD, L, ROWS_QKV, BLOCK_QKV, BARRIER)
        elif kind == 1:
            _attention_phase(q_ptr, keys_ptr, values_ptr, cache_layer, pos, scale, part_m_ptr, part_l_ptr,
                             part_acc_ptr, pid, counter_ptr, target, NH, HD, L, BLOCK_L, CHUNKS, PROGRAMS, BARRIER)
        elif kind == 2:
            _proj_phase(table_ptr, layer, wte_ptr, x_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, pid, counter_ptr,
                        target, D, D_POW2, HD, CHUNKS, ROWS_D, BLOCK_D, BARRIER)
        elif kind == 3:
            _fc_phase(table_ptr, layer, wte_ptr, x_ptr, h_ptr, eps, pid, counter_ptr, target, D, D_POW2, ROWS_FC,
                      BLOCK_FC, BARRIER)
        else:
            _proj2_phase(table_ptr, layer, wte_ptr, x_ptr, h_ptr, pid, counter_ptr, target, D, H_POW2, ROWS_D,
                         BLOCK_D, BARRIER)
        if phase < LAST:
            _arrive(counter_ptr, BARRIER)
        elif BARRIER:
            if pid == 0:  # every program has arrived at every phase before this one: the next step's base
                tl.atomic_add(counter_ptr, STRIDE - LAST * PROGRAMS, sem="release", scope="gpu")


class PersistentStep:
    """The decode step of a ``Decoder`` for one row, as ``step_kernel`` (CUDA; Triton).

    ``logits`` is ``Decoder.step`` for one row (float32 logits); ``greedy`` is
    that, the position's advance and ``Generator._advance`` at temperature 0.
    Owns the step's activation buffers, the barrier's counter and the table of
    the layers' weight pointers, so a CUDA graph of it keeps its addresses.
    ``programs``: one per SM by default. ``one_launch=False``: a launch per
    phase, no barrier (Triton's interpreter).
    """

    def __init__(self, model, length: int, programs: int | None = None, one_launch: bool = True,
                 block_l: int = 32, block_head: int = 16, num_warps: int = 16) -> None:
        shape = model.shape
        head_size = shape.d_model // shape.n_head
        if head_size & (head_size - 1):
            raise ValueError(f"the decode kernels need a power-of-two head size (d_model / n_head), got "
                             f"{shape.d_model} / {shape.n_head} = {head_size}")
        device = model.wte.weight.device
        if programs is None:
            programs = torch.cuda.get_device_properties(device).multi_processor_count
        self.model = model
        self.one_launch = one_launch
        self.length, self.programs, self.num_warps = length, programs, num_warps
        self.block_l, self.block_head = block_l, block_head
        self.chunks = triton.cdiv(length, block_l)
        d = shape.d_model
        self.sizes = dict(D_POW2=triton.next_power_of_2(d), H_POW2=triton.next_power_of_2(4 * d),
                          PROGRAMS_POW2=triton.next_power_of_2(programs),
                          ROWS_HEAD=triton.cdiv(shape.vocab_size, programs))
        for name, n in (("QKV", 3 * d), ("D", d), ("FC", 4 * d)):
            rows = triton.cdiv(n, programs)
            self.sizes.update({f"ROWS_{name}": rows, f"BLOCK_{name}": triton.next_power_of_2(rows)})
        self.phases = PHASES_PER_LAYER * shape.n_layer + 2  # the layers', the head, the token choice
        self.table = torch.tensor([[block.get_parameter(name).data_ptr() for name in LAYER_TENSORS]
                                   for block in model.blocks], dtype=torch.int64, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.x = torch.empty(d, **f32)
        self.q = torch.empty(d, **f32)
        self.part_m = torch.empty(shape.n_head * self.chunks, **f32)
        self.part_l = torch.empty(shape.n_head * self.chunks, **f32)
        self.part_acc = torch.empty(shape.n_head * self.chunks, head_size, **f32)
        self.h = torch.empty(4 * d, **f32)
        self.vocab_logits = torch.empty(1, shape.vocab_size, **f32)
        self.best = torch.empty(programs, **f32)
        self.best_index = torch.empty(programs, dtype=torch.long, device=device)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)

    def logits(self, tokens, pos, cache):
        """``Decoder.step(tokens, pos, cache)`` for one row: the logits ``(1, vocab)``, float32."""
        self._launch(tokens, pos, cache, None)
        return self.vocab_logits

    def greedy(self, tokens, pos, cache, finished, out, step, flag, pad: int, eos: int | None) -> None:
        """One greedy step of one row, in place: feeds ``tokens`` at ``pos``, then as ``Generator._advance``.

        ``out`` is the row's output tokens, ``step`` the column this step writes,
        ``flag`` the all-finished flag (one element each).
        """
        self._launch(tokens, pos, cache, (finished, out, step, flag, pad, eos))

    def _launch(self, tokens, pos, cache, greedy) -> None:
        m, shape = self.model, self.model.shape
        keys, values = cache.layers[0]
        stride = (cache.layers[1][0].data_ptr() - keys.data_ptr()) // keys.element_size() if shape.n_layer > 1 else 0
        finished, out, step, flag, pad, eos = greedy or (self.best,) * 4 + (0, None)
        last = PHASES_PER_LAYER * shape.n_layer + (2 if greedy else 1)
        ranges = [(0, last)] if self.one_launch else [(p, p + 1) for p in range(last)]
        extra = {"launch_cooperative_grid": True} if self.one_launch else {}
        for first, stop in ranges:
            step_kernel[(self.programs,)](
                self.table, m.wte.weight, m.wpe.weight, m.ln_f.weight, m.ln_f.bias, m.lm_head.weight, keys, values,
                stride, tokens, pos, self.x, self.q, self.part_m, self.part_l, self.part_acc, self.h,
                self.vocab_logits, self.best, self.best_index, self.counter, finished, out, step, flag,
                pad, -1 if eos is None else eos, m.ln_f.eps, m.blocks[0].attn.scale, first, stop,
                N_LAYER=shape.n_layer, D=shape.d_model, NH=shape.n_head, HD=shape.d_model // shape.n_head,
                L=self.length, V=shape.vocab_size, BLOCK_L=self.block_l, CHUNKS=self.chunks, PROGRAMS=self.programs,
                **self.sizes, BLOCK_HEAD=self.block_head, LAST=last - 1, STRIDE=self.phases * self.programs,
                GREEDY=greedy is not None, EOS=eos is not None, BARRIER=self.one_launch,
                num_warps=self.num_warps, **extra)
