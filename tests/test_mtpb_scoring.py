"""MTPB scoring, program by program, as CodeGen's own scorer (codegen1/benchmark/mtpb_exec.py) scores.

Every expected verdict below is written out from the original's code (rewrite_ast_with_print, the
exec globals with their own `print`, do_exec catching Exception, the 20 s SIGALRM, check_equivalence,
reliability_guard), not computed by our code. Programs run in the real sandbox, batched into one
`score_runs` call (2 s timer instead of 20 s, so the hanging programs cost 2-4 s).
"""

from __future__ import annotations

import json

import pytest

from codegen_lm.evaluation import mtpb

H = mtpb.HEADER

# (name, program after the header, expected output (JSON data), the original's verdict)
SCORING = [
    # -- the last statement (rewrite_ast_with_print) --
    ("final assignment is printed", "x = 6 * 7", 42, True),
    ("final augmented assignment: its value is printed, then += None raises", "x = 41\nx += 1", 1, True),
    ("bare last expression is printed", "s = 'ab'\ns.upper()", "AB", True),
    ("attribute call .print(...) is wrapped", "class P:\n    def print(self, v):\n        return 2 * v\nP().print(5)",
     10, True),
    ("printf(...) last is left alone", "def printf(v):\n    pass\nprint(1)\nprintf(2)", 1, True),
    ("print_result(...) last is left alone", "def print_result(v):\n    return v\nprint(3)\nprint_result(4)", 3, True),
    ("assignment of a print* call is left alone", "def print_value(v):\n    return v\nprint(1)\ny = print_value(3)",
     1, True),
    ("annotation without value: unchanged", "print(5)\nx: int", 5, True),
    ("last statement without .value: unchanged", "print(8)\nfor i in range(2):\n    pass", 8, True),
    ("unparsable program: unchanged, prints nothing", "print(9)\ndef f(:", 9, False),
    ("final print() has no first argument", "print(5)\nprint()", 5, False),
    ("first argument of the last print", "print(1)\nprint(2, 3)", 2, True),
    # -- only the program's own print is recorded --
    ("a module's function printing is not recorded",
     "import types\nm = types.ModuleType('helper')\nexec('def f(v):\\n    print(v)', m.__dict__)\nprint(1)\n"
     "if True:\n    m.f(2)", 1, True),
    ("builtins.print is not recorded", "import builtins\nprint(1)\nif True:\n    builtins.print(2)", 1, True),
    ("a final library print is wrapped: its None is printed", "import builtins\nprint(1)\nbuiltins.print(2)", 1,
     False),
    ("prints inside the program's functions are recorded", "def show(v):\n    print(v)\nfor v in [4]:\n    show(v)",
     4, True),
    ("the live object is compared after the program ends", "x = [1]\nprint(x)\nif True:\n    x.append(2)", [1, 2],
     True),
    ("__main__ blocks run", "if __name__ == '__main__':\n    print(5)", 5, True),
    ("`builtins` is a global of the program", "print(builtins.__name__)", "builtins", True),
    # -- check_equivalence on live objects --
    ("range cast to list", "print(range(3))", [0, 1, 2], True),
    ("map cast to list", "print(map(str, [1, 2]))", ["1", "2"], True),
    ("dict_keys cast to list", "print({'a': 1, 'b': 2}.keys())", ["a", "b"], True),
    ("Fraction cast to float", "from fractions import Fraction\nprint(Fraction(1, 2))", 0.5, True),
    ("expected None always fails", "print(None)", None, False),
    ("expected dict always fails", "print({'a': 1})", {"a": 1}, False),
    ("bool vs 'True' compared as strings", "print('True')", True, True),
    ("1 vs True compared as strings", "print(1)", True, False),
    ("True cast to int", "print(True)", 1, True),
    ("list: no float tolerance", "print([1.0000001, 2.0])", [1.0, 2.0], False),
    ("float just inside the tolerance", "print(9.99999e-7)", 0.0, True),
    ("float at the tolerance: strict <", "print(1e-6)", 0.0, False),
    ("int cast of a float truncates", "print(2.7)", 2, True),
    ("str cast of a list", "print([1, 2])", "[1, 2]", True),
    ("a cast that raises fails", "print('x')", 3, False),
    ("list of tuples made lists", "print([(1, 2), (3, 4)])", [[1, 2], [3, 4]], True),
    ("list of tuples with a non-tuple fails", "print([(1, 2), 3])", [[1, 2], 3], False),
    ("numpy int64 made int", "print(np.int64(3))", 3, True),
    ("numpy float32 made float before the str cast", "print(np.float32(0.1))", "0.1", False),
    ("numpy bool_ made bool", "print(np.bool_(False))", False, True),
    ("ndarray made list before the str cast", "print(np.array([1, 2]))", "[1, 2]", True),
    ("ndarray: no float tolerance", "print(np.array([1.0000001]))", [1.0], False),
    ("pandas Series compared with np.allclose",
     "class Series:\n    def to_numpy(self):\n        return np.array([1.0, 2.0])\n"
     "Series.__module__ = 'pandas.core.series'\nprint(Series())", [1.0, 2.0000001], True),
    # -- exceptions and the timer --
    ("print then raise passes", "print(7)\nraise RuntimeError('after printing')", 7, True),
    ("print then sleep past the timer passes", "print(3)\nimport time\ntime.sleep(60)", 3, True),
    ("print then spin past the timer passes", "print(3)\nwhile True:\n    pass", 3, True),
    ("spin without printing fails", "while True:\n    pass", 3, False),
    ("a program that swallows the timer is killed", "print(3)\nimport time\nwhile True:\n    try:\n"
     "        time.sleep(60)\n    except Exception:\n        pass", 3, False),
    ("sys.exit after printing is judged on the print", "import sys\nprint(4)\nsys.exit(0)", 4, True),
    # -- the guard (reliability_guard) --
    ("os.remove is None", "import os\ntry:\n    os.remove('f')\nexcept TypeError as e:\n    print(str(e))",
     "'NoneType' object is not callable", True),
    ("os/shutil/subprocess functions are None",
     "import os, shutil, subprocess\nprint(os.getcwd is None and shutil.rmtree is None and subprocess.Popen is None)",
     True, True),
    ("exit and quit are None, help is not", "print(exit is None and quit is None and help is not None)", True, True),
    ("resource is blocked",
     "try:\n    import resource\n    print('imported')\nexcept ImportError:\n    print('blocked')", "blocked", True),
    ("psutil is not blocked", "import sys\nprint(sys.modules.get('psutil', 'absent') is not None)", True, True),
    ("OMP_NUM_THREADS is 1", "import os\nprint(os.environ['OMP_NUM_THREADS'])", "1", True),
    ("the original's recursion limit", "def f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\nprint(f(1100))",
     1100, False),
    ("recursion within it", "def f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\nprint(f(900))", 900, True),
]


