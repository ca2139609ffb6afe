"""transformers' logits processors beyond the sampler's own (no_repeat_ngram_size, bad_words_ids,
suppress_tokens, begin_suppress_tokens), the caller's logits processors and stopping criteria, and the
recorded scores and logits (output_scores / output_logits): the processor stage against transformers'
own processor classes on random scores and contexts, and the engine's greedy and sampled outputs
against transformers' generate and processors."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import StoppingCriteriaList

from codegen_lm import CodeGenForCausalLM
from codegen_lm.engine import Engine, EngineError, GenerationParams
from codegen_lm.engine.processors import RequestProcessors, RowExtras, warp
from codegen_lm.engine.sampler import process

from .conftest import load_hf

EOS = 50256


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    return load_hf(tiny_checkpoint), CodeGenForCausalLM.from_pretrained(tiny_checkpoint)


def contexts(rows: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """Random contexts over a small alphabet, so that n-grams and bad-word prefixes repeat."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows, length), generator=g)


def ours(params: GenerationParams, ids: torch.Tensor, scores: torch.Tensor, generated: int, eos=(EOS,)):
    procs = RequestProcessors(params, eos)
    seen = torch.zeros(ids.shape[0], scores.shape[1], dtype=torch.bool)
    seen.scatter_(1, ids, True)
    extras = [RowExtras(procs, row, generated, 0) for row in ids.tolist()]
    banned = [sorted(eos) if generated < params.min_new_tokens else ()] * ids.shape[0]
    return process(scores, params, seen, torch.arange(ids.shape[0]), banned, [None] * ids.shape[0], None, extras)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_equals_transformers(n):
    vocab = 40
    for seed, length in enumerate((1, 2, 3, 5, 9, 30)):
        ids = contexts(4, length, 6, seed)
        scores = torch.randn(4, vocab, generator=torch.Generator().manual_seed(seed))
        expected = NoRepeatNGramLogitsProcessor(n)(ids, scores.clone())
        got = ours(GenerationParams(no_repeat_ngram_size=n), ids, scores, 1)
        assert torch.equal(got, expected), (n, length)
        assert torch.equal(scores, torch.randn(4, vocab, generator=torch.Generator().manual_seed(seed)))  # intact


def test_bad_words_suppress_and_begin_suppress_equal_transformers():
    vocab = 30
    words = ((3,), (1, 2), (2, 2, 5), (4, 1, 7), (EOS % vocab,), (9, 4), (0,))
    eos = (0,)  # the one-token bad word [0] is the eos id: transformers ignores it
    for seed, length in enumerate((1, 2, 4, 12, 25)):
        ids = contexts(5, length, 5, seed)
        scores = torch.randn(5, vocab, generator=torch.Generator().manual_seed(seed + 10))
        lists = [list(w) for w in words]
        expected = NoBadWordsLogitsProcessor(lists, eos_token_id=list(eos))(ids, scores.clone())
        expected = SuppressTokensLogitsProcessor([11, 12])(ids, expected)
        for generated in (0, 1):
            want = SuppressTokensAtBeginLogitsProcessor([13, 3], begin_index=length - generated)(ids, expected)
            params = GenerationParams(bad_words_ids=words, suppress_tokens=(11, 12), begin_suppress_tokens=(13, 3))
            assert torch.equal(ours(params, ids, scores, generated, eos), want), (length, generated)
        assert not torch.isinf(expected[:, 0]).all()  # the eos bad word was not applied


