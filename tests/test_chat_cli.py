"""`codegen-lm chat` and `codegen-lm synthesize`: the REPL through a real pseudo-terminal, the pipe
filter, and (where what the model writes matters) the same front ends on scripted completions."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pexpect
import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.cli import main
from codegen_lm.cli.chat import run_pipe, run_repl
from codegen_lm.cli.synthesize import write_atomically
from codegen_lm.conversation import HEADER, Session, Turn

MINI = "codegen-lm-mini"
ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\r")
# Every prompt_toolkit prompt starts by turning bracketed paste on, so this matches a new prompt only,
# never the redrawing of one being typed at.
PROMPT = r"\x1b\[\?2004h[^\n]*?chat \[(\d+)\]>"


def plain(text: str) -> str:
    return ANSI.sub("", text)


def last_instruction(prompt: str) -> str:
    """The instruction a turn's prompt ends with (its comment lines, after the last blank line)."""
    block = prompt.rstrip("\n").split("\n\n")[-1]
    return "\n".join(line[2:] for line in block.splitlines() if line.startswith("# "))


def scripted(code_for: dict, interrupt_on: int | None = None):
    """A completion function writing code_for[instruction]; a list gives the code of successive
    attempts. interrupt_on: the call (1-based) that raises KeyboardInterrupt, as Ctrl-C would."""
    calls: Counter = Counter()
    total = [0]

    def complete(prompt: str, max_new_tokens: int) -> str:
        total[0] += 1
        if total[0] == interrupt_on:
            raise KeyboardInterrupt
        instruction = last_instruction(prompt)
        code = code_for.get(instruction, "")
        if isinstance(code, list):
            code = code[min(calls[instruction], len(code) - 1)]
        calls[instruction] += 1
        return code

    return complete


def repl(session: Session, keys: str, console: Console | None = None) -> str:
    """Type `keys` (then Ctrl-D) into run_repl; what it showed, without colour codes."""
    console = console or Console(file=io.StringIO(), width=400)
    with create_pipe_input() as keyboard:
        keyboard.send_text(keys + "\x04")
        assert run_repl(session, input=keyboard, output=DummyOutput(), console=console) == 0
    return plain(console.file.getvalue())


