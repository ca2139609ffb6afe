"""codegen-lm: run, evaluate and train Salesforce CodeGen models in plain PyTorch."""

import os

# Large CPU tensors (weights, the KV cache) on transparent huge pages: decoding walks gigabytes of them
# every step, and 4 KB pages cost TLB misses (about 7% of batched decoding speed, measured on 2 cores).
# PyTorch reads this once, at its first CPU allocation, so it only takes effect when codegen_lm is
# imported before torch (the command line always is); set THP_MEM_ALLOC_ENABLE=0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .bundled import DEFAULT_MODEL
from .config import RELEASED_CHECKPOINTS, CodeGenConfig
from .model import CodeGenForCausalLM, CodeGenModel
from .tokenizer import CodeGenTokenizer, CodeGenTokenizerFast

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "RELEASED_CHECKPOINTS",
    "CodeGenConfig",
    "CodeGenForCausalLM",
    "CodeGenModel",
    "CodeGenTokenizer",
    "CodeGenTokenizerFast",
]
