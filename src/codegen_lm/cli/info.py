"""`codegen-lm info`: what a checkpoint is (shape, parameters, dtype, bytes) without loading it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import CliError, one_line


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint", description="Describe a checkpoint without loading it.")
    from ..bundled import DEFAULT_MODEL

    p.add_argument("model", metavar="MODEL", nargs="?", default=DEFAULT_MODEL,
                   help=f"checkpoint folder, hub name or bundled model (default: {DEFAULT_MODEL})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def describe(name: str) -> dict[str, object]:
    """The config's shape and the weight files' parameters, dtypes and bytes, from config.json and the
    files' headers only: nothing is allocated, so a config that claims a giant model costs nothing to
    look at, and weights that do not fit the config are named as loading would name them."""
    from ..checkpoint import CheckpointError, describe_weights, find_weight_files, resolve_model_dir
    from ..config import RELEASED_CHECKPOINTS, CodeGenConfig
    from ..hub import ModelNotFoundError

    try:
        try:
            folder = resolve_model_dir(name)
        except ModelNotFoundError:
            if name not in RELEASED_CHECKPOINTS:
                raise
            folder = None
        config = CodeGenConfig.from_pretrained(folder or name)
        expected = config.num_parameters()
        out: dict[str, object] = {"model": name, "folder": str(folder) if folder else None}
        out["config"] = {k: config.to_dict()[k] for k in (
            "n_layer", "n_embd", "n_head", "rotary_dim", "n_inner", "vocab_size", "n_positions",
            "activation_function", "eos_token_id", "bos_token_id", "tie_word_embeddings")}
        out["head_dim"] = config.head_dim
        out["parameters"] = expected
        if folder is None:
            out["weights"] = "not available locally (counts come from the released config)"
            out["dtype"] = config.torch_dtype
            out["bytes"] = expected * 2
        else:
            files = find_weight_files(folder)
            _check_against_config(config, files)
            weights = describe_weights(files)
            out.update(files=weights["files"], parameters=weights["parameters"], bytes=weights["bytes"],
                       dtype=", ".join(weights["dtypes"]))
    except (CheckpointError, ModelNotFoundError, OSError, ValueError) as exc:
        raise CliError(one_line(exc)) from None
    return out


def _check_against_config(config, files: list[Path]) -> None:
    """Missing or misshapen tensors, as loading would report them (tensors the config does not use are
    only described); weights without lm_head are taken for a bare CodeGenModel's."""
    from ..checkpoint import ExpectedWeights, check_weights, weight_manifest
    from ..model import CodeGenForCausalLM, CodeGenModel

    full = any(key.startswith("lm_head.") for _, key, _, _ in weight_manifest(files))
    check_weights(ExpectedWeights(CodeGenForCausalLM if full else CodeGenModel, config), files, strict=False)


def run(args: argparse.Namespace) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in [*info, *info["config"]])
    for key, value in info.items():
        if key == "config":
            for k, v in value.items():
                print(f"{k:<{width}}  {v}")
        elif key in ("parameters", "bytes"):
            print(f"{key:<{width}}  {value:,}" + (f"  ({value / 1e9:.2f} GB)" if key == "bytes" else ""))
        elif value is not None:
            print(f"{key:<{width}}  {value if not isinstance(value, list) else ', '.join(value)}")
    return 0
