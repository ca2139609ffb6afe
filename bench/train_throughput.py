"""Training throughput: our training step against a plain `transformers` training loop, same model
shape, same batch, same optimizer, in one process, timed in interleaved rounds.

Each engine runs --steps optimizer steps per round (forward, cross-entropy, backward, AdamW), after
warm-up steps that are not timed (for the compiled engine this includes compilation); a round's
figure is tokens / wall time, and the table shows the median over --rounds rounds. MFU divides the
model FLOPs (training_flops_per_token) by the fp32 matmul rate measured on the same machine.

    python bench/train_throughput.py [--n-embd 192 --n-layer 6 --n-head 3 --seq-len 1024 --batch-size 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from report import write_json

from codegen_lm import CodeGenConfig, CodeGenForCausalLM
from codegen_lm.checkpoint import hf_state_dict
from codegen_lm.training.loop import LanguageModelLoss, measure_matmul_peak, param_groups, training_flops_per_token


class TransformersLoss(torch.nn.Module):
    """What a plain transformers training loop computes: logits from the model, then cross-entropy."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=window[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-embd", type=int, default=192)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-head", type=int, default=3)
    parser.add_argument("--rotary-dim", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = dict(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head, rotary_dim=args.rotary_dim,
                 vocab_size=args.vocab_size, n_positions=args.seq_len, n_ctx=args.seq_len, bos_token_id=0,
                 eos_token_id=0)
    config = CodeGenConfig(**shape)
    torch.manual_seed(0)
    ours = CodeGenForCausalLM.from_config(config).train()
    theirs = transformers.CodeGenForCausalLM(transformers.CodeGenConfig(**shape)).train()
    missing, unexpected = theirs.load_state_dict(hf_state_dict(ours), strict=False)  # the same weights
    assert not unexpected and all("embed_positions" in k or (k.endswith(".bias") and "attn" in k) for k in missing)
    engines = {
        "transformers (sdpa)": TransformersLoss(theirs),
        "codegen-lm (eager)": LanguageModelLoss(ours),
        "codegen-lm (compiled)": torch.compile(LanguageModelLoss(ours)),
    }
    optimizers = {name: torch.optim.AdamW(param_groups(m, 0.1), lr=1e-4, betas=(0.9, 0.95))
                  for name, m in engines.items()}
    batch = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len + 1),
                          generator=torch.Generator().manual_seed(0))

    def step(name: str) -> None:
        loss = engines[name](batch)
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    for name in engines:  # warm-up (and compilation)
        for _ in range(2):
            step(name)
    peak = measure_matmul_peak(torch.device("cpu"))
    flops = training_flops_per_token(config, args.seq_len)
    tokens = args.batch_size * args.seq_len * args.steps
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name in engines:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            rates[name].append(tokens / (time.perf_counter() - start))
    base = statistics.median(rates["transformers (sdpa)"])
    rows = []
    print(f"model {ours.num_parameters() / 1e6:.1f}M parameters, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.threads} threads, fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; median of {args.rounds} rounds")
    print(f"{'engine':<24} {'tokens/s':>9} {'MFU':>6} {'vs transformers':>16}")
    for name, values in rates.items():
        median = statistics.median(values)
        rows.append({"engine": name, "tokens_per_s": median, "rounds": values, "mfu": median * flops / peak,
                     "ratio_vs_transformers": median / base})
        print(f"{name:<24} {median:>9.0f} {median * flops / peak:>6.1%} {median / base:>15.2f}x")
    write_json(args.out, {"config": shape, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                    "threads": args.threads, "matmul_peak_flops": peak,
                                    "flops_per_token": flops, "results": rows})


if __name__ == "__main__":
    main()
