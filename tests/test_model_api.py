"""The model's `transformers`-shaped habits: module names as in the checkpoint (what target_modules lists
name), the embedding accessors, and resize_token_embeddings against transformers' own."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from codegen_lm import CodeGenConfig, CodeGenForCausalLM
from codegen_lm.model import CodeGenModel

from .conftest import load_hf, make_hf_model

SHAPE = dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=300, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt-resize")
    make_hf_model(seed=3, **SHAPE).save_pretrained(folder)
    return folder


def test_module_names_are_the_checkpoints():
    model = CodeGenForCausalLM.from_config(CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4,
                                                         vocab_size=100, eos_token_id=0))
    hf = transformers.CodeGenForCausalLM(transformers.CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4,
                                                                    vocab_size=100, eos_token_id=0, bos_token_id=0))
    ours = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    theirs = {n for n, m in hf.named_modules() if isinstance(m, nn.Linear)}
    assert ours == theirs == {"transformer.h.0.attn.qkv_proj", "transformer.h.0.attn.out_proj",
                              "transformer.h.0.mlp.fc_in", "transformer.h.0.mlp.fc_out", "lm_head"}
    assert set(dict(model.named_parameters())) <= set(hf.state_dict())


def test_embedding_accessors():
    config = CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=100, eos_token_id=0)
    model = CodeGenForCausalLM.from_config(config)
    assert model.get_input_embeddings() is model.transformer.wte
    assert model.get_output_embeddings() is model.lm_head
    emb, head = nn.Embedding(100, 32), nn.Linear(32, 100)
    model.set_input_embeddings(emb)
    model.set_output_embeddings(head)
    assert model.transformer.wte is emb and model.lm_head is head
    bare = CodeGenModel(config)
    assert bare.get_input_embeddings() is bare.wte and bare.get_output_embeddings() is None
    with pytest.raises(AttributeError, match="no lm_head"):
        bare.set_output_embeddings(head)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("new, pad", [(331, None), (270, None), (301, 64), (None, 7)])
@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resize_matches_transformers(checkpoint, new, pad, mean_resizing, tmp_path):
    hf = load_hf(checkpoint)
    ours = CodeGenForCausalLM.from_pretrained(checkpoint)
    ids = torch.randint(0, 270, (2, 9))
    before = logits(ours, ids)
    torch.manual_seed(11)
    hf_emb = hf.resize_token_embeddings(new, pad_to_multiple_of=pad, mean_resizing=mean_resizing)
    torch.manual_seed(11)
    emb = ours.resize_token_embeddings(new, pad_to_multiple_of=pad, mean_resizing=mean_resizing)
    size = hf_emb.weight.shape[0]
    assert emb is ours.transformer.wte and emb.num_embeddings == size == ours.config.vocab_size == hf.config.vocab_size
    assert ours.lm_head.weight.shape == (size, 64) and ours.lm_head.bias.shape == (size,)
    assert ours.lm_head.out_features == size
    # the same draws from the same RNG state: equal to the bit
    assert torch.equal(emb.weight, hf_emb.weight)
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight) and torch.equal(ours.lm_head.bias, hf.lm_head.bias)
    # old tokens keep their rows and their logits
    after = logits(ours, ids)
    keep = min(300, size)
    assert torch.allclose(after[..., :keep], before[..., :keep], atol=1e-5)
    assert (after - logits(hf, ids)).abs().max() <= 1e-4
    if size > 300 and mean_resizing:  # new rows: the old rows' mean, spread 1e-9 x the covariance (tiny)
        old = load_hf(checkpoint)
        mean = old.transformer.wte.weight.mean(0)
        assert (emb.weight[300:] - mean).abs().max() < 1e-4  # std ~3e-6 here
        assert torch.allclose(ours.lm_head.bias[300:], old.lm_head.bias.mean().expand(size - 300), atol=1e-6)
    elif size > 300:  # N(0, initializer_range) weights, zero bias
        assert ours.lm_head.bias[300:].abs().max() == 0
        assert abs(emb.weight[300:].std().item() - ours.config.initializer_range) < 0.005
    # save and load round trip, in both libraries
    ours.save_pretrained(tmp_path / "resized")
    back = CodeGenForCausalLM.from_pretrained(tmp_path / "resized")
    assert back.config.vocab_size == size and torch.equal(logits(back, ids), after)
    assert (logits(load_hf(tmp_path / "resized"), ids) - after).abs().max() <= 1e-4


def test_resize_edge_cases(checkpoint, tmp_path):
    ours = CodeGenForCausalLM.from_pretrained(checkpoint)
    wte = ours.transformer.wte.weight
    assert ours.resize_token_embeddings() is ours.transformer.wte and ours.transformer.wte.weight is wte
    assert ours.resize_token_embeddings(300).weight is wte  # same size: nothing changes
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="new_num_tokens must be a positive integer"):
            ours.resize_token_embeddings(bad)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive integer"):
        ours.resize_token_embeddings(310, pad_to_multiple_of=0)
    # fewer rows than dimensions: the covariance is singular and new rows are the mean itself, as in transformers
    make_hf_model(seed=1, **dict(SHAPE, vocab_size=40)).save_pretrained(tmp_path / "small")
    hf, ours = load_hf(tmp_path / "small"), CodeGenForCausalLM.from_pretrained(tmp_path / "small")
    torch.manual_seed(0)
    hf.resize_token_embeddings(50)
    torch.manual_seed(0)
    ours.resize_token_embeddings(50)
    assert torch.equal(ours.transformer.wte.weight, hf.transformer.wte.weight)
    assert torch.equal(ours.transformer.wte.weight[45], hf.transformer.wte.weight[:40].mean(0))
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight) and torch.equal(ours.lm_head.bias, hf.lm_head.bias)


@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resize_tied_embeddings_matches_transformers(tmp_path, mean_resizing):
    make_hf_model(seed=2, **dict(SHAPE, tie_word_embeddings=True)).save_pretrained(tmp_path)
    hf, ours = load_hf(tmp_path), CodeGenForCausalLM.from_pretrained(tmp_path)
    for size in (340, 280):
        torch.manual_seed(4)
        hf.resize_token_embeddings(size, mean_resizing=mean_resizing)
        torch.manual_seed(4)
        ours.resize_token_embeddings(size, mean_resizing=mean_resizing)
        assert ours.lm_head.weight is ours.transformer.wte.weight
        assert torch.equal(ours.transformer.wte.weight, hf.transformer.wte.weight)
        assert torch.equal(ours.lm_head.bias, hf.lm_head.bias) and ours.lm_head.out_features == size
        ids = torch.randint(0, 280, (1, 7))
        assert (logits(ours, ids) - logits(hf, ids)).abs().max() <= 1e-4


def test_resize_with_tied_embeddings_and_requires_grad():
    config = CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=100, eos_token_id=0,
                           tie_word_embeddings=True)
    model = CodeGenForCausalLM.from_config(config)
    model.lm_head.bias.requires_grad_(False)
    model.resize_token_embeddings(130)
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.shape == (130, 32)
    assert model.lm_head.bias.shape == (130,) and not model.lm_head.bias.requires_grad
    assert model.transformer.wte.weight.requires_grad  # the shared weight follows the embedding
    ids = torch.tensor([[1, 129, 5]])
    model(ids, labels=ids).loss.backward()
    assert model.transformer.wte.weight.grad.shape == (130, 32)


def test_resize_refuses_an_int8_head():
    from codegen_lm.quantize import quantize_model

    model = CodeGenForCausalLM.from_config(CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4,
                                                         vocab_size=100, eos_token_id=0))
    quantize_model(model)
    with pytest.raises(TypeError, match="resize before quantizing"):
        model.resize_token_embeddings(120)
