"""The training loop: one flat function, every step visible (in the spirit of nanoGPT's train.py).

Single process, or one process per device under `torchrun` (DDP or FSDP2). The batch of optimizer
step s is a pure function of (seed, s), the optimizer, schedule and RNG states go into every
checkpoint, so `--resume` after a crash continues exactly as if nothing had happened.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import find_weight_files, load_weights
from ..config import CodeGenConfig
from ..lora import apply_lora, load_adapter, lora_state_dict, merged_state_dict, parse_targets, save_adapter
from ..model import CodeGenForCausalLM
from ..tokenizer import CodeGenTokenizerFast
from . import checkpoints as C
from . import distributed as D
from .checkpoints import CHECKPOINTS, FINAL, LOG, MERGED, STATE, TrainingError
from .config import TrainConfig
from .data import TOKENIZER_DIR, TokenWindows, read_manifest

T = TypeVar("T")


class LanguageModelLoss(nn.Module):
    """Next-token cross-entropy of a window of seq_len + 1 tokens: what DDP/FSDP/compile wrap."""

    def __init__(self, model: CodeGenForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        logits = self.model(window[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at max_steps (as a factor of lr)."""
    if cfg.lr == 0:
        return 0.0
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lr = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    return lr / cfg.lr


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear and embedding weights); none on biases and LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_norm = ".ln_" in name or name.split(".")[-2].startswith("ln")
        (no_decay if name.endswith(".bias") or is_norm else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def training_flops_per_token(config: CodeGenConfig, seq_len: int, lora_params: int = 0) -> float:
    """Forward + backward FLOPs per token: 6 x the matmul parameters (all but the embedding lookup)
    plus causal attention, 6 * layers * n_embd * seq_len (half of PaLM's 12 * ..., since a causal
    kernel computes only the scores below the diagonal). With LoRA (lora_params > 0) the frozen
    weights get no weight gradients: 4 x theirs (forward and input gradients), 6 x the adapters'."""
    E, L, V, inner = config.n_embd, config.n_layer, config.vocab_size, config.inner_dim
    per_layer = 3 * E * E + E * E + 2 * E * inner
    factor = 4 if lora_params else 6
    return factor * (L * per_layer + E * V) + 6 * lora_params + 6 * L * E * seq_len


def measure_matmul_peak(device: torch.device, size: int = 2048, repeats: int = 8) -> float:
    """FLOP/s of a large fp32 matmul on this process's share of the machine: the MFU denominator.

    On the CPU this is the faster of the BLAS matmul and oneDNN's (on some x86 CPUs, e.g. AMD with
    AVX-512, oneDNN runs twice as fast as MKL's sgemm), so MFU is not flattered by a slow BLAS."""
    g = torch.Generator(device=device).manual_seed(0)  # leave the global RNG (dropout's) untouched
    a = torch.randn(size, size, device=device, generator=g)
    b = torch.randn(size, size, device=device, generator=g)
    candidates = [lambda: a @ b]
    if device.type == "cpu" and torch.backends.mkldnn.is_available():
        a_dnn, b_dnn = a.to_mkldnn(), b.to_mkldnn()
        candidates.append(lambda: torch._C._nn.mkldnn_linear(a_dnn, b_dnn, None))
    best = 0.0
    for run in candidates:
        try:
            for _ in range(2):
                run()
        except RuntimeError:
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int) -> CodeGenForCausalLM:
    if cfg.init_from:
        model = CodeGenForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32)
    else:
        if cfg.model:
            config = CodeGenConfig.from_pretrained(cfg.model)
        else:
            config = CodeGenConfig(
                n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, rotary_dim=cfg.rotary_dim,
                n_inner=cfg.n_inner, n_positions=cfg.n_positions, n_ctx=cfg.n_positions,
                vocab_size=cfg.vocab_size or -(-vocab_size // 64) * 64,
                tie_word_embeddings=cfg.tie_word_embeddings,
                bos_token_id=eos_id, eos_token_id=eos_id,
            )
        config.bos_token_id = config.eos_token_id = eos_id
        config.torch_dtype = "float32"
        config.validate()
        torch.manual_seed(cfg.seed)
        model = CodeGenForCausalLM.from_config(config)
    set_dropout(model, cfg.dropout)
    if cfg.lora_r:  # after set_dropout, which would set the adapters' dropout too
        torch.manual_seed(cfg.seed)  # every process draws the same lora_A (FSDP does not broadcast it)
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    if model.config.vocab_size < vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the data's "
                         f"tokenizer ({vocab_size} tokens)")
    if cfg.seq_len > model.config.n_positions:
        raise ValueError(f"seq_len={cfg.seq_len} exceeds the model's n_positions={model.config.n_positions}")
    return model


