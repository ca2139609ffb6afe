"""Both tokenizers against `transformers`' CodeGen tokenizer on the real vocabulary, and each other."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from codegen_lm import CodeGenTokenizer, CodeGenTokenizerFast
from codegen_lm.tokenizer import DEFAULT_TRUNCATE_PATTERNS, truncate_before_pattern
from codegen_lm.tokenizer.vocab import ASSETS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slow():
    return CodeGenTokenizer.from_pretrained("Salesforce/codegen-350M-mono")


@pytest.fixture(scope="module")
def fast():
    return CodeGenTokenizerFast.from_pretrained("Salesforce/codegen-350M-mono")


def stdlib_sources() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        data = path.read_bytes()
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError:  # a few test files are deliberately not UTF-8
            texts.append(data.decode("latin-1"))
    assert len(texts) > 1000
    return texts


def tricky_texts() -> list[str]:
    rng = random.Random(0)
    texts = [
        "", " ", "\n", "\r\n", "\t", "def hello_world():", "    return x", "a\r\nb\r\n\r\n\r\n",
        "emoji 😀👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✔︎", "中文字符 日本語のテキスト 한국어", "ﷺ עברית العربية", "e\u0301 a\u0300\u0323",
        "\x00\x01\x1c\x1d\x1e\x1f\x7f", "\ufeffBOM", "\ufffd replacement", "tab\tinside\t\tcode", "nbsp\u00a0x\u3000y",
        "it's we're they've I'm you'll he'd 'S", "1234567890 ¼ ½ Ⅻ ²³ ٣", "<|endoftext|>",
        "a<|endoftext|>b<|endoftext|>", "<|endoftext",
        "x = '''\n'''\n\"\"\"doc\"\"\"", "\u2028\u2029\x85", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈", "\U0010FFFF\U000E0001",
    ]
    for n in range(1, 80):  # whitespace runs around and between code
        texts += [" " * n + "x", "x" + " " * n + "y", "\t" * n + "y", " \t" * n, "\n" * n + " " * n,
                  "if x:\n" + " " * n + "pass\n", "\t" * n + " " * n + "z", " " * n]
    alphabet = [chr(c) for c in [*range(32, 127), *range(160, 400), *range(0x370, 0x3ff), *range(0x4e00, 0x4e40),
                                 *range(0x1F600, 0x1F650), 9, 10, 13, 0x200D, 0xFE0F, 0x2003]]
    for _ in range(3000):
        texts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))))
    return texts


def every_code_point() -> list[str]:
    """Every Unicode scalar value in the contexts GPT-2's split rule distinguishes."""
    chunks, chunk = [], []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        chunk.append(f"a{c} {c}1 !{c}{c} {c}\n")
        if len(chunk) == 2000:
            chunks.append("".join(chunk))
            chunk = []
    chunks.append("".join(chunk))
    return chunks


def test_reference_examples(slow, fast, hf_tokenizer):
    for tok in (slow, fast, hf_tokenizer):
        assert tok("def hello_world():")["input_ids"] == [4299, 23748, 62, 6894, 33529]
        assert tok("    return x")["input_ids"] == [50284, 7783, 2124]
    assert len(slow) == len(fast) == len(hf_tokenizer) == 50295
    assert slow.vocab_size == fast.vocab_size == hf_tokenizer.vocab_size == 50257
    assert fast.convert_tokens_to_ids(" " * 31) == 50257 and fast.convert_tokens_to_ids("\t" * 2) == 50294
    assert slow.eos_token_id == slow.bos_token_id == slow.pad_token_id == 50256


def test_stdlib_corpus_matches_transformers(slow, fast, hf_tokenizer):
    texts = stdlib_sources()
    expected = hf_tokenizer(texts)["input_ids"]
    assert fast(texts)["input_ids"] == expected
    assert [slow.encode(t) for t in texts] == expected
    assert fast.batch_decode(expected) == texts
    assert [slow.decode(ids) for ids in expected] == texts


def test_unicode_whitespace_and_edge_cases_match_transformers(slow, fast, hf_tokenizer):
    texts = tricky_texts()
    expected = hf_tokenizer(texts)["input_ids"]
    assert fast(texts)["input_ids"] == expected
    assert slow(texts)["input_ids"] == expected
    assert [slow.decode(i) for i in expected] == texts == fast.batch_decode(expected)


def test_every_code_point_matches_transformers(slow, fast, hf_tokenizer):
    texts = every_code_point()
    expected = hf_tokenizer(texts)["input_ids"]
    assert fast(texts)["input_ids"] == expected
    assert slow(texts)["input_ids"] == expected