def test_processors_in_transformers_order_with_repetition_penalty_and_a_callable():
    """Repetition penalty, n-grams, bad words, min_new_tokens' eos ban, suppression, then the caller's
    processor (which sees the scores of those before it, so order matters for it), on log-probabilities
    as beam search uses them and on logits."""
    vocab = 50
    seen_by = []

    def double_the_top(input_ids, scores):
        seen_by.append((tuple(input_ids.shape), scores.clone()))
        return scores + (scores == scores.max(-1, keepdim=True).values) * 3.0

    ids = contexts(3, 14, 8, 0)
    for scores in (torch.randn(3, vocab), torch.randn(3, vocab).log_softmax(-1)):
        params = GenerationParams(repetition_penalty=1.4, no_repeat_ngram_size=2, bad_words_ids=((1, 2), (5,)),
                                  min_new_tokens=3, suppress_tokens=(7,), logits_processor=(double_the_top,))
        reference = LogitsProcessorList([
            RepetitionPenaltyLogitsProcessor(1.4), NoRepeatNGramLogitsProcessor(2),
            NoBadWordsLogitsProcessor([[1, 2], [5]], eos_token_id=[9]),
            MinNewTokensLengthLogitsProcessor(12, 3, eos_token_id=[9]), SuppressTokensLogitsProcessor([7]),
            double_the_top])
        expected = reference(ids, scores.clone())
        assert torch.allclose(ours(params, ids, scores, 2, eos=(9,)), expected)
    assert [shape for shape, _ in seen_by] == [(3, 14)] * 4


def test_warp_equals_transformers_warpers():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 300, generator=g) * 3
    scores[0, :5] = 4.0  # ties at the k-th
    for t, k, p in ((1.0, 0, 0.9), (0.7, 10, 1.0), (1.3, 5, 0.5), (0.5, 50, 0.95), (2.0, 0, 0.1)):
        expected = scores.clone()
        if t != 1.0:
            expected = TemperatureLogitsWarper(t)(None, expected)
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        assert torch.equal(warp(scores, t, k, p), expected)


@torch.no_grad()
def test_greedy_scores_and_logits_equal_transformers(pair):
    hf, model = pair
    prompt = contexts(1, 9, 50000, 3)
    free = Engine(model, max_batch=1).submit(prompt[0].tolist(), GenerationParams(max_new_tokens=16)).result()
    eos = free.outputs[0].token_ids[10]
    tokens = free.outputs[0].token_ids
    settings = dict(repetition_penalty=1.2, no_repeat_ngram_size=2, suppress_tokens=[tokens[5]],
                    begin_suppress_tokens=[tokens[0]], min_new_tokens=2)
    bad = [[tokens[2]], [tokens[7], tokens[8]]]
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos, bad_words_ids=bad,
                           return_dict_in_generate=True, output_scores=True, output_logits=True, **settings)
    engine = Engine(model, max_batch=2)
    out = engine.submit(prompt[0].tolist(), GenerationParams(max_new_tokens=16, eos_token_ids=[eos], output_scores=True,
                                                             output_logits=True, bad_words_ids=bad, **settings)
                        ).result().outputs[0]
    assert out.token_ids == expected.sequences[0, 9:].tolist()
    assert out.token_ids != tokens  # the processors changed something
    assert len(out.scores) == len(out.logits) == len(expected.scores) == len(out.token_ids)
    for ours_s, ours_l, ref_s, ref_l in zip(out.scores, out.logits, expected.scores, expected.logits):
        assert ours_s.shape == (model.config.vocab_size,) and ours_s.dtype == torch.float32
        assert torch.equal(torch.isinf(ours_s), torch.isinf(ref_s[0]))
        assert torch.allclose(ours_s, ref_s[0], atol=1e-4)
        assert torch.allclose(ours_l, ref_l[0], atol=1e-4)


