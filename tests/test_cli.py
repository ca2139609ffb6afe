"""The `codegen-lm` command line: generate and info, and one-line errors."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.cli import main


def run_cli(capsys, *argv: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def expected(tiny_checkpoint):
    """Greedy completion of the prompt used below, computed through the library."""
    model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    tok = CodeGenTokenizerFast.from_pretrained(tiny_checkpoint)
    ids = tok("def add(a, b):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=12)
    return tok.decode(out[0, ids.shape[1] :])


def test_generate_prints_prompt_and_greedy_completion(capsys, tiny_checkpoint, expected):
    code, out, err = run_cli(capsys, "generate", "def add(a, b):", "--model", str(tiny_checkpoint),
                             "--max-new-tokens", "12")
    assert code == 0, err
    assert out == "def add(a, b):" + expected + "\n"


def test_generate_streams_the_same_text_from_stdin(capsys, monkeypatch, tiny_checkpoint, expected):
    code, out, err = run_cli(capsys, "generate", "-", "--model", str(tiny_checkpoint), "--max-new-tokens", "12",
                             "--stream", "--completion-only", stdin="def add(a, b):", monkeypatch=monkeypatch)
    assert code == 0, err
    assert out == expected + "\n"


def test_generate_stop_strings_and_samples(capsys, tiny_checkpoint, expected):
    stop = expected[3:5]
    code, out, err = run_cli(capsys, "generate", "def add(a, b):", "--model", str(tiny_checkpoint),
                             "--max-new-tokens", "12", "--stop", stop, "--completion-only")
    assert code == 0, err
    assert out == expected[: expected.index(stop)] + "\n"
    args = ["generate", "def add(a, b):", "--model", str(tiny_checkpoint), "--max-new-tokens", "6",
            "--temperature", "0.8", "--top-p", "0.9", "--top-k", "40", "--num-samples", "3", "--seed", "1"]
    code, first, err = run_cli(capsys, *args)
    assert code == 0, err
    assert first.count("===== sample") == 3
    assert run_cli(capsys, *args)[1] == first  # --seed makes it repeatable


def test_generate_escapes_and_dtype(capsys, tiny_checkpoint):
    code, out, err = run_cli(capsys, "generate", "x = 1", "--model", str(tiny_checkpoint), "--max-new-tokens", "3",
                             "--dtype", "bfloat16", "--stop", "\\n")
    assert code == 0, err
    assert out.startswith("x = 1") and "\n" not in out[:-1]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "x", "--model", "/no/such/folder"], "/no/such/folder: no such folder"),
        (["generate", "x", "--model", "not a model"], "neither an existing folder nor a hub repository name"),
        (["generate", "x", "--model", "M", "--temperature", "-1"], "--temperature: -1 is out of range"),
        (["generate", "x", "--model", "M", "--top-p", "0"], "--top-p: 0 is out of range: must be in (0, 1]"),
        (["generate", "x", "--model", "M", "--max-new-tokens", "ten"], "--max-new-tokens: expected an integer"),
        (["generate", "x", "--model", "M", "--dtype", "int4"], "argument --dtype: invalid choice: 'int4'"),
        (["generate", "x", "--model", "M", "--kernels", "fast"], "argument --kernels: invalid choice: 'fast'"),
        (["generate", "x", "--model", "M", "--matmul-dtype", "int4"], "argument --matmul-dtype: invalid choice"),
        (["generate", "x", "--model", "M", "--num-samples", "2"], "--num-samples > 1 needs --temperature > 0"),
        (["generate", "", "--model", "M"], "the prompt is empty"),
        (["info", "/no/such/folder"], "/no/such/folder: no such folder"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_errors_are_one_clear_line(capsys, argv, message):
    code, _out, err = run_cli(capsys, *argv)
    assert code != 0
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_checkpoint_folder_is_one_line(capsys, tiny_checkpoint, tmp_path):
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")
    code, _, err = run_cli(capsys, "generate", "x", "--model", str(tmp_path))
    assert code == 1 and "no model weights found" in err and err.count("\n") == 1


def test_info_reads_headers_and_released_names(capsys, tiny_checkpoint):
    code, out, err = run_cli(capsys, "info", str(tiny_checkpoint), "--json")
    assert code == 0, err
    info = json.loads(out)
    model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    assert info["parameters"] == model.num_parameters()
    assert info["bytes"] == 4 * model.num_parameters() and info["dtype"] == "float32"
    assert info["config"]["n_layer"] == 2 and info["head_dim"] == 16
    code, out, err = run_cli(capsys, "info", "Salesforce/codegen-350M-mono")
    assert code == 0, err
    assert "356,712,448" in out and "float16" in out


def test_console_script_and_random_weights(tmp_path):
    exe = shutil.which("codegen-lm")
    assert exe, "the codegen-lm console script is installed"
    out = subprocess.run([exe, "generate", "def f():", "--model", "Salesforce/codegen-350M-mono", "--random-weights",
                          "--max-new-tokens", "2", "--seed", "0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def f():")


def test_generate_int8_and_speculative(capsys, tiny_checkpoint, expected):
    code, out, err = run_cli(capsys, "generate", "def add(a, b):", "--model", str(tiny_checkpoint),
                             "--max-new-tokens", "12", "--speculative", "prompt-lookup", "--threads", "1")
    assert code == 0, err
    assert out == "def add(a, b):" + expected + "\n"  # speculative greedy is plain greedy
    assert "speculative decoding accepted" in err
    code, out, err = run_cli(capsys, "generate", "def add(a, b):", "--model", str(tiny_checkpoint),
                             "--max-new-tokens", "12", "--quantize", "int8")
    assert code == 0, err
    assert out.startswith("def add(a, b):")
    code, out, err = run_cli(capsys, "generate", "x", "--model", str(tiny_checkpoint), "--speculative",
                             "/no/such/draft")
    assert code == 1 and "--speculative /no/such/draft" in err


def test_generate_with_forced_kernels_and_int8_products(capsys, tiny_checkpoint, expected):
    """--kernels forces a family without changing greedy output; --matmul-dtype int8 runs every
    product int8 x int8 (its text may differ: it is only checked to be a completion)."""
    for kernels in ("torch", "numba", "onednn"):
        code, out, err = run_cli(capsys, "generate", "def add(a, b):", "--model", str(tiny_checkpoint),
                                 "--max-new-tokens", "12", "--kernels", kernels)
        assert code == 0, err
        assert out == "def add(a, b):" + expected + "\n", kernels
    code, out, err = run_cli(capsys, "generate", "def add(a, b):", "--model", str(tiny_checkpoint),
                             "--max-new-tokens", "12", "--matmul-dtype", "int8", "--quantize", "int8")
    assert code == 0, err
    assert out.startswith("def add(a, b):") and len(out) > len("def add(a, b):\n")
    code, out, err = run_cli(capsys, "generate", "x", "--model", str(tiny_checkpoint), "--matmul-dtype", "int8",
                             "--compile")
    assert code == 1 and "compile=True" in err and err.count("\n") == 1
