"""What every route of the server shares: the engine, the tokenizer, the served model's names and the
limits the server was started with."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from ..engine import Engine
from .metrics import Metrics


@dataclass
class ServerContext:
    engine: Engine
    tokenizer: object
    model_name: str  # what /v1/models lists and responses name
    aliases: tuple[str, ...] = ()  # other names a request may use for it (the folder's basename, ...)
    api_key: str | None = None
    max_queue: int = 64  # samples waiting for a slot before new requests get 429
    max_body_bytes: int = 8 * 2**20
    metrics: Metrics = field(default_factory=Metrics)
    inflight: int = 0  # samples of requests being served (for the queue bound)
    started: int = 0  # when the app was made (unix time)

    def __post_init__(self) -> None:
        self.model_names = {self.model_name, *self.aliases}
        config = self.engine.model.config
        self.vocab_size = config.vocab_size
        self.context = self.engine.max_seq_len
        self.eos_token_id = self.tokenizer.eos_token_id
        self.token_text = lru_cache(maxsize=65536)(self._token_text)
        self.engine.healer  # noqa: B018 - built now (reads the whole vocabulary), not in the first request
        self.metrics.watch(self.engine)

    def _token_text(self, token: int) -> str:
        """A token's text as OpenAI's logprobs show it: the text, or "bytes:\\xNN" for a token that is part
        of a character."""
        data = self.engine.healer.token_bytes[token] if token < len(self.engine.healer.token_bytes) else b""
        if not data:
            return self.tokenizer.decode([token])
        try:
            return data.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in data)
