"""The inference engine: a model, a slot cache, and continuous batching over a queue of requests.

A request (prompt ids + GenerationParams) waits in the queue until there are free slots for its
samples. Its prompt is prefilled once; every sample gets a copy of the prompt's keys and values (the
prompt's KV is kept aside while samples are still waiting, so a request with more samples than slots
is still prefilled only once). Each step then decodes one token for every running sample, whatever
request it belongs to; a sample that finishes frees its slot at once and the next waiting one takes
it. `generate()`, the command line, the evaluators and the server all run on this.

Thread safety: `submit`, `cancel` and `step` may be called from different threads; a handle's
`stream()` drives the engine itself unless a background loop (`start()`) is running.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..generation.stopping import Decoder, TextStream
from ..model import CodeGenForCausalLM, Linear
from .forward import CompiledForward, forward_rows
from .params import GenerationParams, RequestOutput, SequenceOutput, StreamEvent
from .sampler import choose
from .slot_cache import SlotCache


@dataclass
class _Sample:
    request: _Request
    index: int  # which sample of its request
    generator: torch.Generator | None
    stream: TextStream | None
    output: SequenceOutput
    row: int = -1  # slot while running
    length: int = 0  # tokens whose keys/values are cached
    pending: int = -1  # sampled, not yet fed to the model
    generated: int = 0


@dataclass
class _Request:
    id: int
    prompt_ids: list[int]
    params: GenerationParams
    max_new_tokens: int
    eos: frozenset[int]
    samples: list[_Sample] = field(default_factory=list)
    to_admit: deque[_Sample] = field(default_factory=deque)
    prefix: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None = None  # prompt KV, last logits
    events: deque[StreamEvent] = field(default_factory=deque)
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return all(s.output.finish_reason is not None for s in self.samples)


class RequestHandle:
    """A submitted request: iterate `stream()` for text deltas as they come, or call `result()`."""

    def __init__(self, engine: Engine, request: _Request) -> None:
        self._engine, self._request = engine, request

    @property
    def id(self) -> int:
        return self._request.id

    def stream(self) -> Iterator[StreamEvent]:
        """StreamEvents of all samples, in the order they are produced."""
        request = self._request
        while True:
            with self._engine._lock:
                events = list(request.events)
                request.events.clear()
            yield from events
            if request.done.is_set() and not request.events:
                return
            self._engine._wait_or_step(request)

    def result(self) -> RequestOutput:
        while not self._request.done.is_set():
            self._engine._wait_or_step(self._request)
        return RequestOutput(self._request.id, list(self._request.prompt_ids),
                             [s.output for s in self._request.samples])

    def cancel(self) -> None:
        self._engine.cancel(self._request.id)


PACK_LIMIT = 2 << 30  # bytes of fp32 weights below which an engine keeps oneDNN copies by default


def pack_linears(model: CodeGenForCausalLM, pack: bool | None = None) -> None:
    """Give every fp32 Linear a oneDNN-packed copy of its weight (see model.Linear); None: only when
    the weights take at most PACK_LIMIT bytes, since the copy doubles their memory."""
    if pack is None:
        size = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, Linear))
        pack = size <= PACK_LIMIT
    if pack:
        for module in model.modules():
            if isinstance(module, Linear):
                module.pack()


class Engine:
    def __init__(
        self,
        model: CodeGenForCausalLM,
        tokenizer: Decoder | None = None,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        initial_len: int = 256,
        pack_weights: bool | None = None,
        compile: bool = False,
    ) -> None:
        """max_batch: KV slots (samples decoded together). max_seq_len: longest prompt + completion
        (default: the model's context). pack_weights: keep a oneDNN copy of every fp32 weight on the
        CPU, about twice as fast for batched decoding and prefill but twice the weight memory; None
        packs when the weights take at most PACK_LIMIT bytes. compile: run the decode step through
        torch.compile (the first steps pay for compilation; falls back to eager if it fails)."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        pack_linears(model, pack_weights)
        self.tokenizer = tokenizer
        self._decode_forward = CompiledForward() if compile else forward_rows
        config = model.config
        self.max_seq_len = min(max_seq_len or config.n_positions, config.n_positions)
        self.max_batch = max_batch
        self.device = model.device
        self.cache = SlotCache(config.n_layer, max_batch, config.n_head, config.head_dim, self.max_seq_len,
                               model.dtype, self.device, initial_len=initial_len)
        self.vocab = config.vocab_size
        self.seen = torch.zeros(max_batch, self.vocab, dtype=torch.bool, device=self.device)
        self.rows: list[_Sample] = []  # running samples; rows[i].row == i
        self.waiting: deque[_Request] = deque()
        self.requests: dict[int, _Request] = {}
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- submitting -------------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int], params: GenerationParams | None = None, **kwargs) -> RequestHandle:
        """Queue a prompt (text, or token ids) for generation; kwargs build the GenerationParams."""
        params = params or GenerationParams(**kwargs)
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs an engine with a tokenizer; pass token ids")
            prompt_ids = self.tokenizer.encode(prompt)  # type: ignore[attr-defined]
        else:
            prompt_ids = [int(t) for t in prompt]
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the vocabulary of {self.vocab}")
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.max_seq_len} "
                             "positions (it must leave room for at least one new token)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        eos = params.eos_token_ids if params.eos_token_ids is not None else self.model.config.eos_token_ids
        with self._lock:
            request = _Request(next(self._ids), prompt_ids, params,
                               min(params.max_new_tokens, self.max_seq_len - len(prompt_ids)), frozenset(eos))
            for j in range(params.n):
                generator = None
                if params.seed is not None and params.temperature > 0:
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed((params.seed * 1_000_003 + j) % 2**63)
                stream = TextStream(self.tokenizer, params.stop, params.skip_special_tokens) if self.tokenizer else None
                output = SequenceOutput(j, logprobs=[] if params.logprobs is not None else None,
                                        top_logprobs=[] if params.logprobs else None)
                sample = _Sample(request, j, generator, stream, output)
                request.samples.append(sample)
                request.to_admit.append(sample)
            self.requests[request.id] = request
            self.waiting.append(request)
            self._wake.notify_all()
        return RequestHandle(self, request)

    def cancel(self, request_id: int) -> None:
        """Stop a request: its running samples free their slots at the next step."""
        with self._lock:
            request = self.requests.get(request_id)
            if request is not None:
                request.cancelled = True
                self._wake.notify_all()

    # ---- running ----------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.rows and not self.waiting

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit what fits, then decode one token for every running sample. Returns False when idle."""
        with self._lock:
            self._drop_cancelled()
            self._admit()
            if self.rows:
                self._decode()
            return not self.idle

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.step():
            pass

    def start(self) -> None:
        """Run the engine in a background thread (for servers); handles then just wait."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="codegen-lm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.idle and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    def _wait_or_step(self, request: _Request) -> None:
        if self._thread is not None:
            with self._lock:
                if not request.events and not request.done.is_set():
                    self._wake.wait(timeout=0.1)
        else:
            self.step()

    # ---- internals --------------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        for sample in [s for s in self.rows if s.request.cancelled]:
            self._finish(sample, "cancelled")
        self._release_finished()
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            for sample in request.to_admit:
                self._finish(sample, "cancelled")
            request.to_admit.clear()
            request.prefix = None

    def _admit(self) -> None:
        """Give free slots to waiting samples, first come first served."""
        while self.waiting and len(self.rows) < self.max_batch:
            request = self.waiting[0]
            take = min(len(request.to_admit), self.max_batch - len(self.rows))
            first = len(self.rows)
            prompt_len = len(request.prompt_ids)
            if request.prefix is None:
                ids = torch.tensor([request.prompt_ids], device=self.device)
                logits = forward_rows(self.model, self.cache, ids, [0], first_slot=first)[0]
                if take < len(request.to_admit):  # samples will wait: keep the prompt's KV aside
                    request.prefix = ([k[first, :, :prompt_len].clone() for k in self.cache.keys],
                                      [v[first, :, :prompt_len].clone() for v in self.cache.values], logits)
                self.cache.copy_slot(first, slice(first + 1, first + take), prompt_len)
            else:
                keys, values, logits = request.prefix
                self.cache.ensure(prompt_len)
                for layer in range(len(keys)):
                    self.cache.keys[layer][first : first + take, :, :prompt_len] = keys[layer]
                    self.cache.values[layer][first : first + take, :, :prompt_len] = values[layer]
            prompt_seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            prompt_seen[torch.tensor(request.prompt_ids, device=self.device)] = True
            self.seen[first : first + take] = prompt_seen
            admitted = [request.to_admit.popleft() for _ in range(take)]
            for i, sample in enumerate(admitted):
                sample.row, sample.length = first + i, prompt_len
                self.rows.append(sample)
            if not request.to_admit:
                self.waiting.popleft()
                request.prefix = None
            self._pick(logits.expand(take, -1), admitted)
            self._release_finished()

    def _decode(self) -> None:
        tokens = torch.tensor([[s.pending] for s in self.rows], device=self.device)
        starts = [s.length for s in self.rows]
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(self.rows):
            groups.setdefault(id(s.request), []).append(i)
        shared = [(rows, len(self.rows[rows[0]].request.prompt_ids)) for rows in groups.values() if len(rows) > 1]
        logits = self._decode_forward(self.model, self.cache, tokens, starts, shared=shared)
        for s in self.rows:
            s.length += 1
        self._pick(logits, list(self.rows))
        self._release_finished()

    def _pick(self, logits: torch.Tensor, samples: list[_Sample]) -> None:
        """Sample the next token of each of `samples` (logits row i belongs to samples[i])."""
        groups: dict[int, tuple[list[int], object, int | None]] = {}
        for i, s in enumerate(samples):
            group = groups.setdefault(s.request.id, ([], s.request.params.sampling, s.request.params.logprobs))
            group[0].append(i)
        banned = [sorted(s.request.eos) if s.generated < s.request.params.min_new_tokens else [] for s in samples]
        rows = torch.tensor([s.row for s in samples], device=self.device)
        choices = choose(logits, list(groups.values()), [s.generator for s in samples], self.seen, banned, rows)
        for s, choice in zip(samples, choices):
            token = choice.token
            s.pending = token
            s.generated += 1
            self.seen[s.row, token] = True
            out = s.output
            out.token_ids.append(token)
            if out.logprobs is not None:
                out.logprobs.append(choice.logprob)
                if out.top_logprobs is not None:
                    out.top_logprobs.append(choice.top)
            finish = None
            delta = ""
            if token in s.request.eos:
                finish = "stop"
            elif s.stream is not None:
                delta = s.stream.push(token)
                if s.stream.stopped:
                    finish = "stop"
            if finish is None and s.generated >= s.request.max_new_tokens:
                finish = "length"
            if finish is None:
                s.request.events.append(StreamEvent(s.index, delta, [token]))
            else:
                self._finish(s, finish, delta, [token])

    def _finish(self, sample: _Sample, reason: str, delta: str = "", tokens: list[int] | None = None) -> None:
        """Mark a sample done and emit its last event (the rest of its text, its last token)."""
        if sample.output.finish_reason is not None:
            return
        if sample.stream is not None:
            if reason != "cancelled":
                delta += sample.stream.finish()
            sample.output.text = sample.stream.text
        sample.output.finish_reason = reason
        request = sample.request
        request.events.append(StreamEvent(sample.index, delta, tokens or [], reason))
        if request.finished:
            request.done.set()
            self.requests.pop(request.id, None)
        self._wake.notify_all()

    def _release_finished(self) -> None:
        """Free the slots of finished samples, moving the last running sample into each hole."""
        for i in range(len(self.rows) - 1, -1, -1):
            sample = self.rows[i]
            if sample.output.finish_reason is None:
                continue
            last = self.rows.pop()
            if last is not sample:
                self.cache.copy_slot(last.row, i, last.length)
                self.seen[i] = self.seen[last.row]
                last.row = i
                self.rows[i] = last
            sample.row = -1
