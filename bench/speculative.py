"""Speculative decoding: acceptance rate and speed-up of prompt lookup, and what a verification pass costs.

1. Prompt lookup on a trained model (default: the bundled codegen-lm-mini) over held-out code: each
   prompt is the first --prompt-tokens tokens of a held-out file, continued greedily for --new-tokens
   tokens, once by the plain engine (batch 1) and once with prompt-lookup speculation. The outputs must be
   identical; we report the fraction of guesses accepted, tokens per target pass and the wall-time
   speed-up (medians over prompts).
2. Verification cost on a real-shaped model (--shape, random weights, fp32 and int8): the time of one
   forward pass over 1, 2, 3, 5 and 9 new tokens after a 256-token context. Speculation pays when
   tokens per pass exceeds cost(k+1) / cost(1); this curve says where that lies for a big model, where
   a pass is dominated by reading the weights.

    python bench/speculative.py [--model codegen-lm-mini] [--shape 350M] [--k 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from report import cpu_description, write_json

import codegen_lm
from codegen_lm import CodeGenConfig, CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.engine import Engine, GenerationParams
from codegen_lm.engine.runner import Row, run
from codegen_lm.engine.slot_cache import SlotCache
from codegen_lm.engine.weights import prepare


def held_out_prompts(tok, count: int, prompt_tokens: int) -> list[list[int]]:
    """Prompts cut from this package's own source files: code the model never saw in training."""
    prompts = []
    for path in sorted(Path(codegen_lm.__file__).parent.rglob("*.py")):
        ids = tok(path.read_text())["input_ids"]
        if len(ids) >= prompt_tokens + 64:
            prompts.append(ids[:prompt_tokens])
    step = max(1, len(prompts) // count)
    return prompts[::step][:count]


def prompt_lookup(model_name: str, count: int, prompt_tokens: int, new_tokens: int, k: int) -> dict:
    model = CodeGenForCausalLM.from_pretrained(model_name, dtype=torch.float32).eval()
    tok = CodeGenTokenizerFast.from_pretrained(model_name)
    prompts = held_out_prompts(tok, count, prompt_tokens)
    engine = Engine(model, tok, max_batch=1, prefix_cache_mb=0, speculative_tokens=k)
    params = GenerationParams(max_new_tokens=new_tokens, eos_token_ids=[])
    speculative = GenerationParams(max_new_tokens=new_tokens, eos_token_ids=[], speculative="prompt-lookup")
    plain_s, spec_s, identical = [], [], 0
    engine.submit(prompts[0], params).result()  # warm-up
    engine.submit(prompts[0], speculative).result()
    before = engine.stats().speculative
    for prompt in prompts:
        start = time.perf_counter()
        plain = engine.submit(prompt, params).result().outputs[0].token_ids
        plain_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        spec = engine.submit(prompt, speculative).result().outputs[0].token_ids
        spec_s.append(time.perf_counter() - start)
        identical += spec == plain
    after = engine.stats().speculative
    accepted, proposed, passes = (getattr(after, f) - getattr(before, f) for f in ("accepted", "proposed", "passes"))
    speedups = sorted(p / s for p, s in zip(plain_s, spec_s))
    return {"model": model_name, "prompts": len(prompts), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
            "k": k, "identical_outputs": identical, "acceptance_rate": accepted / max(1, proposed),
            "tokens_per_pass": (accepted + passes) / max(1, passes), "speedup_median": statistics.median(speedups),
            "speedup_min": speedups[0], "speedup_max": speedups[-1],
            "plain_tok_s": len(prompts) * new_tokens / sum(plain_s), "speculative_tok_s": len(prompts) * new_tokens
            / sum(spec_s)}


@torch.inference_mode()
def verify_cost(shape: str, quantize: str | None, context: int = 256, repeats: int = 7) -> dict:
    config = CodeGenConfig.from_pretrained(f"Salesforce/codegen-{shape}-mono")
    torch.manual_seed(0)
    model = CodeGenForCausalLM(config).eval()
    if quantize:
        from codegen_lm.quantize import quantize_model

        quantize_model(model)
    prepare(model)  # as the engine does
    c = model.config
    cache = SlotCache(c.n_layer, 1, c.n_head, c.head_dim, context + 16, torch.float32, "cpu", initial_len=context + 16)
    run(model, cache, [Row(0, 0, torch.randint(0, c.vocab_size, (context,)).tolist())])
    times = {}
    for new in (1, 2, 3, 5, 9):
        runs = []
        for _ in range(repeats):
            x = torch.randint(0, c.vocab_size, (new,)).tolist()
            start = time.perf_counter()
            run(model, cache, [Row(0, context, x, "all")])
            runs.append(time.perf_counter() - start)
        times[new] = statistics.median(runs)
    return {"shape": shape, "weights": quantize or "fp32", "context": context,
            "seconds": {str(n): t for n, t in times.items()},
            "relative_cost": {str(n): t / times[1] for n, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="codegen-lm-mini")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--shape", default="350M", help="real shape for the verification-cost curve ('' skips it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speculative.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"cpu": cpu_description(),
              "prompt_lookup": prompt_lookup(args.model, args.prompts, args.prompt_tokens, args.new_tokens, args.k)}
    print(f"on {result['cpu']}, {args.threads} threads")
    p = result["prompt_lookup"]
    print(f"prompt lookup (k={p['k']}) on {p['model']}, {p['prompts']} held-out prompts x {p['new_tokens']} tokens: "
          f"{p['identical_outputs']}/{p['prompts']} outputs identical to plain greedy; "
          f"{p['acceptance_rate']:.0%} of guesses accepted, {p['tokens_per_pass']:.2f} tokens per pass; "
          f"speed-up median {p['speedup_median']:.2f}x (min {p['speedup_min']:.2f}, max {p['speedup_max']:.2f}); "
          f"{p['plain_tok_s']:.0f} -> {p['speculative_tok_s']:.0f} tok/s")
    if args.shape:
        result["verify_cost"] = [verify_cost(args.shape, q) for q in (None, "int8")]
        print(f"\ncost of one pass over n new tokens relative to n=1 (codegen-{args.shape} shape, 256 cached):")
        print(f"{'weights':<8}" + "".join(f"{'n=' + n:>8}" for n in result["verify_cost"][0]["relative_cost"]))
        for row in result["verify_cost"]:
            print(f"{row['weights']:<8}" + "".join(f"{v:>8.2f}" for v in row["relative_cost"].values())
                  + f"   (n=1: {row['seconds']['1'] * 1e3:.0f} ms)")
    write_json(args.out, result)


if __name__ == "__main__":
    sys.exit(main())
