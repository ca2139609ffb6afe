"""What the commands share: one-line errors, option value checks, loading a model by name."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

import torch


class CliError(Exception):
    """A problem to report to the user as one line, without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is reported as one line (plus the exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           what: str = "") -> Callable[[str], float | int]:
    """An argparse type that parses `kind` and checks its range, naming the rule when it fails."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value != value or (low is not None and (value < low or (low_open and value == low))) or (
            high is not None and value > high
        ):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what}")
        return value

    return parse


def unescape(text: str) -> str:
    """Let `--stop '\\ndef'` mean a newline followed by def (only \\n, \\t, \\r and \\\\)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "ntr\\":
            out.append({"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    from ..bundled import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_PATH",
                        help=f"checkpoint folder, hub name (e.g. Salesforce/codegen-350M-mono) or bundled model "
                             f"(default: {DEFAULT_MODEL}, which ships with the package)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="weight dtype (default: float32 on CPU, the checkpoint's dtype on GPU)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8 weight-only quantization (about 4x less weight memory, faster CPU decoding)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the model's shape with random weights instead of loading them "
                             "(for trying things out; the output is gibberish)")


def add_engine_options(parser: argparse.ArgumentParser, prefix_cache: bool = True) -> None:
    """Options of the inference engine that a command creates."""
    from ..engine.prefix_cache import DEFAULT_MB

    parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                        help="products of prefill and batched decoding in bf16 on the CPU (auto: where the CPU "
                             "multiplies bf16 in hardware, AVX512-BF16 or AMX); default float32, exact")
    if prefix_cache:
        parser.add_argument("--prefix-cache-mb", type=number(float, 0, what="must be >= 0"), default=DEFAULT_MB,
                            help=f"memory for prompts' keys and values kept for reuse (default {DEFAULT_MB}; 0: off)")


def engine_options(args: argparse.Namespace) -> dict:
    """The Engine keyword arguments that add_engine_options' options set."""
    options = {"matmul_dtype": args.matmul_dtype}
    if hasattr(args, "prefix_cache_mb"):
        options["prefix_cache_mb"] = args.prefix_cache_mb
    return options


def load_model(args: argparse.Namespace):
    """Model and tokenizer for --model, or a CliError that says what is wrong."""
    from ..checkpoint import CheckpointError
    from ..config import CodeGenConfig
    from ..hub import ModelNotFoundError
    from ..model import CodeGenForCausalLM
    from ..tokenizer import CodeGenTokenizerFast

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CliError(f"--device {args.device!r} is not a device PyTorch knows (try cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: PyTorch sees no CUDA device here")
    if args.threads is not None:
        if args.threads < 1:
            raise CliError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        if args.random_weights:
            config = CodeGenConfig.from_pretrained(args.model)
            torch.manual_seed(getattr(args, "seed", None) or 0)
            model = CodeGenForCausalLM.from_config(config, dtype=_dtype(args.dtype), device=args.device).eval()
            model.name_or_path = args.model
            if args.quantize:
                from ..quantize import quantize_model

                quantize_model(model)
        else:
            model = CodeGenForCausalLM.from_pretrained(args.model, dtype=args.dtype, device=args.device,
                                                       quantize=args.quantize)
    except (CheckpointError, ModelNotFoundError, FileNotFoundError, ValueError, RuntimeError) as exc:
        raise CliError(str(exc)) from None
    try:
        tokenizer = CodeGenTokenizerFast.from_pretrained(args.model)
    except FileNotFoundError:
        print(f"codegen-lm: note: {args.model} has no tokenizer files; using the CodeGen tokenizer",
              file=sys.stderr)
        tokenizer = CodeGenTokenizerFast.from_pretrained()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return model, tokenizer


def _dtype(name: str | None) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name or "float32", torch.float32)
