"""Picking the next token of every running row, each row with its own request's settings.

Rows that share settings (the samples of one request) are processed together; each row draws from
its own generator, so what a sequence samples does not depend on which others share the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation.sampling import SamplingParams, top_k_filter, top_p_filter


@dataclass
class RowChoice:
    token: int
    logprob: float | None = None
    top: dict[int, float] | None = None


def penalise_seen(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty over a [rows, V] bitmap of the tokens each row has seen."""
    if penalty == 1.0:
        return scores
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def choose(
    logits: torch.Tensor,
    groups: list[tuple[list[int], SamplingParams, int | None]],
    generators: list[torch.Generator | None],
    seen: torch.Tensor,
    banned: list[list[int]],
) -> list[RowChoice]:
    """The next token of each row of `logits` [rows, V].

    groups: (row indices, their sampling settings, logprobs to report or None).
    generators[r]: row r's generator (None: the global one). seen: [rows, V] bitmap for the repetition
    penalty. banned[r]: token ids row r may not pick now (eos before min_new_tokens).
    """
    out: list[RowChoice | None] = [None] * logits.shape[0]
    for rows, params, n_logprobs in groups:
        index = torch.tensor(rows, device=logits.device)
        raw = logits.index_select(0, index).float()
        scores = penalise_seen(raw, seen.index_select(0, index), params.repetition_penalty)
        for i, r in enumerate(rows):
            if banned[r]:
                scores[i, banned[r]] = float("-inf")
        if params.greedy:
            tokens = scores.argmax(dim=-1).tolist()
        else:
            scores = top_p_filter(top_k_filter(scores / params.temperature, params.top_k), params.top_p)
            probs = scores.softmax(dim=-1)
            tokens = [int(torch.multinomial(probs[i], 1, generator=generators[r])) for i, r in enumerate(rows)]
        if n_logprobs is not None:
            logp = raw.log_softmax(dim=-1)
            top = logp.topk(n_logprobs, dim=-1) if n_logprobs else None
        for i, r in enumerate(rows):
            choice = RowChoice(tokens[i])
            if n_logprobs is not None:
                choice.logprob = float(logp[i, tokens[i]])
                if top is not None:
                    choice.top = dict(zip(top.indices[i].tolist(), top.values[i].tolist()))
            out[r] = choice
    return out  # type: ignore[return-value]
