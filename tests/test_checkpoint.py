"""Checkpoint formats, errors on bad checkpoints, saving, and resolving hub names offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from codegen_lm import CodeGenConfig, CodeGenForCausalLM, CodeGenModel
from codegen_lm.checkpoint import CheckpointError, find_weight_files
from codegen_lm.hub import ModelNotFoundError

from .conftest import SMALL_SHAPES, legacy_fp16_state_dict, load_hf, make_hf_model

IDS = torch.randint(0, 50000, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.fixture()
def hf_model():
    return make_hf_model(seed=3, **SMALL_SHAPES["straddle"])


def copy_config(src_model, folder: Path, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    src_model.config.save_pretrained(folder)
    if extra:
        data = json.loads((folder / "config.json").read_text())
        data.update(extra)
        (folder / "config.json").write_text(json.dumps(data))


def test_sharded_safetensors(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="2MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(find_weight_files(tmp_path)) > 1
    ours = CodeGenForCausalLM.from_pretrained(tmp_path)
    assert (logits(ours) - logits(hf_model)).abs().max() <= 1e-4


def test_fp16_bin_with_legacy_buffers(hf_model, tmp_path):
    torch.save(legacy_fp16_state_dict(hf_model, 256), tmp_path / "pytorch_model.bin")
    copy_config(hf_model, tmp_path, torch_dtype="float16")
    ours = CodeGenForCausalLM.from_pretrained(tmp_path)
    assert ours.dtype == torch.float32  # CPU default, whatever the file holds
    assert CodeGenForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.float16
    assert CodeGenForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"unknown dtype .int4."):
        CodeGenForCausalLM.from_pretrained(tmp_path, dtype="int4")
    reference = load_hf(tmp_path)
    assert (logits(ours) - logits(reference)).abs().max() <= 1e-4


def test_sharded_bin_with_index(hf_model, tmp_path):
    state = legacy_fp16_state_dict(hf_model, 256)
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        torch.save({k: state[k] for k in part}, tmp_path / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    copy_config(hf_model, tmp_path)
    ours = CodeGenForCausalLM.from_pretrained(tmp_path)
    assert (logits(ours) - logits(load_hf(tmp_path))).abs().max() <= 1e-4


def test_bare_model_checkpoint_and_prefix_handling(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    base = CodeGenModel.from_pretrained(tmp_path)  # ignores lm_head, strips "transformer."
    with torch.no_grad():
        expected = hf_model.transformer(IDS).last_hidden_state
        assert (base(IDS).last_hidden_state - expected).abs().max() <= 1e-4
    bare = tmp_path / "bare"
    base.save_pretrained(bare)
    with pytest.raises(CheckpointError, match=r"lacks 'lm_head\.weight'"):
        CodeGenForCausalLM.from_pretrained(bare)


def test_save_pretrained_round_trips_through_transformers(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path / "hf")
    ours = CodeGenForCausalLM.from_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    saved = load_file(tmp_path / "ours" / "model.safetensors")
    assert set(saved) == set(hf_model.state_dict())  # HF names and layout, nothing more
    for key, value in hf_model.state_dict().items():
        assert torch.equal(saved[key], value), key
    back = load_hf(tmp_path / "ours")
    assert (logits(back) - logits(ours)).abs().max() <= 1e-4
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "codegen" and config["dtype"] == "float32"
    # sharded save, read back by transformers and by us
    ours.save_pretrained(tmp_path / "sharded", max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert (logits(load_hf(tmp_path / "sharded")) - logits(ours)).abs().max() <= 1e-4
    assert torch.equal(logits(CodeGenForCausalLM.from_pretrained(tmp_path / "sharded")), logits(ours))
    # saving unsharded over a sharded save removes the stale shards and index
    ours.save_pretrained(tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "generation_config.json",
                                                                        "model.safetensors"]


def test_fp16_save_and_tied_embeddings(tmp_path):
    hf = make_hf_model(seed=4, tie_word_embeddings=True, **SMALL_SHAPES["rotary-part"])
    hf.save_pretrained(tmp_path / "tied")
    ours = CodeGenForCausalLM.from_pretrained(tmp_path / "tied")
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert (logits(ours) - logits(hf)).abs().max() <= 1e-4
    ours.to(torch.float16).save_pretrained(tmp_path / "half")
    saved = load_file(tmp_path / "half" / "model.safetensors")
    assert "lm_head.weight" not in saved and saved["transformer.wte.weight"].dtype == torch.float16
    back = load_hf(tmp_path / "half")
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()


def corrupt(folder: Path, how: str) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(b"\x07" * 64 + data[64:])
    elif how == "empty":
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors_is_reported_with_file_name(tiny_checkpoint, tmp_path, how):
    shutil.copytree(tiny_checkpoint, tmp_path, dirs_exist_ok=True)
    corrupt(tmp_path, how)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        CodeGenForCausalLM.from_pretrained(tmp_path)


def test_truncated_and_malicious_bin_files(hf_model, tmp_path):
    copy_config(hf_model, tmp_path)
    torch.save(legacy_fp16_state_dict(hf_model, 256), tmp_path / "pytorch_model.bin")
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: not a readable PyTorch checkpoint"):
        CodeGenForCausalLM.from_pretrained(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"transformer.wte.weight": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        CodeGenForCausalLM.from_pretrained(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_missing_unexpected_and_mismatched_tensors(tiny_checkpoint, tmp_path):
    state = load_file(tiny_checkpoint / "model.safetensors")
    shutil.copy(tiny_checkpoint / "config.json", tmp_path / "config.json")

    def save(tensors):
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})

    save({k: v for k, v in state.items() if k != "transformer.h.1.mlp.fc_in.bias"})
    with pytest.raises(CheckpointError, match=r"\(model\.safetensors\) lacks 'transformer\.h\.1\.mlp\.fc_in\.bias'"):
        CodeGenForCausalLM.from_pretrained(tmp_path)

    save({**state, "transformer.h.9.attn.qkv_proj.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.9\.attn\.qkv_proj\.weight' \(in model\.safetensors\)"):
        CodeGenForCausalLM.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="does not use"):
        CodeGenForCausalLM.from_pretrained(tmp_path, strict=False)

    bad = dict(state)
    bad["transformer.h.0.mlp.fc_in.weight"] = torch.zeros(7, 64)
    save(bad)
    shape_error = r"'transformer\.h\.0\.mlp\.fc_in\.weight' has shape \[7, 64\].*needs \[256, 64\]"
    with pytest.raises(CheckpointError, match=shape_error):
        CodeGenForCausalLM.from_pretrained(tmp_path)

    save({**state, "lm_head.bias": state["lm_head.bias"].to(torch.int32)})
    with pytest.raises(CheckpointError, match=r"dtype torch\.int32"):
        CodeGenForCausalLM.from_pretrained(tmp_path)


def test_folders_without_weights_or_config(tiny_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model weights found"):
        CodeGenForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"lists shard model-1\.safetensors, which is not in"):
        CodeGenForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        CodeGenForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        CodeGenForCausalLM.from_pretrained(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="neither an existing folder nor a hub repository name"):
        CodeGenForCausalLM.from_pretrained("not a name")


def fake_hub_cache(cache: Path, repo_id: str, source: Path) -> None:
    """Lay out `source`'s files as huggingface_hub's cache holds a downloaded repository."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"{i:040d}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_name_resolves_from_local_cache_offline(tiny_checkpoint, tmp_path):
    fake_hub_cache(tmp_path / "hub", "Salesforce/codegen-350M-mono", tiny_checkpoint)
    ours = CodeGenForCausalLM.from_pretrained("Salesforce/codegen-350M-mono", cache_dir=tmp_path / "hub")
    assert torch.equal(logits(ours), logits(CodeGenForCausalLM.from_pretrained(tiny_checkpoint)))
    with pytest.raises(ModelNotFoundError, match="not in the local hub cache"):
        env_offline = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            CodeGenForCausalLM.from_pretrained("Salesforce/codegen-2B-mono", cache_dir=tmp_path / "hub")
        finally:
            if env_offline is None:
                os.environ.pop("HF_HUB_OFFLINE")
            else:
                os.environ["HF_HUB_OFFLINE"] = env_offline


