"""OpenAI's chat completions API on the CodeGen paper's multi-turn protocol (conversation/protocol.py):
a chat is a program written turn by turn, and the reply is the model's code for the last turn.

The messages become the prompt `protocol.prompt(turns, instruction, header)`:

- user messages are the turns' instructions (each a `# ...` comment line); consecutive user messages
  are one instruction, joined with newlines; the last message must be a user message;
- an assistant message is the code written for the user turn before it (send back what the server
  replied, and the program is exactly a conversation Session's);
- system and developer messages may only lead: their text is put into the program as comment lines
  (every line prefixed with `# `) right after the protocol's header, followed by a blank line, before
  the first turn;
- `content` is a string or a list of {"type": "text"} parts (joined with newlines).

Each choice is its own engine request (seed `derive_seed(seed, i)` when the request has a seed), its
completion cut by the per-turn rule as it streams (`CutStream`); it is cancelled as soon as the cut is
known (its tokens go to the engine's prefix cache), so the next turn of the conversation, whose
prompt begins with this one's, takes the history's keys and values from the cache. The choices share
their prompt's prefill the same way. max_tokens (or max_completion_tokens) defaults to 256, the
protocol's usual turn budget; temperature to 1 and top_p to 1, OpenAI's defaults. usage counts the
prompt once and the tokens generated up to each choice's end. logprobs are refused (the cut need not
fall between tokens), as are tools, functions, non-text response formats and audio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from ..conversation import protocol
from ..conversation.writer import derive_seed
from ..engine import GenerationParams, RequestHandle, StreamEvent
from . import completions
from .context import ServerContext
from .errors import APIError
from .fields import MISSING, Fields

DEFAULT_MAX_TOKENS = 256  # MTPB's per-turn budget
SYSTEM_ROLES = ("system", "developer")
ROLES = (*SYSTEM_ROLES, "user", "assistant")

_NO_TOKEN_LOGPROBS = ("the reply is the completion cut at a text position that need not fall between tokens; "
                      "/v1/completions with the conversation's prompt gives log-probabilities")
# Fields this server cannot honour, why, and the values that ask for nothing (accepted).
UNSUPPORTED: dict[str, tuple[str, tuple]] = {
    "tools": ("CodeGen models write code; they do not call tools", ()),
    "tool_choice": ("CodeGen models do not call tools", ("none",)),
    "functions": ("CodeGen models write code; they do not call functions", ()),
    "function_call": ("CodeGen models do not call functions", ("none",)),
    "response_format": ("the reply is the turn's code, as text", ({"type": "text"},)),
    "audio": ("CodeGen models read and write text only", ()),
    "modalities": ("CodeGen models read and write text only", (["text"],)),
    "prediction": ("predicted outputs are not implemented", ()),
    "web_search_options": ("this server does not search the web", ()),
    "reasoning_effort": ("CodeGen models are not reasoning models", ()),
    "logprobs": (_NO_TOKEN_LOGPROBS, (False,)),
    "top_logprobs": (_NO_TOKEN_LOGPROBS, ()),
}


@dataclass
class ChatJob:
    """One chat completions request, checked, with its prompt built and tokenized."""

    prompt: str
    prompt_ids: list[int]
    params: GenerationParams  # of each choice's engine request, before its seed is derived
    n: int
    stream: bool
    include_usage: bool
    model: str
    id: str = dataclasses.field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def parse(body: object, ctx: ServerContext) -> ChatJob:
    """Check every field of a chat completions body; an APIError names the first one that is wrong."""
    f = Fields(body)
    model = completions.served_model(f, ctx)
    _refuse_unsupported(f)
    stream, include_usage = completions.stream_fields(f)
    n = f.integer("n", 1, 1, 128)
    max_tokens = _max_tokens(f)
    params = GenerationParams(max_new_tokens=max_tokens, speculative=None, **completions.sampling_fields(f, ctx))
    prompt = conversation_prompt(_messages(f))
    ids = ctx.tokenizer.encode(prompt)
    completions.check_fits(ctx, ids, "the conversation's prompt", "messages")
    return ChatJob(prompt, ids, params, n, stream, include_usage, model or ctx.model_name)


def _refuse_unsupported(f: Fields) -> None:
    for key, (why, accepted) in UNSUPPORTED.items():
        value = f.given(key)
        if value is not MISSING and value not in accepted:
            raise APIError(400, f"'{key}' is not supported: {why}", key, "unsupported_parameter")


def _max_tokens(f: Fields) -> int:
    """max_completion_tokens, or the older max_tokens (they must agree when both are sent)."""
    legacy = f.integer("max_tokens", None, 1)
    current = f.integer("max_completion_tokens", None, 1)
    if legacy is not None and current is not None and legacy != current:
        raise f.fail("max_tokens", f"disagrees with 'max_completion_tokens' ({current}); send one of them", legacy)
    return current or legacy or DEFAULT_MAX_TOKENS


# ---- messages -> the program ----------------------------------------------------------------------


def _messages(f: Fields) -> list[tuple[str, str]]:
    """The messages as (role, text), each checked."""
    raw = f.raw("messages", None)
    if raw is None:
        raise APIError(400, "'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(raw, list) or not raw:
        raise f.fail("messages", "must be a non-empty list of messages", raw)
    return [_message(m, f"messages[{i}]") for i, m in enumerate(raw)]


def _message(raw: object, name: str) -> tuple[str, str]:
    m = Fields(raw, name + ".")
    role = _required(m, m.string("role", None), "role")
    if role not in ROLES:
        raise m.fail("role", f"must be one of {', '.join(ROLES)} (this server has no tools)", role)
    for key in ("tool_calls", "function_call", "audio"):
        if m.given(key) is not MISSING:
            raise APIError(400, f"'{m.name(key)}' is not supported: CodeGen models write code as text",
                           m.name(key), "unsupported_parameter")
    return role, _content(m)


def _content(m: Fields) -> str:
    value = _required(m, m.raw("content", None), "content")
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise m.fail("content", "must be a string or a list of text parts", value)
    texts = []
    for j, raw in enumerate(value):
        part = Fields(raw, m.name(f"content[{j}]") + ".")
        kind = part.raw("type", None)
        if kind != "text":
            raise part.fail("type", "must be 'text': CodeGen models read text only", kind)
        texts.append(_required(part, part.string("text", None), "text"))
    return "\n".join(texts)


def _required(f: Fields, value: object, key: str) -> object:
    if value is None:
        raise APIError(400, f"'{f.name(key)}' is required", f.name(key), "missing_required_parameter")
    return value


def conversation_prompt(messages: list[tuple[str, str]]) -> str:
    """The protocol's prompt for the last user turn after the earlier turns (see the module docstring)."""
    lead = 0
    while lead < len(messages) and messages[lead][0] in SYSTEM_ROLES:
        lead += 1
    turns: list[tuple[str, str]] = []
    asked: list[str] = []  # the user messages of the turn not yet answered
    for i in range(lead, len(messages)):
        role, text = messages[i]
        if role in SYSTEM_ROLES:
            raise APIError(400, f"'messages[{i}].role' is {role!r} after the conversation began; {role} messages must "
                                "come first (they become comments at the top of the program)",
                           f"messages[{i}].role", "invalid_value")
        if role == "user":
            asked.append(text)
        elif not asked:
            raise APIError(400, f"'messages[{i}].role' is 'assistant' and no user message comes before it: an "
                                "assistant message is the code written for the user turn before it",
                           f"messages[{i}].role", "invalid_value")
        else:
            turns.append(("\n".join(asked), text))
            asked = []
    if not asked:
        raise APIError(400, "the last of 'messages' must be a user message: the reply is the code for the last user "
                            "turn", "messages", "invalid_value")
    header = protocol.HEADER + system_comment([text for _, text in messages[:lead]])
    return protocol.prompt(turns, "\n".join(asked), header)


