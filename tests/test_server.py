"""`codegen-lm serve` as users run it: a real uvicorn process on 127.0.0.1, driven with the official
`openai` client (and raw HTTP for the editor and TGI shapes), its answers compared with the engine's
own in this process and with `transformers`' log-probabilities."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.engine import Engine, GenerationParams

from .conftest import load_hf
from .server_process import Server

EOS = 50256
NO_EOS = {str(EOS): -100}  # keeps a sample going until max_tokens


@pytest.fixture(scope="module")
def checkpoint(serve_checkpoint) -> Path:
    return serve_checkpoint


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint, "--max-batch", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(checkpoint):
    """The same checkpoint in this process: what the server's answers must equal (the server runs with this
    process's thread count, so that both reduce in the same order)."""
    return Engine(CodeGenForCausalLM.from_pretrained(checkpoint), CodeGenTokenizerFast.from_pretrained(checkpoint))


PROMPT = "def fibonacci(n):\n    "


def test_completion_equals_the_engines_with_logprobs(server, engine):
    out = server.client().completions.create(model=str(server_model(server)), prompt=PROMPT, max_tokens=12,
                                             temperature=0, logprobs=3)
    want = engine.submit(PROMPT, GenerationParams(max_new_tokens=12, logprobs=3)).result().outputs[0]
    choice = out.choices[0]
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 12
    assert lp.tokens == [engine.tokenizer.decode([t]) for t in want.token_ids]
    assert lp.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert all(len(top) <= 4 and tok in top for top, tok in zip(lp.top_logprobs, lp.tokens))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(12)]
    assert out.usage.prompt_tokens == len(engine.tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.model == server_model(server)


def server_model(server) -> str:
    return server.client().models.list().data[0].id


def test_models_lists_the_served_model(server, checkpoint):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [str(checkpoint)] and models.data[0].object == "model"


def test_streaming_sends_each_token_as_it_comes_with_usage(server, engine):
    client = server.client()
    chunks = list(client.completions.create(model=server_model(server), prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}, logit_bias=NO_EOS))
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    body = chunks[:-1]
    assert all(c.usage is None for c in body)
    assert len(body) >= 8  # a chunk per token (a few may wait for a character to complete)
    text = "".join(c.choices[0].text for c in body)
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    want = engine.submit(PROMPT, GenerationParams(max_new_tokens=10, logit_bias={EOS: -100})).result().outputs[0]
    assert text == want.text


def test_n_samples_streamed_and_seeds_repeat(server):
    client = server.client()
    model = server_model(server)
    kwargs = dict(model=model, prompt=["a = 1\n", "def f(x):"], max_tokens=8, temperature=1.0, n=3, seed=123,
                  logit_bias=NO_EOS)
    full = client.completions.create(**kwargs)
    assert sorted(c.index for c in full.choices) == list(range(6))
    texts: dict[int, str] = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in full.choices}
    again = client.completions.create(**kwargs)
    assert [c.text for c in again.choices] == [c.text for c in full.choices]
    other = client.completions.create(**{**kwargs, "seed": 124})
    assert [c.text for c in other.choices] != [c.text for c in full.choices]
    assert len({c.text for c in full.choices[:3]}) > 1  # the samples of one prompt differ


def test_best_of_returns_the_samples_with_the_highest_mean_logprob(server, engine):
    out = server.client().completions.create(model=server_model(server), prompt=PROMPT, max_tokens=6, n=2, best_of=5,
                                             temperature=1.0, seed=9, logit_bias=NO_EOS)
    all5 = engine.submit(PROMPT, GenerationParams(n=5, max_new_tokens=6, temperature=1.0, seed=9, logprobs=0,
                                                  logit_bias={EOS: -100})).result().outputs
    ranked = sorted(all5, key=lambda o: sum(o.logprobs) / len(o.logprobs), reverse=True)
    assert [c.text for c in out.choices] == [o.text for o in ranked[:2]]
    assert out.usage.completion_tokens == 30  # all five samples were generated


