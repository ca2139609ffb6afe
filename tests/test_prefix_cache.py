"""The prefix cache: block keys and LRU eviction, and in the engine: the same tokens with and without
it, what it saves, conversations, tiny budgets and prompts longer than the budget."""

from __future__ import annotations

import pytest
import torch

from codegen_lm.engine import Engine, GenerationParams
from codegen_lm.engine.prefix_cache import PrefixCache

BLOCK = 16


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def block_bytes(model) -> int:
    c = model.config
    return 2 * c.n_layer * c.n_head * BLOCK * c.head_dim * 4


def test_blocks_are_keyed_by_everything_before_them():
    cache = PrefixCache(10 * 64, (2, 1, 1, 4, 2), torch.float32, block_tokens=4)  # 64-byte blocks, 10 of them
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9, 5, 6, 7, 8]
    assert cache.keys(a)[1] != cache.keys(b)[1]  # same block content after a different start: another key
    assert cache.keys([*a, 1, 2]) == cache.keys(a) and len(cache.keys(a, limit=7)) == 1  # only full blocks

    def fill(value):
        return lambda start, end, out: out.fill_(value + start)

    assert cache.insert(a, fill(100)) == 2
    assert cache.insert([*a, 0, 0, 0, 0], fill(200)) == 1  # only the new block is read
    found = cache.lookup([*a, 0, 0, 0, 0, 1], limit=13)
    assert [float(d[0, 0, 0, 0, 0]) for d in found] == [100, 104, 208]
    assert len(cache.lookup([*a[:4], 7, 7, 7, 7], limit=8)) == 1  # a shared first block only
    stats = cache.stats()
    assert (stats.blocks, stats.bytes, stats.lookups, stats.hits, stats.hit_tokens) == (3, 192, 2, 2, 16)


def test_eviction_takes_the_ends_of_chains_first():
    cache = PrefixCache(3 * 64, (2, 1, 1, 4, 2), torch.float32, block_tokens=4)  # room for 3 blocks

    def noop(start, end, out):
        out.zero_()

    old = list(range(12))  # 3 blocks: fills the cache
    cache.insert(old, noop)
    new = [50, 51, 52, 53, 54, 55, 56, 57]
    assert cache.insert(new, noop) == 2
    # the new chain took the room of old's last two blocks: old's first block is still usable
    assert len(cache.lookup(old, limit=12)) == 1
    assert len(cache.lookup(new, limit=8)) == 2
    assert cache.stats().evicted_blocks == 2
    # a chain longer than the whole budget keeps its first blocks
    longer = list(range(100, 140))
    assert cache.insert(longer, noop) == 3
    assert len(cache.lookup(longer, limit=40)) == 3


def run_requests(model, requests, sequential=True, **engine_args):
    """Token ids of each (prompt, params), submitted one after another (each after the previous
    finished, as an editor does) or all at once; and the engine."""
    engine = Engine(model, max_batch=4, **engine_args)
    if sequential:
        outs = [engine.submit(p, q).result() for p, q in requests]
    else:
        handles = [engine.submit(p, q) for p, q in requests]
        outs = [h.result() for h in handles]
    return [[o.token_ids for o in r.outputs] for r in outs], engine, outs


def test_outputs_are_identical_with_and_without_the_cache(model):
    base = tokens(70, seed=1)
    greedy = GenerationParams(max_new_tokens=10)
    sampled = GenerationParams(n=3, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=4)
    penalised = GenerationParams(max_new_tokens=10, repetition_penalty=1.3)
    requests = [
        (base, greedy),
        (base + tokens(5, seed=2), greedy),  # shares 64 tokens (4 blocks) with the first
        (base, sampled),  # the same prompt again: all but its last block... and token reused
        (base[:40] + tokens(30, seed=3), penalised),  # shares 2 blocks
        (tokens(20, seed=5), sampled),  # nothing in common
    ]
    for sequential in (True, False):
        off, _, _ = run_requests(model, requests, sequential, prefix_cache_mb=0)
        on, engine, outs = run_requests(model, requests, sequential)
        assert on == off
    stats = engine.stats()
    assert stats.prefix_cache.hits >= 3 and stats.prefix_cache.hit_tokens >= 64 + 64 + 32
    assert [o.cached_tokens for o in outs[:4]] == [0, 64, 64, 32]
    assert stats.prefill_tokens == sum(len(p) for p, _ in requests) - sum(o.cached_tokens for o in outs)


