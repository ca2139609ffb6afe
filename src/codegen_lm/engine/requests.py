"""A request and its samples, as the engine tracks them between submission and the last event."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

import torch

from .beams import BeamSearch
from .params import GenerationParams, RequestOutput, SequenceOutput, StreamEvent
from .processors import RequestProcessors
from .text import TextStream


@dataclass
class Sample:
    """One running sequence: a sample of its request, or one of its running beams (in beam search the
    request's samples are its beams, `output` holds the beam's current tokens, and what is returned is
    Request.beam.outputs)."""

    request: Request
    index: int  # which sample (beam) of its request
    generator: torch.Generator | None
    stream: TextStream | None
    output: SequenceOutput
    row: int = -1  # slot while running
    length: int = 0  # tokens whose keys/values are in the slot
    pending: int = -1  # sampled, not yet fed to the model
    generated: int = 0
    draft_cached: int = 0  # tokens the draft model has cached for this sample (speculative "draft")

    @property
    def finished(self) -> bool:
        return self.output.finish_reason is not None

    def context(self) -> list[int]:
        """Prompt and generated tokens, the pending one last."""
        return self.request.prompt_ids + self.output.token_ids


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    params: GenerationParams
    max_new_tokens: int  # params.max_new_tokens clamped to the context
    eos: frozenset[int]
    banned: list[int]  # eos ids, banned while fewer than min_new_tokens are generated
    speculative: str  # "off", "prompt-lookup" or "draft"
    speculative_tokens: int
    submitted_at: float
    healed: str = ""  # text of the prompt token backed off by token healing
    allowed_first: torch.Tensor | None = None  # [V] bool: what the first new token may be (token healing)
    samples: list[Sample] = field(default_factory=list)
    to_admit: deque[Sample] = field(default_factory=deque)
    staging: int = -1  # the staging slot its prompt is prefilled in
    prefilled: int = 0  # prompt tokens whose keys/values are in the staging slot
    cached_tokens: int = 0  # of which came from the prefix cache
    logits: torch.Tensor | None = None  # the last prompt token's, once the prompt is prefilled
    prompt_logprobs: list[float] | None = None  # with params.prompt_logprobs, filled as chunks are prefilled
    prompt_top_logprobs: list[dict[int, float]] | None = None
    processors: RequestProcessors | None = None  # with params.uses_processors
    beam: BeamSearch | None = None  # with params.num_beams > 1
    beam_scores: list[torch.Tensor] | None = None  # per step, with params.output_scores (beam search)
    beam_logits: list[torch.Tensor] | None = None
    cancelled: bool = False
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    # shared with consumers under the engine's condition:
    events: deque[StreamEvent] = field(default_factory=deque)
    done: bool = False
    error: BaseException | None = None
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def output(self) -> RequestOutput:
        outputs = list(self.beam.outputs) if self.beam is not None else [s.output for s in self.samples]
        return RequestOutput(self.id, list(self.prompt_ids), outputs, self.cached_tokens,
                             self.healed, self.prompt_logprobs, self.prompt_top_logprobs, self.submitted_at,
                             self.scheduled_at, self.first_token_at, self.finished_at, self.beam_scores,
                             self.beam_logits)