def pipe(session: Session, text: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_pipe(session, io.StringIO(text), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def mini():
    """The bundled model, loaded once: the reference conversations the commands must reproduce."""
    model = CodeGenForCausalLM.from_pretrained(MINI)
    tokenizer = CodeGenTokenizerFast.from_pretrained(MINI)

    def session(**overrides) -> Session:
        return Session(model, tokenizer, model_name=MINI, **{"seed": 0, **overrides})

    return session


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line]


# ---- the REPL in a pseudo-terminal (the real program, the bundled model) --------------------------


class Terminal:
    """`python -m codegen_lm chat ...` in a pseudo-terminal."""

    def __init__(self, *args: str, cwd: Path) -> None:
        env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1")
        env.pop("NO_COLOR", None)
        # Ctrl-C as in a terminal's shell, even where the tests run as a background job (which ignores SIGINT,
        # and a child inherits that)
        self.child = pexpect.spawn(sys.executable, ["-m", "codegen_lm", "chat", *args], env=env, cwd=str(cwd),
                                   timeout=60, dimensions=(50, 150), encoding="utf-8",
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.turn = 0

    def wait(self) -> int:
        """The next prompt's turn number."""
        self.child.expect(PROMPT)
        return int(self.child.match.group(1))

    def do(self, line: str) -> str:
        """Type a line and Enter; what it printed before the next prompt."""
        self.child.send(line + "\r")
        self.turn = self.wait()
        return plain(self.child.before)

    def show(self) -> str:
        """/show's program, without its line numbers."""
        out = self.do("/show")
        lines = out.split("\n")[1:]  # the first is the command's echo
        return "\n".join(re.sub(r"^ *\d+ ?", "", line) for line in lines).strip("\n")


@pytest.fixture
def terminal(tmp_path):
    """Start chat in a terminal (and wait for its first prompt); whatever happens, it ends with the test."""
    started = []

    def start(*args: str) -> Terminal:
        started.append(Terminal(*args, cwd=tmp_path))
        started[-1].turn = started[-1].wait()
        return started[-1]

    yield start
    for t in started:
        t.child.close(force=True)


def test_repl_in_a_terminal(tmp_path, terminal):
    t = terminal("--model", MINI, "--seed", "0")
    assert t.turn == 1
    t.do("Define a variable x with the value 1.")
    t.do("Print x.")
    assert t.turn == 3
    program = t.show()
    assert "# Define a variable x with the value 1." in program and "# Print x." in program
    assert "removed turn 2: Print x." in t.do("/undo") and t.turn == 2
    assert "# Print x." not in t.show()
    assert "error" not in t.do("/retry") and t.turn == 2
    assert t.do("/run").split("\n", 1)[1].strip()  # what it printed, its value, or its error: something
    assert "saved 1 turn to s.json" in t.do("/save s.json")
    assert Session.load(tmp_path / "s.json", source=scripted({})).program.strip("\n") == t.show()

    # /load: a good file (whose program /run then executes), then a bad one
    data = json.loads((tmp_path / "s.json").read_text())
    data["turns"] = [{"instruction": "Print the answer.", "code": "print(40 + 2)"}]
    (tmp_path / "good.json").write_text(json.dumps(data))
    assert "loaded 1 turn from good.json" in t.do("/load good.json") and t.turn == 2
    assert "42" in t.do("/run").split("\n")[1:]
    (tmp_path / "bad.json").write_text("not json")
    out = t.do("/load bad.json")
    assert error_lines(out) == ["error: bad.json: not valid JSON (line 1: Expecting value)"] and t.turn == 2
    assert error_lines(t.do("/bogus")) == ["error: unknown command '/bogus' (/help lists them)"]

    # Ctrl-C at the prompt drops the line; a backslash continues an instruction on the next line
    t.child.send("garbage")
    t.child.sendintr()
    assert t.wait() == 2
    t.child.send("Compute y\\\r")
    t.do("from x.")
    assert t.turn == 3
    program = t.show()
    assert "garbage" not in program and "# Compute y\n# from x." in program
    help_text = " ".join(t.do("/help").split())
    assert "/retry" in help_text and "Esc then Enter" in help_text
    t.child.send("/exit\r")
    t.child.expect(pexpect.EOF)
    t.child.close()
    assert t.child.exitstatus == 0


def test_ctrl_c_while_the_model_writes_drops_the_turn(terminal):
    # random weights write gibberish without end, so the turn is still being written when Ctrl-C comes
    t = terminal("--random-weights", "--seed", "0", "--max-new-tokens", "2000")
    for _ in range(2):  # and again: the engine goes on after a cancelled request
        t.child.send("Define x = 1.\r")
        t.child.expect(r"\x1b\[\?2004l")  # the prompt is done with
        t.child.expect(r"\x1b\[2m6 \x1b\[0m")  # the turn's first line (line 6 of the program) is drawn
        t.child.sendintr()
        t.child.expect("interrupted; the turn was not added")
        assert t.wait() == 1
    assert "# Define" not in t.show()
    t.child.sendeof()  # Ctrl-D leaves
    t.child.expect(pexpect.EOF)
    t.child.close()
    assert t.child.exitstatus == 0


# ---- over a pipe ---------------------------------------------------------------------------------


def test_pipe_writes_exactly_the_program(mini):
    lines = ["Define a variable x with the value 1.", "Print x.", "/undo", "Print x times two.", "/run"]
    result = subprocess.run([sys.executable, "-m", "codegen_lm", "chat", "--seed", "0"], input="\n".join(lines) + "\n",
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with mini() as reference:
        reference.ask(lines[0])
        reference.ask(lines[1])
        reference.undo()
        reference.ask(lines[3])
        ran = reference.run().describe() or "(it ran, printing nothing)"
        assert result.stdout == reference.program
    assert "# Define a variable x with the value 1." in result.stderr
    assert "removed turn 2: Print x." in result.stderr and ran in result.stderr


def test_pipe_content_commands_and_errors(tmp_path):
    complete = scripted({"Set x to 2.": "x = 2", "Print x.": "print(x)"})
    saved = tmp_path / "s.json"
    code, out, err = pipe(Session(complete), f"/undo\nSet x to 2.\n\n/save {saved}\n/undo\n/load {saved}\nPrint x.\n"
                                             f"/run\n/load {tmp_path / 'missing.json'}\n/show\n")
    assert out == HEADER + "# Set x to 2.\nx = 2\n\n# Print x.\nprint(x)\n\n"
    assert code == 1  # two lines failed; the rest went on
    assert error_lines(err) == ["codegen-lm: error: line 1: there is no turn to undo",
                                f"codegen-lm: error: line 9: {tmp_path / 'missing.json'}: no such file"]
    assert "\n2\n" in err and "codegen-lm: loaded 1 turn from" in err
    assert err.rstrip("\n").endswith("# Print x.\nprint(x)")  # /show, on stderr
    assert pipe(Session(complete), "Set x to 2.\n/exit\nPrint x.\n")[1] == HEADER + "# Set x to 2.\nx = 2\n\n"


def test_pipe_multi_line_and_undecodable_lines():
    complete = scripted({"first\nsecond": "a = 1"})
    code, out, err = pipe(Session(complete), "first\\\nsecond\nbad \udcff line\n")
    assert out == HEADER + "# first\n# second\na = 1\n\n"
    assert code == 1 and error_lines(err) == [
        "codegen-lm: error: line 3: the line is not UTF-8 text (byte 0xff at offset 4)"]


def test_exec_guided_resamples_a_failing_turn():
    code_for = {"Print y.": ["print(undefined_name)", "print(1)"], "Print z.": ["print(a1)", "print(a2)"]}
    code, out, err = pipe(Session(scripted(code_for), exec_guided=3), "Print y.\n/run\n")
    assert code == 0 and out == HEADER + "# Print y.\nprint(1)\n\n"
    assert ("codegen-lm: attempt 1 of 3 failed (NameError: name 'undefined_name' is not defined (line 6)); "
            "sampling again") in err
    assert err.rstrip("\n").endswith("\n1")
    shown = repl(Session(scripted(code_for), exec_guided=2), "Print y.\rPrint z.\r/show\r")
    assert "attempt 1 of 2 failed (NameError: name 'undefined_name'" in shown
    assert "none of the 2 attempts ran; keeping the first" in shown  # Print z. never runs
    program = shown[shown.rindex("1 # Import libraries."):]  # /show's
    assert "print(a1)" in program and "print(a2)" not in program


# ---- the REPL's functions on scripted completions ---------------------------------------------------


def test_repl_content_edit_and_multi_line():
    complete = scripted({"Set x to 2.": "x = 2", "Print x.": "print(x)", "a\nb": "pass", "c\nd": "pass"})
    shown = repl(Session(complete), "Set x to 2.\rPrint x.\r/run\r/edit 1\r0\x1b\r/run\ra\x1b\rb\rc\\\rd\r/show\r")
    runs = [line for line in shown.splitlines() if line in ("2", "20")]
    assert runs == ["2", "20"]  # /run before and after /edit 1 made it x = 20
    program = shown[shown.rindex("1 # Import libraries."):]
    assert "x = 20" in program and "# a\n" in program and "# b\n" in program and "# c\n" in program
    assert "turn 1 edited" in shown


def test_repl_streams_the_turn_as_it_comes():
    console = Console(file=io.StringIO(), width=100, force_terminal=True)
    drawn = []

    class Streaming:  # a writer that hands its code over in pieces, looking at the screen after the first
        concurrent = False

        def write(self, prompt, params, on_text=None, cut=None):
            on_text("total = 40")
            drawn.append(plain(console.file.getvalue()))
            on_text(" + 2")
            return "total = 40 + 2"

    shown = repl(Session(Streaming()), "Sum.\r", console=console)
    assert "total = 40" in drawn[0] and "+ 2" not in drawn[0]
    assert "total = 40 + 2" in shown
    streamed = []
    err = io.StringIO()

    class PipeStreaming(Streaming):
        def write(self, prompt, params, on_text=None, cut=None):
            on_text("y = 1")
            streamed.append(err.getvalue())
            return "y = 1"

    assert run_pipe(Session(PipeStreaming()), io.StringIO("Sum.\n"), io.StringIO(), err) == 0
    assert streamed == ["# Sum.\ny = 1"]


def test_repl_errors_are_one_line_and_it_goes_on(tmp_path):
    complete = scripted({"Set x to 2.": "x = 2"}, interrupt_on=2)
    (tmp_path / "bad.json").write_text('{"format": "codegen-lm-session", "version": 9}')
    keys = (f"/undo\r/retry\r/edit 1\r/nonsense\r/run now\r/save {tmp_path}/no/s.json\r/save {tmp_path}\r"
            f"/load {tmp_path}/bad.json\r/load\rSet x to 2.\r/retry\r/show\r")
    shown = repl(Session(complete), keys)
    assert error_lines(shown) == [
        "error: there is no turn to undo", "error: there is no turn to retry", "error: there is no turn to edit",
        "error: unknown command '/nonsense' (/help lists them)", "error: /run takes no argument (usage: /run)",
        f"error: cannot save to {tmp_path}/no/s.json: No such file or directory",
        f"error: cannot save to {tmp_path}: it is a directory",
        f"error: {tmp_path}/bad.json: session file version 9; this codegen-lm reads version 1",
        "error: usage: /load FILE"]
    assert "Traceback" not in shown
    assert "interrupted; the turn is as it was" in shown  # the /retry, whose sample was interrupted,
    assert shown.rstrip().endswith("6 x = 2")  # left the turn as it was


# ---- starting the command ------------------------------------------------------------------------


def test_chat_help_and_load_option(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "end a line with \\ to continue" in out and "Esc then Enter" in out and "/save FILE" in out

    session = Session(scripted({}), model_name="some-other-model")
    session.with_turns([Turn("Print the answer.", "print(40 + 2)")]).save(tmp_path / "s.json")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xffbad\n/run\n")))
    code = main(["chat", "--load", str(tmp_path / "s.json"), "--seed", "0"])
    out, err = capsys.readouterr()
    assert code == 1  # line 1 is not UTF-8
    assert out == HEADER + "# Print the answer.\nprint(40 + 2)\n\n"
    assert "was written with some-other-model; continuing with codegen-lm-mini" in err
    assert "codegen-lm: error: line 1: the line is not UTF-8 text (byte 0xff at offset 0)" in err
    assert "\n42\n" in err

    (tmp_path / "bad.json").write_text("[]")
    assert main(["chat", "--load", str(tmp_path / "bad.json"), "--model", "no-such-model"]) == 1
    assert capsys.readouterr().err == (f"codegen-lm: error: {tmp_path / 'bad.json'}: not a codegen-lm session file "
                                       '(no "format": "codegen-lm-session")\n')


# ---- synthesize ------------------------------------------------------------------------------------


def test_synthesize_writes_the_sessions_program(tmp_path, capsys, mini):
    spec = tmp_path / "spec.txt"
    spec.write_text("Define a variable x with the value 1.\n\n   Print x.  \n")
    out_file = tmp_path / "program.py"
    assert main(["synthesize", str(spec), "-o", str(out_file), "--seed", "0", "--run"]) == 0
    out, err = capsys.readouterr()
    with mini() as reference:
        reference.ask("Define a variable x with the value 1.")
        reference.ask("Print x.")
        assert out_file.read_text() == reference.program
    assert out == "" and "codegen-lm: turn 2/2: Print x.\n" in err
    assert err.endswith("codegen-lm: the program ran (it printed nothing)\n")  # --run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["program.py", "spec.txt"]  # no temporary left

    spec.write_text("Define a function f\nthat returns 1.\n\nPrint f().\n")
    assert main(["synthesize", str(spec), "--paragraphs", "--seed", "0", "--exec-guided", "2"]) == 0
    out, err = capsys.readouterr()
    with mini(exec_guided=2) as reference:
        reference.ask("Define a function f\nthat returns 1.")
        reference.ask("Print f().")
        assert out == reference.program
    assert "# Define a function f\n# that returns 1.\n" in out


def test_synthesize_run_failure_is_one_line(tmp_path, capsys):
    spec = tmp_path / "spec.txt"
    spec.write_text("Define x.\n")
    # random weights write gibberish, which does not parse
    assert main(["synthesize", str(spec), "--random-weights", "--seed", "0", "--max-new-tokens", "8", "--run"]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(HEADER + "# Define x.\n")
    assert err.splitlines()[-1].startswith("codegen-lm: error: the program failed: SyntaxError: ")
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["missing", "empty", "blank", "not-utf8", "directory", "out-dir", "out-is-dir"])
def test_synthesize_bad_inputs_are_one_line(tmp_path, capsys, case):
    spec = tmp_path / "spec.txt"
    spec.write_text("Print 1.\n")
    args, named = [str(spec)], str(spec)
    if case == "missing":
        spec.unlink()
    elif case == "empty":
        spec.write_text("")
    elif case == "blank":
        spec.write_text("\n   \n\t\n")
    elif case == "not-utf8":
        spec.write_bytes(b"Print 1.\n\xff\xfe\n")
    elif case == "directory":
        args, named = [str(tmp_path)], str(tmp_path)
    elif case == "out-dir":
        named = str(tmp_path / "no" / "p.py")
        args += ["-o", named]
    else:
        args, named = [*args, "-o", str(tmp_path)], str(tmp_path)
    # a model that does not exist: each of these must be found before the model is loaded
    assert main(["synthesize", *args, "--model", "no-such-model"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("codegen-lm: error: ") and named in err
    assert "no-such-model" not in err


def test_write_atomically_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "p.py"
    write_atomically(target, "x = 1\n")
    assert target.read_text() == "x = 1\n" and target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(UnicodeEncodeError):
        write_atomically(target, "x = '\udc80'\n")  # fails half-way through writing
    assert target.read_text() == "x = 1\n" and [p.name for p in tmp_path.iterdir()] == ["p.py"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