def test_a_conversation_reuses_the_previous_turn_and_its_answer(model):
    """Turn 2's prompt is turn 1's prompt, its answer and a new instruction: the answer's keys and values
    come from the finished sample, so only the new part is computed. Straight after the answer its freed
    slot still holds them, to the token; once another request has taken that slot, the cache's blocks
    (whole blocks only) still give most of them."""
    turn1 = tokens(40, seed=6)
    turn2 = None
    fresh = None
    for other_request_between in (False, True):
        engine = Engine(model, max_batch=2)
        answer = engine.submit(turn1, GenerationParams(max_new_tokens=30)).result().outputs[0].token_ids
        if other_request_between:
            engine.submit(tokens(20, seed=8), GenerationParams(max_new_tokens=4)).result()
        turn2 = turn1 + answer + tokens(10, seed=7)
        fresh = fresh or Engine(model, max_batch=2, prefix_cache_mb=0).submit(
            turn2, GenerationParams(max_new_tokens=8)).result()
        second = engine.submit(turn2, GenerationParams(max_new_tokens=8)).result()
        # the sample's keys and values cover turn1 + all answer tokens but the last (never fed)
        held = len(turn1) + len(answer) - 1
        assert second.cached_tokens == (held // BLOCK * BLOCK if other_request_between else held)
        assert second.outputs[0].token_ids == fresh.outputs[0].token_ids
        stats = engine.stats()
        assert stats.prefix_cache.hit_tokens == second.cached_tokens
        assert stats.prefill_tokens == len(turn1) + 20 * other_request_between + len(turn2) - second.cached_tokens


def test_an_editor_session_reuses_the_freed_slot_to_the_token(model):
    """An editor's requests grow by a few characters each: every request after the first computes only
    the tokens after what the previous one held (not up to a block's worth more), on the CPU's traded
    slots and on copying ones (as on a GPU), with the tokens of a cache-less engine; samples of n > 1
    and slots moving down keep their outputs too."""
    text = tokens(300, seed=9)
    requests = [(text[: 200 + 3 * i], GenerationParams(max_new_tokens=4)) for i in range(6)]
    requests.append((text[:230], GenerationParams(n=3, max_new_tokens=5, temperature=1.0, seed=2)))
    requests.append((text[:235], GenerationParams(max_new_tokens=4)))
    off, _, _ = run_requests(model, requests, prefix_cache_mb=0)
    for remap in (True, False):
        engine = Engine(model, max_batch=4)
        engine.cache.remap = remap
        outs = [engine.submit(p, q).result() for p, q in requests]
        assert [[o.token_ids for o in r.outputs] for r in outs] == off
        # each prompt but the first (and the one after n=3's longer answers) starts with everything the
        # previous request's sample held: its prompt and all its answer tokens but the last
        assert [o.cached_tokens for o in outs[1:6]] == [len(p) for p, _ in requests[:5]]
        assert outs[7].cached_tokens == 230
        assert engine.stats().prefill_tokens == sum(len(p) for p, _ in requests) - sum(o.cached_tokens for o in outs)


def test_tiny_budgets_evict_and_keep_outputs_identical(model):
    prompts = [tokens(60, seed=s) for s in range(4)]
    requests = [(p, GenerationParams(max_new_tokens=6)) for p in prompts + prompts[::-1]]
    off, _, _ = run_requests(model, requests, prefix_cache_mb=0)
    for blocks in (3, 1):  # 3 blocks: less than one prompt (3 of its 4 blocks); 1 block
        budget = blocks * block_bytes(model)
        on, engine, _ = run_requests(model, requests, prefix_cache_mb=budget / 2**20)
        assert on == off
        stats = engine.stats().prefix_cache
        assert stats.blocks == blocks and stats.bytes <= budget and stats.evicted_blocks > 0
    # below one block the cache holds nothing, and still changes nothing
    on, engine, _ = run_requests(model, requests, prefix_cache_mb=block_bytes(model) / 2 / 2**20)
    assert on == off and engine.stats().prefix_cache.blocks == 0


def test_bad_budget_is_an_error(model):
    with pytest.raises(ValueError, match="prefix_cache_mb must be >= 0"):
        Engine(model, prefix_cache_mb=-1)
