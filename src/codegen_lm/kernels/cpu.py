"""What CPU this is: its model name and the instruction-set features that decide which kernels are fast.

The same machine can boot as an AVX2-only AMD EPYC one day and an Intel Xeon with AMX the next, so
kernel choices (registry.py) and every benchmark figure are keyed by this.
"""

from __future__ import annotations

import functools
import platform

# features that change which product kernels win (vector width, int8 dot products, bf16, matrix units)
FEATURES = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; elsewhere the platform's processor name and no flags."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
                if model and flags:
                    break
    except OSError:
        pass
    return model or platform.processor() or "unknown CPU", flags


def has(flag: str) -> bool:
    """Whether the CPU reports `flag` (as /proc/cpuinfo spells it, e.g. "avx512_vnni")."""
    return flag in cpu_info()[1]


def int8_dot_products() -> bool:
    """Whether the CPU multiplies u8 x s8 into 32-bit sums in one instruction (VNNI or AMX). Without
    it (plain AVX2) the 16-bit intermediate sums can saturate, which fbgemm avoids only when told to
    quantize activations to 7 bits."""
    return any(has(f) for f in ("avx_vnni", "avx512_vnni", "amx_int8"))


def description() -> str:
    """"AMD EPYC (avx2)": the model and the features above that it has, for benchmark reports."""
    model, flags = cpu_info()
    return f"{model} ({', '.join(f for f in FEATURES if f in flags) or 'no AVX2'})"