@pytest.fixture(scope="module")
def scored():
    runs = [{"problem": name, "category": "t", "case": 0, "sample": 0, "program": H + body, "expected": expected}
            for name, body, expected, _ in SCORING]
    return {r["problem"]: r for r in mtpb.score_runs(runs, timeout=2.0, workers=4, progress=False)}


@pytest.mark.parametrize(("name", "verdict"), [(s[0], s[3]) for s in SCORING])
def test_verdict_is_the_original_scorers(scored, name, verdict):
    run = scored[name]
    assert run["passed"] is verdict, run


def test_verdict_details(scored):
    assert scored["final print() has no first argument"]["failure"] == "the last print() has no arguments"
    assert scored["unparsable program: unchanged, prints nothing"]["failure"] == "printed nothing"
    assert "SyntaxError" in scored["unparsable program: unchanged, prints nothing"]["error"]
    assert scored["print then sleep past the timer passes"]["error"] == "timed out after 2 s"
    assert scored["print then raise passes"]["error"] == "RuntimeError: after printing"
    assert scored["sys.exit after printing is judged on the print"]["error"] == "sys.exit(0)"
    assert scored["range cast to list"]["predicted"] == "range(0, 3)"
    assert "unsupported type dict" in scored["expected dict always fails"]["failure"]
    killed = scored["a program that swallows the timer is killed"]
    assert killed["predicted"] is None and "timed out" in killed["error"]


