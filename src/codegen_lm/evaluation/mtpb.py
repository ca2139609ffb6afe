"""MTPB, the Multi-Turn Programming Benchmark: data, prompt assembly, truncation and scoring.

A problem is a list of natural-language turns (`str.format` templates filled from each test case's
inputs). Multi-turn: a conversation (conversation/protocol.py, the same protocol a Session follows):
the model writes code for turn 1, its code stays in the context, then turn 2 is appended, and so on;
the last turn asks for a value to be printed. Single-turn (`single_turn=True`, the paper's ablation):
all turns go into one prompt, answered by one completion, which is cut by a whole-program rule
(`truncate_program`), not by the per-turn rule. On an engine every (problem, test case, sample)
conversation runs concurrently, each turn stopped as soon as its cut is known; seeds come from what a
turn is, so the programs are the same at any concurrency. Execution-guided turns (`exec_guided`):
a turn whose program so far fails to run is sampled again (conversation/guided.py).

Scoring follows CodeGen's own scorer (`codegen1/benchmark/mtpb_exec.py`) program by program. Each
program runs in its own sandboxed process, which scores itself as `eval_problem` does and reports
the verdict:

* its guard (`executor.MTPB_DISABLED`: builtins exit/quit, the destructive os/shutil/subprocess
  functions set to None, ipdb/joblib/resource/tkinter unimportable, OMP_NUM_THREADS=1) and its
  recursion limit (1000, with the original's headroom above the program's frame);
* `print_last_statement` (the scorer's rewrite_ast_with_print): the last statement's `.value`,
  whatever the statement (an expression, an assignment...), is wrapped in `print(...)` and the tree
  unparsed with `ast.unparse`, unless that value is a call of a name starting with `print`; code
  that does not parse, is empty, or ends in a statement without a `.value` is run unchanged;
* `exec` with globals {`__name__`: "__main__", `print_stack`, `builtins`, `print`}: only the
  program's own `print` calls are recorded (library code, and `builtins.print`, are not), and the
  prediction is the first argument of the last recorded call, as a live object (a final `print()`,
  or no print at all, fails);
* a 20 s timer (SIGALRM) raises inside the program, and, like any exception the program raises, it
  ends the program but not the scoring: printing the right value and then raising or hanging passes;
* `matches` (the scorer's check_equivalence) on the live object against the expected value (JSON):
  pandas Series, lists of tuples and the listed numpy scalar types and ndarrays made plain, then a
  cast to the expected type on a type mismatch (booleans compared as strings), `==` for str, int,
  set, list, bool and tuple (lists with no tolerance), |a - b| < 1e-6 for floats, np.allclose for
  arrays; anything else -- an expected None or dict, or a cast that raises -- fails.

Deliberate departures, where the original is plainly broken: a `SystemExit` (or other BaseException)
from the program ends the original scorer itself; here the program is judged on what it printed
before, like any other exception. The sandbox kills a program 2 s after the timer if it does not stop
(the original would wait forever), and programs run in separate processes (the original runs them
one after another in one process, so one program's leftovers could affect the next). A prompt that
does not fit the model's context fails that program (recorded in `error`) instead of aborting the run.

Data faults (duplicate ids, malformed inputs, templates that do not fill or whose format specs ask for
huge widths) are reported as `DataIssue`s and the problem is skipped. A problem whose outputs and
inputs differ in number is reported and scored on the pairs, as the original pairs them (zip).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..conversation import protocol
from ..conversation.execution import ProgramRunner
from ..conversation.guided import write_turn
from ..conversation.protocol import HEADER, instruction_comment
from ..conversation.session import DEFAULT_PARAMS as SESSION_PARAMS
from ..conversation.writer import PromptTooLong, derive_seed, writer_for
from ..engine import GenerationParams
from .sandbox import default_workers

DEFAULT_MAX_GEN_LENGTH = 256
FLOAT_TOLERANCE = 1e-6
DEFAULT_TIMEOUT = 20.0  # seconds per program, as in the original scorer
KILL_MARGIN = 2.0  # the sandbox kills a program this long after its in-program timer has gone off
MAX_FORMAT_NUMBER = 10_000  # a larger width or precision in a template's format spec is a data fault
ORIGINAL_RECURSION_LIMIT = 1000  # Python's default, which the original scorer runs with
ORIGINAL_PROGRAM_DEPTH = 6  # frames on the original scorer's stack when the program's code runs


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
    action: str = "skipped"  # what was done about it

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (problem {self.problem_id})" if self.problem_id is not None else "")
        return f"{where}: {self.message}; {self.action}"


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
        problem, issues = _parse_problem(row, number)
        if problem is not None and problem.id in seen:
            data.issues.append(DataIssue(number, problem.id, f"duplicate id (first on line {seen[problem.id]})"))
            continue
        data.issues += issues
        if problem is None:
            continue
        seen[problem.id] = number
        data.problems.append(problem)
    return data


def _parse_problem(row: Any, line: int) -> tuple[Problem | None, list[DataIssue]]:
    """The problem of one row (None if it cannot be scored) and what is wrong with the row."""
    if not isinstance(row, dict):
        return None, [DataIssue(line, None, f"expected a JSON object, got {type(row).__name__}")]
    pid = row.get("id")
    if pid is None:
        return None, [DataIssue(line, None, "no 'id'")]
    pid = str(pid)
    notes: list[DataIssue] = []

    def bad(message: str) -> tuple[None, list[DataIssue]]:
        return None, [*notes, DataIssue(line, pid, message)]

    prompts, inputs, outputs = row.get("prompts"), row.get("inputs"), row.get("outputs")
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        return bad("'prompts' must be a non-empty list of strings")
    if not isinstance(inputs, list) or not inputs:
        return bad("'inputs' must be a non-empty list")
    if not isinstance(outputs, list) or not outputs:
        return bad("'outputs' must be a non-empty list")
    cases = min(len(inputs), len(outputs))
    if len(outputs) != len(inputs):  # the original's sampler zips them: the extra ones are never used
        notes.append(DataIssue(line, pid, f"{len(outputs)} outputs for {len(inputs)} inputs",
                               f"scored on the first {cases} (input, output) pairs, as the original pairs them"))
        inputs, outputs = inputs[:cases], outputs[:cases]
    for case, values in enumerate(inputs):
        if not isinstance(values, dict):
            return bad(f"input {case} is a {type(values).__name__}, not an object of template values")
        for turn, template in enumerate(prompts):
            fault = template_fault(template, values)
            if fault is not None:
                return bad(f"turn {turn + 1} does not fill with input {case} ({fault})")
    max_len = row.get("max_gen_length", DEFAULT_MAX_GEN_LENGTH)
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        return bad(f"'max_gen_length' must be a positive integer, got {max_len!r}")
    return Problem(pid, str(row.get("name", pid)), str(row.get("category", "unknown")), prompts, inputs, outputs,
                   max_len, str(row.get("description", ""))), notes


def template_fault(template: str, values: dict[str, Any]) -> str | None:
    """Why `template.format(**values)` (what the original fills turns with) fails, or None if it fills.

    Format specs are checked before formatting, so a width like `{a:>900000000}` is reported rather
    than run out of memory; a field that does not resolve (`{a.x}`, `{a[0]}` on a number) is reported.
    Whatever str.format fills (`{a[0]}` on a list) is accepted, as the original accepts it."""
    try:
        _check_format_specs(template, values, 0)
        template.format(**values)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_format_specs(template: str, values: dict[str, Any], depth: int) -> None:
    if depth > 1:
        raise ValueError("Max string recursion exceeded")  # str.format's own limit
    for _literal, name, spec, _conversion in string.Formatter().parse(template):
        if name is None or not spec:
            continue
        if "{" in spec:  # nested fields: check them, then the spec they make
            _check_format_specs(spec, values, depth + 1)
            spec = spec.format(**values)
        big = next((n for n in re.findall(r"\d+", spec) if len(n) > 9 or int(n) > MAX_FORMAT_NUMBER), None)
        if big is not None:
            raise ValueError(f"format spec {spec[:40]!r} of field {{{name}}} asks for {big[:20]} characters "
                             f"(more than {MAX_FORMAT_NUMBER})")


# ---- truncation -----------------------------------------------------------------------------------

# Where a single-turn completion stops being the program: markers after which nothing belongs to it.
PROGRAM_END_PATTERNS = (re.escape("<|endoftext|>"), r"^# Import libraries", "^'''", '^"""', "\n\n\n\n")


