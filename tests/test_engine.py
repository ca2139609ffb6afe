"""The inference engine: continuous batching, shared prefill, sampling, streaming, cancellation,
int8 quantization and speculative decoding."""

from __future__ import annotations

import threading

import pytest
import torch

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.engine import Engine, GenerationParams
from codegen_lm.engine.speculative import SpeculativeDecoder, SpeculativeStats, prompt_lookup
from codegen_lm.quantize import Int8Linear, quantize_model

from .conftest import load_hf


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return CodeGenForCausalLM.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return CodeGenTokenizerFast.from_pretrained(tiny_checkpoint)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (int(n),), generator=g).tolist()
            for n in torch.randint(2, 20, (count,), generator=g)]


def alone(model, prompt, params, tok=None):
    return Engine(model, tok, max_batch=params.n).submit(prompt, params).result()


def test_greedy_matches_transformers_and_many_requests_share_few_slots(model, tiny_checkpoint):
    hf = load_hf(tiny_checkpoint)
    ps = prompts(9)
    engine = Engine(model, max_batch=3)  # far more requests than slots: they queue and take freed slots
    params = [GenerationParams(max_new_tokens=int(n)) for n in torch.randint(1, 15, (9,))]
    handles = [engine.submit(p, q) for p, q in zip(ps, params)]
    for p, q, h in zip(ps, params, handles):
        expected = hf.generate(torch.tensor([p]), max_new_tokens=q.max_new_tokens, do_sample=False,
                               pad_token_id=50256)[0, len(p) :].tolist()
        out = h.result().outputs[0]
        assert out.token_ids == expected
        assert out.finish_reason == "length"
    assert engine.idle and engine.rows == []


def test_seeded_sampling_does_not_depend_on_batch_company(model):
    ps = prompts(4, seed=1)
    params = [GenerationParams(n=n, max_new_tokens=10, temperature=t, top_p=p, top_k=k, seed=s, repetition_penalty=r)
              for n, t, p, k, s, r in ((3, 0.8, 0.9, 0, 1, 1.0), (2, 1.2, 1.0, 50, 2, 1.3), (1, 0.0, 1.0, 0, 3, 1.0),
                                        (4, 1.0, 0.95, 0, 4, 1.0))]
    expected = [[o.token_ids for o in alone(model, p, q).outputs] for p, q in zip(ps, params)]
    engine = Engine(model, max_batch=5)  # 10 samples over 5 slots, admitted in pieces
    handles = [engine.submit(p, q) for p, q in zip(ps, params)]
    got = [[o.token_ids for o in h.result().outputs] for h in handles]
    assert got == expected
    assert len({tuple(t) for t in got[0]}) > 1  # the samples of one prompt differ
    again = [[o.token_ids for o in alone(model, p, q).outputs] for p, q in zip(ps, params)]
    assert again == expected


def test_samples_share_one_prefill(model, monkeypatch):
    from codegen_lm.engine import engine as engine_module

    calls = []
    real = engine_module.forward_rows

    def spy(model, cache, tokens, starts, *args, **kwargs):
        calls.append(tuple(tokens.shape))
        return real(model, cache, tokens, starts, *args, **kwargs)

    monkeypatch.setattr(engine_module, "forward_rows", spy)
    prompt = prompts(1)[0]
    engine = Engine(model, max_batch=4)
    out = engine.submit(prompt, GenerationParams(n=10, max_new_tokens=3, temperature=1.0, seed=0)).result()
    assert len(out.outputs) == 10 and all(len(o.token_ids) == 3 for o in out.outputs)
    assert calls.count((1, len(prompt))) == 1  # one prefill for 10 samples in 3 admissions


def test_stream_events_add_up_and_stop_strings_cut_text(model, tok):
    prompt = tok.encode("def f(x):\n    return")
    free = alone(model, prompt, GenerationParams(max_new_tokens=24), tok).outputs[0]
    text = free.text
    stop = text[5:8]
    engine = Engine(model, tok)
    handle = engine.submit(prompt, GenerationParams(max_new_tokens=24, stop=[stop]))
    events = list(handle.stream())
    out = handle.result().outputs[0]
    assert "".join(e.text for e in events) == out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and events[-1].finish_reason == "stop"
    assert [t for e in events for t in e.token_ids] == out.token_ids
    assert out.token_ids == free.token_ids[: len(out.token_ids)]


