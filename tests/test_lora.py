"""LoRA: adapters in peft's format both ways (ours loaded by transformers + peft, theirs by us, with the
same logits), merging, the refusals, `generate --adapter`, and LoRA fine-tuning through the training
loop (it learns, trains only the adapters, resumes after kill -9, and runs under torchrun)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

from codegen_lm import CodeGenConfig, CodeGenForCausalLM
from codegen_lm.checkpoint import CheckpointError, qkv_permutation
from codegen_lm.cli import main as cli_main
from codegen_lm.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    save_adapter,
)
from codegen_lm.training import checkpoints as C
from codegen_lm.training.config import TrainConfig
from codegen_lm.training.data import prepare
from codegen_lm.training.loop import train
from codegen_lm.training.sources import find_sources
from codegen_lm.training.tokenizer_train import train_tokenizer

from .conftest import SMALL_SHAPES, load_hf, make_hf_model
from .test_cli import run_cli
from .test_training import KILL_AT, curve, read_log, torchrun

TARGETS = ["qkv_proj", "out_proj", "fc_in", "fc_out"]


def randomize_lora(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    """Non-zero A and B everywhere (a fresh adapter's B is zero, which would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module", params=["straddle", "rotary-part"])
def checkpoint(request, tmp_path_factory) -> Path:
    """A random transformers checkpoint; "straddle" has heads across the fused projection's 4 blocks."""
    folder = tmp_path_factory.mktemp(f"lora-{request.param}")
    shape = SMALL_SHAPES[request.param]
    make_hf_model(seed=5, vocab_size=300, bos_token_id=0, eos_token_id=0, **shape).save_pretrained(folder)
    return folder


@pytest.fixture
def ids():
    return torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(1))


# ---- the file format, both ways --------------------------------------------------------------------


def test_our_adapter_loads_in_peft_with_the_same_logits(checkpoint, ids, tmp_path):
    ours = CodeGenForCausalLM.from_pretrained(checkpoint)
    adapted = apply_lora(ours, r=4, alpha=8, targets=[*TARGETS, "lm_head"], dropout=0.05)
    assert len(adapted) == 4 * ours.config.n_layer + 1
    randomize_lora(ours)
    expected = logits(ours.eval(), ids)
    save_adapter(ours, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]

    # the keys and shapes peft itself saves for this configuration
    reference = peft.get_peft_model(load_hf(checkpoint), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, target_modules=[*TARGETS, "lm_head"], task_type="CAUSAL_LM"))
    want = {k: v.shape for k, v in peft.get_peft_model_state_dict(reference, save_embedding_layers=False).items()}
    saved = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in saved.items()} == want
    assert "base_model.model.transformer.h.0.attn.qkv_proj.lora_A.weight" in saved
    # qkv_proj's lora_B rows are in the checkpoint's mp_num layout
    perm = qkv_permutation(ours.config)
    ours_b = ours.transformer.h[0].attn.qkv_proj.lora_B.weight
    assert torch.equal(saved["base_model.model.transformer.h.0.attn.qkv_proj.lora_B.weight"][perm], ours_b)
    config = peft.LoraConfig.from_pretrained(tmp_path / "adapter")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.05)
    assert set(config.target_modules) == {*TARGETS, "lm_head"}

    theirs = peft.PeftModel.from_pretrained(load_hf(checkpoint), tmp_path / "adapter").eval()
    assert (logits(theirs, ids) - expected).abs().max() <= 1e-4
    assert (logits(load_hf(checkpoint), ids) - expected).abs().max() > 1e-2  # the adapter does change them


