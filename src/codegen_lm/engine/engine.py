"""The inference engine: continuous batching of requests over a slot cache, with a prefix cache,
chunked prefill and speculative decoding inside each step.

A step (one pass over the weights, engine/runner.py) advances everything at once: one token for each
running sample (or, for a sample with speculative guesses, the pending token plus its guesses), and a
chunk of the prompt being prefilled. Then the sampler (engine/sampler.py) picks each sample's tokens,
text streams (engine/text.py) turn them into text and catch stop strings, finished samples free their
slots, and waiting samples take them (engine/scheduler.py decides who and how much).

A beam search request (GenerationParams.num_beams = k > 1) takes k slots at once, when k are free; its
k rows decode in the same steps as everything else, and after each step engine/beams.py picks the
continuations, the k slots (and the rows' seen/counts bitmaps) are gathered to the beams they extend,
and the new tokens appended. Its outputs, the n best hypotheses, are published when the search ends.

Prompts are looked up in the prefix cache (engine/prefix_cache.py) first: only positions no cached
block covers are computed. Prompts and finished samples are stored there, so an editor's next
keystroke or a conversation's next turn reuses them. A freed slot also keeps what its last sample
held until the slot is taken again; a prompt that starts with some of those tokens takes that slot's
place outright (no copy), reusing them to the token, and copies in only the cached blocks that reach
further (an editor's next request differs from its last one in the last few tokens, where whole
blocks alone would leave up to 16 to recompute, after copying hundreds of megabytes).

Threads: `submit` and `cancel` only put things in an inbox and never wait for a running step; the
step that follows takes them. Handles consume events from threads (`stream()`, `result()`) or from
asyncio (`astream()`, `aresult()`) without polling. Without a background loop (`start()`), a thread
waiting on a handle runs steps itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..kernels import numba_ok, onednn, openmp
from ..kernels.registry import FAMILIES
from .beams import BeamSearch
from .healing import TokenHealer
from .params import GenerationParams, RequestOutput, SequenceOutput, StreamEvent
from .prefix_cache import DEFAULT_MB, PrefixCache, PrefixCacheStats
from .processors import RequestProcessors, RowExtras
from .requests import Request, Sample
from .runner import CompiledBlocks, Row, run
from .sampler import choose, process
from .scheduler import SOLO_CHUNK, Scheduler
from .slot_cache import SlotCache
from .speculative import DraftModel, SpeculativeStats, prompt_lookup
from .text import Decoder, TextStream, find_stop
from .weights import prepare

SPECULATIVE_TOKENS = 4  # guesses per step unless a request or the engine says otherwise


class EngineError(RuntimeError):
    """The engine failed while running a request (the cause is chained)."""


@dataclass
class EngineStats:
    running: int  # samples holding slots
    waiting: int  # requests not yet fully admitted
    prefix_cache: PrefixCacheStats | None
    speculative: SpeculativeStats
    steps: int
    prefill_tokens: int  # prompt tokens computed (not taken from the prefix cache)
    generated_tokens: int
    running_requests: int = 0  # requests with samples in slots
    slots: int = 0  # of which `running` are in use


class RequestHandle:
    """A submitted request: its events as they come (`stream`/`astream`) or its result."""

    def __init__(self, engine: Engine, request: Request) -> None:
        self._engine, self._request = engine, request

    @property
    def id(self) -> int:
        return self._request.id

    def stream(self) -> Iterator[StreamEvent]:
        """StreamEvents of all samples, in the order they are produced."""
        while True:
            events, done = self._engine._take_events(self._request, block=True)
            yield from events
            if done:
                return

    async def astream(self) -> AsyncIterator[StreamEvent]:
        """The same events for asyncio: the engine runs in its background thread (started if needed)
        and wakes this coroutine when there is something new."""
        engine, request = self._engine, self._request
        engine.start()
        loop = asyncio.get_running_loop()
        while True:
            with engine._cond:
                events, done = engine._drain(request)
                future = None
                if not events and not done:
                    future = loop.create_future()
                    request.waiters.append((loop, future))
            for event in events:
                yield event
            if done:
                return
            if future is not None:
                await future

    def output(self) -> RequestOutput:
        """What the request has so far (a snapshot; complete once the last event has been consumed)."""
        return self._request.output()

    def result(self) -> RequestOutput:
        for _ in self.stream():
            pass
        return self._request.output()

    async def aresult(self) -> RequestOutput:
        async for _ in self.astream():
            pass
        return self._request.output()

    def cancel(self) -> None:
        self._engine.cancel(self._request.id)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Decoder | None = None,
        max_batch: int = 16,
        max_seq_len: int | None = None,
        initial_len: int = 256,
        pack_weights: bool | None = None,
        compile: bool = False,
        prefix_cache_mb: float = DEFAULT_MB,
        prefill_chunk: int | None = None,
        solo_chunk: int = SOLO_CHUNK,
        speculative: str | nn.Module | None = None,
        speculative_tokens: int = SPECULATIVE_TOKENS,
        matmul_dtype: str = "float32",
        kernels: str = "auto",
    ) -> None:
        """max_batch: KV slots (samples decoded together). max_seq_len: longest prompt + completion
        (default: the model's context). pack_weights: keep a oneDNN copy of every fp32 weight on the
        CPU, about twice as fast for batched decoding and prefill but twice the weight memory; None
        packs when the weights take at most 2 GiB. compile: run the model's blocks through
        torch.compile instead of the CPU kernels (falls back to eager if compiling fails).
        prefix_cache_mb: memory for keys and values kept for reuse (0: no prefix cache).
        prefill_chunk: prompt tokens prefilled per step while other samples decode (None: sized by
        measurement, see scheduler.py); solo_chunk: when none does. speculative: "prompt-lookup", or a
        draft model sharing the vocabulary, for requests that do not choose (GenerationParams.speculative),
        with speculative_tokens guesses per step; None: no speculation unless a request asks for it.
        matmul_dtype: "bfloat16" runs the products of prefill and batched decoding in bf16 on the CPU
        (everything else stays fp32; see runner.run), "auto" where the CPU multiplies bf16 in hardware
        (AVX512-BF16, AMX), "int8" runs every product (the lm_head's too) as int8 x int8 (int8 weights,
        made from fp32 ones at start, and activations quantized per row on the fly: kernels/w8a8.py;
        CPU only, batch-1 decoding included), "float32" (the default) keeps every product fp32,
        token-identical to transformers. kernels: which kernel paths run the products, "auto" (the
        fastest on this machine, measured once and cached: kernels/registry.py) or a family to force
        ("numba", "onednn", "torch")."""
        if matmul_dtype not in ("float32", "bfloat16", "int8", "auto"):
            raise ValueError(f"matmul_dtype must be float32, bfloat16, int8 or auto, got {matmul_dtype!r}")
        if kernels not in FAMILIES:
            raise ValueError(f"kernels must be one of {', '.join(FAMILIES)}, got {kernels!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if not prefix_cache_mb >= 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {prefix_cache_mb!r}")
        if not 1 <= speculative_tokens <= 16:
            raise ValueError(f"speculative_tokens must be in [1, 16], got {speculative_tokens!r}")
        for name, module in model.named_modules():  # runner.py reads projection weights directly
            if hasattr(module, "lora_A"):
                raise ValueError(f"{name} has an unmerged LoRA adapter, which the engine would skip: merge it "
                                 "into the weights first (codegen_lm.lora.merge_lora)")
        self.model = model.eval()
        if matmul_dtype == "int8" and model.transformer.wte.weight.device.type != "cpu":
            raise ValueError("matmul_dtype int8 runs on the CPU only (use --quantize int8 on a GPU)")
        if matmul_dtype == "int8" and (compile or not numba_ok()):
            raise ValueError("matmul_dtype int8 runs in the engine's CPU kernels, which "
                             + ("compile=True replaces" if compile else "need numba (not installed or switched off)"))
        if matmul_dtype == "auto":
            matmul_dtype = "bfloat16" if onednn.bf16_native() else "float32"
        prepare(model, pack_weights, kernels, w8a8=matmul_dtype == "int8", bf16=matmul_dtype == "bfloat16")
        self.matmul_dtype = getattr(torch, matmul_dtype)
        self.kernels = kernels
        self.tokenizer = tokenizer
        config = model.config
        self.max_seq_len = min(max_seq_len or config.n_positions, config.n_positions)
        self.draft: DraftModel | None = None
        self.speculative, self.speculative_tokens = "off", speculative_tokens
        if isinstance(speculative, str):
            if speculative not in ("off", "prompt-lookup"):
                raise ValueError(f"speculative must be 'prompt-lookup', 'off' or a draft model, got {speculative!r}")
            self.speculative = speculative
        elif speculative is not None:
            if speculative.config.vocab_size != config.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({speculative.config.vocab_size}) differs from the "
                                 f"target's ({config.vocab_size})")
            self.max_seq_len = min(self.max_seq_len, speculative.config.n_positions)
            self.draft = DraftModel(speculative, max_batch, self.max_seq_len, pack_weights, kernels)
            self.speculative = "draft"
        self.max_batch = max_batch
        self.device = model.transformer.wte.weight.device
        self.staging = (max_batch, max_batch + 1)  # the slots where prompts are prefilled (scheduler.py)
        self.cache = SlotCache(config.n_layer, max_batch + 2, config.n_head, config.head_dim, self.max_seq_len,
                               model.transformer.wte.weight.dtype, self.device, initial_len=initial_len,
                               remap=self.device.type == "cpu")
        self._resident: dict[int, list[int]] = {}  # free slot -> the tokens whose keys and values it holds
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache_mb > 0:
            shape = (2, config.n_layer, config.n_head, 16, config.head_dim)
            self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20), shape, self.cache.dtype, self.device)
        self.scheduler = Scheduler(max_batch, prefill_chunk, solo_chunk)
        self._blocks = CompiledBlocks() if compile else None
        self.vocab = config.vocab_size
        self.seen = torch.zeros(max_batch, self.vocab, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(max_batch, self.vocab, dtype=torch.float32, device=self.device)  # generated, per slot
        self._healer: TokenHealer | None = None
        self.rows: list[Sample] = []  # running samples; rows[i].row == i
        self.requests: dict[int, Request] = {}
        self.spec_stats = SpeculativeStats()
        self._steps = self._prefill_tokens = self._generated = 0
        self._ids = itertools.count()
        self._cond = threading.Condition()  # inbox, events, wake-ups; held only briefly
        self._inbox: list[Request] = []
        self._cancels: list[int] = []
        self._step_lock = threading.Lock()  # one step at a time
        self._flush: dict[int, tuple[Request, list[StreamEvent]]] = {}  # this step's events, by request
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- submitting -------------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int], params: GenerationParams | None = None, **kwargs) -> RequestHandle:
        """Queue a prompt (text, or token ids) for generation; kwargs build the GenerationParams.
        Returns at once: the request starts at the next step."""
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
        if (params.stop or params.token_healing) and self.tokenizer is None:
            raise ValueError("stop strings and token healing need an engine with a tokenizer")
        bad = next((t for t in params.logit_bias or () if t >= self.vocab), None)
        if bad is not None:
            raise ValueError(f"logit_bias token id {bad} is outside the vocabulary of {self.vocab}")
        for name in ("bad_words_ids", "suppress_tokens", "begin_suppress_tokens"):
            value = getattr(params, name)
            bad = next((t for t in (sum(value, ()) if name == "bad_words_ids" else value) if t >= self.vocab), None)
            if bad is not None:
                raise ValueError(f"{name} token id {bad} is outside the vocabulary of {self.vocab}")
        if params.num_beams > self.max_batch:
            raise ValueError(f"num_beams={params.num_beams} needs that many KV slots; the engine has "
                             f"max_batch={self.max_batch}")
        healed, allowed = "", None
        if params.token_healing:
            heal = self.healer.heal(prompt_ids)
            if heal is not None:
                prompt_ids, healed, allowed = heal.prompt_ids, heal.removed.decode(), heal.allowed
        mode = "off" if params.beam_search else params.speculative or self.speculative
        if mode == "draft" and self.draft is None:
            raise ValueError("speculative='draft' needs an engine with a draft model (Engine(speculative=model))")
        eos = params.eos_token_ids if params.eos_token_ids is not None else self.model.config.eos_token_ids
        request = Request(next(self._ids), prompt_ids, params,
                          min(params.max_new_tokens, self.max_seq_len - len(prompt_ids)), frozenset(eos),
                          sorted(eos), mode, params.speculative_tokens or self.speculative_tokens, time.perf_counter(),
                          healed, allowed)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs, request.prompt_top_logprobs = [], []
        if params.uses_processors:
            request.processors = RequestProcessors(params, request.eos, self.device)
        if params.beam_search:
            request.beam = BeamSearch(params.num_beams, len(request.eos), request.max_new_tokens,
                                      float(params.length_penalty), params.early_stopping, params.n, params.logprobs)
            request.beam_scores = [] if params.output_scores else None
            request.beam_logits = [] if params.output_logits else None
            for j in range(params.num_beams):  # the running beams; their text is decoded when the search ends
                sample = Sample(request, j, None, None, SequenceOutput(j))
                request.samples.append(sample)
                request.to_admit.append(sample)
        for j in range(params.n if not params.beam_search else 0):
            generator = None
            if params.seed is not None and not params.greedy:
                generator = torch.Generator(device=self.device)
                generator.manual_seed((params.seed * 1_000_003 + j) % 2**63)
            stream = TextStream(self.tokenizer, params.stop, params.skip_special_tokens, healed) if self.tokenizer \
                else None
            output = SequenceOutput(j, logprobs=[] if params.logprobs is not None else None,
                                    top_logprobs=[] if params.logprobs else None,
                                    scores=[] if params.output_scores else None,
                                    logits=[] if params.output_logits else None)
            sample = Sample(request, j, generator, stream, output)
            request.samples.append(sample)
            request.to_admit.append(sample)
        with self._cond:
            self.requests[request.id] = request
            self._inbox.append(request)
            self._cond.notify_all()
        return RequestHandle(self, request)

    @property
    def healer(self) -> TokenHealer:
        """Every token's bytes, and token healing (built at first use: it reads the whole vocabulary)."""
        if self._healer is None:
            self._healer = TokenHealer(self.tokenizer, self.vocab, self.device)
        return self._healer

    def cancel(self, request_id: int) -> None:
        """Stop a request: its samples free their slots at the next step."""
        with self._cond:
            request = self.requests.get(request_id)
            if request is not None:
                request.cancelled = True
                self._cancels.append(request_id)
                self._cond.notify_all()

    # ---- running ----------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self.rows and not len(self.scheduler) and not self._inbox

    def stats(self) -> EngineStats:
        """Counters for metrics (read from any thread; a snapshot, not a transaction)."""
        return EngineStats(len(self.rows), len(self.scheduler) + len(self._inbox),
                           self.prefix_cache.stats() if self.prefix_cache else None,
                           SpeculativeStats(**vars(self.spec_stats)), self._steps, self._prefill_tokens,
                           self._generated, len({s.request.id for s in list(self.rows)}), self.max_batch)

    @torch.inference_mode()
    def step(self) -> bool:
        """One step: take new requests and cancellations, admit what fits, run one pass (decode,
        speculative checks, a prefill chunk), sample. Returns False when there is nothing left to do."""
        with self._step_lock:
            try:
                self._step()
            except BaseException as exc:
                self._fail(exc)
                raise
            finally:
                self._publish()
            return not self.idle

    def run(self) -> None:
        """Step until every submitted request has finished."""
        while self.step():
            pass

    def start(self) -> None:
        """Run the engine in a background thread (servers, asyncio); handles then just wait.

        The calling thread hands back its OpenMP worker pools first (it loaded the model, so it has
        them): with two threads' pools alive, a 2-core CPU decodes 2-2.5x slower (kernels/openmp.py)."""
        with self._cond:
            if self._thread is not None:
                return
            openmp.release_thread_pools()
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="codegen-lm-engine", daemon=True)
            self._thread.start()

    @property
    def started(self) -> bool:
        """Whether the background loop (`start`) is running."""
        return self._thread is not None

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self.idle and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
            with contextlib.suppress(Exception):  # step() failed the requests it was running; serve new ones
                self.step()

    def _fail(self, exc: BaseException) -> None:
        """A step raised: end every request with the error rather than leave its handle waiting."""
        with self._cond:
            for request in list(self.requests.values()):
                request.error, request.done = exc, True
                self._wake(request)
            self.requests.clear()
            self._inbox.clear()
            self._flush.clear()
            self._cond.notify_all()
        self.rows.clear()
        self.scheduler = Scheduler(self.max_batch, self.scheduler.prefill_chunk, self.scheduler.solo_chunk)

    # ---- events -----------------------------------------------------------------------------------

    def _drain(self, request: Request) -> tuple[list[StreamEvent], bool]:
        """(events so far, whether that is all of them); the caller holds self._cond. A request that
        failed raises, whatever events it still had (they would end its stream as if it had not)."""
        events = list(request.events)
        request.events.clear()
        if request.done and request.error is not None:
            raise EngineError(f"the engine failed: {request.error}") from request.error
        return events, request.done

    def _take_events(self, request: Request, block: bool) -> tuple[list[StreamEvent], bool]:
        while True:
            with self._cond:
                events, done = self._drain(request)
                if events or done:
                    return events, done
                if self._thread is not None:
                    self._cond.wait()
                    continue
            self.step()  # no background loop: drive the engine from this thread

    def _emit(self, request: Request, event: StreamEvent) -> None:
        """Queue an event; consumers get this step's events together, at _publish (a failed request's
        consumers only learn that it ended)."""
        events = self._flush.setdefault(request.id, (request, []))[1]
        if request.error is None:
            events.append(event)

    def _publish(self) -> None:
        """Hand this step's events to their consumers and wake them."""
        if not self._flush:
            return
        with self._cond:
            for request, events in self._flush.values():
                request.events.extend(events)
                if request.finished and not request.done:
                    request.done = True
                    request.finished_at = time.perf_counter()
                    self.requests.pop(request.id, None)
                self._wake(request)
            self._flush.clear()
            self._cond.notify_all()

    @staticmethod
    def _wake(request: Request) -> None:
        for loop, future in request.waiters:
            loop.call_soon_threadsafe(_resolve, future)
        request.waiters.clear()

    # ---- the step ---------------------------------------------------------------------------------

    def _step(self) -> None:
        with self._cond:
            inbox, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
        for request in inbox:
            self.scheduler.add(request)
        if cancels:
            self._drop_cancelled()
        self._admit()
        staged = self.scheduler.stage()
        if staged is not None:
            self._start_prefill(staged)
        rows, guesses, shared = self._decode_rows()
        chunk = self.scheduler.chunk(len(self.rows))
        if chunk is not None:
            request = self.scheduler.staged
            start, end = chunk
            last = end == len(request.prompt_ids)
            wanted = "all" if request.prompt_logprobs is not None else "last" if last else "none"
            rows.append(Row(request.staging, start, request.prompt_ids[start:end], wanted))
            if len(request.to_admit) > 1 and len(self.rows) < self.max_batch:
                # the slot its first sample will likely take a copy in (the last takes the staging slot's place)
                self._resident.pop(len(self.rows), None)
                self.cache.touch(len(self.rows), start, end)
        if not rows:
            return
        self._steps += 1
        decoded = len(self.rows)
        started = time.perf_counter()
        logits = run(self.model, self.cache, rows, shared, self._blocks, self.matmul_dtype)
        self.scheduler.observe(decoded, end - start if chunk is not None else 0, time.perf_counter() - started)
        if decoded:
            self._verify(rows[:decoded], logits, guesses)
        if chunk is not None:
            request.prefilled = end
            self._prefill_tokens += end - start
            if request.prompt_logprobs is not None:
                self._prompt_logprobs(request, logits[len(logits) - (end - start):], start, end)
            if last:
                request.logits = logits[-1].clone()
                self._store(request.prompt_ids, request.staging)
                self.scheduler.prefilled()
                self._admit()
        self._release_finished()

    def _prompt_logprobs(self, request: Request, logits: torch.Tensor, start: int, end: int) -> None:
        """Log-probabilities of prompt tokens start+1 .. end (the last row predicts what follows the chunk:
        the next chunk's first token, or nothing for the last chunk)."""
        ids = request.prompt_ids
        if start == 0:
            request.prompt_logprobs.append(None)  # type: ignore[arg-type]
            request.prompt_top_logprobs.append(None)  # type: ignore[arg-type]
        targets = ids[start + 1 : end + 1]
        logp = logits[: len(targets)].float().log_softmax(-1)
        chosen = logp.gather(1, torch.tensor(targets, device=logp.device)[:, None])[:, 0].tolist()
        n = request.params.prompt_logprobs
        top = logp.topk(n, dim=-1) if n else None
        for i, value in enumerate(chosen):
            request.prompt_logprobs.append(value)
            request.prompt_top_logprobs.append(
                dict(zip(top.indices[i].tolist(), top.values[i].tolist())) if top is not None else {})

    def _start_prefill(self, request: Request) -> None:
        """Put the longest cached run of the prompt's blocks into the staging slot (not for a request that
        wants its prompt's log-probabilities: those need every position computed)."""
        request.scheduled_at = time.perf_counter()
        ready = self.scheduler.ready
        request.staging = self.staging[1] if ready is not None and ready.staging == self.staging[0] else self.staging[0]
        if self.prefix_cache is None or request.prompt_logprobs is not None:
            return
        limit = len(request.prompt_ids) - 1  # the last prompt token is computed: its logits are wanted
        blocks = self.prefix_cache.lookup(request.prompt_ids, limit)
        size = self.prefix_cache.block_tokens
        slot, held = self._resident_match(request.prompt_ids, limit)
        first = 0  # the first block to copy in
        if held:  # take the slot's place, and only the blocks that reach beyond what it holds
            del self._resident[slot]
            self.cache.move(slot, request.staging, held)
            first = held // size
            self.prefix_cache.credit(len(blocks) * size, max(held, len(blocks) * size))
        for i in range(first, len(blocks)):
            self.cache.write(request.staging, i * size, blocks[i])
        request.prefilled = request.cached_tokens = max(held, len(blocks) * size)

    def _resident_match(self, tokens: list[int], limit: int) -> tuple[int, int]:
        """The free slot holding the longest start of tokens[:limit], and how many tokens it holds."""
        best, best_len = -1, 0
        want = np.asarray(tokens[:limit], dtype=np.int64)
        for slot, held in self._resident.items():
            n = min(len(held), len(want))
            differ = np.flatnonzero(np.asarray(held[:n], dtype=np.int64) != want[:n])
            same = int(differ[0]) if len(differ) else n
            if same > best_len:
                best, best_len = slot, same
        return best, best_len

    def _store(self, tokens: list[int], slot: int) -> None:
        """Keep the keys and values of `tokens` (cached in `slot`) in the prefix cache."""
        if self.prefix_cache is not None:
            self.prefix_cache.insert(tokens, lambda start, end, out: self.cache.read(slot, start, end, out))

    def _admit(self) -> None:
        """Give free slots to the samples of prefilled prompts (the ready request, then the next)."""
        while True:
            take = self.scheduler.admissions(len(self.rows))
            if not take:
                return
            self._admit_samples(self.scheduler.ready, take)

    def _admit_samples(self, request: Request, take: int) -> None:
        prompt_len = len(request.prompt_ids)
        prompt_seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
        prompt_seen[torch.tensor(request.prompt_ids, device=self.device)] = True
        admitted = [request.to_admit.popleft() for _ in range(take)]
        for i, sample in enumerate(admitted):
            sample.row, sample.length = len(self.rows), prompt_len
            self._resident.pop(sample.row, None)
            if i == len(admitted) - 1 and not request.to_admit:  # the prompt's last sample takes its place
                self.cache.move(request.staging, sample.row, prompt_len)
            else:
                self.cache.copy_slot(request.staging, sample.row, prompt_len)
            self.seen[sample.row] = prompt_seen
            self.counts[sample.row] = 0
            self.rows.append(sample)
        self.scheduler.admitted()
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        if request.beam is not None:  # all its beams at once: the first step of the search
            self._beam_step(request, request.logits.expand(take, -1))
        else:
            choices = self._choose(request.logits.expand(take, -1), admitted)
            stops = self._criteria(admitted, choices)
            for i, (sample, choice) in enumerate(zip(admitted, choices)):
                if not self._failed(sample):
                    self._take(sample, choice, stops is not None and stops[i])
        if not request.to_admit:
            request.logits = None
        self._release_finished()  # samples done at their first token (eos, max_new_tokens=1)

    def _decode_rows(self) -> tuple[list[Row], list[list[int]], list[tuple[list[int], int]]]:
        """A Row per running sample: its pending token, plus guesses where it speculates; and the
        groups of single-token rows that share a prompt."""
        guesses = self._propose()
        rows, groups = [], {}
        for i, (s, g) in enumerate(zip(self.rows, guesses)):
            rows.append(Row(s.row, s.length, [s.pending, *g], "all" if g else "last"))
            if not g:
                groups.setdefault(s.request.id, ([], len(s.request.prompt_ids)))[0].append(i)
        return rows, guesses, [g for g in groups.values() if len(g[0]) > 1]

    def _propose(self) -> list[list[int]]:
        guesses: list[list[int]] = [[] for _ in self.rows]
        drafts = []
        for i, s in enumerate(self.rows):
            request = s.request
            if request.speculative == "off":
                continue
            room = min(request.speculative_tokens, request.max_new_tokens - s.generated - 1,
                       self.max_seq_len - 1 - s.length)
            if room <= 0:
                continue
            if request.speculative == "prompt-lookup":
                guesses[i] = prompt_lookup(s.context(), room)
            else:
                drafts.append((i, room))
        if drafts:
            wants = [(self.rows[i].row, self.rows[i].context(), self.rows[i].draft_cached, k) for i, k in drafts]
            for (i, _), (g, cached) in zip(drafts, self.draft.propose(wants)):
                guesses[i] = g
                self.rows[i].draft_cached = cached
        return guesses

    def _verify(self, rows: list[Row], logits: torch.Tensor, guesses: list[list[int]]) -> None:
        """Sample each running row's next token; where it checked guesses, keep sampling the following
        positions while the sampled token equals the guess (see speculative.py). The rows of a beam
        search take their step together."""
        samples = list(self.rows)
        offsets, at = [], 0
        for row in rows:
            offsets.append(at)
            at += row.logits_count
        active, beams = [], {}
        for i, s in enumerate(samples):
            if s.request.beam is None:
                active.append(i)
            else:
                s.length += 1
                beams.setdefault(s.request.id, (s.request, {}))[1][s.index] = offsets[i]
        for request, where in beams.values():  # where[j]: the logits row of beam j
            self._beam_step(request, logits[torch.tensor([where[j] for j in range(len(where))], device=logits.device)])
        depth = 0
        while active:
            index = [offsets[i] + depth for i in active]
            if index == list(range(index[0], index[0] + len(index))):
                block = logits[index[0] : index[0] + len(index)]
            else:
                block = logits[torch.tensor(index)]
            chosen = [samples[i] for i in active]
            choices = self._choose(block, chosen)
            stops = self._criteria(chosen, choices)
            following = []
            for k, (i, choice) in enumerate(zip(active, choices)):
                s, g = samples[i], guesses[i]
                s.length += 1  # the token fed at this depth is now part of the sequence
                if self._failed(s):
                    continue
                stop = stops is not None and stops[k]
                if depth < len(g) and choice.token == g[depth]:
                    self.spec_stats.accepted += 1
                    if self._take(s, choice, stop):
                        following.append(i)
                else:
                    self._take(s, choice, stop)
            active, depth = following, depth + 1
        for s, g in zip(samples, guesses):
            if g:
                self.spec_stats.proposed += len(g)
                self.spec_stats.passes += 1
                s.draft_cached = min(s.draft_cached, s.length)

    def _choose(self, logits: torch.Tensor, samples: list[Sample]):
        banned = [s.request.banned if s.generated < s.request.params.min_new_tokens else () for s in samples]
        allowed = [s.request.allowed_first if s.generated == 0 else None for s in samples]
        extras = None
        if any(s.request.processors is not None for s in samples):
            extras = [RowExtras(s.request.processors, s.context(), s.generated, s.request.id)
                      if s.request.processors is not None else None for s in samples]
        return choose(logits, [s.request.params for s in samples], [s.generator for s in samples], self.seen,
                      [s.row for s in samples], banned, self.counts, allowed, extras)

    def _criteria(self, samples: list[Sample], choices) -> list[bool] | None:
        """Which of the samples the stopping criteria of their requests end with their chosen tokens (None:
        no request has any). Rows of one request and one length are judged together."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(samples):
            if s.request.processors is not None and s.request.processors.criteria:
                groups.setdefault((s.request.id, s.generated), []).append(i)
        if not groups:
            return None
        stops = [False] * len(samples)
        for rows in groups.values():
            procs = samples[rows[0]].request.processors
            ids = torch.tensor([[*samples[i].context(), choices[i].token] for i in rows], device=self.device)
            for i, hit in zip(rows, procs.stops(ids, torch.stack([choices[i].scores for i in rows]))):
                stops[i] = hit
        return stops

    def _failed(self, s: Sample) -> bool:
        """Whether a callable of s's request has failed (then the request is ended)."""
        procs = s.request.processors
        if procs is None or procs.failure is None:
            return False
        self._abort(s.request)
        return True

    def _abort(self, request: Request) -> None:
        """End a request whose logits processor or stopping criterion failed: its handle raises an
        EngineError from that failure; its running rows free their slots at the end of this step, the
        rest of it goes at the next (as a cancellation)."""
        if request.error is not None:
            return
        request.error = request.processors.failure
        request.cancelled = True
        for sample in request.samples:
            if sample.row >= 0:
                if request.beam is not None:
                    self._end_beams(request, "cancelled")
                else:
                    self._finish(sample, "cancelled")
        with self._cond:
            self._cancels.append(request.id)

    def _take(self, s: Sample, choice, stop: bool = False) -> bool:
        """Append a chosen token to sample s (text, events, stop checks); False once it has finished.
        stop: a stopping criterion ends it here."""
        token = choice.token
        s.pending = token
        s.generated += 1
        self._generated += 1
        self.seen[s.row, token] = True
        if s.request.params.counts_tokens:
            self.counts[s.row, token] += 1
        out = s.output
        out.token_ids.append(token)
        if out.logprobs is not None:
            out.logprobs.append(choice.logprob)
            if out.top_logprobs is not None:
                out.top_logprobs.append(choice.top)
        if out.scores is not None:
            out.scores.append(choice.scores)
        if out.logits is not None:
            out.logits.append(choice.logits)
        finish = None
        delta = ""
        if token in s.request.eos:
            finish = "stop"
        elif s.stream is not None:
            delta = s.stream.push(token)
            if s.stream.stopped:
                finish = "stop"
        if finish is None and stop:
            finish = "stop"
        if finish is None and s.generated >= s.request.max_new_tokens:
            finish = "length"
        logprobs = [choice.logprob] if out.logprobs is not None else None
        top = [choice.top] if out.top_logprobs is not None else None
        if finish is None:
            self._emit(s.request, StreamEvent(s.index, delta, [token], None, logprobs, top))
            return True
        self._finish(s, finish, delta, [token], logprobs, top)
        return False

    def _finish(self, sample: Sample, reason: str, delta: str = "", tokens: list[int] | None = None,
                logprobs: list[float] | None = None, top: list[dict[int, float]] | None = None) -> None:
        """Mark a sample done and emit its last event (the rest of its text, its last token)."""
        if sample.finished:
            return
        if sample.stream is not None:
            if reason != "cancelled":
                delta += sample.stream.finish()
            sample.output.text = sample.stream.text
        sample.output.finish_reason = reason
        self._emit(sample.request, StreamEvent(sample.index, delta, tokens or [], reason, logprobs, top))

    def _drop_cancelled(self) -> None:
        for sample in self.rows:
            if sample.request.cancelled:
                if sample.request.beam is not None:
                    self._end_beams(sample.request, "cancelled")
                else:
                    self._finish(sample, "cancelled")
        queued = [self.scheduler.ready, self.scheduler.staged, *self.scheduler.waiting]
        for request in [r for r in queued if r is not None and r.cancelled]:
            self.scheduler.drop(request)
            if request.beam is not None:
                self._end_beams(request, "cancelled")
            for sample in request.to_admit:
                self._finish(sample, "cancelled")
            request.to_admit.clear()
            request.logits = None
        self._release_finished()

    # ---- beam search ------------------------------------------------------------------------------

    def _beam_step(self, request: Request, logits: torch.Tensor) -> None:
        """One step of a request's beam search (engine/beams.py) from its beams' logits [k, V], in beam
        order: choose the continuations, then move each beam's slot, bitmaps and tokens to the beam it
        extends and append its token; or, when the search is over, publish the hypotheses."""
        beam, params, samples = request.beam, request.params, request.samples
        raw = logits.float()
        logp = raw.log_softmax(dim=-1)
        generated = beam.generated
        k = len(samples)
        where = torch.tensor([s.row for s in samples], device=self.device)
        extras = None
        if request.processors is not None:  # every beam has the same length
            extras = [RowExtras(request.processors, s.context(), generated, request.id) for s in samples]
        banned = [request.banned if generated < params.min_new_tokens else ()] * k
        allowed = [request.allowed_first if generated == 0 else None] * k
        scores = process(logp, params, self.seen, where, banned, allowed, self.counts, extras)
        if request.processors is not None and request.processors.failure is not None:
            self._abort(request)
            return
        if request.beam_scores is not None:
            request.beam_scores.append(scores.clone())
        if request.beam_logits is not None:
            request.beam_logits.append(raw.clone())
        found = beam.candidates(scores)
        ended = self._beam_ends(request, found, scores)
        if request.processors is not None and request.processors.failure is not None:
            self._abort(request)
            return
        self._generated += k
        step = beam.advance(found, ended, logp if params.logprobs is not None else None)
        if step is None:
            self._end_beams(request)
            return
        parents, _ = step
        rows = [s.row for s in samples]
        sources = [samples[p].row for p in parents]
        self.cache.gather_slots(rows, sources, len(request.prompt_ids), samples[0].length)
        rows_t, sources_t = torch.tensor(rows, device=self.device), torch.tensor(sources, device=self.device)
        self.seen[rows_t] = self.seen[sources_t]
        if params.counts_tokens:
            self.counts[rows_t] = self.counts[sources_t]
        for s, running in zip(samples, beam.running):
            token = running.tokens[-1]
            s.output.token_ids = running.tokens  # prompt + these = the context of the beam's slot
            s.pending, s.generated = token, beam.generated
            self.seen[s.row, token] = True
            if params.counts_tokens:
                self.counts[s.row, token] += 1

    def _beam_ends(self, request: Request, found, scores: torch.Tensor) -> list[str | None]:
        """Why each candidate continuation ends the beam it makes (None: it does not): an eos token, a
        stop string in its text, a stopping criterion, the length limit."""
        beam, params = request.beam, request.params
        ended: list[str | None] = ["stop" if t in request.eos else None for t in found.tokens]
        procs = request.processors
        if params.stop or (procs is not None and procs.criteria):
            running = [[*beam.running[p].tokens, t] for p, t in zip(found.parents, found.tokens)]
        if params.stop:
            for j, tokens in enumerate(running):
                if ended[j] is None and find_stop(self._beam_text(request, tokens), params.stop) >= 0:
                    ended[j] = "stop"
        if procs is not None and procs.criteria:
            ids = torch.tensor([request.prompt_ids + t for t in running], device=self.device)
            parents = torch.tensor(found.parents, device=scores.device)
            for j, hit in enumerate(procs.stops(ids, scores.index_select(0, parents))):
                if hit and ended[j] is None:
                    ended[j] = "stop"
        if beam.generated + 1 >= request.max_new_tokens:
            ended = [e or "length" for e in ended]
        return ended

    def _beam_text(self, request: Request, tokens: list[int]) -> str:
        """The text of a beam's tokens, as a sample's stream would have it (before any stop cut)."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(tokens, skip_special_tokens=request.params.skip_special_tokens)
        if request.healed and text.startswith(request.healed):
            text = text[len(request.healed):]
        return text

    def _end_beams(self, request: Request, reason: str | None = None) -> None:
        """Publish a beam search's outputs and mark its beams finished (their slots are freed by
        _release_finished): the n best hypotheses, or with reason "cancelled" the n best running beams
        so far."""
        beam = request.beam
        if all(s.finished for s in request.samples):
            return
        found = beam.hypotheses() if reason is None else [(b, None) for b in beam.running[:request.params.n]]
        stops = request.params.stop
        for j, (hyp, score) in enumerate(found):
            text = self._beam_text(request, hyp.tokens)
            cut = find_stop(text, stops) if stops else -1
            out = SequenceOutput(j, list(hyp.tokens), text[:cut] if cut >= 0 else text, reason or hyp.reason,
                                 hyp.logprobs, hyp.top, score=score, beam_indices=list(hyp.indices))
            beam.outputs[j] = out
            self._emit(request, StreamEvent(j, out.text, out.token_ids, out.finish_reason, out.logprobs,
                                            out.top_logprobs))
        for s in request.samples:
            s.output.finish_reason = reason or "stop"

    def _release_finished(self) -> None:
        """Free the slots of finished samples (their keys and values go to the prefix cache first),
        moving the last running sample into each hole."""
        for i in range(len(self.rows) - 1, -1, -1):
            sample = self.rows[i]
            if not sample.finished:
                continue
            held = sample.context()[: sample.length]
            self._store(held, sample.row)
            last = self.rows.pop()
            self._resident[len(self.rows)] = held  # the slot freed (or the one `last` leaves, below)
            if last is not sample:
                if not self.cache.move(last.row, i, last.length):  # copied: the freed slot keeps last's
                    self._resident[len(self.rows)] = last.context()[: last.length]
                if self.draft is not None:
                    self.draft.move(last.row, i, last.draft_cached)
                self.seen[i] = self.seen[last.row]
                if last.request.params.counts_tokens:
                    self.counts[i] = self.counts[last.row]
                last.row = i
                self.rows[i] = last
            sample.row = -1


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
