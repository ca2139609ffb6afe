"""TrainConfig: every knob of a training run, from a TOML file and/or command-line flags."""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class TrainConfig:
    """A training run. `model` is a released name (its shape, random init), a checkpoint to fine-tune
    (with init_from), or empty to build the shape given by the model_* fields."""

    # what to train
    data: str = ""  # a folder made by `codegen-lm data prepare`
    out_dir: str = "runs/train"
    model: str = ""  # released name ("Salesforce/codegen-350M-mono") or a config.json / checkpoint folder
    init_from: str = ""  # checkpoint to fine-tune (folder or hub name); overrides `model`
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    rotary_dim: int = 32
    n_inner: int | None = None
    n_positions: int = 1024
    vocab_size: int | None = None  # default: the tokenizer's size rounded up to a multiple of 64
    tie_word_embeddings: bool = False
    dropout: float = 0.0
    # LoRA: with lora_r > 0, train rank-r adapters on the lora_targets Linear layers of the model (usually
    # init_from's pretrained weights), every other weight frozen; checkpoints then hold the adapter (peft's format)
    lora_r: int = 0
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0
    lora_targets: str = "qkv_proj,out_proj,fc_in,fc_out"
    lora_merge: bool = False  # also write OUT/merged: the model with the final adapter folded in
    # batch and length
    seq_len: int = 256
    batch_size: int = 16  # sequences per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 1000
    # optimizer and schedule
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables it
    # execution
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: str = "auto"  # auto = bf16 autocast on CUDA (when supported), fp32 on CPU; or fp32, bf16, fp16
    compile: bool = False  # torch.compile the model (falls back to eager if compilation fails)
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # under torchrun: ddp or fsdp (FSDP2 fully_shard)
    threads: int = 0  # torch threads per process; 0 = PyTorch's default
    seed: int = 0
    peak_flops: float = 0.0  # the MFU denominator per process, FLOP/s; 0: measure a large fp32 matmul at start
    # bookkeeping
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic held-out loss
    eval_batches: int = 20
    save_every: int = 500  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"invalid training config: {name}={getattr(self, name)!r}: {why}")

        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_batches", "keep_checkpoints",
                     "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        for name in ("warmup_steps", "eval_every", "save_every", "threads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                fail(name, "must be an integer >= 0")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "eps", "peak_flops"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                fail(name, "must be a number >= 0")
        if self.min_lr > self.lr:
            fail("min_lr", f"must not exceed lr={self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, "must be in [0, 1)")
        if not 0 <= self.dropout < 1:
            fail("dropout", "must be in [0, 1)")
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 0:
            fail("lora_r", "must be an integer >= 0 (0: train every weight)")
        def real(value: object) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not real(self.lora_alpha) or self.lora_alpha <= 0:
            fail("lora_alpha", "must be a number > 0")
        if not real(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            fail("lora_dropout", "must be in [0, 1)")
        if self.lora_r and not (isinstance(self.lora_targets, str) and self.lora_targets.replace(",", "").strip()):
            fail("lora_targets", "must name the Linear layers to adapt, e.g. qkv_proj,out_proj,fc_in,fc_out")
        if self.lora_merge and not self.lora_r:
            fail("lora_merge", "needs LoRA training (lora_r > 0)")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            fail("precision", "must be auto, fp32, bf16 or fp16")
        if self.parallel not in ("ddp", "fsdp"):
            fail("parallel", "must be ddp or fsdp")
        if not self.data:
            fail("data", "a prepared data folder is required")
        if self.seq_len > self.n_positions and not (self.model or self.init_from):
            fail("seq_len", f"must not exceed n_positions={self.n_positions}")

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a TOML file; tables ([model], [optimizer], ...) are only for grouping and are flattened."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"training config {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from None
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if isinstance(value, dict):
                flat.update(value)
            else:
                flat[key] = value
        return cls.from_dict(flat, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "training config") -> TrainConfig:
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)}")
        config = cls()
        for key, value in data.items():
            setattr(config, key, value)
        return config

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("extra")
        return out

    @staticmethod
    def field_types() -> dict[str, Any]:
        return {f.name: f.type for f in fields(TrainConfig) if f.name != "extra"}
