"""`codegen-lm chat`: a conversation with the model in the terminal, the CodeGen paper's way: each
instruction is a turn, the model writes its code (streamed as it comes), and the program grows turn
by turn; /run executes it in the sandbox.

Over a pipe it is a filter: instructions (and /commands) in, the final program out on stdout, with
everything else on stderr. The options shared with `codegen-lm synthesize` live here as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from rich.console import Console
from rich.live import Live
from rich.syntax import Syntax
from rich.text import Text

from ..config import MAX_POSITIONS
from ..conversation import DEFAULT_PARAMS, PromptTooLong, RunResult, Session, SessionFileError, Turn, protocol
from ..conversation.session import read_session_file
from .common import CliError, add_engine_options, add_model_options, engine_options, load_model, number, one_line
from .generate import checked_argument

if TYPE_CHECKING:
    from ..engine import Engine

MAX_TRIES = 100  # --exec-guided: attempts per turn (each one a sample and a sandbox run)
REFRESH_S = 0.04  # the streamed turn is redrawn at most this often (the last piece always shows)

def _paragraph(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), 79)


INPUT_HELP = _paragraph("""
Type an instruction in plain English and press Enter: the model writes the code for it, streamed as it
comes, and the program grows turn by turn. Multi-line instructions: end a line with \\ to continue on
the next line, or press Esc then Enter (or Alt-Enter) to insert a newline. Ctrl-C while the model writes
drops that turn; at the prompt it clears the line. Ctrl-D (or /exit) leaves.""")

COMMANDS_HELP = """\
commands:
  /run        execute the program so far in the sandbox: what it prints, the
              value of a last bare expression, or the error with its traceback
  /retry      sample the last turn again
  /undo       remove the last turn
  /show       the whole program, with line numbers
  /edit N     edit turn N's code yourself (Esc-Enter or Alt-Enter keeps it,
              Ctrl-C cancels)
  /save FILE  save the session (turns, settings, model) as JSON
  /load FILE  continue a saved session (its turns and settings; the model
              running now writes)
  /help       this text
  /exit       leave (also Ctrl-D)"""

PIPE_HELP = _paragraph("""
When stdin or stdout is not a terminal, every non-empty line of stdin is an instruction (a line ending
in \\ continues on the next) or a /command; at the end the program is written to stdout, and nothing
else is: progress, /run's output and messages go to stderr. The exit status is 1 if a line failed.""")


# ---- the options chat and synthesize share -------------------------------------------------------


def add_session_options(parser: argparse.ArgumentParser) -> None:
    """Model, engine and sampling options of a conversation (defaults: the paper's MTPB sampling)."""
    add_model_options(parser)
    add_engine_options(parser)
    d = DEFAULT_PARAMS
    parser.add_argument("--temperature", type=number(float, 0, what="must be >= 0"), default=None,
                        help=f"sampling temperature (default {d.temperature}; 0 is greedy)")
    parser.add_argument("--top-p", type=number(float, 0, 1, low_open=True, what="must be in (0, 1]"), default=None,
                        help=f"nucleus sampling (default {d.top_p})")
    parser.add_argument("--max-new-tokens", type=number(int, 1, MAX_POSITIONS, what=f"must be in [1, {MAX_POSITIONS}]"),
                        default=None, help=f"at most this many tokens per turn (default {d.max_new_tokens})")
    parser.add_argument("--seed", type=number(int), default=None,
                        help="make every turn's code repeatable (default: fresh samples)")
    parser.add_argument("--exec-guided", type=number(int, 1, MAX_TRIES, what=f"must be in [1, {MAX_TRIES}]"),
                        default=None, metavar="K",
                        help="up to K attempts per turn: when the program fails to run after a turn, sample the "
                             "turn again (default 1: no guidance)")


@dataclass(frozen=True)
class Settings:
    """The sampling settings given on the command line. They apply to a new session, and override a
    loaded session's own (those not given keep the file's)."""

    params: dict[str, Any] = field(default_factory=dict)
    exec_guided: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        names = ("temperature", "top_p", "max_new_tokens", "seed")
        return cls({n: getattr(args, n) for n in names if getattr(args, n) is not None}, args.exec_guided)

    def new_session(self, source: Any, model_name: str | None = None) -> Session:
        return Session(source, params=dataclasses.replace(DEFAULT_PARAMS, **self.params),
                       exec_guided=self.exec_guided or 1, model_name=model_name)

    def apply(self, session: Session) -> Session:
        session.params = dataclasses.replace(session.params, **self.params)
        if self.exec_guided is not None:
            session.exec_guided = self.exec_guided
        return session


