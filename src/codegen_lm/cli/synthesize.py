"""`codegen-lm synthesize`: a program from a file of instructions, without a conversation: each
instruction is a turn of the CodeGen paper's multi-turn protocol, as `codegen-lm chat` would take it."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from ..conversation import PromptTooLong, RunResult, Session
from .chat import Settings, add_session_options, failed_note, first_line, open_session, running_engine
from .common import CliError, one_line

# A spec is a list of instructions a person wrote; more than this is not one (and `synthesize
# /dev/zero` stops here instead of reading until memory runs out).
MAX_SPEC_BYTES = 16 << 20


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synthesize", help="write a program from a file of instructions",
                       description="Write a program from a file of instructions, one turn each, as `codegen-lm "
                                   "chat` would: each non-empty line is an instruction (with --paragraphs, each "
                                   "block of lines between blank lines). Progress goes to stderr.")
    p.add_argument("spec", metavar="SPEC", help="the instructions (a UTF-8 text file; - reads stdin)")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="write the program here, whole or not at all (default: stdout)")
    p.add_argument("--run", action="store_true", dest="run_program",
                   help="then run the program in the sandbox; its output goes to stderr, and the exit status is 1 "
                        "if it failed")
    p.add_argument("--paragraphs", action="store_true",
                   help="blocks of lines separated by blank lines are one (multi-line) instruction each")
    add_session_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    instructions = read_spec(args.spec, args.paragraphs)
    output = checked_output(args.output)  # both before the model is loaded
    with running_engine(args) as engine, open_session(args, engine, Settings.from_args(args)) as session:
        program = synthesize(session, instructions, sys.stderr)
        if output is None:
            sys.stdout.write(program)
            sys.stdout.flush()
        else:
            write_atomically(output, program)
        return report_run(session.run(), sys.stderr) if args.run_program else 0


def synthesize(session: Session, instructions: list[str], log: TextIO) -> str:
    """The program of `instructions` (turns added to `session`), with a progress line per turn."""
    def failed(attempt: int, result: RunResult) -> None:
        print(f"codegen-lm: {failed_note(attempt, session.exec_guided, result)}", file=log, flush=True)

    for i, instruction in enumerate(instructions, 1):
        print(f"codegen-lm: turn {i}/{len(instructions)}: {first_line(instruction)}", file=log, flush=True)
        try:
            session.ask(instruction, on_failed=failed)
        except PromptTooLong as exc:
            raise CliError(f"turn {i}: the program no longer fits the model's context ({one_line(exc)})") from None
    return session.program


def report_run(result: RunResult, log: TextIO) -> int:
    """--run's outcome on `log`: what the program printed and its last value; a failure is one line
    (and exit status 1)."""
    shown = RunResult(True, result.stdout, result.value).describe()
    if shown:
        print(shown, file=log)
    elif result.ok:
        print("codegen-lm: the program ran (it printed nothing)", file=log)
    if not result.ok:
        raise CliError(f"the program failed: {' '.join((result.error or 'it did not run').split())}")
    return 0


def read_spec(path: str, paragraphs: bool = False) -> list[str]:
    """The instructions of a spec file (or stdin for -), or a CliError that names the file."""
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_SPEC_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise CliError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{name}: is a directory, not a file of instructions") from None
    except OSError as exc:
        raise CliError(f"{name}: cannot read it ({exc.strerror or one_line(exc)})") from None
    if len(data) > MAX_SPEC_BYTES:
        raise CliError(f"{name}: more than {MAX_SPEC_BYTES >> 20} MB; a spec is a list of instructions")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise CliError(f"{name}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    instructions = split_spec(text, paragraphs)
    if not instructions:
        raise CliError(f"{name}: no instructions in it (it is empty or blank)")
    return instructions


def split_spec(text: str, paragraphs: bool = False) -> list[str]:
    """Each non-empty line an instruction; with `paragraphs`, each block between blank lines."""
    lines = [line.strip() for line in text.splitlines()]
    if not paragraphs:
        return [line for line in lines if line]
    blocks, block = [], []
    for line in [*lines, ""]:
        if line:
            block.append(line)
        elif block:
            blocks.append("\n".join(block))
            block = []
    return blocks


def checked_output(path: str | None) -> Path | None:
    """-o as a path a program can be written to, checked before anything else happens."""
    if path is None:
        return None
    target = Path(path).expanduser()
    folder = target.parent
    if target.is_dir():
        raise CliError(f"-o {path}: is a directory")
    if not folder.is_dir():
        raise CliError(f"-o {path}: no such directory {str(folder)!r}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"-o {path}: cannot write in {str(folder)!r} (permission denied)")
    return target


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it there: an interrupted or failed
    write leaves the old file (or none), never half a program."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, _mode(path))
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise CliError(f"cannot write {path}: {exc.strerror or one_line(exc)}") from None
        raise


def _mode(path: Path) -> int:
    """An existing file's permissions, or a new file's (mkstemp's are owner-only)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
