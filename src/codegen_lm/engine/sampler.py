"""The one sampler: from a row's logits and its request's settings to the next token.

The order and edge cases follow the `transformers` processors, so that the same settings mean the
same distribution in both: repetition penalty on the raw logits, then OpenAI's presence and frequency
penalties and logit bias (additive, so their order does not matter), the n-gram ban and bad words,
eos banned before min_new_tokens, suppressed tokens and, after a healed prompt, the first token
limited to those that extend it (all of these bans commute), then the caller's logits processors
(engine/processors.py); then temperature, top-k (ties with the k-th kept) and top-p (the smallest set
of most likely tokens whose probability exceeds p, at least one). Log-probabilities reported to the
caller are the model's own: log-softmax of the raw logits. `process` (the processors) is shared with
beam search (engine/beams.py).

Every row draws from its own generator and takes the same path whatever else is in the step, so what a
sequence samples does not depend on its batch company (nor on whether speculative decoding is on:
a verified position consumes exactly the random numbers a plain step would).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kernels.draw import draw_rows
from .params import GenerationParams
from .processors import RowExtras, warp

CANDIDATES = 256  # top-k/top-p look at this many most likely tokens first, at all of them only if needed


@dataclass
class RowChoice:
    token: int
    logprob: float | None = None
    top: dict[int, float] | None = None
    scores: torch.Tensor | None = None  # [V] float32: the processed scores (see choose)
    logits: torch.Tensor | None = None  # [V] float32: the raw logits


def penalise_seen(scores: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty over a [rows, V] bitmap of the tokens each row has seen."""
    if penalty == 1.0:
        return scores
    penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalised, scores)


