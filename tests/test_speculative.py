"""Speculative decoding inside the engine: prompt lookup and draft models, per request and engine-wide;
greedy output is plain greedy output, seeded samples are the samples without speculation, and the
sampled distribution is the target's (against exact probabilities)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from codegen_lm import CodeGenConfig, CodeGenForCausalLM
from codegen_lm.engine import Engine, GenerationParams, prompt_lookup
from codegen_lm.quantize import quantize_model


def prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (count,), generator=g)
    return [torch.randint(0, 50000, (int(n),), generator=g).tolist() for n in lengths]


def test_prompt_lookup_finds_the_latest_match():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], k=2) == [7, 8]
    assert prompt_lookup([5, 6, 7], k=3) == []
    assert prompt_lookup([4, 1, 2, 4], k=3, max_ngram=2) == [1, 2, 4]
    assert prompt_lookup([1, 1, 1], k=4) == [1, 1, 1, 1]  # a repetition goes on with its period
    assert prompt_lookup([7, 5, 6, 5, 6], k=5) == [5, 6, 5, 6, 5]


def cases(base):
    return [(base * 4, GenerationParams(max_new_tokens=40)),
            (base, GenerationParams(max_new_tokens=25, repetition_penalty=1.3, min_new_tokens=3)),
            (base * 2, GenerationParams(max_new_tokens=30, stop=["e"])),
            (base * 3, GenerationParams(n=2, max_new_tokens=20, temperature=0.8, top_p=0.9, seed=7))]


def serve(model, tok, requests, **engine_args):
    engine = Engine(model, tok, max_batch=3, **engine_args)
    handles = [engine.submit(p, q) for p, q in requests]
    return [[(o.token_ids, o.text, o.finish_reason) for o in h.result().outputs] for h in handles], engine


@pytest.mark.parametrize("draft", ["prompt-lookup", "int8", "self"])
def test_speculation_changes_no_token(model, tok, draft):
    """Greedy (with a repetition penalty and min_new_tokens, with a stop string) and seeded sampling give
    the same tokens, text and finish reasons with speculation as without, for requests decoded
    together in fewer slots than samples (rows move as others finish)."""
    drafts = {"prompt-lookup": "prompt-lookup", "self": model,
              "int8": quantize_model(CodeGenForCausalLM.from_pretrained(model.name_or_path))}
    requests = cases(prompts(1, seed=8)[0][:6]) + [(p, GenerationParams(max_new_tokens=12)) for p in prompts(3, 9)]
    plain, _ = serve(model, tok, requests)
    spec, engine = serve(model, tok, requests, speculative=drafts[draft], speculative_tokens=4)
    assert spec == plain
    stats = engine.stats().speculative
    assert stats.passes > 0  # (random weights rarely repeat their prompt: few lookups find guesses)
    if draft != "prompt-lookup":
        assert stats.tokens_per_pass > 1.5
    if draft == "self":  # for plain greedy, a perfect draft: every guess is the target's, 5 tokens a pass
        _, engine = serve(model, tok, requests[:1], speculative=model, speculative_tokens=4)
        stats = engine.stats().speculative
        assert stats.acceptance_rate == 1.0 and stats.passes == 8  # the first token comes from the prefill


def test_per_request_choice_overrides_the_engine(model, tok):
    requests = cases(prompts(1, seed=10)[0][:5])
    plain, _ = serve(model, tok, requests)
    per_request = [(p, GenerationParams(**{**vars(q), "speculative": "prompt-lookup", "speculative_tokens": 2}))
                   for p, q in requests]
    spec, engine = serve(model, tok, per_request)
    assert spec == plain and engine.stats().speculative.passes > 0
    off = [(p, GenerationParams(**{**vars(q), "speculative": "off"})) for p, q in requests]
    _, engine = serve(model, tok, off, speculative="prompt-lookup")
    assert engine.stats().speculative.passes == 0


def test_bad_speculative_settings(model):
    with pytest.raises(ValueError, match="speculative must be None or one of"):
        GenerationParams(speculative="medusa")
    with pytest.raises(ValueError, match="speculative_tokens must be an integer >= 1"):
        GenerationParams(speculative_tokens=0)
    with pytest.raises(ValueError, match="needs an engine with a draft model"):
        Engine(model).submit([1, 2], GenerationParams(speculative="draft"))
    other = CodeGenForCausalLM.from_config(CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=99,
                                                       eos_token_id=0, bos_token_id=0))
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model, speculative=other)


def chi2_limit(df: int, z: float = 3.72) -> float:
    """The chi-square quantile at p = 1e-4 (z = 3.72), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_speculative_sampling_keeps_the_target_distribution():
    """16-token vocabulary, a draft that agrees with the target only in part: the distribution of
    each of four sampled positions, and the joint of the last two, against the target's exact
    probabilities (enumerated over all 16^4 continuations), by chi-square at p = 1e-4 with 4,000
    samples. A distortion of 0.03 in total variation (half what a residual-free resampling bug
    produces here) fails it."""
    torch.manual_seed(0)
    config = CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=16, eos_token_id=15,
                           n_positions=64)
    target = CodeGenForCausalLM(config).eval()
    draft = CodeGenForCausalLM(config).eval()
    with torch.no_grad():  # the draft: the target plus noise, so that they agree only in part
        for p, q in zip(target.parameters(), draft.parameters()):
            p.mul_(6)
            q.copy_(p + 0.3 * p.std() * torch.randn_like(p) if p.numel() > 1 else p)
    prompt, new = [1, 2], 4
    params = dict(max_new_tokens=new, temperature=1.0, eos_token_ids=[], speculative="draft", speculative_tokens=3)
    engine = Engine(target, max_batch=50, speculative=draft, prefix_cache_mb=0)
    samples = []
    for seed in range(80):
        out = engine.submit(prompt, GenerationParams(n=50, seed=seed, **params)).result()
        samples.extend(tuple(o.token_ids) for o in out.outputs)
    stats = engine.stats().speculative
    assert 0.2 < stats.acceptance_rate < 0.9, stats.acceptance_rate
    # exact probabilities of every continuation
    seqs = torch.tensor(list(itertools.product(range(16), repeat=new)))
    ids = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs], dim=1)
    with torch.no_grad():
        logp = (target(ids).logits[:, len(prompt) - 1 : -1] / params["temperature"]).log_softmax(-1)
    joint = logp.gather(2, seqs[:, :, None])[:, :, 0].sum(-1).exp().view((16,) * new)
    assert abs(float(joint.sum()) - 1) < 1e-4
    counts = torch.zeros((16,) * new, dtype=torch.float64)
    for s in samples:
        counts[s] += 1
    n = len(samples)
    checks = {f"position {t}": tuple(d for d in range(new) if d != t) for t in range(new)}
    checks["last two"] = tuple(range(new - 2))
    for name, dims in checks.items():
        expected = joint.double().sum(dims).flatten() * n
        observed = counts.sum(dims).flatten()
        big = expected >= 5  # cells with small expectations pooled into one
        e = torch.cat([expected[big], expected[~big].sum()[None]])
        o = torch.cat([observed[big], observed[~big].sum()[None]])
        keep = e > 0
        stat = float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
        assert stat < chi2_limit(int(keep.sum()) - 1), (name, stat)
