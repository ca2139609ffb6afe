"""Conversational synthesis: the paper's protocol (shared with MTPB), cutting a streamed turn, the
Session (ask, run in the sandbox, undo, retry, edit, save/load), the prefix cache carrying a history,
execution-guided turns, and MTPB's concurrent conversations against one at a time."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.conversation import (
    HEADER,
    CutStream,
    EngineWriter,
    Session,
    SessionFileError,
    cut_turn,
    derive_seed,
    instruction_comment,
    protocol,
)
from codegen_lm.engine import Engine, GenerationParams
from codegen_lm.evaluation import mtpb

# ---- the protocol --------------------------------------------------------------------------------------


def test_instruction_comments_are_the_originals_for_mtpb_turns():
    # the original wraps every turn as f"# {turn}\n"; MTPB's few multi-line turns carry their own "# "
    turns = ["Define a list named numbers with the values [1, 2].",
             'Python got drunk and str() and int() are acting odd: \n# str(4) = 4\n# str("4") = 4']
    for turn in turns:
        assert instruction_comment(turn) == f"# {turn}\n"
    assert instruction_comment("Load the file.\nThen count lines.") == "# Load the file.\n# Then count lines.\n"


def test_program_and_prompt_follow_the_papers_assembly():
    turns = [("Set x.", "x = 1"), ("Print x.", "print(x)")]
    assert protocol.program(turns) == HEADER + "# Set x.\nx = 1\n\n# Print x.\nprint(x)\n\n"
    assert protocol.prompt(turns[:1], "Print x.") == HEADER + "# Set x.\nx = 1\n\n# Print x.\n"


FRAGMENTS = ["x = 1", "\n", "\n", "    ", "#", " note", "print(x)", "pri", "nt(", "def f():", "de", "f g", "'''",
             '"""', "'", '"', "\n\n\n", "<|endoftext|>", "<|end", "oftext|>", "y", " ", "return 1", "if x:"]


@pytest.mark.parametrize("cut", [cut_turn, mtpb.truncate_program], ids=["per-turn", "whole-program"])
def test_a_streamed_turn_is_cut_where_the_whole_text_is_cut_as_soon_as_the_cut_is_known(cut):
    rng = random.Random(0)
    for _ in range(3000):
        pieces = [rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 25))]
        full = "".join(pieces)
        stream, shown = CutStream(cut), ""
        for piece in pieces:
            shown += stream.push(piece)
            if stream.done:
                break
        shown += stream.finish()
        assert stream.result == cut(full) == shown, pieces


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(0, "a", 1) == derive_seed(0, "a", 1) != derive_seed(0, "a", 2)
    assert derive_seed(None, "a") is None and 0 <= derive_seed(5, 3) < 2**31


# ---- sessions on a scripted completion ---------------------------------------------------------------


