"""A conversation with the model, the paper's way: the user states intent one natural-language turn at
a time, the model writes the code for each turn, and the program grows turn by turn.

    from codegen_lm.conversation import Session
    s = Session("codegen-lm-mini", seed=0)
    s.ask("Define a list of integers named numbers with the values 1, 2, 3.")
    s.ask("Print the sum of numbers.")
    print(s.program); print(s.run().describe())

Each turn's prompt is the program so far plus the instruction (conversation/protocol.py); on an engine
the history's keys and values come from its prefix cache, so a turn costs about its new tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine import Engine, GenerationParams
from . import protocol
from .execution import RUN_TIMEOUT, ProgramRunner, RunResult
from .guided import write_turn
from .writer import OnText, Writer, writer_for

FORMAT = "codegen-lm-session"
VERSION = 1
# The paper's sampling for MTPB (temperature 0.2, top-p 0.95) and the benchmark's usual turn budget.
DEFAULT_PARAMS = GenerationParams(max_new_tokens=256, temperature=0.2, top_p=0.95)
SETTINGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")  # what a file keeps


class SessionFileError(ValueError):
    """A session file that cannot be loaded (the message names the file and the field)."""


@dataclass
class Turn:
    instruction: str
    code: str
    attempts: int = 1  # completions sampled for this turn so far (retries and execution-guided tries)


class Session:
    """Turns, the program they make, and what the model and sandbox do with them.

    source: a model name or folder (loaded with its tokenizer), a CodeGenForCausalLM (with `tokenizer`,
    or the CodeGen tokenizer), an Engine, or a completion function fn(prompt, max_new_tokens) -> text.
    params: how turns are sampled (GenerationParams; default DEFAULT_PARAMS, seed None: fresh samples;
    with a seed every turn's code is reproducible); keyword overrides (seed=0, temperature=...) apply on
    top. exec_guided: attempts per turn when the program so far fails to run (1: no guidance).
    """

    def __init__(self, source: Any, tokenizer: Any = None, *, params: GenerationParams | None = None,
                 header: str = protocol.HEADER, exec_guided: int = 1, run_timeout: float = RUN_TIMEOUT,
                 model_name: str | None = None, **overrides: Any) -> None:
        if isinstance(exec_guided, bool) or not isinstance(exec_guided, int) or exec_guided < 1:
            raise ValueError(f"exec_guided must be an integer >= 1 (attempts per turn), got {exec_guided!r}")
        self.params = dataclasses.replace(params or DEFAULT_PARAMS, **overrides)
        self.writer, self.model_name = _writer(source, tokenizer)
        self.model_name = model_name or self.model_name
        self.header, self.exec_guided = header, exec_guided
        self.turns: list[Turn] = []
        self.runner = ProgramRunner(run_timeout)
        # The execution-guided check of the last turn written (None: not checked); its .ok says whether
        # the kept attempt's program ran.
        self.last_check: RunResult | None = None
        self.saved_model: str | None = None  # the model named in the file this session was loaded from
        self._history_ok = True  # whether the program so far ran, when guidance last checked it

    # ---- the conversation -------------------------------------------------------------------------

    @property
    def program(self) -> str:
        """The source so far: the header and every turn (instruction comment, code, blank line)."""
        return protocol.program(self._pairs(), self.header)

    def ask(self, instruction: str, on_text: OnText | None = None,
            on_failed: Callable[[int, RunResult], None] | None = None) -> str:
        """Add a turn: the model writes the code for `instruction`, which is returned (and streamed to
        on_text as it comes; on_failed(attempt, run) hears of execution-guided attempts that failed)."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError("an instruction must be non-empty text")
        return self._write(instruction, 0, on_text, on_failed)

    def retry(self, on_text: OnText | None = None,
              on_failed: Callable[[int, RunResult], None] | None = None) -> str:
        """Sample the last turn again (with new seeds) and return its new code. The old turn stays if
        this fails or is interrupted."""
        if not self.turns:
            raise IndexError("there is no turn to retry")
        last = self.turns[-1]
        return self._write(last.instruction, last.attempts, on_text, on_failed, replace=True)

    def undo(self) -> Turn:
        """Remove the last turn and return it."""
        if not self.turns:
            raise IndexError("there is no turn to undo")
        self._history_ok = True
        return self.turns.pop()

    def edit(self, turn: int, code: str) -> None:
        """Replace the code of turn `turn` (0-based; negative counts from the end) with your own."""
        if not isinstance(code, str):
            raise TypeError("code must be text")
        if not -len(self.turns) <= turn < len(self.turns):
            raise IndexError(f"no turn {turn}: the session has {len(self.turns)} turns")
        self.turns[turn].code = code.rstrip("\n")
        self._history_ok = True

    def run(self, timeout: float | None = None) -> RunResult:
        """Execute the program so far in the sandbox: its output, a last bare expression's value, or
        its error."""
        return self.runner.run(self.program, timeout)

    def close(self) -> None:
        """Stop the sandbox's worker (a new one starts if the session runs again)."""
        self.runner.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _pairs(self) -> list[tuple[str, str]]:
        return [(t.instruction, t.code) for t in self.turns]

    def _write(self, instruction: str, first_attempt: int, on_text: OnText | None,
               on_failed: Callable[[int, RunResult], None] | None, replace: bool = False) -> str:
        history = self._pairs()[: len(self.turns) - replace]
        result = write_turn(self.writer, history, instruction, self.params, (len(history),),
                            header=self.header, tries=self.exec_guided, check=self.runner.run,
                            history_ok=self._history_ok or replace, first_attempt=first_attempt,
                            on_text=on_text, on_failed=on_failed)
        turn = Turn(instruction, result.code, first_attempt + result.attempts)
        if replace:
            self.turns[-1] = turn
        else:
            self.turns.append(turn)
        self.last_check = result.run
        if result.run is not None:
            self._history_ok = result.run.ok
        return result.code

    # ---- files ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": self.model_name, "header": self.header,
                "settings": {name: getattr(self.params, name) for name in SETTINGS},
                "exec_guided": self.exec_guided, "run_timeout": self.runner.timeout,
                "turns": [dataclasses.asdict(t) for t in self.turns]}

    def save(self, path: str | os.PathLike) -> None:
        """Write the session as JSON (turns, settings, model); written whole or not at all."""
        path = Path(path)
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.to_dict(), indent=2) + "\n")
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, source: Any = None, tokenizer: Any = None) -> Session:
        """A saved session, continued with `source` (default: the model named in the file)."""
        data = read_session_file(path)
        if source is None and data["model"] is None:
            raise SessionFileError(f"{path}: the file names no model; pass one (Session.load(path, model))")
        session = cls(source if source is not None else data["model"], tokenizer,
                      params=dataclasses.replace(DEFAULT_PARAMS, **data["settings"]), header=data["header"],
                      exec_guided=data["exec_guided"], run_timeout=data["run_timeout"])
        session.model_name = session.model_name or data["model"]  # the model it continues with, if it has a name
        session.saved_model = data["model"]
        return session.with_turns([Turn(**t) for t in data["turns"]])

    def with_turns(self, turns: list[Turn]) -> Session:
        self.turns = list(turns)
        return self


