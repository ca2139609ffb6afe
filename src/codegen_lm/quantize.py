"""int8 weight-only quantization: every Linear (lm_head included) becomes an Int8Linear.

Weights are stored as int8 with one fp32 scale per output channel (symmetric, round to nearest:
W ~ scale[o] * W8[o, :]); activations stay in the model's dtype. Decoding one token at a time reads
every weight once per token, so int8 weights make it up to 4x lighter on memory bandwidth. The
matrix products run in `kernels.int8.int8_matmul` (a numba kernel on the CPU for a few rows at a time,
e.g. decoding) or dequantize a block of rows at a time and use the ordinary matmul (many rows, e.g.
prefill, or no numba, or a GPU).
"""

from __future__ import annotations

import torch
from torch import nn

QUANT_METHOD = "codegen-lm-int8"
QUANTIZATION_CONFIG = {"quant_method": QUANT_METHOD, "bits": 8, "granularity": "per-output-channel",
                       "symmetric": True, "modules": "every Linear and lm_head"}


class Int8Linear(nn.Module):
    """y = x @ (scale * W8)^T + bias, with W8 int8 [out, in] and scale fp32 [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype,
                linear.weight.device)
        with torch.no_grad():
            w8, scale = quantize_weight(linear.weight)
            q.weight.copy_(w8)
            q.weight_scale.copy_(scale)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        return q

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels.int8 import int8_matmul

        rows = x.reshape(-1, self.in_features)
        out = int8_matmul(rows, self.weight, self.weight_scale)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights, fp32 per-row scales) with weight ~ scale[:, None] * int8."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def quantize_model(model: nn.Module, placeholders: bool = False) -> nn.Module:
    """Replace every nn.Linear of `model` by an Int8Linear, in place (lm_head untied if it was tied).

    placeholders: build empty Int8Linear modules (to load a quantized checkpoint into) instead of
    quantizing the current weights.
    """
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if placeholders:
                    new = Int8Linear(child.in_features, child.out_features, child.bias is not None,
                                     child.weight.dtype, child.weight.device)
                else:
                    new = Int8Linear.from_linear(child)
                setattr(parent, name, new)
    if config is not None:
        config.extra["quantization_config"] = dict(QUANTIZATION_CONFIG)
    return model


def is_quantized(config: object) -> bool:
    extra = getattr(config, "extra", {}) or {}
    return (extra.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD
