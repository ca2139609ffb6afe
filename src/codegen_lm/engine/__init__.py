"""The inference engine: continuous batching over a slot KV cache, shared-prompt sampling, and
speculative decoding for single sequences."""

from .engine import Engine, RequestHandle
from .params import GenerationParams, RequestOutput, SequenceOutput, StreamEvent
from .speculative import SpeculativeDecoder, SpeculativeStats, prompt_lookup

__all__ = ["Engine", "GenerationParams", "RequestHandle", "RequestOutput", "SequenceOutput", "SpeculativeDecoder",
           "SpeculativeStats", "StreamEvent", "prompt_lookup"]
