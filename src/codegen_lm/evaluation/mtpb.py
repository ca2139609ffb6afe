"""MTPB, the Multi-Turn Programming Benchmark: data, prompt assembly, truncation and scoring.

A problem is a list of natural-language turns (`str.format` templates filled from each test case's
inputs). Multi-turn: the model writes code for turn 1, its code stays in the context, then turn 2 is
appended, and so on; the last turn asks for a value to be printed. The assembled program is executed
and the first argument of its last `print` call is compared with the expected output.
Single-turn (`single_turn=True`): all turns go into one prompt, answered by one completion.

Data faults (duplicate ids, more outputs than inputs, malformed inputs, templates that do not fill)
are reported as `DataIssue`s and the problem is skipped; they never stop an evaluation.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tokenizer.truncate import DEFAULT_TRUNCATE_PATTERNS, truncate_before_pattern

HEADER = "# Import libraries.\n\nimport numpy as np\n\n"
DEFAULT_MAX_GEN_LENGTH = 256
FLOAT_TOLERANCE = 1e-6


@dataclass
class Problem:
    id: str
    name: str
    category: str
    prompts: list[str]
    inputs: list[dict[str, Any]]
    outputs: list[Any]
    max_gen_length: int = DEFAULT_MAX_GEN_LENGTH
    description: str = ""

    def turns(self, case: int) -> list[str]:
        """The turns of test case `case`, with its input values filled in."""
        return [template.format(**self.inputs[case]) for template in self.prompts]


@dataclass
class DataIssue:
    line: int
    problem_id: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (problem {self.problem_id})" if self.problem_id is not None else "")
        return f"{where}: {self.message}; skipped"


@dataclass
class Dataset:
    problems: list[Problem] = field(default_factory=list)
    issues: list[DataIssue] = field(default_factory=list)


def load_mtpb(path: str | Path) -> Dataset:
    """Read an MTPB JSON Lines file, keeping the problems that are well formed and reporting the rest.

    Raises FileNotFoundError (with the path) if the file itself is missing: there is nothing to skip to."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MTPB data file not found: {path}")
    data = Dataset()
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            data.issues.append(DataIssue(number, None, f"not valid JSON ({exc.msg})"))
            continue
        problem, issue = _parse_problem(row, number)
        if issue is not None:
            data.issues.append(issue)
            continue
        if problem.id in seen:
            data.issues.append(DataIssue(number, problem.id, f"duplicate id (first on line {seen[problem.id]})"))
            continue
        seen[problem.id] = number
        data.problems.append(problem)
    return data


def _parse_problem(row: Any, line: int) -> tuple[Problem | None, DataIssue | None]:
    if not isinstance(row, dict):
        return None, DataIssue(line, None, f"expected a JSON object, got {type(row).__name__}")
    pid = row.get("id")
    if pid is None:
        return None, DataIssue(line, None, "no 'id'")
    pid = str(pid)

    def bad(message: str) -> tuple[None, DataIssue]:
        return None, DataIssue(line, pid, message)

    prompts, inputs, outputs = row.get("prompts"), row.get("inputs"), row.get("outputs")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        return bad("'prompts' must be a non-empty list of strings")
    if not isinstance(inputs, list) or not inputs:
        return bad("'inputs' must be a non-empty list")
    if not isinstance(outputs, list):
        return bad("'outputs' must be a list")
    if len(outputs) != len(inputs):
        return bad(f"{len(outputs)} outputs for {len(inputs)} inputs")
    for case, values in enumerate(inputs):
        if not isinstance(values, dict):
            return bad(f"input {case} is a {type(values).__name__}, not an object of template values")
        for turn, template in enumerate(prompts):
            try:
                template.format(**values)
            except (KeyError, IndexError, ValueError) as exc:
                return bad(f"turn {turn + 1} does not fill with input {case} ({type(exc).__name__}: {exc})")
    max_len = row.get("max_gen_length", DEFAULT_MAX_GEN_LENGTH)
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        return bad(f"'max_gen_length' must be a positive integer, got {max_len!r}")
    return Problem(pid, str(row.get("name", pid)), str(row.get("category", "unknown")), prompts, inputs, outputs,
                   max_len, str(row.get("description", ""))), None


def truncate_turn(completion: str) -> str:
    """Where the model's code for one turn ends (CodeGen's own truncation rule)."""
    return truncate_before_pattern(completion, DEFAULT_TRUNCATE_PATTERNS)


def assemble(turns: Sequence[str], complete: Callable[[str, int], str], max_new_tokens: int,
             single_turn: bool = False) -> str:
    """The program for one test case: each turn as a comment, each followed by the model's code.

    complete(prompt, max_new_tokens) -> completion text (or complete(prompt) -> completion text).
    Single-turn: all turns as comments, then one completion of max_new_tokens x turns tokens."""
    return assemble_samples(turns, complete, max_new_tokens, 1, single_turn)[0]