def test_logprobs_are_the_models(model):
    prompt = prompts(1, seed=5)[0]
    out = alone(model, prompt, GenerationParams(max_new_tokens=4, logprobs=3)).outputs[0]
    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        logp = model(ids).logits[0].log_softmax(-1)
    for i, token in enumerate(out.token_ids):
        row = logp[len(prompt) - 1 + i]
        assert out.logprobs[i] == pytest.approx(float(row[token]), abs=1e-4)
        top = row.topk(3)
        assert list(out.top_logprobs[i]) == top.indices.tolist()
        assert token == top.indices[0]  # greedy


def test_eos_min_tokens_and_cancellation_free_slots(model):
    prompt = prompts(1, seed=6)[0]
    free = alone(model, prompt, GenerationParams(max_new_tokens=6)).outputs[0].token_ids
    eos = free[2]
    out = alone(model, prompt, GenerationParams(max_new_tokens=6, eos_token_ids=[eos])).outputs[0]
    assert out.token_ids == free[:3] and out.finish_reason == "stop"
    late = alone(model, prompt, GenerationParams(max_new_tokens=6, eos_token_ids=[eos], min_new_tokens=4)).outputs[0]
    assert len(late.token_ids) >= 4 and eos not in late.token_ids[:4]
    engine = Engine(model, max_batch=2)
    long = engine.submit(prompt, GenerationParams(n=2, max_new_tokens=100))
    queued = engine.submit(prompt, GenerationParams(max_new_tokens=5))
    for _ in range(3):
        engine.step()
    assert len(engine.rows) == 2
    long.cancel()
    engine.step()
    result = long.result()
    assert [o.finish_reason for o in result.outputs] == ["cancelled", "cancelled"]
    assert queued.result().outputs[0].token_ids == free[:5]  # took a freed slot, unaffected
    assert engine.idle


def test_background_thread_serves_concurrent_callers(model):
    engine = Engine(model, max_batch=3)
    engine.start()
    try:
        ps = prompts(6, seed=7)
        results = [None] * 6

        def call(i):
            results[i] = engine.submit(ps[i], GenerationParams(max_new_tokens=5)).result().outputs[0].token_ids

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == [alone(model, p, GenerationParams(max_new_tokens=5)).outputs[0].token_ids for p in ps]
    finally:
        engine.stop()


def test_bad_requests(model):
    engine = Engine(model)
    with pytest.raises(ValueError, match="does not fit the context of 256"):
        engine.submit([1] * 256)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([51200])
    with pytest.raises(ValueError, match="a text prompt needs an engine with a tokenizer"):
        engine.submit("def f():")
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        GenerationParams(n=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        GenerationParams(top_p=0)


# ---- int8 -----------------------------------------------------------------------------------------


def test_int8_quantize_save_load_round_trip(model, tiny_checkpoint, tmp_path):
    q = CodeGenForCausalLM.from_pretrained(tiny_checkpoint, quantize="int8")
    linears = [m for m in q.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 4 + 1 and not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    for m in linears:  # per-output-channel rounding error is at most half a step
        assert m.weight.dtype == torch.int8 and m.weight.abs().max() <= 127
    ref_linear = model.transformer.h[0].mlp.fc_in
    err = (q.transformer.h[0].mlp.fc_in.dequantized() - ref_linear.weight).abs()
    assert (err <= q.transformer.h[0].mlp.fc_in.weight_scale[:, None] / 2 + 1e-7).all()
    ids = torch.randint(0, 50000, (2, 11))
    with torch.no_grad():
        a, b = model(ids).logits, q(ids).logits
    assert ((a - b).norm() / a.norm()) < 0.05
    q.save_pretrained(tmp_path)
    back = CodeGenForCausalLM.from_pretrained(tmp_path)
    assert isinstance(back.lm_head, Int8Linear)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, b)
        # the numba path (few rows) and the dequantizing path (many rows) agree
        x = torch.randn(3, 64)
        lin = back.transformer.h[1].attn.out_proj
        assert torch.allclose(lin(x), x @ lin.dequantized().t(), atol=1e-5)
    with torch.inference_mode():
        assert torch.allclose(lin(x), x @ lin.dequantized().t(), atol=1e-5)
    size, fp32_size = ((p / "model.safetensors").stat().st_size for p in (tmp_path, tiny_checkpoint))
    assert size < 0.7 * fp32_size


def test_int8_without_numba_falls_back(model, monkeypatch):
    from codegen_lm import kernels

    q = quantize_model(CodeGenForCausalLM.from_pretrained(model.name_or_path))
    ids = torch.randint(0, 50000, (1, 6))
    with torch.inference_mode():
        fast = q(ids).logits
        monkeypatch.setattr(kernels, "HAVE_NUMBA", False)
        slow = q(ids).logits
    assert torch.allclose(fast, slow, atol=1e-4)


# ---- speculative decoding -------------------------------------------------------------------------


def test_prompt_lookup_finds_the_latest_match():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], k=2) == [7, 8]
    assert prompt_lookup([5, 6, 7], k=3) == []
    assert prompt_lookup([4, 1, 2, 4], k=3, max_ngram=2) == [1, 2, 4]


