"""The logits processors of `transformers` beyond the sampler's own, and the caller's callables.

With transformers' semantics, for the rows of one request:
- no_repeat_ngram_size n: the next token may not complete an n-gram that already occurs in the
  context (prompt included): wherever the last n-1 tokens occurred before, the token that followed is
  banned (n = 1 bans every token of the context);
- bad_words_ids: a one-token word is always banned; a longer one bans its last token when the context
  ends with the rest of it; a one-token word that is an eos id is ignored;
- suppress_tokens: always banned; begin_suppress_tokens: banned at the first generated position;
- logits_processor: the caller's callables, after those built in, before the warpers;
- stopping_criteria: the caller's callables, after each new token.
And `warp`, the scores transformers reports with output_scores when sampling (temperature, then -inf
outside top-k and top-p), which the sampler itself never materialises.

A request whose settings use none of these has no RequestProcessors and its rows never come here
(GenerationParams.uses_processors). A caller's callable that raises does not fail the step: the
failure is kept on the request's RequestProcessors (`failure`) and the engine ends that request.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .params import GenerationParams

NEG_INF = float("-inf")


class CallbackError(RuntimeError):
    """A request's logits processor or stopping criterion raised or returned something unusable (the
    cause is chained)."""


@dataclass
class RowExtras:
    """What the processors need of one row besides its scores."""

    processors: RequestProcessors
    context: list[int]  # prompt and generated tokens so far
    generated: int  # tokens generated so far
    key: int  # the request's id: rows of one request at one length are processed together


class RequestProcessors:
    """One request's processors, prepared once when it is submitted."""

    def __init__(self, params: GenerationParams, eos: Iterable[int], device: torch.device | str = "cpu") -> None:
        eos = set(eos)
        words = [w for w in params.bad_words_ids if not (len(w) == 1 and w[0] in eos)]
        always = sorted(set(params.suppress_tokens) | {w[0] for w in words if len(w) == 1})
        self.always = torch.tensor(always, dtype=torch.long, device=device) if always else None
        self.begin = (torch.tensor(sorted(set(params.begin_suppress_tokens)), dtype=torch.long, device=device)
                      if params.begin_suppress_tokens else None)
        # longer bad words, grouped by the length of their prefix: (prefixes [m, len], last tokens [m])
        groups: dict[int, list[tuple[int, ...]]] = {}
        for w in words:
            if len(w) > 1:
                groups.setdefault(len(w) - 1, []).append(w)
        self.sequences = [(torch.tensor([w[:-1] for w in ws], dtype=torch.long, device=device),
                           torch.tensor([w[-1] for w in ws], dtype=torch.long, device=device))
                          for ws in groups.values()]
        self.ngram = params.no_repeat_ngram_size
        self.user = params.logits_processor
        self.criteria = params.stopping_criteria
        self.failure: CallbackError | None = None

    @property
    def bans(self) -> bool:
        """Whether `mask` can ban anything."""
        return bool(self.ngram or self.sequences or self.always is not None or self.begin is not None)

    @property
    def needs_ids(self) -> bool:
        """Whether `mask` or `apply_user` read the rows' token ids."""
        return bool(self.ngram or self.sequences or self.user)

    def mask(self, scores: torch.Tensor, ids: torch.Tensor | None, generated: Sequence[int]) -> torch.Tensor:
        """Set to -inf what the n-gram ban, bad words and suppressed tokens forbid. scores [rows, V] is
        modified in place (the caller's own copy); ids [rows, length]: the rows' contexts (None when
        `needs_ids` is False); generated[r]: tokens row r has generated."""
        vocab = scores.shape[-1]
        if self.ngram:
            rows, tokens = ngram_bans(ids, self.ngram)
            keep = tokens < vocab  # ids the model cannot produce need no ban
            scores[rows[keep], tokens[keep]] = NEG_INF
        for prefixes, last in self.sequences:
            m = prefixes.shape[1]
            if m > ids.shape[1]:
                continue
            hit = (ids[:, None, ids.shape[1] - m:] == prefixes[None]).all(-1)  # [rows, words]
            rows, words = hit.nonzero(as_tuple=True)
            if rows.numel():
                scores[rows, last[words]] = NEG_INF
        if self.always is not None:
            scores[:, self.always] = NEG_INF
        if self.begin is not None:
            first = [r for r, g in enumerate(generated) if g == 0]
            if first:
                scores[torch.tensor(first, device=scores.device)[:, None], self.begin[None]] = NEG_INF
        return scores

    def apply_user(self, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The caller's processors, in order. On a failure it is kept in `failure` and the scores
        so far are returned (the engine then ends the request)."""
        for f in self.user:
            try:
                out = f(ids, scores)
            except Exception as exc:
                self._fail(f"logits_processor {f!r} raised {type(exc).__name__}: {exc}", exc)
                return scores
            if not isinstance(out, torch.Tensor) or out.shape != scores.shape:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                self._fail(f"logits_processor {f!r} returned {shape}, not scores of shape {tuple(scores.shape)}")
                return scores
            scores = out.to(torch.float32)
        return scores

    def stops(self, ids: torch.Tensor, scores: torch.Tensor | None) -> list[bool]:
        """Which rows the stopping criteria end: ids [rows, length] with the new token, scores [rows, V]."""
        hit = torch.zeros(ids.shape[0], dtype=torch.bool)
        for f in self.criteria:
            try:
                out = f(ids, scores)
            except Exception as exc:
                self._fail(f"stopping criterion {f!r} raised {type(exc).__name__}: {exc}", exc)
                return [False] * ids.shape[0]
            flags = torch.as_tensor(out).to(device="cpu", dtype=torch.bool).flatten()
            if flags.numel() == 1:
                flags = flags.expand(ids.shape[0])
            if flags.numel() != ids.shape[0]:
                self._fail(f"stopping criterion {f!r} returned {flags.numel()} flags for {ids.shape[0]} rows")
                return [False] * ids.shape[0]
            hit |= flags
        return hit.tolist()

    def _fail(self, message: str, cause: BaseException | None = None) -> None:
        if self.failure is None:
            error = CallbackError(message)
            error.__cause__ = cause
            self.failure = error


def ngram_bans(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, tokens): the tokens that would complete an n-gram already in row `rows[i]` of ids [rows, L]
    (none while the rows are shorter than n)."""
    length = ids.shape[1]
    if length < n:
        empty = ids.new_zeros(0)
        return empty, empty
    start = ids[:, length - n + 1:]  # the n-1 tokens a new n-gram would start with
    grams = ids.unfold(1, n, 1)  # [rows, L-n+1, n]: every n-gram of the context
    rows, at = (grams[..., :-1] == start[:, None]).all(-1).nonzero(as_tuple=True)
    return rows, grams[rows, at, n - 1]


def warp(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """What transformers' warpers make of processed scores [rows, V] when sampling: scores / temperature,
    then -inf below the k-th largest (ties kept), then -inf outside the nucleus: tokens, least likely
    first, while their cumulative probability stays within 1 - top_p (the most likely always kept)."""
    if temperature != 1.0:
        scores = scores / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if top_p < 1.0:
        ascending, order = scores.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), NEG_INF)
    return scores