@torch.no_grad()
def test_sampled_scores_are_transformers_processed_and_warped_scores(pair):
    hf, model = pair
    prompt = contexts(1, 7, 50000, 4)[0].tolist()
    params = GenerationParams(n=3, max_new_tokens=10, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3,
                              no_repeat_ngram_size=3, suppress_tokens=(5, 6), seed=3, output_scores=True,
                              output_logits=True, eos_token_ids=())
    result = Engine(model, max_batch=2).submit(prompt, params).result()  # 3 samples over 2 slots
    warpers = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), NoRepeatNGramLogitsProcessor(3),
                                   SuppressTokensLogitsProcessor([5, 6]), TemperatureLogitsWarper(0.8),
                                   TopKLogitsWarper(40), TopPLogitsWarper(0.9)])
    for out in result.outputs:
        logits = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1].float()
        for t, token in enumerate(out.token_ids):
            context = torch.tensor([prompt + out.token_ids[:t]])
            expected = warpers(context, logits[t : t + 1].clone())[0]
            assert torch.allclose(out.logits[t], logits[t], atol=1e-4)
            assert torch.equal(torch.isinf(out.scores[t]), torch.isinf(expected)), t
            assert torch.allclose(out.scores[t], expected, atol=1e-4)
            assert not torch.isinf(out.scores[t][token])  # the sampled token is inside what was kept


@torch.no_grad()
def test_callables_see_one_request_at_one_length_and_match_transformers(pair):
    hf, model = pair
    prompt = contexts(1, 6, 50000, 5)[0].tolist()
    free = Engine(model, max_batch=1).submit(prompt, GenerationParams(max_new_tokens=12)).result().outputs[0]
    banned_token, stop_token = free.token_ids[1], free.token_ids[6]
    calls, stop_calls = [], []

    def ban(input_ids, scores):
        calls.append((tuple(input_ids.shape), tuple(scores.shape)))
        scores = scores.clone()
        scores[:, banned_token] = float("-inf")
        return scores

    def stop_at(input_ids, scores, **kwargs):
        stop_calls.append((tuple(input_ids.shape), None if scores is None or isinstance(scores, tuple)
                           else tuple(scores.shape)))
        return input_ids[:, -1] == stop_token

    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=EOS,
                           logits_processor=LogitsProcessorList([ban]),
                           stopping_criteria=StoppingCriteriaList([stop_at]))[0, 6:].tolist()
    calls.clear()
    stop_calls.clear()
    engine = Engine(model, max_batch=5)
    other = engine.submit(prompt, GenerationParams(max_new_tokens=12))  # same prompt, no callables
    handle = engine.submit(prompt, GenerationParams(max_new_tokens=12, logits_processor=(ban,),
                                                    stopping_criteria=(stop_at,)))
    sampled = engine.submit(prompt[:4], GenerationParams(n=3, max_new_tokens=5, temperature=1.0, seed=1,
                                                         logits_processor=(ban,), eos_token_ids=()))
    out = handle.result().outputs[0]
    assert out.token_ids == expected
    assert banned_token not in out.token_ids
    if stop_token in out.token_ids:
        assert out.token_ids[-1] == stop_token and out.finish_reason == "stop"
    assert other.result().outputs[0].token_ids == free.token_ids
    assert all(banned_token not in o.token_ids for o in sampled.result().outputs)
    vocab = model.config.vocab_size
    # the greedy request's rows: one at a time, its length growing; the sampled request's 3 rows together
    assert [c for c in calls if c[0][0] == 1] == [((1, 6 + t), (1, vocab)) for t in range(len(out.token_ids))]
    assert sorted(c for c in calls if c[0][0] == 3) == [((3, 4 + t), (3, vocab)) for t in range(5)]
    assert stop_calls == [((1, 7 + t), (1, vocab)) for t in range(len(out.token_ids))]


@torch.no_grad()
def test_a_failing_callable_ends_only_its_request(pair):
    _, model = pair

    def broken(input_ids, scores):
        raise RuntimeError("boom")

    def wrong_shape(input_ids, scores):
        return scores[:, :10]

    engine = Engine(model, max_batch=4)
    fine = engine.submit([1, 2, 3], GenerationParams(max_new_tokens=6))
    bad = engine.submit([1, 2, 3], GenerationParams(n=2, max_new_tokens=6, logits_processor=(broken,)))
    shape = engine.submit([4, 5], GenerationParams(max_new_tokens=6, logits_processor=(wrong_shape,)))
    crit = engine.submit([4, 5], GenerationParams(max_new_tokens=6, stopping_criteria=(lambda i, s: 1 / 0,)))
    beams = engine.submit([6, 7], GenerationParams(num_beams=2, max_new_tokens=6, logits_processor=(broken,)))
    for handle, message in ((bad, "boom"), (shape, "not scores of shape"), (crit, "division by zero"),
                            (beams, "boom")):
        with pytest.raises(EngineError, match=message):
            handle.result()
    assert len(fine.result().outputs[0].token_ids) == 6
    engine.run()
    assert engine.idle and engine.rows == []