def print_last_expression(program: str) -> str:
    """If the program's last statement is a bare expression, print it (as a notebook would show it).
    A program that does not parse is returned unchanged (running it reports the syntax error)."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError):
        return program
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return program
    last = tree.body[-1]
    if isinstance(last.value, ast.Call) and isinstance(last.value.func, ast.Name) and last.value.func.id == "print":
        return program
    lines = program.splitlines(keepends=True)
    start, end = last.lineno - 1, last.end_lineno
    head = "".join(lines[:start]) + lines[start][: last.col_offset]
    expression = ast.get_source_segment(program, last.value)
    tail = lines[end - 1][last.end_col_offset :] + "".join(lines[end:])
    return f"{head}print({expression}){tail}"


# The probe runs inside the sandboxed process: it records the first argument of every print call and,
# when the program ends (normally or not), reports the last one as a Python literal.
PROBE = '''
import builtins as _probe_builtins
_probe_real_print = _probe_builtins.print
_probe_last = []

def _probe_plain(value, depth=0):
    if depth > 20:
        return value
    kind = type(value).__module__
    if kind.startswith(("numpy", "pandas")):
        for method in ("tolist", "item"):
            if hasattr(value, method):
                try:
                    return _probe_plain(getattr(value, method)(), depth + 1)
                except Exception:
                    pass
    if isinstance(value, (list, tuple, set)):
        return type(value)(_probe_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return {_probe_plain(k, depth + 1): _probe_plain(v, depth + 1) for k, v in value.items()}
    return value

def _probe_print(*args, **kwargs):
    if args:
        _probe_last[:] = [args[0]]
    return _probe_real_print(*args, **kwargs)

_probe_builtins.print = _probe_print

def _probe_report():
    if _probe_last:
        value = _probe_plain(_probe_last[0])
        try:
            text = repr(value)
            import ast as _probe_ast
            _probe_ast.literal_eval(text)
            kind = "literal"
        except Exception:
            text, kind = str(value), "text"
        __sandbox_report__({"kind": kind, "value": text})
'''


def probe_program(program: str) -> str:
    """`program` wrapped so that the sandbox reports the first argument of its last print call."""
    body = print_last_expression(program)
    return (PROBE + "try:\n    exec(compile(" + repr(body) + ", '<program>', 'exec'), {'__name__': '__main__'})\n"
            "finally:\n    _probe_report()\n")


def decode_prediction(report: dict | None) -> tuple[bool, Any]:
    """(whether anything was printed, the printed value) from the probe's report."""
    if not report:
        return False, None
    if report.get("kind") == "literal":
        try:
            return True, ast.literal_eval(report["value"])
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            pass
    return True, report.get("value")


def matches(predicted: Any, expected: Any) -> bool:
    """The scorer's comparison: cast the prediction to the expected type on a mismatch (as the original
    scorer does, so an expected 2 accepts 2.7 cast to int), floats equal within FLOAT_TOLERANCE,
    containers compared element by element."""
    if isinstance(expected, bool) or expected is None:
        return predicted == expected
    if isinstance(expected, float):
        try:
            a, b = float(predicted), float(expected)
        except (TypeError, ValueError, OverflowError):
            return False
        return a == b or abs(a - b) <= FLOAT_TOLERANCE or (math.isnan(a) and math.isnan(b))
    if type(predicted) is not type(expected):
        try:
            predicted = type(expected)(predicted)
        except Exception:
            return False
    if isinstance(expected, (list, tuple)):
        return len(predicted) == len(expected) and all(matches(p, e) for p, e in zip(predicted, expected))
    if isinstance(expected, dict):
        return predicted.keys() == expected.keys() and all(matches(predicted[k], expected[k]) for k in expected)
    return predicted == expected


# ---- the evaluation loop --------------------------------------------------------------------------

DEFAULT_TIMEOUT = 20.0  # seconds per program, as in the original scorer


