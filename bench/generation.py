"""Generation speed: codegen-lm's engine against transformers and CTranslate2, same checkpoint, one run.

A random-weight checkpoint of a released shape (default codegen-350M-mono) is saved by transformers in
fp32; CTranslate2 converts that folder with its own `ct2-transformers-converter` (fp32 and int8).
Every engine runs in its own process (so each gets a clean peak-RSS figure), with the same thread
count, on three workloads (the prefix cache off: the timed prompts repeat, and no competitor has one):

- prefill: a 512-token prompt, one new token (median seconds);
- batch-1 greedy decode: a 128-token prompt, 128 new tokens (eos disabled);
- 20 samples of one prompt (temperature 0.8, top-p 0.95), 128 new tokens each: the pass@k workload.

Decode rates exclude the prefill: (tokens - 1) / (time for N tokens - time for 1 token), with both
times medians over --rounds rounds, each of which runs every engine in turn (so that drifts in the
machine's speed hit all engines alike). The 20-sample wall time includes everything.

    python bench/generation.py [--shape 350M] [--rounds 5] [--engines ...] [--baseline OLD/src] [--out bench/results]

--baseline runs the codegen-lm fp32 and int8 engines a second time from another source tree (a git
worktree of an earlier commit), in the same rounds, for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT_LEN, NEW_TOKENS, PREFILL_LEN, SAMPLES = 128, 128, 512, 20
ENGINES = ["codegen-lm fp32", "codegen-lm int8", "codegen-lm int8 w8a8", "codegen-lm int8 speculative",
           "codegen-lm bf16", "codegen-lm bf16 matmul", "transformers fp32", "ctranslate2 fp32", "ctranslate2 int8"]
BASELINE = " (baseline)"  # suffix of the engines run from --baseline's source tree


# ---- one engine, in its own process ----------------------------------------------------------------


def prompts(vocab: int = 50000) -> tuple[list[int], list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, vocab, (PROMPT_LEN,), generator=g).tolist(),
            torch.randint(0, vocab, (PREFILL_LEN,), generator=g).tolist())


def cpu_name() -> str:
    """The CPU model and its wide-vector / matrix features (this machine kind changes CPU between boots)."""
    from report import cpu_description

    return cpu_description()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_codegen_lm(folder: str, quantize: str | None, threads: int, repeats: int, speculative: bool = False,
                   dtype: str | None = None, matmul: str = "float32") -> dict:
    import torch

    from codegen_lm import CodeGenForCausalLM
    from codegen_lm.engine import Engine, GenerationParams

    try:
        from codegen_lm.engine.weights import plans
    except ImportError:  # a --baseline checkout from before the kernel registry
        plans = None

    torch.set_num_threads(threads)
    model = CodeGenForCausalLM.from_pretrained(folder, quantize=quantize, dtype=dtype)
    try:  # the prefix cache off: repeated prompts would hit it, and the competitors have none
        engine = Engine(model, max_batch=SAMPLES, prefix_cache_mb=0,
                        speculative="prompt-lookup" if speculative else None, matmul_dtype=matmul)
    except TypeError:  # a --baseline checkout from before the prefix cache (and engine speculation)
        engine = Engine(model, max_batch=SAMPLES)
    prompt, long_prompt = prompts()

    def gen(ids: list[int], n: int, tokens: int, sample: bool) -> None:
        params = GenerationParams(n=n, max_new_tokens=tokens, eos_token_ids=[],
                                  temperature=0.8 if sample else 0.0, top_p=0.95 if sample else 1.0, seed=0)
        engine.submit(ids, params).result()

    gen(prompt, 1, 4, False)  # warm-up (numba compilation, kernel selection, cache sizes): steady state is timed
    gen(prompt, SAMPLES, 2, True)
    gen(long_prompt, 1, 1, False)
    if speculative:  # prompt lookup, batch-1 greedy
        before = engine.stats().speculative
        result = {"greedy_1_s": timed(lambda: gen(prompt, 1, 1, False), repeats),
                  "greedy_n_s": timed(lambda: gen(prompt, 1, NEW_TOKENS, False), repeats)}
        after = engine.stats().speculative
        passes = after.passes - before.passes
        result["acceptance_rate"] = (after.accepted - before.accepted) / max(1, after.proposed - before.proposed)
        result["tokens_per_pass"] = (after.accepted - before.accepted + passes) / max(1, passes)
        return result
    return {
        "prefill_s": timed(lambda: gen(long_prompt, 1, 1, False), repeats),
        "greedy_1_s": timed(lambda: gen(prompt, 1, 1, False), repeats),
        "greedy_n_s": timed(lambda: gen(prompt, 1, NEW_TOKENS, False), repeats),
        "samples_1_s": timed(lambda: gen(prompt, SAMPLES, 1, True), repeats),
        "samples_n_s": timed(lambda: gen(prompt, SAMPLES, NEW_TOKENS, True), repeats),
        "kernels": plans(model) if plans else {},
    }


def run_transformers(folder: str, threads: int, repeats: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.CodeGenForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt, long_prompt = prompts()

    def gen(ids: list[int], n: int, tokens: int, sample: bool) -> None:
        x = torch.tensor([ids])
        kwargs = dict(do_sample=True, temperature=0.8, top_p=0.95, num_return_sequences=n) if sample else dict(
            do_sample=False)
        with torch.inference_mode():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=tokens, min_new_tokens=tokens,
                           pad_token_id=50256, **kwargs)

    gen(prompt, 1, 4, False)  # warm-up, as for every engine
    gen(prompt, SAMPLES, 2, True)
    gen(long_prompt, 1, 1, False)
    return {
        "prefill_s": timed(lambda: gen(long_prompt, 1, 1, False), repeats),
        "greedy_1_s": timed(lambda: gen(prompt, 1, 1, False), repeats),
        "greedy_n_s": timed(lambda: gen(prompt, 1, NEW_TOKENS, False), repeats),
        "samples_1_s": timed(lambda: gen(prompt, SAMPLES, 1, True), repeats),
        "samples_n_s": timed(lambda: gen(prompt, SAMPLES, NEW_TOKENS, True), repeats),
    }


def run_ctranslate2(folder: str, compute_type: str, threads: int, repeats: int) -> dict:
    import ctranslate2

    from codegen_lm import CodeGenTokenizerFast

    generator = ctranslate2.Generator(folder, device="cpu", compute_type=compute_type, inter_threads=1,
                                      intra_threads=threads)
    tok = CodeGenTokenizerFast.from_pretrained("Salesforce/codegen-350M-mono")
    prompt, long_prompt = prompts()

    def gen(ids: list[int], n: int, tokens: int, sample: bool) -> None:
        batch = [tok.convert_ids_to_tokens(ids)] * n  # CTranslate2 takes token strings, one row per sample
        kwargs = dict(sampling_topk=0, sampling_topp=0.95, sampling_temperature=0.8) if sample else dict(
            sampling_topk=1)
        generator.generate_batch(batch, max_length=tokens, min_length=tokens, include_prompt_in_result=False,
                                 **kwargs)

    gen(prompt, 1, 4, False)  # warm-up, as for every engine
    gen(prompt, SAMPLES, 2, True)
    gen(long_prompt, 1, 1, False)
    return {
        "prefill_s": timed(lambda: gen(long_prompt, 1, 1, False), repeats),
        "greedy_1_s": timed(lambda: gen(prompt, 1, 1, False), repeats),
        "greedy_n_s": timed(lambda: gen(prompt, 1, NEW_TOKENS, False), repeats),
        "samples_1_s": timed(lambda: gen(prompt, SAMPLES, 1, True), repeats),
        "samples_n_s": timed(lambda: gen(prompt, SAMPLES, NEW_TOKENS, True), repeats),
    }


def worker(engine: str, hf_dir: str, ct2_dir: str, threads: int, repeats: int) -> None:
    name = engine.removesuffix(BASELINE)
    if name.startswith("codegen-lm"):
        import codegen_lm  # noqa: F401  before torch, as the command line does (see codegen_lm/__init__.py)
    if name == "codegen-lm fp32":
        result = run_codegen_lm(hf_dir, None, threads, repeats)
    elif name == "codegen-lm int8":
        result = run_codegen_lm(hf_dir, "int8", threads, repeats)
    elif name == "codegen-lm int8 w8a8":  # int8 weights, the blocks' activations quantized to int8 per row
        result = run_codegen_lm(hf_dir, "int8", threads, repeats, matmul="int8")
    elif name == "codegen-lm int8 speculative":
        result = run_codegen_lm(hf_dir, "int8", threads, repeats, speculative=True)
    elif name == "codegen-lm bf16":  # bf16 weights: the model's blocks in bf16
        result = run_codegen_lm(hf_dir, None, threads, repeats, dtype="bfloat16")
    elif name == "codegen-lm bf16 matmul":  # fp32 weights, the products of prefill and batches in bf16
        result = run_codegen_lm(hf_dir, None, threads, repeats, matmul="bfloat16")
    elif name == "transformers fp32":
        result = run_transformers(hf_dir, threads, repeats)
    else:
        result = run_ctranslate2(ct2_dir, name.split()[-1].replace("fp32", "float32"), threads, repeats)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                result["peak_rss_bytes"] = int(line.split()[1]) * 1024
    print(json.dumps(result))


# ---- the orchestrating process ---------------------------------------------------------------------


def build_checkpoint(shape: str, workdir: Path, ct2: bool = True) -> tuple[Path, Path]:
    """A random fp32 checkpoint saved by transformers, and (ct2) CTranslate2's conversion of it."""
    hf_dir, ct2_dir = workdir / f"{shape}-hf", workdir / f"{shape}-ct2"
    if not (hf_dir / "config.json").exists():
        import torch
        import transformers

        sys.path.insert(0, str(REPO))
        from codegen_lm import CodeGenConfig
        from tests.conftest import randomize, write_tokenizer_files

        config = CodeGenConfig.from_pretrained(f"Salesforce/codegen-{shape}-mono")
        data = {k: v for k, v in config.to_dict().items() if k != "dtype"}
        with torch.device("meta"):
            model = transformers.CodeGenForCausalLM(transformers.CodeGenConfig(**data))
        model = randomize(model.to_empty(device="cpu"), seed=0, scale=0.02)
        model.save_pretrained(hf_dir)
        write_tokenizer_files(hf_dir)
    if ct2 and not (ct2_dir / "model.bin").exists():
        converter = Path(sys.executable).with_name("ct2-transformers-converter")
        subprocess.run([str(converter), "--model", str(hf_dir), "--output_dir", str(ct2_dir), "--force"],
                       check=True, capture_output=True)
    return hf_dir, ct2_dir


