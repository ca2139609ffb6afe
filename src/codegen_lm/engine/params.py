"""What a request asks for, and what it gets back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..generation.sampling import SamplingParams


@dataclass(frozen=True)
class GenerationParams:
    """Everything about how one request is continued. temperature 0 (the default) is greedy."""

    n: int = 1  # samples of the prompt (they share its prefill)
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()  # strings matched on the decoded text; the text returned ends before them
    eos_token_ids: Sequence[int] | None = None  # None: the model's
    seed: int | None = None  # sample j draws from its own generator seeded from (seed, j)
    logprobs: int | None = None  # None: none; 0: the chosen tokens'; N: also the top N alternatives
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        for name, low in (("n", 1), ("max_new_tokens", 1), ("min_new_tokens", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        self.sampling  # validates temperature, top_k, top_p, repetition_penalty  # noqa: B018

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(do_sample=self.temperature > 0, temperature=self.temperature or 1.0, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty)


@dataclass
class SequenceOutput:
    """One sample: its tokens (eos included when it ended on one), text (stop strings and what follows
    cut off), why it ended ("stop", "length" or "cancelled") and, if asked, log-probabilities."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    outputs: list[SequenceOutput]

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass
class StreamEvent:
    """New text (and tokens) of sample `index`; `finish_reason` is set on its last event."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
