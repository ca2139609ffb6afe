"""CodeGenConfig and the table of the 12 released checkpoints (the one source of truth for their shapes)."""

from __future__ import annotations

import copy
import json
import math
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


# Bounds far beyond any real CodeGen (the largest has 16B parameters and 2,048 positions): a config past
# them is a typo or a hostile file, and refusing it early keeps a bad number from turning into a hang
# or an allocation of terabytes.
MAX_PARAMETERS = 10**12
MAX_POSITIONS = 1 << 20
MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few hundred bytes; do not read a huge file into memory


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

    def __init__(self, /, **kwargs: Any) -> None:
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
        if type(self.torch_dtype).__module__ == "torch":  # a torch.dtype passed in code
            self.torch_dtype = str(self.torch_dtype)
        if isinstance(self.torch_dtype, str):
            self.torch_dtype = self.torch_dtype.removeprefix("torch.")
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

    def num_parameters(self) -> int:
        """Parameters of CodeGenForCausalLM with this config (lm_head included), counted without building
        it: `info` and the size checks must not allocate, or even walk, a model that a typo made huge."""
        E, L, V, inner = self.n_embd, self.n_layer, self.vocab_size, self.inner_dim
        block = 2 * E + 4 * E * E + 2 * E * inner + inner + E  # ln_1, qkv + out_proj, fc_in, fc_out
        head = V if self.tie_word_embeddings else V * E + V  # the bias is never tied
        return V * E + L * block + 2 * E + head

    def validate(self) -> None:
        """Reject values the network cannot be built or run with, naming the field and the value: a
        wrong type, sign or size caught here is one clear line instead of a traceback, a hang or NaNs."""

        def fail(field: str, why: str) -> None:
            raise ValueError(f"invalid CodeGenConfig: {field}={_short(getattr(self, field))}: {why}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_real(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if not is_int(getattr(self, field)) or getattr(self, field) <= 0:
                fail(field, "must be a positive integer")
        if self.n_ctx is not None and (not is_int(self.n_ctx) or self.n_ctx <= 0):
            fail("n_ctx", "must be a positive integer")
        for field in ("n_positions", "n_ctx"):
            if getattr(self, field) is not None and getattr(self, field) > MAX_POSITIONS:
                fail(field, f"is more than {MAX_POSITIONS:,} positions (CodeGen has 2,048)")
        if self.n_embd % self.n_head:
            fail("n_embd", f"must be divisible by n_head={self.n_head}")
        if self.n_embd % 4:
            fail("n_embd", "must be divisible by 4 (the fused qkv projection is stored as 4 blocks)")
        if self.rotary_dim is not None:
            if not is_int(self.rotary_dim) or self.rotary_dim <= 0:
                fail("rotary_dim", "must be a positive integer or null")
            if self.rotary_dim % 2:
                fail("rotary_dim", "must be even (rotary rotates pairs of dimensions)")
            if self.rotary_dim > self.head_dim:
                fail("rotary_dim", f"must not exceed the head dimension n_embd/n_head={self.head_dim}")
        elif self.head_dim % 2:
            fail("n_embd", f"head dimension {self.head_dim} must be even when rotary_dim is null")
        if self.n_inner is not None and (not is_int(self.n_inner) or self.n_inner <= 0):
            fail("n_inner", "must be a positive integer or null")
        if not isinstance(self.activation_function, str) or self.activation_function not in ACTIVATIONS:
            fail("activation_function", f"unknown activation; expected one of {', '.join(ACTIVATIONS)}")
        for field in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            if not is_real(getattr(self, field)) or not 0.0 <= getattr(self, field) < 1.0:
                fail(field, "must be a probability in [0, 1)")
        if not is_real(self.layer_norm_epsilon) or self.layer_norm_epsilon <= 0:
            fail("layer_norm_epsilon", "must be a finite positive number")
        if not is_real(self.initializer_range) or self.initializer_range < 0:
            fail("initializer_range", "must be a finite number >= 0")
        for field in ("use_cache", "tie_word_embeddings"):
            if not isinstance(getattr(self, field), bool):  # "false" in JSON quotes would be truthy
                fail(field, "must be true or false")
        eos = self.eos_token_id
        if not (eos is None or is_int(eos) or (isinstance(eos, (list, tuple)) and all(is_int(e) for e in eos))):
            fail("eos_token_id", "must be a token id, a list of token ids or null")
        for token in self.eos_token_ids:
            if not 0 <= token < self.vocab_size:
                fail("eos_token_id", f"must be a token id below vocab_size={self.vocab_size}")
        if self.bos_token_id is not None and (not is_int(self.bos_token_id) or self.bos_token_id < 0):
            fail("bos_token_id", "must be a token id (an integer >= 0) or null")
        if self.pad_token_id is not None and (
            not is_int(self.pad_token_id) or not 0 <= self.pad_token_id < self.vocab_size
        ):
            fail("pad_token_id", f"must be a token id below vocab_size={self.vocab_size}")
        dtype = self.torch_dtype
        if dtype is not None and (not isinstance(dtype, str) or not dtype.isidentifier()):
            fail("torch_dtype", "must be a dtype name such as float16 or null")
        quantization = self.extra.get("quantization_config")
        if quantization is not None and not isinstance(quantization, dict):
            raise ValueError(f"invalid CodeGenConfig: quantization_config={quantization!r}: must be an object")
        count = self.num_parameters()
        if count > MAX_PARAMETERS:
            sizes = ", ".join(f"{f}={_short(getattr(self, f))}" for f in ("n_layer", "n_embd", "vocab_size", "n_inner"))
            raise ValueError(
                f"invalid CodeGenConfig: {sizes}: make {f'{count:.3g}' if count < 1e300 else 'over 1e300'} "
                f"parameters, more than the {MAX_PARAMETERS:.0e} this loader accepts (CodeGen-16B has 1.6e+10)")

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
        data = read_json(path)
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


def _short(value: object) -> str:
    """repr(value), cut short: a hostile config.json must not make the error line a page long."""
    if isinstance(value, int) and abs(value) >= 10**60:
        return f"<an integer of {len(str(value))} digits>"
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + "..."


def read_json(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """The JSON in `path`, or an error that names the file and says what is wrong with it in one line
    (not there, unreadable, too big to be what it claims, binary, not JSON, nested absurdly deep)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise ValueError(f"{path} is over {max_bytes >> 20} MB; that is not a JSON file of this kind")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                         f"{exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    except ValueError:  # json.loads refuses integers of more than 4,300 digits
        raise ValueError(f"{path} is not valid JSON: it holds an integer of thousands of digits") from None
    except RecursionError:
        raise ValueError(f"{path} is not valid JSON: nested too deeply") from None
