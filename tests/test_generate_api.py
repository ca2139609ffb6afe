"""`model.generate` as a `transformers` user calls it, against `transformers`' generate on random checkpoints:
generation_config.json defaults, return_dict_in_generate (scores, logits, compute_transition_scores),
processors and stopping criteria by name and as objects, streamers, beam search through generate, and one
clear error for every argument we do not implement."""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
import transformers

from codegen_lm import CodeGenForCausalLM
from codegen_lm.generation_config import GenerationConfig

from .conftest import load_hf
from .test_model_parity import random_ids

EOS = 50256


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    return load_hf(tiny_checkpoint), CodeGenForCausalLM.from_pretrained(tiny_checkpoint)


def hf_generate(hf, ids, **kwargs):
    kwargs.setdefault("pad_token_id", EOS)
    kwargs.setdefault("do_sample", False)
    return hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def liked_token(ours, ids, steps=12):
    """A token the model produces early on: as eos it ends some rows and beams early."""
    return int(ours.generate(ids[:1], max_new_tokens=steps)[0, ids.shape[1] + 3])


@torch.no_grad()
def test_generation_config_json_sets_the_defaults_and_arguments_override_them(tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    ids = random_ids(2, 6, seed=3, vocab=50000)
    base = CodeGenForCausalLM.from_pretrained(folder)
    eos = liked_token(base, ids)
    settings = {"max_new_tokens": 9, "repetition_penalty": 1.4, "no_repeat_ngram_size": 2, "eos_token_id": eos,
                "pad_token_id": 7, "do_sample": False}
    (folder / "generation_config.json").write_text(json.dumps(settings))
    hf, ours = load_hf(folder), CodeGenForCausalLM.from_pretrained(folder)
    assert ours.generation_config.max_new_tokens == 9 and ours.generation_config.pad_token_id == 7
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids))  # transformers reads the same file
    got = ours.generate(ids)
    assert torch.equal(got, expected) and got.shape[1] <= 6 + 9
    assert torch.equal(ours.generate(ids, max_new_tokens=4, repetition_penalty=1.0),
                       hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, repetition_penalty=1.0))
    # saved with the model, read back
    ours.save_pretrained(tmp_path / "saved")
    again = CodeGenForCausalLM.from_pretrained(tmp_path / "saved")
    assert again.generation_config.to_dict() == ours.generation_config.to_dict()
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "saved").max_new_tokens == 9


def test_unknown_and_unsupported_arguments_get_one_clear_error(pair, tiny_checkpoint, tmp_path):
    _, ours = pair
    ids = random_ids(1, 4, seed=1)
    with pytest.raises(ValueError, match=r"unknown argument.*: colour, num_beamz"):
        ours.generate(ids, num_beamz=2, colour="red")
    with pytest.raises(ValueError, match="not supported by codegen-lm: num_beam_groups=2"):
        ours.generate(ids, num_beams=4, num_beam_groups=2, diversity_penalty=0.0)
    with pytest.raises(ValueError, match=r"typical_p=0\.5"):
        ours.generate(ids, do_sample=True, typical_p=0.5)
    with pytest.raises(ValueError, match="output_attentions=True"):
        ours.generate(ids, return_dict_in_generate=True, output_attentions=True)
    with pytest.raises(ValueError, match="token_type_ids is not supported"):
        ours.generate(ids, token_type_ids=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="beam sampling"):
        ours.generate(ids, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_return_sequences \\(3\\) must be <= num_beams \\(2\\)"):
        ours.generate(ids, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="streamer cannot be used with beam search"):
        ours.generate(ids, num_beams=2, streamer=lambda t: None)
    # off values, and options that change nothing here, are accepted
    out = ours.generate(ids, max_new_tokens=3, use_cache=False, typical_p=1.0, num_beam_groups=1,
                        output_attentions=False, synced_gpus=False)
    assert out.shape == (1, 7)
    # an unsupported option set in the checkpoint's file names the file
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    (folder / "generation_config.json").write_text(json.dumps({"typical_p": 0.9, "do_sample": True}))
    model = CodeGenForCausalLM.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"generation_config\.json sets options codegen-lm does not support: "
                                         r"typical_p=0\.9"):
        model.generate(ids, max_new_tokens=2)
    assert model.generate(ids, max_new_tokens=2, typical_p=1.0).shape == (1, 6)
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json: not a readable JSON file"):
        CodeGenForCausalLM.from_pretrained(folder)


