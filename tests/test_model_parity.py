"""Our network against `transformers` on random checkpoints it saved (every parameter randomised)."""

from __future__ import annotations

import pytest
import torch

from codegen_lm import CodeGenConfig, CodeGenForCausalLM, CodeGenModel

from .conftest import load_hf

TOL = 1e-4


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 50295) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padding_mask(lengths: list[int], width: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    return mask


@torch.no_grad()
def test_logits_match_transformers(small_checkpoint):
    folder, _ = small_checkpoint
    hf, ours = load_hf(folder), CodeGenForCausalLM.from_pretrained(folder)
    ids = random_ids(3, 23)
    expected = hf(ids).logits
    got = ours(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL
    # the default (sdpa) implementation of transformers agrees too
    hf_sdpa = type(hf).from_pretrained(folder).eval()
    assert (hf_sdpa(ids).logits - got).abs().max().item() <= TOL


@torch.no_grad()
def test_left_padded_batch_matches_transformers_and_is_padding_invariant(small_checkpoint):
    folder, _ = small_checkpoint
    hf, ours = load_hf(folder), CodeGenForCausalLM.from_pretrained(folder)
    lengths = [19, 11, 4]
    ids = random_ids(3, 19, seed=1)
    mask = left_padding_mask(lengths, 19)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf(ids, attention_mask=mask, position_ids=positions).logits
    got = ours(ids, attention_mask=mask).logits  # positions come from the mask
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL
    assert torch.isfinite(got).all()  # fully masked padding rows stay finite
    for row, n in enumerate(lengths):
        alone = ours(ids[row : row + 1, 19 - n :]).logits[0]
        assert (alone - got[row, 19 - n :]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_kv_cache_decoding_equals_full_forward(small_checkpoint):
    folder, _ = small_checkpoint
    ours = CodeGenForCausalLM.from_pretrained(folder)
    ids = random_ids(2, 20, seed=2)
    mask = left_padding_mask([20, 13], 20)
    full = ours(ids, attention_mask=mask).logits
    out = ours(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
    pieces, cache = [out.logits], out.past_key_values
    for t in range(8, 20, 3):  # several tokens at a time, then one
        out = ours(ids[:, t : t + 3], attention_mask=mask[:, : t + 3], past_key_values=cache)
        pieces.append(out.logits)
    assert cache.get_seq_length() == 20
    inc = torch.cat(pieces, dim=1)
    real = mask.bool()
    assert (inc[real] - full[real]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_hidden_states_loss_and_token_type_ids_match(small_checkpoint):
    folder, _ = small_checkpoint
    hf, ours = load_hf(folder), CodeGenForCausalLM.from_pretrained(folder)
    ids = random_ids(2, 15, seed=3)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 9:] = -100
    expected = hf(ids, labels=labels, output_hidden_states=True)
    got = ours(ids, labels=labels, output_hidden_states=True)
    assert abs(got.loss.item() - expected.loss.item()) <= TOL
    assert len(got.hidden_states) == len(expected.hidden_states) == hf.config.n_layer + 1
    for a, b in zip(got.hidden_states, expected.hidden_states):
        assert (a - b).abs().max().item() <= TOL
    base = CodeGenModel.from_pretrained(folder)
    assert (base(ids).last_hidden_state - expected.hidden_states[-1]).abs().max().item() <= TOL
    token_types = random_ids(2, 15, seed=4)
    typed = ours(ids, token_type_ids=token_types).logits - hf(ids, token_type_ids=token_types).logits
    assert typed.abs().max() <= TOL


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@torch.no_grad()
def test_half_precision_matches_transformers_eager(tiny_checkpoint, dtype, tol):
    hf = load_hf(tiny_checkpoint, dtype)
    ours = CodeGenForCausalLM.from_pretrained(tiny_checkpoint, dtype=dtype)
    assert ours.dtype == dtype
    ids = random_ids(2, 31, seed=5)
    got, expected = ours(ids).logits, hf(ids).logits
    assert got.dtype == dtype
    # same maths as the fp32 model, up to half-precision rounding
    assert (got.float() - expected.float()).abs().max().item() <= tol
    fp32 = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)(ids).logits
    assert (got.float() - fp32).abs().max().item() <= 10 * tol


def test_half_precision_attention_scores_are_fp32(tiny_checkpoint, monkeypatch):
    """The scores and softmax of a half-precision model are computed in fp32 (as the reference's
    eager path): a score beyond fp16's range must not overflow to inf/NaN."""
    from codegen_lm import model as model_module

    seen = []
    real_softmax = torch.Tensor.softmax

    def spy(self, *args, **kwargs):
        seen.append(self.dtype)
        return real_softmax(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "softmax", spy)
    q = torch.full((1, 1, 2, 8), 200.0, dtype=torch.float16)  # q.k = 320000 > fp16 max
    out = model_module.attention(q, q.clone(), torch.ones(1, 1, 2, 8, dtype=torch.float16), None, True, 0.0)
    assert seen == [torch.float32]
    assert torch.isfinite(out).all() and out.dtype == torch.float16


@torch.no_grad()
def test_null_rotary_dim_rotates_the_whole_head(tiny_checkpoint):
    config = CodeGenConfig.from_pretrained(tiny_checkpoint)
    full = CodeGenConfig.from_dict({**config.to_dict(), "rotary_dim": config.head_dim})
    none = CodeGenConfig.from_dict({**config.to_dict(), "rotary_dim": None})
    a, b = CodeGenForCausalLM(full).eval(), CodeGenForCausalLM(none).eval()
    b.load_state_dict(a.state_dict())
    ids = random_ids(1, 9)
    assert torch.equal(a(ids).logits, b(ids).logits)


@torch.no_grad()
def test_real_shaped_350M_fp16_bin_matches_transformers(real_shaped_bin):
    """The hub's layout for codegen-350M: fp16 pytorch_model.bin with legacy buffers, loaded in fp32."""
    hf = load_hf(real_shaped_bin)
    ours = CodeGenForCausalLM.from_pretrained(real_shaped_bin)
    assert ours.dtype == torch.float32
    assert ours.num_parameters() == 356_712_448
    ids = random_ids(2, 40, seed=6)
    mask = left_padding_mask([40, 25], 40)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf(ids, attention_mask=mask, position_ids=positions).logits
    got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL
    prompt = left_padding_mask([12, 7], 12)
    hf_out = hf.generate(ids[:, :12], attention_mask=prompt, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    assert torch.equal(ours.generate(ids[:, :12], attention_mask=prompt, max_new_tokens=12), hf_out)


def test_forward_rejects_bad_input(tiny_checkpoint):
    ours = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="token id 51200, outside the vocabulary of 51200"):
        ours(torch.tensor([[1, 51200]]))
    with pytest.raises(ValueError, match="exceeds the model's context of 256 positions"):
        ours(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ours(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        ours(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="labels have shape"):
        ours(torch.zeros(1, 3, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long))
