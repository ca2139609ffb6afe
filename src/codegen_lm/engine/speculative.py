"""Speculative decoding for one sequence: guess a few tokens cheaply, check them all in one forward.

Two sources of guesses:
- a draft model sharing the vocabulary (e.g. codegen-350M drafting for codegen-6B/16B), and
- prompt lookup: find the latest earlier occurrence of the last few tokens in the context and propose
  what followed it. Code repeats itself (names, argument lists, whole lines of the prompt), and this
  costs nothing.

The target model scores the pending token and the k guesses in one pass. Greedy decoding keeps the
guesses up to the first one that differs from the target's argmax, so the output is exactly plain
greedy decoding. Sampling uses the standard accept/reject rule (accept guess x with probability
min(1, p(x)/q(x)); on rejection draw from the normalised max(p - q, 0)), which leaves the output
distribution exactly the target's. Prompt lookup is a draft whose q is a point mass on its guess.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..generation.sampling import top_k_filter, top_p_filter
from ..generation.stopping import Decoder, TextStream
from ..model import CodeGenForCausalLM
from .engine import pack_linears
from .forward import forward_rows
from .params import GenerationParams, SequenceOutput
from .sampler import penalise_seen
from .slot_cache import SlotCache


@dataclass
class SpeculativeStats:
    proposed: int = 0
    accepted: int = 0
    target_passes: int = 0
    seconds: float = 0.0
    history: list[int] = field(default_factory=list)  # accepted guesses per pass

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return (self.accepted + self.target_passes) / self.target_passes if self.target_passes else 0.0


def prompt_lookup(context: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the context's last n tokens
    (longest n first)."""
    for n in range(max_ngram, min_ngram - 1, -1):
        if len(context) <= n:
            continue
        tail = list(context[-n:])
        for start in range(len(context) - n - 1, -1, -1):
            if list(context[start : start + n]) == tail:
                follow = list(context[start + n : start + n + k])
                if follow:
                    return follow
    return []


