"""The tokenizer API both implementations share: calling, padding, decoding, saving and loading.

Subclasses supply three things: how to turn texts into ids (`_encode_batch`), ids into text
(`_decode`), and how to build themselves from vocabulary files (`_from_files`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .backend import build_fast_tokenizer
from .pretokenize import check_text
from .truncate import truncate_before_pattern as cut_completion
from .vocab import ASSETS, EOS_TOKEN, read_tokenizer_files

TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer_config.json",
                   "special_tokens_map.json"]


class BatchEncoding(dict):
    """A dict of `input_ids`, `attention_mask`, ... that also allows attribute access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class TokenizerBase:
    """Byte-level BPE with CodeGen's conventions: no BOS/EOS added on encode, no clean-up of spaces
    on decode, and (for generation) padding on the left with pad = eos unless told otherwise."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        added_tokens: dict[str, int] | None = None,
        special_tokens: set[str] | None = None,
        eos_token: str = EOS_TOKEN,
        pad_token: str | None = None,
        padding_side: str = "left",
        truncation_side: str = "right",
        model_max_length: int = 2048,
        name_or_path: str | None = None,
    ) -> None:
        if eos_token not in vocab and eos_token not in (added_tokens or {}):
            raise ValueError(f"eos token {eos_token!r} is not in the vocabulary")
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.added_tokens = dict(sorted((added_tokens or {}).items(), key=lambda kv: kv[1]))
        self.special_tokens = set(special_tokens or ()) | {eos_token}
        self.eos_token = eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length
        self.name_or_path = name_or_path
        self._check_side("padding_side", padding_side)
        self._check_side("truncation_side", truncation_side)
        self._id_to_token = {i: t for t, i in self.vocab.items()}
        self._id_to_token.update({i: t for t, i in self.added_tokens.items()})

    # ---- subclass hooks ---------------------------------------------------------------------------

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    @classmethod
    def _from_files(cls, folder: Path, **kwargs: Any) -> TokenizerBase:
        vocab, merges, added, special = read_tokenizer_files(folder)
        return cls(vocab, merges, added, special, **kwargs)

    # ---- special tokens and vocabulary ------------------------------------------------------------

    @property
    def eos_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.eos_token)

    # CodeGen's tokenizer uses <|endoftext|> for beginning, end and unknown alike.
    bos_token = property(lambda self: self.eos_token)
    bos_token_id = property(lambda self: self.eos_token_id)
    unk_token = property(lambda self: self.eos_token)
    unk_token_id = property(lambda self: self.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        return self.convert_tokens_to_ids(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (as in `transformers`)."""
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self._id_to_token)

    def get_vocab(self) -> dict[str, int]:
        return {**self.vocab, **self.added_tokens}

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            if tokens in self.added_tokens:
                return self.added_tokens[tokens]
            if tokens not in self.vocab:
                raise KeyError(f"token {tokens!r} is not in the vocabulary")
            return self.vocab[tokens]
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str | list[str]:
        if isinstance(ids, int):
            return self._id_to_token[ids]
        tokens = [self._id_to_token[i] for i in _as_id_list(ids) if i in self._id_to_token]
        return [t for t in tokens if not (skip_special_tokens and t in self.special_tokens)]

    def tokenize(self, text: str) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text))

    # ---- encoding -----------------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> Any:
        """Token ids of one text (CodeGen adds no special tokens, whatever add_special_tokens says)."""
        out = self(text, truncation=truncation, max_length=max_length, return_tensors=return_tensors,
                   return_attention_mask=False)
        return out["input_ids"]

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        return_token_type_ids: bool = False,
        padding_side: str | None = None,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a batch; pad (left by default) and return lists, "pt" or "np" arrays."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__}, expected str")
            check_text(t)
        ids = self._encode_batch(texts)
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            ids = [self._truncate(row, limit) for row in ids]
        padding_side = padding_side or self.padding_side
        self._check_side("padding_side", padding_side)
        masks = [[1] * len(row) for row in ids]
        if padding in (True, "longest", "max_length"):
            width = max((len(r) for r in ids), default=0)
            if padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                width = max(width, max_length)
            ids = [self._pad(r, width, self.pad_token_id, padding_side) for r in ids]
            masks = [self._pad(m, width, 0, padding_side) for m in masks]
        elif padding not in (False, None, "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")
        out = BatchEncoding(input_ids=ids[0] if single else ids)
        if return_attention_mask:
            out["attention_mask"] = masks[0] if single else masks
        if return_token_type_ids:
            types = [[0] * len(r) for r in ids]
            out["token_type_ids"] = types[0] if single else types
        return self._to_tensors(out, return_tensors, single)

    def _truncate(self, row: list[int], limit: int) -> list[int]:
        if len(row) <= limit:
            return row
        return row[:limit] if self.truncation_side == "right" else row[len(row) - limit :]

    @staticmethod
    def _pad(row: list[int], width: int, value: int, side: str) -> list[int]:
        fill = [value] * (width - len(row))
        return fill + row if side == "left" else row + fill

    @staticmethod
    def _check_side(name: str, side: str) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")

    @staticmethod
    def _to_tensors(out: BatchEncoding, return_tensors: str | None, single: bool) -> BatchEncoding:
        if return_tensors is None:
            return out
        rows = [out["input_ids"]] if single else out["input_ids"]
        if len({len(r) for r in rows}) > 1:
            raise ValueError("texts have different lengths; pass padding=True to return tensors")
        if return_tensors == "pt":
            import torch

            return BatchEncoding({k: torch.tensor([v] if single else v, dtype=torch.long) for k, v in out.items()})
        if return_tensors == "np":
            import numpy as np

            return BatchEncoding({k: np.array([v] if single else v, dtype=np.int64) for k, v in out.items()})
        raise ValueError(f"return_tensors must be None, 'pt' or 'np', got {return_tensors!r}")

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Segment ids for one sequence (all 0) or a pair (0s then 1s); CodeGen adds no special tokens."""
        if token_ids_1 is None:
            return [0] * len(token_ids_0)
        return [0] * len(token_ids_0) + [1] * len(token_ids_1)

    # ---- decoding -----------------------------------------------------------------------------------

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        truncate_before_pattern: Sequence[str] | None = None,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str:
        """Text of `token_ids` (ids outside the vocabulary are dropped, as `transformers` does);
        `truncate_before_pattern` cuts it where a completion ends (see truncate.py)."""
        text = self._decode(_as_id_list(token_ids), skip_special_tokens)
        if truncate_before_pattern:
            text = cut_completion(text, truncate_before_pattern)
        return text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     truncate_before_pattern: Sequence[str] | None = None) -> list[str]:
        rows = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        return [self.decode(r, skip_special_tokens, truncate_before_pattern) for r in rows]

    # ---- files --------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str | os.PathLike, filename_prefix: str | None = None) -> tuple[str, str]:
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_path, merges_path = folder / f"{prefix}vocab.json", folder / f"{prefix}merges.txt"
        _write(vocab_path, json.dumps(self.vocab, ensure_ascii=False))
        _write(merges_path, "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        return str(vocab_path), str(merges_path)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """vocab.json, merges.txt, added_tokens.json, tokenizer.json and the config files that
        `transformers` reads."""
        folder = Path(save_directory)
        written = list(self.save_vocabulary(folder))
        files = {
            "added_tokens.json": json.dumps(self.added_tokens, ensure_ascii=False),
            "special_tokens_map.json": json.dumps(
                {"bos_token": self.eos_token, "eos_token": self.eos_token, "unk_token": self.eos_token}
            ),
            "tokenizer_config.json": json.dumps(
                {
                    "tokenizer_class": "CodeGenTokenizer",
                    "add_prefix_space": False,
                    "bos_token": self.eos_token,
                    "eos_token": self.eos_token,
                    "unk_token": self.eos_token,
                    "pad_token": self.pad_token if self.pad_token != self.eos_token else None,
                    "padding_side": self.padding_side,
                    "model_max_length": self.model_max_length,
                },
                indent=2,
            ),
            "tokenizer.json": self.to_tokenizer_json(),
        }
        for name, content in files.items():
            _write(folder / name, content)
            written.append(str(folder / name))
        return tuple(written)

    def to_tokenizer_json(self) -> str:
        """The `tokenizers` serialisation of this tokenizer (fast loaders read it directly)."""
        return build_fast_tokenizer(self.vocab, self.merges, self.added_tokens, self.special_tokens).to_str()

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = "Salesforce/codegen-350M-mono", **kwargs: Any):
        """A folder with tokenizer files, a hub repository (its files, cached or downloaded), or one
        of the 12 released CodeGen names, which fall back to the bundled vocabulary offline."""
        folder = _tokenizer_folder(name_or_path, kwargs.pop("revision", None), kwargs.pop("cache_dir", None))
        config = _read_tokenizer_config(folder)
        for key in ("padding_side", "truncation_side", "model_max_length", "pad_token"):
            if config.get(key) is not None:
                kwargs.setdefault(key, config[key])
        if config.get("eos_token") is not None:
            eos = config["eos_token"]
            kwargs.setdefault("eos_token", eos["content"] if isinstance(eos, dict) else eos)
        if isinstance(kwargs.get("pad_token"), dict):
            kwargs["pad_token"] = kwargs["pad_token"]["content"]
        kwargs.setdefault("name_or_path", str(name_or_path))
        return cls._from_files(folder, **kwargs)



def _as_id_list(token_ids: Any) -> list[int]:
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    if isinstance(token_ids, int):
        token_ids = [token_ids]
    ids = list(token_ids)
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"token ids must be integers, got {i!r}")
        if i < 0:
            raise ValueError(f"token id {i} is negative")
    return ids


def _write(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)


def _read_tokenizer_config(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def _has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


def _tokenizer_folder(name_or_path: str | os.PathLike, revision: str | None, cache_dir: Any) -> Path:
    from ..config import RELEASED_CHECKPOINTS
    from ..hub import resolve_files

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not _has_tokenizer_files(path):
            raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
        return path
    if name in RELEASED_CHECKPOINTS:
        # Use the hub's files when they are cached (the nl models may differ); never wait on the network.
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                            allow_patterns=TOKENIZER_FILES))
            if _has_tokenizer_files(cached):
                return cached
        except Exception:
            pass
        return ASSETS
    folder = resolve_files(name, TOKENIZER_FILES, complete=_has_tokenizer_files, revision=revision,
                           cache_dir=cache_dir)
    if not _has_tokenizer_files(folder):
        raise FileNotFoundError(f"{name}: no tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
    return folder
