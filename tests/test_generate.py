"""`generate` against `transformers`' generate (greedy, repetition penalty, min_new_tokens, eos), plus seeds, stop
strings and limits. The sampler itself is tested against transformers' processors in test_sampler.py."""

from __future__ import annotations

import pytest
import torch

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.engine import TextStream

from .conftest import load_hf
from .test_model_parity import left_padding_mask, random_ids

EOS = 50256


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    return load_hf(tiny_checkpoint), CodeGenForCausalLM.from_pretrained(tiny_checkpoint)


def hf_generate(hf, ids, mask=None, **kwargs):
    kwargs.setdefault("pad_token_id", EOS)
    kwargs.setdefault("do_sample", False)
    return hf.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), **kwargs)


@torch.no_grad()
def test_greedy_left_padded_batch_is_token_identical_to_transformers(small_checkpoint):
    folder, _ = small_checkpoint
    hf, ours = load_hf(folder), CodeGenForCausalLM.from_pretrained(folder)
    ids = random_ids(3, 14, seed=11)
    mask = left_padding_mask([14, 9, 3], 14)
    ids = ids.masked_fill(mask == 0, EOS)
    expected = hf_generate(hf, ids, mask, max_new_tokens=24)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=24)
    assert torch.equal(got, expected)
    # each row alone gives the same continuation as inside the padded batch
    for row, n in enumerate([14, 9, 3]):
        alone = ours.generate(ids[row : row + 1, 14 - n :], max_new_tokens=24)
        assert torch.equal(alone[0, n:], got[row, 14:])


@torch.no_grad()
def test_repetition_penalty_and_min_new_tokens_match_transformers(pair):
    hf, ours = pair
    ids = random_ids(2, 10, seed=12)
    for penalty in (1.3, 0.8):
        expected = hf_generate(hf, ids, max_new_tokens=20, repetition_penalty=penalty)
        assert torch.equal(ours.generate(ids, max_new_tokens=20, repetition_penalty=penalty), expected)
    # make the first greedy token the eos: without min_new_tokens generation ends at once
    first = int(ours.generate(ids[:1], max_new_tokens=1)[0, -1])
    short = ours.generate(ids[:1], max_new_tokens=10, eos_token_id=first)
    assert short.shape[1] == 11
    expected = hf_generate(hf, ids[:1], max_new_tokens=10, min_new_tokens=4, eos_token_id=first, pad_token_id=first)
    got = ours.generate(ids[:1], max_new_tokens=10, min_new_tokens=4, eos_token_id=first)
    assert torch.equal(got, expected)
    assert first not in got[0, 10:14].tolist()


@torch.no_grad()
def test_eos_ends_a_row_and_pads_the_rest(pair):
    hf, ours = pair
    ids = random_ids(2, 8, seed=13)
    free = ours.generate(ids, max_new_tokens=12)
    eos = int(free[0, 8 + 3])  # row 0 stops after its 4th token
    got = ours.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    expected = hf_generate(hf, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    assert got[0, 12:].tolist() == [0] * (got.shape[1] - 12)
    # a list of eos ids works too, and generation stops when every row has finished
    both = ours.generate(ids, max_new_tokens=12, eos_token_id=[eos, int(free[1, 8])])
    assert both.shape[1] == 8 + 4


@torch.no_grad()
def test_seeded_sampling_repeats_and_does_not_depend_on_batch_company(pair):
    _, ours = pair
    ids = random_ids(2, 6, seed=14)
    kwargs = dict(max_new_tokens=10, do_sample=True, temperature=1.0, top_p=0.95, num_return_sequences=3, seed=5)
    a = ours.generate(ids, **kwargs)
    assert a.shape == (6, 16)
    assert torch.equal(a, ours.generate(ids, **kwargs))
    assert not torch.equal(a, ours.generate(ids, **{**kwargs, "seed": 6}))
    assert torch.equal(ours.generate(ids[:1], **kwargs), a[:3])  # first prompt's samples, with or without the second
    assert len({tuple(r) for r in a[:3, 6:].tolist()}) > 1  # the samples of one prompt differ
    assert torch.equal(a[:3, :6], ids[:1].expand(3, 6))
    # top_k=1 sampling is greedy
    greedy = ours.generate(ids, max_new_tokens=10)
    assert torch.equal(ours.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, seed=0), greedy)
    # temperature 0 means greedy even with do_sample
    assert torch.equal(ours.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.0), greedy)


@torch.no_grad()
def test_stop_strings_split_across_tokens(pair, tiny_checkpoint):
    _, ours = pair
    tok = CodeGenTokenizerFast.from_pretrained(tiny_checkpoint)
    ids = random_ids(1, 5, seed=15, vocab=50000)
    free = ours.generate(ids, max_new_tokens=30)[0, 5:].tolist()
    texts = [tok.decode(free[: i + 1]) for i in range(len(free))]
    # a stop string made of the end of token 5 and the start of token 6
    piece5, piece6 = tok.decode([free[5]]), tok.decode([free[6]])
    assert piece5 and piece6
    stop = piece5[-1] + piece6[0]
    first = min(i for i, t in enumerate(texts) if stop in t)
    out = ours.generate(ids, max_new_tokens=30, stop=[stop], tokenizer=tok)
    assert out[0, 5:].tolist() == free[: first + 1]  # ends with the token that completed the stop string
    stream = TextStream(tok, [stop])
    text = "".join(stream.push(t) for t in out[0, 5:].tolist()) + stream.finish()
    assert stream.stopped and text == texts[first][: texts[first].index(stop)]


def test_text_stream_holds_back_partial_characters_and_stop_prefixes(tiny_checkpoint):
    tok = CodeGenTokenizerFast.from_pretrained(tiny_checkpoint)
    ids = tok.encode("héllo 😀 wor\nld\ndef x")
    stream = TextStream(tok, ["\ndef"])
    deltas = [stream.push(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)  # never half a character
    assert "".join(deltas) + stream.finish() == "héllo 😀 wor\nld"
    assert stream.stopped
    plain = TextStream(tok)
    assert "".join(plain.push(i) for i in ids) + plain.finish() == "héllo 😀 wor\nld\ndef x"
    with pytest.raises(ValueError, match="stop strings must not be empty"):
        TextStream(tok, [""])


@torch.no_grad()
def test_limits_and_bad_arguments(pair):
    _, ours = pair
    n_pos = ours.config.n_positions  # 256
    with pytest.raises(ValueError, match=f"prompt of {n_pos} tokens does not fit the model's context of {n_pos}"):
        ours.generate(torch.zeros(1, n_pos, dtype=torch.long))
    near_end = ours.generate(torch.zeros(1, n_pos - 3, dtype=torch.long), max_new_tokens=50)
    assert near_end.shape[1] == n_pos  # clamped to the context, not an error
    assert ours.generate(torch.zeros(1, 4, dtype=torch.long)).shape[1] == 4 + 128  # the default is not 20 tokens
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        ours.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        ours.generate(torch.zeros(1, 4, dtype=torch.long), do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be"):
        ours.generate(torch.zeros(1, 4, dtype=torch.long), do_sample=True, temperature=-1.0)
    with pytest.raises(ValueError, match="a prompt row has no tokens"):
        ours.generate(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1] * 4, [0] * 4]))
    seen = []
    ours.generate(torch.zeros(2, 4, dtype=torch.long), max_new_tokens=3, streamer=seen.append)
    assert len(seen) == 3 and all(t.shape == (2,) for t in seen)
