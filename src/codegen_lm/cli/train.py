"""`codegen-lm train`: train from scratch or fine-tune, on one process or under torchrun."""

from __future__ import annotations

import argparse
import dataclasses

from .common import CliError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..training.config import TrainConfig

    p = sub.add_parser(
        "train", help="train or fine-tune a model",
        description="Train a CodeGen model on a prepared data folder. Settings come from --config (TOML) "
                    "and are overridden by flags. Run it under torchrun for data-parallel training.",
    )
    p.add_argument("--config", metavar="TOML", help="training config file (tables are only for grouping)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out-dir")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default {default})")
        else:
            kind = {int: int, float: float, str: str}.get(type(default), int)
            if f.name in ("lr", "min_lr", "weight_decay", "grad_clip", "eps", "beta1", "beta2", "dropout",
                          "peak_flops"):
                kind = float
            p.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=f"(default {default})")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError
    from ..hub import ModelNotFoundError
    from ..training.checkpoints import TrainingError
    from ..training.config import TrainConfig
    from ..training.data import DataError
    from ..training.loop import train

    try:
        cfg = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
        for f in dataclasses.fields(TrainConfig):
            value = getattr(args, f.name, None)
            if value is not None:
                setattr(cfg, f.name, value)
        cfg.validate()
        final = train(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError, DataError, CheckpointError, ModelNotFoundError, TrainingError) as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # e.g. an out_dir that cannot be created
        where = f"{exc.filename}: " if exc.filename else ""
        raise CliError(f"{where}{exc.strerror or exc}") from None
    print(f"final {'adapter' if cfg.lora_r else 'checkpoint'}: {final}")
    if cfg.lora_merge:
        from ..training.checkpoints import MERGED

        print(f"merged checkpoint: {final.parent / MERGED}")
    return 0
