"""Beam search on the engine against transformers' beam search (sequences, sequences_scores, scores,
logits, beam_indices) for several beam counts, length penalties and early_stopping rules, with eos
tokens that end beams early, with processors; and beams in the engine: sharing steps with other
requests, waiting for their slots, cancellation, the prefix cache, stop strings."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList

from codegen_lm import CodeGenForCausalLM
from codegen_lm.engine import Engine, GenerationParams
from codegen_lm.engine.slot_cache import SlotCache

from .conftest import load_hf
from .test_model_parity import left_padding_mask

EOS = 50256
PAD = 1  # transformers fills finished hypotheses with it (not the eos, so that lengths are visible)


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    return load_hf(tiny_checkpoint), CodeGenForCausalLM.from_pretrained(tiny_checkpoint)


def prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 10, (count,), generator=g)
    return [torch.randint(2, 50000, (int(n),), generator=g).tolist() for n in lengths]


def liked_token(model, prompt: list[int], position: int = 3, num_beams: int = 1) -> int:
    """A token the model likes to produce after the prompt (at `position` of its best beam without an
    eos), to make the eos: some hypotheses then end early."""
    params = GenerationParams(max_new_tokens=position + 1, num_beams=num_beams, eos_token_ids=())
    out = Engine(model, max_batch=num_beams).submit(prompt, params).result()
    return out.outputs[0].token_ids[position]


def ending_eos(model, prompt: list[int], params: GenerationParams) -> int:
    """An eos (a token of the best eos-free beam) with which some of the n hypotheses returned end at
    it. A length penalty > 1 favours long hypotheses too much for that: then the best beam's 4th token
    (the best candidate of the 4th step, so a beam ends there and the running beams change)."""
    free = Engine(model, max_batch=params.num_beams).submit(prompt, GenerationParams(
        **{**vars(params), "eos_token_ids": ()})).result().outputs[0].token_ids
    if params.length_penalty > 1.0:
        return free[3]
    for eos in free[1:]:
        with_eos = GenerationParams(**{**vars(params), "eos_token_ids": (eos,)})
        out = Engine(model, max_batch=params.num_beams).submit(prompt, with_eos).result()
        if any(o.finish_reason == "stop" for o in out.outputs):
            return eos
    raise AssertionError("no token of the best beam ends a hypothesis")


@torch.no_grad()
def hf_beams(hf, batch: list[list[int]], **kwargs):
    width = max(map(len, batch))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in batch])
    mask = left_padding_mask([len(p) for p in batch], width)
    return width, hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True,
                              output_scores=True, output_logits=True, **kwargs)


def assert_same_beams(results, expected, width: int, k: int, n: int, atol: float = 1e-4) -> list[str]:
    """Our results (one per prompt) against transformers' output for the batch; returns finish reasons."""
    reasons = []
    for b, result in enumerate(results):
        assert len(result.outputs) == n
        for j, out in enumerate(result.outputs):
            row = b * n + j
            ref = expected.sequences[row, width:].tolist()
            length = len(out.token_ids)
            assert out.token_ids == ref[:length] and all(t == PAD for t in ref[length:]), (b, j)
            assert out.score == pytest.approx(float(expected.sequences_scores[row]), abs=atol, rel=1e-5)
            assert out.beam_indices == [i - b * k for i in expected.beam_indices[row, :length].tolist()]
            reasons.append(out.finish_reason)
        steps = len(result.beam_scores)
        assert steps <= len(expected.scores) and len(result.beam_logits) == steps
        for t in range(steps):
            ours, ref = result.beam_scores[t], expected.scores[t][b * k : (b + 1) * k]
            assert ours.shape == ref.shape and torch.equal(torch.isinf(ours), torch.isinf(ref))
            assert torch.allclose(ours, ref, atol=atol)
            assert torch.allclose(result.beam_logits[t], expected.logits[t][b * k : (b + 1) * k], atol=atol)
    return reasons


CONFIGS = [  # num_beams, length_penalty, early_stopping, n
    (2, 1.0, False, 1),
    (2, 0.0, True, 2),
    (3, 2.0, "never", 3),
    (4, -0.5, False, 2),
    (4, 0.7, True, 4),
]


