"""The engine's sampler and text stage on the engine's real path, against independent references:
`transformers`' logits processors and warpers (repetition penalty, temperature, top-k, top-p), its
generate (greedy with a repetition penalty), its log-softmax (logprobs), with requests moving between
slots as others finish; and streaming with several stop strings."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from codegen_lm import CodeGenForCausalLM
from codegen_lm.engine import Engine, GenerationParams, TextStream

from .conftest import SMALL_SHAPES, load_hf, make_hf_model, write_tokenizer_files

HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """(transformers model, ours): a random checkpoint whose next-token distributions are peaked like a
    trained model's (top token ~0.2, the 0.9 nucleus a few hundred tokens), so that temperature, top-k
    and top-p change what is sampled."""
    folder = tmp_path_factory.mktemp("ckpt-sharp")
    hf = make_hf_model(seed=3, **SMALL_SHAPES["rotary-part"])
    with torch.no_grad():
        hf.lm_head.weight.mul_(5.0)
    hf.save_pretrained(folder)
    write_tokenizer_files(folder)
    return load_hf(folder), CodeGenForCausalLM.from_pretrained(folder)


def prompts(count: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 12, (count,), generator=g)
    return [torch.randint(0, 50000, (int(n),), generator=g).tolist() for n in lengths]


def serve_with_slot_moves(model, params: GenerationParams, samples: int = 10):
    """Two requests with `params` (and `samples` samples each) in an engine with fewer slots than
    samples, after a short greedy request that finishes early: rows are admitted in pieces and move
    down into freed slots while they decode. After every step, each running row's bitmap of seen
    tokens (for the repetition penalty) must be its own prompt and tokens. Returns [(prompt, output)]
    of the two requests."""
    a, b, c = prompts(3, seed=21)
    engine = Engine(model, max_batch=8)
    engine.submit(a, GenerationParams(max_new_tokens=3))
    handles = [engine.submit(p, GenerationParams(**{**vars(params), "n": samples})) for p in (b, c)]
    while engine.step():
        for s in engine.rows:
            own = torch.zeros(model.config.vocab_size, dtype=torch.bool)
            own[s.context()] = True
            assert torch.equal(engine.seen[s.row], own), "a row's seen-token bitmap is not its own"
    return [(p, o) for p, h in zip((b, c), handles) for o in h.result().outputs]


def reference_probs(hf, prompt: list[int], tokens: list[int], params: GenerationParams) -> torch.Tensor:
    """transformers' sampling distribution at every generated position: [len(tokens), V]."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
    rows = []
    for t in range(len(tokens)):
        context = torch.tensor([prompt + tokens[:t]])
        scores = logits[t : t + 1].clone()
        if params.repetition_penalty != 1.0:
            scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(context, scores)
        if params.temperature != 1.0:
            scores = TemperatureLogitsWarper(params.temperature)(context, scores)
        if params.top_k:
            scores = TopKLogitsWarper(params.top_k)(context, scores)
        if params.top_p < 1.0:
            scores = TopPLogitsWarper(params.top_p)(context, scores)
        rows.append(scores.softmax(-1)[0])
    return torch.stack(rows)


def ks_statistic(values: list[float]) -> float:
    """Kolmogorov-Smirnov distance of the values' empirical distribution from Uniform(0, 1)."""
    u = torch.tensor(sorted(values), dtype=torch.float64)
    n = len(u)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - u, u - (i - 1) / n).max())


SETTINGS = {
    "temperature": GenerationParams(temperature=0.7, seed=1),
    "top-k": GenerationParams(temperature=1.0, top_k=5, seed=2),
    "top-p": GenerationParams(temperature=1.0, top_p=0.8, seed=3),
    "all three": GenerationParams(temperature=1.3, top_k=50, top_p=0.9, seed=4),
    "repetition penalty": GenerationParams(temperature=0.8, top_p=0.95, repetition_penalty=1.5, seed=5),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_tokens_follow_the_transformers_distribution(sharp, name):
    """Every token the engine samples is drawn from transformers' distribution for its own context.

    For each sampled token x with reference probabilities p (tokens ordered by p), the randomised
    probability integral transform U = P(before x) + V * p(x), V uniform, is Uniform(0, 1) exactly when
    x ~ p; across all samples and positions the values must pass a Kolmogorov-Smirnov test
    (~480 values, threshold at p = 0.001). Ignoring the temperature, a penalty bitmap that stays behind
    when a row moves, or a wrong filter fails it."""
    hf, ours = sharp
    params = GenerationParams(**{**vars(SETTINGS[name]), "max_new_tokens": 24, "eos_token_ids": ()})
    g = torch.Generator().manual_seed(0)
    values = []
    for prompt, out in serve_with_slot_moves(ours, params):
        assert len(out.token_ids) == 24
        probs = reference_probs(hf, prompt, out.token_ids, params)
        for t, token in enumerate(out.token_ids):
            p = probs[t].double()
            assert p[token] > 0, f"token {token} at position {t} is outside transformers' support"
            order = torch.sort(p, descending=True, stable=True).indices
            rank = int((order == token).nonzero())
            values.append(float(p[order[:rank]].sum() + torch.rand((), generator=g, dtype=torch.float64) * p[token]))
    limit = 1.95 / math.sqrt(len(values))
    assert ks_statistic(values) < limit, (ks_statistic(values), limit)


def test_greedy_repetition_penalty_follows_its_row_across_slot_moves(sharp):
    """Greedy decoding with a strong repetition penalty, while other requests finish and rows move
    between slots: token for token what transformers' generate gives."""
    hf, ours = sharp
    params = GenerationParams(max_new_tokens=20, repetition_penalty=2.5, eos_token_ids=())
    outputs = serve_with_slot_moves(ours, params, samples=1)
    for prompt, out in outputs:
        expected = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               do_sample=False, repetition_penalty=2.5, max_new_tokens=20, min_new_tokens=20,
                               pad_token_id=0)[0, len(prompt) :].tolist()
        assert out.token_ids == expected
    # the penalty really matters here: without it the tokens differ
    plain = serve_with_slot_moves(ours, GenerationParams(max_new_tokens=20, eos_token_ids=()), samples=1)
    assert [o.token_ids for _, o in plain] != [o.token_ids for _, o in outputs]