def system_comment(texts: list[str]) -> str:
    """System messages as the program's opening comment block (each line `# ...`), then a blank line."""
    text = "\n".join(texts).strip("\n")
    if not text.strip():
        return ""
    return "".join(f"# {line}".rstrip() + "\n" for line in text.split("\n")) + "\n"


# ---- running --------------------------------------------------------------------------------------


class Watcher(Protocol):
    """What the route keeps of each request (app._Tracker): metrics, and which requests it ended itself."""

    def observe(self, prompt: int, event: StreamEvent) -> None: ...

    def end(self, handle: RequestHandle) -> None: ...


def submit(job: ChatJob, ctx: ServerContext) -> list[RequestHandle]:
    """One engine request per choice, so that each can be cancelled at its own cut."""
    handles = []
    try:
        for i in range(job.n):
            params = dataclasses.replace(job.params, seed=derive_seed(job.params.seed, i))
            handles.append(ctx.engine.submit(job.prompt_ids, params))
    except ValueError as exc:
        for h in handles:
            h.cancel()
        raise APIError(400, str(exc), "messages") from None
    return handles


class Replies:
    """The choices' code as the engine decides their tokens: each completion cut by the per-turn rule
    as it comes, its request ended as soon as the cut is known."""

    def __init__(self, handles: list[RequestHandle], watcher: Watcher) -> None:
        self.handles, self.watcher = handles, watcher
        self.cuts = [protocol.CutStream() for _ in handles]
        self.reasons: list[str | None] = [None] * len(handles)
        self.generated = 0  # tokens generated up to each choice's end

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice, its newly certain text, its finish reason once it has ended), as they come."""
        left = len(self.handles)
        async with contextlib.aclosing(completions.merged(self.handles)) as events:
            async for i, event in events:
                if self.reasons[i] is not None:  # decided before its cancellation took hold: not part of it
                    continue
                piece = self._take(i, event)
                if piece or self.reasons[i] is not None:
                    yield i, piece, self.reasons[i]
                if self.reasons[i] is not None:
                    left -= 1
                    if not left:  # the others' last events need not be waited for
                        return

    def _take(self, i: int, event: StreamEvent) -> str:
        """Choice i's new certain text; sets its finish reason when it has ended, ending its request at the cut."""
        self.watcher.observe(i, event)
        self.generated += len(event.token_ids)
        cut = self.cuts[i]
        piece = cut.push(event.text)
        if cut.done:
            self.reasons[i] = "stop"
            if event.finish_reason is None:
                self.watcher.end(self.handles[i])
        elif event.finish_reason is not None:
            piece += cut.finish()
            self.reasons[i] = "length" if event.finish_reason == "length" else "stop"
        return piece