def test_peft_adapter_loads_in_ours_with_the_same_logits(checkpoint, ids, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=[*TARGETS, "lm_head"], task_type="CAUSAL_LM",
                             use_rslora=True, rank_pattern={"fc_in": 2}, alpha_pattern={"out_proj": 3})
    theirs = peft.get_peft_model(load_hf(checkpoint), config)
    randomize_lora(theirs, seed=3)
    with torch.no_grad():  # peft saves a targeted lm_head's own weights too; they must be what loads
        theirs.base_model.model.lm_head.base_layer.bias.add_(0.5)
    theirs.eval().save_pretrained(tmp_path / "peft")
    expected = logits(theirs, ids)

    merged = load_adapter(CodeGenForCausalLM.from_pretrained(checkpoint), tmp_path / "peft")
    assert not lora_layers(merged) and all(type(m) is not LoraLinear for m in merged.modules())
    assert (logits(merged, ids) - expected).abs().max() <= 1e-4

    kept = load_adapter(CodeGenForCausalLM.from_pretrained(checkpoint), tmp_path / "peft", merge=False)
    layers = lora_layers(kept)
    assert len(layers) == 4 * kept.config.n_layer + 1
    assert layers["transformer.h.0.mlp.fc_in"].r == 2 and layers["transformer.h.0.attn.qkv_proj"].r == 4
    assert layers["transformer.h.0.attn.out_proj"].scaling == pytest.approx(3 / 2)  # rsLoRA: alpha / sqrt(r)
    assert (logits(kept, ids) - expected).abs().max() <= 1e-4
    assert not any(p.requires_grad for n, p in kept.named_parameters() if "lora_" in n)  # loaded for inference

    # and back: what we save from it, peft loads with the same logits (patterns included); we save the
    # LoRA matrices only, so the changed lm_head bias is the base model's now
    save_adapter(kept, tmp_path / "again")
    assert not any("base_layer" in k for k in load_file(tmp_path / "again" / ADAPTER_WEIGHTS))
    base = load_hf(checkpoint)
    with torch.no_grad():
        base.lm_head.bias.add_(0.5)
    again = peft.PeftModel.from_pretrained(base, tmp_path / "again").eval()
    assert (logits(again, ids) - expected).abs().max() <= 1e-4


def test_merge_and_save_is_a_plain_checkpoint(checkpoint, ids, tmp_path):
    model = CodeGenForCausalLM.from_pretrained(checkpoint)
    apply_lora(model, r=3, alpha=5, targets="qkv_proj,fc_out")
    randomize_lora(model, seed=4)
    expected = logits(model.eval(), ids)
    with pytest.raises(ValueError, match="merge them first"):
        model.save_pretrained(tmp_path / "unmerged")
    merge_lora(model)
    assert not lora_layers(model) and (logits(model, ids) - expected).abs().max() <= 1e-5
    model.save_pretrained(tmp_path / "merged")
    assert (logits(load_hf(tmp_path / "merged"), ids) - expected).abs().max() <= 1e-4
    assert torch.equal(logits(CodeGenForCausalLM.from_pretrained(tmp_path / "merged"), ids), logits(model, ids))


def test_apply_lora_trains_only_the_adapters(checkpoint, ids, tmp_path):
    model = CodeGenForCausalLM.from_pretrained(checkpoint)
    before = logits(model, ids)
    names = apply_lora(model, r=2, alpha=4, targets=["transformer.h.0.attn.qkv_proj", "fc_in"])
    assert names == ["transformer.h.0.attn.qkv_proj", *[f"transformer.h.{i}.mlp.fc_in" for i in
                                                         range(model.config.n_layer)]]
    assert torch.equal(logits(model, ids), before)  # lora_B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}.weight" for n in names for x in "AB"}
    # the base weights keep their names (and so their place in checkpoints)
    assert "transformer.h.0.attn.qkv_proj.weight" in dict(model.named_parameters())
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())
    randomize_lora(model)
    model.eval()
    save_adapter(model, tmp_path / "one-layer")  # one layer's qkv_proj: named in full for peft
    targets = json.loads((tmp_path / "one-layer" / ADAPTER_CONFIG).read_text())["target_modules"]
    assert targets == sorted(names)
    theirs = peft.PeftModel.from_pretrained(load_hf(checkpoint), tmp_path / "one-layer").eval()
    assert (logits(theirs, ids) - logits(model, ids)).abs().max() <= 1e-4
    assert sum(".lora_A." in n for n, _ in theirs.named_parameters()) == len(names)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, targets=["fc_in"])
    with pytest.raises(ValueError, match="no Linear layer of the model is named"):
        apply_lora(CodeGenForCausalLM.from_pretrained(checkpoint), targets=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="is a Embedding; only Linear layers"):
        apply_lora(CodeGenForCausalLM.from_pretrained(checkpoint), targets=["wte"])
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        apply_lora(CodeGenForCausalLM.from_pretrained(checkpoint), r=0)


