"""`model.generate`: the `transformers`-shaped entry point, on the inference engine.

What `transformers` users pass works the same here: the checkpoint's `generation_config.json` as the
defaults, keyword arguments over them, greedy / sampling / beam search, its logits processors and
stopping criteria by name or as callables, streamers with `put`/`end`, and `return_dict_in_generate`
outputs with `scores`, `logits` and (for beams) `sequences_scores`. Options this project does not
implement are refused by name (generation_config.py), never ignored. Every row is a request on one
engine (`codegen_lm.engine`): each prompt is prefilled once, without its padding, and its samples or
beams share that prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .engine import Engine, EngineError, GenerationParams
from .engine.processors import CallbackError
from .engine.text import Decoder
from .generation_config import IGNORED, SUPPORTED, UNSUPPORTED, GenerationConfig
from .outputs import ModelOutput

DEFAULT_MAX_NEW_TOKENS = 128  # not transformers' max_length of 20: a code completion needs more
SAMPLING_TOP_K = 50  # transformers' top_k when sampling and nobody set one

# generate's own keywords beyond the generation options: not refused as unknown
_OURS = ("input_ids", "attention_mask", "tokenizer", "seed", "stop")


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """`return_dict_in_generate=True` without beams: `scores` and `logits` are one [rows, V] tensor per
    generated position (processed as the sampler saw them, and raw), when asked for."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """`return_dict_in_generate=True` with beams: `sequences_scores` are the returned hypotheses' final
    (length-penalised) scores; `scores`/`logits` one [prompts x beams, V] tensor per step;
    `beam_indices` which beam each returned token came from (-1 past its end)."""

    sequences: torch.Tensor
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None


def resolve_options(base: GenerationConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The generation options of one call: `base` (the model's generation_config or the caller's),
    overridden by the keyword arguments. Raises ValueError naming unknown arguments and options set
    that codegen-lm does not implement (in the call, or in the file `base` came from)."""
    base = base or GenerationConfig()
    bad = [f"{k}={v!r}" for k, v in kwargs.items() if k in UNSUPPORTED and v not in UNSUPPORTED[k]]
    if bad:
        raise ValueError(f"generate(): not supported by codegen-lm: {', '.join(bad)}")
    unknown = sorted(k for k in kwargs if k not in SUPPORTED and k not in IGNORED and k not in UNSUPPORTED
                     and k not in _OURS)
    if unknown:
        raise ValueError(f"generate() got unknown argument(s): {', '.join(unknown)}")
    from_file = [s for s in base.unsupported() if s.split("=")[0] not in kwargs]
    if from_file:
        where = base.source or "the generation_config"
        raise ValueError(f"{where} sets options codegen-lm does not support: {', '.join(from_file)} "
                         "(pass them to generate() with their off values to override)")
    options = {name: getattr(base, name, None) for name in SUPPORTED}
    options.update({k: v for k, v in kwargs.items() if k in SUPPORTED})
    options["_sampling_asked"] = any(kwargs.get(k) is not None for k in ("temperature", "top_k", "top_p"))
    options["_do_sample_given"] = kwargs.get("do_sample", base.do_sample)
    return options


