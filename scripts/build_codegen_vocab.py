"""Rebuild the exact CodeGen tokenizer files offline from the GPT-2 BPE ranks.

The GPT-2 ranks ship, MIT-licensed, inside the `openai-whisper` sdist as
`whisper/assets/gpt2.tiktoken` (one `base64(token_bytes) rank` per line). A rank table
is all BPE needs, but vocab.json/merges.txt want each merge spelled out: the merge that
creates token T is found by running BPE on T's bytes allowing only ranks below T's own;
what is left is always exactly two parts. CodeGen then adds 38 whitespace-run tokens.

    python scripts/build_codegen_vocab.py [--sdist openai_whisper-*.tar.gz] [--out DIR]

Without --sdist the script runs `pip download openai-whisper --no-binary :all:`.
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from codegen_lm.tokenizer.vocab import (  # noqa: E402
    EOS_TOKEN,
    bytes_to_unicode,
    codegen_added_tokens,
)

DEFAULT_OUT = REPO / "src" / "codegen_lm" / "tokenizer" / "assets"


def read_ranks(sdist: Path) -> tuple[dict[bytes, int], str]:
    """Return GPT-2's {token_bytes: rank} and the sdist's licence text."""
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).as_posix(): m for m in tar.getmembers()}
        ranks_name = next(n for n in members if n.endswith("whisper/assets/gpt2.tiktoken"))
        licence_name = next(n for n in members if n.count("/") == 1 and n.endswith("/LICENSE"))
        ranks_text = tar.extractfile(members[ranks_name]).read().decode("ascii")
        licence = tar.extractfile(members[licence_name]).read().decode("utf-8")
    ranks = {}
    for line in ranks_text.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks, licence


def split_into_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """Run BPE on `token` with only lower ranks allowed; the two parts left form its merge."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < limit and (best is None or rank < best[0]):
                best = (rank, i)
        if best is None:
            break
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {limit}) does not reduce to one merge: {parts}")
    return parts[0], parts[1]


def build(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[str]]:
    byte_to_char = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(byte_to_char[x] for x in b)

    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))):
        raise ValueError("ranks are not the dense range 0..N-1")
    vocab = {spell(token): rank for token, rank in by_rank}
    vocab[EOS_TOKEN] = len(vocab)
    merges = []
    for token, _rank in by_rank:
        if len(token) > 1:
            left, right = split_into_merge(token, ranks)
            merges.append(f"{spell(left)} {spell(right)}")
    return vocab, merges


def write(out: Path, vocab: dict[str, int], merges: list[str], licence: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = codegen_added_tokens(len(vocab))
    (out / "added_tokens.json").write_text(json.dumps(added, ensure_ascii=False), encoding="utf-8")
    (out / "LICENSE.gpt2-vocab").write_text(
        "vocab.json and merges.txt are derived from whisper/assets/gpt2.tiktoken\n"
        "(the GPT-2 byte-level BPE ranks) in the openai-whisper source distribution,\n"
        "distributed under the following licence.\n\n" + licence,
        encoding="utf-8",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="openai-whisper source .tar.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist
        if sdist is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "openai-whisper", "--no-deps",
                 "--no-binary", ":all:", "-d", tmp],
                check=True,
            )
            sdist = next(Path(tmp).glob("openai*whisper*.tar.gz"))
        ranks, licence = read_ranks(sdist)
    vocab, merges = build(ranks)
    write(args.out, vocab, merges, licence)
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges and 38 added tokens to {args.out}")


if __name__ == "__main__":
    main()
