"""CodeGenConfig and the table of the 12 released checkpoints (the one source of truth for their shapes)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish")

# transformers-style names that read and write the GPT-2-style fields.
ALIASES = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
}


# The released checkpoints differ only in size; everything else is shared.
_RELEASED_SHAPES = {
    "350M": dict(n_embd=1024, n_layer=20, n_head=16, rotary_dim=32),
    "2B": dict(n_embd=2560, n_layer=32, n_head=32, rotary_dim=64),
    "6B": dict(n_embd=4096, n_layer=33, n_head=16, rotary_dim=64),
    "16B": dict(n_embd=6144, n_layer=34, n_head=24, rotary_dim=64),
}
_RELEASED_COMMON = dict(
    vocab_size=51200,
    n_positions=2048,
    n_ctx=2048,
    n_inner=None,
    activation_function="gelu_new",
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=50256,
    torch_dtype="float16",
)
RELEASED_CHECKPOINTS: dict[str, dict[str, Any]] = {
    f"Salesforce/codegen-{size}-{data}": {**_RELEASED_COMMON, **shape}
    for size, shape in _RELEASED_SHAPES.items()
    for data in ("nl", "multi", "mono")
}


# Every field CodeGenConfig models, with the default `transformers` gives it.
FIELDS: dict[str, Any] = dict(
    vocab_size=50400,
    n_positions=2048,
    n_ctx=2048,
    n_embd=4096,
    n_layer=28,
    n_head=16,
    rotary_dim=64,
    n_inner=None,
    activation_function="gelu_new",
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    layer_norm_epsilon=1e-5,
    initializer_range=0.02,
    use_cache=True,
    bos_token_id=50256,
    eos_token_id=50256,
    pad_token_id=None,
    tie_word_embeddings=False,
    torch_dtype=None,
)


class CodeGenConfig:
    """Hyper-parameters of a CodeGen network, readable from and writable to a `config.json`.

    Accepts both the GPT-2-style names the released files use (`n_embd`, `n_layer`, ...) and the
    `transformers` aliases (`hidden_size`, `num_hidden_layers`, ...). Keys it does not model are
    kept in `extra` and written back, so a round trip through us loses nothing.
    """

    model_type = "codegen"

    def __init__(self, **kwargs: Any) -> None:
        for alias, name in ALIASES.items():
            if alias in kwargs:
                if name in kwargs:
                    raise ValueError(f"CodeGenConfig: both {name!r} and its alias {alias!r} given")
                kwargs[name] = kwargs.pop(alias)
        if "dtype" in kwargs:  # newer transformers write `dtype`, older ones `torch_dtype`
            dtype = kwargs.pop("dtype")
            kwargs["torch_dtype"] = dtype if dtype is not None else kwargs.get("torch_dtype")
        kwargs.pop("model_type", None)
        for name, default in FIELDS.items():
            setattr(self, name, kwargs.pop(name, default))
        if self.torch_dtype is not None:
            self.torch_dtype = str(self.torch_dtype).removeprefix("torch.")
        self.extra: dict[str, Any] = kwargs
        self.validate()

    # transformers-style aliases
    hidden_size = property(lambda self: self.n_embd, lambda self, v: setattr(self, "n_embd", v))
    num_hidden_layers = property(lambda self: self.n_layer, lambda self, v: setattr(self, "n_layer", v))
    num_attention_heads = property(lambda self: self.n_head, lambda self, v: setattr(self, "n_head", v))
    max_position_embeddings = property(
        lambda self: self.n_positions, lambda self, v: setattr(self, "n_positions", v)
    )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def rotary_dims(self) -> int:
        """Dimensions of each head that get rotary embedding (all of them when rotary_dim is None)."""
        return self.rotary_dim if self.rotary_dim is not None else self.head_dim

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def validate(self) -> None:
        """Reject shapes the network cannot be built with, naming the field at fault."""

        def fail(field: str, why: str) -> None:
            raise ValueError(f"invalid CodeGenConfig: {field}={getattr(self, field)!r}: {why}")

        for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(field, "must be a positive integer")
        if self.n_embd % self.n_head:
            fail("n_embd", f"must be divisible by n_head={self.n_head}")
        if self.n_embd % 4:
            fail("n_embd", "must be divisible by 4 (the fused qkv projection is stored as 4 blocks)")
        if self.rotary_dim is not None:
            if not isinstance(self.rotary_dim, int) or isinstance(self.rotary_dim, bool) or self.rotary_dim <= 0:
                fail("rotary_dim", "must be a positive integer or null")
            if self.rotary_dim % 2:
                fail("rotary_dim", "must be even (rotary rotates pairs of dimensions)")
            if self.rotary_dim > self.head_dim:
                fail("rotary_dim", f"must not exceed the head dimension n_embd/n_head={self.head_dim}")
        elif self.head_dim % 2:
            fail("n_embd", f"head dimension {self.head_dim} must be even when rotary_dim is null")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            fail("n_inner", "must be a positive integer or null")
        if self.activation_function not in ACTIVATIONS:
            fail("activation_function", f"unknown activation; expected one of {', '.join(ACTIVATIONS)}")
        for field in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                fail(field, "must be a probability in [0, 1)")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or self.layer_norm_epsilon <= 0:
            fail("layer_norm_epsilon", "must be a positive number")
        for eos in self.eos_token_ids:
            if not isinstance(eos, int) or not 0 <= eos < self.vocab_size:
                fail("eos_token_id", f"must be a token id below vocab_size={self.vocab_size}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            fail("pad_token_id", f"must be a token id below vocab_size={self.vocab_size}")

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The config.json content, in the key names the released files and `transformers` use."""
        out = copy.deepcopy(self.extra)
        out.setdefault("architectures", ["CodeGenForCausalLM"])
        out["model_type"] = self.model_type
        out.update({name: copy.deepcopy(getattr(self, name)) for name in FIELDS if name != "torch_dtype"})
        if self.torch_dtype is not None:
            out["dtype"] = self.torch_dtype
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CodeGenConfig:
        data = dict(data)
        model_type = data.get("model_type", "codegen")
        if model_type != "codegen":
            raise ValueError(f"config has model_type={model_type!r}; expected 'codegen'")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "config.json.tmp"
        tmp.write_text(self.to_json_string(), encoding="utf-8")
        os.replace(tmp, folder / "config.json")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> CodeGenConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> CodeGenConfig:
        """A local folder or config.json, a released name (known offline), or a hub repository."""
        path = Path(name_or_path)
        if path.is_file():
            config = cls.from_json_file(path)
        elif path.is_dir():
            config = cls.from_json_file(path / "config.json")
        elif str(name_or_path) in RELEASED_CHECKPOINTS:
            config = cls(**RELEASED_CHECKPOINTS[str(name_or_path)])
        else:
            from .hub import resolve_files

            folder = resolve_files(str(name_or_path), ["config.json"])
            config = cls.from_json_file(folder / "config.json")
        for key, value in overrides.items():
            setattr(config, ALIASES.get(key, key), value)
        config.validate()
        return config

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CodeGenConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CodeGenConfig {self.to_json_string()}"
