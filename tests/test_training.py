"""Training: sources, tokenizer training, data shards, the loop, exact resume after kill -9, and
DDP / FSDP2 against a single process with the same global batch."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizer, CodeGenTokenizerFast
from codegen_lm.cli import main as cli_main
from codegen_lm.training.config import TrainConfig
from codegen_lm.training.data import DataError, TokenWindows, prepare, read_manifest
from codegen_lm.training.loop import lr_factor, param_groups, train
from codegen_lm.training.sources import find_sources
from codegen_lm.training.tokenizer_train import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = [STDLIB / "json", STDLIB / "email"]
TINY = dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, seq_len=32, batch_size=4,
            warmup_steps=2, lr=3e-3, min_lr=3e-4, progress=False, log_every=1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(find_sources(SOURCES), 700, out, progress=False)
    return out


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare(find_sources(SOURCES), tokenizer_dir, out, holdout=0.1, progress=False)
    return out


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def curve(records: list[dict]) -> list[tuple]:
    """The parts of a log that must repeat exactly (not the timings)."""
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss")
    return [tuple(r.get(k) for k in keys) for r in records]


# ---- sources, tokenizer, data ---------------------------------------------------------------------


def test_find_sources_filters_and_is_sorted(tmp_path):
    for rel in ("a/x.py", "a/test/t.py", "b.txt", "a/y.py", "c/z.pyi"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("pass\n")
    names = [f.name for f in find_sources([tmp_path])]
    root = tmp_path.name
    assert names == [f"{root}/a/test/t.py", f"{root}/a/x.py", f"{root}/a/y.py"]
    assert [f.name for f in find_sources([tmp_path], exclude=["*test/*"])] == [f"{root}/a/x.py", f"{root}/a/y.py"]
    assert [f.name for f in find_sources([tmp_path], include=["a/x*"])] == [f"{root}/a/x.py"]
    assert [f.name for f in find_sources([tmp_path], extensions=[".py", "pyi"])][-1] == f"{root}/c/z.pyi"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_sources([tmp_path / "nope"])


def test_trained_tokenizer_loads_everywhere_with_whitespace_tokens(tokenizer_dir):
    fast = CodeGenTokenizerFast.from_pretrained(tokenizer_dir)
    slow = CodeGenTokenizer.from_pretrained(tokenizer_dir)
    hf = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(fast) == 700 and fast.eos_token_id == 0
    texts = [(STDLIB / "json" / "decoder.py").read_text(), "def f(x):\n        return  x\t\t+ 1\n", "ünï 😀"]
    for text in texts:
        ids = fast.encode(text)
        assert slow.encode(text) == ids == hf.encode(text)
        assert fast.decode(ids) == slow.decode(ids) == text
    assert fast.convert_ids_to_tokens(fast.encode("        return"))[0] == " " * 8  # one token of indentation
    assert not any(" " * 2 in t or "ĠĠ" in t for t in fast.vocab)  # no merges spent on whitespace runs


def test_tokenizer_training_is_reproducible_and_validates(tmp_path, tokenizer_dir):
    train_tokenizer(find_sources(SOURCES), 700, tmp_path, progress=False)
    assert (tmp_path / "tokenizer.json").read_text() == (tokenizer_dir / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="vocab_size must be above 295"):
        train_tokenizer(find_sources(SOURCES), 100, tmp_path / "x", progress=False)


def test_prepare_writes_shards_manifest_and_eos(data_dir, tokenizer_dir):
    manifest = read_manifest(data_dir)
    tok = CodeGenTokenizerFast.from_pretrained(tokenizer_dir)
    files = find_sources(SOURCES)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["size"] == 700
    assert manifest["totals"]["files"] == len(files) and manifest["totals"]["val"] > 0
    train_tokens = np.concatenate([np.load(data_dir / s["name"]) for s in manifest["shards"] if s["split"] == "train"])
    assert train_tokens.dtype == np.uint16 and train_tokens.size == manifest["totals"]["train"]
    # the shard is every train file's tokens followed by eos, in file order
    expected = []
    for f in files:
        entry = manifest["files"][f.name]
        if entry["split"] == "train":
            expected += [*tok.encode(f.path.read_text()), tok.eos_token_id]
    assert train_tokens.tolist() == expected
    assert (data_dir / "tokenizer" / "tokenizer.json").is_file()


def test_prepare_dedups_skips_and_reruns_incrementally(tmp_path, tokenizer_dir):
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("def a():\n    return 1\n")
    (src / "pkg" / "copy_of_a.py").write_text("def a():\n    return 1\n")
    (src / "pkg" / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    out = tmp_path / "data"
    first = prepare(find_sources([src]), tokenizer_dir, out, holdout=0.0, progress=False)
    assert first.new_files == 1 and first.duplicates == 1 and list(first.skipped.values()) == ["not UTF-8"]
    again = prepare(find_sources([src]), tokenizer_dir, out, holdout=0.0, progress=False)
    assert again.new_files == 0 and again.shards_written == [] and again.already_known == 1
    (src / "pkg" / "b.py").write_text("def b():\n    return 2\n")
    third = prepare(find_sources([src]), tokenizer_dir, out, holdout=0.0, progress=False)
    assert third.new_files == 1 and third.shards_written == ["train-00001.npy"]
    assert read_manifest(out)["totals"]["files"] == 2
    with pytest.raises(DataError, match=r"holdout=0\.0"):
        prepare(find_sources([src]), tokenizer_dir, out, holdout=0.5, progress=False)


def test_windows_are_a_pure_function_of_the_sample_counter(data_dir):
    a = TokenWindows(data_dir, "train", 32, seed=3)
    b = TokenWindows(data_dir, "train", 32, seed=3)
    assert torch.equal(a.batch(5, 4), torch.cat([b.batch(5 + i, 1) for i in range(4)]))
    flat = np.concatenate([np.load(data_dir / s["name"]) for s in a.manifest["shards"] if s["split"] == "train"])
    w = a.window_index(7)
    assert a.batch(7, 1)[0].tolist() == flat[w * 32 : w * 32 + 33].tolist()
    epoch = sorted(a.window_index(k) for k in range(a.n_windows))
    assert epoch == list(range(a.n_windows))  # every window once per epoch
    assert [a.window_index(k) for k in range(5)] != [TokenWindows(data_dir, "train", 32, seed=4).window_index(k)
                                                      for k in range(5)]


def test_schedule_and_weight_decay_groups():
    cfg = TrainConfig(data="x", lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55) and lr_factor(110, cfg) == pytest.approx(0.1)
    from codegen_lm import CodeGenConfig

    model = CodeGenForCausalLM(CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=100,
                                             eos_token_id=0))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias", "transformer.h.0.mlp.fc_in.bias",
        "transformer.h.0.mlp.fc_out.bias", "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.bias"}
    assert "transformer.wte.weight" in {names[id(p)] for p in decay["params"]}


# ---- the loop -------------------------------------------------------------------------------------


def test_training_learns_and_saves_checkpoints_both_libraries_load(data_dir, tmp_path):
    cfg = TrainConfig(data=str(data_dir), out_dir=str(tmp_path / "run"), max_steps=40, eval_every=20,
                      save_every=10, keep_checkpoints=2, **TINY)
    final = train(cfg)
    log = read_log(tmp_path / "run")
    losses = [r["loss"] for r in log if "loss" in r]
    vals = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(losses) == 40 and len(vals) == 2
    assert losses[0] > math.log(700) - 0.5 and sum(losses[-5:]) / 5 < losses[0] - 0.5  # it learns
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1.5 for r in log if "loss" in r)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "latest", "step-0000030", "step-0000040"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    ours = CodeGenForCausalLM.from_pretrained(final)
    hf = transformers.CodeGenForCausalLM.from_pretrained(final).eval()
    ids = torch.randint(0, 700, (2, 20))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() <= 1e-4
    tok = CodeGenTokenizerFast.from_pretrained(final)
    assert len(tok) == 700 and ours.config.vocab_size == 704 and ours.config.eos_token_id == 0
    # the held-out loss in the log is the model's loss on the val windows
    val = TokenWindows(data_dir, "val", 32, shuffle=False)
    batch = torch.cat([val.batch(k % val.n_windows, 1) for k in range(4 * min(20, -(-val.n_windows // 4)))])
    with torch.no_grad():
        logits = ours(batch[:, :-1]).logits
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
    assert losses.view(-1, 4 * 32).mean(1).mean().item() == pytest.approx(vals[-1], rel=1e-4)


def test_fine_tuning_from_a_checkpoint_and_options(data_dir, tmp_path):
    base = TrainConfig(data=str(data_dir), out_dir=str(tmp_path / "base"), max_steps=3, eval_every=0, save_every=0,
                       **TINY)
    first = train(base)
    tuned = TrainConfig(**{**base.to_dict(), "out_dir": str(tmp_path / "tuned"), "init_from": str(first),
                           "grad_accum": 2, "activation_checkpointing": True, "precision": "bf16",
                           "dropout": 0.1, "max_steps": 2})
    final = train(tuned)
    log = read_log(tmp_path / "tuned")
    base_log = read_log(tmp_path / "base")
    assert log[0]["loss"] < base_log[0]["loss"]  # it started from the trained weights
    assert log[0]["tokens"] == 2 * 4 * 32  # grad_accum doubles the global batch
    assert CodeGenForCausalLM.from_pretrained(final).config.resid_pdrop == 0.1


def test_activation_checkpointing_gives_the_same_gradients(data_dir):
    from codegen_lm import CodeGenConfig

    config = CodeGenConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=704, eos_token_id=0)
    torch.manual_seed(0)
    a = CodeGenForCausalLM(config).train()
    b = CodeGenForCausalLM(config).train()
    b.load_state_dict(a.state_dict())
    b.gradient_checkpointing_enable()
    batch = TokenWindows(data_dir, "train", 32).batch(0, 2)
    for m in (a, b):
        m(batch, labels=batch, use_cache=False).loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name


KILL_AT = textwrap.dedent('''
    import os, signal, sys
    from codegen_lm.training import loop
    kill_step, when = int(sys.argv[1]), sys.argv[2]
    real_log, real_save = loop._log, loop.CodeGenForCausalLM.save_pretrained
    def log(out, env, record):
        if when == "step" and record["step"] == kill_step and "loss" in record:
            os.kill(os.getpid(), signal.SIGKILL)
        real_log(out, env, record)
    def save(self, folder, **kw):
        if when == "save" and folder.name == f"step-{kill_step:07d}.tmp":
            real_save(self, folder, **kw)
            os.kill(os.getpid(), signal.SIGKILL)  # half-written: weights there, no trainer state
        real_save(self, folder, **kw)
    loop._log, loop.CodeGenForCausalLM.save_pretrained = log, save
    from codegen_lm.cli import main
    sys.exit(main(sys.argv[3:]))
''')


def train_args(data_dir: Path, out: Path, steps: int = 12, **extra) -> list[str]:
    settings = {**TINY, "max_steps": steps, "eval_every": 4, "save_every": 4, "dropout": 0.1, **extra}
    args = ["train", "--data", str(data_dir), "--out-dir", str(out), "--no-progress"]
    for key, value in settings.items():
        if key == "progress":
            continue
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_resume_after_kill_9_continues_exactly(data_dir, tmp_path):
    assert cli_main(train_args(data_dir, tmp_path / "straight")) == 0
    expected = curve(read_log(tmp_path / "straight"))
    run = tmp_path / "killed"
    # killed two steps after the step-8 checkpoint (steps 9 and 10 are in the log, then lost)
    killed = subprocess.run([sys.executable, "-c", KILL_AT, "11", "step", *train_args(data_dir, run)],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    assert max(r["step"] for r in read_log(run)) == 10
    assert cli_main([*train_args(data_dir, run), "--resume"]) == 0
    assert curve(read_log(run)) == expected  # the same losses, learning rates and norms, bit for bit
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(data_dir, tmp_path):
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_AT, "8", "save", *train_args(data_dir, run)],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (run / "checkpoints" / "step-0000008.tmp").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert cli_main([*train_args(data_dir, run), "--resume"]) == 0
    assert not (run / "checkpoints" / "step-0000008.tmp").exists()
    assert cli_main(train_args(data_dir, tmp_path / "straight")) == 0
    assert curve(read_log(run)) == curve(read_log(tmp_path / "straight"))


def test_resume_refuses_a_different_batch_geometry(data_dir, tmp_path, capsys):
    assert cli_main(train_args(data_dir, tmp_path / "run", steps=4)) == 0
    assert cli_main([*train_args(data_dir, tmp_path / "run", steps=8, batch_size=2), "--resume"]) == 1
    assert "cannot resume: the checkpoint has global_batch=4, this run 2" in capsys.readouterr().err


def test_train_config_file_and_bad_settings(data_dir, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(textwrap.dedent(f'''
        data = "{data_dir}"
        out_dir = "{tmp_path / 'run'}"
        [model]
        n_embd = 32
        n_layer = 1
        n_head = 4
        rotary_dim = 4
        n_positions = 64
        [optimizer]
        lr = 1e-3
        [schedule]
        max_steps = 2
        warmup_steps = 1
        [batch]
        seq_len = 32
        batch_size = 2
    '''))
    assert cli_main(["train", "--config", str(toml), "--no-progress", "--max-steps", "3"]) == 0
    assert [r["step"] for r in read_log(tmp_path / "run") if "loss" in r] == [1, 3]  # flag beat the file
    toml.write_text(toml.read_text() + "\nlearning_rate = 3\n")
    assert cli_main(["train", "--config", str(toml)]) == 1
    assert "unknown setting(s) learning_rate" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(data_dir), "--batch-size", "0"]) == 1
    assert "batch_size=0: must be a positive integer" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(tmp_path / "nothing")]) == 1
    assert "no manifest.json" in capsys.readouterr().err


# ---- torchrun: DDP and FSDP2 against one process --------------------------------------------------


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "codegen_lm", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(data_dir, tmp_path, parallel):
    single = tmp_path / "single"
    assert cli_main(train_args(data_dir, single, steps=6, batch_size=4, dropout=0.0, threads=1)) == 0
    multi = tmp_path / parallel
    out = torchrun(train_args(data_dir, multi, steps=6, batch_size=2, dropout=0.0, parallel=parallel))
    assert out.returncode == 0, out.stderr[-3000:]
    a, b = read_log(single), read_log(multi)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss", "grad_norm", "lr"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (key, ra["step"])
    wa = load_file(single / "final" / "model.safetensors")
    wb = load_file(multi / "final" / "model.safetensors")
    assert set(wa) == set(wb)
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-5), key
    # a multi-process checkpoint resumes in one process (optimizer state is keyed by parameter name)
    shutil.rmtree(multi / "final")
    assert cli_main([*train_args(data_dir, multi, steps=8, batch_size=4, dropout=0.0), "--resume"]) == 0


def test_released_shape_by_name_gets_the_datas_eos():
    from codegen_lm.training.loop import build_model

    cfg = TrainConfig(data="unused", model="Salesforce/codegen-350M-mono", seq_len=1024)
    model = build_model(cfg, vocab_size=700, eos_id=0)
    assert model.num_parameters() == 356_712_448
    assert model.config.eos_token_id == model.config.bos_token_id == 0 and model.config.vocab_size == 51200
    with pytest.raises(ValueError, match="seq_len=4096 exceeds the model's n_positions=2048"):
        build_model(TrainConfig(data="unused", model="Salesforce/codegen-350M-mono", seq_len=4096), 700, 0)
    with pytest.raises(ValueError, match=r"vocabulary \(51200\) is smaller than the data's tokenizer \(60000"):
        build_model(TrainConfig(data="unused", model="Salesforce/codegen-350M-mono"), 60000, 0)


def test_default_model_recipe_runs_end_to_end_on_a_tiny_configuration(tmp_path):
    """scripts/train_default_model.sh as documented, shrunk: a tiny model for a few steps, with an
    extra package as data (iniconfig, MIT, a few kB from PyPI, installed for the data only into the
    run's site folder) and the data filters, exported elsewhere."""
    repo = Path(__file__).resolve().parents[1]
    config = tmp_path / "tiny.toml"
    config.write_text('[model]\nn_embd = 32\nn_layer = 1\nn_head = 2\nrotary_dim = 8\nn_positions = 128\n'
                      '[batch]\nseq_len = 64\nbatch_size = 2\nmax_steps = 3\n'
                      '[optimizer]\nwarmup_steps = 1\n'
                      '[execution]\ncompile = false\nprecision = "fp32"\nthreads = 2\n'
                      '[bookkeeping]\nlog_every = 1\neval_every = 3\neval_batches = 1\nsave_every = 3\n')
    work, export = tmp_path / "work", tmp_path / "export"
    env = {**os.environ, "CONFIG": str(config), "EXPORT": str(export), "PACKAGES": "iniconfig",
           "FILTERS": "--drop-tests --drop-generated --near-duplicates 0.9",
           "TRAIN_ARGS": "--no-progress"}
    out = subprocess.run(["bash", str(repo / "scripts" / "train_default_model.sh"), str(work)], env=env,
                         capture_output=True, text=True, timeout=900, cwd=repo)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "package iniconfig" in out.stdout and "licence MIT" in out.stdout
    manifest = read_manifest(work / "data")
    assert [s["package"] for s in manifest["sources"]] == ["iniconfig"]
    assert any(name.startswith("iniconfig/") for name in manifest["files"])
    assert any(reason == "test code" for reason in manifest["skipped"].values())
    quality = json.loads((work / "quality.json").read_text())
    assert quality["prompts"] == 50 and quality["headers"] == 50 and math.isfinite(quality["held_out_loss"])
    assert CodeGenForCausalLM.from_pretrained(export).config.n_embd == 32
