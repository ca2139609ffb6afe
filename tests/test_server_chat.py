"""/v1/chat/completions on a real `codegen-lm serve` process, driven with the official `openai` client:
the messages become the CodeGen paper's multi-turn prompt, the reply is the turn's code cut from the
completion (as the engine in this process and the completions endpoint give it), streamed as it is
decided, and the next turn reuses the conversation's keys and values from the prefix cache."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.conversation import protocol
from codegen_lm.conversation.writer import EngineWriter, derive_seed
from codegen_lm.engine import Engine, GenerationParams
from codegen_lm.server.app import create_app
from codegen_lm.server.chat import conversation_prompt
from codegen_lm.server.context import ServerContext

from .server_process import Server

EOS = 50256
NO_EOS = {str(EOS): -100}
CUTS_SOON = {"628": 4.0}  # "\n\n": on this random model, greedy text soon holds "\n\n\n", where a turn ends

TURN_1 = ("Define x as 1.", "x = 1\n")
HISTORY = [{"role": "user", "content": TURN_1[0]}, {"role": "assistant", "content": TURN_1[1]}]
ASK = "Print x."
MESSAGES = [*HISTORY, {"role": "user", "content": ASK}]


@pytest.fixture(scope="module")
def server(serve_checkpoint):
    s = Server(serve_checkpoint, "--max-batch", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def engine(serve_checkpoint):
    return Engine(CodeGenForCausalLM.from_pretrained(serve_checkpoint),
                  CodeGenTokenizerFast.from_pretrained(serve_checkpoint))


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_messages_become_the_protocols_program():
    messages = [("system", "You write Python.\n\nKeep it short."), ("developer", "Use numpy."),
                ("user", "Define x as 1."), ("assistant", "x = 1\n"), ("user", "Print x"), ("user", "twice.")]
    header = protocol.HEADER + "# You write Python.\n#\n# Keep it short.\n# Use numpy.\n\n"
    assert conversation_prompt(messages) == protocol.prompt([TURN_1], "Print x\ntwice.", header)
    assert conversation_prompt([("user", "Add 1.")]) == protocol.prompt([], "Add 1.")


def test_reply_is_the_engines_turn_for_the_protocol_prompt(client, model, engine):
    """Sampled with a seed: only the same prompt, and choice 0's derived seed, give the same code."""
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24, temperature=0.8, seed=3,
                                         logit_bias=CUTS_SOON)
    prompt = protocol.prompt([TURN_1], ASK)
    params = GenerationParams(max_new_tokens=24, temperature=0.8, seed=derive_seed(3, 0), logit_bias={628: 4.0})
    want = EngineWriter(engine).write(prompt, params)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want
    assert out.object == "chat.completion" and out.model == model and out.id.startswith("chatcmpl-")
    assert out.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_reply_is_the_cut_completion_and_generation_stops_at_the_cut(server, client, model):
    prompt = protocol.prompt([TURN_1], ASK)
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                      logit_bias=CUTS_SOON).choices[0].text
    code = protocol.cut_turn(whole)
    assert code and len(code) < len(whole)  # the turn ended inside these 40 tokens
    stops = server.metric("codegen_request_success_total", '{finished_reason="stop"}')
    cancelled = server.metric("codegen_request_success_total", '{finished_reason="cancelled"}')
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1500, temperature=0,
                                         logit_bias=CUTS_SOON)
    assert out.choices[0].message.content == code and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 40
    deadline = time.monotonic() + 3  # far less than 1,500 tokens take
    while time.monotonic() < deadline and server.metric("codegen_num_requests_running"):
        time.sleep(0.02)
    assert server.metric("codegen_num_requests_running") == 0
    assert server.metric("codegen_request_success_total", '{finished_reason="stop"}') == stops + 1
    assert server.metric("codegen_request_success_total", '{finished_reason="cancelled"}') == cancelled


def _streamed(client, **kwargs) -> list:
    return list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))


def test_streaming_sends_the_role_then_the_code_as_it_is_certain(client, model):
    for max_tokens, bias, reason in ((1500, CUTS_SOON, "stop"), (16, NO_EOS, "length")):
        kwargs = dict(model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, logit_bias=bias)
        whole = client.chat.completions.create(**kwargs)
        chunks = _streamed(client, **kwargs)
        *body, last = chunks
        assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
        assert all(c.usage is None and c.object == "chat.completion.chunk" for c in body)
        assert body[0].choices[0].delta.role == "assistant" and body[0].choices[0].delta.content == ""
        assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in body] == [None] * (len(body) - 1) + [reason]
        assert whole.choices[0].finish_reason == reason
    assert whole.usage.completion_tokens == 16
    assert len(body) >= 5  # the text came in pieces as tokens were decided, not at the end


