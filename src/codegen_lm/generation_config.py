"""`GenerationConfig`: a checkpoint's defaults for `generate`, read from `generation_config.json`.

`transformers` keeps a model's generation defaults in this file (or derives them from config.json);
`model.generate` starts from them and lets its keyword arguments override them. This module knows
which of `transformers`' options codegen-lm implements, which change nothing here (`use_cache`: the
engine always caches), and which it does not implement: a file or a call that turns one of those on
gets an error naming it, never a silently different generation.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

FILE = "generation_config.json"

# Options `generate` implements (None: not set, generate's own default applies).
SUPPORTED = (
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "do_sample", "num_beams", "temperature",
    "top_k", "top_p", "repetition_penalty", "length_penalty", "early_stopping", "no_repeat_ngram_size",
    "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "num_return_sequences", "output_scores",
    "output_logits", "return_dict_in_generate", "pad_token_id", "bos_token_id", "eos_token_id", "stop_strings",
    "prompt_lookup_num_tokens",
)

# Options that cannot change what codegen-lm generates (bookkeeping, caching, multi-GPU sync).
IGNORED = (
    "use_cache", "cache_config", "max_cache_len", "compile_config", "disable_compile", "transformers_version",
    "_from_model_config", "_commit_hash", "synced_gpus", "decoder_start_token_id", "is_assistant",
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "max_matching_ngram_size", "assistant_lookbehind", "target_lookbehind", "prefill_chunk_size",
    "continuous_batching_config", "remove_invalid_values", "trust_remote_code",
)

# transformers options codegen-lm does not implement, with the values that leave them off.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "max_time": (None,), "min_p": (None, 0.0), "top_h": (None,), "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "encoder_repetition_penalty": (None, 1.0),
    "renormalize_logits": (None, False), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,), "sequence_bias": (None,), "token_healing": (None, False),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,), "output_attentions": (None, False),
    "output_hidden_states": (None, False), "num_beam_groups": (None, 1), "diversity_penalty": (None, 0.0),
    "constraints": (None,), "force_words_ids": (None,), "penalty_alpha": (None,), "dola_layers": (None,),
    "low_memory": (None, False), "cache_implementation": (None,), "use_mtp": (None, False),
    "assistant_early_exit": (None,), "assistant_ensemble_weight": (None,), "speculation_type": (None,),
    "encoder_no_repeat_ngram_size": (None, 0),
}


class GenerationConfig:
    """Generation defaults as attributes (None: unset). Unknown keys from a file are kept, not used."""

    def __init__(self, **kwargs: Any) -> None:
        for name in SUPPORTED:
            setattr(self, name, None)
        for name, value in kwargs.items():
            setattr(self, name, value)
        self.source: str | None = None  # the file it was read from, for error messages

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """What transformers derives from config.json when a checkpoint has no generation_config.json."""
        out = cls(**{name: getattr(config, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")})
        out._from_model_config = True
        return out

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, config: Any = None) -> GenerationConfig:
        """Read `folder/generation_config.json`; without one, derive the defaults from `config`."""
        path = Path(folder) / FILE
        if not path.is_file():
            if config is None:
                raise FileNotFoundError(f"{path} does not exist")
            return cls.from_model_config(config)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON file ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
        out = cls(**{k: v for k, v in data.items() if isinstance(k, str) and k != "source"})
        out.source = str(path)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The set options (None-valued ones left out, as transformers writes its files)."""
        return {k: v for k, v in vars(self).items() if v is not None and k != "source"}

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write `folder/generation_config.json` (through a temporary file, so a crash leaves the old one)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".generation_config.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=2, sort_keys=True)
                f.write("\n")
            os.replace(tmp, folder / FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def unsupported(self) -> list[str]:
        """`name=value` for every option set here that codegen-lm does not implement."""
        return [f"{k}={v!r}" for k, v in vars(self).items() if k in UNSUPPORTED and v not in UNSUPPORTED[k]]

    def __repr__(self) -> str:
        return f"GenerationConfig({json.dumps(self.to_dict(), sort_keys=True)})"
