"""The engine's request options that servers expose, on the engine's real path against independent
references computed here from `transformers`' logits: OpenAI's presence and frequency penalties and
logit bias, the log-probabilities of prompt tokens, log-probabilities carried by stream events, and
token healing (backing off the prompt's last token and extending it)."""

from __future__ import annotations

import pytest
import torch

from codegen_lm.engine import Engine, GenerationParams
from codegen_lm.engine.healing import TokenHealer

from .conftest import load_hf


@pytest.fixture(scope="module")
def hf(tiny_checkpoint):
    return load_hf(tiny_checkpoint)


def reference_greedy(hf, prompt: list[int], steps: int, presence: float, frequency: float,
                     bias: dict[int, float]) -> list[int]:
    """Greedy decoding with OpenAI's formula written out: logit -= count x frequency + (count > 0) x
    presence over the tokens generated so far, plus the bias."""
    ids, counts = list(prompt), torch.zeros(hf.config.vocab_size)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        logits = logits - counts * frequency - (counts > 0).float() * presence
        for token, b in bias.items():
            logits[token] += b
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        counts[token] += 1
    return out


def test_presence_frequency_and_bias_match_the_formula_while_rows_move(model, hf):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in (6, 9, 4)]
    settings = [dict(presence_penalty=1.5, frequency_penalty=0.0, logit_bias={}),
                dict(presence_penalty=0.0, frequency_penalty=0.8, logit_bias={7: 3.0, 11: -100.0}),
                dict(presence_penalty=-0.5, frequency_penalty=1.2, logit_bias={50000: 2.5})]
    engine = Engine(model, max_batch=2)  # three requests, two slots: the last waits, rows move
    short = engine.submit(prompts[0], GenerationParams(max_new_tokens=2))
    handles = [engine.submit(p, GenerationParams(max_new_tokens=10, **s)) for p, s in zip(prompts, settings)]
    engine.run()
    short.result()
    for p, s, h in zip(prompts, settings, handles):
        got = h.result().outputs[0].token_ids
        want = reference_greedy(hf, p, 10, s["presence_penalty"], s["frequency_penalty"], s["logit_bias"])
        assert got == want
    plain = reference_greedy(hf, prompts[1], 10, 0.0, 0.0, {})
    assert plain != handles[1].result().outputs[0].token_ids  # the penalties changed something


def test_prompt_logprobs_are_transformers_log_softmax_across_chunks_and_a_warm_cache(model, hf):
    prompt = torch.randint(0, 50000, (37,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        logp = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    want = [logp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    engine = Engine(model, prefill_chunk=8, solo_chunk=8)
    engine.submit(prompt, GenerationParams(max_new_tokens=2)).result()  # the prompt is now in the prefix cache
    out = engine.submit(prompt, GenerationParams(max_new_tokens=2, prompt_logprobs=3)).result()
    assert out.cached_tokens == 0
    assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
    assert out.prompt_logprobs[1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(out.prompt_top_logprobs[1:], start=1):
        values, index = logp[i - 1].topk(3)
        assert list(top) == index.tolist()
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)


def test_stream_events_carry_the_outputs_logprobs(model):
    prompt = [5, 6, 7, 8]
    handle = Engine(model).submit(prompt, GenerationParams(n=3, max_new_tokens=6, temperature=0.9, seed=4,
                                                           logprobs=2, speculative="prompt-lookup"))
    got = {j: ([], [], []) for j in range(3)}
    for event in handle.stream():
        tokens, logprobs, top = got[event.index]
        tokens += event.token_ids
        logprobs += event.logprobs or []
        top += event.top_logprobs or []
    for o in handle.result().outputs:
        assert got[o.index] == (o.token_ids, o.logprobs, o.top_logprobs)
        assert len(o.logprobs) == len(o.token_ids)


def test_token_healing_extends_the_backed_off_token(model, tok, hf):
    healer = TokenHealer(tok, model.config.vocab_size)
    text = "def f(x):\n    return x +"
    ids = tok.encode(text + " ")
    healed = healer.heal(ids)  # the prompt ends in a lone space, which code almost never has as a token
    assert healed.prompt_ids == ids[:-1] and healed.removed == b" "
    allowed = healed.allowed.nonzero().flatten().tolist()
    one = tok.encode(" 1")
    assert len(one) == 1 and one[0] in allowed and len(allowed) > 1000
    assert all(tok.decode([t]).startswith(" ") for t in allowed)
    assert healer.heal([ids[0]]) is None  # nothing before it to continue

    with torch.no_grad():
        logits = hf(torch.tensor([healed.prompt_ids])).logits[0, -1]
    first = int(logits.masked_fill(~healed.allowed, float("-inf")).argmax())
    engine = Engine(model, tokenizer=tok)
    out = engine.submit(text + " ", GenerationParams(max_new_tokens=5, token_healing=True, stop=[" "])).result()
    result = out.outputs[0]
    assert out.healed == " " and out.prompt_ids == healed.prompt_ids
    assert result.token_ids[0] == first
    full = tok.decode(result.token_ids)
    assert full.startswith(" ")
    # the text continues what was typed: the repeated space is left out, and a stop of " " does not fire on it
    assert result.text == full[1:].split(" ")[0]
    plain = engine.submit(text + " ", GenerationParams(max_new_tokens=5)).result()
    assert plain.healed == "" and plain.prompt_ids == ids


def test_token_healing_allows_exactly_the_tokens_that_extend_the_removed_bytes(model, tok):
    """The allowed set (found by bisection over the tokens in byte order) is every token whose bytes
    start with the removed token's: for 300 tokens drawn from the vocabulary and the common short ones,
    and for bytes that end in 0xff (whose run ends where the next shorter stem's does)."""
    healer = TokenHealer(tok, model.config.vocab_size)
    table = healer.token_bytes
    drawn = torch.randint(0, len(table), (300,), generator=torch.Generator().manual_seed(0)).tolist()
    for token in drawn + [tok.encode(t)[0] for t in (" ", "\n", "    ", "(", "a", "_")]:
        removed = table[token]
        if removed:
            expected = torch.tensor([b.startswith(removed) for b in table])
            assert torch.equal(healer._allowed(token, removed), expected), (token, removed)
    table[:3] = [b"\xff", b"\xff\xff", b"a\xff"]  # 0xff stems, and the byte order rebuilt for them
    healer.index()
    for token, removed in ((0, b"\xff"), (2, b"a\xff"), (1, b"\xff\xff")):
        expected = torch.tensor([b.startswith(removed) for b in table])
        assert torch.equal(healer._allowed(token, removed), expected), removed


def test_bad_option_values_are_refused_naming_them(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="logit_bias token id 60000"):
        engine.submit([1, 2], GenerationParams(logit_bias={60000: 1.0}))
    with pytest.raises(ValueError, match="presence_penalty"):
        GenerationParams(presence_penalty=float("nan"))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        GenerationParams(prompt_logprobs=-1)
