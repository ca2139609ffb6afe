"""Picking the next token of every running row, each row with its own request's settings.

Rows that share settings (the samples of one request) are processed together; each row draws from
its own generator, so what a sequence samples does not depend on which others share the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..generation.sampling import SamplingParams, top_k_filter

CANDIDATES = 256  # top-k/top-p look at this many most likely tokens first, at all of them only if needed


def _uniforms(generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One uniform number per row, each from the row's own generator."""
    return torch.stack([torch.rand((), generator=g, device=device) for g in generators])


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of `weights` [rows, n] (>= 0), drawn with probability proportional to the
    row's weights from the row's uniform number u (a binary search instead of torch.multinomial's one
    exponential draw per entry)."""
    cdf = weights.cumsum(-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return index.clamp_(max=weights.shape[-1] - 1)


def draw(scores: torch.Tensor, params: SamplingParams, generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of temperature-scaled `scores` [rows, V], after top-k and top-p.

    The distribution of `top_p_filter(top_k_filter(...))`, computed without sorting the vocabulary:
    - usually on each row's few hundred most likely tokens, since the top-p nucleus of a trained model
      almost always lies among them (which the code checks);
    - otherwise (flat distributions, e.g. random weights or a high temperature) by drawing from the
      whole distribution and redrawing while the token falls outside the nucleus, i.e. while the more
      likely tokens already hold p of the mass: that is rejection sampling of the renormalised nucleus.
    """
    vocab = scores.shape[-1]
    k = params.top_k if 0 < params.top_k < vocab else 0
    p = params.top_p
    tokens: list[int | None] = [None] * scores.shape[0]
    if k:
        scores = top_k_filter(scores, k)
    probs = scores.softmax(dim=-1)
    # most likely candidates first: a trained model's nucleus is nearly always among them. Without top-k,
    # rows whose CANDIDATES most likely tokens cannot hold p of the mass (flat distributions) skip this.
    hopeless = not k and p < 1.0 and bool((probs.amax(-1) * min(vocab, CANDIDATES) < p).all())
    if (p < 1.0 or k) and not hopeless:
        values, index = probs.topk(min(vocab, k or CANDIDATES), dim=-1)
        exact = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
        keep = torch.ones_like(values, dtype=torch.bool)
        if k:  # top-k keeps every token tied with the k-th: more than k of them takes the full path
            exact &= (probs > 0).sum(-1) == k
        if p < 1.0:
            keep = values.cumsum(-1) - values < p  # the mass of the more likely tokens is below p
            exact &= values.sum(-1) >= p  # the whole nucleus is among the candidates
        rows = exact.nonzero().flatten().tolist()
        if rows:
            picks = _inverse_cdf(values[rows] * keep[rows], _uniforms([generators[i] for i in rows], probs.device))
            for i, j in zip(rows, index[rows].gather(1, picks[:, None])[:, 0].tolist()):
                tokens[i] = j
    pending = [i for i, t in enumerate(tokens) if t is None]
    while pending:  # the whole distribution; rows whose draw fell outside the nucleus draw again
        rows_probs = probs[pending] if len(pending) < probs.shape[0] else probs
        u = _uniforms([generators[i] for i in pending], probs.device)
        fast = kernels.draw_rows(rows_probs, u, p)
        if fast is not None:  # the same draw and test in one pass per row
            picks, accept = fast
        else:
            index = _inverse_cdf(rows_probs, u)
            accept = [True] * len(pending)
            if p < 1.0:
                chosen = rows_probs.gather(1, index[:, None])
                accept = (torch.where(rows_probs > chosen, rows_probs, 0.0).sum(-1) < p).tolist()
            picks = index.tolist()
        for i, token, ok in zip(pending, picks, accept):
            if ok:
                tokens[i] = token
        pending = [i for i, ok in zip(pending, accept) if not ok]
    return tokens  # type: ignore[return-value]


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
    seen_rows: torch.Tensor | None = None,
) -> list[RowChoice]:
    """The next token of each row of `logits` [rows, V].

    groups: (row indices, their sampling settings, logprobs to report or None).
    generators[r]: row r's generator (None: the global one). seen: bitmap of the tokens each row has
    seen, for the repetition penalty: row r's is seen[seen_rows[r]] (seen[r] without seen_rows).
    banned[r]: token ids row r may not pick now (eos before min_new_tokens).
    """
    out: list[RowChoice | None] = [None] * logits.shape[0]
    for rows, params, n_logprobs in groups:
        index = torch.tensor(rows, device=logits.device)
        # (a copy only where needed: these are [rows, vocab] tensors, a few MB each)
        everything = rows == list(range(logits.shape[0]))
        raw = (logits if everything else logits.index_select(0, index)).float()
        scores = raw
        if params.repetition_penalty != 1.0:
            seen_index = index if seen_rows is None else seen_rows.index_select(0, index)
            scores = penalise_seen(raw, seen.index_select(0, seen_index), params.repetition_penalty)
        if any(banned[r] for r in rows):
            if scores is raw:  # raw (maybe the caller's logits) stays intact, for logprobs
                scores = raw.clone()
            for i, r in enumerate(rows):
                if banned[r]:
                    scores[i, banned[r]] = float("-inf")
        if params.greedy:
            tokens = scores.argmax(dim=-1).tolist()
        else:
            tokens = draw(scores / params.temperature, params, [generators[r] for r in rows])
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
