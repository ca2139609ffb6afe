"""OpenAI's completions API on the engine: reading a request into engine requests, and turning engine
events into the response (one JSON object, or server-sent events as tokens are decided).

Every prompt is one engine request whose n (or best_of) samples share its prefill. Choice `index` is
prompt index x n + sample index. best_of samples best_of and returns the n with the highest mean token
log-probability. max_tokens 0 with echo scores a prompt without generating (OpenAI's way to get prompt
log-probabilities).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from ..engine import GenerationParams, RequestHandle, RequestOutput, StreamEvent
from .context import ServerContext
from .errors import APIError
from .fields import Fields

MAX_SAMPLES = 512  # prompts x best_of in one request


@dataclass
class CompletionJob:
    """One completions request, checked and tokenized."""

    prompts: list[list[int]]
    prompt_texts: list[str]  # what echo returns
    from_text: list[bool]  # whether each prompt came as text (token ids are taken as given: no healing)
    params: GenerationParams  # of each engine request (n = best_of)
    n: int
    best_of: int
    echo: bool
    logprobs: int | None
    max_tokens: int  # 0: echo only
    stream: bool
    include_usage: bool
    model: str
    id: str = dataclasses.field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def parse(body: object, ctx: ServerContext, engine_route: bool = False) -> CompletionJob:
    """Check every field of a completions body; an APIError names the first one that is wrong.
    engine_route: the editor route (/v1/engines/{engine}/completions), where any model name is taken
    and token healing is on unless the body turns it off."""
    f = Fields(body)
    model = served_model(f, ctx, any_name=engine_route)
    suffix = f.string("suffix", None)
    if suffix:
        raise APIError(400, "'suffix' is not supported: CodeGen models continue a prompt and cannot fill in "
                            "the middle", "suffix", "unsupported_parameter")
    echo = f.boolean("echo", False)
    stream, include_usage = stream_fields(f)
    n = f.integer("n", 1, 1, 128)
    best_of = f.integer("best_of", n, 1, 128)
    if best_of < n:
        raise APIError(400, f"'best_of' must be >= 'n' ({n}), got {best_of}", "best_of", "invalid_value")
    if stream and best_of > n:
        raise APIError(400, "'best_of' greater than 'n' cannot be streamed (the best samples are known only at "
                            "the end)", "best_of", "invalid_value")
    max_tokens = f.integer("max_tokens", 16, 0)
    if max_tokens == 0 and not echo:
        raise APIError(400, "'max_tokens' must be >= 1 (0 is only allowed with 'echo')", "max_tokens",
                       "invalid_value")
    logprobs = f.integer("logprobs", None, 0, 5)
    sampling = sampling_fields(f, ctx)
    healing = f.boolean("token_healing", engine_route) and not echo
    params = GenerationParams(
        n=best_of,
        max_new_tokens=max(max_tokens, 1),
        logprobs=logprobs if logprobs is not None else (0 if best_of > n else None),
        prompt_logprobs=logprobs if echo and logprobs is not None else None,
        token_healing=healing,
        speculative=None,
        **sampling,
    )
    prompts, texts, from_text = _prompts(f, ctx)
    if len(prompts) * best_of > MAX_SAMPLES:
        raise APIError(400, f"{len(prompts)} prompts x {best_of} samples is more than the {MAX_SAMPLES} one request "
                            "may ask for", "n", "invalid_value")
    for i, ids in enumerate(prompts):
        check_fits(ctx, ids, f"prompt {i}", "prompt")
    return CompletionJob(prompts, texts, from_text, params, n, best_of, echo, logprobs, max_tokens, stream,
                         include_usage, model or ctx.model_name)


# ---- fields the chat completions route shares -----------------------------------------------------


def served_model(f: Fields, ctx: ServerContext, any_name: bool = False) -> str | None:
    """The `model` field: one of the served model's names (404 otherwise, as OpenAI answers), or None."""
    model = f.string("model", None)
    if model is not None and not any_name and model not in ctx.model_names:
        raise APIError(404, f"The model '{model}' does not exist; this server has {ctx.model_name!r}", "model",
                       "model_not_found")
    return model


def stream_fields(f: Fields) -> tuple[bool, bool]:
    """(`stream`, `stream_options.include_usage`); stream_options only with stream, as OpenAI checks."""
    stream = f.boolean("stream", False)
    options = f.raw("stream_options", None)
    if options is None:
        return stream, False
    if not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    return stream, Fields(options, "stream_options.").boolean("include_usage", False)