@contextmanager
def running_engine(args: argparse.Namespace) -> Iterator[Engine]:
    """The --model's engine, its loop in a background thread: the REPL then only waits for tokens, so
    Ctrl-C lands in the wait (and cancels the request) rather than in the middle of an engine step."""
    from ..engine import Engine

    model, tokenizer = load_model(args)
    try:
        engine = Engine(model, tokenizer, max_batch=4, **engine_options(args))
    except ValueError as exc:
        raise CliError(one_line(exc)) from None
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def check_session_file(path: str) -> None:
    """A --load file is read before the model is loaded, so a bad one costs no waiting."""
    try:
        read_session_file(path)
    except SessionFileError as exc:
        raise CliError(one_line(exc)) from None


def failed_note(attempt: int, tries: int, run: RunResult) -> str:
    """What to tell the user when an execution-guided attempt's program failed."""
    error = " ".join((run.error or "it did not run").split())
    return f"attempt {attempt} of {tries} failed ({error}); sampling again"


# ---- what the front ends show ---------------------------------------------------------------------


class TurnView(Protocol):
    """One turn being written: a context manager that hears the code as it comes."""

    def __enter__(self) -> TurnView: ...
    def __exit__(self, *exc_info: object) -> None: ...
    def text(self, piece: str) -> None: ...
    def failed(self, attempt: int, run: RunResult) -> None: ...
    def done(self, code: str, check: RunResult | None = None) -> None: ...


class View(Protocol):
    """Where a conversation's output goes: a rich terminal, or plain stderr over a pipe."""

    def turn(self, instruction: str, first_line: int, tries: int) -> TurnView: ...
    def program(self, source: str) -> None: ...
    def result(self, text: str, ok: bool) -> None: ...
    def note(self, text: str) -> None: ...
    def error(self, text: str) -> None: ...
    def edit(self, number: int, code: str) -> str | None: ...


class ChatError(Exception):
    """A command that cannot be done: one line for the user, and the conversation goes on."""


