"""LoRA (Hu et al., "Low-Rank Adaptation of Large Language Models"): low-rank adapters on the model's
Linear layers, trained while every original weight stays frozen, saved and loaded in `peft`'s format.

`apply_lora` swaps a `LoraLinear` in for each targeted `nn.Linear`, from outside the model (as
quantize.py swaps int8 layers in): the same weight and bias parameters, under the same names, plus
`lora_A` [r, in] and `lora_B` [out, r], so that y = x W^T + b + (alpha / r) * B A dropout(x). Only the
LoRA matrices require gradients.

An adapter folder is what `peft` writes for `transformers`' CodeGenForCausalLM: `adapter_config.json`
(peft's LoraConfig fields) and `adapter_model.safetensors` with keys such as
`base_model.model.transformer.h.0.attn.qkv_proj.lora_A.weight`. The one layout difference is the fused
projection's: the checkpoint (and so peft) orders qkv_proj's rows in CodeGen's mp_num blocks, we in
[q; k; v] with de-interleaved rotary dimensions (see model.py), so lora_B of qkv_proj is permuted with
checkpoint.py's permutation on the way in and out; lora_A, whose columns are the hidden state, is
the same in both.

For inference the adapter is merged: W + (alpha / r) B A folded into a plain nn.Linear, after which
the model is an ordinary model (the engine, int8 quantization and save_pretrained see nothing else).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, qkv_permutation
from .config import read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"  # what peft wrote before safetensors became its default
PEFT_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> the transformers model
DEFAULT_TARGETS = ("qkv_proj", "out_proj", "fc_in", "fc_out")
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# peft features that change what an adapter computes and that this loader does not implement: an
# adapter using one is refused by name rather than loaded into something that computes otherwise.
_UNSUPPORTED = {
    "use_dora": "DoRA", "lora_bias": "LoRA biases (lora_bias)", "modules_to_save": "modules_to_save",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style weights)", "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters", "layer_replication": "layer replication",
    "alora_invocation_tokens": "aLoRA", "use_qalora": "QA-LoRA", "arrow_config": "Arrow routing",
}


class LoraLinear(nn.Module):
    """A Linear layer with a low-rank update: x W^T + b + scaling * lora_B(lora_A(dropout(x))).

    `weight` and `bias` are the original layer's parameters (shared, not copied), so the state-dict
    names of the base weights do not change; lora_A starts as nn.Linear's (Kaiming-uniform) and
    lora_B at zero, as peft starts them, so a new adapter changes nothing until it is trained."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 init: bool = True) -> None:
        super().__init__()
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype, "bias": False}
        self.lora_A = nn.utils.skip_init(nn.Linear, self.in_features, r, **factory)
        self.lora_B = nn.utils.skip_init(nn.Linear, r, self.out_features, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.dropout = float(dropout)
        if init:  # else the caller fills both (loading an adapter draws no random numbers)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta(self) -> torch.Tensor:
        """scaling * B A [out, in], in fp32."""
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes (without dropout)."""
        w = self.weight
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter((w.detach().float() + self.delta()).to(w.dtype), requires_grad=w.requires_grad)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha:g}{', rslora' if self.use_rslora else ''}")


@dataclass
class LoraConfig:
    """The settings of an adapter, in peft's LoraConfig field names."""

    r: int = 8
    lora_alpha: float = 8.0
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None
    task_type: str | None = "CAUSAL_LM"

    def to_peft_dict(self) -> dict:
        """adapter_config.json as peft writes it (the fields a plain LoRA uses; peft fills in the rest)."""
        return {
            "peft_type": "LORA", "task_type": self.task_type, "base_model_name_or_path": self.base_model_name_or_path,
            "revision": None, "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules, "exclude_modules": None, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": self.use_rslora, "use_dora": False, "lora_bias": False, "modules_to_save": None,
            "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": self.rank_pattern, "alpha_pattern": self.alpha_pattern, "inference_mode": True,
        }

    def alpha_for(self, module_name: str) -> float:
        key = _pattern_key(self.alpha_pattern, module_name)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def rank_for(self, module_name: str) -> int:
        key = _pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else int(self.r)


def _pattern_key(patterns: dict, module_name: str) -> str | None:
    """The key of a rank/alpha pattern that names `module_name` (peft's rule: the key, a regular
    expression, matches the whole name or its end after a dot)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _targeted(name: str, targets: list[str] | re.Pattern) -> bool:
    """peft's rule: a list names modules by their full name or its last components; a regular
    expression must match the whole module name."""
    if isinstance(targets, re.Pattern):
        return targets.fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def parse_targets(targets: str | Iterable[str]) -> list[str]:
    """`"qkv_proj,out_proj"` or a list of names, as a list without blanks or repeats."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    names = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not names:
        raise ValueError("no LoRA target modules given (e.g. qkv_proj,out_proj,fc_in,fc_out)")
    return names


# ---- putting adapters on a model ----------------------------------------------------------------------


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The model's LoRA layers by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def is_lora_key(name: str) -> bool:
    return name.endswith(_LORA_SUFFIXES)


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 8.0,
    targets: str | Iterable[str] | re.Pattern = DEFAULT_TARGETS,
    dropout: float = 0.0,
    use_rslora: bool = False,
    freeze: bool = True,
) -> list[str]:
    """Put a LoRA layer of rank r on every nn.Linear that `targets` selects, and (freeze) stop
    gradients to every other parameter. Returns the names of the adapted modules.

    targets: module names matched against the whole name or its last components, as peft matches a
    list (qkv_proj, out_proj, fc_in, fc_out, lm_head; "transformer.h.0.attn.qkv_proj" for one layer),
    as a list or one comma-separated string; or a compiled regular expression over the whole name."""
    if not isinstance(targets, re.Pattern):
        targets = parse_targets(targets)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"lora_alpha must be a positive number, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}")
    chosen = [name for name, m in model.named_modules() if name and _targeted(name, targets)]
    adapted = []
    for name in chosen:
        module = model.get_submodule(name)
        if isinstance(module, LoraLinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA target {name} is a {type(module).__name__}; only Linear layers can be adapted")
        _swap(model, name, LoraLinear(module, r, alpha, dropout, use_rslora))
        adapted.append(name)
    if not adapted:
        raise ValueError(f"no Linear layer of the model is named by the LoRA targets {targets!r} "
                         "(CodeGen's are qkv_proj, out_proj, fc_in, fc_out and lm_head)")
    if freeze:
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return adapted


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into a plain nn.Linear (W + scaling B A), in place: the model computes
    what it did (dropout aside) and is an ordinary model again. Returns the model."""
    for name, layer in lora_layers(model).items():
        with torch.no_grad():
            _swap(model, name, layer.merged())
    return model


def lora_config_of(model: nn.Module) -> LoraConfig:
    """The LoraConfig that describes the model's LoRA layers (the most common rank and alpha as r and
    lora_alpha, the other modules' in rank_pattern / alpha_pattern)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in layers.values()).most_common(1)[0][0]
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("the model's LoRA layers mix rsLoRA and plain scaling, which one adapter file cannot say")
    dropout = Counter(m.dropout for m in layers.values()).most_common(1)[0][0]
    alpha_value: float | int = int(alpha) if float(alpha).is_integer() else alpha
    # the modules' short names when those name exactly the adapted modules, else their full names
    targets = sorted({name.rpartition(".")[2] for name in layers})
    candidates = {name for name, m in model.named_modules()
                  if isinstance(m, (nn.Linear, LoraLinear)) and not name.endswith((".lora_A", ".lora_B"))}
    if {name for name in candidates if _targeted(name, targets)} != set(layers):
        targets = sorted(layers)
    return LoraConfig(
        r=r, lora_alpha=alpha_value, lora_dropout=dropout, use_rslora=rslora.pop(),
        target_modules=targets,
        rank_pattern={re.escape(n): m.r for n, m in layers.items() if m.r != r},
        alpha_pattern={re.escape(n): m.alpha for n, m in layers.items() if m.alpha != alpha},
        base_model_name_or_path=getattr(model, "name_or_path", None),
        task_type="CAUSAL_LM" if hasattr(model, "lm_head") else None,
    )


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA matrices by our parameter names (our layout)."""
    return {name: p.detach() for name, p in model.named_parameters() if is_lora_key(name)}


# ---- adapter files ------------------------------------------------------------------------------------


def _qkv_rows(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse): ours = checkpoint[perm], checkpoint = ours[inverse] for qkv_proj's rows."""
    perm = qkv_permutation(model.config)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    return perm, inverse


def _is_qkv(module_name: str) -> bool:
    return module_name.endswith("attn.qkv_proj")


def peft_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA matrices (the model's, or those of `state_dict` in our names and layout) under peft's
    names and in the checkpoint's layout."""
    state = lora_state_dict(model) if state_dict is None else {k: v for k, v in state_dict.items() if is_lora_key(k)}
    _, inverse = _qkv_rows(model)
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if name.endswith(".lora_B.weight") and _is_qkv(name.removesuffix(".lora_B.weight")):
            tensor = tensor[inverse]
        out[PEFT_PREFIX + name] = tensor.contiguous()
    return out


def save_adapter(model: nn.Module, folder: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the model's adapter as peft does: adapter_config.json and adapter_model.safetensors, which
    `peft.PeftModel.from_pretrained(transformers_model, folder)` loads. `state_dict` (our names)
    replaces the LoRA layers' own values (e.g. gathered from shards). Only the LoRA matrices are
    written (peft also copies a targeted lm_head's frozen base weights, which the base model has)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = lora_config_of(model)
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = str(base_model_name_or_path)
    tensors = peft_state_dict(model, state_dict)
    tmp = folder / (ADAPTER_WEIGHTS + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, folder / ADAPTER_WEIGHTS)
    tmp = folder / (ADAPTER_CONFIG + ".tmp")
    tmp.write_text(json.dumps(config.to_peft_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / ADAPTER_CONFIG)
    return folder


def is_adapter_dir(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def read_adapter(folder: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(config, tensors under peft's names) of an adapter folder, refusing what this loader cannot
    compute (DoRA, LoRA biases, modules_to_save, ...) with one line naming the file and the field."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})")
    try:
        data = read_json(path)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    if data.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {data.get('peft_type')!r}; only LORA adapters are supported")
    for key, what in _UNSUPPORTED.items():
        if data.get(key):
            raise CheckpointError(f"{path}: the adapter uses {what} ({key}={data[key]!r}), which is not supported")
    if data.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias={data['bias']!r}: adapters that train biases are not supported")

    def number(key: str, default: float, kind: type) -> float:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise CheckpointError(f"{path}: {key}={value!r}: must be a positive number")
        return kind(value)

    targets = data.get("target_modules") or []
    config = LoraConfig(
        r=int(number("r", 8, int)), lora_alpha=number("lora_alpha", 8, float),
        target_modules=targets if isinstance(targets, str) else list(targets),
        lora_dropout=float(data.get("lora_dropout") or 0.0), use_rslora=bool(data.get("use_rslora")),
        rank_pattern=dict(data.get("rank_pattern") or {}), alpha_pattern=dict(data.get("alpha_pattern") or {}),
        base_model_name_or_path=data.get("base_model_name_or_path"), task_type=data.get("task_type"),
    )
    weights = folder / ADAPTER_WEIGHTS
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(weights)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights}: not a readable safetensors file: {exc}") from None
    elif (folder / ADAPTER_WEIGHTS_BIN).is_file():
        weights = folder / ADAPTER_WEIGHTS_BIN
        try:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{weights}: not a readable weights file ({type(exc).__name__}: {exc})") from None
        if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CheckpointError(f"{weights}: expected a dict of tensors")
    else:
        raise CheckpointError(f"{folder}: no adapter weights ({ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN})")
    return config, tensors


def _adapter_modules(folder: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """From peft's keys: ({module name: {"A": lora_A, "B": lora_B}}, {module name: {"weight" / "bias":
    tensor}}), the second for the base weights peft stores beside the adapter of a targeted embedding
    layer such as lm_head (its save_embedding_layers), which replace the model's."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    bases: dict[str, dict[str, torch.Tensor]] = {}
    parts = ((".lora_A.weight", modules, "A"), (".lora_B.weight", modules, "B"),
             (".base_layer.weight", bases, "weight"), (".base_layer.bias", bases, "bias"))
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for suffix, table, part in parts:
            if name.endswith(suffix):
                table.setdefault(name.removesuffix(suffix), {})[part] = tensor
                break
        else:
            raise CheckpointError(f"{folder}: adapter tensor {key!r} is not a LoRA matrix of a Linear layer "
                                  "(only lora_A / lora_B weights are supported)")
    for name, parts in modules.items():
        if set(parts) != {"A", "B"}:
            missing = ({"A", "B"} - set(parts)).pop()
            raise CheckpointError(f"{folder}: the adapter has no lora_{missing} for {name}")
    if not modules:
        raise CheckpointError(f"{folder}: the adapter holds no LoRA weights")
    stray = sorted(set(bases) - set(modules))
    if stray:
        raise CheckpointError(f"{folder}: the adapter holds base weights of {stray[0]}, which it does not adapt")
    return modules, bases


def load_adapter(model: nn.Module, folder: str | os.PathLike, merge: bool = True, trainable: bool = False) -> nn.Module:
    """Load an adapter folder (ours, or one peft saved for transformers' CodeGen) into `model`.

    merge: fold it into the weights (for inference: the model stays an ordinary model, so the engine
    and int8 quantization run it at full speed); otherwise the LoRA layers stay (for training or
    inspection; layers the model already has are filled in place). trainable: with merge=False, leave
    the LoRA matrices requiring gradients and freeze the rest. Returns the model."""
    folder = Path(folder)
    config, tensors = read_adapter(folder)
    modules, bases = _adapter_modules(folder, tensors)
    perm, _ = _qkv_rows(model)
    existing = lora_layers(model)
    for name, parts in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{folder}: the adapter is for a module {name}, which this model does not have "
                                  "(an adapter for another architecture?)") from None
        for part, tensor in bases.get(name, {}).items():
            param = getattr(module, part, None)
            if param is None or tuple(tensor.shape) != tuple(param.shape) or not torch.isfinite(tensor).all():
                raise CheckpointError(f"{folder}: the adapter's base {part} of {name} does not fit the model's")
            with torch.no_grad():
                param.copy_(tensor[perm] if _is_qkv(name) and part == "weight" else tensor)
        a, b = parts["A"], parts["B"]
        r = a.shape[0] if a.dim() == 2 else -1
        if not isinstance(module, (nn.Linear, LoraLinear)):
            raise CheckpointError(f"{folder}: the adapter's {name} is a {type(module).__name__} in this model, "
                                  "not a Linear layer")
        if a.dim() != 2 or b.dim() != 2 or a.shape != (r, module.in_features) or b.shape != (module.out_features, r):
            raise CheckpointError(
                f"{folder}: the adapter's {name} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, which do not "
                f"fit a Linear layer of {module.in_features} -> {module.out_features} (an adapter for another model?)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise CheckpointError(f"{folder}: the adapter's {name} holds NaN or infinite values")
        if _is_qkv(name):
            b = b[perm]
        alpha = config.alpha_for(name)
        if name in existing:
            layer = existing[name]
            if layer.r != r:
                raise CheckpointError(f"{folder}: the adapter's {name} has rank {r}, the model's LoRA layer {layer.r}")
        else:
            layer = LoraLinear(module, r, alpha, config.lora_dropout, config.use_rslora, init=False)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
        if merge:
            with torch.no_grad():
                _swap(model, name, layer.merged())
        elif name not in existing:
            _swap(model, name, layer)
    if not merge:
        for name, p in model.named_parameters():
            if is_lora_key(name):
                p.requires_grad_(trainable)
            elif trainable:
                p.requires_grad_(False)
    return model


def merged_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` (our names: base weights and LoRA matrices, e.g. gathered from shards) with every
    LoRA update folded into its base weight and the LoRA matrices left out: what merge_lora then
    state_dict() would give, without touching the model."""
    out = {k: v for k, v in state_dict.items() if not is_lora_key(k)}
    for name, layer in lora_layers(model).items():
        a, b = state_dict[f"{name}.lora_A.weight"].float(), state_dict[f"{name}.lora_B.weight"].float()
        w = state_dict[f"{name}.weight"]
        out[f"{name}.weight"] = (w.float() + layer.scaling * (b @ a)).to(w.dtype)
    return out
