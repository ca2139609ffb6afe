"""Kernel-backed Linear layers, swapped into a model by the engine (as quantize.py swaps in int8 ones).

The model is plain PyTorch (`nn.Linear`, or quantize.py's `Int8Linear`). For inference on the CPU the
engine turns each into a planned version of itself: the same module with the same parameters
(state_dict, tied weights and hooks are unchanged) that runs each product through the kernel path
the registry chose for this machine and that many rows (kernels/registry.py): a numba kernel that
streams the weight with all threads for one row, oneDNN's packed copy for many (about twice PyTorch's
default BLAS on AMD CPUs), and so on. Each module keeps what its paths need (a packed copy, fbgemm's
int8 copy) and remakes it when the weight changes. Under autograd, on a GPU or in other dtypes it is
exactly the module it was.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import onednn, registry
from ..quantize import Int8Linear, quantize_weight

PACK_LIMIT = 2 << 30  # bytes of fp32 weights below which an engine keeps oneDNN copies by default
PACKED = "onednn-f32-packed"


class _Planned:
    """What both planned module types share: plans by kind, and each path's prepared weights."""

    KIND: ClassVar[str]
    plans: dict[str, registry.Plan]  # set by prepare() on every planned module
    _states: dict[str, tuple[int, object]]

    def _weight_version(self) -> int:
        """Bumped by every in-place change of the weight, so a stale prepared copy is never used
        (inference-mode tensors keep no counter: they are taken as unchanging)."""
        return -2 if self.weight.is_inference() else self.weight._version

    def _weights(self, kind: str) -> registry.Weights:
        """The weights in the form paths of `kind` take."""
        raise NotImplementedError

    def state(self, path: registry.LinearPath) -> object:
        """What `path` needs to multiply by this weight, made on first use and kept while it is current."""
        states = self.__dict__.setdefault("_states", {})
        version = self._weight_version()
        entry = states.get(path.name)
        if entry is None or entry[0] != version:
            with torch.no_grad():
                entry = states[path.name] = (version, path.prepare(self._weights(path.kind)))
        return entry[1]

    def product(self, x: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """x [rows, in] @ W^T + b through the plan of `kind` (default: the weights' own kind)."""
        plan = self.plans[kind or self.KIND]
        path = plan.path(x.shape[0])
        out = path.run(self.state(path), x)
        if self.bias is not None:
            out += self.bias
        return out

    def forget(self, keep: frozenset[str] = frozenset()) -> None:
        """Drop prepared copies but those of the paths in `keep` (the weights are about to change, or
        the paths are no longer planned and their memory is wanted back)."""
        states = self.__dict__.get("_states", {})
        self.__dict__["_states"] = {name: entry for name, entry in states.items() if name in keep}


class PackedLinear(_Planned, nn.Linear):
    """nn.Linear whose inference products run through the registry's chosen paths (see module doc).
    Made by class swap, so it has no constructor of its own."""

    KIND = "fp32"

    def _weights(self, kind: str) -> registry.Weights:
        if kind in ("fp32", "bf16"):  # (bf16 paths convert the weights themselves)
            return registry.Weights(fp32=self.weight.detach())
        w8, scale = quantize_weight(self.weight)  # int8 products of fp32 weights: quantized once, here
        return registry.Weights(w8=w8, scale=scale)

    def pack(self) -> bool:
        """Keep oneDNN's packed copy of the (fp32, CPU) weight; False where oneDNN cannot make one."""
        if not onednn.can_pack(self.weight):
            return False
        return self.state(registry.BY_NAME[PACKED]) is not None

    def packed_weight(self, rows: int | None = None) -> torch.Tensor | None:
        """oneDNN's packed copy if the plan runs products of `rows` rows through it (any rows: None),
        else None; the runner then fuses activations and residual adds into oneDNN's product."""
        plan = getattr(self, "plans", {}).get("fp32")
        if plan is None or (PACKED not in plan.names() if rows is None else plan.path(rows).name != PACKED):
            return None
        return self.state(registry.BY_NAME[PACKED])

    def train(self, mode: bool = True) -> PackedLinear:
        if mode:
            self.forget()  # weights are about to change
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or x.dim() == 0 or torch.compiler.is_compiling() or x.dtype != torch.float32
                or self.weight.dtype != torch.float32 or x.device.type != "cpu"
                or "fp32" not in getattr(self, "plans", {})):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        try:
            out = self.product(flat)
        except RuntimeError:  # a kernel refused this input: the plain product is always right
            return F.linear(x, self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


class PlannedInt8Linear(_Planned, Int8Linear):
    """Int8Linear whose CPU products run through the registry's chosen int8 paths (class swap)."""

    KIND = "int8"

    def _weights(self, kind: str) -> registry.Weights:
        return registry.Weights(w8=self.weight.detach(), scale=self.weight_scale.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32
                or "int8" not in getattr(self, "plans", {})):
            return super().forward(x)
        flat = x.reshape(-1, self.in_features)
        return self.product(flat).view(*x.shape[:-1], self.out_features)


def prepare(model: nn.Module, pack: bool | None = None, kernels: str = "auto", w8a8: bool = False,
            bf16: bool = False) -> None:
    """Swap the CPU fp32 nn.Linear and Int8Linear modules of `model` for their planned versions and
    choose their kernel paths (kernels: "auto" or a family to force, see registry.py). pack: allow
    oneDNN's packed copies (None: when the fp32 weights take at most PACK_LIMIT bytes, since the
    copies double their memory). w8a8: also plan int8 x int8 products for every weight (the lm_head
    included, as CTranslate2's int8 does), for Engine(matmul_dtype="int8"); bf16: plan bf16 products
    of the fp32 weights, for Engine(matmul_dtype="bfloat16")."""
    modules = [m for m in model.modules() if m.__class__ in (nn.Linear, PackedLinear, Int8Linear, PlannedInt8Linear)
               and m.weight.device.type == "cpu"]
    fp32 = [m for m in modules if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32]
    int8 = [m for m in modules if isinstance(m, Int8Linear)]
    for m in fp32:
        m.__class__ = PackedLinear
    for m in int8:
        m.__class__ = PlannedInt8Linear
    if pack is None:
        pack = sum(m.weight.numel() * m.weight.element_size() for m in fp32) <= PACK_LIMIT
    lm_head = getattr(model, "lm_head", None)
    blocks = [m for m in fp32 + int8 if m is not lm_head]
    shapes = sorted({tuple(m.weight.shape) for m in blocks} or {tuple(m.weight.shape) for m in fp32 + int8})
    exclude = frozenset() if pack else frozenset({PACKED})
    plans = {}
    if fp32:
        plans["fp32"] = registry.choose("fp32", shapes, kernels, exclude)
    if int8:
        plans["int8"] = registry.choose("int8", shapes, kernels)
    w8a8_plan = registry.choose("w8a8", shapes, kernels) if w8a8 and fp32 + int8 else None
    bf16_plan = registry.choose("bf16", shapes, kernels, exclude) if bf16 and fp32 else None
    for m in fp32 + int8:
        m.plans = {k: v for k, v in plans.items() if k == m.KIND}
        if w8a8_plan is not None:
            m.plans["w8a8"] = w8a8_plan
        if bf16_plan is not None and m.KIND == "fp32":
            m.plans["bf16"] = bf16_plan
        m.forget(keep=frozenset(name for plan in m.plans.values() for name in plan.names()))
    for m in fp32:
        if PACKED in m.plans["fp32"].names():
            m.pack()


def packed_weight(module: nn.Module, rows: int | None = None) -> torch.Tensor | None:
    """The module's packed weight if its plan multiplies `rows` rows with it, else None."""
    return module.packed_weight(rows) if isinstance(module, PackedLinear) else None


def product(module: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor | None:
    """x [rows, in] @ W^T + b through the module's plan of `kind`, or None where it has none."""
    if isinstance(module, _Planned) and kind in getattr(module, "plans", {}):
        return module.product(x, kind)
    return None


def row_group(module: nn.Module) -> int:
    """Weight rows per dot loop (1 or 4, kernels/dots.py) that the module's plan chose for one-row
    products of its own kind: the layout the batch-1 block kernel uses. 4 where no numba row path won."""
    plan = getattr(module, "plans", {}).get(getattr(module, "KIND", ""))
    group = plan.path(1).group if plan is not None else None
    return group or 4


def plans(model: nn.Module) -> dict[str, str]:
    """kind -> the plan's description, over the model's planned modules (for logs and benchmarks)."""
    out: dict[str, str] = {}
    for m in model.modules():
        if isinstance(m, _Planned):
            for kind, plan in getattr(m, "plans", {}).items():
                out.setdefault(kind, f"{plan.describe()} ({plan.source})")
    return out
