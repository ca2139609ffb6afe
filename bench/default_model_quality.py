"""Quality of a small trained model: held-out loss and perplexity, how many completions of 50
function signatures are valid Python, and how many of 50 plain headers the command line completes
into code that parses.

Protocol for the syntax check: each prompt (`bench/signature_prompts.py`) is completed greedily (no
repetition penalty) with up to --max-new-tokens tokens; the completion ends at eos or before the first
line that starts at column 0 (the function is over); the prompt plus completion must pass `ast.parse`.

Protocol for the header check: each of 50 plain headers (`bench/header_prompts.py`, no docstring,
ending in `:`) is completed by `codegen-lm generate HEADER --completion-only` with the command line's
default settings (its block stop included) plus --cli-options; header + completion must pass
`ast.parse`. --scan compares candidate default settings on the same headers.

    python bench/default_model_quality.py --model codegen-lm-mini --data runs/default-model/data
    python bench/default_model_quality.py --scan     # the header check under candidate CLI settings
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import math
import re
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from header_prompts import HEADERS
from report import write_json
from signature_prompts import PROMPTS

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.engine import Engine, GenerationParams
from codegen_lm.training.data import TokenWindows

TOP_LEVEL = re.compile(r"\n(?=\S)")


def function_body(text: str) -> str:
    """The completion up to the first line that starts at column 0 (where the function is over)."""
    match = TOP_LEVEL.search(text)
    return text[: match.start() + 1] if match else text


def syntax_check(model, tok, prompts: list[str], max_new_tokens: int = 256, **params) -> list[dict]:
    """Greedy completions of every prompt (batched on the engine) and whether each parses."""
    engine = Engine(model, tok, max_batch=len(prompts))
    handles = [engine.submit(p, GenerationParams(max_new_tokens=max_new_tokens, **params)) for p in prompts]
    results = []
    for prompt, handle in zip(prompts, handles):
        out = handle.result().outputs[0]
        body = function_body(out.text)
        try:
            ast.parse(prompt + body)
            error = None
        except SyntaxError as exc:
            error = f"{exc.msg} (line {exc.lineno})"
        results.append({"prompt": prompt, "completion": body, "tokens": len(out.token_ids), "error": error})
    return results


# candidate defaults for `codegen-lm generate` (--scan); sampled ones are run with 3 seeds
SCAN = ["", "--repetition-penalty 1.1", "--repetition-penalty 1.2", "--repetition-penalty 1.3",
        "--temperature 0.2", "--temperature 0.4", "--temperature 0.2 --repetition-penalty 1.1"]


def parses(code: str) -> str | None:
    try:
        ast.parse(code)
        return None
    except SyntaxError as exc:
        return f"{exc.msg} (line {exc.lineno})"


def cli_header_check(model: str, headers: list[str], options: str = "") -> list[dict]:
    """Each header completed through the command line (`codegen-lm generate`) and whether it parses."""
    from codegen_lm.cli import main as cli

    results = []
    for header in headers:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = cli(["generate", header, "--model", model, "--completion-only", *shlex.split(options)])
        if code != 0:
            raise SystemExit(f"codegen-lm generate failed on {header!r}")
        completion = out.getvalue().removesuffix("\n")
        results.append({"header": header, "completion": completion, "error": parses(header + completion)})
    return results


@torch.no_grad()
def held_out_loss(model, data: Path, seq_len: int, batch: int = 8) -> tuple[float, int]:
    val = TokenWindows(data, "val", seq_len, shuffle=False)
    total, tokens = 0.0, 0
    for start in range(0, val.n_windows, batch):
        x = val.batch(start, min(batch, val.n_windows - start))
        logits = model(x[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        tokens += x[:, 1:].numel()
    return total / tokens, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="codegen-lm-mini")
    parser.add_argument("--data", type=Path, help="prepared data folder (for the held-out loss)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("bench/results/default_model_quality.json"))
    parser.add_argument("--show", type=int, default=3, help="print this many completions")
    parser.add_argument("--cli-options", default="", help="extra `codegen-lm generate` options for the header check")
    parser.add_argument("--scan", action="store_true", help="only the header check, under each of SCAN's settings")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.scan:
        scan = {}
        for options in SCAN:
            seeds = [f" --seed {s}" for s in range(3)] if "--temperature" in options else [""]
            rates = [sum(r["error"] is None for r in cli_header_check(args.model, HEADERS, options + seed))
                     for seed in seeds]
            scan[options or "(defaults)"] = rates
            print(f"{options or '(defaults)':45s} parse {' / '.join(f'{r}/{len(HEADERS)}' for r in rates)}", flush=True)
        write_json(args.out.with_name("default_model_scan.json"), {"model": args.model, "scan": scan})
        return
    model = CodeGenForCausalLM.from_pretrained(args.model).eval()
    tok = CodeGenTokenizerFast.from_pretrained(args.model)
    result: dict[str, object] = {"model": args.model, "parameters": model.num_parameters()}
    if args.data:
        loss, tokens = held_out_loss(model, args.data, min(args.seq_len, model.config.n_positions))
        result.update(held_out_loss=loss, held_out_perplexity=math.exp(loss), held_out_tokens=tokens)
        print(f"held-out loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f} ({tokens:,} tokens)")
    start = time.perf_counter()
    results = syntax_check(model, tok, PROMPTS, args.max_new_tokens)
    seconds = time.perf_counter() - start
    passed = sum(r["error"] is None for r in results)
    generated = sum(r["tokens"] for r in results)
    for r in results[: args.show]:
        print(f"--- {'ok' if r['error'] is None else r['error']}\n{r['prompt']}{r['completion']}")
    result.update(syntax_ok=passed, prompts=len(PROMPTS), syntax_ok_fraction=passed / len(PROMPTS),
                  generated_tokens=generated, batched_generation_tokens_per_s=generated / seconds,
                  completions=results)
    print(f"ast.parse accepts {passed}/{len(PROMPTS)} completions ({100 * passed / len(PROMPTS):.0f}%); "
          f"{generated / seconds:.0f} tokens/s generated (50 prompts batched)")
    headers = cli_header_check(args.model, HEADERS, args.cli_options)
    ok = sum(r["error"] is None for r in headers)
    for r in headers[: args.show]:
        print(f"--- {'ok' if r['error'] is None else r['error']}\n{r['header']}{r['completion']}")
    print(f"headers through the command line: {ok}/{len(HEADERS)} parse ({100 * ok / len(HEADERS):.0f}%)")
    result.update(headers_ok=ok, headers=len(HEADERS), header_completions=headers)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
