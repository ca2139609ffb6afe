"""CodeGenConfig: aliases, the released configs, legacy keys, validation, and interchange with transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from codegen_lm import RELEASED_CHECKPOINTS, CodeGenConfig, CodeGenForCausalLM

# config.json of Salesforce/codegen-350M-mono as first published (2022): legacy keys included.
RELEASED_350M_MONO_JSON = {
    "_name_or_path": "codegen-350M-mono", "activation_function": "gelu_new",
    "architectures": ["CodeGenForCausalLM"], "attn_pdrop": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0,
    "eos_token_id": 50256, "gradient_checkpointing": False, "initializer_range": 0.02, "layer_norm_epsilon": 1e-05,
    "model_type": "codegen", "n_ctx": 2048, "n_embd": 1024, "n_head": 16, "n_inner": None, "n_layer": 20,
    "n_positions": 2048, "resid_pdrop": 0.0, "rotary_dim": 32, "scale_attn_weights": True,
    "summary_activation": None, "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
    "summary_type": "cls_index", "summary_use_proj": True,
    "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50, "temperature": 1.0}},
    "tie_word_embeddings": False, "tokenizer_class": "GPT2Tokenizer", "torch_dtype": "float16",
    "transformers_version": "4.21.0.dev0", "use_cache": True, "vocab_size": 51200,
}

# Parameter counts (lm_head included) of the released sizes, from the model cards.
RELEASED_PARAMETERS = {"350M": 356_712_448, "2B": 2_779_356_160, "6B": 7_064_213_504, "16B": 16_032_155_648}


def test_aliases_read_and_write_the_same_fields():
    config = CodeGenConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128,
                           rotary_dim=8)
    assert (config.n_embd, config.n_layer, config.n_head, config.n_positions) == (64, 3, 4, 128)
    config.num_hidden_layers = 5
    assert config.n_layer == 5 and config.num_hidden_layers == 5
    assert config.hidden_size == 64 and config.max_position_embeddings == 128 and config.head_dim == 16
    with pytest.raises(ValueError, match="both 'n_embd' and its alias 'hidden_size'"):
        CodeGenConfig(n_embd=64, hidden_size=64)


def test_defaults_match_transformers():
    ours, theirs = CodeGenConfig().to_dict(), transformers.CodeGenConfig()
    for key, value in ours.items():
        if key not in ("architectures", "dtype"):
            assert getattr(theirs, key, None) == value, key  # 5.x has no pad_token_id: None


@pytest.mark.parametrize("size", list(RELEASED_PARAMETERS))
def test_released_configs_are_known_offline(size):
    for data in ("nl", "multi", "mono"):
        config = CodeGenConfig.from_pretrained(f"Salesforce/codegen-{size}-{data}")
        assert config.vocab_size == 51200 and config.n_positions == 2048 and not config.tie_word_embeddings
        assert config.eos_token_id == 50256 and config.activation_function == "gelu_new"
    with torch.device("meta"):
        model = CodeGenForCausalLM(config)
    assert model.num_parameters() == RELEASED_PARAMETERS[size]
    hf_config = transformers.CodeGenConfig(**config.to_dict())
    with torch.device("meta"):
        hf_model = transformers.CodeGenForCausalLM(hf_config)
    assert sum(p.numel() for p in hf_model.parameters()) == RELEASED_PARAMETERS[size]


def test_released_config_json_with_legacy_keys_round_trips(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_350M_MONO_JSON))
    config = CodeGenConfig.from_pretrained(tmp_path)
    assert (config.n_embd, config.n_layer, config.rotary_dim, config.torch_dtype) == (1024, 20, 32, "float16")
    assert config.extra["scale_attn_weights"] is True and config.extra["summary_type"] == "cls_index"
    released = CodeGenConfig.from_pretrained("Salesforce/codegen-350M-mono")
    assert {k: v for k, v in config.to_dict().items() if k not in config.extra} == {
        k: v for k, v in released.to_dict().items() if k not in released.extra and k != "architectures"}
    # everything we do not model survives a save
    config.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in RELEASED_350M_MONO_JSON.items():
        if key != "torch_dtype":
            assert written[key] == value, key
    assert written["dtype"] == "float16"
    # transformers reads what we wrote, field for field
    hf = transformers.CodeGenConfig.from_pretrained(tmp_path / "out")
    for field in ("n_embd", "n_layer", "n_head", "rotary_dim", "n_positions", "vocab_size", "bos_token_id",
                  "eos_token_id", "layer_norm_epsilon", "activation_function", "tie_word_embeddings", "n_inner"):
        assert getattr(hf, field) == getattr(config, field), field
    assert hf.dtype == torch.float16


def test_reads_what_transformers_writes(tmp_path):
    hf = transformers.CodeGenConfig(n_embd=96, n_layer=3, n_head=6, rotary_dim=4, n_inner=200, eos_token_id=2,
                                    activation_function="gelu", layer_norm_epsilon=1e-6, dtype="bfloat16")
    hf.save_pretrained(tmp_path)
    ours = CodeGenConfig.from_pretrained(tmp_path)
    assert (ours.n_embd, ours.n_layer, ours.n_head, ours.rotary_dim, ours.n_inner) == (96, 3, 6, 4, 200)
    assert ours.eos_token_id == 2 and ours.activation_function == "gelu" and ours.layer_norm_epsilon == 1e-6
    assert ours.torch_dtype == "bfloat16" and ours.inner_dim == 200


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n_embd=64, n_head=5), "n_embd=64: must be divisible by n_head=5"),
        (dict(n_embd=64, n_head=4, rotary_dim=7), "rotary_dim=7: must be even"),
        (dict(n_embd=64, n_head=4, rotary_dim=32), "rotary_dim=32: must not exceed the head dimension"),
        (dict(n_embd=64, n_head=4, rotary_dim=0), "rotary_dim=0: must be a positive integer"),
        (dict(activation_function="gelu_weird"), "activation_function='gelu_weird': unknown activation"),
        (dict(n_layer=0), "n_layer=0: must be a positive integer"),
        (dict(n_layer=2.5), "n_layer=2.5: must be a positive integer"),
        (dict(vocab_size=-3), "vocab_size=-3"),
        (dict(attn_pdrop=1.5), "attn_pdrop=1.5: must be a probability"),
        (dict(layer_norm_epsilon=0), "layer_norm_epsilon=0"),
        (dict(vocab_size=100, eos_token_id=100), "eos_token_id=100: must be a token id below vocab_size=100"),
        (dict(n_inner=-1), "n_inner=-1"),
        (dict(n_embd=6, n_head=1, rotary_dim=2), "n_embd=6: must be divisible by 4"),
    ],
)
def test_invalid_configs_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CodeGenConfig(**kwargs)


def test_bad_config_files_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(ValueError, match=r"config\.json: config has model_type='gpt2'"):
        CodeGenConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object"):
        CodeGenConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 64, "n_head": 3}))
    with pytest.raises(ValueError, match=r"config\.json: invalid CodeGenConfig: n_embd=64"):
        CodeGenConfig.from_pretrained(tmp_path)


def test_released_table_has_twelve_names():
    assert len(RELEASED_CHECKPOINTS) == 12
    assert {name.split("-")[1] for name in RELEASED_CHECKPOINTS} == {"350M", "2B", "6B", "16B"}