def test_echo_scores_the_prompt_like_transformers(server, checkpoint):
    prompt = "import os\nprint(os.getcwd())\n"
    out = server.client().completions.create(model=server_model(server), prompt=prompt, max_tokens=0, echo=True,
                                             logprobs=2)
    choice = out.choices[0]
    assert choice.text == prompt
    ids = CodeGenTokenizerFast.from_pretrained(checkpoint).encode(prompt)
    with torch.no_grad():
        logp = load_hf(checkpoint)(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([logp[i - 1, ids[i]].item() for i in range(1, len(ids))],
                                                               abs=1e-4)
    assert "".join(choice.logprobs.tokens) == prompt
    echoed = server.client().completions.create(model=server_model(server), prompt=prompt, max_tokens=4, echo=True,
                                                temperature=0)
    assert echoed.choices[0].text.startswith(prompt) and len(echoed.choices[0].text) > len(prompt)


def test_openai_penalties_and_bias_reach_the_engine(server, engine):
    options = dict(presence_penalty=1.2, frequency_penalty=0.7, logit_bias={"198": 5.0, str(EOS): -100})
    out = server.client().completions.create(model=server_model(server), prompt=PROMPT, max_tokens=12,
                                             temperature=0, **options)
    want = engine.submit(PROMPT, GenerationParams(max_new_tokens=12, presence_penalty=1.2, frequency_penalty=0.7,
                                                  logit_bias={198: 5.0, EOS: -100})).result().outputs[0]
    plain = engine.submit(PROMPT, GenerationParams(max_new_tokens=12, logit_bias={EOS: -100})).result().outputs[0]
    assert out.choices[0].text == want.text != plain.text


def test_token_id_prompts_are_not_healed(server, engine):
    ids = engine.tokenizer.encode("def add(a, b):\n    return a ")
    body = {"prompt": ids, "max_tokens": 6, "temperature": 0, "logit_bias": NO_EOS}
    text = httpx.post(server.url + "/v1/engines/codegen/completions", json=body, timeout=60).json()
    want = engine.submit(ids, GenerationParams(max_new_tokens=6, logit_bias={EOS: -100})).result().outputs[0]
    assert text["choices"][0]["text"] == want.text


def test_stop_strings_end_the_text_before_them(server, engine):
    stops = ["\n", "(", " ="]
    out = server.client().completions.create(model=server_model(server), prompt="x", max_tokens=40, temperature=0,
                                             stop=stops)
    want = engine.submit("x", GenerationParams(max_new_tokens=40, stop=stops)).result().outputs[0]
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == want.finish_reason
    assert not any(s in out.choices[0].text for s in stops)


def test_editor_route_heals_the_last_token(server, engine):
    prompt = "def add(a, b):\n    return a "  # the cursor after a space
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": ["\n"], "n": 1, "stream": False,
            "extra": {"language": "python"}}  # copilot clients send extra fields
    response = httpx.post(server.url + "/v1/engines/codegen/completions", json=body, timeout=60)
    assert response.status_code == 200
    text = response.json()["choices"][0]["text"]
    want = engine.submit(prompt, GenerationParams(max_new_tokens=8, stop=["\n"], token_healing=True)).result()
    assert want.healed == " " and text == want.outputs[0].text
    plain = httpx.post(server.url + "/v1/engines/codegen/completions", json={**body, "token_healing": False}).json()
    assert plain["choices"][0]["text"] == engine.submit(prompt, GenerationParams(max_new_tokens=8, stop=["\n"])
                                                        ).result().outputs[0].text
    token = httpx.get(server.url + "/copilot_internal/v2/token").json()
    assert token["token"] and token["expires_at"] > time.time()


def test_tgi_routes_in_the_shapes_llm_ls_parses(server, engine):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "do_sample": False, "return_full_text": False,
                                             "stop": ["\n\n"], "details": True}}
    whole = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    want = engine.submit(PROMPT, GenerationParams(max_new_tokens=10, stop=["\n\n"], token_healing=True)).result()
    assert whole["generated_text"] == want.outputs[0].text
    assert whole["details"]["generated_tokens"] == len(want.outputs[0].token_ids)
    assert whole["details"]["finish_reason"] in ("length", "eos_token", "stop_sequence")
    events = []
    with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert len(events) == len(want.outputs[0].token_ids)
    assert [e["token"]["id"] for e in events] == want.outputs[0].token_ids
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == whole["generated_text"]
    assert events[-1]["details"]["finish_reason"] == whole["details"]["finish_reason"]
    compat = httpx.post(server.url + "/", json={**body, "parameters": {**body["parameters"], "return_full_text": True}})
    assert compat.json()[0]["generated_text"] == PROMPT + whole["generated_text"]
    bad = httpx.post(server.url + "/generate", json={"inputs": "x", "parameters": {"watermark": True}})
    assert bad.status_code == 400 and "watermark" in bad.json()["error"]


