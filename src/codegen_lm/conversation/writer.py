"""Where a turn's code comes from: an engine (streamed, stopped as soon as the turn's cut is known, the
history's keys and values reused from the engine's prefix cache) or a plain completion function.

Every turn is sampled with its own seed, derived from what the turn is (a session's turn number and
attempt; MTPB's problem, test case, sample, turn and attempt), so its code does not depend on what else
the engine runs at the same time, or in which order conversations reach it.
"""

from __future__ import annotations

import dataclasses
import inspect
import zlib
from collections.abc import Callable
from typing import Protocol

from ..engine import Engine, GenerationParams
from .protocol import CutStream, cut_turn

OnText = Callable[[str], None]


class PromptTooLong(ValueError):
    """A prompt that does not fit the model's context (raised by a writer, or by a completion function)."""


class Writer(Protocol):
    concurrent: bool  # whether several threads may write at once (and gain from it)

    def write(self, prompt: str, params: GenerationParams, on_text: OnText | None = None,
              cut: Callable[[str], str] = cut_turn) -> str:
        """The cut completion of `prompt`; `on_text` gets its certain text as it comes."""


def derive_seed(base: int | None, *keys: object) -> int | None:
    """A turn's seed from the session's (or run's) seed and what identifies the turn; None stays None
    (fresh randomness)."""
    if base is None:
        return None
    text = "\0".join(str(k) for k in (base, *keys))
    return zlib.crc32(text.encode()) * 65_537 % 2**31


class EngineWriter:
    """Turns from an Engine. Thread-safe: many conversations can write at once (with the engine's
    background loop started, `Engine.start`), and the engine batches their tokens together."""

    concurrent = True

    def __init__(self, engine: Engine) -> None:
        if engine.tokenizer is None:
            raise ValueError("conversations need an engine with a tokenizer")
        self.engine = engine

    def write(self, prompt: str, params: GenerationParams, on_text: OnText | None = None,
              cut: Callable[[str], str] = cut_turn) -> str:
        try:
            handle = self.engine.submit(prompt, dataclasses.replace(params, n=1))
        except ValueError as exc:
            if "does not fit the context" in str(exc):
                raise PromptTooLong(str(exc)) from None
            raise
        stream = CutStream(cut)
        ended = False
        try:
            for event in handle.stream():
                piece = stream.push(event.text)
                if piece and on_text is not None:
                    on_text(piece)
                if stream.done:
                    break
            else:
                ended = True
        finally:
            if not ended:  # the turn's code is complete (its tokens stay in the prefix cache), or interrupted
                handle.cancel()
        piece = stream.finish()
        if piece and on_text is not None:
            on_text(piece)
        return stream.result


class FunctionWriter:
    """Turns from a completion function: fn(prompt, max_new_tokens) -> text, or fn(prompt) -> text
    (see `caller`). It may raise PromptTooLong for a prompt its model cannot take."""

    concurrent = False

    def __init__(self, fn: Callable[..., str]) -> None:
        self.call = caller(fn)

    def write(self, prompt: str, params: GenerationParams, on_text: OnText | None = None,
              cut: Callable[[str], str] = cut_turn) -> str:
        stream = CutStream(cut)
        piece = stream.push(self.call(prompt, params.max_new_tokens)) + stream.finish()
        if piece and on_text is not None:
            on_text(piece)
        return stream.result


def writer_for(source: object) -> Writer:
    """A Writer for an Engine, a writer, or a completion function."""
    if isinstance(source, Engine):
        return EngineWriter(source)
    if hasattr(source, "write") and hasattr(source, "concurrent"):
        return source  # type: ignore[return-value]
    if callable(source):
        return FunctionWriter(source)
    raise TypeError(f"expected an Engine, a model, or a completion function, got {type(source).__name__}")


def caller(fn: Callable[..., str]) -> Callable[[str, int], str]:
    """How fn gets its token budget: by keyword to a parameter named max_new_tokens; else positionally
    when it has a second positional parameter (with or without a default) or *args; else not at all."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return lambda prompt, n: fn(prompt, n)
    kinds = {p.kind for p in params}
    if any(p.name == "max_new_tokens" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params):
        return lambda prompt, n: fn(prompt, max_new_tokens=n)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or inspect.Parameter.VAR_POSITIONAL in kinds:
        return lambda prompt, n: fn(prompt, n)
    return lambda prompt, n: fn(prompt)