def test_logprobs_are_transformers_log_softmax(sharp):
    """Reported logprobs (the chosen token's and the top 5) are log-softmax of the model's raw logits,
    whatever the sampling settings, for sampled rows that moved between slots."""
    hf, ours = sharp
    params = GenerationParams(max_new_tokens=8, temperature=0.7, top_k=20, logprobs=5, seed=9, eos_token_ids=())
    for prompt, out in serve_with_slot_moves(ours, params, samples=3):
        with torch.no_grad():
            logp = hf(torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        for t, token in enumerate(out.token_ids):
            assert out.logprobs[t] == pytest.approx(float(logp[t, token]), abs=1e-4)
            top = logp[t].topk(5)
            assert list(out.top_logprobs[t]) == top.indices.tolist()
            assert list(out.top_logprobs[t].values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_top_k_one_and_temperature_zero_are_greedy(sharp):
    _, ours = sharp
    greedy = [o.token_ids for _, o in serve_with_slot_moves(ours, GenerationParams(max_new_tokens=10), samples=1)]
    top1 = serve_with_slot_moves(ours, GenerationParams(max_new_tokens=10, temperature=1.0, top_k=1, seed=0), samples=1)
    assert [o.token_ids for _, o in top1] == greedy


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("shape", ["flat", "peaked"])
def test_draw_follows_the_top_p_distribution(shape, kernel, monkeypatch):
    """sampler.draw against transformers' top-p warper: flat rows take the whole-vocabulary rejection
    path (with the numba kernel and with the PyTorch fallback), peaked rows the candidate path. Every
    draw lies in the nucleus, and the mass in each of 8 probability bins matches within 5 sigma."""
    from codegen_lm.engine import sampler

    if not kernel:
        monkeypatch.setattr(sampler, "draw_rows", lambda *a: None)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1000, generator=g) * (0.3 if shape == "flat" else 3.0)
    n = 20000
    tokens = sampler.draw(logits.expand(n, -1), 0, 0.9, [torch.Generator().manual_seed(i) for i in range(n)])
    expected = TopPLogitsWarper(0.9)(None, logits[None].clone())[0].softmax(-1)
    counts = torch.bincount(torch.tensor(tokens), minlength=1000).double()
    assert counts[expected == 0].sum() == 0  # nothing outside the nucleus
    order = expected.argsort(descending=True)
    for part in order[expected[order] > 0].tensor_split(8):
        p = float(expected[part].sum())
        assert abs(float(counts[part].sum()) / n - p) < 5 * (p * (1 - p) / n) ** 0.5


# ---- text: several stop strings --------------------------------------------------------------------


class Pieces:
    """A tokenizer whose token i decodes to pieces[i] (a stand-in that fixes the text exactly)."""

    def __init__(self, pieces: dict[int, str], default: str = "a") -> None:
        self.pieces, self.default = pieces, default

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.pieces.get(i, self.default) for i in ids)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError


def test_stream_holds_back_a_prefix_of_any_stop_string():
    """With HumanEval's five stops, "x" then "\\n" then "d" must not stream "\\nd" before it is known
    whether "\\ndef" follows; a later stop in the list counts as much as the first."""
    tok = Pieces({1: "x", 2: "\n", 3: "d", 4: "ef", 5: "o"})
    stream = TextStream(tok, HUMANEVAL_STOPS)
    assert [stream.push(t) for t in (1, 2, 3, 4)] == ["x", "", "", ""]
    assert stream.stopped and stream.text == "x"
    stream = TextStream(tok, HUMANEVAL_STOPS)  # "\nd" followed by something else is text after all
    assert "".join(stream.push(t) for t in (1, 2, 3, 5)) + stream.finish() == "x\ndo"


def test_engine_streams_stop_at_any_of_several_stop_strings(sharp):
    """Through the engine: the streamed deltas add up to the final text, which ends before the stop
    string that appears, even when it is not the first of the list; no delta ever carries its start."""
    _, ours = sharp
    prompt = prompts(1, seed=30)[0]
    free = Engine(ours, max_batch=1).submit(prompt, GenerationParams(max_new_tokens=6)).result().outputs[0].token_ids
    assert len(set(free[:5])) == 5
    tok = Pieces({free[0]: "x", free[1]: "\n", free[2]: "d", free[3]: "ef", free[4]: "y"})
    engine = Engine(ours, tok, max_batch=2)
    handle = engine.submit(prompt, GenerationParams(max_new_tokens=6, stop=HUMANEVAL_STOPS))
    deltas = [e.text for e in handle.stream()]
    out = handle.result().outputs[0]
    assert out.text == "".join(deltas) == "x"
    assert out.finish_reason == "stop" and out.token_ids == free[:4]
    assert all("\n" not in d for d in deltas)
