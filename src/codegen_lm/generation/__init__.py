"""Generation: sampling (logits -> token), stopping (eos, stop strings, text deltas), generate()."""

from .generate import DEFAULT_MAX_NEW_TOKENS, generate
from .sampling import SamplingParams
from .stopping import TextStream, find_stop

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "SamplingParams", "TextStream", "find_stop", "generate"]
