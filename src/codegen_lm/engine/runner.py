"""Running the model for one engine step: rows of new tokens, each continuing its own cache slot.

A step mixes what the engine has to do at once: one new token for each running sample, a few for a
sample whose speculative guesses are being checked, and a chunk of a prompt being prefilled. `run`
computes all of them in one pass over the weights (the products see every token of the step as one
matrix) and returns the logits each row asked for.

On the CPU in fp32 (int8 weights included) the pass is written out here layer by layer: one
LayerNorm, the products through the kernel paths the engine planned for this many rows
(engine/weights.py, kernels/registry.py; GELU and the residual adds fused into oneDNN's product
where that is the path), or as bf16 or int8 x int8 products (matmul_dtype), rotary + cache writes
and attention in numba kernels for single-token rows (each row reads only its own positions; the
samples of one prompt read the prompt once), and PyTorch's SDPA for rows of several tokens. A step
of exactly one token runs each block as one numba call (kernels/block.py; not for int8 x int8).
Elsewhere (GPU, bf16/fp16 weights, no numba, autograd, torch.compile) the model's own blocks run,
once per run of rows that line up.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import attention as attn_kernels
from ..kernels import block as block_kernel
from ..kernels import gelu as gelu_kernel
from ..kernels import numba_ok, onednn, registry
from .slot_cache import SlotCache
from .weights import packed_weight, product, row_group


@dataclass
class Row:
    """New tokens of one sequence: tokens[i] is at position start + i of cache slot `slot`, whose
    first `start` positions are cached. logits: "last" (the last token's), "all", or "none"."""

    slot: int
    start: int
    tokens: list[int]
    logits: str = "last"

    @property
    def logits_count(self) -> int:
        """How many rows of `run`'s result are this row's."""
        return {"all": len(self.tokens), "last": 1, "none": 0}[self.logits]


Groups = Sequence[tuple[list[int], int]]  # (indices of single-token rows, length of the prefix they share)


def run(model: nn.Module, cache: SlotCache, rows: Sequence[Row], shared: Groups = (),
        blocks: Callable | None = None, matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Write the rows' keys and values into the cache and return the logits the rows asked for, in row
    order, as one tensor [wanted, V] (see `logits_count`). shared: groups of single-token rows whose
    slots hold the same keys and values for their first `length` positions. blocks: what runs the
    model's own blocks (default `forward_slots`; the engine passes a compiled one with compile=True).
    matmul_dtype bfloat16: the CPU pass runs the products of the blocks in bf16 (activations rounded to
    bf16 at each product's input, fp32 accumulation and everything else in fp32: LayerNorms, residual
    stream, attention, keys and values, and the lm_head, so that logits stay fp32 products).
    matmul_dtype int8: every product, the lm_head's included, is int8 x int8 (activations quantized
    per row, see kernels/w8a8.py; weights.prepare(w8a8=True) must have planned them); the rest as
    for bf16."""
    cache.ensure(max(r.start + len(r.tokens) for r in rows))
    if blocks is None and _kernels_apply(model, cache):
        mode = {torch.bfloat16: "bf16", torch.int8: "w8a8"}.get(matmul_dtype, "fp32")
        return _run_kernels(model, cache, rows, shared, mode)
    return _run_blocks(model, cache, rows, blocks or forward_slots)


def _kernels_apply(model: nn.Module, cache: SlotCache) -> bool:
    return (cache.device.type == "cpu" and cache.dtype == torch.float32 and numba_ok()
            and model.transformer.wte.weight.dtype == torch.float32 and not model.training
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


# ---- the CPU pass -------------------------------------------------------------------------------


_ONES: dict[int, torch.Tensor] = {}  # the row scales of fp32 weights, by size


def _matrix(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A product's weight and per-row scales: int8 weights' own (quantize.py), ones for fp32 ones."""
    scale = getattr(linear, "weight_scale", None)
    if scale is None:
        n = linear.weight.shape[0]
        scale = _ONES.get(n)
        if scale is None:
            scale = _ONES[n] = torch.ones(n, dtype=torch.float32)
    return linear.weight, scale


def _block_weights(block: nn.Module) -> list[torch.Tensor]:
    """A block's tensors in block_step's order (see kernels/block.can_run)."""
    attn, mlp = block.attn, block.mlp
    return [block.ln_1.weight, block.ln_1.bias, *_matrix(attn.qkv_proj), *_matrix(mlp.fc_in), mlp.fc_in.bias,
            *_matrix(attn.out_proj), *_matrix(mlp.fc_out), mlp.fc_out.bias]


def _one_token(model: nn.Module, cache: SlotCache, row: Row) -> torch.Tensor | None:
    """One token of one sequence, each block one numba call: logits [1, V], or None where the block
    kernel cannot compute this model."""
    tf = model.transformer
    weights = [_block_weights(b) for b in tf.h]
    if not all(block_kernel.can_run(w, model.config.activation_function, cache.dtype) for w in weights[:1]):
        return None
    token, position, place = row.tokens[0], row.start, cache.phys[row.slot]
    cache.ensure(position + 1)  # (the kernel writes where it is told: no bounds checks)
    x = tf.wte.weight[token].detach().clone()
    cos, sin = tf.rope_cos[position], tf.rope_sin[position]
    group = row_group(tf.h[0].attn.qkv_proj)
    for layer, (block, w) in enumerate(zip(tf.h, weights)):
        x = block_kernel.block_step(w, block.ln_1.eps, block.attn.n_head, x, cos, sin, cache.keys[layer][place],
                                    cache.values[layer][place], position, group)
    return model.lm_head(tf.ln_f(x[None]))


def _other_product(linear: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor | None:
    """linear(x) as a bf16 or int8 x int8 product (mode) through the module's plan for it, or None for
    fp32 (and for int8 weights in bf16 mode: they have no bf16 plan)."""
    if mode == "fp32":
        return None
    out = product(linear, x, mode)
    if out is None and mode == "bf16" and isinstance(linear, nn.Linear):  # not prepared: converted on the fly
        out = registry.BY_NAME["torch-bf16"].run(linear.weight.to(torch.bfloat16), x)
        if linear.bias is not None:
            out += linear.bias
    if out is None and mode == "w8a8":
        raise ValueError("int8 x int8 products need the model prepared for them (weights.prepare(w8a8=True))")
    return out


def _product(linear: nn.Module, x: torch.Tensor, act: Callable | None = None,
             fused: tuple[str, str] | None = None, mode: str = "fp32") -> torch.Tensor:
    """act(linear(x)), through the packed weight (with the activation fused) where the plan uses it
    for this many rows; in bf16 or w8a8 mode, as such a product."""
    out = _other_product(linear, x, mode)
    if out is not None:
        if act is None:
            return out
        # tanh GELU in one numba pass (fused is set for it); PyTorch's is several times slower
        fast = gelu_kernel.gelu_tanh_(out) if fused == onednn.FUSABLE_ACTIVATIONS["gelu_new"] else None
        return fast if fast is not None else act(out)
    w = packed_weight(linear, x.shape[0])
    if w is not None and (act is None or fused is not None):
        return onednn.packed_linear(x, w, linear.bias, fused or ("none", ""))
    out = linear(x)
    return act(out) if act is not None else out


def _product_add(linear: nn.Module, x: torch.Tensor, residual: torch.Tensor, mode: str = "fp32") -> torch.Tensor:
    """residual + linear(x), the add fused into the packed product where the plan uses it."""
    out = _other_product(linear, x, mode)
    if out is not None:
        return residual + out
    w = packed_weight(linear, x.shape[0])
    if w is not None:
        return onednn.packed_linear_add(x, residual, w, linear.bias)
    return residual + linear(x)


def _run_kernels(model: nn.Module, cache: SlotCache, rows: Sequence[Row], shared: Groups,
                 mode: str = "fp32") -> torch.Tensor:
    if len(rows) == 1 and len(rows[0].tokens) == 1 and mode != "w8a8":  # (the block kernel is weight-only)
        logits = _one_token(model, cache, rows[0])
        if logits is not None:
            return logits if rows[0].logits_count else logits[:0]
    tf = model.transformer
    single = [i for i, r in enumerate(rows) if len(r.tokens) == 1]
    multi = [i for i, r in enumerate(rows) if len(r.tokens) > 1]
    order = single + multi  # single-token rows first: their tokens are rows 0..S-1 of the pass
    offsets, tokens, slots, positions = {}, [], [], []
    for i in order:
        r = rows[i]
        offsets[i] = len(tokens)
        tokens.extend(r.tokens)
        slots.extend([cache.phys[r.slot]] * len(r.tokens))  # places in the cache tensors
        positions.extend(range(r.start, r.start + len(r.tokens)))
    S = len(single)
    slots_np, pos_np = np.asarray(slots, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    prefix = np.zeros(S, dtype=np.int64)
    groups = []
    where = {row: t for t, row in enumerate(single)}
    for members, length in shared:
        index = [where[m] for m in members if m in where]
        if len(index) > 1:
            prefix[index] = length
            consecutive = index == list(range(index[0], index[0] + len(index)))
            groups.append((slice(index[0], index[-1] + 1) if consecutive else torch.tensor(index),
                           int(slots_np[index[0]]), length))
    at = torch.from_numpy(pos_np)
    cos, sin = tf.rope_cos[at], tf.rope_sin[at]
    ends = pos_np[:S] + 1
    x = tf.wte.weight[torch.tensor(tokens)]
    width = (x.shape[1],)
    act_name = model.config.activation_function
    fused = onednn.FUSABLE_ACTIVATIONS.get(act_name)
    for layer, block in enumerate(tf.h):
        attn, mlp, ln = block.attn, block.mlp, block.ln_1
        K, V = cache.keys[layer], cache.values[layer]
        h = F.layer_norm(x, width, ln.weight, ln.bias, ln.eps)
        qkv = _product(attn.qkv_proj, h, mode=mode)
        m = _product(mlp.fc_in, h, mlp.act, fused, mode)
        a = torch.empty_like(x)
        if S:
            q = attn_kernels.rotary_store(qkv[:S], cos[:S], sin[:S], K, V, slots_np[:S], pos_np[:S])
            a[:S] = attn_kernels.rows_attention(q, K, V, slots_np[:S], ends, prefix, groups)
        for i in multi:
            r, o = rows[i], offsets[i]
            T = len(r.tokens)
            q = attn_kernels.rotary_store(qkv[o : o + T], cos[o : o + T], sin[o : o + T], K, V, slots_np[o : o + T],
                                          pos_np[o : o + T])
            place = cache.phys[r.slot]
            a[o : o + T] = _chunk_attention(q, K[place], V[place], r.start)
        x = _product_add(mlp.fc_out, m, x, mode)  # x + fc_out(m)
        x = _product_add(attn.out_proj, a, x, mode)  # ... + out_proj(attention)
    wanted = []
    for i, r in enumerate(rows):
        if r.logits == "all":
            wanted.extend(range(offsets[i], offsets[i] + len(r.tokens)))
        elif r.logits == "last":
            wanted.append(offsets[i] + len(r.tokens) - 1)
    if not wanted:
        return x.new_empty(0, model.config.vocab_size)
    h = F.layer_norm(x[torch.tensor(wanted, dtype=torch.long)], width, tf.ln_f.weight, tf.ln_f.bias, tf.ln_f.eps)
    return _product(model.lm_head, h, mode="w8a8" if mode == "w8a8" else "fp32")


def _chunk_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, start: int) -> torch.Tensor:
    """Attention of T consecutive new tokens of one slot (q [T, H, D], scaled) over the slot's K, V
    [H, L, D], token t seeing positions <= start + t. Returns [T, H*D]."""
    T, H, D = q.shape
    qh = q.transpose(0, 1)[None]
    Kh, Vh = K[None, :, : start + T], V[None, :, : start + T]
    if start == 0:
        out = F.scaled_dot_product_attention(qh, Kh, Vh, is_causal=True, scale=1.0)
    else:
        mask = torch.arange(start + T)[None, :] <= (start + torch.arange(T))[:, None]
        out = F.scaled_dot_product_attention(qh, Kh, Vh, attn_mask=mask, scale=1.0)
    return out[0].transpose(0, 1).reshape(T, H * D)


# ---- the model's own blocks ---------------------------------------------------------------------


def forward_slots(model: nn.Module, cache: SlotCache, tokens: torch.Tensor, starts: list[int],
                  first_slot: int) -> torch.Tensor:
    """The model's blocks over tokens [R, T]: row r continues slot first_slot + r at position
    starts[r]. Returns the logits of every new token [R, T, V]."""
    tf = model.transformer
    R, T = tokens.shape
    device = tokens.device
    length = cache.begin(first_slot, R, starts, T)
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)[None]
    cos = tf.rope_cos[positions].unsqueeze(2)
    sin = tf.rope_sin[positions].unsqueeze(2)
    causal, mask = False, None
    if R == 1 and starts[0] == 0:
        causal = T > 1  # a fresh prefill: plain causal attention over the prompt
    elif T == 1 and min(starts) == max(starts):
        pass  # one new token per row, all rows as long: every cached key is visible
    else:  # key j is visible to the token at position p of a row iff j <= p
        mask = (torch.arange(length, device=device)[None, None, :] <= positions[:, :, None])[:, None]
    x = tf.wte(tokens)
    for block in tf.h:
        x = block(x, cos, sin, mask, causal, cache)
    return model.lm_head(tf.ln_f(x))


def _run_blocks(model: nn.Module, cache: SlotCache, rows: Sequence[Row], blocks: Callable) -> torch.Tensor:
    """The model's blocks once per run of rows in consecutive slots with as many tokens each."""
    out: list[torch.Tensor] = []
    device = cache.device
    i = 0
    while i < len(rows):
        j = i + 1
        while (j < len(rows) and rows[j].slot == rows[j - 1].slot + 1
               and len(rows[j].tokens) == len(rows[i].tokens)):
            j += 1
        part = rows[i:j]
        tokens = torch.tensor([r.tokens for r in part], device=device)
        logits = blocks(model, cache, tokens, [r.start for r in part], part[0].slot)
        for k, r in enumerate(part):
            out.append(logits[k, -r.logits_count :] if r.logits_count else logits[k, :0])
        i = j
    return torch.cat(out).float() if len(out) > 1 else out[0].float()


class CompiledBlocks:
    """`forward_slots` through `torch.compile` (Engine(compile=True)).

    Compilation needs a working C++ toolchain and a supported platform; if compiling or running the
    compiled function fails for any reason, this warns once and runs `forward_slots` eagerly from then
    on. Re-running a failed pass eagerly is safe: it writes the same keys and values to the same cache
    positions."""

    def __init__(self) -> None:
        self._compiled = torch.compile(forward_slots, dynamic=True)
        self.error: Exception | None = None

    def __call__(self, *args) -> torch.Tensor:
        if self.error is None:
            try:
                return self._compiled(*args)
            except Exception as exc:  # compile errors come in many types; any of them means "use eager"
                self.error = exc
                warnings.warn(f"torch.compile of the engine's forward pass failed ({type(exc).__name__}: {exc}); "
                              "running eagerly", stacklevel=2)
        return forward_slots(*args)
