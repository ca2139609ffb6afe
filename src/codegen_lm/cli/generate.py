"""`codegen-lm generate`: complete a prompt (argument or stdin) with a CodeGen model."""

from __future__ import annotations

import argparse
import sys

from ..block_end import BlockEnd
from ..config import MAX_POSITIONS
from ..generation import DEFAULT_MAX_NEW_TOKENS
from ..tokenizer import DEFAULT_TRUNCATE_PATTERNS, truncate_before_pattern
from .common import (
    CliError,
    add_engine_options,
    add_model_options,
    engine_options,
    load_model,
    number,
    one_line,
    unescape,
)

# Every sample is kept until all are printed, and each is a slot's worth of decoding: a number past
# this is a slip of the keyboard (HumanEval's pass@100 draws 200), and would fill memory before any
# output appears.
MAX_SAMPLES = 10_000
# Far more text than any context holds (2^20 positions at most): `generate - < /dev/zero` stops here
# instead of reading until memory runs out.
MAX_PROMPT_BYTES = 64 << 20


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt", description="Complete a prompt with a CodeGen model.")
    p.add_argument("prompt", nargs="?", default="-", help="the prompt, or - (default) to read it from stdin")
    add_model_options(p)
    add_engine_options(p, prefix_cache=False)  # one request: nothing to reuse
    p.add_argument("--max-new-tokens", type=number(int, 1, MAX_POSITIONS, what=f"must be in [1, {MAX_POSITIONS}]"),
                   default=DEFAULT_MAX_NEW_TOKENS, help="at most this many tokens (and no more than the context holds)")
    p.add_argument("--temperature", type=number(float, 0, what="must be >= 0"), default=0.0,
                   help="0 (default) is greedy; > 0 samples")
    p.add_argument("--top-k", type=number(int, 0, what="must be >= 0 (0 disables it)"), default=0)
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True, what="must be in (0, 1]"), default=1.0)
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True, what="must be > 0"), default=1.0)
    p.add_argument("--num-samples", type=number(int, 1, MAX_SAMPLES, what=f"must be in [1, {MAX_SAMPLES:,}]"),
                   default=1)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the completion before TEXT (repeatable; \\n and \\t are understood)")
    p.add_argument("--truncate", action="store_true",
                   help="cut completions where CodeGen's samplers do (next top-level def/print, comment, ...)")
    p.add_argument("--raw", action="store_true",
                   help="do not end the completion where the block the prompt started ends (the default: at the "
                        "first line back at the prompt's indentation); run to --max-new-tokens, a --stop or the "
                        "end of text")
    p.add_argument("--seed", type=number(int), default=None, help="make sampling repeatable")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--completion-only", action="store_true", help="do not print the prompt before the completion")
    p.add_argument("--speculative", metavar="DRAFT",
                   help="speculative decoding: 'prompt-lookup' (guesses copied from the context) or a draft model "
                        "sharing the vocabulary (e.g. Salesforce/codegen-350M-mono for a 6B/16B model)")
    p.add_argument("--draft-tokens", type=number(int, 1, 16, what="must be in [1, 16]"), default=4,
                   help="guesses checked per target pass (default 4)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (pays off for long generations; falls back to eager)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..engine import Engine, GenerationParams

    prompt = read_stdin() if args.prompt == "-" else checked_argument(args.prompt)
    if not prompt:
        raise CliError("the prompt is empty")
    if args.num_samples > 1 and args.temperature == 0:
        raise CliError("--num-samples > 1 needs --temperature > 0 (greedy decoding gives one answer)")
    if args.stream and args.num_samples > 1:
        raise CliError("--stream prints one sample; use it without --num-samples")
    if args.stream and args.truncate:
        raise CliError("--truncate cuts whole completions; use it without --stream")
    stops = [unescape(s) for s in args.stop]
    if any(not s for s in stops):
        raise CliError("--stop must not be empty")
    context = _context(args.model)  # before the model is loaded: a value that can never fit is refused at once
    if args.max_new_tokens > context:
        raise CliError(f"--max-new-tokens {args.max_new_tokens} is more than the model's context of {context} "
                       f"positions")
    model, tokenizer = load_model(args)
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as exc:
        raise CliError(f"the prompt cannot be tokenized: {one_line(exc)}") from None
    if len(ids) >= context:
        raise CliError(f"the prompt is {len(ids)} tokens; the model's context is {context} positions")
    block = None if args.raw else BlockEnd(prompt)
    criteria = () if block is None else (_block_criterion(block, tokenizer, len(ids)),)
    try:
        params = GenerationParams(n=args.num_samples, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty, stop=tuple(stops), seed=args.seed,
                                  stopping_criteria=criteria)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    head = "" if args.completion_only else prompt
    speculative = _draft(args, model) if args.speculative else None
    try:
        engine = Engine(model, tokenizer, max_batch=min(args.num_samples, 64), compile=args.compile,
                        prefix_cache_mb=0, speculative=speculative, speculative_tokens=args.draft_tokens,
                        **engine_options(args))
    except ValueError as exc:
        raise CliError(f"--speculative {args.speculative}: {exc}" if args.speculative else str(exc)) from None
    handle = engine.submit(ids, params)
    if args.stream:
        sys.stdout.write(head)
        text, shown = "", ""
        for event in handle.stream():
            text += event.text
            ready = text if block is None else block.certain(text)
            if len(ready) > len(shown) and ready.startswith(shown):
                sys.stdout.write(ready[len(shown):])
                sys.stdout.flush()
                shown = ready
        sys.stdout.write(_cut(block, text)[len(shown):] + "\n")
    else:
        for i, out in enumerate(handle.result().outputs):
            text = _cut(block, out.text)
            text = truncate_before_pattern(text, DEFAULT_TRUNCATE_PATTERNS) if args.truncate else text
            if args.num_samples > 1:
                print(f"===== sample {i + 1} =====")
            print(head + text)
    if args.speculative:
        stats = engine.stats().speculative
        print(f"codegen-lm: speculative decoding accepted {stats.accepted}/{stats.proposed} guesses "
              f"({stats.acceptance_rate:.0%}), {stats.tokens_per_pass:.2f} tokens per target pass", file=sys.stderr)
    return 0


def _block_criterion(block: BlockEnd, tokenizer, prompt_tokens: int):
    """A stopping criterion ending each sample once its text has left the block the prompt started."""
    import torch

    def row_ended(ids: list[int]) -> bool:
        return block.ended(tokenizer.decode(ids, skip_special_tokens=True), tokenizer.decode(ids[-1:]))

    def ended(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.tensor([row_ended(row[prompt_tokens:].tolist()) for row in input_ids])

    return ended


def _cut(block: BlockEnd | None, text: str) -> str:
    """`text` up to the block's end (all of it with --raw, or when the block is still open)."""
    at = None if block is None else block.cut(text)
    return text if at is None else text[:at]


def _context(name: str) -> int:
    """n_positions of --model's config (the config is validated by load_model's loading as well)."""
    from ..config import CodeGenConfig
    from ..hub import ModelNotFoundError

    try:
        return CodeGenConfig.from_pretrained(name).n_positions
    except (ModelNotFoundError, OSError, ValueError) as exc:
        raise CliError(one_line(exc)) from None


def read_stdin() -> str:
    """The prompt from stdin, which must be UTF-8 text: binary data is named by its first bad byte,
    not turned into a traceback or into replacement characters the model would then complete."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # replaced by a text stream (tests, embedding)
        return checked_argument(sys.stdin.read(), "stdin")
    data = stream.read(MAX_PROMPT_BYTES + 1)
    if len(data) > MAX_PROMPT_BYTES:
        raise CliError(f"stdin holds more than {MAX_PROMPT_BYTES >> 20} MB; a prompt must fit in the model's context")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"stdin is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def checked_argument(text: str, what: str = "the prompt argument") -> str:
    """`text` if it is valid Unicode; Python hands over undecodable argument bytes as lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        if "\udc80" <= bad <= "\udcff":  # how Python passes on a byte that is not UTF-8
            where = f"byte 0x{ord(bad) - 0xDC00:02x} at offset {len(text[: exc.start].encode('utf-8'))}"
        else:
            where = f"lone surrogate U+{ord(bad):04X} at character {exc.start}"
        raise CliError(f"{what} is not UTF-8 text ({where})") from None
    return text


def _draft(args: argparse.Namespace, model):
    """'prompt-lookup', or the draft model named by --speculative."""
    from ..model import CodeGenForCausalLM

    if args.speculative == "prompt-lookup":
        return "prompt-lookup"
    try:
        return CodeGenForCausalLM.from_pretrained(args.speculative, dtype=model.dtype, device=model.device,
                                                  quantize=args.quantize)
    except (OSError, ValueError) as exc:
        raise CliError(f"--speculative {args.speculative}: {exc}") from None
