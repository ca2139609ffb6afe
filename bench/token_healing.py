"""What token healing changes for editor prompts, on a trained model (the bundled default).

The held-out text is this package's own source (never seen in training). Cursor positions are drawn
from it in three kinds an editor sends all the time:
- inside an identifier ("self.ite|ms"),
- right after a space inside a line ("x = |1"),
- at the start of an indented line, after the newline ("):\\n|    return"), or inside its indentation.
At each, the text up to the cursor is completed greedily to the end of the line (stop "\\n", at most
24 new tokens) with and without token healing, and the completion is compared with the line's real
rest: exact match, and whether the first 1 / 5 characters are right.

    python bench/token_healing.py [--model codegen-lm-mini] [--per-kind 100] [--out ...]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import cpu_description, write_json

import codegen_lm
from codegen_lm import CodeGenForCausalLM, CodeGenTokenizerFast
from codegen_lm.engine import Engine, GenerationParams

REPO = Path(__file__).resolve().parent.parent


def cursor_positions(text: str, per_kind: int, seed: int = 0) -> dict[str, list[int]]:
    rng = random.Random(seed)
    kinds = {
        "inside an identifier": [m.start() + rng.randint(1, len(m.group()) - 1)
                                 for m in re.finditer(r"[A-Za-z_][A-Za-z_0-9]{3,}", text)],
        "after a space": [m.end() for m in re.finditer(r"\S ", text) if text[m.end()] not in " \n"],
        "start of an indented line": [m.start() + 1 + rng.randint(0, len(m.group()) - 2)
                                      for m in re.finditer(r"\n {4,}(?=\S)", text)],
    }
    out = {}
    for name, positions in kinds.items():
        positions = [p for p in positions if p > 400]
        rng.shuffle(positions)
        out[name] = sorted(positions[:per_kind])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=codegen_lm.DEFAULT_MODEL)
    parser.add_argument("--per-kind", type=int, default=100)
    parser.add_argument("--context", type=int, default=1000, help="characters of text before the cursor")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "token_healing.json")
    args = parser.parse_args()
    model = CodeGenForCausalLM.from_pretrained(args.model)
    tok = CodeGenTokenizerFast.from_pretrained(args.model)
    engine = Engine(model, tok, max_batch=16)
    text = "\n".join(f.read_text() for f in sorted((REPO / "src" / "codegen_lm").rglob("*.py")))
    cpu = cpu_description()
    print(f"{args.model}, greedy to the end of the line, {args.per_kind} cursor positions per kind, on {cpu}")
    results = {"model": args.model, "cpu": cpu, "kinds": {}}
    for kind, positions in cursor_positions(text, args.per_kind).items():
        scores = {}
        for healing in (False, True):
            params = GenerationParams(max_new_tokens=24, stop=["\n"], token_healing=healing)
            handles = [engine.submit(text[max(0, p - args.context) : p], params) for p in positions]
            exact = first1 = first5 = healed = 0
            for p, h in zip(positions, handles):
                out = h.result()
                got = out.outputs[0].text
                want = text[p : text.index("\n", p)] if "\n" in text[p:] else text[p:]
                exact += got == want
                first1 += got[:1] == want[:1]
                first5 += got[:5] == want[:5]
                healed += bool(out.healed)
            n = len(positions)
            scores["healing" if healing else "plain"] = {"exact_line": exact / n, "first_char": first1 / n,
                                                         "first_5_chars": first5 / n, "healed": healed / n, "n": n}
        results["kinds"][kind] = scores
        p, h = scores["plain"], scores["healing"]
        print(f"{kind:28s} exact rest of line {p['exact_line']:6.1%} -> {h['exact_line']:6.1%}, first character "
              f"{p['first_char']:6.1%} -> {h['first_char']:6.1%}, first 5 {p['first_5_chars']:6.1%} -> "
              f"{h['first_5_chars']:6.1%} (healed {h['healed']:.0%} of {h['n']})")
    write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