def test_bad_adapters_are_refused_by_name(checkpoint, tmp_path):
    model = CodeGenForCausalLM.from_pretrained(checkpoint)
    apply_lora(model, r=2, alpha=2, targets=["fc_out"])
    good = tmp_path / "good"
    save_adapter(model, good)

    def variant(name: str, config: dict | None = None, tensors: dict | None = None) -> Path:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if config is not None:
            data = json.loads((folder / ADAPTER_CONFIG).read_text())
            (folder / ADAPTER_CONFIG).write_text(json.dumps({**data, **config}))
        if tensors is not None:
            save_file(tensors, folder / ADAPTER_WEIGHTS)
        return folder

    state = load_file(good / ADAPTER_WEIGHTS)
    key = "base_model.model.transformer.h.0.mlp.fc_out.lora_B.weight"
    cases = [
        (variant("dora", {"use_dora": True}), "uses DoRA"),
        (variant("bias", {"bias": "all"}), "bias='all'"),
        (variant("saved", {"modules_to_save": ["lm_head"]}), "modules_to_save"),
        (variant("ia3", {"peft_type": "IA3"}), "only LORA adapters"),
        (variant("shape", tensors={**state, key: torch.zeros(7, 2)}), "do not fit a Linear layer"),
        (variant("missing", tensors={k: v for k, v in state.items() if k != key}), "no lora_B for"),
        (variant("module", tensors={"base_model.model.transformer.h.0.mlp.nope.lora_A.weight": torch.zeros(2, 2),
                                    "base_model.model.transformer.h.0.mlp.nope.lora_B.weight": torch.zeros(2, 2)}),
         "a module transformer.h.0.mlp.nope, which this model does not have"),
        (variant("embedding", tensors={**state, "base_model.model.transformer.wte.lora_embedding_A": torch.zeros(2)}),
         "not a LoRA matrix of a Linear layer"),
        (variant("nan", tensors={**state, key: torch.full_like(state[key], float("nan"))}), "NaN"),
        (tmp_path, "not an adapter folder"),
    ]
    for folder, message in cases:
        with pytest.raises(CheckpointError, match=message):
            load_adapter(CodeGenForCausalLM.from_pretrained(checkpoint), folder)


def test_generate_with_an_adapter(capsys, tiny_checkpoint, tmp_path):
    model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    apply_lora(model, r=4, alpha=8)
    randomize_lora(model, seed=9, scale=0.5)
    save_adapter(model, tmp_path / "adapter")
    merge_lora(model).save_pretrained(tmp_path / "merged")
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_checkpoint / name, tmp_path / "merged" / name)
    common = ["generate", "def add(a, b):", "--max-new-tokens", "10", "--completion-only"]
    code, with_adapter, err = run_cli(capsys, *common, "--model", str(tiny_checkpoint), "--adapter",
                                      str(tmp_path / "adapter"))
    assert code == 0, err
    code, merged, err = run_cli(capsys, *common, "--model", str(tmp_path / "merged"))
    assert code == 0, err
    code, plain, err = run_cli(capsys, *common, "--model", str(tiny_checkpoint))
    assert code == 0, err
    assert with_adapter == merged != plain
    model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    apply_lora(model, r=4, alpha=8)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.qkv_proj has an unmerged LoRA adapter"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
    code, _, err = run_cli(capsys, *common, "--model", str(tiny_checkpoint), "--adapter", str(tmp_path / "adapter"),
                           "--quantize", "int8")
    assert code == 0, err
    code, _, err = run_cli(capsys, *common, "--model", str(tiny_checkpoint), "--adapter", str(tmp_path))
    assert code == 1 and "not an adapter folder" in err


# ---- fine-tuning through the training loop ------------------------------------------------------------

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SHAPE = dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64)
LORA = dict(seq_len=32, batch_size=4, warmup_steps=2, lr=1e-2, min_lr=1e-3, lora_r=8, lora_alpha=16,
            lora_targets="qkv_proj,out_proj,fc_in,fc_out,lm_head", progress=False, log_every=1, peak_flops=1e12)