@pytest.mark.parametrize("draft", ["prompt-lookup", "int8", "self"])
def test_speculative_greedy_equals_plain_greedy(model, tok, draft):
    drafts = {"prompt-lookup": "prompt-lookup", "self": model,
              "int8": quantize_model(CodeGenForCausalLM.from_pretrained(model.name_or_path))}
    base = prompts(1, seed=8)[0][:6]
    for i, (prompt, params) in enumerate((
        (base * 4, GenerationParams(max_new_tokens=40)),
        (base, GenerationParams(max_new_tokens=25, repetition_penalty=1.3, min_new_tokens=3)),
        (base * 2, GenerationParams(max_new_tokens=30, stop=["e"])),
    )):
        plain = alone(model, prompt, params, tok).outputs[0]
        stats = SpeculativeStats()
        spec = SpeculativeDecoder(model, tok, draft=drafts[draft], k=4).generate(prompt, params, stats)
        assert spec.token_ids == plain.token_ids and spec.text == plain.text
        assert spec.finish_reason == plain.finish_reason
        if draft == "self" and i == 0:  # a perfect draft: every guess accepted, 5 tokens per pass
            assert stats.acceptance_rate == 1.0 and stats.target_passes == 8


def test_speculative_sampling_keeps_the_distribution():
    """With a 16-token vocabulary, the distribution of the first three sampled tokens under
    speculative sampling (draft: a different model) matches plain sampling."""
    from codegen_lm import CodeGenConfig

    torch.manual_seed(0)
    config = CodeGenConfig(n_embd=32, n_layer=1, n_head=4, rotary_dim=4, vocab_size=16, eos_token_id=15,
                           n_positions=64)
    target = CodeGenForCausalLM(config).eval()
    draft = CodeGenForCausalLM(config).eval()
    with torch.no_grad():  # the draft: the target plus noise, so that they agree only in part
        for p, q in zip(target.parameters(), draft.parameters()):
            p.mul_(3)
            q.copy_(p + 0.6 * p.std() * torch.randn_like(p) if p.numel() > 1 else p)
    params = dict(max_new_tokens=3, temperature=1.0, eos_token_ids=[])
    runs = 3000
    plain, spec = torch.zeros(16, 16, 16), torch.zeros(16, 16, 16)
    engine = Engine(target, max_batch=50)
    for start in range(0, runs, 50):
        out = engine.submit([1, 2], GenerationParams(n=50, seed=start, **params)).result()
        for o in out.outputs:
            plain[tuple(o.token_ids)] += 1
    decoder = SpeculativeDecoder(target, draft=draft, k=2)
    stats = SpeculativeStats()
    for s in range(runs):
        o = decoder.generate([1, 2], GenerationParams(seed=10_000 + s, **params), stats)
        spec[tuple(o.token_ids)] += 1
    assert 0.2 < stats.acceptance_rate < 0.9, stats.acceptance_rate
    # the marginal distribution of each position (16 outcomes): equal up to sampling noise
    for dims in ((1, 2), (0, 2), (0, 1)):
        a, b = plain.sum(dims) / runs, spec.sum(dims) / runs
        tv = 0.5 * (a - b).abs().sum().item()
        assert tv < 0.06, (dims, tv)