def truncate_program(completion: str) -> str:
    """Where a single-turn completion, a whole program, ends: at the end-of-text token, a new MTPB header
    (`# Import libraries`), a line-initial docstring quote (a new file), or three blank lines (one more
    than PEP 8 puts between top-level definitions). Comments, further `def`s and prints, and `__main__`
    blocks (which the scorer runs) are part of a whole program, so the per-turn cuts do not apply."""
    cuts = [m.start() for m in (re.search(p, completion, re.MULTILINE) for p in PROGRAM_END_PATTERNS) if m]
    return completion[: min(cuts)] if cuts else completion


# ---- assembly: one conversation per (problem, test case, sample) -----------------------------------

GUIDE_TIMEOUT = 5.0  # seconds an execution-guided check may run the program so far
DEFAULT_PARAMS = dataclasses.replace(SESSION_PARAMS, seed=0)  # the paper's MTPB sampling, reproducible


@dataclass
class Assembled:
    """One sample's program, or (error set) why it could not be assembled; attempts: turn completions
    sampled for it (more than its turns where execution-guided turns were resampled)."""

    program: str
    error: str | None = None
    attempts: int = 0


def converse(turns: Sequence[str], complete, params: GenerationParams, keys: Sequence[object] = (),
             single_turn: bool = False, tries: int = 1, check=None) -> Assembled:
    """The program of one conversation: each turn written after the model's code for the turns before
    (conversation/protocol.py), with params.max_new_tokens per turn; seeds derived from `keys` (problem,
    case, sample) and the turn. A prompt that outgrows the model's context ends it, with the reason in
    `error`. Single-turn: all turns as comments, then one completion of max_new_tokens x turns tokens,
    cut by the whole-program rule. tries/check: execution-guided turns (conversation/guided.py)."""
    writer = writer_for(complete)
    if single_turn:
        prompt = HEADER + "".join(instruction_comment(t) for t in turns)
        budget = dataclasses.replace(params, max_new_tokens=params.max_new_tokens * len(turns),
                                     seed=derive_seed(params.seed, *keys, "single-turn"))
        try:
            return Assembled(prompt + writer.write(prompt, budget, cut=truncate_program) + "\n\n", None, 1)
        except PromptTooLong as exc:
            return Assembled(prompt, f"prompt too long: {exc}", 1)
    history: list[tuple[str, str]] = []
    history_ok, attempts = True, 0
    for number, turn in enumerate(turns, 1):
        try:
            result = write_turn(writer, history, turn, params, (*keys, number), tries=tries, check=check,
                                history_ok=history_ok)
        except PromptTooLong as exc:
            return Assembled(protocol.prompt(history, turn), f"prompt too long at turn {number}: {exc}", attempts)
        history.append((turn, result.code))
        attempts += result.attempts
        if result.run is not None:
            history_ok = result.run.ok
    return Assembled(protocol.program(history), None, attempts)