def test_n_choices_with_a_seed_repeat_and_share_the_prompt(server, client, model):
    ask = "Print x, then x squared, then x cubed, then x to the fourth power, each on its own line, " * 2
    messages = [*HISTORY, {"role": "user", "content": ask}]
    kwargs = dict(model=model, messages=messages, max_tokens=8, temperature=1.0, n=2, seed=123, logit_bias=NO_EOS)
    computed = server.metric("codegen_prefill_computed_tokens_total")
    first = client.chat.completions.create(**kwargs)
    # each choice is its own request; the second takes the first's prompt from the prefix cache
    assert server.metric("codegen_prefill_computed_tokens_total") - computed < 1.5 * first.usage.prompt_tokens
    assert [c.index for c in first.choices] == [0, 1]
    texts = [c.message.content for c in first.choices]
    assert texts[0] != texts[1]
    assert [c.message.content for c in client.chat.completions.create(**kwargs).choices] == texts
    streamed = ["", ""]
    for chunk in _streamed(client, **kwargs)[:-1]:
        streamed[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert streamed == texts
    assert first.usage.completion_tokens == 16


def test_content_parts_are_text(client, model):
    parts = [{"type": "text", "text": "Print"}, {"type": "text", "text": "x."}]
    kwargs = dict(model=model, max_tokens=12, temperature=0, logit_bias=CUTS_SOON)
    with_parts = client.chat.completions.create(messages=[*HISTORY, {"role": "user", "content": parts}], **kwargs)
    plain = client.chat.completions.create(messages=[*HISTORY, {"role": "user", "content": "Print\nx."}], **kwargs)
    assert with_parts.choices[0].message.content == plain.choices[0].message.content


def test_the_next_turn_reuses_the_conversation_from_the_prefix_cache(server, client, model, engine):
    first = [{"role": "user", "content": "Define a function that returns the n-th Fibonacci number, iteratively, "
                                         "and another one that returns the n-th prime number."}]
    reply = client.chat.completions.create(model=model, messages=first, max_tokens=12, temperature=0,
                                           logit_bias=NO_EOS).choices[0].message.content
    prompt_1 = engine.tokenizer.encode(protocol.prompt([], first[0]["content"]))
    hits = server.metric("codegen_prefix_cache_hits_total")
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Print both for 10."}]
    out = client.chat.completions.create(model=model, messages=second, max_tokens=4, temperature=0)
    assert out.usage.prompt_tokens > len(prompt_1) >= 40
    assert server.metric("codegen_prefix_cache_hits_total") - hits >= len(prompt_1) - 16  # all its full blocks


BAD = [
    (dict(messages=HISTORY), "messages"),
    (dict(messages=[]), "messages"),
    (dict(messages=["hi"]), "messages[0]"),
    (dict(messages=[*HISTORY, {"role": "tool", "content": "1"}]), "messages[2].role"),
    (dict(messages=[{"role": "user"}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url",
                                                   "image_url": {"url": "http://x/y.png"}}]}]),
     "messages[0].content[1].type"),
    (dict(messages=[{"role": "assistant", "content": "x = 1"}, {"role": "user", "content": "go"}]),
     "messages[0].role"),
    (dict(messages=[*MESSAGES, {"role": "system", "content": "late"}, {"role": "user", "content": "go"}]),
     "messages[3].role"),
    (dict(messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (dict(messages=MESSAGES, response_format={"type": "json_object"}), "response_format"),
    (dict(messages=MESSAGES, logprobs=True), "logprobs"),
    (dict(messages=MESSAGES, max_tokens=0), "max_tokens"),
    (dict(messages=MESSAGES, max_tokens=5, max_completion_tokens=6), "max_tokens"),
    (dict(messages=MESSAGES, temperature=2.5), "temperature"),
    (dict(messages=MESSAGES, stream_options={"include_usage": True}), "stream_options"),
    (dict(messages=[{"role": "user", "content": "word " * 2100}]), "messages"),
]


@pytest.mark.parametrize("kwargs, param", BAD, ids=[p for _, p in BAD])
def test_bad_requests_name_the_field(client, model, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, **kwargs)
    assert caught.value.param == param and param in caught.value.message


def test_unknown_model_and_unsupported_fields(client, model):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.param == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model, messages=MESSAGES, tools=[{"type": "function",
                                                                               "function": {"name": "f"}}])
    assert caught.value.code == "unsupported_parameter"
    assert client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2).choices  # still serving


def test_a_client_that_goes_away_mid_stream_is_cancelled(server):
    before = server.metric("codegen_request_success_total", '{finished_reason="cancelled"}')
    body = {"messages": MESSAGES, "max_tokens": 1500, "stream": True, "temperature": 0, "logit_bias": NO_EOS}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert sum(line.startswith("data:") for line in (next(lines) for _ in range(6))) >= 3
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (server.metric("codegen_num_requests_running") or server.metric(
            "codegen_request_success_total", '{finished_reason="cancelled"}') == before):
        time.sleep(0.05)
    assert server.metric("codegen_num_requests_running") == 0
    assert server.metric("codegen_request_success_total", '{finished_reason="cancelled"}') == before + 1


def test_the_api_key_guards_the_route(engine):
    ctx = ServerContext(engine, engine.tokenizer, "m", api_key="sesame")

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(ctx)), base_url="http://t") as http:
            return await http.post("/v1/chat/completions", json={"messages": MESSAGES})

    response = asyncio.run(post())
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
