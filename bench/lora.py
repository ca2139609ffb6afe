"""LoRA against full fine-tuning: peak memory and training throughput of the same model on this CPU.

The model is Salesforce/codegen-350M-mono's shape with random weights (what fine-tuning starts from
does not change the cost of a step). Each mode runs in a fresh process, so that its peak RSS is its
own: the model is built, then --steps training steps are timed one by one after --warmup untimed ones
(forward, cross-entropy, backward, gradient clipping, AdamW: the training loop's step, through its
own LanguageModelLoss and param_groups). LoRA puts rank --lora-r adapters on --lora-targets and
freezes every other weight. A mode's tokens/s is batch x seq_len over the median step time; memory
is the process's peak RSS (VmHWM) and what it grew by after the model was built (gradients,
optimizer state, activations). --rounds > 1 alternates the modes and takes the median over all steps.

    python bench/lora.py [--batch-size 1 --seq-len 512 --steps 5 --threads 2] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import cpu_description, write_json

REPO = Path(__file__).resolve().parents[1]
MODES = ("full", "lora")
SMOKE_SHAPE = dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=16, vocab_size=1024, n_positions=128, n_ctx=128,
                   bos_token_id=0, eos_token_id=0)


def status(key: str) -> int:
    """A /proc/self/status figure (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def worker(args: argparse.Namespace) -> None:
    """One mode in this process: build, train, print one JSON line of figures."""
    import torch

    from codegen_lm import CodeGenConfig, CodeGenForCausalLM
    from codegen_lm.lora import apply_lora
    from codegen_lm.training.loop import LanguageModelLoss, param_groups

    torch.set_num_threads(args.threads)
    if args.smoke:
        config = CodeGenConfig(**SMOKE_SHAPE)
    else:
        config = CodeGenConfig.from_pretrained("Salesforce/codegen-350M-mono")
    torch.manual_seed(0)
    model = CodeGenForCausalLM.from_config(config).train()
    if args.worker == "lora":
        apply_lora(model, r=args.lora_r, alpha=args.lora_alpha, targets=args.lora_targets)
    net = LanguageModelLoss(model)
    optimizer = torch.optim.AdamW(param_groups(net, 0.1), lr=1e-5, betas=(0.9, 0.95))
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))
    rss_model = status("VmRSS")

    def step() -> None:
        loss = net(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if isinstance(t, torch.Tensor))
    print(json.dumps({"mode": args.worker, "parameters": model.num_parameters(), "trainable": trainable,
                      "step_seconds": times, "rss_model_bytes": rss_model, "peak_rss_bytes": status("VmHWM"),
                      "optimizer_state_bytes": optimizer_bytes}))


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--batch-size", str(args.batch_size), "--seq-len",
           str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
           str(args.threads), "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
           "--lora-targets", args.lora_targets, *(["--smoke"] if args.smoke else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"{mode} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--lora-targets", default="qkv_proj,out_proj,fc_in,fc_out")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 2 steps: checks that the script runs")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default bench/results/lora.json; with --smoke, a temporary file)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.seq_len, args.batch_size = 2, 1, min(args.seq_len, 64), min(args.batch_size, 2)
    if args.worker:
        worker(args)
        return
    default = Path("/tmp/codegen-lm-bench/lora_smoke.json") if args.smoke else REPO / "bench/results/lora.json"
    out = args.out or default
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            runs[mode].append(run_mode(mode, args))
    tokens = args.batch_size * args.seq_len
    rows = []
    for mode in MODES:
        steps = [t for r in runs[mode] for t in r["step_seconds"]]
        first = runs[mode][0]
        median_step = statistics.median(steps)
        peak = statistics.median(r["peak_rss_bytes"] for r in runs[mode])
        grown = statistics.median(r["peak_rss_bytes"] - r["rss_model_bytes"] for r in runs[mode])
        rows.append({"mode": mode, "parameters": first["parameters"], "trainable": first["trainable"],
                     "median_step_seconds": median_step, "tokens_per_s": tokens / median_step,
                     "peak_rss_bytes": peak, "rss_model_bytes": first["rss_model_bytes"],
                     "peak_over_model_bytes": grown, "optimizer_state_bytes": first["optimizer_state_bytes"],
                     "step_seconds": steps})
    full, lora = rows
    shape = "tiny (smoke)" if args.smoke else "codegen-350M-mono shape"
    print(f"{cpu_description()}, {args.threads} threads; {shape}, random fp32 weights; batch {args.batch_size} x "
          f"{args.seq_len} tokens; LoRA r={args.lora_r}, alpha={args.lora_alpha:g} on {args.lora_targets}; "
          f"medians of {len(full['step_seconds'])} steps")
    print(f"{'mode':<6} {'trainable':>13} {'tokens/s':>9} {'step s':>8} {'peak RSS GB':>12} "
          f"{'above model GB':>15} {'optimizer MB':>13}")
    for row in rows:
        print(f"{row['mode']:<6} {row['trainable']:>13,} {row['tokens_per_s']:>9.1f} "
              f"{row['median_step_seconds']:>8.2f} {row['peak_rss_bytes'] / 1e9:>12.2f} "
              f"{row['peak_over_model_bytes'] / 1e9:>15.2f} {row['optimizer_state_bytes'] / 1e6:>13.1f}")
    print(f"LoRA / full: tokens/s {lora['tokens_per_s'] / full['tokens_per_s']:.2f}x, peak RSS "
          f"{lora['peak_rss_bytes'] / full['peak_rss_bytes']:.2f}x, memory above the model "
          f"{lora['peak_over_model_bytes'] / max(1, full['peak_over_model_bytes']):.2f}x")
    write_json(out, {"cpu": cpu_description(), "threads": args.threads, "shape": shape,
                     "batch_size": args.batch_size, "seq_len": args.seq_len, "lora_r": args.lora_r,
                     "lora_alpha": args.lora_alpha, "lora_targets": args.lora_targets, "rounds": args.rounds,
                     "results": rows})


if __name__ == "__main__":
    main()