@pytest.fixture(scope="module")
def tuning(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, base checkpoint): a tokenizer learnt on some of the standard library, a random
    model of its vocabulary, and a small, repetitive fine-tuning corpus tokenized with it."""
    root = tmp_path_factory.mktemp("lora-tuning")
    train_tokenizer(find_sources([STDLIB / "json", STDLIB / "email"]), 500, root / "tok", progress=False)
    src = root / "src"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}.py").write_text("".join(f"def add_{i}_{j}(a, b):\n    return a + b + {j}\n\n" for j in range(20)))
    prepare(find_sources([src]), root / "tok", root / "data", holdout=0.1, progress=False)
    torch.manual_seed(0)
    config = CodeGenConfig(**SHAPE, vocab_size=512, bos_token_id=0, eos_token_id=0)
    CodeGenForCausalLM.from_config(config).save_pretrained(root / "base")
    return root / "data", root / "base"


def test_lora_fine_tuning_learns_and_saves_an_adapter_peft_loads(tuning, tmp_path):
    data, base = tuning
    cfg = TrainConfig(data=str(data), out_dir=str(tmp_path / "run"), init_from=str(base), max_steps=20,
                      eval_every=10, save_every=10, lora_dropout=0.05, lora_merge=True, **LORA)
    final = train(cfg)
    losses = [r["loss"] for r in read_log(tmp_path / "run") if "loss" in r]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # it learns
    # only the adapters trained: the optimizer holds their state alone
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-0000020" / "trainer_state.pt", weights_only=True)
    names = set(state["optimizer"]["state"])
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * (4 * 2 + 1)
    assert state["lora"] == {"r": 8, "alpha": 16.0, "targets": ["qkv_proj", "out_proj", "fc_in", "fc_out", "lm_head"]}
    step = tmp_path / "run" / "checkpoints" / "step-0000020"
    (step / "SHA256SUMS").unlink()  # a checkpoint without sums is checked by reading its files
    assert C.check_checkpoint(step)[0] is not None
    (step / ADAPTER_WEIGHTS).write_bytes(b"torn")
    assert "adapter_model.safetensors" in C.check_checkpoint(step)[1]
    # the final folder is a peft adapter (with the tokenizer), for transformers + peft and for us
    assert not (final / "model.safetensors").exists() and (final / ADAPTER_WEIGHTS).is_file()
    assert json.loads((final / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(base)
    ids = torch.randint(0, 500, (2, 20))
    ours = load_adapter(CodeGenForCausalLM.from_pretrained(base), final)
    theirs = peft.PeftModel.from_pretrained(load_hf(base), final).eval()
    assert (logits(theirs, ids) - logits(ours, ids)).abs().max() <= 1e-4
    # the merged checkpoint is that model, for both libraries
    merged = tmp_path / "run" / "merged"
    assert (logits(load_hf(merged), ids) - logits(ours, ids)).abs().max() <= 1e-4
    assert (logits(CodeGenForCausalLM.from_pretrained(merged), ids) - logits(ours, ids)).abs().max() <= 1e-5


def test_lora_settings_are_checked():
    for change, message in (({"lora_r": -1}, "lora_r=-1"), ({"lora_r": 4, "lora_alpha": 0}, "lora_alpha=0"),
                            ({"lora_r": 4, "lora_dropout": 1.0}, "lora_dropout=1.0"),
                            ({"lora_r": 4, "lora_targets": " , "}, "lora_targets"),
                            ({"lora_merge": True}, "lora_merge=True: needs LoRA training")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(data="x", **change).validate()


def lora_args(data: Path, base: Path, out: Path, steps: int = 8, **extra) -> list[str]:
    settings = {**LORA, "max_steps": steps, "eval_every": 4, "save_every": 4, "lora_dropout": 0.1, "threads": 1,
                **extra}
    args = ["train", "--data", str(data), "--out-dir", str(out), "--init-from", str(base), "--no-progress"]
    for key, value in settings.items():
        if key != "progress":
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_lora_resume_after_kill_9_continues_exactly(tuning, tmp_path):
    data, base = tuning
    assert cli_main(lora_args(data, base, tmp_path / "straight")) == 0
    run = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-c", KILL_AT, "7", "step", *lora_args(data, base, run)],
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    assert cli_main([*lora_args(data, base, run), "--resume"]) == 0
    assert curve(read_log(run)) == curve(read_log(tmp_path / "straight"))
    a = load_file(tmp_path / "straight" / "final" / ADAPTER_WEIGHTS)
    b = load_file(run / "final" / ADAPTER_WEIGHTS)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a different LoRA setting does not resume this run
    assert cli_main([*lora_args(data, base, run, steps=12, lora_r=4), "--resume"]) == 1


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_lora_two_processes_match_one(tuning, tmp_path, parallel):
    data, base = tuning
    single = tmp_path / "single"
    assert cli_main(lora_args(data, base, single, steps=4, lora_dropout=0.0)) == 0
    multi = tmp_path / parallel
    out = torchrun(lora_args(data, base, multi, steps=4, batch_size=2, lora_dropout=0.0, parallel=parallel))
    assert out.returncode == 0, out.stderr[-3000:]
    for ra, rb in zip(read_log(single), read_log(multi), strict=True):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (key, ra["step"])
    a = load_file(single / "final" / ADAPTER_WEIGHTS)
    b = load_file(multi / "final" / ADAPTER_WEIGHTS)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