def test_reference_usage_example_runs_offline_from_the_hub_cache(tiny_checkpoint, tmp_path):
    """The usage example of the reference documentation, unchanged but for the import line, with
    HF_HUB_OFFLINE=1 and the checkpoint in a hub cache (the test's own random model)."""
    fake_hub_cache(tmp_path / "hub", "Salesforce/codegen-350M-mono", tiny_checkpoint)
    example = textwrap.dedent('''
        from codegen_lm import CodeGenForCausalLM, CodeGenTokenizer
        checkpoint = "Salesforce/codegen-350M-mono"
        model = CodeGenForCausalLM.from_pretrained(checkpoint)
        tokenizer = CodeGenTokenizer.from_pretrained(checkpoint)
        text = "def hello_world():"
        completion = model.generate(**tokenizer(text, return_tensors="pt"))
        print(tokenizer.decode(completion[0]))
    ''')
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", example], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("def hello_world():")
    model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    ids = torch.tensor([[4299, 23748, 62, 6894, 33529]])
    expected = model.generate(ids)
    from codegen_lm import CodeGenTokenizer

    assert out.stdout == CodeGenTokenizer.from_pretrained(tiny_checkpoint).decode(expected[0]) + "\n"


def test_loading_peak_memory_stays_below_1_3x_of_the_fp32_weights(real_shaped_bin):
    """Loading the 350M-shaped fp16 .bin into fp32 holds one copy of the weights, not two."""
    script = textwrap.dedent(f'''
        import torch
        from codegen_lm import CodeGenForCausalLM
        def status(key):
            for line in open("/proc/self/status"):
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        before = status("VmRSS")
        model = CodeGenForCausalLM.from_pretrained({str(real_shaped_bin)!r})
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print((status("VmHWM") - before) / weights)
    ''')
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1.3


def test_config_from_pretrained_names_and_overrides(tiny_checkpoint):
    assert CodeGenConfig.from_pretrained(tiny_checkpoint).n_embd == 64
    assert CodeGenConfig.from_pretrained(tiny_checkpoint / "config.json", n_layer=1).n_layer == 1
    with pytest.raises(ValueError, match="n_embd=64: must be divisible by n_head=5"):
        CodeGenConfig.from_pretrained(tiny_checkpoint, n_head=5)


def test_model_built_by_us_saves_a_checkpoint_transformers_reads(tmp_path):
    """A random model built by our own code (every parameter randomised, LayerNorms and biases too),
    saved by us, gives the same logits in transformers; and transformers' save of it loads back."""
    from .conftest import randomize

    config = CodeGenConfig(n_embd=96, n_layer=3, n_head=6, rotary_dim=4, n_inner=200, vocab_size=51200,
                           n_positions=128)
    ours = randomize(CodeGenForCausalLM.from_config(config), seed=21).eval()
    ours.save_pretrained(tmp_path / "ours")
    hf = load_hf(tmp_path / "ours")
    assert (logits(hf) - logits(ours)).abs().max() <= 1e-4
    hf.save_pretrained(tmp_path / "hf")
    assert torch.equal(logits(CodeGenForCausalLM.from_pretrained(tmp_path / "hf")), logits(ours))