def test_lone_surrogates_are_refused_clearly(slow, fast, hf_tokenizer):
    with pytest.raises(Exception):  # noqa: B017 - transformers refuses too, with a TypeError
        hf_tokenizer("a\ud800b")
    for tok in (slow, fast):
        with pytest.raises(ValueError, match="lone surrogate U\\+D800 at index 1"):
            tok("a\ud800b")
        with pytest.raises(ValueError, match="lone surrogate U\\+DFFF at index 0"):
            tok(["ok", "\udfff"])


def test_decoding_arbitrary_ids_matches_transformers(slow, fast, hf_tokenizer):
    """Partial UTF-8 sequences, added tokens, eos and untrained ids (>= 50295) decode alike."""
    rng = random.Random(1)
    byte_tokens = list(range(188, 256)) + list(range(0, 188))  # single-byte tokens, many non-ASCII
    for _ in range(2000):
        ids = [rng.choice([rng.randrange(51200), rng.choice(byte_tokens), rng.randrange(50256, 50295)])
               for _ in range(rng.randint(0, 12))]
        for skip in (False, True):
            expected = hf_tokenizer.decode(ids, skip_special_tokens=skip)
            assert slow.decode(ids, skip_special_tokens=skip) == expected, ids
            assert fast.decode(ids, skip_special_tokens=skip) == expected, ids
    assert fast.decode(torch.tensor([50256, 318]), skip_special_tokens=True) == " is"
    with pytest.raises(ValueError, match="token id -1 is negative"):
        slow.decode([5, -1])


def test_truncate_before_pattern_matches_transformers(slow, fast, hf_tokenizer):
    rng = random.Random(2)
    lines = ["def f(x):", "    return x", "print(1)", "# comment", "", "'''doc'''", '"""doc"""', "x = 1",
             "<|endoftext|>", "  # indented comment", "class A:", "def g():", "print('a')", "if x:"]
    patterns = list(DEFAULT_TRUNCATE_PATTERNS)
    for _ in range(1500):
        text = "\n".join(rng.choice(lines) for _ in range(rng.randint(0, 12)))
        ids = hf_tokenizer(text)["input_ids"]
        for pats in (patterns, ["\n\n\n"], [r"^\s*#"]):
            expected = hf_tokenizer.decode(ids, truncate_before_pattern=pats)
            assert slow.decode(ids, truncate_before_pattern=pats) == expected
            assert fast.decode(ids, truncate_before_pattern=pats) == expected
            assert truncate_before_pattern(text, pats) == expected


def test_call_padding_masks_and_tensors(fast, slow):
    for tok in (fast, slow):
        batch = tok(["def f():", "x"], padding=True, return_tensors="pt")
        assert batch.input_ids.tolist() == [[4299, 277, 33529], [50256, 50256, 87]]
        assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
        right = tok(["def f():", "x"], padding=True, padding_side="right")
        assert right["input_ids"] == [[4299, 277, 33529], [87, 50256, 50256]]
        assert right["attention_mask"] == [[1, 1, 1], [1, 0, 0]]
        assert tok("x", padding="max_length", max_length=4)["input_ids"] == [50256, 50256, 50256, 87]
        arr = tok(["a b", "c d"], return_tensors="np")
        assert isinstance(arr["input_ids"], np.ndarray) and arr["input_ids"].shape == (2, 2)
        assert tok("a b c d e", truncation=True, max_length=2)["input_ids"] == [64, 275]
        assert tok.encode("def hello_world():", return_tensors="pt").shape == (1, 5)
        assert tok("x", return_token_type_ids=True)["token_type_ids"] == [0]
        assert tok.tokenize("def f") == ["def", "Ġf"]
        assert tok.batch_decode(torch.tensor([[4299, 277], [50256, 87]]), skip_special_tokens=True) == ["def f", "x"]
        with pytest.raises(ValueError, match="pass padding=True"):
            tok(["a", "b c"], return_tensors="pt")
        with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
            tok("a", padding=True, padding_side="middle")
        with pytest.raises(TypeError, match="text 1 is a int"):
            tok(["a", 3])


def test_token_type_ids_helper(fast, slow):
    """The reference CodeGen tokenizer (transformers 4.x; 5.x dropped the method) has no cls/sep
    tokens, so a single sequence is all 0s and a pair is 0s then 1s."""
    for tok in (fast, slow):
        assert tok.create_token_type_ids_from_sequences([1, 2, 3]) == [0, 0, 0]
        assert tok.create_token_type_ids_from_sequences([1, 2], [3, 4, 5]) == [0, 0, 1, 1, 1]
        assert tok.create_token_type_ids_from_sequences([], []) == []