# The original's rewrite_ast_with_print, on its own: (program, what it runs).
REWRITES = [
    ("x = 5", "x = print(5)"),
    ("x: int = 5", "x: int = print(5)"),
    ("x: int", "x: int"),
    ("x += 1", "x += print(1)"),
    ("a = b = 3", "a = b = print(3)"),
    ("x = [1,\n 2]", "x = print([1, 2])"),
    ("f(2)\n# c", "print(f(2))"),
    ("obj.print(3)", "print(obj.print(3))"),
    ("printf(1)", "printf(1)"),
    ("print_result(x)  # kept as written", "print_result(x)  # kept as written"),
    ("y = print_x(3)", "y = print_x(3)"),
    ("print()", "print()"),
    ("def f():\n    return 1", "def f():\n    return 1"),
    ("import os", "import os"),
    ("pass", "pass"),
    ("", ""),
    ("# only a comment\n", "# only a comment\n"),
    ("def f(:", "def f(:"),
]


@pytest.mark.parametrize(("code", "rewritten"), REWRITES)
def test_last_statement_rewrite(code, rewritten):
    assert mtpb.print_last_statement(code) == rewritten


def test_matches_in_process():
    assert mtpb.matches(range(3), [0, 1, 2]) and mtpb.matches({"a": 1}.keys(), ["a"])
    assert not mtpb.matches(None, None) and not mtpb.matches({"a": 1}, {"a": 1})
    assert mtpb.matches("6", 6) and mtpb.matches(6, "6") and mtpb.matches((1, 2), [1, 2])
    assert not mtpb.matches([1.0000000001, 2], [1.0, 2])


# ---- data, assembly, completion functions ------------------------------------------------------------

ROWS = [
    # the real file's problem 57 has 6 outputs for 5 inputs; the original zips them (5 test cases)
    {"id": "57", "name": "six outputs", "category": "math", "prompts": ["Print {a}."],
     "inputs": [{"a": i} for i in range(5)], "outputs": [0, 1, 2, 3, 4, 5]},
    {"id": "long", "name": "too long", "category": "math", "prompts": ["Print 7.", "Padding " * 40 + "{a}."],
     "inputs": [{"a": 7}], "outputs": [7]},
    {"id": "idx", "name": "index of a list", "category": "str", "prompts": ["Print {a[0]}."],
     "inputs": [{"a": [3, 4]}], "outputs": [3]},
    {"id": "bad-index", "category": "str", "prompts": ["Print {a[0]}."], "inputs": [{"a": 3}], "outputs": [3]},
    {"id": "bad-attr", "category": "str", "prompts": ["Print {a.x}."], "inputs": [{"a": 3}], "outputs": [3]},
    {"id": "huge-width", "category": "str", "prompts": ["Print {a:>900000000}."], "inputs": [{"a": 3}],
     "outputs": [3]},
    {"id": "huge-nested-width", "category": "str", "prompts": ["Print {a:>{w}}."],
     "inputs": [{"a": 3, "w": 900000000}], "outputs": [3]},
    {"id": "width", "category": "str", "prompts": ["Print {a:>3}."], "inputs": [{"a": 3}], "outputs": [3]},
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "mtpb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return path


def test_data_faults_reported_and_zip_pairs_scored(data_file):
    data = mtpb.load_mtpb(data_file)
    assert [p.id for p in data.problems] == ["57", "long", "idx", "width"]
    six = data.problems[0]
    assert len(six.inputs) == len(six.outputs) == 5 and six.outputs == [0, 1, 2, 3, 4]
    issues = {i.problem_id: str(i) for i in data.issues}
    assert "6 outputs for 5 inputs" in issues["57"] and "scored on the first 5" in issues["57"]
    assert "TypeError" in issues["bad-index"] and issues["bad-index"].endswith("skipped")
    assert "AttributeError" in issues["bad-attr"]
    assert "900000000" in issues["huge-width"] and "900000000" in issues["huge-nested-width"]
    assert data.problems[2].turns(0) == ["Print 3."] and data.problems[3].turns(0) == ["Print   3."]
    assert mtpb.template_fault("{0}", {}) is not None and mtpb.template_fault("{a!x}", {"a": 1}) is not None


def answer(prompt: str) -> str:
    """A perfect model for ROWS: the turn says what to print."""
    turn = prompt.rstrip("\n").splitlines()[-1]
    return f"print({turn.split()[-1].rstrip('.')})\n\n\n# next" if turn.startswith("# Print") else "pass"


def limited(prompt: str) -> str:
    """A completion function whose model has a context of 200 characters."""
    if len(prompt) > 200:
        raise mtpb.PromptTooLong(f"prompt of {len(prompt)} characters")
    return answer(prompt)


def test_too_long_prompt_fails_that_program_only(data_file, tmp_path):
    data = mtpb.load_mtpb(data_file)
    summary = mtpb.evaluate_mtpb(data, limited, tmp_path / "out", samples=2, timeout=2.0, workers=2,
                                 progress=False)
    assert summary["runs"] == 2 * (5 + 1 + 1 + 1) and summary["not_assembled"] == 2
    assert summary["per_problem"]["long"]["passed"] == 0
    assert summary["per_problem"]["57"]["pass_rate"] == 1.0 and summary["per_problem"]["idx"]["pass_rate"] == 1.0
    assert any("6 outputs for 5 inputs" in i for i in summary["data_issues"])
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    long = [r for r in rows if r["problem"] == "long"]
    assert all(not r["passed"] and "prompt too long at turn 2: prompt of" in r["error"] for r in long)
    assert {r["predicted"] for r in rows if r["problem"] == "57"} == {"0", "1", "2", "3", "4"}


def test_an_engine_turns_a_too_long_prompt_into_prompt_too_long(tokenizer_dir):
    import torch

    from codegen_lm import CodeGenConfig, CodeGenForCausalLM, CodeGenTokenizerFast
    from codegen_lm.conversation import EngineWriter
    from codegen_lm.engine import Engine, GenerationParams

    torch.manual_seed(0)
    model = CodeGenForCausalLM(CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, n_positions=256)).eval()
    engine = Engine(model, CodeGenTokenizerFast.from_pretrained(tokenizer_dir), max_batch=2)
    assert isinstance(EngineWriter(engine).write(H + "# Print 7.\n", GenerationParams(max_new_tokens=2)), str)
    with pytest.raises(mtpb.PromptTooLong, match="does not fit the context of 256"):
        mtpb.assemble(["word " * 300], engine, 2)
    built = mtpb.converse(["Print 7.", "word " * 300], engine, GenerationParams(max_new_tokens=2))
    assert built.error.startswith("prompt too long at turn 2") and built.attempts == 1