def sampling_fields(f: Fields, ctx: ServerContext) -> dict:
    """The sampling fields, as GenerationParams keywords, with OpenAI's defaults (temperature 1, top_p 1;
    top_p 0 means greedy); `user` is checked and ignored."""
    temperature = f.number("temperature", 1.0, 0.0, 2.0)
    top_p = f.number("top_p", 1.0, 0.0, 1.0)
    bias = logit_bias(f, ctx.vocab_size)
    f.string("user", None)
    return dict(
        temperature=0.0 if top_p == 0.0 else temperature,
        top_p=top_p or 1.0,
        stop=f.stops("stop", 4),
        seed=f.integer("seed", None),
        presence_penalty=f.number("presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=f.number("frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=bias or None,
    )


def check_fits(ctx: ServerContext, ids: Sequence[int], what: str, param: str) -> None:
    """400 for a prompt that leaves no room in the context for a new token."""
    if len(ids) >= ctx.context:
        raise APIError(400, f"{what} has {len(ids)} tokens, and this model's maximum context length is "
                            f"{ctx.context} tokens, which must leave room for at least one new token; shorten "
                            f"the {param}", param, "context_length_exceeded")


def logit_bias(f: Fields, vocab: int) -> dict[int, float]:
    raw = f.raw("logit_bias", {})
    if not isinstance(raw, dict):
        raise f.fail("logit_bias", "must be an object mapping token ids to biases", raw)
    bias = {}
    for key, value in raw.items():
        try:
            token = int(key)
        except ValueError:
            raise f.fail("logit_bias", f"has a key that is not a token id: {key!r}") from None
        if not 0 <= token < vocab:
            raise f.fail("logit_bias", f"has token id {token}, outside the vocabulary of {vocab}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise f.fail("logit_bias", f"maps token {token} to {value!r}; biases must be numbers in [-100, 100]")
        bias[token] = float(value)
    return bias


def _prompts(f: Fields, ctx: ServerContext) -> tuple[list[list[int]], list[str], list[bool]]:
    """The prompt field (a string, strings, token ids or lists of token ids) as token ids, texts and
    whether each was text."""
    prompt = f.raw("prompt", None)
    if prompt is None:
        raise APIError(400, "'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_id(t) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise f.fail("prompt", "must be a string, a list of strings, a list of token ids or a list of lists of "
                               "token ids (not empty)", prompt)
    ids, texts, from_text = [], [], []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            tokens = ctx.tokenizer.encode(p)
            text = p
        elif isinstance(p, list) and p and all(_is_id(t) for t in p):
            bad = next((t for t in p if not 0 <= t < ctx.vocab_size), None)
            if bad is not None:
                raise APIError(400, f"prompt {i} has token id {bad}, outside the vocabulary of {ctx.vocab_size}",
                               "prompt", "invalid_value")
            tokens, text = list(p), ctx.tokenizer.decode(p)
        else:
            raise f.fail("prompt", f"item {i} must be a string or a non-empty list of token ids", p)
        ids.append(tokens or [ctx.eos_token_id])  # an empty prompt starts from <|endoftext|>, as OpenAI's do
        texts.append(text)
        from_text.append(isinstance(p, str))
    return ids, texts, from_text


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- running --------------------------------------------------------------------------------------


def submit(job: CompletionJob, ctx: ServerContext) -> list[RequestHandle]:
    handles = []
    try:
        for ids, text in zip(job.prompts, job.from_text):
            params = job.params
            if params.token_healing and not text:  # token ids: the caller chose them
                params = dataclasses.replace(params, token_healing=False)
            handles.append(ctx.engine.submit(ids, params))
    except ValueError as exc:
        for h in handles:
            h.cancel()
        raise APIError(400, str(exc), "prompt") from None
    return handles


def _logprobs_object(ctx: ServerContext, tokens: Sequence[int], logprobs: Sequence[float | None],
                     tops: Sequence[dict[int, float] | None], offset: int, want: int) -> dict:
    """OpenAI's logprobs: token strings, their log-probabilities, up to `want` alternatives (plus the
    chosen token) and each token's character offset in the choice's text."""
    strings = [ctx.token_text(t) for t in tokens]
    offsets = []
    for s in strings:
        offsets.append(max(offset, 0))
        offset += len(s)
    top_logprobs = []
    for token, value, top in zip(tokens, logprobs, tops):
        if top is None:
            top_logprobs.append(None)
            continue
        entry = {ctx.token_text(t): v for t, v in list(top.items())[:want]}
        entry.setdefault(ctx.token_text(token), value)
        top_logprobs.append(entry)
    return {"tokens": strings, "token_logprobs": list(logprobs), "top_logprobs": top_logprobs, "text_offset": offsets}


def _mean_logprob(o) -> float:
    return sum(o.logprobs) / max(len(o.logprobs), 1)


def complete(job: CompletionJob, ctx: ServerContext, results: list[RequestOutput]) -> dict:
    """The whole response of a non-streamed request, from its requests' results."""
    choices, completion_tokens, prompt_tokens = [], 0, 0
    for i, (result, text) in enumerate(zip(results, job.prompt_texts)):
        prompt_tokens += len(job.prompts[i])
        completion_tokens += sum(len(o.token_ids) for o in result.outputs) if job.max_tokens else 0
        outputs = result.outputs
        if job.best_of > job.n:
            outputs = sorted(outputs, key=_mean_logprob, reverse=True)[: job.n]
        for rank, o in enumerate(outputs):
            choices.append(_choice(job, ctx, i * job.n + rank, result, text, o))
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def _choice(job: CompletionJob, ctx: ServerContext, index: int, result: RequestOutput, prompt_text: str, o) -> dict:
    generated = o.text if job.max_tokens else ""
    text = (prompt_text if job.echo else "") + generated
    logprobs = None
    if job.logprobs is not None:
        parts = []
        if job.echo:
            parts.append(_logprobs_object(ctx, result.prompt_ids, result.prompt_logprobs,
                                          result.prompt_top_logprobs, 0, job.logprobs))
        if job.max_tokens:
            start = len(prompt_text) if job.echo else 0
            parts.append(_logprobs_object(ctx, o.token_ids, o.logprobs, o.top_logprobs or [{}] * len(o.token_ids),
                                          start - len(result.healed), job.logprobs))
        logprobs = {key: [v for part in parts for v in part[key]] for key in
                    ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    reason = "length" if not job.max_tokens else o.finish_reason
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """(prompt index, event) from all the requests, as each comes."""
    if len(handles) == 1:
        async for event in handles[0].astream():
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, handle: RequestHandle) -> None:
        try:
            async for event in handle.astream():
                await queue.put((i, event))
        except BaseException as exc:
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def stream(job: CompletionJob, ctx: ServerContext, handles: list[RequestHandle],
                 observe=None) -> AsyncIterator[dict]:
    """The chunks of a streamed request, one per engine event (each of its tokens as soon as it is
    decided), then the usage chunk if asked for. observe(prompt, event) sees every event (metrics)."""
    token_offset: dict[int, int] = {}  # per choice: where its next token's text starts in the choice's text
    generated = 0
    base = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model}
    if job.include_usage:
        base["usage"] = None
    async for i, event in merged(handles):
        if observe is not None:
            observe(i, event)
        index = i * job.n + event.index
        text, tokens = (event.text, event.token_ids) if job.max_tokens else ("", [])
        generated += len(tokens)
        logprobs = None
        if index not in token_offset:  # the choice's first chunk: the prompt first, if echoed
            out = handles[i].output()  # the prompt has been prefilled: its log-probabilities are known
            token_offset[index] = -len(out.healed)
            if job.echo:
                text = job.prompt_texts[i] + text
                token_offset[index] += len(job.prompt_texts[i])
                if job.logprobs is not None:
                    logprobs = _logprobs_object(ctx, out.prompt_ids, out.prompt_logprobs, out.prompt_top_logprobs,
                                                0, job.logprobs)
        if job.logprobs is not None and tokens:
            part = _logprobs_object(ctx, tokens, event.logprobs or [], event.top_logprobs or [{}] * len(tokens),
                                    token_offset[index], job.logprobs)
            token_offset[index] += sum(len(t) for t in part["tokens"])
            logprobs = part if logprobs is None else {k: logprobs[k] + part[k] for k in part}
        reason = event.finish_reason
        if reason is not None and not job.max_tokens:
            reason = "length"
        if not text and logprobs is None and reason is None:
            continue
        yield {**base, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}
    if job.include_usage:
        yield {**base, "choices": [], "usage": usage(sum(len(p) for p in job.prompts), generated)}