@pytest.mark.parametrize("k, length_penalty, early_stopping, n", CONFIGS)
def test_beam_search_equals_transformers(pair, k, length_penalty, early_stopping, n):
    hf, model = pair
    batch = prompts(2, seed=k * 10 + n)
    settings = dict(num_beams=k, length_penalty=length_penalty, early_stopping=early_stopping)
    eos = ending_eos(model, batch[0], GenerationParams(max_new_tokens=10, n=n, **settings))
    width, expected = hf_beams(hf, batch, max_new_tokens=10, num_return_sequences=n, eos_token_id=eos, **settings)
    engine = Engine(model, max_batch=8)  # both prompts' beams in the same steps
    handles = [engine.submit(p, GenerationParams(max_new_tokens=10, n=n, eos_token_ids=[eos], output_scores=True,
                                                 output_logits=True, **settings)) for p in batch]
    reasons = assert_same_beams([h.result() for h in handles], expected, width, k, n)
    assert set(reasons) <= {"stop", "length"}
    assert "stop" in reasons or length_penalty > 1.0  # some hypotheses ended at the eos
    assert engine.idle and engine.rows == []


def test_hypotheses_come_best_first_and_end_at_the_eos(pair):
    _, model = pair
    prompt = prompts(1, seed=31)[0]
    params = GenerationParams(max_new_tokens=14, n=3, num_beams=3)
    eos = ending_eos(model, prompt, params)
    result = Engine(model, max_batch=4).submit(prompt, GenerationParams(**{**vars(params), "eos_token_ids": [eos]})
                                               ).result()
    ended = [o for o in result.outputs if o.finish_reason == "stop"]
    assert ended and all(o.token_ids[-1] == eos and len(o.token_ids) < 14 for o in ended)
    assert all(o.finish_reason == "length" and len(o.token_ids) == 14 for o in result.outputs if o not in ended)
    scores = [o.score for o in result.outputs]
    assert scores == sorted(scores, reverse=True)


@torch.no_grad()
def test_beam_search_on_every_shape(small_checkpoint):
    folder, _ = small_checkpoint
    hf, model = load_hf(folder), CodeGenForCausalLM.from_pretrained(folder)
    batch = prompts(1, seed=5)
    eos = liked_token(model, batch[0], 2)
    width, expected = hf_beams(hf, batch, max_new_tokens=10, num_beams=3, num_return_sequences=2, eos_token_id=eos)
    result = Engine(model, max_batch=3).submit(batch[0], GenerationParams(
        max_new_tokens=10, num_beams=3, n=2, eos_token_ids=[eos], output_scores=True, output_logits=True)).result()
    assert_same_beams([result], expected, width, 3, 2)


@torch.no_grad()
def test_processors_inside_beam_search_equal_transformers(pair):
    hf, model = pair
    prompt = [7, 8, 9, 7, 8, 11, 12]
    eos = liked_token(model, prompt, 5)
    for extra in (dict(no_repeat_ngram_size=2), dict(repetition_penalty=1.3),
                  dict(repetition_penalty=0.7, no_repeat_ngram_size=1, min_new_tokens=6),
                  dict(suppress_tokens=[liked_token(model, prompt, 1)],
                       begin_suppress_tokens=[liked_token(model, prompt, 0)],
                       bad_words_ids=[[liked_token(model, prompt, 2)]])):
        width, expected = hf_beams(hf, [prompt], max_new_tokens=12, num_beams=3, num_return_sequences=3,
                                   eos_token_id=eos, **extra)
        params = GenerationParams(max_new_tokens=12, num_beams=3, n=3, eos_token_ids=[eos], output_scores=True,
                                  output_logits=True, **{k: tuple(map(tuple, v)) if k == "bad_words_ids" else v
                                                         for k, v in extra.items()})
        assert_same_beams([Engine(model, max_batch=3).submit(prompt, params).result()], expected, width, 3, 3)


@torch.no_grad()
def test_callables_inside_beam_search_equal_transformers(pair):
    """A caller's logits processor sees the k running beams' processed log-probabilities [k, length];
    a stopping criterion judges the 2k candidates [2k, length + 1]; a candidate it stops becomes a
    finished hypothesis, as in transformers."""
    hf, model = pair
    prompt = prompts(1, seed=71)[0]
    stop_token = liked_token(model, prompt, 2, 3)
    shapes, stop_shapes = [], []

    def odd_even(input_ids, scores):  # favour tokens of the last token's parity
        shapes.append(tuple(input_ids.shape))
        parity = torch.arange(scores.shape[-1]) % 2 == input_ids[:, -1:] % 2
        return scores + 0.3 * parity

    def ends_at(input_ids, scores, **kwargs):
        stop_shapes.append(tuple(input_ids.shape))
        return input_ids[:, -1] == stop_token

    width, expected = hf_beams(hf, [prompt], max_new_tokens=10, num_beams=3, num_return_sequences=3,
                               eos_token_id=EOS, length_penalty=0.0, repetition_penalty=1.2,
                               logits_processor=LogitsProcessorList([odd_even]),
                               stopping_criteria=StoppingCriteriaList([ends_at]))
    shapes.clear()
    stop_shapes.clear()
    params = GenerationParams(max_new_tokens=10, num_beams=3, n=3, length_penalty=0.0, repetition_penalty=1.2,
                              logits_processor=(odd_even,), stopping_criteria=(ends_at,), output_scores=True,
                              output_logits=True)
    result = Engine(model, max_batch=3).submit(prompt, params).result()
    assert_same_beams([result], expected, width, 3, 3)
    assert any(o.finish_reason == "stop" and o.token_ids[-1] == stop_token for o in result.outputs)
    n = len(prompt)
    assert shapes == [(3, n + t) for t in range(len(result.beam_scores))]
    assert stop_shapes == [(6, n + t + 1) for t in range(len(result.beam_scores))]


