"""The inference engine: continuous batching over a slot KV cache, a prefix cache, chunked prefill,
shared-prompt sampling and speculative decoding, for everything that generates."""

from .engine import Engine, EngineError, EngineStats, RequestHandle
from .params import GenerationParams, RequestOutput, SequenceOutput, StreamEvent
from .prefix_cache import PrefixCacheStats
from .speculative import SpeculativeStats, prompt_lookup
from .text import TextStream, find_stop

__all__ = ["Engine", "EngineError", "EngineStats", "GenerationParams", "PrefixCacheStats", "RequestHandle",
           "RequestOutput", "SequenceOutput", "SpeculativeStats", "StreamEvent", "TextStream", "find_stop",
           "prompt_lookup"]
