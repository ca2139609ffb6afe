"""`codegen-lm generate`: complete a prompt (argument or stdin) with a CodeGen model."""

from __future__ import annotations

import argparse
import sys

from ..generation import DEFAULT_MAX_NEW_TOKENS, TextStream
from ..tokenizer import DEFAULT_TRUNCATE_PATTERNS, truncate_before_pattern
from .common import CliError, add_model_options, load_model, number, unescape


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt", description="Complete a prompt with a CodeGen model.")
    p.add_argument("prompt", nargs="?", default="-", help="the prompt, or - (default) to read it from stdin")
    add_model_options(p)
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
    encoded = tokenizer(prompt, return_tensors="pt")
    if encoded.input_ids.shape[1] >= model.config.n_positions:
        raise CliError(
            f"the prompt is {encoded.input_ids.shape[1]} tokens; the model's context is "
            f"{model.config.n_positions} positions"
        )
    streams = [TextStream(tokenizer, stops) for _ in range(args.num_samples)]
    streamer = None
    if args.stream:
        if not args.completion_only:
            sys.stdout.write(prompt)
        def streamer(tokens):
            sys.stdout.write(streams[0].push(int(tokens[0])))
            sys.stdout.flush()

    sampling = args.temperature > 0
    out = model.generate(
        encoded.input_ids,
        attention_mask=encoded.attention_mask,
        max_new_tokens=args.max_new_tokens,
        do_sample=sampling,
        temperature=args.temperature if sampling else None,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_samples,
        stop=stops,
        seed=args.seed,
        tokenizer=tokenizer,
        streamer=streamer,
    )
    if args.stream:
        sys.stdout.write(streams[0].finish() + "\n")
        return 0
    prompt_len = encoded.input_ids.shape[1]
    eos = set(model.config.eos_token_ids)
    for i, (row, stream) in enumerate(zip(out[:, prompt_len:].tolist(), streams)):
        for token in row:
            if token in eos or stream.stopped:
                break
            stream.push(token)
        text = stream.text
        if args.truncate:
            text = truncate_before_pattern(text, DEFAULT_TRUNCATE_PATTERNS)
        if args.num_samples > 1:
            print(f"===== sample {i + 1} =====")
        print(text if args.completion_only else prompt + text)
    return 0
