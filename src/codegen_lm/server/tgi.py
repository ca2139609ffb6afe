"""The text-generation-inference request shape that Hugging Face's llm-ls / llm-vscode (and TGI's own
clients) send: POST /generate, /generate_stream, and TGI's compatibility route POST / (which streams
when the body says "stream": true).

As in TGI, sampling is on when do_sample is true or a sampling setting (temperature other than 1,
top_k, top_p below 1) is given; greedy otherwise. Finish reasons are TGI's: "length", "eos_token",
"stop_sequence". Token healing is on unless parameters.token_healing is false.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..engine import GenerationParams, RequestHandle, RequestOutput
from .context import ServerContext
from .errors import APIError
from .fields import Fields

# TGI parameters this server does not implement: refused unless given their no-op value, never ignored
UNSUPPORTED = {"typical_p": 1.0, "watermark": False, "grammar": None, "adapter_id": None, "best_of": 1,
               "decoder_input_details": False, "top_n_tokens": None}


@dataclass
class TGIJob:
    prompt: str
    prompt_ids: list[int]
    params: GenerationParams
    full_text: bool
    details: bool
    stream: bool
    seed: int | None


def parse(body: object, ctx: ServerContext, stream: bool | None) -> TGIJob:
    """stream None: the compatibility route, where the body's "stream" decides."""
    f = Fields(body)
    prompt = f.raw("inputs", None)
    if not isinstance(prompt, str):
        raise APIError(400, "'inputs' is required and must be a string", "inputs")
    if stream is None:
        stream = f.boolean("stream", False)
    p = f.nested("parameters")
    for name, harmless in UNSUPPORTED.items():
        value = p.raw(name, None)
        if value is not None and not (value == harmless and type(value) is type(harmless)):
            raise APIError(400, f"'parameters.{name}' is not supported by this server", p.name(name),
                           "unsupported_parameter")
    temperature = p.number("temperature", None, 0.0, 100.0, low_open=True)
    top_k = p.integer("top_k", None, 1)
    top_p = p.number("top_p", None, 0.0, 1.0, low_open=True)
    do_sample = p.boolean("do_sample", False)
    sample = do_sample or (temperature is not None and temperature != 1.0) or top_k is not None or (
        top_p is not None and top_p < 1.0)
    seed = p.integer("seed", None, 0)
    ids = ctx.tokenizer.encode(prompt) or [ctx.eos_token_id]
    truncate = p.integer("truncate", None, 1)
    if truncate is not None:
        ids = ids[-truncate:]
    if len(ids) >= ctx.context:
        raise APIError(400, f"'inputs' has {len(ids)} tokens, and this model's maximum context length is "
                            f"{ctx.context} tokens, which must leave room for at least one new token", "inputs",
                       "context_length_exceeded")
    params = GenerationParams(
        max_new_tokens=p.integer("max_new_tokens", 20, 1),
        temperature=(temperature or 1.0) if sample else 0.0,
        top_k=top_k or 0,
        top_p=top_p or 1.0,
        repetition_penalty=p.number("repetition_penalty", 1.0, 0.0, None, low_open=True),
        frequency_penalty=p.number("frequency_penalty", 0.0, -2.0, 2.0),
        stop=p.stops("stop", 16),
        seed=seed,
        logprobs=0,
        token_healing=p.boolean("token_healing", True),
    )
    return TGIJob(prompt, ids, params, p.boolean("return_full_text", False), p.boolean("details", False),
                  stream, seed)


def finish_reason(ctx: ServerContext, reason: str | None, tokens: list[int]) -> str:
    if reason == "stop":
        return "eos_token" if tokens and tokens[-1] in ctx.engine.model.config.eos_token_ids else "stop_sequence"
    return reason or "length"


def _token(ctx: ServerContext, token: int, logprob: float | None, skip: str = "") -> dict:
    text = ctx.token_text(token)
    if skip and text.startswith(skip):
        text = text[len(skip):]
    return {"id": token, "text": text, "logprob": logprob, "special": token in ctx.engine.model.config.eos_token_ids}


def response(job: TGIJob, ctx: ServerContext, result: RequestOutput) -> dict:
    o = result.outputs[0]
    out: dict = {"generated_text": (job.prompt if job.full_text else "") + o.text}
    if job.details:
        out["details"] = {
            "finish_reason": finish_reason(ctx, o.finish_reason, o.token_ids),
            "generated_tokens": len(o.token_ids), "seed": job.seed, "prefill": [],
            "tokens": [_token(ctx, t, lp, result.healed if i == 0 else "")
                       for i, (t, lp) in enumerate(zip(o.token_ids, o.logprobs))]}
    return out


async def stream(job: TGIJob, ctx: ServerContext, handle: RequestHandle, observe=None) -> AsyncIterator[dict]:
    """One event per token, TGI's way; the last carries generated_text and details."""
    count, healed = 0, None
    async for event in handle.astream():
        if observe is not None:
            observe(0, event)
        if healed is None:
            healed = handle.output().healed
        for k, (t, lp) in enumerate(zip(event.token_ids, event.logprobs or [None] * len(event.token_ids))):
            last = event.finish_reason is not None and k == len(event.token_ids) - 1
            chunk = {"index": count, "token": _token(ctx, t, lp, healed if count == 0 else ""),
                     "generated_text": None, "details": None}
            count += 1
            if last:
                o = handle.output().outputs[0]
                chunk["generated_text"] = (job.prompt if job.full_text else "") + o.text
                chunk["details"] = {"finish_reason": finish_reason(ctx, o.finish_reason, o.token_ids),
                                    "generated_tokens": len(o.token_ids), "seed": job.seed}
            yield chunk
