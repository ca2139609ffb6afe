"""From logits to the next token: repetition penalty, temperature, top-k, top-p, then a draw.

The order and the edge cases (ties at the k-th logit are kept; top-p keeps the smallest set whose
probability exceeds p, and at least one token) follow the `transformers` processors, so that the
same settings mean the same distribution in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 (or do_sample False) means greedy."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.repetition_penalty > 0.0) or self.repetition_penalty == float("inf"):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0


def apply_repetition_penalty(
    logits: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None, penalty: float
) -> torch.Tensor:
    """Make every token already in the context less likely: positive logits are divided by the
    penalty, negative ones multiplied (CTRL's rule). Padding positions do not count."""
    if penalty == 1.0:
        return logits
    vocab = logits.shape[-1]
    ids = context if context_mask is None else context.masked_fill(context_mask == 0, vocab)
    seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, ids, True)
    seen = seen[:, :vocab]
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose total probability is at most 1 - p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1.0 - p
    drop_sorted[..., -1] = False  # always keep the most likely token
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    context: torch.Tensor | None = None,
    context_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fp32 scores that the next token is drawn from (argmax of them when greedy)."""
    logits = logits.float()
    if context is not None:
        logits = apply_repetition_penalty(logits, context, context_mask, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    return top_p_filter(logits, params.top_p)