def generate(
    model: torch.nn.Module,
    inputs: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    logits_processor: Iterable[Callable] | None = None,
    stopping_criteria: Iterable[Callable] | None = None,
    streamer: Any = None,
    **kwargs: Any,
) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
    """Continue each prompt row; returns `[B * num_return_sequences, T + new]` token ids, or with
    `return_dict_in_generate` a Generate*Output.

    Rows are the prompts (left-padded, with `attention_mask`), each repeated `num_return_sequences`
    times; finished rows are filled with `pad_token_id` (default: eos). A row finishes at an eos
    token, when its decoded continuation contains one of the `stop` / `stop_strings` (the tokens that
    complete it are kept), when a stopping criterion says so, or after `max_new_tokens` (default 128,
    never past the model's context).

    Sampling happens when `do_sample` is True, or when it is None and temperature, top_k or top_p is
    given (top_k is 50 unless set, as in transformers); temperature 0 is greedy. With `seed`, sample j
    of prompt b draws from its own generator seeded from (seed, b, j), so results repeat exactly
    whatever else is generated alongside. `num_beams` > 1 is beam search. `streamer`: an object with
    `put(tokens)` and `end()` (transformers' TextStreamer, TextIteratorStreamer), given the prompt rows
    and then each step's tokens; or a plain callable, given each step's tokens.
    """
    input_ids, attention_mask = _inputs(inputs, kwargs)
    tokenizer: Decoder | None = kwargs.pop("tokenizer", None)
    seed = kwargs.pop("seed", None)
    extra_stops = kwargs.pop("stop", None)
    options = resolve_options(generation_config or getattr(model, "generation_config", None), kwargs)
    config = model.config
    device = model.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    attention_mask = _check_mask(attention_mask, input_ids, device)
    if config.n_positions <= T:
        raise ValueError(
            f"prompt of {T} tokens does not fit the model's context of {config.n_positions} positions "
            "(it must leave room for at least one new token)"
        )
    max_new_tokens = options["max_new_tokens"]
    if max_new_tokens is None:
        max_new_tokens = options["max_length"] - T if options["max_length"] is not None else DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}"
                         + (f" (max_length {options['max_length']} - {T} prompt tokens)"
                            if options["max_new_tokens"] is None else ""))
    max_new_tokens = min(max_new_tokens, config.n_positions - T)
    min_new_tokens = options["min_new_tokens"]
    if min_new_tokens is None:
        min_new_tokens = max(0, options["min_length"] - T) if options["min_length"] is not None else 0
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")
    n = 1 if options["num_return_sequences"] is None else options["num_return_sequences"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_return_sequences must be an integer >= 1, got {n!r}")
    beams = 1 if options["num_beams"] is None else options["num_beams"]
    if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
        raise ValueError(f"num_beams must be an integer >= 1, got {beams!r}")

    do_sample = options["_do_sample_given"]
    if do_sample is None:
        do_sample = options["_sampling_asked"]
    if beams > 1 and do_sample:
        raise ValueError("generate(): beam sampling (num_beams > 1 with do_sample) is not supported by codegen-lm")
    if beams > 1 and n > beams:
        raise ValueError(f"num_return_sequences ({n}) must be <= num_beams ({beams})")
    if beams > 1 and streamer is not None:
        raise ValueError("generate(): a streamer cannot be used with beam search (num_beams > 1), as in transformers")
    eos_ids = _ids(options["eos_token_id"], "eos_token_id")
    if options["eos_token_id"] is None:
        eos_ids = list(config.eos_token_ids)
    pad = options["pad_token_id"]
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    stops = [*_strings(options["stop_strings"]), *_strings(extra_stops)]
    if stops and tokenizer is None:
        tokenizer = _default_tokenizer(model)
    temperature, top_k, top_p = options["temperature"], options["top_k"], options["top_p"]
    dict_out = bool(options["return_dict_in_generate"])
    settings = dict(
        n=n, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        temperature=(1.0 if temperature is None else float(temperature)) if do_sample else 0.0,
        top_k=(SAMPLING_TOP_K if top_k is None else int(top_k)) if do_sample else 0,
        top_p=1.0 if top_p is None or not do_sample else float(top_p),
        repetition_penalty=1.0 if options["repetition_penalty"] is None else float(options["repetition_penalty"]),
        stop=tuple(stops), eos_token_ids=tuple(eos_ids),
        no_repeat_ngram_size=options["no_repeat_ngram_size"] or 0,
        bad_words_ids=tuple(tuple(w) for w in options["bad_words_ids"] or ()),
        suppress_tokens=tuple(options["suppress_tokens"] or ()),
        begin_suppress_tokens=tuple(options["begin_suppress_tokens"] or ()),
        logits_processor=tuple(logits_processor or ()), stopping_criteria=tuple(stopping_criteria or ()),
        output_scores=dict_out and bool(options["output_scores"]),
        output_logits=dict_out and bool(options["output_logits"]),
    )
    if beams > 1:
        settings.update(num_beams=beams,
                        length_penalty=1.0 if options["length_penalty"] is None else float(options["length_penalty"]),
                        early_stopping=False if options["early_stopping"] is None else options["early_stopping"])
    if options["prompt_lookup_num_tokens"]:
        settings.update(speculative="prompt-lookup", speculative_tokens=int(options["prompt_lookup_num_tokens"]))
    GenerationParams(**settings)  # bad settings fail here, before any work
    rows = B * max(n, beams)
    # one engine per call: nothing is left to reuse afterwards, so no prefix cache
    engine = Engine(model, tokenizer, max_batch=rows, initial_len=T + max_new_tokens, prefix_cache_mb=0)
    handles = []
    for b in range(B):
        prompt = input_ids[b][attention_mask[b].bool()].tolist()
        params = GenerationParams(**settings, seed=None if seed is None else (seed + 7919 * b) % 2**63)
        handles.append(engine.submit(prompt, params))
    if streamer is not None and hasattr(streamer, "put"):
        streamer.put(input_ids.repeat_interleave(n, dim=0).cpu())
    samples = [s for h in handles for s in h._request.samples]  # row r = prompt r // n, sample r % n
    emitted = 0
    while True:
        busy = engine.step()
        if streamer is not None:
            emitted = _stream(samples, emitted, pad, streamer, final=not busy)
        if not busy:
            break
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
    results = [_result(h) for h in handles]
    outputs = [o for r in results for o in r.outputs]  # beams: the n best hypotheses, best first
    width = max(len(o.token_ids) for o in outputs)
    generated = torch.full((B * n, width), pad, dtype=torch.long, device=device)
    for r, o in enumerate(outputs):
        generated[r, : len(o.token_ids)] = torch.tensor(o.token_ids, dtype=torch.long, device=device)
    sequences = torch.cat([input_ids.repeat_interleave(n, dim=0), generated], dim=1)
    if not dict_out:
        return sequences
    if beams > 1:
        return _beam_output(sequences, results, outputs, settings, device)
    return GenerateDecoderOnlyOutput(
        sequences,
        _per_step([o.scores for o in outputs], width, pad, device) if settings["output_scores"] else None,
        _per_step([o.logits for o in outputs], width, pad, device) if settings["output_logits"] else None,
    )


def compute_transition_scores(
    sequences: torch.Tensor,
    scores: Sequence[torch.Tensor],
    beam_indices: torch.Tensor | None = None,
    normalize_logits: bool = False,
) -> torch.Tensor:
    """[rows, steps] score of each generated token, as transformers' method of the same name: the
    step's score of the token the row took (log-softmax of it first with normalize_logits); for beams,
    read from the beam the token came from (beam_indices, -1 past the end: 0 there)."""
    steps = len(scores)
    stacked = torch.stack(list(scores), dim=1).float()  # [beams or rows, steps, V]
    if normalize_logits:
        stacked = stacked.log_softmax(-1)
    tokens = sequences[:, -steps:]
    if beam_indices is None:
        return stacked.gather(2, tokens[:, :, None].to(stacked.device))[:, :, 0]
    index = beam_indices[:, :steps].clamp(min=0)
    picked = stacked[index, torch.arange(steps, device=stacked.device)[None, :]]  # [rows, steps, V]
    out = picked.gather(2, tokens[:, :, None].to(stacked.device))[:, :, 0]
    return out.masked_fill(beam_indices[:, :steps] < 0, 0.0)


def _result(handle: Any) -> Any:
    """The handle's output; a caller's processor or stopping criterion that raised re-raises its own
    exception here, as it would inside transformers' generate."""
    try:
        return handle.result()
    except EngineError as exc:
        cause = exc.__cause__
        if isinstance(cause, CallbackError) and cause.__cause__ is not None:
            raise cause.__cause__ from None
        raise


def _inputs(inputs: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """input_ids [B, T] (from `inputs` or `input_ids=`) and the attention mask, if any."""
    input_ids = kwargs.pop("input_ids", None)
    if inputs is not None and input_ids is not None:
        raise ValueError("generate(): pass the prompt as inputs or as input_ids, not both")
    input_ids = inputs if inputs is not None else input_ids
    if input_ids is None:
        raise ValueError("generate(): no prompt (input_ids) given")
    for name in ("token_type_ids", "position_ids", "past_key_values", "inputs_embeds"):
        if kwargs.get(name) is not None:
            raise ValueError(f"generate(): {name} is not supported by codegen-lm (the engine positions the "
                             "prompt itself; pass attention_mask for padding)")
        kwargs.pop(name, None)
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have shape [batch, tokens] with at least one token, got {tuple(input_ids.shape)}"
        )
    return input_ids, kwargs.pop("attention_mask", None)


def _check_mask(mask: Any, input_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(input_ids)
    mask = torch.as_tensor(mask).to(device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(input_ids.shape)}")
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("a prompt row has no tokens (its attention_mask is all zeros)")
    return mask


def _ids(value: int | Sequence[int] | None, name: str) -> list[int]:
    if value is None:
        return []
    ids = [value] if isinstance(value, int) else list(value)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValueError(f"{name} must be a token id or a list of them, got {value!r}")
    return ids


def _strings(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _per_step(rows: list[list[torch.Tensor] | None], width: int, pad: int,
              device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-token [V] tensors of each row -> one [rows, V] tensor per position. A row that finished
    earlier puts all its mass on the pad token there (0 for pad, -inf for the rest), so that scores
    gathered at the pad tokens it is filled with read 0, as a log-probability of 1."""
    vocab = next(t.shape[-1] for r in rows if r for t in r)
    filler = torch.full((vocab,), float("-inf"), device=device)
    filler[pad] = 0.0
    return tuple(torch.stack([r[i].to(device) if r and i < len(r) else filler for r in rows]) for i in range(width))


def _beam_output(sequences: torch.Tensor, results: list, outputs: list, settings: dict,
                 device: torch.device) -> GenerateBeamDecoderOnlyOutput:
    """The beam-search dict output from the engine's results (one RequestOutput per prompt)."""
    scores = torch.tensor([o.score for o in outputs], dtype=torch.float32, device=device)
    if not (settings["output_scores"] or settings["output_logits"]):
        return GenerateBeamDecoderOnlyOutput(sequences, scores)
    beams = settings["num_beams"]

    def per_step(per_prompt: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """Each prompt's [beams, V] tensors per step -> [prompts x beams, V] per step (-inf for a prompt
        whose search had already ended)."""
        ended = torch.full_like(per_prompt[0][0], float("-inf"))
        steps = max(len(p) for p in per_prompt)
        return tuple(torch.cat([p[i] if i < len(p) else ended for p in per_prompt]).to(device) for i in range(steps))

    step_scores = per_step([r.beam_scores for r in results]) if settings["output_scores"] else None
    step_logits = per_step([r.beam_logits for r in results]) if settings["output_logits"] else None
    width = max(len(o.token_ids) for o in outputs)  # generated positions, as transformers gives them
    indices = torch.full((len(outputs), width), -1, dtype=torch.long, device=device)
    for row, o in enumerate(outputs):
        got = [row // settings["n"] * beams + b for b in o.beam_indices or ()]
        indices[row, : len(got)] = torch.tensor(got, dtype=torch.long, device=device)
    return GenerateBeamDecoderOnlyOutput(sequences, scores, step_scores, step_logits, indices)


def _stream(samples: list, emitted: int, pad: int, streamer: Any, final: bool) -> int:
    """Give `streamer` one [rows] tensor per position that every row has reached (finished rows give
    `pad`)."""
    lengths = [len(s.output.token_ids) for s in samples]
    running = [n for s, n in zip(samples, lengths) if s.output.finish_reason is None]
    ready = max(lengths) if final or not running else min(running)
    put = streamer.put if hasattr(streamer, "put") else streamer
    for pos in range(emitted, ready):
        put(torch.tensor([s.output.token_ids[pos] if pos < n else pad for s, n in zip(samples, lengths)]))
    return max(ready, emitted)


def _default_tokenizer(model: torch.nn.Module) -> Decoder:
    """The tokenizer saved with the model if there is one, else the bundled CodeGen one."""
    from .tokenizer import CodeGenTokenizerFast

    source = getattr(model, "name_or_path", None)
    if source:
        try:
            return CodeGenTokenizerFast.from_pretrained(source)
        except (OSError, ValueError):
            pass
    return CodeGenTokenizerFast.from_pretrained("Salesforce/codegen-350M-mono")
