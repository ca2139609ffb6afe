"""The model that ships in the package: present, small, offline, loadable by transformers, and the
default of every command that takes --model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from codegen_lm import DEFAULT_MODEL, CodeGenForCausalLM, CodeGenTokenizer, CodeGenTokenizerFast
from codegen_lm.bundled import bundled_model_dir, bundled_models
from codegen_lm.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCUMENTED_SYNTAX_OK = 31  # of 50: the README's "Default model" section


def test_bundled_model_is_small_and_complete():
    folder = bundled_model_dir(DEFAULT_MODEL)
    assert folder is not None and list(bundled_models()) == [DEFAULT_MODEL]
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= 25 * 10**6, f"{size:,} bytes"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt", "train_config.json"):
        assert (folder / name).is_file(), name


def test_loads_offline_by_name_and_matches_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = CodeGenForCausalLM.from_pretrained(DEFAULT_MODEL)
    assert model.dtype == torch.float32 and model.config.vocab_size == 8192
    fast, slow = CodeGenTokenizerFast.from_pretrained(DEFAULT_MODEL), CodeGenTokenizer.from_pretrained(DEFAULT_MODEL)
    text = "import os\n\ndef main():\n    print(os.getcwd())\n"
    assert fast.encode(text) == slow.encode(text)
    hf = transformers.CodeGenForCausalLM.from_pretrained(bundled_model_dir(DEFAULT_MODEL), dtype=torch.float32).eval()
    ids = torch.tensor([fast.encode(text)])
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-4
        # a trained model: the source it was trained on is far more likely than chance
        loss = model(ids, labels=ids).loss.item()
    assert loss < 3.0, loss


def test_syntax_check_reproduces_the_documented_figure():
    """The README's figure for the shipped weights: greedy completions of 50 function signatures
    that `ast.parse` accepts (bench/default_model_quality.py's protocol)."""
    sys.path.insert(0, str(REPO / "bench"))
    from default_model_quality import syntax_check
    from signature_prompts import PROMPTS

    model = CodeGenForCausalLM.from_pretrained(DEFAULT_MODEL)
    tok = CodeGenTokenizerFast.from_pretrained(DEFAULT_MODEL)
    results = syntax_check(model, tok, PROMPTS)
    ok = sum(r["error"] is None for r in results)
    assert abs(ok - DOCUMENTED_SYNTAX_OK) <= 2, [r["error"] for r in results]


def test_commands_default_to_the_bundled_model(capsys):
    assert main(["generate", "def square(x):", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("def square(x):")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert DEFAULT_MODEL in out and "float16" in out


def test_readme_first_command_runs_offline(tmp_path):
    """`codegen-lm generate` with no --model and no network."""
    exe = shutil.which("codegen-lm")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    out = subprocess.run([exe, "generate", "def fibonacci(n):", "--max-new-tokens", "16"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def fibonacci(n):") and len(out.stdout) > len("def fibonacci(n):\n")