def set_dropout(model: CodeGenForCausalLM, p: float) -> None:
    """Use dropout probability p everywhere (embeddings, attention, residuals), config included."""
    model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = p
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = p


def _autocast(cfg: TrainConfig, device: torch.device) -> tuple[contextlib.AbstractContextManager, bool]:
    """(autocast context, whether a GradScaler is needed)."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), False
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype), precision == "fp16"


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) a training run; returns the folder of the final checkpoint."""
    cfg.validate()
    env = D.setup(cfg.device)
    try:
        folder = _train(cfg, env, resume)
        D.barrier(env)  # every rank is done before any tears its process group down (gloo aborts otherwise)
        return folder
    finally:
        D.teardown(env)


def _train(cfg: TrainConfig, env: D.DistEnv, resume: bool) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    ckpt_root = out / CHECKPOINTS
    data_dir = Path(cfg.data)
    manifest = read_manifest(data_dir)
    tokenizer = CodeGenTokenizerFast.from_pretrained(data_dir / TOKENIZER_DIR)
    train_data = TokenWindows(data_dir, "train", cfg.seq_len, seed=cfg.seed)
    val_data = TokenWindows(data_dir, "val", cfg.seq_len, shuffle=False) if manifest["totals"].get("val") else None
    B, world, accum = cfg.batch_size, env.world_size, cfg.grad_accum
    global_batch = B * world * accum

    picked: dict[str, Any] = {}  # rank 0's trainer state, read while checking the checkpoint
    found = _on_main(env, lambda: _find_resume_point(out, resume, picked))
    resume_from = ckpt_root / found if found else None
    model = build_model(cfg, train_data.vocab_size, tokenizer.eos_token_id)
    state: dict[str, Any] | None = None
    if resume_from is not None:
        state = picked.pop("state", None) or torch.load(resume_from / STATE, map_location="cpu", weights_only=True)
        _check_resumable(state, cfg, global_batch, manifest)
        if cfg.lora_r:
            load_adapter(model, resume_from, merge=False, trainable=True)
        else:
            load_weights(model, find_weight_files(resume_from))
    model.to(env.device)
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
    net = LanguageModelLoss(model)
    wrapped = D.wrap(net, list(model.transformer.h), env, cfg.parallel)
    optimizer = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    start_step = 0
    if state is not None:
        D.load_optimizer_state(net, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = state["step"]
        if len(state["rng"]) == world:
            torch.set_rng_state(state["rng"][env.rank])
        else:
            torch.manual_seed(cfg.seed + 7919 * env.rank + start_step)
    else:
        torch.manual_seed(cfg.seed + 7919 * env.rank)  # dropout differs per rank, repeatably
    autocast, needs_scaler = _autocast(cfg, env.device)
    scaler = torch.amp.GradScaler(env.device.type) if needs_scaler else None
    step_fn = _compiled(wrapped) if cfg.compile else wrapped

    # Only checkpoints of this run's history are pruned: those up to the one it resumes from, and those
    # it writes; a fresh start leaves the checkpoints it found alone (apart from replacing the steps it saves).
    own = {p.name for p in C.step_folders(ckpt_root) if (C.step_of(p) or 0) <= start_step} if state else set()
    if env.is_main:
        with C.writing(out):
            out.mkdir(parents=True, exist_ok=True)
        C.trim_log(out / LOG, start_step)
        with C.writing(out / "train_config.json"):
            C.write_atomic(out / "train_config.json", (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
    lora_params = sum(p.numel() for p in lora_state_dict(model).values())
    flops_per_token = training_flops_per_token(model.config, cfg.seq_len, lora_params)
    peak = cfg.peak_flops or measure_matmul_peak(env.device)
    tokens_per_step = global_batch * cfg.seq_len
    if env.is_main:
        n_params = model.num_parameters()
        mode = cfg.parallel if world > 1 else "single"
        if lora_params:
            mode += f"; LoRA r={cfg.lora_r} on {cfg.lora_targets}: {lora_params:,} trained"
        print(f"codegen-lm train: {n_params:,} parameters, {world} process(es) ({mode}),"
              f" global batch {global_batch} x {cfg.seq_len} tokens, steps {start_step}->{cfg.max_steps}, "
              f"{train_data.total:,} training tokens", file=sys.stderr)

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="training", unit="step",
               disable=not (cfg.progress and env.is_main), dynamic_ncols=True)
    ddp = isinstance(wrapped, nn.parallel.DistributedDataParallel)
    window_start, window_tokens = time.perf_counter(), 0
    run_start = time.perf_counter()
    wrapped.train()
    for step in range(start_step, cfg.max_steps):
        loss_sum = torch.zeros((), device=env.device)
        for micro in range(accum):
            first = step * global_batch + micro * B * world + env.rank * B
            batch = train_data.batch(first, B).to(env.device, non_blocking=True)
            sync = contextlib.nullcontext() if not ddp or micro == accum - 1 else wrapped.no_sync()
            with sync:
                with autocast:
                    loss = step_fn(batch)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            loss_sum += loss.detach()
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        window_tokens += tokens_per_step
        train_loss, norm = D.all_mean([float(loss_sum) / accum, float(grad_norm.full_tensor() if hasattr(
            grad_norm, "full_tensor") else grad_norm)], env)
        bar.update(1)
        if done % cfg.log_every == 0 or done == cfg.max_steps or done == 1:  # the same steps after a resume
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / elapsed
            record = {"step": done, "loss": train_loss, "lr": lr, "grad_norm": norm, "tokens": done * tokens_per_step,
                      "tokens_per_s": tps, "mfu": tps / world * flops_per_token / peak,
                      "time": time.perf_counter() - run_start}
            _log(out, env, record)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}")
            window_start, window_tokens = time.perf_counter(), 0
        if val_data is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            val_loss = evaluate(wrapped, val_data, cfg, env, autocast)
            _log(out, env, {"step": done, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
            if env.is_main:
                plot_losses(out / LOG, out / "loss.png")
            wrapped.train()
            window_start, window_tokens = time.perf_counter(), 0  # evaluation is not training throughput
        if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.max_steps):  # the last: to extend a run
            _save(ckpt_root / f"step-{done:07d}", model, net, optimizer, scheduler, done, global_batch, manifest,
                  cfg, env, tokenizer, training_state=True)
            own.add(f"step-{done:07d}")
            if env.is_main:
                C.prune(ckpt_root, own, cfg.keep_checkpoints)
            window_start, window_tokens = time.perf_counter(), 0
    bar.close()
    final = out / FINAL
    _save(final, model, net, optimizer, scheduler, cfg.max_steps, global_batch, manifest, cfg, env, tokenizer,
          training_state=False)
    if cfg.lora_merge:
        _save(out / MERGED, model, net, optimizer, scheduler, cfg.max_steps, global_batch, manifest, cfg, env,
              tokenizer, training_state=False, merge=True)
    if env.is_main:
        plot_losses(out / LOG, out / "loss.png")
    return final


def _compiled(module: nn.Module) -> Any:
    """torch.compile(module), falling back to eager (with a warning) if compilation fails."""
    compiled = torch.compile(module)
    state = {"fn": compiled}

    def call(batch: torch.Tensor) -> torch.Tensor:
        try:
            return state["fn"](batch)
        except Exception as exc:
            if state["fn"] is module:
                raise
            warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); training eagerly", stacklevel=2)
            state["fn"] = module
            return module(batch)

    return call


@torch.no_grad()
def evaluate(wrapped: nn.Module, val: TokenWindows, cfg: TrainConfig, env: D.DistEnv,
             autocast: contextlib.AbstractContextManager) -> float:
    """Mean held-out loss over the first eval_batches x batch_size x world windows of the val split
    (every rank runs the same number of batches, as FSDP requires)."""
    wrapped.eval()
    B, world = cfg.batch_size, env.world_size
    batches = max(1, min(cfg.eval_batches, -(-val.n_windows // (B * world))))
    total = 0.0
    for j in range(batches):
        first = j * B * world + env.rank * B
        rows = [val.batch(k % val.n_windows, 1) for k in range(first, first + B)]
        with autocast:
            total += float(wrapped(torch.cat(rows).to(env.device)))
    return D.all_mean([total / batches], env)[0]


def _save(folder: Path, model: CodeGenForCausalLM, net: nn.Module, optimizer: torch.optim.Optimizer,
          scheduler: Any, step: int, global_batch: int, manifest: dict[str, Any], cfg: TrainConfig,
          env: D.DistEnv, tokenizer: CodeGenTokenizerFast, training_state: bool, merge: bool = False) -> None:
    """Write a checkpoint that a kill or a full disk cannot leave half-written (see checkpoints.py; rank 0
    writes, gathering the state is collective, and a failure on rank 0 stops every rank). A LoRA run's
    checkpoints hold its adapter (peft's files) instead of the weights; merge: the weights with the
    adapter folded in."""
    full = D.full_model_state(net, env)
    weights = {k.removeprefix("model."): v for k, v in full.items()}
    optim = D.full_optimizer_state(net, optimizer) if training_state else None
    rng = D.gather_objects(torch.get_rng_state(), env) if training_state else None
    lora = bool(cfg.lora_r)

    def fill(tmp: Path) -> None:
        if lora and merge:
            model.save_pretrained(tmp, state_dict=merged_state_dict(model, weights))
        elif lora:
            save_adapter(model, tmp, state_dict=weights, base_model_name_or_path=cfg.init_from or cfg.model or None)
        else:
            model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        (tmp / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if training_state:
            with open(tmp / STATE, "wb") as f:  # a file object, so that an ENOSPC keeps its errno
                torch.save({"step": step, "samples": step * global_batch, "global_batch": global_batch,
                            "seq_len": cfg.seq_len, "seed": cfg.seed, "data_sha256": _data_hash(manifest),
                            "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rng,
                            "lora": _lora_settings(cfg)}, f)

    def write() -> None:
        log = Path(cfg.out_dir) / LOG
        if log.exists():  # the records up to this step must outlive the checkpoint that ends them
            with C.writing(log), open(log, "rb") as f:
                os.fsync(f.fileno())
        C.write_checkpoint(folder, fill, update_latest=training_state)

    _on_main(env, write)


def _on_main(env: D.DistEnv, fn: Callable[[], T]) -> T:
    """fn() on rank 0, its result (or its error, as a TrainingError) on every rank."""
    result: Any = None
    failure: BaseException | None = None
    if env.is_main:
        try:
            result = fn()
        except BaseException as exc:
            failure = exc
    if not env.distributed:
        if failure is not None:
            raise failure
        return result
    message = None
    if failure is not None:
        message = str(failure) if isinstance(failure, TrainingError) else f"rank 0 failed ({type(failure).__name__})"
    result, message = D.broadcast_object((result, message), env)
    if failure is not None:
        raise failure
    if message is not None:
        raise TrainingError(message)
    return result


def _find_resume_point(out: Path, resume: bool, picked: dict[str, Any]) -> str | None:
    """Tidy the run folder after a crash (on every start) and pick the checkpoint to resume from."""
    root = out / CHECKPOINTS
    with C.writing(root):
        C.recover(out)
    found = C.step_folders(root)
    if not resume:
        if found:
            C.warn(f"{root} holds checkpoints up to {found[-1].name} that this fresh run does not continue "
                   "(pass --resume for that); it replaces those of the steps it saves and prunes none of the others")
        return None
    chosen = C.select_checkpoint(root)
    if chosen is None:
        if not found:
            print(f"codegen-lm train: no checkpoint in {root} to resume from; starting fresh", file=sys.stderr)
        return None
    picked["state"] = chosen[1]
    name = chosen[0].name
    if C.read_pointer(root) != name:  # point `latest` at what this run continues, as a save would
        with C.writing(root / C.LATEST):
            C.write_atomic(root / C.LATEST, f"{name}\n".encode())
    return name


def _data_hash(manifest: dict[str, Any]) -> str:
    import hashlib

    shards = [(s["name"], s["sha256"]) for s in manifest["shards"]]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


def _check_resumable(state: dict[str, Any], cfg: TrainConfig, global_batch: int, manifest: dict[str, Any]) -> None:
    """An exact continuation needs the same data, batch geometry, seed and LoRA settings."""
    for key, now in (("global_batch", global_batch), ("seq_len", cfg.seq_len), ("seed", cfg.seed),
                     ("data_sha256", _data_hash(manifest)), ("lora", _lora_settings(cfg))):
        if state.get(key) != now:
            raise ValueError(f"cannot resume: the checkpoint has {key}={state.get(key)!r}, this run {now!r} "
                             "(resume with the settings the run started with)")


def _lora_settings(cfg: TrainConfig) -> dict[str, Any] | None:
    """What a LoRA checkpoint must agree on to be resumed (None for training every weight)."""
    if not cfg.lora_r:
        return None
    return {"r": cfg.lora_r, "alpha": float(cfg.lora_alpha), "targets": parse_targets(cfg.lora_targets)}


def _log(out: Path, env: D.DistEnv, record: dict[str, Any]) -> None:
    if env.is_main:
        C.append_log(out / LOG, record)


def plot_losses(log: Path, png: Path) -> None:
    """Training and held-out loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = C.read_log(log)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="held-out", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_name(png.name + ".tmp.png")
    try:
        with C.writing(png):
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, png)
    finally:
        plt.close(fig)