class EngineTurns:
    """Turn completions from an Engine, batched: `complete_many` submits all prompts at once (identical
    prompts, as in every sample's first turn, become one request whose samples share a prefill)."""

    def __init__(self, engine, temperature: float = 0.2, top_p: float = 0.95, seed: int = 0) -> None:
        self.engine, self.temperature, self.top_p, self.seed = engine, temperature, top_p, seed
        self._calls = 0

    def complete_many(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        from ..engine import GenerationParams

        self._calls += 1
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        handles = []
        for j, (prompt, rows) in enumerate(groups.items()):
            params = GenerationParams(n=len(rows), max_new_tokens=max_new_tokens, temperature=self.temperature,
                                      top_p=self.top_p, seed=(self.seed * 1_000_003 + self._calls * 7919 + j) % 2**31)
            handles.append((rows, self.engine.submit(prompt, params)))
        out = [""] * len(prompts)
        for rows, handle in handles:
            for row, sample in zip(rows, handle.result().outputs):
                out[row] = sample.text
        return out

    def __call__(self, prompt: str, max_new_tokens: int) -> str:
        return self.complete_many([prompt], max_new_tokens)[0]


def _complete_many(complete, prompts: list[str], max_new_tokens: int) -> list[str]:
    """complete: an object with complete_many(prompts, max_new_tokens), a function (prompt,
    max_new_tokens) -> completion, or a plain function prompt -> completion."""
    if hasattr(complete, "complete_many"):
        return complete.complete_many(prompts, max_new_tokens)
    if _takes_one_argument(complete):
        return [complete(p) for p in prompts]
    return [complete(p, max_new_tokens) for p in prompts]


def _takes_one_argument(fn) -> bool:
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(positional) == 1 and not any(p.kind == p.VAR_POSITIONAL for p in params)


def assemble_samples(turns: Sequence[str], complete, max_new_tokens: int, samples: int,
                     single_turn: bool = False) -> list[str]:
    """`samples` programs for one test case, all turns of all samples advanced together (so an engine
    decodes the samples as one batch)."""
    histories = [HEADER] * samples
    if single_turn:
        prompt = HEADER + "".join(f"# {turn}\n" for turn in turns)
        outs = _complete_many(complete, [prompt] * samples, max_new_tokens * len(turns))
        return [prompt + truncate_turn(o) + "\n\n" for o in outs]
    for turn in turns:
        histories = [h + f"# {turn}\n" for h in histories]
        outs = _complete_many(complete, histories, max_new_tokens)
        histories = [h + truncate_turn(o) + "\n\n" for h, o in zip(histories, outs)]
    return histories


def evaluate_mtpb(data: Dataset, complete, out_dir: str | Path, samples: int = 40, single_turn: bool = False,
                  timeout: float = DEFAULT_TIMEOUT, workers: int | None = None, progress: bool = True,
                  settings: dict | None = None) -> dict:
    """Assemble, execute and score every (problem, test case, sample); writes results.jsonl,
    summary.json and report.md to out_dir and returns the summary."""
    import time

    from tqdm import tqdm

    from .executor import run_probes

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    runs = []
    total_cases = sum(len(p.inputs) for p in data.problems)
    with tqdm(total=total_cases, desc="assembling", unit="test case", disable=not progress) as bar:
        for problem in data.problems:
            for case in range(len(problem.inputs)):
                programs = assemble_samples(problem.turns(case), complete, problem.max_gen_length, samples,
                                            single_turn)
                runs += [{"problem": problem.id, "category": problem.category, "case": case, "sample": s,
                          "program": prog, "expected": problem.outputs[case]} for s, prog in enumerate(programs)]
                bar.update(1)
    assembled = time.perf_counter()
    outcomes = run_probes([probe_program(r["program"]) for r in runs], timeout=timeout, workers=workers,
                          progress=progress)
    for run, (reason, report) in zip(runs, outcomes):
        printed, value = decode_prediction(report)
        run["predicted"] = value if printed else None
        run["passed"] = printed and matches(value, run["expected"])
        run["error"] = reason
    executed = time.perf_counter()
    summary = summarize_mtpb(runs, data)
    summary.update(settings=dict(settings or {}, samples=samples, single_turn=single_turn, timeout=timeout),
                   timings={"assembly_s": assembled - start, "execution_s": executed - assembled})
    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for run in runs:
            f.write(json.dumps(run, default=repr) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=repr) + "\n")
    (out / "report.md").write_text(mtpb_report(summary))
    return summary


def summarize_mtpb(runs: Sequence[dict], data: Dataset) -> dict:
    def rate(rows: list[dict]) -> dict:
        return {"runs": len(rows), "passed": sum(r["passed"] for r in rows),
                "pass_rate": sum(r["passed"] for r in rows) / len(rows) if rows else 0.0}

    by_problem: dict[str, list[dict]] = {}
    by_category: dict[str, list[dict]] = {}
    for r in runs:
        by_problem.setdefault(r["problem"], []).append(r)
        by_category.setdefault(r["category"], []).append(r)
    return {**rate(list(runs)), "per_problem": {k: rate(v) for k, v in by_problem.items()},
            "per_category": {k: rate(v) for k, v in sorted(by_category.items())},
            "data_issues": [str(i) for i in data.issues]}


def mtpb_report(summary: dict) -> str:
    lines = ["# MTPB", "",
             f"Pass rate: **{100 * summary['pass_rate']:.2f}%** ({summary['passed']}/{summary['runs']} runs)", ""]
    if summary.get("settings"):
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in summary["settings"].items()), ""]
    lines += ["| category | runs | pass rate |", "|---|---|---|"]
    lines += [f"| {c} | {v['runs']} | {100 * v['pass_rate']:.2f}% |" for c, v in summary["per_category"].items()]
    lines += ["", "| problem | runs | pass rate |", "|---|---|---|"]
    lines += [f"| {p} | {v['runs']} | {100 * v['pass_rate']:.2f}% |" for p, v in summary["per_problem"].items()]
    if summary["data_issues"]:
        lines += ["", "Data issues (problems skipped):", ""] + [f"- {i}" for i in summary["data_issues"]]
    return "\n".join(lines) + "\n"
