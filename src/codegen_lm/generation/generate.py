"""`model.generate`: a `transformers`-shaped entry point over prefill + a KV-cached decode loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .sampling import SamplingParams, pick_tokens, process_logits, row_generators
from .stopping import Decoder, TextStream

DEFAULT_MAX_NEW_TOKENS = 128


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int = 0,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop: Sequence[str] | None = None,
    seed: int | None = None,
    tokenizer: Decoder | None = None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """Continue each prompt row and return `[B * num_return_sequences, T + new]` token ids.

    Rows are the prompts (left-padded, with `attention_mask`), each repeated `num_return_sequences`
    times; finished rows are filled with `pad_token_id` (default: eos). A row finishes at an eos
    token, when its decoded continuation contains one of the `stop` strings (the tokens that
    complete it are kept; cut the text with `TextStream` or the tokenizer), or after
    `max_new_tokens` (default 128, and never past the model's context).

    Sampling happens when `do_sample` is True, or when it is None and temperature, top_k or top_p is
    given; temperature 0 is greedy. With `seed`, row r draws from its own generator seeded from
    (seed, r), so results repeat exactly. `streamer`, if given, is called with each step's tokens.
    """
    config = model.config
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"input_ids must have shape [batch, tokens] with at least one token, got {tuple(input_ids.shape)}"
        )
    device = model.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        attention_mask = torch.as_tensor(attention_mask).to(device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}"
            )
        if bool((attention_mask.sum(-1) == 0).any()):
            raise ValueError("a prompt row has no tokens (its attention_mask is all zeros)")
    if config.n_positions <= T:
        raise ValueError(
            f"prompt of {T} tokens does not fit the model's context of {config.n_positions} positions "
            "(it must leave room for at least one new token)"
        )
    if max_length is not None and max_new_tokens is None:
        max_new_tokens = max_length - T
    if max_new_tokens is None:
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    max_new_tokens = min(max_new_tokens, config.n_positions - T)
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens}")

    if do_sample is None:
        do_sample = temperature is not None or top_k is not None or top_p is not None
    params = SamplingParams(
        do_sample=do_sample,
        temperature=1.0 if temperature is None else float(temperature),
        top_k=top_k or 0,
        top_p=1.0 if top_p is None else float(top_p),
        repetition_penalty=float(repetition_penalty),
    )
    if eos_token_id is None:
        eos_ids = config.eos_token_ids
    else:
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    stops = list(stop or [])
    if stops and tokenizer is None:
        tokenizer = _default_tokenizer(model)

    n = num_return_sequences
    rows = B * n
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(input_ids, attention_mask=attention_mask, past_key_values=cache, logits_to_keep=1).logits[:, -1]
    if n > 1:  # all samples of a prompt share its prefill
        cache = cache.repeat_interleave(n)
        logits = logits.repeat_interleave(n, dim=0)
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
    generators = row_generators(seed, rows, device) if seed is not None and not params.greedy else None
    streams = [TextStream(tokenizer, stops) for _ in range(rows)] if stops else None
    eos = torch.tensor(eos_ids, device=device, dtype=torch.long)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    generated = torch.empty(rows, max_new_tokens, dtype=torch.long, device=device)
    mask = torch.cat([attention_mask, attention_mask.new_ones(rows, max_new_tokens)], dim=1)

    steps = 0
    for step in range(max_new_tokens):
        if step < min_new_tokens and len(eos):
            logits[:, eos] = float("-inf")
        context = torch.cat([input_ids, generated[:, :step]], dim=1) if params.repetition_penalty != 1.0 else None
        scores = process_logits(logits, params, context, mask[:, : T + step] if context is not None else None)
        tokens = pick_tokens(scores, params, generators)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        generated[:, step] = tokens
        steps = step + 1
        if streamer is not None:
            streamer(tokens)
        if len(eos):
            finished |= torch.isin(tokens, eos)
        if streams is not None:
            for r in range(rows):
                if not finished[r]:
                    streams[r].push(int(tokens[r]))
                    if streams[r].stopped:
                        finished[r] = True
        if bool(finished.all()) or step + 1 == max_new_tokens:
            break
        logits = model(tokens[:, None], attention_mask=mask[:, : T + step + 1], past_key_values=cache).logits[:, -1]
    return torch.cat([input_ids, generated[:, :steps]], dim=1)


def _default_tokenizer(model: torch.nn.Module) -> Decoder:
    """The tokenizer saved with the model if there is one, else the bundled CodeGen one."""
    from ..tokenizer import CodeGenTokenizerFast

    source = getattr(model, "name_or_path", None)
    if source:
        try:
            return CodeGenTokenizerFast.from_pretrained(source)
        except (OSError, ValueError):
            pass
    return CodeGenTokenizerFast.from_pretrained("Salesforce/codegen-350M-mono")