class Chat:
    """The conversation and its commands, whatever the front end."""

    def __init__(self, session: Session, view: View, settings: Settings | None = None) -> None:
        self.session, self.view, self.settings = session, view, settings or Settings()
        self.model_name = session.model_name  # the model writing from now on, whatever a loaded file says
        self.failures = 0
        self.doing = ""  # what handle() is doing: "ask" or the command's name
        self.commands: dict[str, Callable[[str], bool | None]] = {
            "run": self.run, "retry": self.retry, "undo": self.undo, "show": self.show, "edit": self.edit,
            "save": self.save, "load": self.load, "help": self.help, "exit": self.exit, "quit": self.exit}

    def handle(self, text: str) -> bool:
        """Do one instruction or /command; False when the conversation is over. Problems are reported
        in one line (and counted), never raised; KeyboardInterrupt is left to the front end."""
        text = text.strip()
        if not text:
            return True
        command = text.startswith("/")
        name, arg = [*text[1:].split(maxsplit=1), "", ""][:2] if command else ("ask", text)
        self.doing = name
        try:
            if not command:
                self.ask(text)
                return True
            if name not in self.commands:
                raise ChatError(f"unknown command {text.split()[0]!r} (/help lists them)")
            return self.commands[name](arg.strip()) is not False
        except ChatError as exc:
            self.fail(str(exc))
        except PromptTooLong as exc:
            self.fail(f"the program no longer fits the model's context ({one_line(exc)}); /undo or /edit a turn")
        except Exception as exc:  # the engine or sandbox failing must not end the conversation
            self.fail(f"{type(exc).__name__}: {one_line(exc)}")
        return True

    def fail(self, message: str) -> None:
        self.failures += 1
        self.view.error(message)

    def interrupted(self) -> str:
        """After Ctrl-C: the sandbox may have been left mid-program, so a fresh one starts next time.
        Returns what to tell the user."""
        self.session.close()
        return {"ask": "interrupted; the turn was not added",
                "retry": "interrupted; the turn is as it was"}.get(self.doing, "interrupted")

    # ---- turns ----

    def ask(self, instruction: str) -> None:
        session = self.session
        self._write(instruction, session.turns, lambda **callbacks: session.ask(instruction, **callbacks))

    def retry(self, arg: str) -> None:
        self._no_argument("retry", arg)
        turns = self.session.turns
        if not turns:
            raise ChatError("there is no turn to retry")
        self._write(turns[-1].instruction, turns[:-1], self.session.retry)  # the old turn stays if this fails

    def _write(self, instruction: str, history: list[Turn], write: Callable[..., str]) -> None:
        """Write a turn through `write(on_text=..., on_failed=...)`, shown as it comes."""
        pairs = [(t.instruction, t.code) for t in history]
        start = protocol.prompt(pairs, instruction, self.session.header).count("\n") + 1
        with self.view.turn(instruction, start, self.session.exec_guided) as turn:
            code = write(on_text=turn.text, on_failed=turn.failed)
            turn.done(code, self.session.last_check)

    # ---- commands ----

    def run(self, arg: str) -> None:
        self._no_argument("run", arg)
        result = self.session.run()
        self.view.result(result.describe(), result.ok)

    def undo(self, arg: str) -> None:
        self._no_argument("undo", arg)
        if not self.session.turns:
            raise ChatError("there is no turn to undo")
        turn = self.session.undo()
        self.view.note(f"removed turn {len(self.session.turns) + 1}: {first_line(turn.instruction)}")

    def show(self, arg: str) -> None:
        self._no_argument("show", arg)
        self.view.program(self.session.program)

    def edit(self, arg: str) -> None:
        turns = self.session.turns
        if not arg.isdigit() or not 1 <= int(arg) <= len(turns):
            raise ChatError(f"usage: /edit N, N a turn from 1 to {len(turns)}" if turns else "there is no turn to edit")
        code = self.view.edit(int(arg), turns[int(arg) - 1].code)
        if code is not None:
            self.session.edit(int(arg) - 1, code)
            self.view.note(f"turn {arg} edited")

    def save(self, arg: str) -> None:
        path = self._path("save", arg)
        if path.is_dir():
            raise ChatError(f"cannot save to {arg}: it is a directory")
        try:
            self.session.save(path)
        except OSError as exc:
            raise ChatError(f"cannot save to {arg}: {exc.strerror or one_line(exc)}") from None
        self.view.note(f"saved {count_turns(len(self.session.turns))} to {arg}")

    def load(self, arg: str) -> None:
        path = self._path("load", arg)
        try:
            loaded = self.settings.apply(Session.load(path, source=self.session.writer))
        except (SessionFileError, ValueError) as exc:
            raise ChatError(one_line(exc)) from None
        self.replace(loaded, arg)
        self.view.program(loaded.program)

    def replace(self, loaded: Session, where: str) -> None:
        """Continue with a loaded session (written by the model running now)."""
        if loaded.saved_model != self.model_name:
            self.view.note(f"{where} was written with {loaded.saved_model or 'an unnamed model'}; "
                           f"continuing with {self.model_name}")
            loaded.model_name = self.model_name
        self.session.close()
        self.session = loaded
        self.view.note(f"loaded {count_turns(len(loaded.turns))} from {where}")

    def help(self, arg: str) -> None:
        self.view.note(f"{INPUT_HELP}\n\n{COMMANDS_HELP}")

    def exit(self, arg: str) -> bool:
        self._no_argument("exit", arg)
        return False

    @staticmethod
    def _no_argument(name: str, arg: str) -> None:
        if arg:
            raise ChatError(f"/{name} takes no argument (usage: /{name})")

    @staticmethod
    def _path(name: str, arg: str) -> Path:
        if not arg:
            raise ChatError(f"usage: /{name} FILE")
        return Path(arg).expanduser()


def count_turns(n: int) -> str:
    return f"{n} turn{'' if n == 1 else 's'}"


def first_line(text: str) -> str:
    line = text.strip().split("\n", 1)[0]
    return line + (" ..." if "\n" in text.strip() else "")


# ---- the terminal ---------------------------------------------------------------------------------