def test_gather_slots_moves_overlapping_slots_at_once():
    cache = SlotCache(2, 5, 2, 3, 16, torch.float32)
    for slot in range(5):
        cache.k[:, slot] = slot
        cache.v[:, slot] = -slot
    cache.gather_slots([0, 1, 2, 3], [1, 0, 0, 3], 4, 9)  # a swap, a copy, one left in place
    for slot, src in zip(range(5), [1, 0, 0, 3, 4]):
        assert bool((cache.k[:, slot, :, 4:9] == src).all()) and bool((cache.v[:, slot, :, 4:9] == -src).all())
        assert bool((cache.k[:, slot, :, :4] == slot).all()) and bool((cache.k[:, slot, :, 9:] == slot).all())


@torch.no_grad()
def test_beams_share_the_engine_with_other_requests_and_free_their_slots(pair):
    _, model = pair
    ps = prompts(5, seed=41)
    ps[1] = ps[1] * 5  # longer than a prefix-cache block
    eos = liked_token(model, ps[1])
    requests = [
        (ps[0], GenerationParams(max_new_tokens=9)),
        (ps[1], GenerationParams(max_new_tokens=12, num_beams=3, n=2, eos_token_ids=[eos], repetition_penalty=1.2,
                                 logprobs=2)),
        (ps[2], GenerationParams(n=2, max_new_tokens=7, temperature=0.9, seed=3)),
        (ps[3], GenerationParams(max_new_tokens=10, num_beams=2, no_repeat_ngram_size=2, presence_penalty=0.5)),
        (ps[1], GenerationParams(max_new_tokens=12, num_beams=3, n=2, eos_token_ids=[eos], repetition_penalty=1.2,
                                 logprobs=2)),  # again: its prompt comes from the prefix cache
    ]
    alone = [Engine(model, max_batch=p.num_beams * p.n).submit(prompt, p).result() for prompt, p in requests]
    engine = Engine(model, max_batch=6)  # 11 rows over 6 slots: beams wait for slots, rows move down
    handles = [engine.submit(prompt, p) for prompt, p in requests]
    while engine.step():
        for s in engine.rows:  # every row's repetition-penalty bitmap is its own context
            own = torch.zeros(model.config.vocab_size, dtype=torch.bool)
            own[s.context()] = True
            assert torch.equal(engine.seen[s.row], own)
        assert len(engine.rows) <= 6
    for handle, expected in zip(handles, alone):
        got = handle.result()
        assert [o.token_ids for o in got.outputs] == [o.token_ids for o in expected.outputs]
        assert [o.score for o in got.outputs] == pytest.approx([o.score for o in expected.outputs], abs=1e-5)
        for o, e in zip(got.outputs, expected.outputs):
            assert (o.logprobs is None) == (e.logprobs is None)
            assert o.logprobs is None or o.logprobs == pytest.approx(e.logprobs, abs=1e-5)
    assert handles[4].result().cached_tokens > 0
    assert engine.idle and engine.rows == []
    # the logprobs of a hypothesis are the model's, along the beams it came through
    result = alone[1]
    logits = Engine(model, max_batch=3).submit(ps[1], GenerationParams(**{
        **vars(requests[1][1]), "output_logits": True})).result().beam_logits
    for out in result.outputs:
        assert len(out.logprobs) == len(out.top_logprobs) == len(out.token_ids)
        for t, (token, beam) in enumerate(zip(out.token_ids, out.beam_indices)):
            logp = logits[t][beam].log_softmax(-1)
            assert out.logprobs[t] == pytest.approx(float(logp[token]), abs=1e-5)
            assert set(out.top_logprobs[t]) == set(logp.topk(2).indices.tolist())


