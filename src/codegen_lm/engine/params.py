"""What a request asks for (GenerationParams, the one settings type), and what it gets back."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
        for name, low in (("n", 1), ("max_new_tokens", 1), ("min_new_tokens", 0)):
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def counts_tokens(self) -> bool:
        """Whether sampling needs each sample's generated-token counts (OpenAI's penalties)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


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
    """One sample: its tokens (eos included when it ended on one), text (stop strings and what follows
    cut off), why it ended ("stop", "length" or "cancelled") and, if asked, log-probabilities (of the
    model's distribution: log-softmax of the raw logits)."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """A finished (or cancelled) request. cached_tokens: prompt tokens whose keys and values came from
    the prefix cache instead of being computed. healed: the text of the prompt token that token
    healing backed off (prompt_ids are without it; "" when the prompt was not healed). prompt_logprobs:
    with GenerationParams.prompt_logprobs, the log-probability of each prompt token after the first
    (and top alternatives). Times are time.perf_counter() readings: submitted, prefill begun, first
    token decided, finished."""

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
