"""Fixtures: random checkpoints saved by `transformers` (every parameter randomised) and the real
CodeGen tokenizer files laid out as on the hub."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from codegen_lm.tokenizer.vocab import ASSETS


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands under test may call torch.set_num_threads (--threads); later tests must not inherit it
    (a different thread count changes float reduction order, and exact-equality tests notice)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


transformers.logging.set_verbosity_error()
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Kernel choices (kernels/registry.py) are measured into a file of this test run, not the user's cache;
# commands the tests start inherit it, so they choose as the tests' own engines do.
os.environ["CODEGEN_LM_KERNEL_CACHE"] = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"codegen-lm-test-kernels-{os.getpid()}.json")

# Shapes the parity tests run on: head_dim > rotary_dim, rotary over the whole head, heads that
# straddle the 4 "mp_num" blocks of the fused projection, a non-default n_inner (odd: kernels that take
# weight rows four at a time meet a remainder) and activation.
SMALL_SHAPES = {
    "rotary-part": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "rotary-full": dict(n_embd=64, n_layer=2, n_head=8, rotary_dim=8),
    "straddle": dict(n_embd=96, n_layer=3, n_head=6, rotary_dim=4, n_inner=201),
    "erf-gelu": dict(n_embd=32, n_layer=1, n_head=2, rotary_dim=16, activation_function="gelu"),
}


def hf_config(**overrides) -> transformers.CodeGenConfig:
    kwargs = dict(vocab_size=51200, n_positions=256, n_ctx=256, bos_token_id=1, eos_token_id=50256,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    return transformers.CodeGenConfig(**kwargs)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Give every parameter random values: LayerNorm weights near 1, everything else around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if ".ln" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(scale * noise)
    return model


def make_hf_model(seed: int = 0, **shape) -> transformers.CodeGenForCausalLM:
    torch.manual_seed(seed)
    model = transformers.CodeGenForCausalLM(hf_config(**shape))
    return randomize(model, seed).eval()


def load_hf(folder: Path, dtype: torch.dtype = torch.float32) -> transformers.CodeGenForCausalLM:
    return transformers.CodeGenForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=dtype).eval()


def write_tokenizer_files(folder: Path) -> None:
    """The real vocabulary, laid out as the hub's CodeGen repositories have it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        shutil.copy(ASSETS / name, folder / name)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "add_prefix_space": False, "model_max_length": 2048, "tokenizer_class": "CodeGenTokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session", params=list(SMALL_SHAPES))
def small_checkpoint(request, tmp_path_factory) -> tuple[Path, str]:
    """(folder, shape name): a random model saved by transformers as safetensors, with tokenizer."""
    folder = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    make_hf_model(seed=len(request.param), **SMALL_SHAPES[request.param]).save_pretrained(folder)
    write_tokenizer_files(folder)
    return folder, request.param


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One small random checkpoint (safetensors + tokenizer files) for tests that need just one."""
    folder = tmp_path_factory.mktemp("ckpt-tiny")
    make_hf_model(seed=7, **SMALL_SHAPES["rotary-part"]).save_pretrained(folder)
    write_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory) -> Path:
    """A small random CodeGen with the released models' 2,048-position context (for the server)."""
    folder = tmp_path_factory.mktemp("ckpt-serve")
    make_hf_model(seed=11, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=2048,
                  n_ctx=2048).save_pretrained(folder)
    write_tokenizer_files(folder)
    return folder


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    """Our model loaded from tiny_checkpoint (one per test module: tests may swap its modules)."""
    from codegen_lm import CodeGenForCausalLM

    return CodeGenForCausalLM.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from codegen_lm import CodeGenTokenizerFast

    return CodeGenTokenizerFast.from_pretrained(tiny_checkpoint)


def legacy_fp16_state_dict(model: torch.nn.Module, n_positions: int) -> dict[str, torch.Tensor]:
    """What the hub's 2022 `.bin` files hold: fp16 weights plus buffers that are not weights."""
    state = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}
    mask = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool)).view(1, 1, n_positions, n_positions)
    for i in range(model.config.n_layer):
        state[f"transformer.h.{i}.attn.causal_mask"] = mask
        state[f"transformer.h.{i}.attn.bias"] = mask
        state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e9)
    return state


@pytest.fixture(scope="session")
def real_shaped_bin(tmp_path_factory) -> Path:
    """A 350M-shaped CodeGen (random weights) stored as the hub stores it: one fp16 pytorch_model.bin
    with legacy buffers, and config.json with torch_dtype float16."""
    from codegen_lm import CodeGenConfig

    folder = tmp_path_factory.mktemp("ckpt-350M")
    config = CodeGenConfig.from_pretrained("Salesforce/codegen-350M-mono")
    hf_cfg = transformers.CodeGenConfig(**{k: v for k, v in config.to_dict().items() if k != "dtype"})
    with torch.device("meta"):
        model = transformers.CodeGenForCausalLM(hf_cfg)
    model = model.to_empty(device="cpu")
    randomize(model, seed=350, scale=0.02)
    torch.save(legacy_fp16_state_dict(model, 2048), folder / "pytorch_model.bin")
    del model
    data = config.to_dict()
    data.pop("dtype")
    data["torch_dtype"] = "float16"
    (folder / "config.json").write_text(json.dumps(data))
    write_tokenizer_files(folder)
    return folder


def scripted_checkpoint(folder: Path, prompt: str, completion: str) -> Path:
    """A checkpoint whose greedy continuation of `prompt` is exactly `completion`, then end of text: its
    blocks are identities (zero output projections), so the logits depend on the last token alone, and
    lm_head maps each token of the script to the next one (a bigram machine). For testing what a
    command does with a known model output. The script's tokens after the prompt's last must be distinct."""
    from codegen_lm import CodeGenConfig, CodeGenForCausalLM, CodeGenTokenizerFast

    write_tokenizer_files(folder)
    tok = CodeGenTokenizerFast.from_pretrained(folder)
    ids = tok.encode(prompt + completion)
    prompt_ids = tok.encode(prompt)
    assert ids[: len(prompt_ids)] == prompt_ids, "the completion must not merge with the prompt's last token"
    chain = [prompt_ids[-1], *ids[len(prompt_ids):], tok.eos_token_id]
    assert len(set(chain[:-1])) == len(chain) - 1, "the script repeats a token"
    config = CodeGenConfig(vocab_size=len(tok), n_embd=64, n_layer=1, n_head=4, rotary_dim=8, n_positions=256,
                           n_ctx=256)
    torch.manual_seed(0)
    model = CodeGenForCausalLM.from_config(config)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.out_proj.weight.zero_()
            block.mlp.fc_out.weight.zero_()
            block.mlp.fc_out.bias.zero_()
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        for token, following in itertools.pairwise(chain):
            model.lm_head.weight[following] += 10 * model.transformer.ln_f(model.transformer.wte.weight[token])
    model.save_pretrained(folder)
    return folder
