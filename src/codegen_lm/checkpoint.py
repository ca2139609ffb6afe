"""Read and write CodeGen checkpoints in the Hugging Face layout.

Reading streams one tensor at a time into a model whose parameters were allocated once (on the
meta device first, then `to_empty`), converting dtype and layout on the way, so that loading never
holds a second copy of the weights: both formats are read through memory maps whose pages are handed
back to the kernel once copied, so the source file's pages do not pile up in memory either.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import CodeGenConfig
from .hub import resolve_files
from .quantize import is_quantized, quantize_model

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN = "pytorch_model.bin"
# Our fused projection's tensors whose rows are permuted between the HF layout and ours.
QKV_KEYS = (".attn.qkv.weight", ".attn.qkv.weight_scale")
# Buffers old checkpoints carry that hold no learned weights.
LEGACY_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attn.causal_mask")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and key."""


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return DTYPES[name]


# ---- locating weight files -------------------------------------------------------------------------


def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, safetensors first, shards in index order."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{index}: not a valid shard index ({exc!r})") from None
            shards = list(dict.fromkeys(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard {missing[0]}, which is not in {folder}")
            return [folder / s for s in shards]
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"{folder}: no model weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX})"
    )


def _has_weights(folder: Path) -> bool:
    try:
        return (folder / "config.json").is_file() and bool(find_weight_files(folder))
    except CheckpointError:
        return False


def resolve_model_dir(
    name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A folder with config.json and weights: preferring safetensors, falling back to `.bin`."""
    common = ["config.json", "*.json", "*.txt"]
    folder = resolve_files(
        name_or_path,
        [*common, "*.safetensors"],
        complete=lambda f: _has_weights(f),
        revision=revision,
        cache_dir=cache_dir,
    )
    if not _has_weights(folder):
        folder = resolve_files(
            name_or_path, [*common, "*.bin"], complete=_has_weights, revision=revision, cache_dir=cache_dir
        )
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json")
    return folder


# ---- reading tensors -------------------------------------------------------------------------------


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """Yield (key, tensor, mapped) from one weight file; each tensor is only valid until the next
    one. `mapped` says the tensor lives in a private read-only file mapping, whose pages
    `release_pages` may hand back to the kernel once they have been copied."""
    if path.suffix == ".safetensors":
        yield from _iter_safetensors(path)
    else:
        yield from _iter_bin(path)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """Tensors as views of a private mapping of the file, copied by the caller straight into the
    parameters (converting dtype on the way) with no intermediate copy."""
    from safetensors import SafetensorError, safe_open

    try:  # the library validates the header and that the offsets cover the file exactly
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): {exc}") from None
    data_start = 8 + header_len
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if keys else None
    try:
        for key in keys:
            info = header[key]
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which we cannot read")
            begin, _end = (data_start + o for o in info["data_offsets"])
            numel = 1
            for dim in info["shape"]:
                numel *= dim
            if numel == 0:
                tensor = torch.empty(info["shape"], dtype=dtype)
            else:
                tensor = torch.frombuffer(mapped, dtype=dtype, count=numel, offset=begin).view(info["shape"])
            yield key, tensor, numel > 0
            del tensor
    finally:
        if mapped is not None:
            mapped.close()


def _iter_bin(path: Path) -> Iterator[tuple[str, torch.Tensor, bool]]:
    mapped = True
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # pre-zipfile format files cannot be mapped; read them whole
                raise
            mapped = False
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle it (only plain tensors are loaded, never arbitrary objects): {exc}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    for key in list(state):
        tensor = state.pop(key)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(tensor).__name__}, not a tensor")
        yield key, tensor, mapped
        del tensor


_libc = None


def release_pages(tensor: torch.Tensor) -> None:
    """Tell the kernel we are done with the file-mapped pages under `tensor` (contiguous), so that a
    streamed load does not keep the file resident. Only for tensors of a private, never-written file
    mapping, whose pages are simply re-read from the file if touched again (on anonymous memory,
    DONTNEED would zero live data)."""
    global _libc
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0 or tensor.device.type != "cpu":
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        start = tensor.data_ptr() // page * page
        end = -(-(tensor.data_ptr() + nbytes) // page) * page
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
    except (OSError, AttributeError):
        pass


# ---- layout conversion -----------------------------------------------------------------------------


def qkv_permutation(config: CodeGenConfig) -> torch.Tensor:
    """Row indices p such that internal_qkv = hf_qkv[p] (see model.py for both layouts).

    The checkpoint's fused rows form 4 blocks ("mp_num") of [query, value, key], E/4 rows each;
    feature f of q, v or k lives in block f // (E/4). Internally, rotary dims of each q/k head are
    reordered even-first.
    """
    E, H, D, rd = config.n_embd, config.n_head, config.head_dim, config.rotary_dims
    local = E // 4
    feature = torch.arange(E)

    def rows(part: int) -> torch.Tensor:
        return (feature // local) * 3 * local + part * local + feature % local

    within_head = torch.cat((torch.arange(0, rd, 2), torch.arange(1, rd, 2), torch.arange(rd, D)))
    rotary_order = (torch.arange(H)[:, None] * D + within_head[None]).reshape(-1)
    q, v, k = rows(0), rows(1), rows(2)
    return torch.cat((q[rotary_order], k[rotary_order], v))


def _internal_key(hf_key: str, has_lm_head: bool) -> str | None:
    """Map an HF state-dict key to ours; None for keys we ignore."""
    if hf_key.endswith(LEGACY_BUFFER_SUFFIXES):
        return None
    key = hf_key.replace(".attn.qkv_proj.", ".attn.qkv.")
    if not has_lm_head:  # a bare CodeGenModel: no prefix, no head
        if key.startswith("lm_head."):
            return None
        key = key.removeprefix("transformer.")
    return key


def _hf_key(internal_key: str, has_lm_head: bool) -> str:
    key = internal_key.replace(".attn.qkv.", ".attn.qkv_proj.")
    return key if has_lm_head else "transformer." + key


def _config_of(model: torch.nn.Module) -> CodeGenConfig:
    return model.config


_CHUNK_BYTES = 16 << 20


@torch.no_grad()
def _copy_into(param: torch.Tensor, tensor: torch.Tensor, rows: torch.Tensor | None, mapped: bool) -> None:
    """param = tensor (or tensor[rows]), a few MB at a time, releasing the source pages as it goes:
    a large tensor (the 200 MB embedding of a 350M model) never sits in memory twice."""
    if tensor.dim() == 0 or tensor.shape[0] <= 1:
        param.copy_(tensor if rows is None else tensor[rows])
    else:
        step = max(1, _CHUNK_BYTES // max(1, tensor[0].numel() * tensor.element_size()))
        for start in range(0, tensor.shape[0], step):
            end = min(start + step, tensor.shape[0])
            if rows is None:
                param[start:end].copy_(tensor[start:end])
                if mapped and tensor.is_contiguous():
                    release_pages(tensor[start:end])
            else:
                param[start:end].copy_(tensor[rows[start:end]])
    if mapped and tensor.is_contiguous():
        release_pages(tensor)


def load_weights(model: torch.nn.Module, files: list[Path], strict: bool = True) -> None:
    """Fill every parameter of `model` from `files` (HF layout), converting dtype and layout."""
    config = _config_of(model)
    has_lm_head = hasattr(model, "lm_head")
    targets = dict(model.named_parameters(remove_duplicate=True))
    perm = qkv_permutation(config)
    loaded: set[str] = set()
    unexpected: list[tuple[Path, str]] = []
    for path in files:
        for hf_key, tensor, mapped in iter_tensors(path):
            key = _internal_key(hf_key, has_lm_head)
            if key is None:
                continue
            param = targets.get(key)
            if param is None:
                unexpected.append((path, hf_key))
                continue
            if key in loaded:
                raise CheckpointError(f"{path}: tensor {hf_key!r} appears twice in the checkpoint")
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{path}: tensor {hf_key!r} has shape {list(tensor.shape)}, but the config "
                    f"({config.n_layer} layers, n_embd={config.n_embd}, vocab_size={config.vocab_size}) "
                    f"needs {list(param.shape)}"
                )
            if not tensor.is_floating_point() and not (tensor.dtype == param.dtype == torch.int8):
                raise CheckpointError(f"{path}: tensor {hf_key!r} has dtype {tensor.dtype}; expected floating point")
            if tensor.dtype == torch.int8 and param.dtype != torch.int8:
                raise CheckpointError(f"{path}: tensor {hf_key!r} is int8 but the config is not int8-quantized")
            _copy_into(param, tensor, perm if key.endswith(QKV_KEYS) else None, mapped)
            loaded.add(key)
    missing = [k for k in targets if k not in loaded]
    names = ", ".join(p.name for p in files)
    if missing:
        shown = ", ".join(repr(_hf_key(k, has_lm_head) if has_lm_head else k) for k in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {files[0].parent} ({names}) lacks {shown}{more}")
    if unexpected:
        shown = ", ".join(f"{k!r} (in {p.name})" for p, k in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        message = f"checkpoint {files[0].parent} has tensors this CodeGen config does not use: {shown}{more}"
        if strict:
            raise CheckpointError(message + " (pass strict=False to ignore them)")
        warnings.warn(message, stacklevel=3)


def default_dtype(requested: torch.dtype | str | None, config: CodeGenConfig, device: torch.device) -> torch.dtype:
    """None: fp32 on CPU (half-precision matmuls are slow there), the stored dtype elsewhere."""
    stored = parse_dtype(config.torch_dtype) if config.torch_dtype in DTYPES else torch.float32
    if requested is None:
        return torch.float32 if device.type == "cpu" else stored
    if requested == "auto":
        return stored
    return parse_dtype(requested)


def load_pretrained(
    cls: type,
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    strict: bool = True,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    quantize: str | None = None,
) -> torch.nn.Module:
    folder = resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir)
    config = CodeGenConfig.from_json_file(folder / "config.json")
    files = find_weight_files(folder)
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but PyTorch sees no CUDA device")
    dtype = default_dtype(dtype, config, device)
    with torch.device("meta"):
        model = cls(config)
        model.to(dtype=dtype)
        if is_quantized(config):  # int8 weights and their scales load into Int8Linear placeholders
            quantize_model(model, placeholders=True)
    model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, files, strict=strict)
    model.reset_rotary()
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if not is_quantized(model.config):
            quantize_model(model)
    model.name_or_path = str(name_or_path)
    return model.eval()


# ---- writing ---------------------------------------------------------------------------------------


def hf_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The model's weights (or `state_dict`, in our layout, e.g. gathered from FSDP shards) under HF
    names and in HF layout (tied weights written once)."""
    has_lm_head = hasattr(model, "lm_head")
    perm = qkv_permutation(_config_of(model))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    out = {}
    if state_dict is None:
        items = list(model.named_parameters(remove_duplicate=True))
    else:
        tied = has_lm_head and _config_of(model).tie_word_embeddings
        items = [(k, v) for k, v in state_dict.items() if not (tied and k == "lm_head.weight")]
    for key, param in items:
        tensor = param.detach()
        if key.endswith(QKV_KEYS):
            tensor = tensor[inverse]
        out[_hf_key(key, has_lm_head)] = tensor.contiguous()
    return out


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                         ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def save_pretrained(
    model: torch.nn.Module,
    folder: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write `config.json` and `model.safetensors` (sharded with an index above max_shard_size);
    `state_dict` (our parameter names) replaces the model's own weights when given.

    Files are written under temporary names and renamed into place, so an interrupted save never
    leaves a half-written checkpoint where a good one was.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model, state_dict)
    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        names = [SAFETENSORS]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tmp = folder / (name + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, folder / name)
    index_path = folder / SAFETENSORS_INDEX
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
            "weight_map": {key: name for name, shard in zip(names, shards) for key in shard},
        }
        tmp = folder / (SAFETENSORS_INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, index_path)
    elif index_path.exists():
        index_path.unlink()
    # Shards of an earlier, differently sharded save would shadow nothing but confuse readers.
    for stale in folder.glob("model-*-of-*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    config = _config_of(model)
    saved = CodeGenConfig.from_dict(config.to_dict())
    saved.torch_dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    saved.save_pretrained(folder)


# ---- inspection ------------------------------------------------------------------------------------


def describe_weights(files: list[Path]) -> dict[str, object]:
    """Parameter count, bytes and dtypes of the weights in `files`, read from headers only."""
    from safetensors import safe_open

    params = nbytes = 0
    dtypes: dict[str, int] = {}

    def count(key: str, numel: int, dtype: str, itemsize: int) -> None:
        nonlocal params, nbytes
        if key.endswith(LEGACY_BUFFER_SUFFIXES):
            return
        params += numel
        nbytes += numel * itemsize
        dtypes[dtype] = dtypes.get(dtype, 0) + numel

    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(path, framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                        sl = f.get_slice(key)
                        numel = 1
                        for d in sl.get_shape():
                            numel *= d
                        count(key, numel, names.get(sl.get_dtype(), sl.get_dtype()), sizes.get(sl.get_dtype(), 0))
            except Exception as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file: {exc}") from None
        else:
            for key, tensor, _ in _iter_bin(path):
                count(key, tensor.numel(), str(tensor.dtype).removeprefix("torch."), tensor.element_size())
    return {"files": [p.name for p in files], "parameters": params, "bytes": nbytes, "dtypes": dtypes}
