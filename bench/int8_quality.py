"""How close int8 weight-only quantization stays to the fp32 model, on a trained checkpoint.

Two measures:
- teacher-forced: both models read the same held-out code; at every position compare the argmax
  (the token greedy decoding would pick) and the logits (relative error ||l8 - l|| / ||l||, per
  position, median and 95th percentile), and the held-out loss of each;
- free-running greedy: complete the 50 signature prompts of `bench/signature_prompts.py` with both
  models and count the positions where the two token streams agree, and the completions that are
  identical (after the first divergence the contexts differ, so this is the stricter figure).

    python bench/int8_quality.py [--model codegen-lm-mini] [--data runs/default-model/data]

Without --data, the held-out text is this package's own source code (never seen in training).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import write_json
from signature_prompts import PROMPTS

import codegen_lm
from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.engine import Engine, GenerationParams


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


@torch.inference_mode()
def teacher_forced(fp32, int8, windows: torch.Tensor) -> dict:
    agree = total = 0
    rel_errors: list[float] = []
    losses = {"fp32": 0.0, "int8": 0.0}
    for row in windows:
        x, y = row[None, :-1], row[1:]
        a = fp32(x, use_cache=False).logits[0].float()
        b = int8(x, use_cache=False).logits[0].float()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        rel_errors += ((b - a).norm(dim=-1) / a.norm(dim=-1)).tolist()
        losses["fp32"] += float(torch.nn.functional.cross_entropy(a, y, reduction="sum"))
        losses["int8"] += float(torch.nn.functional.cross_entropy(b, y, reduction="sum"))
    rel_errors.sort()
    return {"positions": total, "argmax_agreement": agree / total,
            "logits_relative_error_median": statistics.median(rel_errors),
            "logits_relative_error_p95": rel_errors[int(0.95 * (len(rel_errors) - 1))],
            "loss_fp32": losses["fp32"] / total, "loss_int8": losses["int8"] / total}


def free_running(fp32, int8, tok, max_new_tokens: int) -> dict:
    def complete(model) -> list[list[int]]:
        engine = Engine(model, tok, max_batch=len(PROMPTS))
        params = GenerationParams(max_new_tokens=max_new_tokens, eos_token_ids=[])
        handles = [engine.submit(p, params) for p in PROMPTS]
        return [h.result().outputs[0].token_ids for h in handles]

    a, b = complete(fp32), complete(int8)
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
    parser.add_argument("--model", default="codegen-lm-mini")
    parser.add_argument("--data", type=Path, help="prepared data folder whose 'val' split is the held-out text")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "int8_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    fp32 = CodeGenForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    int8 = CodeGenForCausalLM.from_pretrained(args.model, dtype=torch.float32, quantize="int8").eval()
    tok = CodeGenTokenizerFast.from_pretrained(args.model)
    windows = held_out_windows(args.data, tok, min(args.seq_len, fp32.config.n_positions - 1), args.windows)
    result = {"model": args.model, "held_out": str(args.data or "codegen_lm source"),
              "teacher_forced": teacher_forced(fp32, int8, windows),
              "greedy": free_running(fp32, int8, tok, args.max_new_tokens)}
    tf, gr = result["teacher_forced"], result["greedy"]
    print(f"teacher-forced over {tf['positions']:,} held-out positions: argmax agrees on "
          f"{tf['argmax_agreement']:.2%}; logits relative error median {tf['logits_relative_error_median']:.4f}, "
          f"p95 {tf['logits_relative_error_p95']:.4f}; loss fp32 {tf['loss_fp32']:.4f} -> int8 {tf['loss_int8']:.4f}")
    print(f"free-running greedy, {gr['prompts']} prompts x {gr['tokens_each']} tokens: {gr['token_agreement']:.2%} "
          f"of positions agree, {gr['identical_completions']}/{gr['prompts']} completions identical, "
          f"mean common prefix {gr['mean_common_prefix_tokens']:.1f} tokens")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
