"""oneDNN-packed fp32 (and bf16) weights and the products that use them.

A packed copy of a weight in oneDNN's blocked layout (what inductor's CPU freezing uses) runs
products of many rows about twice as fast as PyTorch's default BLAS on CPUs where MKL is slow (AMD),
and lets the activation or a residual add happen while the output is still in cache.
"""

from __future__ import annotations

import torch

# activation name -> oneDNN post-op (attr, algorithm) that _linear_pointwise can fuse into the product
FUSABLE_ACTIVATIONS = {"gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                       "gelu_fast": ("gelu", "tanh"), "gelu": ("gelu", "none"), "relu": ("relu", "")}


def available() -> bool:
    """Whether this PyTorch build can pack weights and run packed products (with residual adds)."""
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_linear_pointwise")
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops._linear_pointwise, "binary"))


def bf16_native() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where oneDNN's bf16 products
    run several times faster than fp32 ones; elsewhere they are emulated and slower than fp32."""
    return available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def can_pack(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `weight` can get a oneDNN-packed copy in `dtype` (float32, or bfloat16 where the CPU has
    it) on a CPU with oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and available()
            and (dtype == torch.float32 or (dtype == torch.bfloat16 and bf16_native())))


def pack_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """A copy of `weight` [out, in] in oneDNN's blocked layout, in `dtype` (float32 or bfloat16), or None
    where this build of PyTorch cannot make one."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype))
    except (RuntimeError, AttributeError):
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                  activation: tuple[str, str] = ("none", "")) -> torch.Tensor:
    """act(x [rows, in] @ W^T + b) with the packed copy of W (x in the packed copy's dtype)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, activation[0], [], activation[1])


def packed_linear_add(x: torch.Tensor, residual: torch.Tensor, packed: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """residual + x @ W^T + b in one oneDNN call (the add fused into the product)."""
    return torch.ops.mkldnn._linear_pointwise.binary(x.contiguous(), residual, packed, bias, "add")
