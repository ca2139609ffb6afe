"""The inference engine: continuous batching over a slot KV cache, shared-prompt sampling."""

from .engine import Engine, RequestHandle
from .params import GenerationParams, RequestOutput, SequenceOutput, StreamEvent

__all__ = ["Engine", "GenerationParams", "RequestHandle", "RequestOutput", "SequenceOutput", "StreamEvent"]