@torch.no_grad()
def test_greedy_scores_logits_and_transition_scores_match_transformers(pair):
    hf, ours = pair
    ids = random_ids(2, 5, seed=4, vocab=50000)
    eos = liked_token(ours, ids)
    kwargs = dict(max_new_tokens=10, return_dict_in_generate=True, output_scores=True, output_logits=True,
                  repetition_penalty=1.3, eos_token_id=eos)
    expected = hf_generate(hf, ids, **kwargs)
    got = ours.generate(ids, pad_token_id=EOS, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == len(got.logits) == got.sequences.shape[1] - 5
    finished = (got.sequences[:, 5:] == EOS)  # pad after an early eos: rows transformers kept computing
    for step, (a, b, la, lb) in enumerate(zip(got.scores, expected.scores, got.logits, expected.logits)):
        live = ~finished[:, step]
        torch.testing.assert_close(a[live], b[live], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(la[live], lb[live], rtol=1e-4, atol=1e-4)
    ours_t = ours.compute_transition_scores(got.sequences, got.scores, normalize_logits=True)
    hf_t = hf.compute_transition_scores(expected.sequences, expected.scores, normalize_logits=True)
    torch.testing.assert_close(ours_t[~finished], hf_t[~finished], rtol=1e-4, atol=1e-4)
    assert (ours_t[finished] == 0).all()  # a finished row's pad tokens read log-probability 0
    assert got["sequences"] is got.sequences and torch.equal(got[0], got.sequences)


@torch.no_grad()
def test_sampling_scores_are_transformers_warped_logits_with_its_top_k_default(pair):
    hf, ours = pair
    ids = random_ids(1, 5, seed=8, vocab=50000)
    got = ours.generate(ids, do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=8, seed=3,
                        return_dict_in_generate=True, output_scores=True, output_logits=True)
    T = ids.shape[1]
    hf_logits = hf(got.sequences).logits[0, T - 1 : -1]  # the logits each sampled token was drawn from
    warpers = [transformers.TemperatureLogitsWarper(0.7), transformers.TopKLogitsWarper(50),
               transformers.TopPLogitsWarper(0.9)]
    for step in range(got.sequences.shape[1] - T):
        context = got.sequences[:, : T + step]
        torch.testing.assert_close(got.logits[step][0], hf_logits[step], rtol=1e-4, atol=1e-4)
        expected = hf_logits[step][None].clone()
        for w in warpers:
            expected = w(context, expected)
        torch.testing.assert_close(got.scores[step], expected, rtol=1e-4, atol=1e-4)
        assert int(torch.isfinite(got.scores[step]).sum()) <= 50  # top_k 50 unless set, as in transformers
        assert torch.isfinite(got.scores[step][0, got.sequences[0, T + step]])  # the token drawn was allowed


@torch.no_grad()
def test_processors_by_name_and_as_objects_match_transformers(pair):
    hf, ours = pair
    ids = random_ids(2, 6, seed=5, vocab=50000)
    free = ours.generate(ids, max_new_tokens=12)[:, 6:]
    bad = [[int(free[0, 2])], [int(free[1, 4]), int(free[1, 5])]]
    cases = [
        dict(no_repeat_ngram_size=2, repetition_penalty=1.2),
        dict(bad_words_ids=bad),
        dict(suppress_tokens=[int(free[0, 0]), int(free[1, 1])], begin_suppress_tokens=[int(free[1, 0])]),
        dict(logits_processor=transformers.LogitsProcessorList(
            [transformers.NoRepeatNGramLogitsProcessor(3), transformers.MinLengthLogitsProcessor(9, EOS)])),
    ]
    for kwargs in cases:
        expected = hf_generate(hf, ids, max_new_tokens=12, **kwargs)
        assert torch.equal(ours.generate(ids, max_new_tokens=12, pad_token_id=EOS, **kwargs), expected), kwargs
    # a stopping criterion (transformers' own class, and a plain callable seeing [rows, len] and [rows, V])
    seen = []

    def after_five(input_ids, scores, **_):
        seen.append((tuple(input_ids.shape), tuple(scores.shape)))
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 6 + 5, dtype=torch.bool)

    got = ours.generate(ids, max_new_tokens=12, stopping_criteria=[after_five])
    assert got.shape[1] == 6 + 5
    # called once per new token of each prompt (its own request), with that prompt's row only
    assert sorted(s[0] for s in seen) == sorted((1, 6 + k) for k in range(1, 6) for _ in range(2))
    assert all(scores == (1, ours.config.vocab_size) for _, scores in seen)
    def broken(input_ids, scores):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):  # the caller's own exception, as from transformers' generate
        ours.generate(ids, max_new_tokens=3, logits_processor=[broken])
    criteria = transformers.StoppingCriteriaList([transformers.MaxLengthCriteria(max_length=6 + 4)])
    assert torch.equal(ours.generate(ids, max_new_tokens=12, stopping_criteria=criteria),
                       hf_generate(hf, ids, max_new_tokens=12, stopping_criteria=criteria))