def assemble(turns: Sequence[str], complete: Callable[..., str], max_new_tokens: int,
             single_turn: bool = False, params: GenerationParams = DEFAULT_PARAMS) -> str:
    """The program for one test case (complete: an Engine, or a function (prompt, max_new_tokens) ->
    completion text, or prompt -> text); raises PromptTooLong if a prompt outgrew the model's context."""
    built = converse(turns, complete, dataclasses.replace(params, max_new_tokens=max_new_tokens),
                     single_turn=single_turn)
    if built.error is not None:
        raise PromptTooLong(built.error)
    return built.program


def assemble_runs(data: Dataset, complete, samples: int, single_turn: bool = False, progress: bool = True,
                  share: tuple[int, int] = (0, 1), params: GenerationParams = DEFAULT_PARAMS,
                  exec_guided: int = 1, concurrency: int | None = None) -> list[dict]:
    """Step 1 of an evaluation: one run dict per (problem, test case, sample), with its program,
    `assembled` (False, with the reason in `error`, where the prompt outgrew the model's context) and
    `attempts`. On an engine the conversations run concurrently (`concurrency` at once, default twice
    the engine's slots), the engine batching their turns and its prefix cache carrying each history from
    turn to turn; completion functions are called one at a time. Every turn's seed comes from what it
    is, so the programs do not depend on the concurrency. share (rank, world_size): only the (problem,
    case) pairs whose number is rank modulo world_size (evaluation/distributed.py).
    exec_guided > 1: up to that many attempts per turn whose program so far fails to run."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    writer = writer_for(complete)
    rank, world = share
    pairs = [(problem, case) for problem in data.problems for case in range(len(problem.inputs))]
    jobs = [(problem, case, s) for number, (problem, case) in enumerate(pairs) if number % world == rank
            for s in range(samples)]
    check = ProgramRunner(GUIDE_TIMEOUT, default_workers()) if exec_guided > 1 else None

    def run(job: tuple[Problem, int, int]) -> dict:
        problem, case, sample = job
        turn_params = dataclasses.replace(params, max_new_tokens=problem.max_gen_length)
        built = converse(problem.turns(case), writer, turn_params, (problem.id, case, sample), single_turn,
                         exec_guided, check.run if check else None)
        out = {"problem": problem.id, "category": problem.category, "case": case, "sample": sample,
               "program": built.program, "expected": problem.outputs[case], "assembled": built.error is None,
               "attempts": built.attempts}
        if built.error is not None:
            out["error"] = built.error
        return out

    engine = getattr(writer, "engine", None)
    started = engine is not None and not engine.started
    if concurrency is None:
        concurrency = 2 * engine.max_batch if engine is not None else 1
    if not writer.concurrent:
        concurrency = 1
    try:
        if started:
            engine.start()  # a background loop, so that every conversation's turns are batched together
        with tqdm(total=len(jobs), desc="assembling", unit="conversation", disable=not progress) as bar, \
                ThreadPoolExecutor(max(1, min(concurrency, len(jobs)))) as pool:
            runs = []
            for out in pool.map(run, jobs):
                runs.append(out)
                bar.update(1)
    finally:
        if started:
            engine.stop()
        if check is not None:
            check.close()
    return runs


# ---- scoring: these functions also run inside each program's sandboxed process ---------------------
# (probe_program embeds their source, so they use only the standard library, numpy if importable, and
# one another, and annotate with builtins only.)


def print_last_statement(code: str) -> str:
    """The program as the original scorer runs it (its rewrite_ast_with_print): unless the last statement's
    value is a call of a name starting with `print` (print, printf, print_result...), that value is wrapped
    in print(...) and the tree unparsed; unchanged if that fails (no parse, no statement, no `.value`)."""
    import ast

    try:
        tree = ast.parse(code)
        last = tree.body[-1]
        try:
            if last.value.func.id.startswith("print"):
                return code
        except Exception:
            pass
        last.value = ast.Call(func=ast.Name(id="print", ctx=ast.Load()), args=[last.value], keywords=[])
        ast.fix_missing_locations(last)
        return ast.unparse(tree)
    except Exception:
        return code


def _equivalent(predicted: object, expected: object) -> bool:
    """The original's check_equivalence, step by step; raises where it raises (a failure)."""
    try:
        import numpy as np
    except ImportError:
        np = None
    p, e = predicted, expected
    if str(type(p)) == "<class 'pandas.core.series.Series'>":
        p, e = p.to_numpy(), np.array(e)
    elif type(p) is list:
        if len(p) > 0 and type(p[0]) is tuple:
            p = [list(item) for item in p]
    elif np is not None and type(p) in (np.uint8, np.int16, np.int32, np.int64):
        p = int(p)
    elif np is not None and type(p) in (np.float16, np.float32, np.float64):
        p = float(p)
    elif np is not None and type(p) is np.bool_:
        p = bool(p)
    elif np is not None and type(p) is np.ndarray:
        p = p.tolist()
    if type(p) is not type(e):
        if type(e) is bool:  # bool("False") is True: compare as text
            p, e = str(p), str(e)
        else:
            p = type(e)(p)
    kind = type(p)
    if kind in (str, int, set, list, bool, tuple):
        return p == e
    if kind is float:
        return abs(p - e) < FLOAT_TOLERANCE
    if np is not None and kind is np.ndarray:
        return np.allclose(p, e)
    raise ValueError(f"unsupported type {kind.__name__}")


