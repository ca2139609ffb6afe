"""What the commands share: one-line errors, option value checks, loading a model by name."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

import torch

# Which devices a model can be put on; others (meta, xpu, ...) fail later with a traceback, or run on
# data that is not there.
DEVICE_TYPES = ("cpu", "cuda")


class CliError(Exception):
    """A problem to report to the user as one line, without a traceback."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is reported as one `codegen-lm: error:` line (exit status 2),
    naming the command: `codegen-lm: error: generate: argument --threads: ...`."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        self.exit(2, f"codegen-lm: error: {command + ': ' if command else ''}{message}\n")


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           what: str = "") -> Callable[[str], float | int]:
    """An argparse type that parses `kind` and checks its range, naming the rule when it fails."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            hint = ""
            if kind is int:
                try:
                    as_float = float(text)
                    if as_float.is_integer():
                        hint = f" (write {int(as_float)})"
                except (ValueError, OverflowError):
                    pass
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}{hint}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be a finite number")
        if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
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
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8 weight-only quantization (about 4x less weight memory, faster CPU decoding)")
    cpus = os.cpu_count() or 1
    parser.add_argument("--threads", type=number(int, 1, cpus, what=f"must be in [1, {cpus}], this machine's CPUs"),
                        default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help="a LoRA adapter folder (adapter_config.json + adapter_model.safetensors, ours or "
                             "peft's) to merge into the model's weights")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the model's shape with random weights instead of loading them "
                             "(for trying things out; the output is gibberish)")


def add_engine_options(parser: argparse.ArgumentParser, prefix_cache: bool = True) -> None:
    """Options of the inference engine that a command creates."""
    from ..engine.prefix_cache import DEFAULT_MB

    parser.add_argument("--matmul-dtype", choices=["float32", "bfloat16", "int8", "auto"], default="float32",
                        help="bfloat16: products of prefill and batched decoding in bf16 on the CPU (auto: where "
                             "the CPU multiplies bf16 in hardware, AVX512-BF16 or AMX); int8: every product "
                             "int8 x int8, activations quantized per row (the fastest prefill and "
                             "batches where measured; changes the numbers more); default float32, exact")
    parser.add_argument("--kernels", choices=["auto", "numba", "onednn", "torch"], default="auto",
                        help="which kernels run the matrix products: auto (default: the fastest on this machine, "
                             "measured at the first start and cached in ~/.cache/codegen-lm/kernels.json) or one "
                             "family, where it has a path")
    if prefix_cache:
        parser.add_argument("--prefix-cache-mb", type=number(float, 0, what="must be >= 0"), default=DEFAULT_MB,
                            help=f"memory for prompts' keys and values kept for reuse (default {DEFAULT_MB}; 0: off)")


def engine_options(args: argparse.Namespace) -> dict:
    """The Engine keyword arguments that add_engine_options' options set."""
    options = {"matmul_dtype": args.matmul_dtype, "kernels": args.kernels}
    if hasattr(args, "prefix_cache_mb"):
        options["prefix_cache_mb"] = args.prefix_cache_mb
    return options


def parse_device(text: str) -> torch.device:
    """--device as a torch.device this machine has, or a CliError naming what is wrong with it."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {text!r} is not a device PyTorch knows (try cpu or cuda)") from None
    if device.type not in DEVICE_TYPES:
        raise CliError(f"--device {text}: models run on {' or '.join(DEVICE_TYPES)}, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {text}: PyTorch sees no CUDA device here")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise CliError(f"--device {text}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                           f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return device


def one_line(exc: BaseException) -> str:
    """An exception's message as one line (library messages may span several)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def load_model(args: argparse.Namespace):
    """Model and tokenizer for --model, or a CliError that says what is wrong.

    Everything that can be checked before memory is handed out is: the options, config.json, the
    weight files' names and shapes against it, and the memory it needs against what there is."""
    from ..checkpoint import CheckpointError, ExpectedWeights, check_memory
    from ..config import CodeGenConfig
    from ..hub import ModelNotFoundError
    from ..model import CodeGenForCausalLM
    from ..tokenizer import CodeGenTokenizerFast

    device = parse_device(args.device)
    if args.threads is not None:
        if not 1 <= args.threads <= (os.cpu_count() or 1):
            raise CliError(f"--threads must be in [1, {os.cpu_count() or 1}], got {args.threads}")
        torch.set_num_threads(args.threads)
    adapter = getattr(args, "adapter", None)
    quantize = None if adapter else args.quantize  # int8 after the adapter is merged into the weights
    try:
        if adapter:
            from ..lora import read_adapter

            read_adapter(adapter)  # a bad adapter folder is reported before the model is loaded
        if args.random_weights:
            config = CodeGenConfig.from_pretrained(args.model)
            dtype = _dtype(args.dtype)
            check_memory(ExpectedWeights(CodeGenForCausalLM, config, dtype).nbytes(dtype), device,
                         f"{args.model} in {str(dtype).removeprefix('torch.')}")
            torch.manual_seed(getattr(args, "seed", None) or 0)
            model = CodeGenForCausalLM.from_config(config, dtype=dtype, device=device).eval()
            model.name_or_path = args.model
            if quantize:
                from ..quantize import quantize_model

                quantize_model(model)
        else:
            model = CodeGenForCausalLM.from_pretrained(args.model, dtype=args.dtype, device=device,
                                                       quantize=quantize)
        if adapter:
            from ..lora import load_adapter

            load_adapter(model, adapter, merge=True)
            if args.quantize:
                from ..quantize import quantize_model

                quantize_model(model)
    except (CheckpointError, ModelNotFoundError, OSError, ValueError, RuntimeError, MemoryError) as exc:
        raise CliError(one_line(exc)) from None
    try:
        tokenizer = CodeGenTokenizerFast.from_pretrained(args.model)
    except FileNotFoundError:
        print(f"codegen-lm: note: {args.model} has no tokenizer files; using the CodeGen tokenizer",
              file=sys.stderr)
        tokenizer = CodeGenTokenizerFast.from_pretrained()
    except (ValueError, OSError) as exc:
        raise CliError(one_line(exc)) from None
    return model, tokenizer


def _dtype(name: str | None) -> torch.dtype:
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name or "float32", torch.float32)
