"""Where every bench script leaves its figures: one JSON file per benchmark, path printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def cpu_description() -> str:
    """"AMD EPYC (avx2, avx512f, avx512_bf16, ...)": the CPU model and the vector / matrix features that
    decide which kernels are fast. This project's machines change CPU between boots, so every figure
    is reported with this (the same text the kernel registry's cache records)."""
    from codegen_lm.kernels.cpu import description

    return description()
