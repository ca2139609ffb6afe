"""The inference engine: continuous batching, shared prefill, chunked prefill, streaming from threads
and asyncio, cancellation, failures, int8 weights, torch.compile, and the CPU kernel paths against the
model's own blocks. (Sampling against transformers: test_sampler.py; the prefix cache:
test_prefix_cache.py; speculative decoding: test_speculative.py.)"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from codegen_lm import CodeGenForCausalLM
from codegen_lm.engine import Engine, EngineError, GenerationParams, runner
from codegen_lm.engine import engine as engine_module
from codegen_lm.engine.runner import Row
from codegen_lm.engine.slot_cache import SlotCache
from codegen_lm.kernels import _numba
from codegen_lm.quantize import Int8Linear, quantize_model

from .conftest import load_hf


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50000, (int(n),), generator=g).tolist()
            for n in torch.randint(2, 20, (count,), generator=g)]


def alone(model, prompt, params, tok=None, **engine_args):
    return Engine(model, tok, max_batch=params.n, **engine_args).submit(prompt, params).result()


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
    calls = []
    real = engine_module.run

    def spy(model, cache, rows, *args, **kwargs):
        calls.extend(len(r.tokens) for r in rows)
        return real(model, cache, rows, *args, **kwargs)

    monkeypatch.setattr(engine_module, "run", spy)
    prompt = prompts(1)[0]
    engine = Engine(model, max_batch=4, prefix_cache_mb=0)
    out = engine.submit(prompt, GenerationParams(n=10, max_new_tokens=3, temperature=1.0, seed=0)).result()
    assert len(out.outputs) == 10 and all(len(o.token_ids) == 3 for o in out.outputs)
    assert calls.count(len(prompt)) == 1  # one prefill for 10 samples in 3 admissions
    assert sum(calls) == len(prompt) + 10 * 2  # and each sample fed its first two tokens once


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
    q = quantize_model(CodeGenForCausalLM.from_pretrained(model.name_or_path))
    ids = torch.randint(0, 50000, (1, 6))
    with torch.inference_mode():
        fast = q(ids).logits
        monkeypatch.setattr(_numba, "HAVE_NUMBA", False)
        slow = q(ids).logits
    assert torch.allclose(fast, slow, atol=1e-4)


# ---- torch.compile -------------------------------------------------------------------------------


def test_compiled_decode_step_gives_the_eager_tokens(model):
    ps = prompts(3, seed=7)
    params = GenerationParams(max_new_tokens=6)
    expected = [alone(model, p, params).outputs[0].token_ids for p in ps]
    engine = Engine(model, max_batch=2, compile=True)
    handles = [engine.submit(p, params) for p in ps]
    assert [h.result().outputs[0].token_ids for h in handles] == expected
    assert engine._blocks.error is None  # it really ran compiled (a C++ compiler is installed here)


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
    with pytest.warns(UserWarning, match="torch.compile of the engine's forward pass failed"):
        out = engine.submit(p, params).result().outputs[0].token_ids
    assert out == expected



# ---- chunked prefill, threads, asyncio, failures ----------------------------------------------------


def test_chunked_prefill_equals_one_piece_prefill(model):
    """A prompt prefilled a few tokens per step (alone, and while other samples decode) gives the tokens
    of a one-piece prefill: greedy, and seeded samples."""
    ps = prompts(3, seed=11)
    long = prompts(1, seed=12)[0] * 5  # ~50-100 tokens
    params = [GenerationParams(max_new_tokens=12), GenerationParams(n=3, max_new_tokens=12, temperature=0.9, seed=3),
              GenerationParams(max_new_tokens=12, repetition_penalty=1.4)]

    def serve(**engine_args):
        engine = Engine(model, max_batch=6, prefix_cache_mb=0, **engine_args)
        handles = [engine.submit(p, q) for p, q in zip(ps, params)]
        engine.step()
        engine.step()  # the first requests are decoding when the long prompt arrives
        handles.append(engine.submit(long, params[1]))
        return [[o.token_ids for o in h.result().outputs] for h in handles]

    whole = serve(solo_chunk=10_000, prefill_chunk=10_000)
    assert serve(solo_chunk=7, prefill_chunk=5) == whole
    assert serve(solo_chunk=1, prefill_chunk=1) == whole


def test_running_streams_keep_producing_tokens_while_a_long_prompt_is_prefilled(model):
    engine = Engine(model, max_batch=4, prefix_cache_mb=0, prefill_chunk=16)
    running = [engine.submit(p, GenerationParams(max_new_tokens=200, eos_token_ids=[])) for p in prompts(2, seed=13)]
    while len(engine.rows) < 2:
        engine.step()
    long = engine.submit(prompts(1, seed=14)[0] * 12, GenerationParams(max_new_tokens=2))
    steps = 0
    while not long._request.samples[0].output.token_ids:
        before = [len(h._request.samples[0].output.token_ids) for h in running]
        engine.step()
        steps += 1
        after = [len(h._request.samples[0].output.token_ids) for h in running]
        assert all(b == a + 1 for a, b in zip(before, after))  # every step still gave each stream a token
    prompt_len = len(long._request.prompt_ids)
    assert steps == -(-prompt_len // 16)  # the prompt took ceil(len / 16) chunked steps
    engine.run()


def test_chunks_are_sized_by_measured_step_times():
    from types import SimpleNamespace

    from codegen_lm.engine.scheduler import (
        BUSY_CHUNK_BUDGET,
        CHUNK_BUDGET,
        FIRST_CHUNK,
        MIN_CHUNK,
        RESAMPLE_EVERY,
        SOLO_CHUNK,
        Scheduler,
    )

    s = Scheduler(4)
    s.staged = SimpleNamespace(logits=None, prefilled=0, prompt_ids=[1] * 10_000)
    assert s.chunk(0) == (0, SOLO_CHUNK)  # nothing else running
    assert s.chunk(3) is None  # no plain decode step timed yet: take one first
    s.observe(3, 0, 0.100)  # a plain decode step: 100 ms
    assert s.chunk(3) == (0, FIRST_CHUNK)  # the prompt token's cost is not known yet
    s.observe(3, 20, 0.300)  # with 20 prompt tokens: 200 ms more, 10 ms a token
    assert s.chunk_size(3) == int(CHUNK_BUDGET * 0.100 / 0.010)
    s.observe(3, 10, 5.0)  # a slow stretch: chunks shrink, never below MIN_CHUNK
    assert s.chunk_size(3) == MIN_CHUNK
    for _ in range(RESAMPLE_EVERY):
        s.observe(3, 10, 0.2)
    assert s.chunk(3) is None and s.chunk(3) is not None  # one plain step in RESAMPLE_EVERY
    s.observe(3, 20, 0.300)
    calm = s.chunk_size(3)
    s.waiting.append(SimpleNamespace())  # another prompt waits behind the staged one: bigger chunks
    assert s.chunk_size(3) == int(BUSY_CHUNK_BUDGET * s.decode_step_s / s.token_s) > calm
    fixed = Scheduler(4, prefill_chunk=7)
    fixed.staged = s.staged
    assert fixed.chunk(2) == (0, 7)


def test_asyncio_streams_without_polling(model, tok):
    """astream() serves several requests concurrently from one event loop; their events and results are
    what the same requests give synchronously."""
    ps = prompts(3, seed=15)
    params = GenerationParams(n=2, max_new_tokens=8, temperature=0.8, seed=1)
    expected = [[o.token_ids for o in alone(model, p, params).outputs] for p in ps]
    engine = Engine(model, max_batch=3)

    async def consume(prompt):
        handle = engine.submit(prompt, params)
        tokens = {0: [], 1: []}
        async for event in handle.astream():
            tokens[event.index].extend(event.token_ids)
        result = await handle.aresult()
        assert [o.token_ids for o in result.outputs] == [tokens[0], tokens[1]]
        return [tokens[0], tokens[1]]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(consume(p) for p in ps)), timeout=120)

    try:
        assert asyncio.run(main()) == expected
    finally:
        engine.stop()


def test_submit_and_cancel_never_wait_for_a_running_step(model, monkeypatch):
    """While a step is stuck inside the model, submit() and cancel() from another thread return, and the
    next step takes both."""
    entered, release = threading.Event(), threading.Event()
    real = engine_module.run

    def slow_run(*args, **kwargs):
        entered.set()
        assert release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "run", slow_run)
    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        first = engine.submit(prompts(1, seed=16)[0], GenerationParams(max_new_tokens=30))
        assert entered.wait(60)  # the engine thread is now inside a step
        done = threading.Event()
        handles = []

        def client():
            handles.append(engine.submit(prompts(1, seed=17)[0], GenerationParams(max_new_tokens=4)))
            first.cancel()
            done.set()

        threading.Thread(target=client).start()
        assert done.wait(10), "submit/cancel blocked behind the running step"
        monkeypatch.setattr(engine_module, "run", real)
        release.set()
        assert first.result().outputs[0].finish_reason == "cancelled"
        assert len(handles[0].result().outputs[0].token_ids) == 4
    finally:
        release.set()
        engine.stop()


def test_a_failing_step_ends_its_requests_with_an_error(model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    engine = Engine(model)
    engine.start()
    try:
        monkeypatch.setattr(engine_module, "run", broken)
        handle = engine.submit(prompts(1)[0], GenerationParams(max_new_tokens=3))
        with pytest.raises(EngineError, match="out of memory"):
            handle.result()
        monkeypatch.undo()
        # the engine goes on serving
        assert len(engine.submit(prompts(1)[0], GenerationParams(max_new_tokens=3)).result().outputs[0].token_ids) == 3
    finally:
        engine.stop()
    sync = Engine(model)
    monkeypatch.setattr(engine_module, "run", broken)
    with pytest.raises(RuntimeError, match="out of memory"):  # driven from this thread: the error itself
        sync.submit(prompts(1)[0], GenerationParams(max_new_tokens=3)).result()


# ---- kernels against plain PyTorch -------------------------------------------------------------------


def test_attention_kernels_equal_plain_attention():
    """The decode-step attention kernels (groups of rows sharing a prompt, rows on their own, rows of
    different lengths, rotary + cache write) equal plain attention."""
    from codegen_lm.kernels import attention as kernels
    from codegen_lm.model import apply_rotary, attention

    torch.manual_seed(0)
    S, H, L, D, prefix = 7, 3, 12, 8, 6
    K, V = torch.randn(S, H, L, D), torch.randn(S, H, L, D)
    K[:, :, :prefix], V[:, :, :prefix] = K[0, :, :prefix], V[0, :, :prefix]  # slots share the prompt
    slots = np.array([4, 1, 3, 5, 6])  # rows 0-2 are one group (any slots, any order); rows 3, 4 on their own
    ends = np.array([7, 12, 9, 3, 11])  # each row's own length
    q = torch.randn(5, H, 1, D)
    rows = torch.tensor([0, 1, 2])
    with torch.no_grad():
        fast = kernels.rows_attention(q[:, :, 0] * D**-0.5, K, V, slots, ends, np.array([prefix] * 3 + [0, 0]),
                                      [(rows, 4, prefix)])
    fast = fast.view(5, H, 1, D)
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
    shared = [o.token_ids for o in Engine(model, max_batch=4).submit(p, params).result().outputs]
    real = engine_module.run
    monkeypatch.setattr(engine_module, "run",
                        lambda model, cache, rows, shared, *rest: real(model, cache, rows, (), *rest))
    plain = [o.token_ids for o in Engine(model, max_batch=4).submit(p, params).result().outputs]
    assert shared == plain


def _two_caches(cfg, slots=5):
    return [SlotCache(cfg.n_layer, slots, cfg.n_head, cfg.head_dim, 64, torch.float32, initial_len=16)
            for _ in range(2)]


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("stored", ["fp32", "int8"])
def test_one_token_block_kernel_equals_the_blocks(small_checkpoint, stored, group, monkeypatch):
    """kernels/block.py runs a whole block per call for batch-1 decoding, with fp32 or int8 weights and
    either layout of its dot loops (one or four weight rows at a time): same logits and cache contents
    as the model's own blocks, on every small shape (partial and full rotary, an inner size that is not
    4x, erf GELU which the kernel leaves to the other paths)."""
    from codegen_lm.kernels import block

    monkeypatch.setattr(runner, "row_group", lambda module: group)

    folder, shape = small_checkpoint
    model = CodeGenForCausalLM.from_pretrained(folder, quantize="int8" if stored == "int8" else None).eval()
    cfg = model.config
    with torch.inference_mode():
        weights = runner._block_weights(model.transformer.h[0])
        assert block.can_run(weights, cfg.activation_function, torch.float32) == (shape != "erf-gelu")
        if shape == "erf-gelu":
            return
        assert not block.can_run(weights, cfg.activation_function, torch.bfloat16)
        ids = torch.randint(0, cfg.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3)).tolist()[0]
        fused, plain = _two_caches(cfg)
        for cache in (fused, plain):
            runner.run(model, cache, [Row(2, 0, ids[:10])])
        for t in range(10, 24):  # crosses the cache's capacity doubling at 16
            a = runner._one_token(model, fused, Row(2, t, [ids[t]]))
            b = runner.run(model, plain, [Row(2, t, [ids[t]])], blocks=runner.forward_slots)
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(fused.k[:, :, :, :24], plain.k[:, :, :, :24], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(fused.v[:, :, :, :24], plain.v[:, :, :, :24], atol=2e-5, rtol=1e-5)
    if stored == "int8":
        return
    # and the engine's batch-1 greedy (which takes the kernel) still equals transformers token for token
    hf = load_hf(folder)
    p = ids[:12]
    expected = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 12:].tolist()
    assert Engine(model, max_batch=1).submit(p, GenerationParams(max_new_tokens=16, eos_token_ids=[])).result(
        ).outputs[0].token_ids == expected


def test_one_token_block_kernel_declines_what_it_cannot_compute(model):
    from codegen_lm.kernels import block

    act = model.config.activation_function
    with torch.inference_mode():
        assert block.can_run(runner._block_weights(model.transformer.h[0]), act, torch.float32)
        q = quantize_model(CodeGenForCausalLM.from_config(model.config))
        assert block.can_run(runner._block_weights(q.transformer.h[0]), act, torch.float32)  # int8 matrices
        half = CodeGenForCausalLM.from_config(model.config).to(torch.bfloat16)
        assert not block.can_run(runner._block_weights(half.transformer.h[0]), act, torch.float32)
        assert not block.can_run(runner._block_weights(model.transformer.h[0]), "gelu", torch.float32)
    assert not block.can_run(runner._block_weights(model.transformer.h[0]), act, torch.float32)  # autograd on


@pytest.mark.parametrize("weights", ["packed", "unpacked", "int8"])
def test_kernel_pass_equals_the_blocks(small_checkpoint, weights):
    """runner's CPU pass (products through packed / plain / int8 weights, attention kernels, SDPA for
    chunks) gives the logits and cache contents of the model's own blocks for a mixed step: rows of
    different lengths, a group sharing a prompt in slots that are not consecutive, a row on its own,
    rows checking a few guesses, and a prompt chunk continuing a cached part."""
    from codegen_lm.engine.weights import PackedLinear, prepare

    folder, _ = small_checkpoint
    model = CodeGenForCausalLM.from_pretrained(folder, quantize="int8" if weights == "int8" else None).eval()
    prepare(model, weights == "packed")
    if weights != "int8":
        assert all(type(m) is PackedLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    g = torch.Generator().manual_seed(4)

    def rand(n):
        return torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()

    prompt, other, long = rand(9), rand(5), rand(30)
    fast, plain = _two_caches(cfg)
    with torch.inference_mode():
        for cache in (fast, plain):  # slots 1 and 3 hold the prompt, slot 2 another, slot 4 a long prompt's start
            runner.run(model, cache, [Row(1, 0, prompt), Row(2, 0, other)], blocks=runner.forward_slots)
            cache.copy_slot(1, 3, 9)
            runner.run(model, cache, [Row(4, 0, long[:12], "none")], blocks=runner.forward_slots)
        starts = {1: 9, 2: 5, 3: 9}
        for step in range(8):  # crosses the cache's capacity doubling at 16
            rows = [Row(1, starts[1], rand(1)), Row(2, starts[2], rand(3 if step % 2 else 1), "all"),
                    Row(3, starts[3], rand(1))]
            if step == 3:
                rows.append(Row(4, 12, long[12:]))  # the rest of the long prompt
            shared = [([0, 2], 9)]
            a = runner.run(model, fast, rows, shared)
            b = runner.run(model, plain, rows, blocks=runner.forward_slots)
            torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-5)
            for r in rows[:3]:
                starts[r.slot] += len(r.tokens)
        for x, y in ((fast.k, plain.k), (fast.v, plain.v)):
            torch.testing.assert_close(x[:, 1:5, :, :30], y[:, 1:5, :, :30], atol=3e-5, rtol=1e-5)


def test_every_decode_path_gives_the_same_samples(tiny_checkpoint, monkeypatch):
    """Seeded samples of one prompt over fewer slots than samples (groups of different lengths), through
    the kernel pass with packed weights, with plain weights, the model's blocks with numba off, and
    torch.compile: the same tokens."""
    p = prompts(1, seed=9)[0]
    params = GenerationParams(n=6, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=5)

    def sample(**engine_args):
        model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
        return [o.token_ids for o in Engine(model, max_batch=4, **engine_args).submit(p, params).result().outputs]

    packed = sample()
    unpacked = sample(pack_weights=False)
    compiled = sample(compile=True)
    monkeypatch.setattr(_numba, "HAVE_NUMBA", False)
    blocks = sample(pack_weights=False)
    assert packed == unpacked == compiled == blocks


# ---- bf16 -------------------------------------------------------------------------------------------------


def test_bf16_products_and_bf16_weights_stay_close_to_fp32(tiny_checkpoint):
    """matmul_dtype="bfloat16" (fp32 weights, bf16 products) and a model loaded in bf16 (its own blocks
    in bf16) give log-probabilities within bf16 rounding of fp32, for a prompt chunk and for decode
    steps through the engine; "auto" picks bf16 only where the CPU multiplies it in hardware."""
    from codegen_lm.kernels import onednn

    fp32 = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    bf16 = CodeGenForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16)
    ids = prompts(1, seed=40)[0] * 4

    def logp(model, matmul_dtype=torch.float32):
        cfg = model.config
        cache = SlotCache(cfg.n_layer, 1, cfg.n_head, cfg.head_dim, 256, model.transformer.wte.weight.dtype)
        with torch.inference_mode():
            return runner.run(model, cache, [Row(0, 0, ids, "all")], matmul_dtype=matmul_dtype).float().log_softmax(-1)

    exact = logp(fp32)
    for approx in (logp(fp32, torch.bfloat16), logp(bf16)):
        assert not torch.equal(approx, exact)  # really computed otherwise
        assert (approx - exact).abs().max() < 0.05
    # through the engine: each variant's reported logprobs of its own tokens, against fp32 scoring them
    params = GenerationParams(n=3, max_new_tokens=6, temperature=1.0, seed=2, logprobs=0)
    for model, kwargs in ((fp32, dict(matmul_dtype="bfloat16")), (bf16, {})):
        out = Engine(model, max_batch=3, **kwargs).submit(ids, params).result()
        for o in out.outputs:
            with torch.inference_mode():
                ref = fp32(torch.tensor([ids + o.token_ids])).logits[0, len(ids) - 1 : -1].log_softmax(-1)
            expected = ref.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
            assert (torch.tensor(o.logprobs) - expected).abs().max() < 0.05
    assert Engine(fp32, matmul_dtype="auto").matmul_dtype == (torch.bfloat16 if onednn.bf16_native() else torch.float32)
    with pytest.raises(ValueError, match="matmul_dtype must be"):
        Engine(fp32, matmul_dtype="float16")


def test_prefill_goes_on_while_every_slot_is_taken(model):
    """With all slots decoding, the next prompt is prefilled and waits ready in its staging slot, and the
    one after it is prefilled in the other; each request still gets the tokens it gets alone."""
    g = torch.Generator().manual_seed(31)
    long_ones = [torch.randint(0, 50000, (6,), generator=g).tolist() for _ in range(2)]
    queued = [torch.randint(0, 50000, (30,), generator=g).tolist() for _ in range(2)]
    engine = Engine(model, max_batch=2, prefill_chunk=8, prefix_cache_mb=0)
    decoding = GenerationParams(max_new_tokens=60, eos_token_ids=[])
    waiting = GenerationParams(n=2, max_new_tokens=5, temperature=0.7, seed=3)
    handles = [engine.submit(p, decoding) for p in long_ones] + [engine.submit(p, waiting) for p in queued]
    third, fourth = (h._request for h in handles[2:])
    for _ in range(40):
        engine.step()
        if fourth.prefilled == len(queued[1]):
            break
    assert len(engine.rows) == 2 and all(s.request.params is decoding for s in engine.rows)  # slots all taken
    assert engine.scheduler.ready is third and third.prefilled == len(queued[0])
    assert engine.scheduler.staged is fourth and fourth.logits is not None  # prefilled too, in the other slot
    assert {third.staging, fourth.staging} == set(engine.staging)
    engine.run()
    for h, p, params in zip(handles, long_ones + queued, [decoding] * 2 + [waiting] * 2):
        assert [o.token_ids for o in h.result().outputs] == [o.token_ids for o in alone(model, p, params).outputs]


def test_slots_trading_places_read_the_same_through_every_path(model):
    """On the CPU the engine's slots trade places instead of copying (SlotCache.move); requests that
    leave the places scattered give the same tokens through the CPU kernels and through the model's own
    blocks (which then read a gathered copy), as an engine whose slots are places."""
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (9, 14, 6, 11)]
    params = [GenerationParams(max_new_tokens=m, eos_token_ids=[]) for m in (3, 9, 5, 7)]
    sampled = GenerationParams(n=3, max_new_tokens=6, temperature=1.0, seed=5, eos_token_ids=[])

    def tokens(blocks, remap):
        engine = Engine(model, max_batch=3)
        engine.cache.remap = remap
        engine._blocks = blocks
        handles = [engine.submit(p, q) for p, q in zip(prompts, params)] + [engine.submit(prompts[0], sampled)]
        out = [[o.token_ids for o in h.result().outputs] for h in handles]
        return out, engine.cache.phys

    plain, places = tokens(None, False)
    assert places == sorted(places)
    traded, places = tokens(None, True)
    assert traded == plain and places != sorted(places)  # the places did move
    blocks, _ = tokens(runner.forward_slots, True)
    assert blocks == plain


def test_slot_cache_move_trades_places_or_copies():
    for remap in (True, False):
        cache = SlotCache(2, 4, 2, 3, 8, torch.float32, remap=remap)
        for slot in range(4):
            cache.write(slot, 0, torch.full((2, 2, 2, 8, 3), float(slot)))
        assert cache.move(1, 3, 8) == remap
        out = torch.empty(2, 2, 2, 8, 3)
        cache.read(3, 0, 8, out)
        assert (out == 1).all()
        cache.read(1, 0, 8, out)
        assert (out == (3 if remap else 1)).all()  # traded: slot 1 holds what slot 3 held
        cache.copy_slot(0, 2, 8)
        cache.read(2, 0, 8, out)
        assert (out == 0).all()