async def complete(job: ChatJob, replies: Replies) -> dict:
    """The whole response of a non-streamed request."""
    async for _ in replies.pieces():
        pass
    choices = [{"index": i, "message": {"role": "assistant", "content": cut.result, "refusal": None},
                "logprobs": None, "finish_reason": reason}
               for i, (cut, reason) in enumerate(zip(replies.cuts, replies.reasons))]
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
            "choices": choices, "usage": completions.usage(len(job.prompt_ids), replies.generated),
            "system_fingerprint": None}


async def stream(job: ChatJob, replies: Replies) -> AsyncIterator[dict]:
    """The chunks of a streamed request: each choice's role, its text as soon as it is certain, its
    finish reason; then the usage chunk if asked for."""
    base = {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model,
            "system_fingerprint": None}
    if job.include_usage:
        base["usage"] = None
    for i in range(job.n):
        yield _chunk(base, i, {"role": "assistant", "content": ""})
    async for i, piece, reason in replies.pieces():
        if piece:
            yield _chunk(base, i, {"content": piece})
        if reason is not None:
            yield _chunk(base, i, {}, reason)
    if job.include_usage:
        yield {**base, "choices": [], "usage": completions.usage(len(job.prompt_ids), replies.generated)}


def _chunk(base: dict, index: int, delta: dict, reason: str | None = None) -> dict:
    return {**base, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}
