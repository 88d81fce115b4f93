"""Probe (README here): a decoder layer's one-row step as one Triton kernel whose programs wait on counters, not on kernels.

``actors.decode_kernels`` runs a layer as five kernels chained by programmatic
dependent launch: at each of the 60 boundaries of a step, the next kernel can
load its weights early but waits for the whole previous kernel to drain. Here
one kernel runs the layer's five stages, each program one tile of one stage:
qkv (layer norm + product; keys and values into the cache at ``pos``), the
attention (a head's chunk of positions), the output projection (+ residual),
fc (layer norm + product + GELU), proj2 (+ residual). A program loads its
weight tile first, then waits only for what its stage reads: an attention
program for its head's qkv programs, the other stages for every program of the
stage before, each a counter that producers bump (release) and consumers poll
(acquire). The embedding, the head and the token choice stay the kernels of
``actors.decode_kernels``; so a step is 15 kernels, not 63.

Stages are handed out by ticket, not by program id: a program's first act is
to take the next number of a counter, so a stage's programs start only after
every program of the stages before it has started, and a waiting program
never holds a slot its producer needs. Counters only grow: the ticket's
quotient by the grid is the launch's epoch, and a stage waits for
(epoch + 1) x its producer count, so a CUDA graph replays without resets.
Data another program wrote in this kernel is loaded past L1 (``.cg``). No
atomics on data: each output is summed in one fixed order.

Triton's interpreter runs a launch's programs one after another in ticket
order, so the waits pass at once and the stages compute as on the GPU.
"""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

from actors.decode_kernels import OneRowStep, _await_previous_kernel, _gelu_tanh, embed_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "decode_persistent_probe"))
from decode_persistent import _layer_norm, _merged_attention, _product, _shared, _vector  # noqa: E402

# Counters of a layer's kernel, after the ticket: one per head (its qkv programs), then the attention, proj, fc.
TICKET, HEADS = tl.constexpr(0), tl.constexpr(1)


@triton.jit
def _signal(counter_ptr):
    tl.debug_barrier()  # every thread's stores happen before the release
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait_for(counter_ptr, target):
    while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < target:
        pass
    tl.debug_barrier()


@triton.jit
def _weights(w_ptr, tile, BLOCK: tl.constexpr, K: tl.constexpr, K_POW2: tl.constexpr):
    """Rows ``tile * BLOCK`` on of a (N, K) weight, and their row indices."""
    rn = tile * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, K_POW2)
    return tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rk < K)[None, :], other=0.0), rn


@triton.jit
def _qkv(tile, x_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, sync_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, eps,
         D: tl.constexpr, D_POW2: tl.constexpr, HD: tl.constexpr, L: tl.constexpr, BLOCK: tl.constexpr,
         PDL: tl.constexpr):
    w, rn = _weights(w_ptr, tile, BLOCK, D, D_POW2)
    bias = tl.load(b_ptr + rn).to(tl.float32)
    ln_w = _vector(ln_w_ptr, D, D_POW2)
    ln_b = _vector(ln_b_ptr, D, D_POW2)
    _await_previous_kernel(PDL)
    y = _product(w, _layer_norm(_shared(x_ptr, D, D_POW2), ln_w, ln_b, eps, D, D_POW2), bias)
    which = rn // D
    col = rn % D
    cached = (col // HD) * (L * HD) + tl.load(pos_ptr) * HD + col % HD
    tl.store(q_ptr + col, y, mask=which == 0)
    tl.store(k_ptr + cached, y, mask=which == 1)
    tl.store(v_ptr + cached, y, mask=which == 2)
    _signal(sync_ptr + HEADS + (tile * BLOCK % D) // HD)


@triton.jit
def _attention(item, epoch, q_ptr, k_ptr, v_ptr, pos_ptr, sync_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, scale,
               HD: tl.constexpr, NH: tl.constexpr, L: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKS: tl.constexpr,
               QKV_PER_HEAD: tl.constexpr, PDL: tl.constexpr):
    """A head's chunk of positions: the positions before ``pos`` load while the head's qkv programs finish."""
    head = item // CHUNKS
    _await_previous_kernel(PDL)
    pos = tl.load(pos_ptr)
    rl = (item % CHUNKS) * BLOCK_L + tl.arange(0, BLOCK_L)
    d = tl.arange(0, HD)
    offs = head * L * HD + rl[:, None] * HD + d[None, :]
    older = (rl < pos)[:, None]
    k = tl.load(k_ptr + offs, mask=older, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=older, other=0.0).to(tl.float32)
    _wait_for(sync_ptr + HEADS + head, (epoch + 1) * QKV_PER_HEAD)
    now = (rl == pos)[:, None]
    k += tl.load(k_ptr + offs, mask=now, other=0.0, cache_modifier=".cg").to(tl.float32)
    v += tl.load(v_ptr + offs, mask=now, other=0.0, cache_modifier=".cg").to(tl.float32)
    q = tl.load(q_ptr + head * HD + d, cache_modifier=".cg") * scale
    valid = rl <= pos
    s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
    m = tl.max(s)  # -inf for a chunk past pos: its weight in the merge is exp(-inf) = 0
    p = tl.where(valid, tl.exp(s - m), 0.0)
    tl.store(part_m_ptr + item, m)
    tl.store(part_l_ptr + item, tl.sum(p))
    tl.store(part_acc_ptr + item * HD + d, tl.sum(p[:, None] * v, axis=0))
    _signal(sync_ptr + HEADS + NH)


@triton.jit
def _proj(tile, epoch, x_ptr, sync_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, w_ptr, b_ptr,
          D: tl.constexpr, D_POW2: tl.constexpr, HD: tl.constexpr, NH: tl.constexpr, CHUNKS: tl.constexpr,
          BLOCK: tl.constexpr, PDL: tl.constexpr):
    w, rn = _weights(w_ptr, tile, BLOCK, D, D_POW2)
    bias = tl.load(b_ptr + rn).to(tl.float32)
    _await_previous_kernel(PDL)
    _wait_for(sync_ptr + HEADS + NH, (epoch + 1) * NH * CHUNKS)
    y = _product(w, _merged_attention(part_m_ptr, part_l_ptr, part_acc_ptr, D, D_POW2, HD, CHUNKS), bias)
    tl.store(x_ptr + rn, y + tl.load(x_ptr + rn, cache_modifier=".cg"))
    _signal(sync_ptr + HEADS + NH + 1)


@triton.jit
def _fc(tile, epoch, x_ptr, h_ptr, sync_ptr, ln_w_ptr, ln_b_ptr, w_ptr, b_ptr, eps,
        D: tl.constexpr, D_POW2: tl.constexpr, NH: tl.constexpr, PRODUCERS: tl.constexpr, BLOCK: tl.constexpr,
        PDL: tl.constexpr):
    w, rn = _weights(w_ptr, tile, BLOCK, D, D_POW2)
    bias = tl.load(b_ptr + rn).to(tl.float32)
    ln_w = _vector(ln_w_ptr, D, D_POW2)
    ln_b = _vector(ln_b_ptr, D, D_POW2)
    _await_previous_kernel(PDL)
    _wait_for(sync_ptr + HEADS + NH + 1, (epoch + 1) * PRODUCERS)
    y = _product(w, _layer_norm(_shared(x_ptr, D, D_POW2), ln_w, ln_b, eps, D, D_POW2), bias)
    tl.store(h_ptr + rn, _gelu_tanh(y))
    _signal(sync_ptr + HEADS + NH + 2)


@triton.jit
def _proj2(tile, epoch, x_ptr, h_ptr, sync_ptr, w_ptr, b_ptr, FF: tl.constexpr, FF_POW2: tl.constexpr,
           NH: tl.constexpr, PRODUCERS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    w, rn = _weights(w_ptr, tile, BLOCK, FF, FF_POW2)
    bias = tl.load(b_ptr + rn).to(tl.float32)
    _await_previous_kernel(PDL)
    _wait_for(sync_ptr + HEADS + NH + 2, (epoch + 1) * PRODUCERS)
    y = _product(w, _shared(h_ptr, FF, FF_POW2), bias)
    tl.store(x_ptr + rn, y + tl.load(x_ptr + rn, cache_modifier=".cg"))


@triton.jit
def layer_kernel(x_ptr, q_ptr, h_ptr, k_ptr, v_ptr, pos_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, sync_ptr,
                 ln1_w_ptr, ln1_b_ptr, qkv_w_ptr, qkv_b_ptr, proj_w_ptr, proj_b_ptr,
                 ln2_w_ptr, ln2_b_ptr, fc_w_ptr, fc_b_ptr, proj2_w_ptr, proj2_b_ptr, eps1, eps2, scale,
                 D: tl.constexpr, D_POW2: tl.constexpr, FF: tl.constexpr, FF_POW2: tl.constexpr,
                 HD: tl.constexpr, NH: tl.constexpr, L: tl.constexpr, BLOCK_L: tl.constexpr, CHUNKS: tl.constexpr,
                 B_QKV: tl.constexpr, B_PROJ: tl.constexpr, B_FC: tl.constexpr, B_PROJ2: tl.constexpr,
                 PDL: tl.constexpr):
    QKV: tl.constexpr = 3 * D // B_QKV
    ATTENTION: tl.constexpr = QKV + NH * CHUNKS
    PROJ: tl.constexpr = ATTENTION + D // B_PROJ
    FC: tl.constexpr = PROJ + FF // B_FC
    PROGRAMS: tl.constexpr = FC + D // B_PROJ2
    ticket = tl.atomic_add(sync_ptr + TICKET, 1)
    epoch = ticket // PROGRAMS
    r = ticket % PROGRAMS
    if r < QKV:
        _qkv(r, x_ptr, q_ptr, k_ptr, v_ptr, pos_ptr, sync_ptr, ln1_w_ptr, ln1_b_ptr, qkv_w_ptr, qkv_b_ptr, eps1,
             D, D_POW2, HD, L, B_QKV, PDL)
    elif r < ATTENTION:
        _attention(r - QKV, epoch, q_ptr, k_ptr, v_ptr, pos_ptr, sync_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                   scale, HD, NH, L, BLOCK_L, CHUNKS, 3 * HD // B_QKV, PDL)
    elif r < PROJ:
        _proj(r - ATTENTION, epoch, x_ptr, sync_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, proj_w_ptr, proj_b_ptr,
              D, D_POW2, HD, NH, CHUNKS, B_PROJ, PDL)
    elif r < FC:
        _fc(r - PROJ, epoch, x_ptr, h_ptr, sync_ptr, ln2_w_ptr, ln2_b_ptr, fc_w_ptr, fc_b_ptr, eps2,
            D, D_POW2, NH, D // B_PROJ, B_FC, PDL)
    else:
        _proj2(r - FC, epoch, x_ptr, h_ptr, sync_ptr, proj2_w_ptr, proj2_b_ptr, FF, FF_POW2, NH, FF // B_FC,
               B_PROJ2, PDL)


# Rows a program of each product owns, positions an attention program owns, and warps (all programs).
LAYER_CONFIG = {"qkv": 4, "proj": 4, "fc": 4, "proj2": 1, "attention": 16, "warps": 4}


class DataflowStep(OneRowStep):
    """``OneRowStep`` with each layer one ``layer_kernel`` launch (PDL between kernels as before)."""

    def __init__(self, model, length: int, pdl: bool = True, layer_config: dict | None = None) -> None:
        self.layer_config = {**LAYER_CONFIG, **(layer_config or {})}
        super().__init__(model, length, pdl, configs={"attention": (self.layer_config["attention"], 1)})
        shape = model.shape
        self.ff = model.blocks[0].mlp[0].weight.shape[0]
        c = self.layer_config
        if self.hd % c["qkv"] or self.d % c["proj"] or self.ff % c["fc"] or self.d % c["proj2"]:
            raise ValueError(f"each product's rows per program must divide its features: {c}")
        self.programs = (3 * self.d // c["qkv"] + shape.n_head * self.chunks + self.d // c["proj"] +
                         self.ff // c["fc"] + self.d // c["proj2"])
        self.sync = torch.zeros(shape.n_layer, HEADS.value + shape.n_head + 3, dtype=torch.int64, device=self.x.device)

    def _layers(self, tokens, pos, cache, argmax: bool) -> None:
        m, c = self.model, self.layer_config
        embed_kernel[(1,)](tokens, pos, m.wte.weight, m.wpe.weight, self.x, D=self.d,
                           BLOCK_D=triton.next_power_of_2(self.d), PDL=self.pdl, launch_pdl=self.pdl)
        for block, (keys, values), sync in zip(m.blocks, cache.layers, self.sync):
            attn, fc, proj2 = block.attn, block.mlp[0], block.mlp[2]
            layer_kernel[(self.programs,)](
                self.x, self.q, self.h, keys, values, pos, self.part_m, self.part_l, self.part_acc, sync,
                block.ln_1.weight, block.ln_1.bias, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                block.ln_2.weight, block.ln_2.bias, fc.weight, fc.bias, proj2.weight, proj2.bias,
                block.ln_1.eps, block.ln_2.eps, attn.scale,
                D=self.d, D_POW2=triton.next_power_of_2(self.d), FF=self.ff, FF_POW2=triton.next_power_of_2(self.ff),
                HD=self.hd, NH=m.shape.n_head, L=self.length, BLOCK_L=c["attention"], CHUNKS=self.chunks,
                B_QKV=c["qkv"], B_PROJ=c["proj"], B_FC=c["fc"], B_PROJ2=c["proj2"], PDL=self.pdl,
                num_warps=c["warps"], launch_pdl=self.pdl)
        self._gemv("head", self.x, m.lm_head, self.vocab_logits, ln=m.ln_f, argmax=argmax)
