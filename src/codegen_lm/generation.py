"""`model.generate`: the `transformers`-shaped entry point, on the inference engine."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .engine import Engine, GenerationParams
from .engine.text import Decoder

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
    given; temperature 0 is greedy. With `seed`, sample j of prompt b draws from its own generator
    seeded from (seed, b, j), so results repeat exactly whatever else is generated alongside.
    `streamer`, if given, is called with each step's tokens.

    This runs on the inference engine (`codegen_lm.engine`): each prompt is prefilled once, without
    its padding, and its samples share that prefill.
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
    settings = dict(n=n, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                    temperature=(1.0 if temperature is None else float(temperature)) if do_sample else 0.0,
                    top_k=top_k or 0, top_p=1.0 if top_p is None else float(top_p),
                    repetition_penalty=float(repetition_penalty), stop=tuple(stops), eos_token_ids=tuple(eos_ids))
    GenerationParams(**settings)  # bad settings fail here, before any work
    # one engine per call: nothing is left to reuse afterwards, so no prefix cache
    engine = Engine(model, tokenizer, max_batch=B * n, initial_len=T + max_new_tokens, prefix_cache_mb=0)
    handles = []
    for b in range(B):
        prompt = input_ids[b][attention_mask[b].bool()].tolist()
        params = GenerationParams(**settings, seed=None if seed is None else (seed + 7919 * b) % 2**63)
        handles.append(engine.submit(prompt, params))
    samples = [s for h in handles for s in h._request.samples]  # row r = prompt r // n, sample r % n
    emitted = 0
    while True:
        busy = engine.step()
        if streamer is not None:
            emitted = _stream(samples, emitted, pad_token_id, streamer, device, final=not busy)
        if not busy:
            break
    width = max(len(s.output.token_ids) for s in samples)
    generated = torch.full((B * n, width), pad_token_id, dtype=torch.long, device=device)
    for r, s in enumerate(samples):
        generated[r, : len(s.output.token_ids)] = torch.tensor(s.output.token_ids, device=device)
    return torch.cat([input_ids.repeat_interleave(n, dim=0), generated], dim=1)


def _stream(samples: list, emitted: int, pad: int, streamer: Callable[[torch.Tensor], None],
            device: torch.device, final: bool) -> int:
    """Call `streamer` once per position that every row has reached (finished rows give `pad`)."""
    lengths = [len(s.output.token_ids) for s in samples]
    running = [n for s, n in zip(samples, lengths) if s.output.finish_reason is None]
    ready = max(lengths) if final or not running else min(running)
    for pos in range(emitted, ready):
        streamer(torch.tensor([s.output.token_ids[pos] if pos < n else pad for s, n in zip(samples, lengths)],
                              device=device))
    return max(ready, emitted)


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
