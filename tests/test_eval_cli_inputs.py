"""`codegen-lm eval`: bad inputs are one clear line before anything expensive runs, and a killed
HumanEval run resumes to exactly the samples an uninterrupted run makes."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time

import pytest

from codegen_lm.cli import evaluate as eval_cli
from codegen_lm.evaluation import humaneval

from .test_cli import run_cli


@pytest.fixture(scope="module")
def problems():
    return humaneval.load_problems()


@pytest.fixture
def files(tmp_path, problems):
    """Damaged and odd input files, by name."""
    two = {t: problems[t] for t in ("HumanEval/0", "HumanEval/1")}
    rows = [{"task_id": t, "completion": "    return None\n"} for t in two for _ in range(30)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    made = {
        "file": tmp_path / "a-file.txt",
        "notgz": tmp_path / "samples.jsonl.gz",
        "badgz": tmp_path / "corrupt.jsonl.gz",
        "cutgz": tmp_path / "cut.jsonl.gz",
        "latin1": tmp_path / "latin1.jsonl",
        "png": tmp_path / "image.png",
        "unknown": tmp_path / "unknown.jsonl",
        "torn": tmp_path / "torn.jsonl",
        "empty": tmp_path / "empty.jsonl",
        "problems": tmp_path / "problems.jsonl",
        "notest": tmp_path / "no-test.jsonl",
        "badentry": tmp_path / "bad-entry.jsonl",
        "mtpb": tmp_path / "mtpb.jsonl",
        "resume": tmp_path / "resume",
    }
    made["file"].write_text("not a folder\n")
    made["notgz"].write_text(text)
    made["badgz"].write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(200)))
    whole = gzip.compress(text.encode())
    made["cutgz"].write_bytes(whole[: len(whole) // 2])
    made["latin1"].write_bytes(text.splitlines(keepends=True)[0].encode()
                               + '{"task_id": "HumanEval/0", "completion": "caf\u00e9"}\n'.encode("latin-1"))
    made["png"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    made["unknown"].write_text(text.splitlines(keepends=True)[0] + '{"task_id": "HumanEval/999", "completion": ""}\n')
    made["torn"].write_text("".join(text.splitlines(keepends=True)[:2]) + '{"task_id": "HumanEval/0", "comp')
    made["empty"].write_text("\n")
    made["problems"].write_text("".join(json.dumps(p) + "\n" for p in two.values()))
    made["notest"].write_text(json.dumps({k: v for k, v in two["HumanEval/0"].items() if k != "test"}) + "\n")
    made["badentry"].write_text(json.dumps({**two["HumanEval/0"], "entry_point": 3}) + "\n")
    made["mtpb"].write_text(json.dumps({"id": "1", "name": "n", "category": "c", "prompts": ["Print {x}."],
                                        "inputs": [{"x": 1}], "outputs": [1]}) + "\n")
    made["resume"].mkdir()
    first = text.splitlines(keepends=True)[0]
    (made["resume"] / "samples.jsonl").write_text(first + "{broken\n" + first)  # damaged, not cut off
    return made


HE = ["eval", "humaneval", "--model", "/no/such/model", "--no-progress"]  # every error must come before loading it
EX = ["eval", "execute"]
MT = ["eval", "mtpb", "--data", "{mtpb}", "--model", "/no/such/model", "--no-progress"]

CASES = [
    # --out
    ("out-is-a-file", [*HE, "--out", "{file}"], "--out {file} is a file, not a folder"),
    ("out-under-a-file", [*HE, "--out", "{file}/sub"], "--out {file}/sub: cannot create the folder (Not a directory)"),
    ("execute-out-is-a-file", [*EX, "{problems}", "--out", "{file}"], "--out {file} is a file, not a folder"),
    ("mtpb-out-is-a-file", [*MT, "--out", "{file}"], "--out {file} is a file, not a folder"),
    # numbers
    ("timeout-inf", [*HE, "--out", "{tmp}/o", "--timeout", "inf"], "--timeout: inf is out of range: must be "),
    ("timeout-1e300", [*HE, "--out", "{tmp}/o", "--timeout", "1e300"],
     "--timeout: 1e300 is out of range: must be > 0 and <= 3600 seconds per program"),
    ("timeout-nan", [*EX, "{problems}", "--out", "{tmp}/o", "--timeout", "nan"], "--timeout: nan is out of range"),
    ("mtpb-timeout-1e300", [*MT, "--out", "{tmp}/o", "--timeout", "1e300"], "--timeout: 1e300 is out of range"),
    ("n-1e9", [*HE, "--out", "{tmp}/o", "--n", "1e9"], "--n/--num-samples: 1e9 is out of range: must be in 1..100000"),
    ("n-10**9", [*HE, "--out", "{tmp}/o", "--num-samples", "1000000000"],
     "1000000000 is out of range: must be in 1..100000 samples per problem"),
    ("n-fraction", [*HE, "--out", "{tmp}/o", "--n", "2.5"], "--n/--num-samples: expected an integer, got '2.5'"),
    ("batch-1e9", [*HE, "--out", "{tmp}/o", "--batch", "1e9"], "--batch: 1e9 is out of range: must be in 1..4096"),
    ("samples-1e9", [*MT, "--out", "{tmp}/o", "--samples", "1e9"],
     "--samples: 1e9 is out of range: must be in 1..10000 samples per test case"),
    ("workers-1e9", [*HE, "--out", "{tmp}/o", "--workers", "1e9"], "--workers 1000000000 is more than"),
    ("execute-workers-0", [*EX, "{problems}", "--out", "{tmp}/o", "--workers", "0"], "--workers: 0 is out of range"),
    ("temperature-inf", [*HE, "--out", "{tmp}/o", "--temperature", "inf"],
     "--temperature: inf is out of range: must be a finite number"),
    ("prefix-cache-inf", [*HE, "--out", "{tmp}/o", "--prefix-cache-mb", "inf"],  # (cli/common.py may refuse it)
     ("--prefix-cache-mb", " inf ", "finite number")),
    ("wait-hours-0", [*MT, "--out", "{tmp}/o", "--wait-hours", "0"], "--wait-hours: 0 is out of range"),
    ("exec-guided-0", [*MT, "--out", "{tmp}/o", "--exec-guided", "0"],
     "--exec-guided: 0 is out of range: must be in 1..100 attempts per turn"),
    ("mtpb-batch-0", [*MT, "--out", "{tmp}/o", "--batch", "0"], "--batch: 0 is out of range: must be in 1..4096"),
    # samples files
    ("not-gzip", [*EX, "{notgz}", "--out", "{tmp}/o"], "{notgz}: not gzip data, though its name ends in .gz"),
    ("corrupt-gzip", [*EX, "{badgz}", "--out", "{tmp}/o"], "{badgz}: not valid gzip data"),
    ("truncated-gzip", [*EX, "{cutgz}", "--out", "{tmp}/o"],
     "{cutgz}: the gzip data is cut off (the file is truncated)"),
    ("not-utf8", [*EX, "{latin1}", "--out", "{tmp}/o"], "{latin1}, line 2: not UTF-8 text (byte 0xe9 at position 46)"),
    ("binary", [*EX, "{png}", "--out", "{tmp}/o"], "{png}, line 1: not UTF-8 text (byte 0x89 at position 1)"),
    ("unknown-task", [*EX, "{unknown}", "--out", "{tmp}/o"],
     "{unknown}, line 2: task_id 'HumanEval/999' is not one of the problems"),
    ("torn-when-scoring", [*EX, "{torn}", "--out", "{tmp}/o"],
     "{torn}, line 3: not valid JSON (Unterminated string starting at column 28); the file ends inside this line"),
    ("empty-samples", [*EX, "{empty}", "--out", "{tmp}/o"], "{empty}: no samples in it"),
    ("bad-line-before-the-last", [*HE, "--out", "{resume}"], "{resume}/samples.jsonl, line 2: not valid JSON"),
    # problem files
    ("problem-without-test", [*EX, "{notgz}", "--problem-file", "{notest}", "--out", "{tmp}/o"],
     "{notest}, line 1: problem HumanEval/0 has no 'test' field"),
    ("entry-point-not-a-string", [*EX, "{notgz}", "--problem-file", "{badentry}", "--out", "{tmp}/o"],
     "{badentry}, line 1: problem HumanEval/0: 'entry_point' must be a string, not int"),
    ("problem-file-is-binary", [*EX, "{notgz}", "--problem-file", "{png}", "--out", "{tmp}/o"],
     "{png}, line 1: not UTF-8 text"),
]


@pytest.mark.parametrize("argv,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_any_work(capsys, tmp_path, files, argv, message):
    names = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path)}
    start = time.perf_counter()
    code, _, err = run_cli(capsys, *(a.format(**names) for a in argv))
    assert code != 0
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("codegen-lm: error:"), err
    for part in (message,) if isinstance(message, str) else message:
        assert part.format(**names) in lines[0] + " "
    assert time.perf_counter() - start < 30  # nothing was loaded, sampled or executed


def test_a_batch_that_does_not_fit_is_refused_before_sampling(capsys, tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(eval_cli, "_free_memory", lambda device: 100 * 2**20)
    code, _, err = run_cli(capsys, "eval", "humaneval", "--model", str(tiny_checkpoint), "--problems", "0",
                           "--n", "4096", "--batch", "4096", "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("codegen-lm: error: --batch 4096: the KV cache needs about ")
    assert "more than the 0.1 GiB free; use --batch" in err
    assert not (tmp_path / "o" / "samples.jsonl").exists()


def test_sample_log_keeps_a_last_line_without_newline_and_drops_a_torn_one(tmp_path, problems):
    subset = {t: problems[t] for t in ("HumanEval/0", "HumanEval/1")}
    path = tmp_path / "samples.jsonl"
    path.write_text('{"task_id": "HumanEval/0", "completion": "a"}')  # complete, but its newline never came
    warnings: list[str] = []
    log = humaneval.SampleLog(path, warn=warnings.append)
    log.fill(subset, lambda prompt: "b", 2, progress=False)
    assert not warnings
    assert [json.loads(x)["completion"] for x in path.read_text().splitlines()] == ["a", "b", "b", "b"]
    with open(path, "a") as f:
        f.write('{"task_id": "HumanEval/1", "completion": "cut')
    log = humaneval.SampleLog(path, warn=warnings.append)
    assert warnings == [f"{path}, line 5: cut off (the run writing it was stopped); dropped, its sample is made again"]
    log.fill(subset, lambda prompt: "c", 2, progress=False)
    assert [json.loads(x)["completion"] for x in path.read_text().splitlines()] == ["a", "b", "b", "b"]
    log.fill(subset, lambda prompt: "c", 3, progress=False)
    assert path.read_text().endswith('"completion": "c"}\n') and len(humaneval.read_samples(path)) == 6


def test_a_killed_run_resumes_to_the_uninterrupted_samples(capsys, tmp_path, tiny_checkpoint):
    """Kill a real run while it writes samples (between the chunks of a problem, with --batch 2), cut its
    last line in half, run again: the samples are those of a run that was never stopped."""
    common = ["eval", "humaneval", "--model", str(tiny_checkpoint), "--problems", "0-3", "--n", "4",
              "--temperature", "0.8", "--max-new-tokens", "16", "--k", "1,4", "--threads", "1", "--no-progress"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    code, _, err = run_cli(capsys, *common, "--out", str(reference))
    assert code == 0, err
    expected = (reference / "samples.jsonl").read_bytes()
    assert expected.count(b"\n") == 16

    samples = killed / "samples.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "codegen_lm", *common, "--batch", "2", "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if samples.exists() and samples.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    proc.kill()
    _, stderr = proc.communicate()
    assert proc.returncode == -9, stderr.decode()  # it was still sampling
    made = samples.read_bytes()
    assert 2 <= made.count(b"\n") < 16 and expected.startswith(made.rsplit(b"\n", 1)[0])
    with open(samples, "ab") as f:
        f.write(b'{"task_id": "HumanEval/3", "completion": "    ret')  # as a kill mid-write leaves it
    torn_line = made.count(b"\n") + 1

    code, _, err = run_cli(capsys, *common, "--out", str(killed))
    assert code == 0, err
    assert err.splitlines() == [f"codegen-lm: warning: {samples}, line {torn_line}: cut off (the run writing it was "
                                f"stopped); dropped, its sample is made again"]
    assert samples.read_bytes() == expected
    results = [json.loads(line) for line in (killed / "results.jsonl").read_text().splitlines()]
    assert len(results) == 16 and all("passed" in r for r in results)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["samples"] == 16 and summary["problems"] == 4
    assert summary["per_problem"] == json.loads((reference / "summary.json").read_text())["per_problem"]
