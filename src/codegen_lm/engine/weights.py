"""Kernel-backed Linear layers, swapped into a model by the engine (as quantize.py swaps in int8 ones).

The model is plain PyTorch (`nn.Linear`). For inference on the CPU the engine turns each fp32
`nn.Linear` into a `PackedLinear`: the same module with the same parameters (state_dict, tied weights
and hooks are unchanged), which keeps a oneDNN-packed copy of its weight for products of many rows
(prefill, batched decoding: about twice PyTorch's default BLAS on AMD CPUs) and sends one row with a
large weight (batch-1 decoding) to a numba kernel that streams the weight with all threads. Under
autograd, on a GPU or in other dtypes it is exactly nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import onednn
from ..kernels.f32 import f32_matmul

PACK_LIMIT = 2 << 30  # bytes of fp32 weights below which an engine keeps oneDNN copies by default


class PackedLinear(nn.Linear):
    """nn.Linear plus a oneDNN-packed copy of its weight (see module doc). Made by class swap, so it
    has no constructor of its own."""

    packed: torch.Tensor | None = None
    _packed_version = -1
    _bf16: tuple[int, torch.Tensor, torch.Tensor | None] | None = None  # (weight version, weight, bias)

    def pack(self) -> bool:
        """Keep a packed copy of the (fp32, CPU) weight; False where oneDNN cannot make one."""
        if self.packed_weight() is not None:
            return True
        if not onednn.can_pack(self.weight):
            return False
        self.packed = onednn.pack_weight(self.weight)
        self._packed_version = self._weight_version()
        return self.packed is not None

    def packed_weight(self) -> torch.Tensor | None:
        """The packed copy if there is one and it is current (the weight unchanged since), else None."""
        if self.packed is not None and self._packed_version == self._weight_version():
            return self.packed
        return None

    def bf16_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """bf16 copies of the weight and bias, made on first use and kept while the weight is unchanged
        (for the engine's bf16 products; see Engine(matmul_dtype=...))."""
        version = self._weight_version()
        if self._bf16 is None or self._bf16[0] != version:
            bias = None if self.bias is None else self.bias.detach().to(torch.bfloat16)
            self._bf16 = (version, self.weight.detach().to(torch.bfloat16), bias)
        return self._bf16[1], self._bf16[2]

    def _weight_version(self) -> int:
        """Bumped by every in-place change of the weight, so a stale packed copy is never used
        (inference-mode tensors keep no counter: they are taken as unchanging)."""
        return -2 if self.weight.is_inference() else self.weight._version

    def train(self, mode: bool = True) -> PackedLinear:
        if mode:
            self.packed = self._bf16 = None  # weights are about to change
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dim() == 0 or torch.compiler.is_compiling():
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        out = f32_matmul(flat, self.weight)
        if out is not None:
            if self.bias is not None:
                out += self.bias
        else:
            packed = self.packed_weight()
            if packed is None or x.dtype != torch.float32:
                return F.linear(x, self.weight, self.bias)
            try:
                out = onednn.packed_linear(flat, packed, self.bias)
            except RuntimeError:  # oneDNN refused this input: the plain product is always right
                return F.linear(x, self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def prepare(model: nn.Module, pack: bool | None = None) -> None:
    """Swap every fp32 CPU nn.Linear of `model` for a PackedLinear and, if `pack` (None: when the
    weights take at most PACK_LIMIT bytes, since the copies double their memory), pack them."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)
               and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    for module in linears:
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear
    if pack is None:
        pack = sum(m.weight.numel() * m.weight.element_size() for m in linears) <= PACK_LIMIT
    if pack:
        for module in linears:
            if isinstance(module, PackedLinear):
                module.pack()


def packed_weight(module: nn.Module) -> torch.Tensor | None:
    """The module's current packed weight, or None (not a PackedLinear, or not packed)."""
    return module.packed_weight() if isinstance(module, PackedLinear) else None
