"""Decode steps (a few new tokens per running row) without PyTorch's per-module dispatch, on the CPU.

The model's blocks (model.py) cost ~40 small PyTorch calls per layer around the four products;
at decode time those calls, not arithmetic, take 10-20% of a step. Two shortcuts with the same maths:

- one token of one row (batch-1 decoding): each block is one numba call (decode_kernel.py);
- several rows, or a few tokens of one row (speculative verification): per layer one LayerNorm, the
  four products through their oneDNN-packed weights (GELU and the residual adds fused into them), and
  two numba kernels, for rotary + cache write and for attention over each row's slot with a shared
  prompt read once per group (kernels.rows_attention).

`decode_step` returns None where neither applies (prefill-sized inputs, GPU, bf16/fp16, int8, unpacked
weights, autograd, torch.compile tracing, no numba); the engine then runs the model's own blocks.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import decode_kernel, kernels
from ..kernels import FUSABLE_ACTIVATIONS
from ..model import CodeGenForCausalLM, Linear
from .slot_cache import SlotCache

MAX_NEW = 16  # new tokens per row up to which decode_rows runs (decode steps, speculative verification)


def decode_step(model: CodeGenForCausalLM, cache: SlotCache, tokens: torch.Tensor, starts: list[int],
                first_slot: int = 0, shared: list[tuple[list[int], int]] | None = None,
                all_logits: bool = False) -> torch.Tensor | None:
    """forward.forward_rows for a few new tokens per row (decode steps, speculative verification), or
    None where no shortcut applies (then the model's blocks run)."""
    rows, T = tokens.shape
    if T > MAX_NEW or tokens.device.type != "cpu":
        return None
    if rows == 1 and T == 1 and decode_kernel.can_run(model, cache.dtype):
        logits = decode_one(model, cache, int(tokens[0, 0]), starts[0], first_slot)
        return logits[:, None] if all_logits else logits
    if can_decode_rows(model, cache.dtype):
        return decode_rows(model, cache, tokens, starts, first_slot, shared, all_logits)
    return None


def decode_one(model: CodeGenForCausalLM, cache: SlotCache, token: int, position: int, slot: int) -> torch.Tensor:
    """One token of one sequence, each block one numba call: the logits [1, V]."""
    tf = model.transformer
    cache.begin(1, [position], 1, slot)
    x = tf.wte.weight[token].detach().clone()
    cos, sin = tf.rope_cos[position], tf.rope_sin[position]
    for layer, block in enumerate(tf.h):
        x = decode_kernel.block_step(block, x, cos, sin, cache.keys[layer][slot], cache.values[layer][slot], position)
    return model.lm_head(tf.ln_f(x[None]))


def _linears(model: CodeGenForCausalLM) -> list[Linear]:
    blocks = model.transformer.h
    return [model.lm_head, *(lin for b in blocks for lin in (b.attn.qkv, b.attn.out_proj, b.mlp.fc_in, b.mlp.fc_out))]


def can_decode_rows(model: CodeGenForCausalLM, cache_dtype: torch.dtype) -> bool:
    """Whether decode_rows computes this model: every product has a current oneDNN-packed weight (see
    model.Linear.pack), an activation oneDNN can fuse, fp32 cache, numba, inference."""
    if (not kernels.HAVE_NUMBA or torch.is_grad_enabled() or torch.compiler.is_compiling() or model.training
            or cache_dtype != torch.float32 or model.config.activation_function not in FUSABLE_ACTIVATIONS
            or not hasattr(torch.ops.mkldnn._linear_pointwise, "binary")):
        return False
    return all(type(lin) is Linear and lin.packed_weight() is not None for lin in _linears(model))


def decode_rows(model: CodeGenForCausalLM, cache: SlotCache, tokens: torch.Tensor, starts: list[int],
                first_slot: int = 0, shared: list[tuple[list[int], int]] | None = None,
                all_logits: bool = False) -> torch.Tensor:
    """New tokens [rows, T] for several rows, or a few for one (row r continues slot first_slot + r at
    position starts[r]): the logits [rows, V] of each row's last token, [rows, T, V] with all_logits.
    The T tokens of a row go through as T rows of one slot, each seeing the positions up to its own.
    Callers check can_decode_rows first."""
    tf = model.transformer
    linear = torch.ops.mkldnn._linear_pointwise
    act, algorithm = FUSABLE_ACTIVATIONS[model.config.activation_function]
    rows, T = tokens.shape
    cache.begin(rows, starts, T, first_slot, shared)
    if T == 1:
        slots, positions, ends, prefix, groups = cache.decode_plan()
    else:
        slots = np.repeat(np.arange(first_slot, first_slot + rows, dtype=np.int64), T)
        positions = (np.asarray(starts, dtype=np.int64)[:, None] + np.arange(T, dtype=np.int64)).ravel()
        ends, prefix, groups = positions + 1, np.zeros_like(positions), []
    at = torch.from_numpy(positions)
    cos, sin = tf.rope_cos[at], tf.rope_sin[at]
    x = tf.wte.weight[tokens.reshape(-1)]
    width = (x.shape[1],)
    for layer, block in enumerate(tf.h):
        attn, mlp, ln = block.attn, block.mlp, block.ln_1
        K, V = cache.keys[layer], cache.values[layer]
        h = F.layer_norm(x, width, ln.weight, ln.bias, ln.eps)
        qkv = linear(h, attn.qkv.packed_weight(), None, "none", [], "")
        m = linear(h, mlp.fc_in.packed_weight(), mlp.fc_in.bias, act, [], algorithm)
        q = kernels.rotary_store(qkv, cos, sin, K, V, slots, positions)
        a = kernels.rows_attention(q, K, V, slots, ends, prefix, groups)
        x = linear.binary(m, x, mlp.fc_out.packed_weight(), mlp.fc_out.bias, "add")  # x + fc_out(m)
        x = linear.binary(a, x, attn.out_proj.packed_weight(), None, "add")  # ... + out_proj(attention)
    x = x.view(rows, T, -1) if all_logits else x.view(rows, T, -1)[:, -1]
    x = F.layer_norm(x.reshape(-1, width[0]), width, tf.ln_f.weight, tf.ln_f.bias, tf.ln_f.eps)
    logits = linear(x, model.lm_head.packed_weight(), model.lm_head.bias, "none", [], "")
    return logits.view(rows, T, -1) if all_logits else logits