def test_save_and_load_round_trips_with_transformers(fast, slow, tmp_path):
    sample = tricky_texts()[:400]
    fast.save_pretrained(tmp_path / "fast")
    names = sorted(p.name for p in (tmp_path / "fast").iterdir())
    assert names == ["added_tokens.json", "merges.txt", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json", "vocab.json"]
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "fast")
    assert hf(sample)["input_ids"] == fast(sample)["input_ids"]
    # tokenizer.json alone is enough for both implementations
    only_json = tmp_path / "json-only"
    only_json.mkdir()
    (only_json / "tokenizer.json").write_text((tmp_path / "fast" / "tokenizer.json").read_text())
    for cls in (CodeGenTokenizer, CodeGenTokenizerFast):
        assert cls.from_pretrained(only_json)(sample)["input_ids"] == fast(sample)["input_ids"]
    # and transformers' own save loads into ours
    hf.save_pretrained(tmp_path / "hf")
    for cls in (CodeGenTokenizer, CodeGenTokenizerFast):
        assert cls.from_pretrained(tmp_path / "hf")(sample)["input_ids"] == fast(sample)["input_ids"]
    vocab_path, merges_path = slow.save_vocabulary(tmp_path / "vocab", filename_prefix="p")
    assert Path(vocab_path).name == "p-vocab.json"
    assert Path(merges_path).read_text() == (ASSETS / "merges.txt").read_text()
    assert json.loads(Path(vocab_path).read_text()) == json.loads((ASSETS / "vocab.json").read_text())


def test_folder_without_added_tokens_is_plain_gpt2(tmp_path, fast):
    """Take the added tokens from whatever files a checkpoint folder has (the nl models may lack them)."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((ASSETS / name).read_bytes())
    text = "def f():\n        return   1\n\t\t\tx"
    hf = transformers.CodeGenTokenizer.from_pretrained(tmp_path)
    for cls in (CodeGenTokenizer, CodeGenTokenizerFast):
        tok = cls.from_pretrained(tmp_path)
        assert len(tok) == 50257
        assert tok(text)["input_ids"] == hf(text)["input_ids"]
        assert max(tok(text)["input_ids"]) < 50257
    assert fast(text)["input_ids"] != hf(text)["input_ids"]


def test_bad_tokenizer_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        CodeGenTokenizerFast.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text("{oops")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(ValueError, match=r"vocab\.json is not valid JSON"):
        CodeGenTokenizer.from_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match=r"merges\.txt:2: expected two tokens"):
        CodeGenTokenizer.from_pretrained(tmp_path)


def test_offline_name_uses_bundled_files_with_licence():
    assert (ASSETS / "LICENSE.gpt2-vocab").read_text().count("MIT License") == 1
    assert CodeGenTokenizer.from_pretrained("Salesforce/codegen-6B-nl")("  x")["input_ids"] == [50286, 87]


def whisper_sdist(tmp_path: Path) -> Path:
    """The openai-whisper sdist: CODEGEN_LM_WHISPER_SDIST if set (CI downloads it once), else pip."""
    if os.environ.get("CODEGEN_LM_WHISPER_SDIST"):
        return Path(os.environ["CODEGEN_LM_WHISPER_SDIST"])
    subprocess.run([sys.executable, "-m", "pip", "download", "openai-whisper", "--no-deps", "--no-binary", ":all:",
                    "-d", str(tmp_path), "-q"], check=True)
    return next(tmp_path.glob("openai*whisper*.tar.gz"))


def test_build_script_reproduces_the_bundled_vocabulary(tmp_path):
    sdist = whisper_sdist(tmp_path / "dl")
    out = tmp_path / "assets"
    subprocess.run([sys.executable, str(REPO / "scripts" / "build_codegen_vocab.py"), "--sdist", str(sdist),
                    "--out", str(out)], check=True, capture_output=True)
    for name in ("vocab.json", "merges.txt", "added_tokens.json", "LICENSE.gpt2-vocab"):
        assert (out / name).read_bytes() == (ASSETS / name).read_bytes(), name


def test_unicode_classes_are_current():
    """The generated character classes still describe the installed `tokenizers` library."""
    from tokenizers.pre_tokenizers import ByteLevel

    from codegen_lm.tokenizer import unicode_classes
    from codegen_lm.tokenizer.pretokenize import gpt2_pattern

    split = ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str
    rng = random.Random(3)
    sample = [rng.randrange(0x110000) for _ in range(20000)] + [a for a, _ in unicode_classes.LETTERS]
    for cp in sample:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        text = f"a{chr(cp)}1{chr(cp)} !{chr(cp)}"
        expected = [piece for piece, _ in split(text)]
        byte_map = __import__("codegen_lm.tokenizer.vocab", fromlist=["bytes_to_unicode"]).bytes_to_unicode()
        got = ["".join(byte_map[b] for b in piece.encode()) for piece in gpt2_pattern().findall(text)]
        assert got == expected, hex(cp)
    assert re.compile(gpt2_pattern().pattern)  # compiles from scratch too
