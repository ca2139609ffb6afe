"""Interactive use: what the prefix cache and chunked prefill buy, side by side in one run.

A codegen-350M-mono-shaped checkpoint with random fp32 weights (saved by transformers), 2 threads.
Each configuration gets a fresh engine; configurations alternate over --rounds rounds and the
figures are medians across rounds.

1. Editor trace. A 1,500-token Python file (this package's own source) completed at 30 successive
   cursor positions as a user types: request i is the file up to the cursor, the cursor a few
   characters further each time (max_new_tokens 16, greedy). Time to first token (submit -> first
   token decided), p50 and p95 over the 30 requests, with the prefix cache and without.
2. Multi-turn trace. 8 turns of a conversation: each turn adds a ~60-token instruction (a comment)
   to the history, generates 80 tokens, and appends them to the history; the next turn sends it all
   again. Total time to first token over the turns (which is the prefill: with 80 new tokens cached
   per turn, what is left to compute is the new instruction). Prompts are token ids, so that random
   weights' output does not change when re-tokenised.
3. Streams while a long prompt arrives. 8 greedy streams are decoding when an 1,800-token prompt is
   submitted; the largest gap between two tokens of a running stream until that prompt's first
   token, against the median step time before it arrived: chunked prefill (the default, chunks sized
   by measurement) vs the prompt in one piece.

    python bench/interactive.py [--rounds 3] [--shape 350M] [--out bench/results/interactive.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import codegen_lm  # before torch: see codegen_lm/__init__.py

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import build_checkpoint
from report import cpu_description, write_json

from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.engine import Engine, GenerationParams

INSTRUCTIONS = [
    "# Read a CSV file of transactions with columns date, account and amount, skipping malformed rows",
    "# Group the transactions by account and compute the total, the mean and the largest amount per account",
    "# Sort the accounts by their total, largest first, and keep only the ten with the most transactions",
    "# Write a function that formats an amount in euros with two decimals and a thousands separator",
    "# Print a table of the accounts with their totals, aligned in columns, with a header row and a rule",
    "# Add a command line interface with argparse: the input file, an optional output file and a limit",
    "# Write the table to the output file as JSON when one is given, and to standard output otherwise",
    "# Add tests with pytest for the grouping function, including an empty file and a single transaction",
]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ttft(engine: Engine, prompt, params: GenerationParams) -> float:
    out = engine.submit(prompt, params).result()
    return out.first_token_at - out.submitted_at


def editor_file(tok, tokens: int) -> str:
    """The first `tokens` tokens' worth of this package's engine source, as text."""
    text = "\n\n".join(p.read_text() for p in sorted(Path(codegen_lm.__file__).parent.joinpath("engine").glob("*.py")))
    return tok.decode(tok.encode(text)[:tokens])


def editor_trace(model, tok, cache_mb: float, positions: int = 30, chars: int = 4) -> list[float]:
    text = editor_file(tok, 1500)
    engine = Engine(model, tok, max_batch=4, prefix_cache_mb=cache_mb)
    params = GenerationParams(max_new_tokens=16)
    start = len(text) - positions * chars
    return [ttft(engine, text[: start + i * chars], params) for i in range(1, positions + 1)]


def multi_turn(model, tok, cache_mb: float) -> list[float]:
    engine = Engine(model, tok, max_batch=4, prefix_cache_mb=cache_mb)
    history = tok.encode("# A small program, written one step at a time.\nimport csv\nimport json\n\n")
    times = []
    for instruction in INSTRUCTIONS:
        ids = tok.encode(instruction + "\n" + instruction.replace("# ", "# Then: ").lower() + "\n")
        history = history + ids
        out = engine.submit(history, GenerationParams(max_new_tokens=80, eos_token_ids=[])).result()
        times.append(out.first_token_at - out.submitted_at)
        history = history + out.outputs[0].token_ids
    return times


def streams_during_long_prompt(model, chunk: int | None, streams: int = 8, long_tokens: int = 1800) -> dict:
    """chunk: the engine's prefill_chunk (None: sized by measurement, the default)."""
    g = torch.Generator().manual_seed(0)
    engine = Engine(model, max_batch=streams + 1, prefix_cache_mb=0, prefill_chunk=chunk)
    running = [engine.submit(torch.randint(0, 50000, (128,), generator=g).tolist(),
                             GenerationParams(max_new_tokens=1000, eos_token_ids=[])) for _ in range(streams)]
    samples = [h._request.samples[0] for h in running]
    arrivals: list[list[float]] = [[] for _ in running]
    counts = [0] * streams

    def step() -> None:
        engine.step()
        now = time.perf_counter()
        for i, s in enumerate(samples):
            if len(s.output.token_ids) > counts[i]:
                counts[i] = len(s.output.token_ids)
                arrivals[i].append(now)

    while min(counts) < 20:  # all streams decoding, steady state
        step()
    before = [b - a for arr in arrivals for a, b in zip(arr[-11:], arr[-10:])]
    submitted = time.perf_counter()
    long = engine.submit(torch.randint(0, 50000, (long_tokens,), generator=g).tolist(),
                         GenerationParams(max_new_tokens=4))
    mark = [len(a) for a in arrivals]
    while not long._request.samples[0].output.token_ids:
        step()
    first_token = time.perf_counter() - submitted
    chunk_used = engine.scheduler.chunk_size(streams)
    for _ in range(3):
        step()
    during = [b - a for arr, m in zip(arrivals, mark) for a, b in zip(arr[m - 1 :], arr[m:])]
    for h in running:
        h.cancel()
    engine.run()
    median_step = statistics.median(before)
    return {"prefill_chunk": chunk_used, "median_step_s": median_step, "largest_gap_s": max(during),
            "largest_gap_steps": max(during) / median_step, "long_prompt_ttft_s": first_token}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="350M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/codegen-bench"))
    parser.add_argument("--traces", default="editor,turns,streams", help="which of the three to run (comma-separated)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "interactive.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf_dir, _ = build_checkpoint(args.shape, args.workdir, ct2=False)
    model = CodeGenForCausalLM.from_pretrained(hf_dir)
    tok = CodeGenTokenizerFast.from_pretrained(hf_dir)
    cpu = cpu_description()
    print(f"codegen-{args.shape} shape, random fp32 weights, {args.threads} threads, {args.rounds} rounds, on {cpu}")
    Engine(model, tok, max_batch=2).submit("def f(x):\n" * 40, GenerationParams(max_new_tokens=4)).result()  # warm-up
    raw = {"editor": {"cache": [], "no cache": []}, "turns": {"cache": [], "no cache": []},
           "streams": {"chunked": [], "one piece": []}}
    traces = set(args.traces.split(","))
    raw = {name: runs for name, runs in raw.items() if name in traces}
    for r in range(args.rounds):
        for name, mb in (("cache", 1024), ("no cache", 0)):
            if "editor" in raw:
                raw["editor"][name].append(editor_trace(model, tok, mb))
            if "turns" in raw:
                raw["turns"][name].append(multi_turn(model, tok, mb))
        for name, chunk in (("chunked", None), ("one piece", 100_000)):
            if "streams" in raw:
                raw["streams"][name].append(streams_during_long_prompt(model, chunk))
        print(f"round {r + 1}: {summary_line(raw)}", file=sys.stderr)

    def med(values):
        return statistics.median(values)

    results = {}
    if "editor" in raw:
        editor = {name: {"ttft_p50_s": med([percentile(t, 0.5) for t in runs]),
                         "ttft_p95_s": med([percentile(t, 0.95) for t in runs])}
                  for name, runs in raw["editor"].items()}
        results.update(editor=editor,
                       editor_p50_speedup=editor["no cache"]["ttft_p50_s"] / editor["cache"]["ttft_p50_s"],
                       editor_p95_speedup=editor["no cache"]["ttft_p95_s"] / editor["cache"]["ttft_p95_s"])
        print_editor(results)
    if "turns" in raw:
        turns = {name: {"prefill_total_s": med([sum(t) for t in runs])} for name, runs in raw["turns"].items()}
        results.update(turns=turns,
                       turns_speedup=turns["no cache"]["prefill_total_s"] / turns["cache"]["prefill_total_s"])
        print(f"multi-turn trace (8 turns): total prefill {turns['cache']['prefill_total_s']:.2f} s with the cache, "
              f"{turns['no cache']['prefill_total_s']:.2f} s without -> {results['turns_speedup']:.1f}x less")
    if "streams" in raw:
        results["streams"] = {name: {key: med([run[key] for run in runs]) for key in runs[0]}
                              for name, runs in raw["streams"].items()}
        for name, s in results["streams"].items():
            print(f"8 streams + an 1,800-token prompt, {name} (chunk {s['prefill_chunk']}): median step "
                  f"{s['median_step_s'] * 1e3:.0f} ms, largest gap {s['largest_gap_s'] * 1e3:.0f} ms "
                  f"({s['largest_gap_steps']:.1f} steps), long prompt's first token after "
                  f"{s['long_prompt_ttft_s']:.2f} s")
    write_json(args.out, {"shape": args.shape, "cpu": cpu, "threads": args.threads, "rounds": args.rounds,
                          "results": results, "raw": raw})


def summary_line(raw: dict) -> str:
    parts = []
    if "editor" in raw:
        ms = [statistics.median(raw["editor"][k][-1]) * 1e3 for k in ("cache", "no cache")]
        parts.append(f"editor p50 {ms[0]:.0f} vs {ms[1]:.0f} ms")
    if "turns" in raw:
        parts.append(f"turns {sum(raw['turns']['cache'][-1]):.2f} vs {sum(raw['turns']['no cache'][-1]):.2f} s")
    if "streams" in raw:
        parts.append(f"largest gap {raw['streams']['chunked'][-1]['largest_gap_steps']:.1f} vs "
                     f"{raw['streams']['one piece'][-1]['largest_gap_steps']:.1f} steps")
    return "; ".join(parts)


def print_editor(results: dict) -> None:
    editor = results["editor"]
    print(f"\neditor trace (30 requests, ~1,500-token file): time to first token p50 / p95\n"
          f"  prefix cache    {editor['cache']['ttft_p50_s'] * 1e3:7.0f} / "
          f"{editor['cache']['ttft_p95_s'] * 1e3:.0f} ms\n"
          f"  no prefix cache {editor['no cache']['ttft_p50_s'] * 1e3:7.0f} / "
          f"{editor['no cache']['ttft_p95_s'] * 1e3:.0f} ms\n"
          f"  -> {results['editor_p50_speedup']:.1f}x lower p50, {results['editor_p95_speedup']:.1f}x lower p95")


if __name__ == "__main__":
    main()
