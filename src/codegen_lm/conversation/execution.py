"""Running the program a conversation has so far, in the sandbox, the way a REPL would report it:
what it printed, the value of a last bare expression, or the error it raised (with the line)."""

from __future__ import annotations

import ast
import threading
from dataclasses import dataclass

from ..evaluation.sandbox import Sandbox

RUN_TIMEOUT = 10.0  # seconds a session's program may run
VALUE_CHARS = 10_000  # of a last expression's repr


@dataclass(frozen=True)
class RunResult:
    """ok: the program ran to its end. value: repr of a last bare expression's value (None when there is
    none, or it is None, as a REPL shows nothing then). error: "NameError: name 'x' is not defined
    (line 7)", "SyntaxError: ...", "timed out", "failed: memory limit"...; traceback: the program's frames."""

    ok: bool
    stdout: str = ""
    value: str | None = None
    error: str | None = None
    traceback: str = ""

    def describe(self) -> str:
        """The outcome as a few lines of text, for a terminal."""
        parts = [self.stdout.rstrip("\n")] if self.stdout.strip() else []
        if self.value is not None:
            parts.append(self.value)
        if self.error is not None:
            parts.append(self.traceback.rstrip("\n") if self.traceback else f"error: {self.error}")
        return "\n".join(parts)


# In the program's process: run all but a last bare expression, then evaluate that, and report.
_RUNNER = '''
import ast as _cg_ast, linecache as _cg_lc, sys as _cg_sys, traceback as _cg_tb
_cg_src = {source!r}
_cg_lc.cache["<conversation>"] = (len(_cg_src), None, _cg_src.splitlines(True), "<conversation>")
_cg_tree = _cg_ast.parse(_cg_src, "<conversation>")
_cg_last = None
if _cg_tree.body and isinstance(_cg_tree.body[-1], _cg_ast.Expr):
    _cg_last = _cg_ast.Expression(_cg_tree.body.pop().value)
_cg_env = {{"__name__": "__main__", "__builtins__": __builtins__}}
try:
    exec(compile(_cg_tree, "<conversation>", "exec"), _cg_env)
    _cg_out = {{"ok": True}}
    if _cg_last is not None:
        _cg_value = eval(compile(_cg_last, "<conversation>", "eval"), _cg_env)
        if _cg_value is not None:
            try:
                _cg_out["value"] = repr(_cg_value)[:{limit}]
            except BaseException as _cg_e:
                _cg_out["value"] = "<repr failed: " + type(_cg_e).__name__ + ">"
except SystemExit as _cg_e:
    _cg_out = {{"ok": _cg_e.code in (None, 0)}}
    if not _cg_out["ok"]:
        _cg_out["error"] = "sys.exit(" + repr(_cg_e.code) + ")"
except BaseException as _cg_e:
    _cg_frames = [f for f in _cg_tb.extract_tb(_cg_e.__traceback__) if f.filename == "<conversation>"]
    _cg_text = "".join(_cg_tb.format_exception_only(type(_cg_e), _cg_e)).strip().splitlines()[-1]
    _cg_out = {{"ok": False, "error": _cg_text + (" (line %d)" % _cg_frames[-1].lineno if _cg_frames else ""),
               "traceback": "Traceback (most recent call last):\\n" + "".join(_cg_tb.format_list(_cg_frames))
               + _cg_text + "\\n"}}
_cg_sys.stdout.flush()
__sandbox_report__(_cg_out)
'''


def syntax_error(program: str) -> str | None:
    """Why `program` does not parse (with the line), or None."""
    try:
        ast.parse(program)
    except SyntaxError as exc:
        return f"SyntaxError: {exc.msg} (line {exc.lineno})"
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, absurd nesting
        return f"SyntaxError: {type(exc).__name__}: {exc}"
    return None


class ProgramRunner:
    """Runs programs in a sandbox started at first use (one worker per `workers`) and kept; thread-safe.
    Close it (or use it as a context manager) to stop the sandbox's workers."""

    def __init__(self, timeout: float = RUN_TIMEOUT, workers: int = 1, memory_mb: int = 1024) -> None:
        self.timeout, self.workers, self.memory_mb = float(timeout), int(workers), int(memory_mb)
        self._sandbox: Sandbox | None = None
        self._lock = threading.Lock()

    def run(self, program: str, timeout: float | None = None) -> RunResult:
        """Run `program` (never raises for what the program does)."""
        error = syntax_error(program)
        if error is not None:
            return RunResult(False, error=error)
        with self._lock:
            if self._sandbox is None:
                self._sandbox = Sandbox(self.workers, timeout=self.timeout, memory_mb=self.memory_mb)
            sandbox = self._sandbox
        result = sandbox.run(_RUNNER.format(source=program, limit=VALUE_CHARS), timeout)
        report = result.report if isinstance(result.report, dict) else None
        if report is None:  # killed before it could report (time, memory, a signal), or the sandbox failed
            return RunResult(False, result.stdout, error=result.reason or result.status, traceback=result.stderr)
        return RunResult(bool(report.get("ok")), result.stdout, report.get("value"), report.get("error"),
                         report.get("traceback", ""))

    def close(self) -> None:
        with self._lock:
            if self._sandbox is not None:
                self._sandbox.close()
                self._sandbox = None

    def __enter__(self) -> ProgramRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