def read_session_file(path: str | os.PathLike) -> dict:
    """A session file's contents, checked field by field (SessionFileError names what is wrong)."""
    path = Path(path)

    def fail(message: str) -> SessionFileError:
        return SessionFileError(f"{path}: {message}")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise fail("no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise fail(f"not a codegen-lm session file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise fail(f"session file version {data.get('version')!r}; this codegen-lm reads version {VERSION}")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise fail("'model' must be a model name or null")
    header = data.get("header", protocol.HEADER)
    if not isinstance(header, str):
        raise fail("'header' must be text")
    settings = data.get("settings", {})
    if not isinstance(settings, dict) or set(settings) - set(SETTINGS):
        unknown = sorted(set(settings) - set(SETTINGS)) if isinstance(settings, dict) else settings
        raise fail(f"'settings' may hold {', '.join(SETTINGS)}; got {unknown!r}")
    try:
        dataclasses.replace(DEFAULT_PARAMS, **settings)
    except (ValueError, TypeError) as exc:
        raise fail(f"settings: {exc}") from None
    guided = data.get("exec_guided", 1)
    if isinstance(guided, bool) or not isinstance(guided, int) or guided < 1:
        raise fail(f"'exec_guided' must be an integer >= 1, got {guided!r}")
    timeout = data.get("run_timeout", RUN_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 3600:
        raise fail(f"'run_timeout' must be a number of seconds in (0, 3600], got {timeout!r}")
    turns = data.get("turns")
    if not isinstance(turns, list):
        raise fail("'turns' must be a list")
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("instruction"), str) or not isinstance(t.get("code"), str):
            raise fail(f"turn {i + 1} must be an object with text 'instruction' and 'code'")
        attempts = t.get("attempts", 1)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1 or set(t) - {
                "instruction", "code", "attempts"}:
            raise fail(f"turn {i + 1}: 'attempts' must be an integer >= 1 and no other fields are allowed")
    return {"model": model, "header": header, "settings": settings, "exec_guided": guided,
            "run_timeout": float(timeout), "turns": turns}


def _writer(source: Any, tokenizer: Any) -> tuple[Writer, str | None]:
    """The writer for a Session's source, and the model's name."""
    from ..model import CodeGenForCausalLM

    if isinstance(source, (str, os.PathLike)):
        from ..tokenizer import CodeGenTokenizerFast

        model = CodeGenForCausalLM.from_pretrained(source)
        try:
            tokenizer = tokenizer or CodeGenTokenizerFast.from_pretrained(source)
        except FileNotFoundError:
            tokenizer = CodeGenTokenizerFast.from_pretrained()
        return writer_for(Engine(model, tokenizer, max_batch=4)), str(source)
    if isinstance(source, CodeGenForCausalLM):
        if tokenizer is None:
            from ..tokenizer import CodeGenTokenizerFast

            tokenizer = CodeGenTokenizerFast.from_pretrained(source.name_or_path or "Salesforce/codegen-350M-mono")
        return writer_for(Engine(source, tokenizer, max_batch=4)), source.name_or_path
    if isinstance(source, Engine):
        return writer_for(source), getattr(source.model, "name_or_path", None)
    return writer_for(source), None
