"""`codegen-lm generate`: complete a prompt (argument or stdin) with a CodeGen model."""

from __future__ import annotations

import argparse
import sys

from ..generation import DEFAULT_MAX_NEW_TOKENS
from ..tokenizer import DEFAULT_TRUNCATE_PATTERNS, truncate_before_pattern
from .common import CliError, add_engine_options, add_model_options, engine_options, load_model, number, unescape


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt", description="Complete a prompt with a CodeGen model.")
    p.add_argument("prompt", nargs="?", default="-", help="the prompt, or - (default) to read it from stdin")
    add_model_options(p)
    add_engine_options(p, prefix_cache=False)  # one request: nothing to reuse
    p.add_argument("--max-new-tokens", type=number(int, 1, what="must be >= 1"), default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=number(float, 0, what="must be >= 0"), default=0.0,
                   help="0 (default) is greedy; > 0 samples")
    p.add_argument("--top-k", type=number(int, 0, what="must be >= 0 (0 disables it)"), default=0)
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True, what="must be in (0, 1]"), default=1.0)
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True, what="must be > 0"), default=1.0)
    p.add_argument("--num-samples", type=number(int, 1, what="must be >= 1"), default=1)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the completion before TEXT (repeatable; \\n and \\t are understood)")
    p.add_argument("--truncate", action="store_true",
                   help="cut completions where CodeGen's samplers do (next top-level def/print, comment, ...)")
    p.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
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

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
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
    model, tokenizer = load_model(args)
    ids = tokenizer.encode(prompt)
    if len(ids) >= model.config.n_positions:
        raise CliError(f"the prompt is {len(ids)} tokens; the model's context is {model.config.n_positions} positions")
    try:
        params = GenerationParams(n=args.num_samples, max_new_tokens=args.max_new_tokens,
                                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty, stop=tuple(stops), seed=args.seed)
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
        for event in handle.stream():
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        for i, out in enumerate(handle.result().outputs):
            text = truncate_before_pattern(out.text, DEFAULT_TRUNCATE_PATTERNS) if args.truncate else out.text
            if args.num_samples > 1:
                print(f"===== sample {i + 1} =====")
            print(head + text)
    if args.speculative:
        stats = engine.stats().speculative
        print(f"codegen-lm: speculative decoding accepted {stats.accepted}/{stats.proposed} guesses "
              f"({stats.acceptance_rate:.0%}), {stats.tokens_per_pass:.2f} tokens per target pass", file=sys.stderr)
    return 0


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
