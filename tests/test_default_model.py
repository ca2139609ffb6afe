"""The model that ships in the package: present, small, offline, loadable by transformers, and the
default of every command that takes --model."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess

import torch
import transformers

from codegen_lm import DEFAULT_MODEL, CodeGenForCausalLM, CodeGenTokenizer, CodeGenTokenizerFast
from codegen_lm.bundled import bundled_model_dir, bundled_models
from codegen_lm.cli import main


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


def test_greedy_completion_is_python():
    model = CodeGenForCausalLM.from_pretrained(DEFAULT_MODEL)
    tok = CodeGenTokenizerFast.from_pretrained(DEFAULT_MODEL)
    prompt = 'def add(a, b):\n    """Return the sum of a and b."""\n'
    ids = tok(prompt, return_tensors="pt").input_ids
    completion = tok.decode(model.generate(ids, max_new_tokens=48, stop=["\ndef", "\nclass", "\nif"], tokenizer=tok)
                            [0, ids.shape[1] :])
    body = completion.split("\ndef")[0].split("\nclass")[0].split("\nif")[0]
    ast.parse(prompt + body)
    assert "return" in body


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