class LiveTurn:
    """A turn drawn highlighted as it streams (rich's Live redraws it; its last drawing stays)."""

    def __init__(self, console: Console, first_line: int, tries: int) -> None:
        self.console, self.first_line, self.tries = console, first_line, tries
        self.code, self.failures, self.empty = "", 0, False
        self._live = self._new_live()
        self._drawn = -math.inf

    def __enter__(self) -> LiveTurn:
        self._start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._live.update(self._render())
        self._stop()

    def text(self, piece: str) -> None:
        self.code += piece
        now = time.monotonic()
        due = now - self._drawn >= REFRESH_S
        self._live.update(self._render(), refresh=due)
        if due:
            self._drawn = now

    def failed(self, attempt: int, run: RunResult) -> None:
        """The failed attempt stays on screen, struck through, with what went wrong."""
        self._live.update(Text(self.code, style="dim strike"), refresh=True)
        self._restart(failed_note(attempt, self.tries, run))
        self.failures += 1
        self.code = ""

    def done(self, code: str, check: RunResult | None = None) -> None:
        if self.failures and check is not None and not check.ok:  # every attempt failed: the first is kept
            self._live.update(Text(""), refresh=True)
            self._restart(f"none of the {self.tries} attempts ran; keeping the first")
        self.code, self.empty = code, not code.strip()

    def _restart(self, message: str) -> None:
        self._stop()
        self.console.print(Text(message, style="yellow"))
        self._start()

    def _stop(self) -> None:
        self._live.stop()  # draws it a last time, whole
        if not self.console.is_terminal:  # (a file, in tests) where Live ends no line of its own
            self.console.line()

    def _start(self) -> None:
        self._live = self._new_live()  # a new one: a restarted Live would draw over what the last one left
        self._live.start()
        self._drawn = -math.inf

    def _new_live(self) -> Live:
        return Live(console=self.console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False)

    def _render(self) -> Syntax | Text:
        if self.empty:
            return Text("(the model wrote no code for this turn)", style="dim")
        return syntax(self.code, self.first_line) if self.code else Text("")


def syntax(code: str, start_line: int = 1) -> Syntax:
    """Python highlighted, numbered as in the program (so /run's line numbers point at it)."""
    return Syntax(code, "python", theme="ansi_dark", line_numbers=True, start_line=start_line,
                  background_color="default", word_wrap=True)


class RichView:
    """The terminal: highlighted code, coloured results and messages."""

    def __init__(self, console: Console, input: Any = None, output: Any = None) -> None:
        self.console, self._input, self._output = console, input, output

    def turn(self, instruction: str, first_line: int, tries: int) -> LiveTurn:
        return LiveTurn(self.console, first_line, tries)

    def program(self, source: str) -> None:
        self.console.print(syntax(source.rstrip("\n")))

    def result(self, text: str, ok: bool) -> None:
        self.console.print(Text(text or "(it ran, printing nothing)", style="" if ok else "red"))

    def note(self, text: str) -> None:
        self.console.print(Text(text, style="dim"))

    def error(self, text: str) -> None:
        self.console.print(Text(f"error: {text}", style="bold red"))

    def edit(self, number: int, code: str) -> str | None:
        from prompt_toolkit import PromptSession

        self.note(f"editing turn {number}: Esc-Enter (or Alt-Enter) keeps it, Ctrl-C cancels")
        editor: PromptSession = PromptSession(multiline=True, input=self._input, output=self._output)
        try:
            return editor.prompt(f"{number}| ", default=code, prompt_continuation=lambda w, n, s: "| ".rjust(w))
        except (KeyboardInterrupt, EOFError):
            self.note("edit cancelled")
            return None


def prompt_session(input: Any = None, output: Any = None) -> Any:
    """prompt_toolkit's line editor with history; Enter sends, unless the line ends with a backslash
    (which becomes a newline), and Esc-Enter / Alt-Enter inserts a newline."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("enter")
    def _send(event: Any) -> None:
        buffer = event.current_buffer
        if buffer.document.is_cursor_at_the_end and buffer.text.endswith("\\"):
            buffer.delete_before_cursor(1)
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @keys.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    return PromptSession(history=InMemoryHistory(), key_bindings=keys, multiline=True,
                         prompt_continuation=lambda width, line, wrapped: "... ".rjust(width),
                         input=input, output=output)


def run_repl(session: Session, *, input: Any = None, output: Any = None, console: Console | None = None,
             settings: Settings | None = None) -> int:
    """The interactive conversation, until /exit or Ctrl-D; closes the session at the end.
    input/output: prompt_toolkit's (default: the terminal); console: where rich draws (default: stdout)."""
    console = console or Console(highlight=False)
    chat = Chat(session, RichView(console, input, output), settings)
    editor = prompt_session(input, output)
    console.print(Text(f"codegen-lm chat{f' with {chat.model_name}' if chat.model_name else ''}: type an "
                       "instruction; /help for commands, /exit or Ctrl-D to leave", style="dim"))
    try:
        while True:
            try:
                text = editor.prompt(f"chat [{len(chat.session.turns) + 1}]> ")
            except KeyboardInterrupt:
                continue  # the line is dropped
            except EOFError:
                break
            try:
                if not chat.handle(text):
                    break
            except KeyboardInterrupt:
                console.print(Text(chat.interrupted(), style="yellow"))
    finally:
        chat.session.close()
    return 0


# ---- over a pipe ----------------------------------------------------------------------------------


