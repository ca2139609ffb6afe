"""Peak memory while loading a 350M-shaped checkpoint: codegen-lm against transformers.

Builds (once) a random-weight Salesforce/codegen-350M-shaped checkpoint in the two formats users
meet: the hub's fp16 `pytorch_model.bin` with legacy buffers, and fp32 `model.safetensors`. Each
load runs in a fresh process that resets its peak-RSS counter after imports, loads the model in
fp32 on the CPU, and reports (peak RSS - RSS before loading) / bytes of the fp32 weights: 1.0 means
the weights were materialised exactly once with nothing else held. A second figure is taken after
touching every weight once, because a memory-mapped load (transformers on same-dtype safetensors)
defers the cost of reading the weights to their first use.

    python bench/load_memory.py [--runs 3] [--workdir /tmp/codegen-bench] [--out bench/results/load_memory.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from report import write_json

REPO = Path(__file__).resolve().parents[1]

MEASURE = textwrap.dedent('''
    import sys, time, torch
    import transformers
    from codegen_lm import CodeGenForCausalLM

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    engine, folder = sys.argv[1], sys.argv[2]
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS")
    start = time.perf_counter()
    if engine == "codegen-lm":
        model = CodeGenForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        model = transformers.CodeGenForCausalLM.from_pretrained(folder, dtype=torch.float32)
    seconds = time.perf_counter() - start
    params = list({id(p): p for p in model.parameters()}.values())
    weights = sum(p.numel() * p.element_size() for p in params)
    load_peak = status("VmHWM") - before
    with torch.no_grad():  # fault in every weight: a memory-mapped load pays for its pages here
        for p in params:
            p.sum()
    print(f"{load_peak / weights} {(status('VmHWM') - before) / weights} {weights} {seconds}")
''')


def build_checkpoints(workdir: Path) -> dict[str, Path]:
    """The fp16 .bin (as on the hub) and an fp32 safetensors copy, with random weights."""
    sys.path.insert(0, str(REPO))
    import torch
    import transformers

    from codegen_lm import CodeGenConfig
    from tests.conftest import legacy_fp16_state_dict, randomize

    folders = {"fp16 pytorch_model.bin": workdir / "350M-bin", "fp32 model.safetensors": workdir / "350M-st"}
    if all((f / "config.json").exists() for f in folders.values()):
        return folders
    config = CodeGenConfig.from_pretrained("Salesforce/codegen-350M-mono")
    data = {k: v for k, v in config.to_dict().items() if k != "dtype"}
    with torch.device("meta"):
        model = transformers.CodeGenForCausalLM(transformers.CodeGenConfig(**data))
    model = randomize(model.to_empty(device="cpu"), seed=350, scale=0.02)
    bin_dir, st_dir = folders.values()
    model.save_pretrained(st_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    torch.save(legacy_fp16_state_dict(model, 2048), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text(json.dumps({**data, "torch_dtype": "float16"}))
    return folders


def measure(engine: str, folder: Path) -> tuple[float, float, int, float]:
    out = subprocess.run([sys.executable, "-c", MEASURE, engine, str(folder)], capture_output=True, text=True,
                         check=True)
    load_peak, used_peak, weights, seconds = out.stdout.split()
    return float(load_peak), float(used_peak), int(weights), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/codegen-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load_memory.json")
    args = parser.parse_args()
    folders = build_checkpoints(args.workdir)
    rows = []
    for fmt, folder in folders.items():
        for engine in ("codegen-lm", "transformers"):
            runs = [measure(engine, folder) for _ in range(args.runs)]
            rows.append({
                "format": fmt, "engine": engine,
                "load_peak_over_weights": statistics.median(r[0] for r in runs),
                "peak_after_use_over_weights": statistics.median(r[1] for r in runs),
                "weights_bytes": runs[0][2],
                "seconds": statistics.median(r[3] for r in runs),
                "runs": runs,
            })
    print("peak RSS above the pre-load RSS, in units of the fp32 weights (1.0 = one copy), medians of", args.runs)
    print(f"{'checkpoint':<24} {'engine':<13} {'during load':>12} {'after use':>10} {'load s':>8}")
    for row in rows:
        print(f"{row['format']:<24} {row['engine']:<13} {row['load_peak_over_weights']:>12.3f} "
              f"{row['peak_after_use_over_weights']:>10.3f} {row['seconds']:>8.2f}")
    for fmt in folders:
        ours, theirs = (next(r for r in rows if r["format"] == fmt and r["engine"] == e)
                        for e in ("codegen-lm", "transformers"))
        ratio = theirs["peak_after_use_over_weights"] / ours["peak_after_use_over_weights"]
        print(f"{fmt}: transformers/codegen-lm peak after use {ratio:.2f}x, "
              f"load time {theirs['seconds'] / ours['seconds']:.2f}x")
    write_json(args.out, {"weights": "350M-shaped, random", "runs": args.runs, "results": rows})


if __name__ == "__main__":
    main()