@torch.no_grad()
def test_streamers_from_transformers_stream_what_transformers_streams(pair, hf_tokenizer, capsys):
    hf, ours = pair
    ids = random_ids(1, 5, seed=9, vocab=50000)
    text_streamer = transformers.TextStreamer(hf_tokenizer, skip_prompt=True)
    ours.generate(ids, max_new_tokens=12, streamer=text_streamer)
    ours_printed = capsys.readouterr().out
    hf_generate(hf, ids, max_new_tokens=12, streamer=transformers.TextStreamer(hf_tokenizer, skip_prompt=True))
    assert ours_printed == capsys.readouterr().out and ours_printed.strip()

    def collect(model_generate):
        streamer = transformers.TextIteratorStreamer(hf_tokenizer, skip_prompt=True)
        worker = threading.Thread(target=model_generate, args=(streamer,))
        worker.start()
        pieces = list(streamer)
        worker.join()
        return pieces

    ours_pieces = collect(lambda s: ours.generate(ids, max_new_tokens=12, streamer=s))
    hf_pieces = collect(lambda s: hf_generate(hf, ids, max_new_tokens=12, streamer=s))
    assert "".join(ours_pieces) == "".join(hf_pieces)

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.clone())

        def end(self):
            self.ended = True

    ours_rec, hf_rec = Recorder(), Recorder()
    ours.generate(ids, max_new_tokens=6, streamer=ours_rec)
    hf_generate(hf, ids, max_new_tokens=6, streamer=hf_rec)
    assert ours_rec.ended and hf_rec.ended and len(ours_rec.puts) == len(hf_rec.puts) == 7
    assert all(torch.equal(a.flatten(), b.flatten()) for a, b in zip(ours_rec.puts, hf_rec.puts))


@torch.no_grad()
def test_beam_search_through_generate_matches_transformers(pair):
    hf, ours = pair
    ids = random_ids(2, 5, seed=6, vocab=50000)
    eos = liked_token(ours, ids)
    for beams, n, penalty, early in ((3, 2, 1.0, False), (4, 4, 0.6, True), (2, 1, 1.5, "never")):
        kwargs = dict(num_beams=beams, num_return_sequences=n, length_penalty=penalty, early_stopping=early,
                      max_new_tokens=9, eos_token_id=eos, return_dict_in_generate=True, output_scores=True)
        expected = hf_generate(hf, ids, **kwargs)
        got = ours.generate(ids, pad_token_id=EOS, **kwargs)
        assert torch.equal(got.sequences, expected.sequences), kwargs
        torch.testing.assert_close(got.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.beam_indices, expected.beam_indices.long())
        ours_t = ours.compute_transition_scores(got.sequences, got.scores, got.beam_indices)
        hf_t = hf.compute_transition_scores(expected.sequences, expected.scores, expected.beam_indices)
        torch.testing.assert_close(ours_t, hf_t, rtol=1e-4, atol=1e-4)
    plain = ours.generate(ids, num_beams=3, max_new_tokens=6)
    assert torch.equal(plain, hf_generate(hf, ids, num_beams=3, max_new_tokens=6))


def test_generation_config_object(tmp_path):
    config = GenerationConfig(max_new_tokens=5, future_option=3)
    config.save_pretrained(tmp_path)
    back = GenerationConfig.from_pretrained(tmp_path)
    assert back.max_new_tokens == 5 and back.future_option == 3 and back.num_beams is None
    assert transformers.GenerationConfig.from_pretrained(tmp_path).max_new_tokens == 5
    assert not list(tmp_path.glob(".generation_config.*"))  # no temporary file left behind


@torch.no_grad()
def test_stop_strings_without_a_tokenizer_use_the_checkpoints(pair, hf_tokenizer):
    hf, ours = pair  # ours was loaded from a folder with tokenizer files: generate finds them itself
    ids = random_ids(1, 5, seed=12, vocab=50000)
    free = ours.generate(ids, max_new_tokens=20)[0, 5:].tolist()
    stop = hf_tokenizer.decode(free[6:8])
    expected = hf_generate(hf, ids, max_new_tokens=20, stop_strings=[stop], tokenizer=hf_tokenizer)
    got = ours.generate(ids, max_new_tokens=20, stop_strings=stop, pad_token_id=EOS)
    assert torch.equal(got, expected) and got.shape[1] < 5 + 20
