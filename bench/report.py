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
    is reported with this."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return f"{model} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"