def test_speculative_decoding_keeps_processor_results(pair):
    _, model = pair
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    params = dict(max_new_tokens=14, no_repeat_ngram_size=3, repetition_penalty=1.1, output_scores=True)
    plain = Engine(model, max_batch=1).submit(prompt, GenerationParams(**params)).result().outputs[0]
    fast = Engine(model, max_batch=1).submit(prompt, GenerationParams(**params, speculative="prompt-lookup")).result()
    assert fast.outputs[0].token_ids == plain.token_ids
    assert len(fast.outputs[0].scores) == len(plain.scores)
    for a, b in zip(fast.outputs[0].scores, plain.scores):  # guesses are checked by another kernel: not bitwise
        assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be an integer >= 0"),
    (dict(bad_words_ids=((1, 2), ())), "bad_words_ids must be a sequence of non-empty"),
    (dict(bad_words_ids=(1, 2)), "bad_words_ids must be a sequence of non-empty"),
    (dict(bad_words_ids=((1, -2),)), "bad_words_ids token must be an integer >= 0"),
    (dict(suppress_tokens=(1, "a")), "suppress_tokens token must be an integer"),
    (dict(begin_suppress_tokens=5), "begin_suppress_tokens must be a sequence"),
    (dict(logits_processor=(1,)), "logits_processor must be a sequence of callables"),
    (dict(stopping_criteria="x"), "stopping_criteria must be a sequence of callables"),
    (dict(output_scores=1), "output_scores must be True or False"),
    (dict(output_logits="yes"), "output_logits must be True or False"),
])
def test_bad_processor_settings_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationParams(**kwargs)


def test_processor_token_ids_must_be_in_the_vocabulary(pair):
    _, model = pair
    engine = Engine(model, max_batch=1)
    for name, value in (("bad_words_ids", ((1, 60000),)), ("suppress_tokens", (60000,)),
                        ("begin_suppress_tokens", (51200,))):
        with pytest.raises(ValueError, match=f"{name} token id .* is outside the vocabulary"):
            engine.submit([1, 2], GenerationParams(**{name: value}))
    single = GenerationParams(logits_processor=lambda i, s: s, stopping_criteria=[lambda i, s: False])
    assert len(single.logits_processor) == 1 and isinstance(single.stopping_criteria, tuple)


def test_a_callable_writing_into_its_scores_leaves_logits_and_logprobs_alone(pair):
    _, model = pair

    def force_zero(input_ids, scores):
        scores[:, 0] = 1e4  # in place, as many of transformers' processors do
        return scores

    plain = Engine(model, max_batch=2).submit([3, 4, 5], GenerationParams(max_new_tokens=4, logprobs=0,
                                                                         output_logits=True)).result()
    for beams in (1, 2):
        params = GenerationParams(max_new_tokens=4, logprobs=0, output_logits=True, num_beams=beams,
                                  logits_processor=(force_zero,), eos_token_ids=())
        out = Engine(model, max_batch=2).submit([3, 4, 5], params).result()
        assert out.outputs[0].token_ids == [0, 0, 0, 0]
        assert out.outputs[0].logprobs[0] == pytest.approx(
            float(plain.outputs[0].logits[0].log_softmax(-1)[0]), abs=1e-5)
        logits = out.outputs[0].logits if beams == 1 else [t[0] for t in out.beam_logits]
        assert torch.allclose(logits[0], plain.outputs[0].logits[0]) and float(logits[0][0]) < 100