def matches(predicted: object, expected: object) -> bool:
    """Whether the original scorer counts `predicted` (the live printed object) as `expected` (JSON data).
    See the module docstring for the rules; an expected None or dict never matches."""
    try:
        return bool(_equivalent(predicted, expected))
    except Exception:
        return False


def _describe(exc: BaseException) -> str:
    """An exception in a few words."""
    try:
        if isinstance(exc, SystemExit):
            return f"sys.exit({exc.code!r})"
        message = str(exc)
    except BaseException:
        message = ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= 1000 else text[:1000] + "..."


def _printable(value: object, limit: int = 1000) -> str:
    """A bounded repr of the prediction, for results.jsonl."""
    import reprlib

    shorten = reprlib.Repr()
    shorten.maxlevel, shorten.maxstring, shorten.maxother, shorten.maxlong = 6, limit, limit, limit
    for name in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
        setattr(shorten, name, 100)
    try:
        text = shorten.repr(value)
    except BaseException:
        text = f"<{type(value).__name__} object, repr failed>"
    return text if len(text) <= limit else text[:limit] + "..."


def _recording_print(env: dict) -> object:
    """The program's own `print`: records each call in env['print_stack'], then prints."""

    def print(*args, **kwargs):  # a global of the program, so library code's prints are not recorded
        env["print_stack"].append({"args": args, "kwargs": kwargs})
        return env["builtins"].print(*args, **kwargs)

    return print


