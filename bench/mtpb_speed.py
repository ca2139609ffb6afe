"""Assembling MTPB's programs: the previous path (one turn completion after another, each generated to
its token limit and then cut) against the conversational path (every (problem, test case, sample)
conversation at once through the engine, each turn stopped as soon as its cut is known, the prefix
cache carrying each history to its next turn). Same model, same data, same seeds: the programs must
be identical, and are compared. Only assembly is timed (execution and scoring are the same for both).
The CPU is named in the output; times are medians of --runs runs.

    python bench/mtpb_speed.py --data mtpb.jsonl [--samples 1] [--problems 1,2,3] [--runs 1] [--batch 32]
                               [--one-at-a-time] [--random-weights]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from report import cpu_description, write_json

from codegen_lm import CodeGenConfig, CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.conversation import derive_seed, protocol
from codegen_lm.engine import Engine
from codegen_lm.evaluation import mtpb
from codegen_lm.evaluation.sandbox import default_workers


def previous_path(engine: Engine, data: mtpb.Dataset, samples: int, params) -> tuple[list[str], int]:
    """The path before conversations: turn after turn, case after case, each completion to its limit."""
    programs, tokens = [], 0
    for problem in data.problems:
        for case in range(len(problem.inputs)):
            for sample in range(samples):
                history: list[tuple[str, str]] = []
                for number, turn in enumerate(problem.turns(case), 1):
                    seeded = dataclasses.replace(params, max_new_tokens=problem.max_gen_length,
                                                 seed=derive_seed(params.seed, problem.id, case, sample, number, 0))
                    out = engine.submit(protocol.prompt(history, turn), seeded).result().outputs[0]
                    tokens += len(out.token_ids)
                    history.append((turn, protocol.cut_turn(out.text)))
                programs.append(protocol.program(history))
    return programs, tokens


def conversational_path(engine: Engine, data: mtpb.Dataset, samples: int, params,
                        concurrency: int | None) -> tuple[list[str], int]:
    before = engine.stats().generated_tokens
    runs = mtpb.assemble_runs(data, engine, samples, progress=False, params=params, concurrency=concurrency)
    return [r["program"] for r in runs], engine.stats().generated_tokens - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="MTPB JSON Lines (codegen1/benchmark/mtpb.jsonl)")
    parser.add_argument("--model", default="codegen-lm-mini")
    parser.add_argument("--samples", type=int, default=1, help="samples per test case")
    parser.add_argument("--problems", default=None, help="comma-separated problem ids (default: all)")
    parser.add_argument("--batch", type=int, default=32, help="KV slots of the conversational path's engine")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="also time the conversational path with one conversation at a time (the early cut alone)")
    parser.add_argument("--random-weights", action="store_true",
                        help="the model's shape with random weights: turns that run to their token limits, as a "
                             "model writing long turns (the bundled model's turns are mostly a token or two)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mtpb_speed.json")
    args = parser.parse_args()
    data = mtpb.load_mtpb(args.data)
    if args.problems:
        wanted = set(args.problems.split(","))
        data.problems = [p for p in data.problems if p.id in wanted]
    if args.random_weights:
        torch.manual_seed(0)
        model = CodeGenForCausalLM.from_config(CodeGenConfig.from_pretrained(args.model)).eval()
    else:
        model = CodeGenForCausalLM.from_pretrained(args.model)
    tokenizer = CodeGenTokenizerFast.from_pretrained(args.model)
    params = mtpb.DEFAULT_PARAMS
    conversations = sum(len(p.inputs) for p in data.problems) * args.samples
    turns = sum(len(p.inputs) * len(p.prompts) for p in data.problems) * args.samples
    paths = {"previous (one turn after another, batch 1)":
             lambda: previous_path(Engine(model, tokenizer, max_batch=1), data, args.samples, params)}
    if args.one_at_a_time:
        paths["conversational, one conversation at a time"] = lambda: conversational_path(
            Engine(model, tokenizer, max_batch=1), data, args.samples, params, 1)
    paths[f"conversational (batch {args.batch}, {2 * args.batch} conversations at once)"] = \
        lambda: conversational_path(Engine(model, tokenizer, max_batch=args.batch), data, args.samples, params, None)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    tokens: dict[str, int] = {}
    programs: dict[str, list[str]] = {}
    for _ in range(args.runs):
        for name, path in paths.items():
            start = time.perf_counter()
            programs[name], tokens[name] = path()
            seconds[name].append(time.perf_counter() - start)
    reference = next(iter(programs.values()))
    identical = {name: sum(a == b for a, b in zip(reference, got)) for name, got in programs.items()}
    base = statistics.median(next(iter(seconds.values())))
    result = {"cpu": cpu_description(), "cpus": default_workers(), "threads": torch.get_num_threads(),
              "model": args.model + (" (random weights)" if args.random_weights else ""),
              "problems": len(data.problems), "conversations": conversations,
              "turns": turns, "samples": args.samples, "runs": args.runs, "paths": {}}
    print(f"CPU: {result['cpu']}, {default_workers()} CPUs; {result['model']}; {len(data.problems)} problems, "
          f"{conversations} conversations, {turns} turns; medians of {args.runs} run(s)")
    print(f"{'path':<58} {'seconds':>8} {'turns/s':>8} {'tokens':>8} {'same programs':>14} {'speed-up':>9}")
    for name in paths:
        median = statistics.median(seconds[name])
        result["paths"][name] = {"seconds": median, "all_runs": seconds[name], "generated_tokens": tokens[name],
                                 "identical_programs": identical[name], "speedup": base / median}
        print(f"{name:<58} {median:>8.1f} {turns / median:>8.1f} {tokens[name]:>8} "
              f"{identical[name]:>7}/{conversations:<6} {base / median:>8.2f}x")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