def penalise_counts(scores: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties over [rows, V] counts of the tokens each row generated: the logit of a token
    generated c times drops by c x frequency + (c > 0) x presence."""
    return scores - counts * frequency - (counts > 0).to(scores.dtype) * presence


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest scores of each row (and any tied with the k-th)."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = torch.topk(scores, k, dim=-1).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One uniform number per row, each from the row's own generator."""
    return torch.stack([torch.rand((), generator=g, device=device) for g in generators])


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of `weights` [rows, n] (>= 0), drawn with probability proportional to the
    row's weights from the row's uniform number u (a binary search instead of torch.multinomial's one
    exponential draw per entry)."""
    cdf = weights.cumsum(-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    return index.clamp_(max=weights.shape[-1] - 1)


def draw(scores: torch.Tensor, top_k: int, top_p: float, generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of temperature-scaled `scores` [rows, V], after top-k and top-p.

    The distribution of top-p(top-k(softmax)), computed without sorting the vocabulary:
    - on the row's few hundred most likely tokens when they hold the whole nucleus (a trained model's
      nucleus almost always lies among them, which is checked per row);
    - otherwise (flat distributions: random weights, a high temperature) by drawing from the whole
      distribution and redrawing while the token falls outside the nucleus, i.e. while the more likely
      tokens already hold p of the mass: rejection sampling of the renormalised nucleus.
    Which way a row goes depends on its own scores only.
    """
    vocab = scores.shape[-1]
    k = top_k if 0 < top_k < vocab else 0
    p = top_p
    tokens: list[int | None] = [None] * scores.shape[0]
    if k:
        scores = top_k_filter(scores, k)
    probs = scores.softmax(dim=-1)
    # a row whose CANDIDATES most likely tokens cannot hold p of the mass fails the exactness test
    # below anyway; when every row is such (flat distributions), skip the top-k search altogether
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
        fast = draw_rows(rows_probs, u, p)
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


def process(
    raw: torch.Tensor,
    settings: GenerationParams,
    seen: torch.Tensor,
    where: torch.Tensor | None,
    banned: Sequence[Sequence[int]],
    allowed: Sequence[torch.Tensor | None],
    counts: torch.Tensor | None = None,
    extras: Sequence[RowExtras] | None = None,
) -> torch.Tensor:
    """The logits processors (not the warpers), in transformers' order, on `raw` [rows, V] float32 of
    rows sharing `settings` (logits when sampling, log-probabilities in beam search); `raw` itself is
    never modified. where: the rows' rows of `seen` / `counts` (needed with a repetition penalty or
    OpenAI's penalties). banned[i]: ids row i may not pick (eos before min_new_tokens); allowed[i]:
    None or a [V] bool mask of the only ids it may pick. extras: with settings.uses_processors, each
    row's context etc. (one request, one length: the rows of a caller's processors)."""
    scores = raw
    if settings.repetition_penalty != 1.0:
        scores = penalise_seen(raw, seen.index_select(0, where), settings.repetition_penalty)
    if settings.counts_tokens:
        scores = penalise_counts(scores, counts.index_select(0, where), settings.presence_penalty,
                                 settings.frequency_penalty)
    if settings.logit_bias:
        bias = torch.zeros(scores.shape[-1], dtype=scores.dtype, device=scores.device)
        bias[list(settings.logit_bias)] = torch.tensor(list(settings.logit_bias.values()), dtype=scores.dtype)
        scores = scores + bias
    procs = extras[0].processors if extras else None
    ids = None
    if procs is not None and procs.needs_ids:
        ids = torch.tensor([e.context for e in extras], dtype=torch.long, device=scores.device)
    if (procs is not None and procs.bans) or any(banned) or any(m is not None for m in allowed):
        if scores is raw:  # raw (maybe the caller's logits) stays intact, for logprobs
            scores = raw.clone()
        if procs is not None and procs.bans:
            procs.mask(scores, ids, [e.generated for e in extras])
        for i, (ban, mask) in enumerate(zip(banned, allowed)):
            if ban:
                scores[i, list(ban)] = float("-inf")
            if mask is not None:
                scores[i].masked_fill_(~mask, float("-inf"))
    if procs is not None and procs.user:  # on a copy: callables may write into the scores they get
        scores = procs.apply_user(scores.clone() if scores is raw else scores, ids)
    return scores


def choose(
    logits: torch.Tensor,
    params: Sequence[GenerationParams],
    generators: Sequence[torch.Generator | None],
    seen: torch.Tensor,
    seen_rows: Sequence[int],
    banned: Sequence[Sequence[int]],
    counts: torch.Tensor | None = None,
    allowed: Sequence[torch.Tensor | None] | None = None,
    extras: Sequence[RowExtras | None] | None = None,
) -> list[RowChoice]:
    """The next token of each row of `logits` [rows, V].

    params[r], generators[r]: row r's request settings and generator (None: the global one).
    seen[seen_rows[r]]: bitmap of the tokens row r has seen (prompt and sample), for the repetition
    penalty; counts[seen_rows[r]]: how often row r generated each token, for the presence and
    frequency penalties. banned[r]: token ids row r may not pick now (eos before min_new_tokens);
    allowed[r]: None, or a [V] bool mask of the only tokens row r may pick. extras[r]: for rows whose
    settings use engine/processors.py (None for the others, or no list at all). Rows with the same
    settings object are processed together (and, with extras, of the same request and length).
    RowChoice.scores / .logits are set where the settings ask to record them (scores also for the
    stopping criteria).
    """
    out: list[RowChoice | None] = [None] * logits.shape[0]
    groups: dict[object, list[int]] = {}
    for r, p in enumerate(params):
        extra = extras[r] if extras is not None else None
        key = id(p) if extra is None else (id(p), extra.key, len(extra.context))
        groups.setdefault(key, []).append(r)
    everything = len(groups) == 1
    masks = allowed or [None] * logits.shape[0]
    for rows in groups.values():
        settings = params[rows[0]]
        index = torch.tensor(rows, device=logits.device)
        raw = (logits if everything else logits.index_select(0, index)).float()  # a copy only where needed
        where = None
        if settings.repetition_penalty != 1.0 or settings.counts_tokens:
            where = torch.tensor([seen_rows[r] for r in rows], device=logits.device)
        scores = process(raw, settings, seen, where, [banned[r] for r in rows], [masks[r] for r in rows], counts,
                         [extras[r] for r in rows] if extras is not None and extras[rows[0]] is not None else None)
        record = settings.output_scores or bool(settings.stopping_criteria)
        if settings.greedy:
            tokens = scores.argmax(dim=-1).tolist()
        else:
            tokens = draw(scores / settings.temperature, settings.top_k, settings.top_p, [generators[r] for r in rows])
            if record:
                scores = warp(scores, settings.temperature, settings.top_k, settings.top_p)
        n_logprobs = settings.logprobs
        if n_logprobs is not None:
            logp = raw.log_softmax(dim=-1)
            chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
            top = logp.topk(n_logprobs, dim=-1) if n_logprobs else None
        for i, r in enumerate(rows):
            choice = RowChoice(tokens[i])
            if n_logprobs is not None:
                choice.logprob = chosen[i]
                if top is not None:
                    choice.top = dict(zip(top.indices[i].tolist(), top.values[i].tolist()))
            if record:
                choice.scores = scores[i].clone()
            if settings.output_logits:
                choice.logits = raw[i].clone()
            out[r] = choice
    return out  # type: ignore[return-value]