def _run_case(code: str, expected_json: str, timeout: float, report: object) -> None:
    """In the program's process: run and score it as the original's eval_problem does; report the verdict
    (passed, predicted: a printable form, error: what the program raised, failure: why it failed)."""
    import builtins
    import json
    import signal
    import sys

    setitimer, real_time, set_limit = signal.setitimer, signal.ITIMER_REAL, sys.setrecursionlimit
    sandbox_limit = sys.getrecursionlimit()

    class TimeoutException(Exception):
        pass

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutException("Timed out!")

    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    expected = json.loads(expected_json)
    env = {"print_stack": [], "__name__": "__main__", "builtins": builtins}
    env["print"] = _recording_print(env)
    verdict = {"passed": False, "predicted": None, "error": None, "failure": None}
    value, printed = None, False
    signal.signal(signal.SIGALRM, alarm)
    setitimer(real_time, timeout)
    try:
        # the program's frame sits one below this one; give it the original's headroom below its limit
        set_limit(max(ORIGINAL_RECURSION_LIMIT + depth + 1 - ORIGINAL_PROGRAM_DEPTH, 100))
        program = print_last_statement(code)
        try:
            exec(program, env)
        except BaseException as exc:  # the original catches Exception; SystemExit and the like too, here
            verdict["error"] = f"timed out after {timeout:g} s" if isinstance(exc, TimeoutException) \
                else _describe(exc)
        try:
            value, printed = env["print_stack"][-1]["args"][0], True
        except TimeoutException:
            raise
        except Exception:
            stack = env.get("print_stack")
            if isinstance(stack, list) and not stack:
                verdict["failure"] = "printed nothing"
            elif isinstance(stack, list) and isinstance(stack[-1], dict) and stack[-1].get("args") == ():
                verdict["failure"] = "the last print() has no arguments"
            else:
                verdict["failure"] = "print_stack was changed by the program"
        if printed:
            try:
                verdict["passed"] = bool(_equivalent(value, expected))
                if not verdict["passed"]:
                    verdict["failure"] = "not equal to the expected output"
            except TimeoutException:
                verdict["passed"], verdict["failure"] = False, "timed out while comparing"
            except BaseException as exc:
                verdict["failure"] = f"comparison raised {_describe(exc)}"
    except TimeoutException:
        verdict["passed"], verdict["failure"] = False, "timed out"
    finally:
        setitimer(real_time, 0)
        set_limit(sandbox_limit)
    if printed:
        try:
            setitimer(real_time, 0.5)
            verdict["predicted"] = _printable(value)
        except BaseException:
            verdict["predicted"] = "<repr timed out>"
        finally:
            setitimer(real_time, 0)
    report(verdict)