def test_compiled_decode_step_gives_the_eager_tokens(model):
    ps = prompts(3, seed=7)
    params = GenerationParams(max_new_tokens=6)
    expected = [alone(model, p, params).outputs[0].token_ids for p in ps]
    engine = Engine(model, max_batch=2, compile=True)
    handles = [engine.submit(p, params) for p in ps]
    assert [h.result().outputs[0].token_ids for h in handles] == expected
    assert engine._decode_forward.error is None  # it really ran compiled (a C++ compiler is installed here)


def test_compile_failure_falls_back_to_eager_with_a_warning(model, monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    p = prompts(1, seed=8)[0]
    params = GenerationParams(max_new_tokens=5)
    expected = alone(model, p, params).outputs[0].token_ids
    engine = Engine(model, compile=True)
    with pytest.warns(UserWarning, match="torch.compile of the decode step failed"):
        out = engine.submit(p, params).result().outputs[0].token_ids
    assert out == expected


def test_shared_prefix_attention_equals_plain_attention():
    """The decode-step attention kernels (groups of rows sharing a prompt, rows on their own, rows of
    different lengths, rotary + cache write) and the PyTorch fallback all equal plain attention."""
    import numpy as np

    from codegen_lm import kernels
    from codegen_lm.engine.slot_cache import shared_prefix_attention
    from codegen_lm.model import apply_rotary, attention

    torch.manual_seed(0)
    S, H, L, D, prefix = 7, 3, 12, 8, 6
    K, V = torch.randn(S, H, L, D), torch.randn(S, H, L, D)
    K[:, :, :prefix], V[:, :, :prefix] = K[0, :, :prefix], V[0, :, :prefix]  # slots share the prompt
    slots = np.array([4, 1, 3, 5, 6])  # rows 0-2 are one group (any slots, any order); rows 3, 4 on their own
    ends = np.array([7, 12, 9, 3, 11])  # each row's own length
    q = torch.randn(5, H, 1, D)
    rows = torch.tensor([0, 1, 2])
    got = shared_prefix_attention(q[rows], K, V, torch.tensor(slots[:3]), prefix, torch.tensor(ends[:3]))
    with torch.no_grad():
        fast = kernels.rows_attention(q[:, :, 0] * D**-0.5, K, V, slots, ends, np.array([prefix] * 3 + [0, 0]),
                                      [(rows, 4, prefix)])
    fast = fast.view(5, H, 1, D)
    torch.testing.assert_close(fast[:3], got, atol=1e-5, rtol=1e-5)
    for r in range(5):
        s, n = int(slots[r]), int(ends[r])
        expected = attention(q[r : r + 1], K[s : s + 1, :, :n], V[s : s + 1, :, :n], None, False, 0.0)
        torch.testing.assert_close(fast[r : r + 1], expected, atol=1e-5, rtol=1e-5)

    # rotary_store: the model's rotary on q and k of a q/k/v product, k and v into the right cache cells
    qkv, cos, sin = torch.randn(2, 3 * H * D), torch.randn(2, 3), torch.randn(2, 3)  # rotary over 6 of 8 dims
    K2, V2 = K.clone(), V.clone()
    with torch.no_grad():
        q2 = kernels.rotary_store(qkv, cos, sin, K2, V2, np.array([2, 5]), np.array([4, 9]))
    qr, kr, vr = qkv.view(2, 3, H, D).unbind(1)
    torch.testing.assert_close(q2, apply_rotary(qr, cos[:, None], sin[:, None]) * D**-0.5)
    torch.testing.assert_close(K2[[2, 5], :, [4, 9]], apply_rotary(kr, cos[:, None], sin[:, None]))
    torch.testing.assert_close(V2[[2, 5], :, [4, 9]], vr)
    K2[[2, 5], :, [4, 9]], V2[[2, 5], :, [4, 9]] = K[[2, 5], :, [4, 9]], V[[2, 5], :, [4, 9]]
    assert torch.equal(K2, K) and torch.equal(V2, V)  # nothing else written


def test_samples_sharing_a_prompt_match_unshared_decoding(model, monkeypatch):
    p = prompts(1, seed=9)[0]
    params = GenerationParams(n=6, max_new_tokens=12, temperature=0.9, seed=5)
    engine = Engine(model, max_batch=4)  # 6 samples over 4 slots: two groups of different lengths
    shared = [o.token_ids for o in engine.submit(p, params).result().outputs]
    from codegen_lm.engine import slot_cache

    original = slot_cache.SlotCache.begin
    monkeypatch.setattr(slot_cache.SlotCache, "begin",
                        lambda self, rows, starts, new, first=0, shared=None: original(self, rows, starts, new, first))
    plain = [o.token_ids for o in Engine(model, max_batch=4).submit(p, params).result().outputs]
    assert shared == plain


def test_one_row_decode_kernel_equals_the_blocks(small_checkpoint, monkeypatch):
    """decode_kernel runs a whole block per call for batch-1 decoding: same logits and cache
    contents as the model's own blocks, on every small shape (partial and full rotary, an inner
    size that is not 4x, erf GELU which the kernel leaves to the blocks)."""
    from codegen_lm import decode_kernel
    from codegen_lm.engine import decode, forward
    from codegen_lm.engine.slot_cache import SlotCache

    folder, shape = small_checkpoint
    model = CodeGenForCausalLM.from_pretrained(folder).eval()
    cfg = model.config
    with torch.inference_mode():
        assert decode_kernel.can_run(model, torch.float32) == (shape != "erf-gelu")
        if shape == "erf-gelu":
            return
        assert not decode_kernel.can_run(model, torch.bfloat16)
        ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
        caches = [SlotCache(cfg.n_layer, 3, cfg.n_head, cfg.head_dim, 64, torch.float32, initial_len=16)
                  for _ in range(2)]  # the decode crosses a capacity doubling
        for cache in caches:
            forward.forward_rows(model, cache, ids[:, :10], [0], first_slot=2)
        for t in range(10, 24):
            fused = decode.decode_one(model, caches[0], int(ids[0, t]), t, 2)
            with monkeypatch.context() as m:
                m.setattr(decode_kernel, "can_run", lambda *a: False)
                plain = forward.forward_rows(model, caches[1], ids[:, t : t + 1], [t], first_slot=2)
            torch.testing.assert_close(fused, plain, atol=2e-5, rtol=1e-5)
        for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
            torch.testing.assert_close(a[:, :, :24], b[:, :, :24], atol=2e-5, rtol=1e-5)
    # and the engine's batch-1 greedy (which takes the kernel) still equals transformers token for token
    hf = load_hf(folder)
    p = ids[0, :12].tolist()
    expected = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    assert Engine(model, max_batch=1).submit(p, GenerationParams(max_new_tokens=16, eos_token_ids=[])).result(
        ).outputs[0].token_ids == expected


def test_one_row_decode_kernel_declines_what_it_cannot_compute(model):
    from codegen_lm import decode_kernel

    with torch.inference_mode():
        assert decode_kernel.can_run(model, torch.float32)
        assert not decode_kernel.can_run(quantize_model(CodeGenForCausalLM.from_config(model.config)), torch.float32)
        model.train()
        try:
            assert not decode_kernel.can_run(model, torch.float32)
        finally:
            model.eval()
    assert not decode_kernel.can_run(model, torch.float32)  # autograd on


def test_batched_decode_shortcut_equals_the_blocks(small_checkpoint, monkeypatch):
    """decode.decode_rows (packed products, attention kernels) gives the logits and cache contents of
    the model's own blocks: rows of different lengths, a group sharing a prompt in slots that are
    not consecutive, a row on its own."""
    from codegen_lm.engine import decode, forward
    from codegen_lm.engine.engine import pack_linears
    from codegen_lm.engine.slot_cache import SlotCache

    folder, _ = small_checkpoint
    model = CodeGenForCausalLM.from_pretrained(folder).eval()
    cfg = model.config
    with torch.inference_mode():
        assert not decode.can_decode_rows(model, torch.float32)  # no packed weights yet
        pack_linears(model, True)
        assert decode.can_decode_rows(model, torch.float32)
        g = torch.Generator().manual_seed(4)
        prompt = torch.randint(0, cfg.vocab_size, (1, 9), generator=g)
        other = torch.randint(0, cfg.vocab_size, (1, 5), generator=g)
        caches = [SlotCache(cfg.n_layer, 4, cfg.n_head, cfg.head_dim, 64, torch.float32, initial_len=16)
                  for _ in range(2)]
        for cache in caches:  # rows 0 and 2 hold the prompt (slots 1 and 3), row 1 another (slot 2)
            forward.forward_rows(model, cache, prompt, [0], first_slot=1)
            cache.copy_slot(1, 3, 9)
            forward.forward_rows(model, cache, other, [0], first_slot=2)
        starts, shared = [9, 5, 9], [([0, 2], 9)]
        for _ in range(10):  # crosses the cache's capacity doubling at 16
            tokens = torch.randint(0, cfg.vocab_size, (3, 1), generator=g)
            fast = decode.decode_rows(model, caches[0], tokens, starts, 1, shared)
            with monkeypatch.context() as m:
                m.setattr(forward, "decode_step", lambda *a: None)
                plain = forward.forward_rows(model, caches[1], tokens, starts, first_slot=1, shared=shared)
            torch.testing.assert_close(fast, plain, atol=2e-5, rtol=1e-5)
            starts = [s + 1 for s in starts]
        # a few tokens per row (speculative verification): two rows of 3, then one row of 4
        for rows, first, T in ((2, 1, 3), (1, 3, 4)):
            tokens = torch.randint(0, cfg.vocab_size, (rows, T), generator=g)
            at = starts[first - 1 : first - 1 + rows]
            fast = decode.decode_step(model, caches[0], tokens, at, first, all_logits=True)
            assert fast is not None and fast.shape == (rows, T, cfg.vocab_size)
            with monkeypatch.context() as m:
                m.setattr(forward, "decode_step", lambda *a: None)
                plain = forward.forward_rows(model, caches[1], tokens, at, all_logits=True, first_slot=first)
            torch.testing.assert_close(fast, plain, atol=2e-5, rtol=1e-5)
            for r in range(rows):
                starts[first - 1 + r] += T
        for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
            torch.testing.assert_close(a[1:4, :, :23], b[1:4, :, :23], atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # an in-place change of a weight makes its packed copy stale
    with torch.inference_mode():
        assert not decode.can_decode_rows(model, torch.float32)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("shape", ["flat", "peaked"])
def test_engine_draw_follows_the_top_p_distribution(shape, kernel, monkeypatch):
    """sampler.draw against transformers' top-p warper: flat rows take the whole-vocabulary rejection
    path (with the numba kernel and with the PyTorch fallback), peaked rows the candidate path. Every
    draw lies in the nucleus, and the mass in each of 8 probability bins matches within 5 sigma."""
    from transformers.generation.logits_process import TopPLogitsWarper

    from codegen_lm import kernels
    from codegen_lm.engine.sampler import draw
    from codegen_lm.generation.sampling import SamplingParams

    if not kernel:
        monkeypatch.setattr(kernels, "draw_rows", lambda *a: None)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1000, generator=g) * (0.3 if shape == "flat" else 3.0)
    n = 20000
    tokens = draw(logits.expand(n, -1), SamplingParams(do_sample=True, top_p=0.9),
                  [torch.Generator().manual_seed(i) for i in range(n)])
    expected = TopPLogitsWarper(0.9)(None, logits[None].clone())[0].softmax(-1)
    counts = torch.bincount(torch.tensor(tokens), minlength=1000).double()
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
    order = expected.argsort(descending=True)
    for part in order[expected[order] > 0].tensor_split(8):
        p = float(expected[part].sum())
        assert abs(float(counts[part].sum()) / n - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_every_decode_path_gives_the_same_samples(tiny_checkpoint, monkeypatch):
    """Seeded samples of one prompt over fewer slots than samples (groups of different lengths), through
    the batched shortcut (packed weights), the model's blocks with the attention kernels (no packed
    weights), and plain PyTorch (numba disabled): the same tokens."""
    from codegen_lm import kernels

    p = prompts(1, seed=9)[0]
    params = GenerationParams(n=6, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=5)

    def sample(**engine_args):
        model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
        return [o.token_ids for o in Engine(model, max_batch=4, **engine_args).submit(p, params).result().outputs]

    shortcut = sample()
    blocks = sample(pack_weights=False)
    monkeypatch.setattr(kernels, "HAVE_NUMBA", False)
    plain = sample(pack_weights=False)
    assert shortcut == blocks == plain
