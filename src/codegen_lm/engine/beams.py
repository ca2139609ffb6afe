"""Beam search for one request, step by step, with the rules of `transformers`' `_beam_search` (5.x).

The request's k beams are k engine rows (k KV slots). Each step:
1. the k rows' logits -> log-softmax -> the logits processors (sampler.process: the same ones, in
   the same order, as sampling) -> plus each beam's running score;
2. the best `keep` = max(2, 1 + number of eos ids) x k continuations over all beams (`candidates`);
3. the engine says which candidates end here (eos, a stop string, a stopping criterion, the length
   limit): of those among the first k, each becomes a finished hypothesis scored by its running score
   / (generated tokens) ** length_penalty, and the k best hypotheses so far are kept;
4. the k best candidates that did not end become the running beams (`advance` returns, per new beam,
   the beam it extends and its token; the engine reorders the slots accordingly);
5. the search ends when the running beams cannot improve on the finished hypotheses (early_stopping
   False: judged at the current length; "never": at the longest reachable length when
   length_penalty > 0), when k hypotheses are finished and early_stopping is True, or when every
   candidate ended (the length limit).
The arithmetic follows transformers' operation for operation (float32, a batch of one), so that the
same log-probabilities give the same beams and the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .params import SequenceOutput

_LOW = -1.0e9  # transformers' "impossible" score


@dataclass
class Beam:
    """A running beam or a hypothesis: its generated tokens, the beam each extended, their log-probs."""

    tokens: list[int] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top: list[dict[int, float]] | None = None
    reason: str = "length"  # why a hypothesis ended


@dataclass
class Candidates:
    scores: torch.Tensor  # [1, keep] running score of each continuation, best first
    parents: list[int]  # which running beam each extends
    tokens: list[int]


class BeamSearch:
    def __init__(self, num_beams: int, n_eos: int, max_new_tokens: int, length_penalty: float,
                 early_stopping: bool | str, n_return: int, logprobs: int | None) -> None:
        k = self.k = num_beams
        self.keep = max(2, 1 + n_eos) * k
        self.max_new_tokens, self.length_penalty, self.early_stopping = max_new_tokens, length_penalty, early_stopping
        self.n_return, self.logprobs = n_return, logprobs
        # only the first beam is live at the start: the k rows hold the same prompt
        self.running_scores = torch.full((1, k), _LOW, dtype=torch.float32)
        self.running_scores[:, 0] = 0.0
        self.finished_scores = torch.full((1, k), _LOW, dtype=torch.float32)
        self.finished_flags = torch.zeros((1, k), dtype=torch.bool)
        self.improvable = torch.ones((1, 1), dtype=torch.bool)
        self.top_k_mask = torch.arange(self.keep) < k
        wants = logprobs is not None
        self.running = [Beam(logprobs=[] if wants else None, top=[] if logprobs else None) for _ in range(k)]
        self.finished = [Beam() for _ in range(k)]  # placeholders until hypotheses come
        self.generated = 0
        self.done = False
        self.outputs = [SequenceOutput(j) for j in range(n_return)]  # filled when the search ends

    def candidates(self, scores: torch.Tensor) -> Candidates:
        """The best `keep` continuations, from the running beams' processed log-probabilities [k, V]."""
        vocab = scores.shape[-1]
        total = (scores[None] + self.running_scores[:, :, None].to(scores.device)).reshape(1, -1)
        best, index = torch.topk(total, self.keep)
        best, index = best.cpu(), index.cpu()
        return Candidates(best, (index // vocab)[0].tolist(), (index % vocab)[0].tolist())

    def advance(self, c: Candidates, ended: list[str | None], raw_logp: torch.Tensor | None = None
                ) -> tuple[list[int], list[int]] | None:
        """Take the step's candidates, `ended[j]` saying why candidate j ends here (None: it goes on).
        raw_logp [k, V]: log-softmax of the raw logits, for the tokens' log-probabilities (with
        params.logprobs). Returns (parent, token) of each new running beam, or None when the search
        is over (then `outputs` holds the hypotheses, best first)."""
        k = self.k
        hits = torch.tensor([[e is not None for e in ended]], dtype=torch.bool)
        new = self._extend(c, raw_logp)
        # the running beams: the best candidates that did not end
        alive = c.scores + hits.to(torch.float32) * _LOW
        pick = torch.topk(alive, k=k)[1]
        running_scores = alive.gather(1, pick)
        # the finished hypotheses: the best k of the old ones and of those that ended among the top k
        just = hits & self.top_k_mask[None, :]
        scores = c.scores / ((self.generated + 1) ** self.length_penalty)
        full = torch.all(self.finished_flags, dim=-1, keepdim=True) & (self.early_stopping is True)
        scores += full.to(torch.float32) * _LOW
        scores += (~self.improvable).to(torch.float32) * _LOW
        scores += (~just) * _LOW
        merged = torch.cat((self.finished_scores, scores), dim=1)
        best = torch.topk(merged, k=k)[1]
        self.finished_scores = merged.gather(1, best)
        self.finished_flags = torch.cat((self.finished_flags, just), dim=1).gather(1, best)
        pool = self.finished
        chosen = []
        for i in best[0].tolist():
            if i < k:
                chosen.append(pool[i])
            else:
                j = i - k
                hyp = new(j)
                hyp.reason = ended[j] or "length"
                chosen.append(hyp)
        self.finished = chosen
        picks = pick[0].tolist()
        self.running = [new(j) for j in picks]
        self.running_scores = running_scores
        self.generated += 1
        self.improvable = self._improvable()
        open_beam = not (bool(self.finished_flags.all()) and self.early_stopping is True)
        if not (bool(self.improvable.any()) and open_beam and not bool(hits.all())):
            self.done = True
            return None
        return [c.parents[j] for j in picks], [c.tokens[j] for j in picks]

    def _extend(self, c: Candidates, raw_logp: torch.Tensor | None):
        """A function building candidate j's Beam (each at most once per use)."""
        chosen = top = None
        if self.logprobs is not None and raw_logp is not None:
            parents = torch.tensor(c.parents, device=raw_logp.device)
            tokens = torch.tensor(c.tokens, device=raw_logp.device)
            chosen = raw_logp[parents, tokens].tolist()
            if self.logprobs:
                top = raw_logp.topk(self.logprobs, dim=-1)
                top = [dict(zip(i.tolist(), v.tolist())) for i, v in zip(top.indices, top.values)]

        def new(j: int) -> Beam:
            parent = self.running[c.parents[j]]
            beam = Beam([*parent.tokens, c.tokens[j]], [*parent.indices, c.parents[j]])
            if parent.logprobs is not None and chosen is not None:
                beam.logprobs = [*parent.logprobs, chosen[j]]
                if parent.top is not None and top is not None:
                    beam.top = [*parent.top, top[c.parents[j]]]
            return beam

        return new

    def _improvable(self) -> torch.Tensor:
        """Whether the best running beam may still beat the worst finished hypothesis."""
        length = self.max_new_tokens if self.early_stopping == "never" and self.length_penalty > 0.0 else self.generated
        best_running = self.running_scores[:, :1] / (length ** self.length_penalty)
        worst = torch.where(self.finished_flags, torch.min(self.finished_scores, dim=1, keepdim=True)[0], _LOW)
        return self.improvable & torch.any(best_running > worst, dim=-1, keepdim=True)

    def hypotheses(self) -> list[tuple[Beam, float]]:
        """The n best finished hypotheses and their scores, best first (after the search ended)."""
        scores = self.finished_scores[0].tolist()
        return [(self.finished[j], scores[j]) for j in range(self.n_return)]
