"""codegen-lm: run, evaluate and train Salesforce CodeGen models in plain PyTorch."""

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
