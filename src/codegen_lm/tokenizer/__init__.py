"""CodeGen's tokenizer (GPT-2 byte-level BPE plus 38 whitespace-run tokens), twice: in pure Python
(`CodeGenTokenizer`) and on the `tokenizers` library (`CodeGenTokenizerFast`), with identical ids."""

from .base import BatchEncoding
from .bpe import CodeGenTokenizer
from .fast import CodeGenTokenizerFast
from .truncate import DEFAULT_TRUNCATE_PATTERNS, truncate_before_pattern

__all__ = [
    "DEFAULT_TRUNCATE_PATTERNS",
    "BatchEncoding",
    "CodeGenTokenizer",
    "CodeGenTokenizerFast",
    "truncate_before_pattern",
]
