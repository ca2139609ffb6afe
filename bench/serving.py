"""The server under load, side by side with its peers in one run, on loopback, with the official `openai`
client as the load generator.

Servers (each its own process, started and measured one after the other):
- codegen-lm serve (continuous batching, --max-batch 16);
- codegen-lm serve --matmul-dtype int8: the same, every product int8 x int8 (activations quantized per row);
- codegen-lm serve --matmul-dtype bfloat16: products of prefill and batched decoding in bf16 (fast where the
  CPU multiplies bf16 in hardware: AVX512-BF16 or AMX);
- (a) codegen-lm serve --max-batch 1: the same server without continuous batching;
- (b) transformers' generate behind the same web framework, one request at a time (bench/hf_server.py).

1. Concurrent streaming clients (1, 4, 16, 32), each sending streamed completions of prompts of mixed
   lengths (100-1,500 tokens of this package's source) with max_tokens 64 (end of text banned, so every
   request generates 64 tokens on every server). Throughput (generated tokens / wall time), time to
   first token and time between tokens (p50, p95).
2. An editor session replayed against /v1/engines/codegen/completions: a 1,500-token file completed at
   30 successive cursor positions as the user types, single-line completions (stop "\\n"); max_tokens is
   the length of the file's real next line (at most 16), i.e. what a trained model would write before
   its newline, since random weights rarely end a line. Latency of the whole completion, p50 and p95,
   with the prefix cache, with it and int8 weights (--quantize int8), and without it (--prefix-cache-mb 0,
   10 positions).

A codegen-350M-mono-shaped checkpoint with random fp32 weights, 2 threads per server.

    python bench/serving.py [--shape 350M] [--levels 1,4,16,32] [--out bench/results/serving.json]
    python bench/serving.py --editor-only    # part 2 alone, codegen-lm serve only (about 5 minutes)
    python bench/serving.py --levels 32 --peers "codegen-lm --matmul-dtype int8,transformers generate"
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from generation import build_checkpoint  # noqa: E402
from report import cpu_description, write_json  # noqa: E402

sys.path.insert(0, str(REPO))
from tests.server_process import Server  # noqa: E402

LENGTHS = [100, 1500, 400, 800, 200, 1100, 600, 300]  # prompt tokens, cycled
REQUESTS = {1: 4, 4: 8, 16: 16, 32: 32}  # requests per concurrency level
MAX_TOKENS = 64
NO_EOS = {"50256": -100}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def source_text() -> str:
    files = sorted((REPO / "src" / "codegen_lm").rglob("*.py"))
    return "\n".join(f.read_text() for f in files)


def prompts(tok, count: int) -> list[str]:
    ids = tok.encode(source_text())
    out, at = [], 0
    for i in range(count):
        n = LENGTHS[i % len(LENGTHS)]
        out.append(tok.decode(ids[at : at + n]))
        at = (at + 997) % (len(ids) - 2000)
    return out


async def one_request(client, model: str, prompt: str, extra: dict) -> dict:
    sent = time.perf_counter()
    stamps, tokens = [], 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                             stream=True, stream_options={"include_usage": True}, **extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": stamps[0] - sent if stamps else None, "gaps": [b - a for a, b in itertools.pairwise(stamps)],
            "tokens": tokens or len(stamps), "end": time.perf_counter() - sent}


async def load_level(url: str, model: str, texts: list[str], clients: int, extra: dict) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    queue = list(texts)

    async def worker() -> list[dict]:
        done = []
        while queue:
            done.append(await one_request(client, model, queue.pop(0), extra))
        return done

    started = time.perf_counter()
    results = [r for batch in await asyncio.gather(*(worker() for _ in range(clients))) for r in batch]
    wall = time.perf_counter() - started
    await client.close()
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    generated = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "generated_tokens": generated, "wall_s": wall,
            "throughput_tok_s": generated / wall, "ttft_p50_s": percentile(ttft, 0.5),
            "ttft_p95_s": percentile(ttft, 0.95), "tbt_p50_s": percentile(gaps, 0.5),
            "tbt_p95_s": percentile(gaps, 0.95)}


def editor_session(url: str, tok, positions: int) -> dict:
    import httpx

    text = source_text()
    ids = tok.encode(text)
    file = tok.decode(ids[:1500])
    start = len(file) - 4 * positions
    latencies = []
    with httpx.Client(timeout=600) as client:
        for i in range(positions):
            cursor = start + 4 * i
            line_end = text.find("\n", cursor)
            rest = text[cursor : line_end if line_end >= 0 else cursor + 80]
            max_tokens = max(1, min(16, len(tok.encode(rest))))
            body = {"prompt": text[:cursor], "max_tokens": max_tokens, "temperature": 0, "stop": ["\n"]}
            sent = time.perf_counter()
            response = client.post(url + "/v1/engines/codegen/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - sent)
    return {"positions": positions, "latency_p50_s": percentile(latencies, 0.5),
            "latency_p95_s": percentile(latencies, 0.95), "latencies_s": latencies}


def start_hf(folder: Path) -> Server:
    """bench/hf_server.py in its own process, wrapped like our server."""
    return Server(folder, command=[sys.executable, str(REPO / "bench" / "hf_server.py"), str(folder)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="350M")
    parser.add_argument("--levels", default="1,4,16,32")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/codegen-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "serving.json")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of latency vs load (default: next to --out)")
    parser.add_argument("--peers", default=None,
                        help="comma-separated servers to run (default: all); the editor sessions run with codegen-lm")
    parser.add_argument("--editor-only", action="store_true",
                        help="only the editor sessions against codegen-lm serve (no load levels, no peers)")
    args = parser.parse_args()
    if args.editor_only and args.out == parser.get_default("out"):
        args.out = args.out.with_name("serving_editor.json")
    levels = [int(x) for x in args.levels.split(",")]
    from codegen_lm import CodeGenTokenizerFast

    folder, _ = build_checkpoint(args.shape, args.workdir, ct2=False)
    tok = CodeGenTokenizerFast.from_pretrained(folder)
    cpu = cpu_description()
    print(f"codegen-{args.shape} shape, random fp32 weights, 2 threads per server, on {cpu}", flush=True)
    peers = {
        "codegen-lm": lambda: Server(folder, "--max-batch", "16", "--threads", "2"),
        "codegen-lm --matmul-dtype int8": lambda: Server(folder, "--max-batch", "16", "--threads", "2",
                                                         "--matmul-dtype", "int8"),
        "codegen-lm --matmul-dtype bfloat16": lambda: Server(folder, "--max-batch", "16", "--threads", "2",
                                                             "--matmul-dtype", "bfloat16"),
        "codegen-lm --max-batch 1": lambda: Server(folder, "--max-batch", "1", "--threads", "2"),
        "transformers generate": lambda: start_hf(folder),
    }
    results: dict = {"cpu": cpu, "shape": args.shape, "max_tokens": MAX_TOKENS, "load": {}, "editor": {}}
    editors = [("int8 + prefix cache", ("--quantize", "int8"), 30), ("no prefix cache", ("--prefix-cache-mb", "0"), 10)]
    if args.peers:
        wanted = [p.strip() for p in args.peers.split(",")]
        unknown = [p for p in wanted if p not in peers]
        if unknown:
            parser.error(f"--peers: unknown {', '.join(unknown)} (choose from {', '.join(peers)})")
        peers = {name: start for name, start in peers.items() if name in wanted}
        if "codegen-lm" not in peers:
            editors = []
    if args.editor_only:
        peers = {}
        editors.insert(0, ("prefix cache", (), 30))
    for name, start in peers.items():
        server = start()
        model = "hf" if name.startswith("transformers") else str(folder)
        extra = {} if name.startswith("transformers") else {"logit_bias": NO_EOS}
        try:
            asyncio.run(load_level(server.url, model, prompts(tok, 1)[:1], 1, extra))  # warm-up
            results["load"][name] = []
            for clients in levels:
                row = asyncio.run(load_level(server.url, model, prompts(tok, REQUESTS[clients]), clients, extra))
                results["load"][name].append(row)
                print(f"{name:26s} {clients:3d} clients: {row['throughput_tok_s']:7.1f} tok/s, TTFT p50 "
                      f"{row['ttft_p50_s']:6.2f} s p95 {row['ttft_p95_s']:6.2f} s, TBT p50 "
                      f"{row['tbt_p50_s'] * 1000:6.0f} ms p95 {row['tbt_p95_s'] * 1000:6.0f} ms", flush=True)
            if name == "codegen-lm":
                results["editor"]["prefix cache"] = editor_session(server.url, tok, 30)
        finally:
            server.stop()
    for name, options, positions in editors:
        server = Server(folder, "--max-batch", "16", "--threads", "2", *options)
        try:
            results["editor"][name] = editor_session(server.url, tok, positions)
        finally:
            server.stop()
    for name, row in results["editor"].items():
        print(f"editor session, {name}: whole completion p50 {row['latency_p50_s'] * 1000:.0f} ms, "
              f"p95 {row['latency_p95_s'] * 1000:.0f} ms over {row['positions']} positions")
    if args.editor_only:
        write_json(args.out, results)
        return
    top = max(levels)
    if "transformers generate" in results["load"]:
        hf = {r["clients"]: r for r in results["load"]["transformers generate"]}[top]
        results["ratios_at_most_clients"] = {"clients": top}
        for name in [n for n in ("codegen-lm", "codegen-lm --matmul-dtype int8",
                                                "codegen-lm --matmul-dtype bfloat16") if n in results["load"]]:
            ours = {r["clients"]: r for r in results["load"][name]}[top]
            r = results["ratios_at_most_clients"][name] = {
                "throughput_vs_transformers": ours["throughput_tok_s"] / hf["throughput_tok_s"],
                "ttft_p95_vs_transformers": ours["ttft_p95_s"] / hf["ttft_p95_s"]}
            print(f"{name} at {top} clients: throughput {r['throughput_vs_transformers']:.2f}x transformers, "
                  f"TTFT p95 {r['ttft_p95_vs_transformers']:.2f}x of transformers'")
    write_json(args.out, results)
    plot(results, args.plot or args.out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, rows in results["load"].items():
        x = [r["clients"] for r in rows]
        axes[0].plot(x, [r["throughput_tok_s"] for r in rows], marker="o", label=name)
        axes[1].plot(x, [r["ttft_p95_s"] for r in rows], marker="o", label=name)
        axes[2].plot(x, [r["tbt_p95_s"] * 1000 for r in rows], marker="o", label=name)
    for ax, title in zip(axes, ("throughput (generated tok/s)", "time to first token p95 (s)",
                                "time between tokens p95 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streaming clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"codegen-{results['shape']} shape, random weights, {results['cpu']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
