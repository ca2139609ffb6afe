"""How close the engine's reduced-precision variants stay to fp32, on a trained checkpoint:

- int8: int8 weight-only quantization (--quantize int8);
- bf16: bf16 weights (--dtype bfloat16: the model's blocks in bf16);
- bf16-matmul: fp32 weights, the products of prefill and batched decoding in bf16 (--matmul-dtype);
- w8a8: int8 weights and every product int8 x int8, activations quantized per row
  (--quantize int8 --matmul-dtype int8).

Two measures, both through the engine's own forward pass (engine/runner.py):
- teacher-forced: both read the same held-out code; at every position compare the argmax (the token
  greedy decoding would pick) and the logits (relative error ||l' - l|| / ||l||, per position, median
  and 95th percentile), and the held-out loss of each;
- free-running greedy: complete the 50 signature prompts of `bench/signature_prompts.py` with both
  and count the positions where the two token streams agree, and the completions that are identical
  (after the first divergence the contexts differ, so this is the stricter figure).

    python bench/precision_quality.py --variant int8|bf16|bf16-matmul|w8a8 [--model codegen-lm-mini]
        [--data runs/default-model/data]

Without --data, the held-out text is this package's own source code (never seen in training).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_description, write_json
from signature_prompts import PROMPTS

import codegen_lm
from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.engine import Engine, GenerationParams
from codegen_lm.engine.runner import Row, run
from codegen_lm.engine.slot_cache import SlotCache
from codegen_lm.engine.weights import prepare

VARIANTS = {"int8": dict(quantize="int8"), "bf16": dict(dtype=torch.bfloat16), "bf16-matmul": dict(matmul="bfloat16"),
            "w8a8": dict(quantize="int8", matmul="int8")}


class Variant:
    """A model and the engine settings of one precision variant."""

    def __init__(self, name: str, model_name: str, quantize: str | None = None, dtype=torch.float32,
                 matmul: str = "float32") -> None:
        self.name = name
        self.model = CodeGenForCausalLM.from_pretrained(model_name, dtype=dtype, quantize=quantize).eval()
        prepare(self.model, w8a8=matmul == "int8", bf16=matmul == "bfloat16")
        self.matmul = matmul

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> torch.Tensor:
        c = self.model.config
        cache = SlotCache(c.n_layer, 1, c.n_head, c.head_dim, len(ids), self.model.transformer.wte.weight.dtype)
        return run(self.model, cache, [Row(0, 0, ids, "all")], matmul_dtype=getattr(torch, self.matmul)).float()

    def engine(self, tok, max_batch: int) -> Engine:
        return Engine(self.model, tok, max_batch=max_batch, prefix_cache_mb=0, matmul_dtype=self.matmul)


def held_out_windows(data: Path | None, tok, seq_len: int, max_windows: int) -> torch.Tensor:
    if data is not None:
        from codegen_lm.training.data import TokenWindows

        val = TokenWindows(data, "val", seq_len, shuffle=False)
        return val.batch(0, min(max_windows, val.n_windows))
    source = Path(codegen_lm.__file__).parent
    text = "\n".join(p.read_text() for p in sorted(source.rglob("*.py")))
    ids = tok(text)["input_ids"]
    n = min(max_windows, len(ids) // (seq_len + 1))
    return torch.tensor(ids[: n * (seq_len + 1)]).view(n, seq_len + 1)


def teacher_forced(fp32: Variant, other: Variant, windows: torch.Tensor) -> dict:
    agree = total = 0
    rel_errors: list[float] = []
    losses = {"fp32": 0.0, "variant": 0.0}
    for row in windows:
        x, y = row[:-1].tolist(), row[1:]
        a, b = fp32.logits(x), other.logits(x)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        rel_errors += ((b - a).norm(dim=-1) / a.norm(dim=-1)).tolist()
        losses["fp32"] += float(torch.nn.functional.cross_entropy(a, y, reduction="sum"))
        losses["variant"] += float(torch.nn.functional.cross_entropy(b, y, reduction="sum"))
    rel_errors.sort()
    return {"positions": total, "argmax_agreement": agree / total,
            "logits_relative_error_median": statistics.median(rel_errors),
            "logits_relative_error_p95": rel_errors[int(0.95 * (len(rel_errors) - 1))],
            "loss_fp32": losses["fp32"] / total, "loss_variant": losses["variant"] / total}


def free_running(fp32: Variant, other: Variant, tok, max_new_tokens: int) -> dict:
    def complete(variant: Variant) -> list[list[int]]:
        engine = variant.engine(tok, len(PROMPTS))
        params = GenerationParams(max_new_tokens=max_new_tokens, eos_token_ids=[])
        handles = [engine.submit(p, params) for p in PROMPTS]
        return [h.result().outputs[0].token_ids for h in handles]

    a, b = complete(fp32), complete(other)
    same = sum(x == y for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    total = sum(min(len(sa), len(sb)) for sa, sb in zip(a, b))
    prefix = []
    for sa, sb in zip(a, b):
        n = 0
        while n < min(len(sa), len(sb)) and sa[n] == sb[n]:
            n += 1
        prefix.append(n)
    return {"prompts": len(PROMPTS), "tokens_each": max_new_tokens, "token_agreement": same / total,
            "identical_completions": sum(sa == sb for sa, sb in zip(a, b)),
            "mean_common_prefix_tokens": statistics.mean(prefix)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=list(VARIANTS), default="int8")
    parser.add_argument("--model", default="codegen-lm-mini")
    parser.add_argument("--data", type=Path, help="prepared data folder whose 'val' split is the held-out text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, help="default: bench/results/precision_<variant>.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    fp32 = Variant("fp32", args.model)
    other = Variant(args.variant, args.model, **VARIANTS[args.variant])
    tok = CodeGenTokenizerFast.from_pretrained(args.model)
    windows = held_out_windows(args.data, tok, min(args.seq_len, fp32.model.config.n_positions - 1), args.windows)
    result = {"variant": args.variant, "model": args.model, "cpu": cpu_description(),
              "held_out": str(args.data or "codegen_lm source"),
              "teacher_forced": teacher_forced(fp32, other, windows),
              "greedy": free_running(fp32, other, tok, args.max_new_tokens)}
    tf, gr = result["teacher_forced"], result["greedy"]
    print(f"{args.variant} against fp32 on {result['cpu']}")
    print(f"teacher-forced over {tf['positions']:,} held-out positions: argmax agrees on "
          f"{tf['argmax_agreement']:.2%}; logits relative error median {tf['logits_relative_error_median']:.4f}, "
          f"p95 {tf['logits_relative_error_p95']:.4f}; loss fp32 {tf['loss_fp32']:.4f} -> {args.variant} "
          f"{tf['loss_variant']:.4f}")
    print(f"free-running greedy, {gr['prompts']} prompts x {gr['tokens_each']} tokens: {gr['token_agreement']:.2%} "
          f"of positions agree, {gr['identical_completions']}/{gr['prompts']} completions identical, "
          f"mean common prefix {gr['mean_common_prefix_tokens']:.1f} tokens")
    write_json(args.out or Path(__file__).parent / "results" / f"precision_{args.variant}.json", result)


if __name__ == "__main__":
    main()