_RUNTIME = (print_last_statement, _equivalent, _describe, _printable, _recording_print, _run_case)


@functools.lru_cache(maxsize=1)
def _runtime_source() -> str:
    """Module text for the program's process: the scoring functions, then the MTPB scorer's guard."""
    from .executor import MTPB_BLOCKED_MODULES, MTPB_DISABLED, MTPB_ENVIRON

    head = ("import ast, builtins, json, reprlib, signal, sys\n"
            f"FLOAT_TOLERANCE = {FLOAT_TOLERANCE!r}\nORIGINAL_RECURSION_LIMIT = {ORIGINAL_RECURSION_LIMIT!r}\n"
            f"ORIGINAL_PROGRAM_DEPTH = {ORIGINAL_PROGRAM_DEPTH!r}\n")
    functions = "\n\n".join(inspect.getsource(fn) for fn in _RUNTIME)
    guard = "import faulthandler as _mtpb_m\n_mtpb_m.disable()\nimport os as _mtpb_m\n"
    guard += "".join(f"_mtpb_m.environ[{k!r}] = {v!r}\n" for k, v in MTPB_ENVIRON.items())
    for module, names in MTPB_DISABLED.items():
        guard += f"import {module} as _mtpb_m\n" + "".join(f"_mtpb_m.{name} = None\n" for name in names)
    guard += "".join(f"sys.modules[{m!r}] = None\n" for m in MTPB_BLOCKED_MODULES)
    return head + "\n\n" + functions + "\n\n" + guard


def probe_program(program: str, expected: Any = None, timeout: float = DEFAULT_TIMEOUT) -> str:
    """`program` wrapped so that its sandboxed process scores it against `expected` (JSON data) as the
    original scorer does, with its timer at `timeout` s, and reports the verdict (a dict: passed,
    predicted, error, failure) through `__sandbox_report__`."""
    return (_runtime_source() + f"_run_case({program!r}, {json.dumps(expected)!r}, {float(timeout)!r}, "
            "__sandbox_report__)\n")


