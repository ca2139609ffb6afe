"""What a request asks for (GenerationParams, the one settings type), and what it gets back."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

SPECULATIVE_MODES = ("off", "prompt-lookup", "draft")


@dataclass(frozen=True)
class GenerationParams:
    """Everything about how one request is continued, checked once when it is made.

    temperature 0 (the default) is greedy. top_k 0 and top_p 1 disable those filters. The
    repetition penalty is CTRL's (tokens of the prompt and of the sample so far: positive logits
    divided by it, negative ones multiplied). presence_penalty and frequency_penalty are OpenAI's
    (subtracted from the logit of each token the sample has generated: once, and once per time it
    was generated); logit_bias adds to given tokens' logits. token_healing: back off the prompt's last
    token and start with a token that extends it (engine/healing.py). prompt_logprobs: the prompt
    tokens' log-probabilities (and top N alternatives), computed without the prefix cache.
    speculative: None follows the engine's setting; "off", "prompt-lookup" or "draft" (the engine's
    draft model) choose for this request, with speculative_tokens guesses per step (None: the engine's).

    Beam search (transformers' `_beam_search`): num_beams > 1 keeps that many running beams (they take
    num_beams KV slots together) and returns the n best finished hypotheses (n <= num_beams), scored
    by their sum of log-probabilities divided by (generated tokens) ** length_penalty. early_stopping:
    True ends when num_beams hypotheses are finished; False (the default) also when no running beam
    can still beat the worst of them at its current length; "never" only when no running beam could
    beat it at any reachable length. Beam search is deterministic: temperature must be 0 (beam
    sampling is not supported), and it does not speculate.

    transformers' logits processors, in transformers' order (after the repetition penalty):
    no_repeat_ngram_size (an n-gram of the context, prompt included, may not occur twice), bad_words_ids
    (token sequences never generated: a single token is always banned, a longer sequence's last token
    when the context ends with the rest; a single eos id is ignored, as transformers does),
    suppress_tokens (never generated), begin_suppress_tokens (not as the first generated token), then
    the caller's logits_processor callables, then temperature, top-k and top-p. Each callable is called
    as f(input_ids [rows, length], scores [rows, V]) -> scores, where the rows are running samples (or
    beams) of this request with the same length (prompt and generated tokens, no padding) and scores
    are what the processors before it made of the logits (log-probabilities in beam search).
    stopping_criteria callables are called after each new token as f(input_ids [rows, length] with the
    new token, scores [rows, V]: that token's processed scores) -> bool or a [rows] bool tensor; a row
    for which one is true ends with finish_reason "stop" (in beam search they judge the 2 x num_beams
    candidates of a step, as transformers' do, and a candidate they stop becomes a finished hypothesis).
    A callable that raises ends its request with an EngineError (the cause chained), not the others.

    output_scores / output_logits: record, per generated token, the scores transformers reports
    (after the processors; after the warpers too when sampling) and the raw logits, as float32 [V]
    tensors in SequenceOutput.scores / .logits; for beam requests, per step, the running beams'
    [num_beams, V] log-probabilities after the processors and raw logits in RequestOutput.beam_scores /
    .beam_logits.
    """

    n: int = 1  # samples of the prompt (they share its prefill)
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    stop: Sequence[str] = ()  # strings matched on the decoded text; the text returned ends before them
    eos_token_ids: Sequence[int] | None = None  # None: the model's
    seed: int | None = None  # sample j draws from its own generator seeded from (seed, j)
    logprobs: int | None = None  # None: none; 0: the chosen tokens'; N: also the top N alternatives
    prompt_logprobs: int | None = None
    token_healing: bool = False
    skip_special_tokens: bool = True
    speculative: str | None = None
    speculative_tokens: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    logits_processor: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = ()
    stopping_criteria: tuple[Callable[[torch.Tensor, torch.Tensor], bool | torch.Tensor], ...] = ()
    output_scores: bool = False
    output_logits: bool = False

    def __post_init__(self) -> None:
        for name, low in (("n", 1), ("max_new_tokens", 1), ("min_new_tokens", 0), ("num_beams", 1),
                          ("no_repeat_ngram_size", 0)):
            _check_int(name, getattr(self, name), low)
        if not _is_number(self.temperature) or not 0.0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check_int("top_k", self.top_k, 0, "(0 disables it)")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -math.inf < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.logit_bias:
            for token, bias in dict(self.logit_bias).items():
                _check_int("logit_bias token", token, 0)
                if not _is_number(bias) or not -math.inf < bias < math.inf:
                    raise ValueError(f"logit_bias of token {token} must be a finite number, got {bias!r}")
            object.__setattr__(self, "logit_bias", dict(self.logit_bias))
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, "or None", high=20)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if self.eos_token_ids is not None:
            ids = (self.eos_token_ids,) if isinstance(self.eos_token_ids, int) else tuple(self.eos_token_ids)
            for token in ids:
                _check_int("eos_token_ids", token, 0)
            object.__setattr__(self, "eos_token_ids", ids)
        if self.seed is not None:
            _check_int("seed", self.seed, None)
        if self.speculative is not None and self.speculative not in SPECULATIVE_MODES:
            raise ValueError(f"speculative must be None or one of {', '.join(SPECULATIVE_MODES)}; "
                             f"got {self.speculative!r}")
        if self.speculative_tokens is not None:
            _check_int("speculative_tokens", self.speculative_tokens, 1, high=16)
        if not _is_number(self.length_penalty) or not -math.inf < self.length_penalty < math.inf:
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if not isinstance(self.early_stopping, bool) and self.early_stopping != "never":
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.num_beams > 1:
            if self.n > self.num_beams:
                raise ValueError(f"n must be <= num_beams in beam search (the hypotheses returned), got n={self.n} "
                                 f"with num_beams={self.num_beams}")
            if self.temperature != 0.0:
                raise ValueError(f"beam sampling (num_beams > 1 with temperature {self.temperature!r}) is not "
                                 "supported; beam search needs temperature 0")
            if self.speculative not in (None, "off"):
                raise ValueError(f"speculative={self.speculative!r} is not supported with num_beams > 1 "
                                 "(beam search does not speculate)")
        words = self.bad_words_ids
        if isinstance(words, (str, bytes)) or not isinstance(words, Sequence) or any(
                isinstance(w, (str, bytes)) or not isinstance(w, Sequence) or not w for w in words):
            raise ValueError(f"bad_words_ids must be a sequence of non-empty token id sequences, got {words!r}")
        for word in words:
            for token in word:
                _check_int("bad_words_ids token", token, 0)
        object.__setattr__(self, "bad_words_ids", tuple(tuple(w) for w in words))
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise ValueError(f"{name} must be a sequence of token ids, got {value!r}")
            for token in value:
                _check_int(f"{name} token", token, 0)
            object.__setattr__(self, name, tuple(value))
        for name in ("logits_processor", "stopping_criteria"):
            value = getattr(self, name)
            if callable(value) and not isinstance(value, Sequence):
                value = (value,)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(map(callable, value)):
                raise ValueError(f"{name} must be a sequence of callables, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("output_scores", "output_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs each sample's generated-token counts (OpenAI's penalties)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def uses_processors(self) -> bool:
        """Whether rows need engine/processors.py (the n-gram ban, bad words, suppressed tokens, the
        caller's processors and stopping criteria); rows of requests that use none never go there."""
        return bool(self.no_repeat_ngram_size or self.bad_words_ids or self.suppress_tokens
                    or self.begin_suppress_tokens or self.logits_processor or self.stopping_criteria)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _check_int(name: str, value: object, low: int | None, note: str = "", high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) or (
            high is not None and value > high):
        rule = "an integer" + (f" >= {low}" if low is not None else "")
        rule += f" and <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be {rule}{' ' + note if note else ''}, got {value!r}")


@dataclass
class SequenceOutput:
    """One sample (or, in beam search, one returned hypothesis, best first): its tokens (eos included
    when it ended on one), text (stop strings and what follows cut off), why it ended ("stop",
    "length" or "cancelled") and, if asked, log-probabilities (of the model's distribution:
    log-softmax of the raw logits).

    scores / logits (with GenerationParams.output_scores / output_logits; samples only, beam requests
    have RequestOutput.beam_scores / beam_logits): per generated token, a float32 [V] tensor of the
    scores transformers reports for it (greedy: after the logits processors; sampling: after the
    warpers too, i.e. temperature-scaled, -inf outside top-k and top-p) and of the raw logits.
    score (beam search): the hypothesis' final score, transformers' `sequences_scores` (sum of the
    processed log-probabilities of its tokens / generated tokens ** length_penalty). beam_indices (beam
    search): per generated token, which running beam (0 .. num_beams-1, in that step's order, the rows
    of RequestOutput.beam_scores) it extended; transformers' `beam_indices` are these plus
    batch_index x num_beams."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    scores: list[torch.Tensor] | None = None
    logits: list[torch.Tensor] | None = None
    score: float | None = None
    beam_indices: list[int] | None = None


@dataclass
class RequestOutput:
    """A finished (or cancelled) request. cached_tokens: prompt tokens whose keys and values came from
    the prefix cache instead of being computed. healed: the text of the prompt token that token
    healing backed off (prompt_ids are without it; "" when the prompt was not healed). prompt_logprobs:
    with GenerationParams.prompt_logprobs, the log-probability of each prompt token after the first
    (and top alternatives). Times are time.perf_counter() readings: submitted, prefill begun, first
    token decided, finished. beam_scores / beam_logits (beam requests with output_scores /
    output_logits): per step, a float32 [num_beams, V] tensor of the running beams' log-probabilities
    after the logits processors, and of their raw logits, rows in the step's beam order (what
    transformers returns as `scores` and `logits` in beam search; SequenceOutput.beam_indices says which
    row each hypothesis' token came from)."""

    request_id: int
    prompt_ids: list[int]
    outputs: list[SequenceOutput]
    cached_tokens: int = 0
    healed: str = ""
    prompt_logprobs: list[float] | None = None
    prompt_top_logprobs: list[dict[int, float]] | None = None
    submitted_at: float = 0.0
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    beam_scores: list[torch.Tensor] | None = None
    beam_logits: list[torch.Tensor] | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass
class StreamEvent:
    """New text (and tokens) of sample `index`; `finish_reason` is set on its last event. logprobs and
    top_logprobs: of those tokens, when the request asked for them."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