def test_completion_functions_get_the_problems_max_gen_length():
    seen = []

    def defaulted(prompt, max_new_tokens=256):
        seen.append(("defaulted", max_new_tokens))
        return "pass"

    def keyword_only(prompt, *, max_new_tokens=256):
        seen.append(("keyword", max_new_tokens))
        return "pass"

    def one(prompt):
        seen.append(("one", None))
        return "pass"

    for fn in (defaulted, keyword_only, one):
        mtpb.assemble(["a"], fn, 512)
    assert seen == [("defaulted", 512), ("keyword", 512), ("one", None)]


# Single-turn: (completion, the program part kept).
PROGRAM_CUTS = [
    ("x = 1\n# Sum it.\ny = x + 1\nprint(y)\n", "x = 1\n# Sum it.\ny = x + 1\nprint(y)\n"),  # comments stay
    ("def f():\n    return 1\n\n\ndef g():\n    return 2\n\n\nprint(f() + g())",
     "def f():\n    return 1\n\n\ndef g():\n    return 2\n\n\nprint(f() + g())"),  # PEP 8 spacing stays
    ("print(1)\nprint(2)\nif __name__ == '__main__':\n    print(3)", "print(1)\nprint(2)\nif __name__ == '__main__':\n"
     "    print(3)"),  # further prints and __main__ blocks stay
    ("print(1)\n\n\n\nprint('junk')", "print(1)"),  # three blank lines end it
    ("print(1)<|endoftext|>junk", "print(1)"),
    ("print(1)\n# Import libraries.\n\nimport numpy as np\n", "print(1)\n"),
    ("print(1)\n'''Another file.'''\n", "print(1)\n"),
    ('print(1)\n"""Another file."""\n', "print(1)\n"),
]


@pytest.mark.parametrize(("completion", "kept"), PROGRAM_CUTS)
def test_single_turn_whole_program_cut(completion, kept):
    assert mtpb.truncate_program(completion) == kept


def test_single_turn_assembly_uses_the_whole_program_rule():
    completion = "x = 1\n# Then y.\ny = 2\n\n\ndef f():\n    return y\n\n\nprint(f())\n\n\n\n# junk"
    program = mtpb.assemble(["Set x.", "Print y."], lambda prompt, n: completion, 64, single_turn=True)
    assert program == H + "# Set x.\n# Print y.\n" + completion.split("\n\n\n\n")[0] + "\n\n"