class Scripted:
    """A completion function: per instruction, the completions to give in turn (then the last again)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers, self.calls, self.prompts = answers, {}, []

    def __call__(self, prompt: str, max_new_tokens: int) -> str:
        self.prompts.append(prompt)
        instruction = prompt.rstrip("\n").splitlines()[-1][2:]
        options = self.answers[instruction]
        i = self.calls.get(instruction, 0)
        self.calls[instruction] = i + 1
        return options[min(i, len(options) - 1)]


def test_a_session_builds_the_evaluators_programs_and_runs_them_in_the_sandbox():
    script = {"Set x to 2.": ["x = 2\n\n\n# junk after the cut"], "Add 3 to x.": ["x = x + 3\n# next turn"],
              "Show x.": ["x\n"]}
    with Session(Scripted(script)) as session:
        for instruction in script:
            session.ask(instruction)
        expected = mtpb.assemble(list(script), Scripted(script), 256)
        assert session.program == expected == HEADER + "# Set x to 2.\nx = 2\n\n# Add 3 to x.\nx = x + 3\n\n\n" \
            "# Show x.\nx\n\n\n"
        result = session.run()
        assert result.ok and result.value == "5" and result.error is None
        session.edit(2, "print('x is', x)\nx / 0")
        result = session.run()
        assert not result.ok and result.stdout == "x is 5\n"
        assert result.error == "ZeroDivisionError: division by zero (line 14)" and "x / 0" in result.traceback
        session.edit(-1, "x = (")
        assert session.run().error == "SyntaxError: '(' was never closed (line 13)"


def test_undo_retry_and_edit():
    script = {"Set x.": ["x = 1", "x = 2"], "Print x.": ["print(x)"]}
    session = Session(Scripted(script))
    assert session.ask("Set x.") == "x = 1"
    assert session.retry() == "x = 2" and session.turns[0].attempts == 2 and len(session.turns) == 1
    session.ask("Print x.")
    assert session.undo().code == "print(x)" and [t.code for t in session.turns] == ["x = 2"]
    session.edit(0, "x = 40 + 2\n")
    assert session.program == HEADER + "# Set x.\nx = 40 + 2\n\n"
    with pytest.raises(IndexError):
        session.edit(3, "y = 1")
    session.undo()
    with pytest.raises(IndexError, match="no turn to undo"):
        session.undo()
    with pytest.raises(ValueError, match="non-empty"):
        session.ask("  ")


def test_execution_guided_turns_resample_a_turn_whose_program_fails():
    script = {"Set x.": ["x = 1"], "Print x.": ["print(undefined_name)", "print(x x)", "print(x)"]}
    failed = []
    with Session(Scripted(script), exec_guided=3) as session:
        session.ask("Set x.")
        assert session.ask("Print x.", on_failed=lambda attempt, run: failed.append((attempt, run.error))) == \
            "print(x)"
        assert session.turns[1].attempts == 3
        assert failed == [(1, "NameError: name 'undefined_name' is not defined (line 9)"),
                          (2, "SyntaxError: invalid syntax. Perhaps you forgot a comma? (line 9)")]
        assert session.run().stdout == "1\n"
    # none runs: the first attempt is kept, every try counted
    stubborn = Scripted({"Print y.": ["print(y)"]})
    with Session(stubborn, exec_guided=2) as session:
        assert session.ask("Print y.") == "print(y)" and session.turns[0].attempts == 2
        # a history that already fails is not guided: no turn after it can make it run
        stubborn.answers["Print z."] = ["print(z)"]
        session.ask("Print z.")
        assert session.turns[1].attempts == 1 and stubborn.calls["Print z."] == 1


def test_mtpb_counts_the_execution_guided_budget(tmp_path):
    row = {"id": "g", "name": "g", "category": "c", "prompts": ["Set x.", "Print x."], "inputs": [{}],
           "outputs": [1]}
    (tmp_path / "m.jsonl").write_text(json.dumps(row) + "\n")
    data = mtpb.load_mtpb(tmp_path / "m.jsonl")
    script = {"Set x.": ["x = 1"], "Print x.": ["print(y)", "print(x)"]}
    plain = mtpb.evaluate_mtpb(data, Scripted(script), tmp_path / "plain", samples=1, progress=False, workers=1)
    guided = mtpb.evaluate_mtpb(data, Scripted(script), tmp_path / "guided", samples=1, progress=False, workers=1,
                                exec_guided=2)
    assert (plain["passed"], plain["turn_completions"]) == (0, 2)
    assert (guided["passed"], guided["turn_completions"]) == (1, 3)
    assert guided["settings"]["exec_guided"] == 2 and "Turn completions sampled: 3" in \
        (tmp_path / "guided" / "report.md").read_text()


# ---- files --------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    script = {"Set x.": ["x = 1"], "Print x.": ["print(x)"]}
    session = Session(Scripted(script), params=GenerationParams(max_new_tokens=64), seed=3, temperature=0.5,
                      exec_guided=2, model_name="scripted")
    session.ask("Set x.")
    session.ask("Print x.")
    session.save(tmp_path / "s.json")
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["model"] == "scripted" and saved["settings"]["seed"] == 3 and saved["exec_guided"] == 2
    loaded = Session.load(tmp_path / "s.json", Scripted(script))
    assert loaded.program == session.program and loaded.params == session.params
    assert loaded.exec_guided == 2 and [t.attempts for t in loaded.turns] == [1, 1]
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file"),
    ("{", "not valid JSON (line 1"),
    ("[]", "not a codegen-lm session file"),
    ('{"format": "codegen-lm-session", "version": 9}', "version 9"),
    ('{"format": "codegen-lm-session", "version": 1, "turns": {}}', "'turns' must be a list"),
    ('{"format": "codegen-lm-session", "version": 1, "turns": [{"code": "x"}]}', "turn 1 must be an object"),
    ('{"format": "codegen-lm-session", "version": 1, "turns": [], "settings": {"temperature": -1}}',
     "settings: temperature must be"),
    ('{"format": "codegen-lm-session", "version": 1, "turns": [], "settings": {"stop": "x"}}',
     "'settings' may hold"),
    ('{"format": "codegen-lm-session", "version": 1, "turns": [], "exec_guided": 0}', "'exec_guided'"),
])
def test_bad_session_files_are_named_in_one_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SessionFileError) as info:
        Session.load(path, Scripted({}))
    assert str(info.value).startswith(str(path)) and message in str(info.value) and "\n" not in str(info.value)


# ---- on an engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    return Engine(model, CodeGenTokenizerFast.from_pretrained(tiny_checkpoint), max_batch=4)


TURNS = ["Define a list of integers named numbers.", "Sum the numbers.", "Print the sum."]


def test_a_session_on_an_engine_builds_the_evaluators_program_and_reuses_the_history(engine):
    greedy = GenerationParams(max_new_tokens=24, temperature=0.0)
    session = Session(engine, params=greedy)
    streamed, computed, prompt_lengths = [], [], []
    for turn in TURNS:
        prompt_lengths.append(len(engine.tokenizer.encode(protocol.prompt(session._pairs(), turn))))
        before = engine.stats().prefill_tokens
        code = session.ask(turn, on_text=streamed.append)
        computed.append(engine.stats().prefill_tokens - before)
        assert "".join(streamed) == code
        streamed.clear()
    assert session.program == mtpb.assemble(TURNS, engine, 24, params=greedy)
    block = engine.prefix_cache.block_tokens
    for i in (1, 2):  # a later turn computes its new tokens (and a block or two at the seams), not its history
        assert computed[i] <= prompt_lengths[i] - prompt_lengths[i - 1] + 2 * block, (computed, prompt_lengths)
        assert computed[i] + block <= prompt_lengths[i]


def test_a_turn_stops_generating_as_soon_as_its_cut_is_known(engine):
    writer = EngineWriter(engine)
    params = GenerationParams(max_new_tokens=200, temperature=1.0, seed=1)
    full = engine.submit(HEADER + "# x\n", params).result().outputs[0]
    code = writer.write(HEADER + "# x\n", params)
    assert code == cut_turn(full.text)
    if len(code) < len(full.text):  # the cut came before the token limit: far fewer tokens were generated
        assert engine.stats().running == 0


def test_retry_on_an_engine_draws_new_seeds_and_a_seeded_session_is_reproducible(engine):
    params = GenerationParams(max_new_tokens=12, temperature=1.0, seed=4)
    first = Session(engine, params=params)
    again = Session(engine, params=params)
    codes = [first.ask(t) for t in TURNS[:2]]
    assert [again.ask(t) for t in TURNS[:2]] == codes
    retried = {first.retry() for _ in range(3)}
    assert first.turns[-1].attempts == 4 and retried - {codes[1]}  # new samples, not the same one again


def test_concurrent_mtpb_conversations_give_the_programs_of_one_at_a_time(engine, tmp_path):
    rows = [{"id": str(i), "name": "p", "category": "c", "prompts": TURNS[: 1 + i % 3], "inputs": [{}, {}],
             "outputs": [0, 0], "max_gen_length": 10} for i in range(4)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = mtpb.load_mtpb(tmp_path / "m.jsonl")
    params = dataclasses.replace(mtpb.DEFAULT_PARAMS, temperature=1.0)
    together = mtpb.assemble_runs(data, engine, 2, progress=False, params=params)  # 8 conversations at once
    alone = mtpb.assemble_runs(data, engine, 2, progress=False, params=params, concurrency=1)
    assert [r["program"] for r in together] == [r["program"] for r in alone]
    assert len({r["program"] for r in together}) > 4  # the samples differ
    # and each is what generating every turn to its limit, then cutting, gives (the path before)
    for r in together[:6]:
        problem = next(p for p in data.problems if p.id == r["problem"])
        history = []
        for number, turn in enumerate(problem.turns(r["case"]), 1):
            seeded = dataclasses.replace(params, max_new_tokens=10,
                                         seed=derive_seed(params.seed, problem.id, r["case"], r["sample"], number, 0))
            text = engine.submit(protocol.prompt(history, turn), seeded).result().outputs[0].text
            history.append((turn, cut_turn(text)))
        assert protocol.program(history) == r["program"]


def test_a_failed_retry_keeps_the_turn_and_load_names_the_model_it_continues_with(tmp_path):
    script = Scripted({"Set x.": ["x = 1"]})
    session = Session(script, model_name="first")
    session.ask("Set x.")

    def broken(prompt, max_new_tokens):
        raise KeyboardInterrupt

    session.writer.call = broken
    with pytest.raises(KeyboardInterrupt):
        session.retry()
    assert [(t.code, t.attempts) for t in session.turns] == [("x = 1", 1)]
    session.save(tmp_path / "s.json")
    model = CodeGenForCausalLM.from_pretrained("codegen-lm-mini")
    model.name_or_path = "second"
    loaded = Session.load(tmp_path / "s.json", model, CodeGenTokenizerFast.from_pretrained("codegen-lm-mini"))
    assert (loaded.model_name, loaded.saved_model) == ("second", "first")
    Session(script).save(tmp_path / "none.json")  # a completion function has no name
    with pytest.raises(SessionFileError, match="names no model"):
        Session.load(tmp_path / "none.json")


def test_an_interrupted_run_does_not_leak_its_result_into_the_next():
    import signal

    from codegen_lm.conversation import ProgramRunner

    class Interrupt(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupt

    with ProgramRunner() as runner:
        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with pytest.raises(Interrupt):
                runner.run("import time\ntime.sleep(3)\nprint('old program')")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert runner.run("print('new program')").stdout == "new program\n"