def summarise(raw: dict) -> dict:
    """Rates from the raw timings; a workload an engine did not run is None."""
    out = {
        "prefill_512_s": raw.get("prefill_s"),
        "greedy_decode_tok_s": (NEW_TOKENS - 1) / (raw["greedy_n_s"] - raw["greedy_1_s"]),
        "samples_decode_tok_s": None,
        "samples_prefill_s": raw.get("samples_1_s"),
        "samples_wall_s": raw.get("samples_n_s"),
        "peak_rss_gb": raw.get("peak_rss_bytes", 0) / 1e9,
    }
    if "samples_n_s" in raw:
        out["samples_decode_tok_s"] = SAMPLES * (NEW_TOKENS - 1) / (raw["samples_n_s"] - raw["samples_1_s"])
    for key in ("acceptance_rate", "tokens_per_pass"):
        if key in raw:
            out[key] = raw[key]
    return out


def ratio(a: dict, b: dict, key: str) -> float | None:
    return None if a[key] is None or b[key] is None else a[key] / b[key]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("greedy_decode_tok_s", "batch-1 greedy decode (tok/s)"),
               ("samples_decode_tok_s", f"{SAMPLES} samples, decode (tok/s, total)"),
               ("prefill_512_s", "prefill 512 tokens (s, lower is better)")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = list(results)
    for ax, (key, title) in zip(axes, metrics):
        values = [results[n][key] or 0.0 for n in names]
        bars = ax.barh(names, values, color=["#2b7bba" if n.startswith("codegen-lm") else "#999999" for n in names])
        ax.bar_label(bars, fmt="%.2f" if key.endswith("_s") else "%.1f", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="350M", choices=["350M", "2B", "6B", "16B"])
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all engines (medians across them)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats of each workload within a round")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/codegen-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--baseline", type=Path, metavar="SRC",
                        help="also run the codegen-lm fp32 and int8 engines from this source tree (e.g. the src/ of a "
                             "git worktree of the previous commit), side by side in the same rounds")
    parser.add_argument("--worker", nargs=3, metavar=("ENGINE", "HF_DIR", "CT2_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.threads, args.repeats)
        return
    hf_dir, ct2_dir = build_checkpoint(args.shape, args.workdir)
    # Rounds of every engine in turn: the machine's memory bandwidth drifts over minutes (a shared host),
    # so each engine's runs are spread over the whole benchmark instead of one stretch of it.
    engines = list(args.engines)
    if args.baseline:
        engines += [e + BASELINE for e in ("codegen-lm fp32", "codegen-lm int8") if e in args.engines]
    raw: dict[str, list[dict]] = {engine: [] for engine in engines}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for round_index in range(args.rounds):
        for engine in engines:
            worker_env = {**env, "PYTHONPATH": str(args.baseline.resolve())} if engine.endswith(BASELINE) else env
            out = subprocess.run([sys.executable, __file__, "--worker", engine, str(hf_dir), str(ct2_dir),
                                  "--threads", str(args.threads), "--repeats", str(args.repeats)],
                                 capture_output=True, text=True, env=worker_env)
            if out.returncode != 0:
                print(f"{engine}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            raw[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1} {engine}: {summarise(raw[engine][-1])}", file=sys.stderr)
    results = {}
    for engine, runs in raw.items():
        if runs:
            merged = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "kernels"}
            merged["peak_rss_bytes"] = max(r.get("peak_rss_bytes", 0) for r in runs)
            results[engine] = summarise(merged)
            results[engine]["kernels"] = runs[-1].get("kernels", {})
    cpu = cpu_name()
    print(f"\ncodegen-{args.shape} shape, random fp32 weights, {args.threads} threads, medians of {args.rounds} "
          f"rounds x {args.repeats} repeats, on {cpu}")
    header = f"{'engine':<28} {'greedy tok/s':>12} {SAMPLES}x{' samples tok/s':<14} {'20x wall s':>10} " \
             f"{'prefill512 s':>12} {'peak RSS GB':>11}"
    print(header)
    for name, r in results.items():
        print(f"{name:<28} {fmt(r['greedy_decode_tok_s'], '.2f'):>12} {fmt(r['samples_decode_tok_s'], '.1f'):>17} "
              f"{fmt(r['samples_wall_s'], '.2f'):>10} {fmt(r['prefill_512_s'], '.2f'):>12} {r['peak_rss_gb']:>11.2f}")
        for kind, plan in r.get("kernels", {}).items():
            print(f"{'':<28} {kind} products: {plan}")
        if "acceptance_rate" in r:
            print(f"{'':<28} prompt lookup: {r['acceptance_rate']:.0%} of guesses accepted, "
                  f"{r['tokens_per_pass']:.2f} tokens per forward pass")
    ratios = {}
    for ours in [e for e in results if e.startswith("codegen-lm") and not e.endswith(BASELINE)]:
        others = [e for e in results if not e.startswith("codegen-lm")]
        others += [ours + BASELINE] if ours + BASELINE in results else []
        for other in others:
            a, b = results[ours], results[other]
            ratios[f"{ours} / {other}"] = {
                "greedy_decode": ratio(a, b, "greedy_decode_tok_s"),
                "samples_decode": ratio(a, b, "samples_decode_tok_s"),
                "samples_wall_speedup": ratio(b, a, "samples_wall_s"),
                "prefill_speedup": ratio(b, a, "prefill_512_s"),
            }
    print("\nratios (>1: codegen-lm is faster)")
    for key, r in ratios.items():
        print(f"{key:<50} greedy {fmt(r['greedy_decode'], '.2f')}x  samples {fmt(r['samples_decode'], '.2f')}x  "
              f"20x wall {fmt(r['samples_wall_speedup'], '.2f')}x  prefill {fmt(r['prefill_speedup'], '.2f')}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(json.dumps(
        {"shape": args.shape, "cpu": cpu, "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
         "raw": raw,
         "results": results,
         "ratios": ratios}, indent=2) + "\n")
    plot(results, args.out / "generation.png")
    print(f"wrote {args.out / 'generation.json'} and {args.out / 'generation.png'}")


if __name__ == "__main__":
    main()
