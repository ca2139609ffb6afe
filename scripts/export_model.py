"""Copy a trained checkpoint into a compact, self-contained folder (weights in fp16 by default).

    python scripts/export_model.py SRC DST [--dtype float16]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    model = CodeGenForCausalLM.from_pretrained(args.src, dtype=args.dtype)
    if args.dst.exists():
        shutil.rmtree(args.dst)
    model.save_pretrained(args.dst)
    tokenizer = CodeGenTokenizerFast.from_pretrained(args.src)
    tokenizer.model_max_length = model.config.n_positions
    tokenizer.save_pretrained(args.dst)
    if (args.src / "train_config.json").exists():
        shutil.copy(args.src / "train_config.json", args.dst / "train_config.json")
    size = sum(p.stat().st_size for p in args.dst.iterdir())
    print(json.dumps({"folder": str(args.dst), "parameters": model.num_parameters(), "bytes": size}))


if __name__ == "__main__":
    main()