def test_client_disconnect_cancels_and_frees_the_slot(server):
    before = server.metric("codegen_request_success_total", '{finished_reason="cancelled"}')
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60, json={
            "prompt": PROMPT, "max_tokens": 2000, "stream": True, "logit_bias": NO_EOS}) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data:") for line in got)
        assert server.metric("codegen_kv_slots_used") == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (server.metric("codegen_kv_slots_used") or server.metric(
            "codegen_request_success_total", '{finished_reason="cancelled"}') == before):
        time.sleep(0.05)
    assert server.metric("codegen_kv_slots_used") == 0
    assert server.metric("codegen_num_requests_running") == 0
    assert server.metric("codegen_request_success_total", '{finished_reason="cancelled"}') == before + 1
    assert server.metric("codegen_generation_tokens_total") < 2000  # it did not run to the end


def test_metrics_count_tokens_and_the_prefix_cache(server):
    prompt = "class Stack:\n    def __init__(self):\n        self.items = []\n" * 4
    queries = server.metric("codegen_prefix_cache_queries_total")
    hits = server.metric("codegen_prefix_cache_hits_total")
    first = server.metric("codegen_time_to_first_token_seconds_count")
    for _ in range(2):
        server.client().completions.create(model=server_model(server), prompt=prompt, max_tokens=2, temperature=0)
    assert server.metric("codegen_prefix_cache_queries_total") > queries
    assert server.metric("codegen_prefix_cache_hits_total") >= hits + 16  # the second call reused the first's blocks
    assert server.metric("codegen_time_to_first_token_seconds_count") == first + 2
    for name in ("codegen_e2e_request_latency_seconds_count", "codegen_inter_token_latency_seconds_count",
                 "codegen_request_queue_time_seconds_count", "codegen_prompt_tokens_total"):
        assert server.metric(name) > 0


BAD_REQUESTS = [
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "x", "best_of": 3, "stream": True}, "best_of"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": "high"}, "frequency_penalty"),
    ({"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"12": 500}}, "logit_bias"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "suffix": "return y"}, "suffix"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], [99999]]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "word " * 2100}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
]


@pytest.mark.parametrize("body, param", BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_naming_the_field(server, body, param):
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and param in error["message"]
    assert response.status_code == (404 if param == "model" else 400)


def test_malformed_bodies_and_unknown_routes(server):
    url = server.url
    assert httpx.post(url + "/v1/completions", content=b"{not json").status_code == 400
    assert httpx.post(url + "/v1/completions", content=b"\xff\xfe").status_code == 400
    assert httpx.post(url + "/v1/completions", json=["a list"]).status_code == 400
    big = httpx.post(url + "/v1/completions", content=b"x" * (9 * 2**20), headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    missing = httpx.get(url + "/v2/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(url + "/v1/completions").status_code == 405
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="no-such-model", prompt="x")
    # and it still serves
    assert server.client().completions.create(model=server_model(server), prompt="x", max_tokens=2).choices


@pytest.fixture(scope="module")
def guarded(checkpoint):
    s = Server(checkpoint, "--max-batch", "1", "--max-queue", "0", "--api-key", "sesame")
    yield s
    s.stop()


def test_api_key_is_required_when_set(guarded):
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").completions.create(model="m", prompt="x", max_tokens=1)
    no_key = httpx.post(guarded.url + "/v1/completions", json={"prompt": "x"})
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    ok = guarded.client("sesame").completions.create(model=server_model_of(guarded), prompt="x", max_tokens=1)
    assert ok.choices[0].text is not None
    assert httpx.get(guarded.url + "/health").status_code == 200


def server_model_of(server) -> str:
    return server.client("sesame").models.list().data[0].id


def test_a_full_queue_answers_429_and_recovers(guarded):
    client = guarded.client("sesame")
    model = server_model_of(guarded)
    with httpx.stream("POST", guarded.url + "/v1/completions", timeout=60, headers={"Authorization": "Bearer sesame"},
                      json={"prompt": PROMPT, "max_tokens": 2000, "stream": True, "logit_bias": NO_EOS}) as response:
        lines = response.iter_lines()  # (kept: dropping the iterator would close the stream)
        assert next(lines).startswith("data:")
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=model, prompt="x", max_tokens=1)
        assert caught.value.status_code == 429 and "busy" in str(caught.value)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            assert client.completions.create(model=model, prompt="x", max_tokens=1).choices
            break
        except openai.RateLimitError:  # the disconnected stream is still being cancelled
            time.sleep(0.05)
    else:
        pytest.fail("the server kept refusing after the queue emptied")


def test_serve_reports_a_busy_port_in_one_line(checkpoint, server):
    port = server.url.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, "-m", "codegen_lm", "serve", "--model", str(checkpoint), "--port", port],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and f"127.0.0.1:{port}" in result.stderr