class PlainTurn:
    """A turn over a pipe: its instruction comment, then its code as it comes."""

    def __init__(self, stream: TextIO, instruction: str, tries: int) -> None:
        self.stream, self.instruction, self.tries = stream, instruction, tries
        self.code, self.failures = "", 0

    def __enter__(self) -> PlainTurn:
        self.stream.write(protocol.instruction_comment(self.instruction))
        self.stream.flush()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._end_line()

    def text(self, piece: str) -> None:
        self.code += piece
        self.stream.write(piece)
        self.stream.flush()

    def failed(self, attempt: int, run: RunResult) -> None:
        self._end_line()
        self.stream.write(f"codegen-lm: {failed_note(attempt, self.tries, run)}\n")
        self.stream.flush()
        self.failures += 1
        self.code = ""

    def done(self, code: str, check: RunResult | None = None) -> None:
        if self.failures and check is not None and not check.ok:
            self._end_line()
            self.stream.write(f"codegen-lm: none of the {self.tries} attempts ran; keeping the first\n")
        self.code = code

    def _end_line(self) -> None:
        if self.code and not self.code.endswith("\n"):
            self.stream.write("\n")
        self.stream.flush()


class PlainView:
    """Plain text on one stream (stderr over a pipe): no prompt, no colour."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.where = stream, ""

    def turn(self, instruction: str, first_line: int, tries: int) -> PlainTurn:
        return PlainTurn(self.stream, instruction, tries)

    def program(self, source: str) -> None:
        self._write(source.rstrip("\n"))

    def result(self, text: str, ok: bool) -> None:
        self._write(text if text or not ok else "(it ran, printing nothing)")

    def note(self, text: str) -> None:
        self._write(f"codegen-lm: {text}")

    def error(self, text: str) -> None:
        self._write(f"codegen-lm: error: {self.where}{text}")

    def edit(self, number: int, code: str) -> str | None:
        raise ChatError("/edit needs a terminal")

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def pipe_lines(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each instruction or command: a line ending in a backslash continues
    on the next; blank lines are skipped."""
    pending: list[str] = []
    start = 0
    for index, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not pending:
            start = index
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        text = "\n".join([*pending, line])
        pending = []
        if text.strip():
            yield start, text
    if pending and "\n".join(pending).strip():
        yield start, "\n".join(pending)


def run_pipe(session: Session, stdin: TextIO, stdout: TextIO, stderr: TextIO, settings: Settings | None = None) -> int:
    """The conversation as a filter: instructions and /commands from stdin, the final program on
    stdout (and nothing else there). Closes the session; exit status 1 if a line failed."""
    view = PlainView(stderr)
    chat = Chat(session, view, settings)
    try:
        for index, text in pipe_lines(stdin):
            view.where = f"line {index}: "
            try:
                text = checked_argument(text, "the line")
            except CliError as exc:
                chat.fail(str(exc))
                continue
            if not chat.handle(text):
                break
        stdout.write(chat.session.program)
        stdout.flush()
    finally:
        chat.session.close()
    return 1 if chat.failures else 0


# ---- the command ----------------------------------------------------------------------------------


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="write a program with the model, one instruction at a time",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=_paragraph("A conversation with a CodeGen model, as in the CodeGen paper: "
                                              "each instruction is a turn, the model writes its code, and the "
                                              "program grows turn by turn.") + "\n\n" + INPUT_HELP,
                       epilog=f"{COMMANDS_HELP}\n\n{PIPE_HELP}")
    add_session_options(p)
    p.add_argument("--load", metavar="FILE", default=None,
                   help="continue a session saved with /save (its settings, unless given here)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_args(args)
    if args.load:
        check_session_file(args.load)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    with running_engine(args) as engine:
        session = open_session(args, engine, settings)
        if interactive:
            return run_repl(session, settings=settings)
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape")
        return run_pipe(session, stdin, sys.stdout, sys.stderr, settings)


def open_session(args: argparse.Namespace, engine: Engine, settings: Settings) -> Session:
    """A new session on `engine`, or the --load one continued there (recording the model running now,
    after saying so if the file named another)."""
    load = getattr(args, "load", None)
    if not load:
        return settings.new_session(engine, args.model)
    try:
        session = settings.apply(Session.load(load, source=engine))
    except (SessionFileError, ValueError) as exc:
        raise CliError(one_line(exc)) from None
    if session.saved_model != args.model:
        print(f"codegen-lm: note: {load} was written with {session.saved_model or 'an unnamed model'}; "
              f"continuing with {args.model}", file=sys.stderr)
        session.model_name = args.model
    return session
