"""One forward pass of the engine: rows of new tokens, each row continuing its own slot.

This is the model's own blocks (model.py) driven with per-row positions and a per-row mask, which
covers prefill (one row from position 0), decode (one token per row, rows of different lengths) and
speculative verification (a few tokens per row) with one code path. Decode steps on the CPU first try
the shortcuts of decode.py (the same maths in far fewer calls).
"""

from __future__ import annotations

import warnings

import torch

from ..model import CodeGenForCausalLM
from .decode import decode_step
from .slot_cache import SlotCache


def forward_rows(
    model: CodeGenForCausalLM,
    cache: SlotCache,
    tokens: torch.Tensor,
    starts: list[int],
    all_logits: bool = False,
    first_slot: int = 0,
    shared: list[tuple[list[int], int]] | None = None,
) -> torch.Tensor:
    """Logits for `tokens` [rows, T]: row r holds the tokens at positions starts[r] .. starts[r]+T-1
    of the sequence in slot first_slot + r, whose first starts[r] positions are already cached.

    Returns the logits of every new position [rows, T, V] with all_logits, else of the last [rows, V].
    shared: groups of rows (row indices, prompt length) holding the same prompt (see SlotCache.attend).
    """
    tf = model.transformer
    rows, T = tokens.shape
    logits = decode_step(model, cache, tokens, starts, first_slot, shared, all_logits)  # shortcuts, if any apply
    if logits is not None:
        return logits
    device = tokens.device
    length = cache.begin(rows, starts, T, first_slot, shared)
    start = torch.tensor(starts, device=device)
    positions = start[:, None] + torch.arange(T, device=device)[None]
    cos = tf.rope_cos[positions].unsqueeze(2)
    sin = tf.rope_sin[positions].unsqueeze(2)
    causal, mask = False, None
    if rows == 1 and starts[0] == 0:
        causal = T > 1  # a fresh prefill: plain causal attention over the prompt
    elif T == 1 and min(starts) == max(starts):
        pass  # one new token per row, all rows as long: every cached key is visible
    else:  # key j is visible to the token at position p of a row iff j <= p
        mask = (torch.arange(length, device=device)[None, None, :] <= positions[:, :, None])[:, None]
    x = tf.wte(tokens)
    for block in tf.h:
        x = block(x, cos, sin, mask, causal, cache)
    x = tf.ln_f(x if all_logits else x[:, -1:])
    logits = model.lm_head(x)
    return logits if all_logits else logits[:, -1]


class CompiledForward:
    """`forward_rows` through `torch.compile`, for the decode step (one token per row, so few shapes).

    Compilation needs a working C++ toolchain and a supported platform; if compiling or running the
    compiled function fails for any reason, this warns once and runs `forward_rows` eagerly from then
    on. Re-running a failed step eagerly is safe: it writes the same keys and values to the same
    cache positions."""

    def __init__(self) -> None:
        self._compiled = torch.compile(forward_rows, dynamic=True)
        self.error: Exception | None = None

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if self.error is None:
            try:
                return self._compiled(*args, **kwargs)
            except Exception as exc:  # compile errors come in many types; any of them means "use eager"
                self.error = exc
                warnings.warn(f"torch.compile of the decode step failed ({type(exc).__name__}: {exc}); "
                              "decoding eagerly", stacklevel=2)
        return forward_rows(*args, **kwargs)