class SpeculativeDecoder:
    """Generate for one prompt at a time with speculative decoding (greedy or sampled)."""

    def __init__(
        self,
        model: CodeGenForCausalLM,
        tokenizer: Decoder | None = None,
        draft: CodeGenForCausalLM | str = "prompt-lookup",
        k: int = 4,
        max_ngram: int = 3,
        pack_weights: bool | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(draft, str) and draft != "prompt-lookup":
            raise ValueError(f"draft must be a model or 'prompt-lookup', got {draft!r}")
        if not isinstance(draft, str) and draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the "
                             f"target's ({model.config.vocab_size})")
        self.model, self.tokenizer, self.draft, self.k, self.max_ngram = model.eval(), tokenizer, draft, k, max_ngram
        self.max_len = model.config.n_positions
        pack_linears(model, pack_weights)  # verification passes are several rows: the packed route
        if not isinstance(draft, str):
            self.max_len = min(self.max_len, draft.config.n_positions)
            pack_linears(draft.eval(), pack_weights)

    def _cache(self, model: CodeGenForCausalLM, length: int) -> SlotCache:
        c = model.config
        return SlotCache(c.n_layer, 1, c.n_head, c.head_dim, self.max_len, model.dtype, model.device,
                         initial_len=min(self.max_len, length))

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], params: GenerationParams | None = None,
                 stats: SpeculativeStats | None = None) -> SequenceOutput:
        params = params or GenerationParams()
        if params.n != 1:
            raise ValueError("speculative decoding generates one sample per call (n=1)")
        stats = stats if stats is not None else SpeculativeStats()
        start_time = time.perf_counter()
        device = self.model.device
        prompt = [int(t) for t in prompt_ids]
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} positions")
        budget = min(params.max_new_tokens, self.max_len - len(prompt))
        eos = set(params.eos_token_ids if params.eos_token_ids is not None else self.model.config.eos_token_ids)
        sampling = params.sampling
        generator = None
        if params.seed is not None and not sampling.greedy:
            generator = torch.Generator(device=device).manual_seed(params.seed * 1_000_003 % 2**63)
        stream = TextStream(self.tokenizer, params.stop, params.skip_special_tokens) if self.tokenizer else None
        if params.stop and stream is None:
            raise ValueError("stop strings need a tokenizer")
        out = SequenceOutput(0)
        vocab = self.model.config.vocab_size
        seen = torch.zeros(1, vocab, dtype=torch.bool, device=device)
        seen[0, torch.tensor(prompt, device=device)] = True

        cache = self._cache(self.model, len(prompt) + budget)
        logits = forward_rows(self.model, cache, torch.tensor([prompt], device=device), [0])
        draft_cache = None
        draft_len = 0
        if not isinstance(self.draft, str):
            draft_cache = self._cache(self.draft, len(prompt) + budget)
            draft_len = len(prompt) - 1  # the draft caches all but the last prompt token, fed with the guesses
            if draft_len:
                forward_rows(self.draft, draft_cache, torch.tensor([prompt[:-1]], device=device), [0])

        def scores_of(raw: torch.Tensor, seen_row: torch.Tensor, generated: int) -> torch.Tensor:
            s = penalise_seen(raw.float()[None], seen_row[None], sampling.repetition_penalty)[0]
            if generated < params.min_new_tokens and eos:
                s[sorted(eos)] = float("-inf")
            if sampling.greedy:
                return s
            return top_p_filter(top_k_filter(s / sampling.temperature, sampling.top_k), sampling.top_p)

        # the first new token comes from the prompt's logits
        first = self._pick(scores_of(logits[0], seen[0], 0), sampling, generator)
        context = [*prompt, first]
        length = len(prompt)  # tokens with cached keys/values in the target
        finish = self._accept(first, out, stream, eos, budget, seen)
        while finish is None:
            # 1. guesses
            room = min(self.k, budget - len(out.token_ids), self.max_len - len(context))
            draft_probs: list[torch.Tensor] = []
            if room <= 0:
                guesses = []
            elif isinstance(self.draft, str):
                guesses = prompt_lookup(context, room, self.max_ngram)
            else:
                guesses, draft_probs, draft_len = self._draft(context, room, draft_cache, draft_len, scores_of, seen,
                                                              len(out.token_ids), sampling, generator)
            # 2. one pass of the target over the pending token and the guesses
            fed = [context[-1], *guesses]
            logits = forward_rows(self.model, cache, torch.tensor([fed], device=device), [length], all_logits=True)[0]
            stats.target_passes += 1
            stats.proposed += len(guesses)
            # 3. keep guesses while they pass, then one token from the target
            accepted = 0
            row_seen = seen[0].clone()
            new_tokens: list[int] = []
            for i, guess in enumerate(guesses):
                s = scores_of(logits[i], row_seen, len(out.token_ids) + i)
                if sampling.greedy:
                    ok = int(s.argmax()) == guess
                else:
                    p = s.softmax(-1)
                    q = draft_probs[i] if draft_probs else None
                    q_x = float(q[guess]) if q is not None else 1.0
                    ok = float(torch.rand((), generator=generator, device=device)) < min(1.0, float(p[guess]) / q_x)
                if not ok:
                    if sampling.greedy:
                        new_tokens.append(int(s.argmax()))
                    else:
                        residual = (p - (q if q is not None else torch.nn.functional.one_hot(
                            torch.tensor(guess, device=device), vocab).float())).clamp(min=0)
                        if float(residual.sum()) <= 0:
                            residual = p
                        new_tokens.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
                    break
                accepted += 1
                new_tokens.append(guess)
                row_seen[guess] = True
            else:
                s = scores_of(logits[len(guesses)], row_seen, len(out.token_ids) + len(guesses))
                new_tokens.append(self._pick(s, sampling, generator))
            stats.accepted += accepted
            stats.history.append(accepted)
            length += 1 + accepted  # the pending token and the accepted guesses are now cached
            for token in new_tokens:
                context.append(token)
                finish = self._accept(token, out, stream, eos, budget, seen)
                if finish is not None:
                    break
        out.finish_reason = finish
        if stream is not None:
            stream.finish()
            out.text = stream.text
        stats.seconds += time.perf_counter() - start_time
        return out

    def _draft(self, context, room, cache, cached, scores_of, seen, generated, sampling, generator):
        """`room` guesses from the draft model (and the distributions they were drawn from)."""
        device = self.model.device
        feed = context[cached:]
        logits = forward_rows(self.draft, cache, torch.tensor([feed], device=device), [cached])[0]
        cached = len(context)
        guesses, probs = [], []
        row_seen = seen[0].clone()
        for i in range(room):
            s = scores_of(logits, row_seen, generated + i)
            if sampling.greedy:
                token = int(s.argmax())
            else:
                p = s.softmax(-1)
                token = int(torch.multinomial(p, 1, generator=generator))
                probs.append(p)
            guesses.append(token)
            row_seen[token] = True
            if i + 1 < room:
                logits = forward_rows(self.draft, cache, torch.tensor([[token]], device=device), [cached])[0]
                cached += 1
        # the draft's cache keeps only what the target accepts: rewound by the caller through `cached`
        return guesses, probs, len(context)

    @staticmethod
    def _pick(scores: torch.Tensor, sampling, generator) -> int:
        if sampling.greedy:
            return int(scores.argmax())
        return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))

    @staticmethod
    def _accept(token: int, out: SequenceOutput, stream: TextStream | None, eos: set[int], budget: int,
                seen: torch.Tensor) -> str | None:
        out.token_ids.append(token)
        seen[0, token] = True
        if token in eos:
            return "stop"
        if stream is not None:
            stream.push(token)
            if stream.stopped:
                return "stop"
        if len(out.token_ids) >= budget:
            return "length"
        return None