@torch.no_grad()
def test_a_beam_request_waits_for_all_its_slots(pair):
    _, model = pair
    ps = prompts(2, seed=51)
    engine = Engine(model, max_batch=3)
    first = engine.submit(ps[0], GenerationParams(max_new_tokens=8))
    beams = engine.submit(ps[1], GenerationParams(max_new_tokens=6, num_beams=3, n=3))
    engine.step()
    while first.output().outputs[0].finish_reason is None:
        assert all(s.request.beam is None for s in engine.rows)  # 2 slots free: not enough for 3 beams
        engine.step()
    expected = Engine(model, max_batch=3).submit(ps[1], GenerationParams(max_new_tokens=6, num_beams=3, n=3)).result()
    assert [o.token_ids for o in beams.result().outputs] == [o.token_ids for o in expected.outputs]
    with pytest.raises(ValueError, match="num_beams=4 needs that many KV slots; the engine has max_batch=3"):
        engine.submit(ps[1], GenerationParams(num_beams=4))


@torch.no_grad()
def test_cancelled_beam_requests_free_their_slots(pair):
    _, model = pair
    ps = prompts(3, seed=61)
    engine = Engine(model, max_batch=5)
    other = engine.submit(ps[0], GenerationParams(max_new_tokens=20))
    running = engine.submit(ps[1], GenerationParams(max_new_tokens=40, num_beams=3, n=2, eos_token_ids=()))
    queued = engine.submit(ps[2], GenerationParams(max_new_tokens=40, num_beams=4, n=2))  # no room yet
    for _ in range(6):
        engine.step()
    assert sum(s.request is running._request for s in engine.rows) == 3
    running.cancel()
    queued.cancel()
    engine.step()
    result = running.result()
    assert [o.finish_reason for o in result.outputs] == ["cancelled"] * 2
    assert all(0 < len(o.token_ids) < 40 for o in result.outputs)
    assert [o.finish_reason for o in queued.result().outputs] == ["cancelled"] * 2
    assert all(s.request is other._request for s in engine.rows)
    assert len(other.result().outputs[0].token_ids) == 20
    assert engine.idle and engine.rows == []


def test_stop_strings_end_hypotheses_and_cut_their_text(pair, tok):
    _, model = pair
    prompt = tok.encode("def add(a, b):")
    # no length penalty: a hypothesis that ends early keeps its (higher) score
    params = GenerationParams(max_new_tokens=16, num_beams=3, n=3, eos_token_ids=(), length_penalty=0.0)
    free = Engine(model, tok, max_batch=3).submit(prompt, params).result()
    text = free.outputs[0].text
    stop = text[5:7]
    assert len(stop) == 2
    stopped = GenerationParams(**{**vars(params), "stop": [stop]})
    result = Engine(model, tok, max_batch=3).submit(prompt, stopped).result()
    assert any(o.finish_reason == "stop" for o in result.outputs)
    for out in result.outputs:
        assert stop not in out.text
        full = tok.decode(out.token_ids)
        if out.finish_reason == "stop":
            assert stop in full and full.startswith(out.text) and out.text == full[: full.index(stop)]
    events = list(Engine(model, tok, max_batch=3).submit(prompt, stopped).stream())
    assert [(e.index, e.text, e.token_ids, e.finish_reason) for e in events] == [
        (o.index, o.text, o.token_ids, o.finish_reason) for o in result.outputs]


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_beams=0), "num_beams must be an integer >= 1"),
    (dict(num_beams=2, n=3), r"n must be <= num_beams in beam search .* n=3 with num_beams=2"),
    (dict(num_beams=2, temperature=0.7), r"beam sampling \(num_beams > 1 with temperature 0.7\) is not supported"),
    (dict(num_beams=2, speculative="prompt-lookup"), "speculative='prompt-lookup' is not supported with num_beams"),
    (dict(length_penalty=float("inf")), "length_penalty must be a finite number"),
    (dict(length_penalty="1"), "length_penalty must be a finite number"),
    (dict(early_stopping="always"), "early_stopping must be True, False or 'never'"),
    (dict(early_stopping=1), "early_stopping must be True, False or 'never'"),
])
def test_bad_beam_settings_are_refused_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationParams(**kwargs)


def test_speculative_engines_do_not_speculate_for_beams(pair):
    _, model = pair
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    params = GenerationParams(max_new_tokens=10, num_beams=2, n=2)
    plain = Engine(model, max_batch=2).submit(prompt, params).result()
    engine = Engine(model, max_batch=2, speculative="prompt-lookup")
    got = engine.submit(prompt, params).result()
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in plain.outputs]
    assert engine.stats().speculative.proposed == 0