def score_runs(runs: list[dict], timeout: float = DEFAULT_TIMEOUT, workers: int | None = None,
               progress: bool = True, clock: str = "own") -> list[dict]:
    """Step 2 of an evaluation: execute and score the runs of `assemble_runs` (in place; also returned).
    Each gets passed, predicted (printable form of the last print's first argument, or None), error (what
    the program raised, the sandbox's reason if it was killed, or why it was not assembled) and failure
    (why it failed; None if it passed)."""
    from .executor import run_probes

    todo = [r for r in runs if r.get("assembled", True)]
    for r in runs:
        if not r.get("assembled", True):
            r.update(passed=False, predicted=None, failure="not assembled")
    outcomes = run_probes([probe_program(r["program"], r["expected"], timeout) for r in todo],
                          timeout=timeout + KILL_MARGIN, workers=workers, progress=progress, clock=clock)
    for run, (reason, report) in zip(todo, outcomes):
        if isinstance(report, dict) and "passed" in report:
            run.update(passed=report.get("passed") is True, predicted=report.get("predicted"),
                       error=report.get("error"), failure=report.get("failure"))
        else:  # killed before it could report
            run.update(passed=False, predicted=None, error=reason or "no verdict reported",
                       failure="killed before scoring" if reason else "no verdict reported")
    return runs


def evaluate_mtpb(data: Dataset, complete, out_dir: str | Path, samples: int = 40, single_turn: bool = False,
                  timeout: float = DEFAULT_TIMEOUT, workers: int | None = None, progress: bool = True,
                  settings: dict | None = None, group: Any = None, clock: str = "own",
                  params: GenerationParams = DEFAULT_PARAMS, exec_guided: int = 1) -> dict | None:
    """Assemble, execute and score every (problem, test case, sample); writes results.jsonl,
    summary.json and report.md to out_dir and returns the summary. group (evaluation.distributed.Group,
    under torchrun): each process assembles its share; rank 0 scores all (the others return None).
    params: how turns are sampled (max_new_tokens comes from each problem); exec_guided: attempts per turn."""
    import time

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if group is None:
        runs = assemble_runs(data, complete, samples, single_turn, progress, params=params, exec_guided=exec_guided)
    else:
        mine = assemble_runs(data, complete, samples, single_turn, progress and group.is_main,
                             (group.rank, group.world_size), params, exec_guided)
        gathered = group.gather(mine)
        if not group.is_main:
            return None
        order = {p.id: i for i, p in enumerate(data.problems)}
        runs = sorted((r for rank_runs in gathered for r in rank_runs),
                      key=lambda r: (order[r["problem"]], r["case"], r["sample"]))
    assembled = time.perf_counter()
    score_runs(runs, timeout, workers, progress, clock)
    executed = time.perf_counter()
    summary = summarize_mtpb(runs, data)
    summary.update(settings=dict(settings or {}, samples=samples, single_turn=single_turn, timeout=timeout,
                                 exec_guided=exec_guided),
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
            "not_assembled": sum(r.get("failure") == "not assembled" for r in runs),
            "turn_completions": sum(r.get("attempts", 0) for r in runs),
            "data_issues": [str(i) for i in data.issues]}


def mtpb_report(summary: dict) -> str:
    lines = ["# MTPB", "",
             f"Pass rate: **{100 * summary['pass_rate']:.2f}%** ({summary['passed']}/{summary['runs']} runs)", ""]
    if summary.get("settings"):
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in summary["settings"].items()), ""]
    if "turn_completions" in summary:
        lines += [f"Turn completions sampled: {summary['turn_completions']} "
                  f"({summary['turn_completions'] / max(1, summary['runs']):.2f} per run)", ""]
    if summary.get("not_assembled"):
        lines += [f"{summary['not_assembled']} runs failed unassembled (prompt longer than the model's context).", ""]
    lines += ["| category | runs | pass rate |", "|---|---|---|"]
    lines += [f"| {c} | {v['runs']} | {100 * v['pass_rate']:.2f}% |" for c, v in summary["per_category"].items()]
    lines += ["", "| problem | runs | pass rate |", "|---|---|---|"]
    lines += [f"| {p} | {v['runs']} | {100 * v['pass_rate']:.2f}% |" for p, v in summary["per_problem"].items()]
    if summary["data_issues"]:
        lines += ["", "Data issues:", ""] + [f"- {i}" for i in summary["data_issues"]]
    return "\n".join(lines) + "\n"
