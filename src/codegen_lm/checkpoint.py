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
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .config import CodeGenConfig, read_json
from .hub import hub_blob_dir, resolve_files
from .quantize import is_quantized, quantize_model

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN = "pytorch_model.bin"
# Our fused projection's tensors whose rows are permuted between the HF layout and ours.
QKV_KEYS = (".attn.qkv_proj.weight", ".attn.qkv_proj.weight_scale")
# Buffers old checkpoints carry that hold no learned weights.
LEGACY_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".attn.causal_mask")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the file and key."""


def _first_line(exc: BaseException) -> str:
    """The gist of a library's exception in one line (torch's can run to a page of advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line[: line.index(". ") + 1] if len(line) > 160 and ". " in line else line


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
            return _index_shards(folder, index)
        if (folder / single).is_file():
            return [folder / single]
    raise CheckpointError(
        f"{folder}: no model weights found (expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX})"
    )


def _index_shards(folder: Path, index: Path) -> list[Path]:
    """The shards a shard index names, each checked to be a regular file inside the checkpoint: an
    index is data from whoever made the checkpoint, and must not point the loader at other files
    (`../x`, absolute paths, or links out of the folder; the hub cache's links into its blob store
    are the one exception)."""
    try:
        data = read_json(index, max_bytes=256 << 20)
    except (ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"not a valid shard index: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: not a valid shard index (expected \"weight_map\": {{tensor name: file name}})")
    roots = [folder.resolve()]
    blobs = hub_blob_dir(folder)
    if blobs is not None:
        roots.append(blobs.resolve())
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts:
            raise CheckpointError(f"{index} names shard {name!r}, a path outside the checkpoint folder; refused")
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{index} lists shard {name}, which is not in {folder}")
        target = path.resolve()
        if not any(target.is_relative_to(root) for root in roots):
            raise CheckpointError(
                f"{index} names shard {name!r}, a link to {target} outside the checkpoint folder; refused"
            )
        shards.append(path)
    if not shards:
        raise CheckpointError(f"{index}: the shard index lists no files")
    return shards


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


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file (tensor name -> dtype, shape, data offsets) and where its data
    starts, checked by the safetensors library (offsets cover the file exactly) without reading data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(header_len))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors file (corrupt or truncated?): {_first_line(exc)}"
        ) from None
    return {key: header[key] for key in keys}, 8 + header_len


def _safetensors_dtype(path: Path, key: str, name: str) -> torch.dtype:
    dtype = _SAFETENSORS_DTYPES.get(name)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {key!r} has dtype {name}, which we cannot read")
    return dtype


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """Tensors as views of a private mapping of the file, copied by the caller straight into the
    parameters (converting dtype on the way) with no intermediate copy."""
    header, data_start = _safetensors_header(path)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) if header else None
    try:
        for key, info in header.items():
            dtype = _safetensors_dtype(path, key, info["dtype"])
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
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"its pickle would call {found.group(1)}" if found else _first_line(exc)
        raise CheckpointError(
            f"{path}: refused to unpickle it: not a plain weights file ({what}; only tensors are loaded, "
            f"torch.load with weights_only=True)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, MemoryError) as exc:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (corrupt or truncated?): {_first_line(exc)}"
        ) from None
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
    """Map an HF state-dict key to ours (the same module names; only the prefix of a bare
    CodeGenModel differs); None for keys we ignore."""
    if hf_key.endswith(LEGACY_BUFFER_SUFFIXES):
        return None
    if not has_lm_head:  # a bare CodeGenModel: no prefix, no head
        if hf_key.startswith("lm_head."):
            return None
        return hf_key.removeprefix("transformer.")
    return hf_key


def _hf_key(internal_key: str, has_lm_head: bool) -> str:
    return internal_key if has_lm_head else "transformer." + internal_key


def _config_of(model: torch.nn.Module) -> CodeGenConfig:
    return model.config


_CHUNK_BYTES = 16 << 20


@torch.no_grad()
def _copy_into(param: torch.Tensor, tensor: torch.Tensor, rows: torch.Tensor | None, mapped: bool) -> torch.Tensor:
    """param = tensor (or tensor[rows]), a few MB at a time, releasing the source pages as it goes:
    a large tensor (the 200 MB embedding of a 350M model) never sits in memory twice. Returns the sum
    of what was written, which is finite only if every value is (the NaN check of load_weights)."""
    floating = param.is_floating_point()
    if tensor.dim() == 0 or tensor.shape[0] <= 1:
        param.copy_(tensor if rows is None else tensor[rows])
        total = param.sum() if floating else None
    else:
        total = None
        step = max(1, _CHUNK_BYTES // max(1, tensor[0].numel() * tensor.element_size()))
        for start in range(0, tensor.shape[0], step):
            end = min(start + step, tensor.shape[0])
            if rows is None:
                param[start:end].copy_(tensor[start:end])
                if mapped and tensor.is_contiguous():
                    release_pages(tensor[start:end])
            else:
                param[start:end].copy_(tensor[rows[start:end]])
            if floating:
                part = param[start:end].sum()
                total = part if total is None else total + part
    if mapped and tensor.is_contiguous():
        release_pages(tensor)
    return total if total is not None else torch.zeros(())


def _check_tensor(path: Path, hf_key: str, shape: tuple[int, ...], dtype: torch.dtype, want_shape: tuple[int, ...],
                  want_dtype: torch.dtype, config: CodeGenConfig) -> None:
    """Refuse a stored tensor that cannot fill its parameter, naming the file and the tensor."""
    if tuple(shape) != tuple(want_shape):
        raise CheckpointError(
            f"{path}: tensor {hf_key!r} has shape {list(shape)}, but the config "
            f"({config.n_layer} layers, n_embd={config.n_embd}, vocab_size={config.vocab_size}) "
            f"needs {list(want_shape)}"
        )
    if not dtype.is_floating_point and not (dtype == want_dtype == torch.int8):
        raise CheckpointError(f"{path}: tensor {hf_key!r} has dtype {dtype}; expected floating point")
    if dtype == torch.int8 and want_dtype != torch.int8:
        raise CheckpointError(f"{path}: tensor {hf_key!r} is int8 but the config is not int8-quantized")


def _missing_message(files: list[Path], shown: list[str], total: int) -> str:
    names = ", ".join(p.name for p in files)
    more = f" and {total - len(shown)} more" if total > len(shown) else ""
    return f"checkpoint {files[0].parent} ({names}) lacks {', '.join(map(repr, shown))}{more}"


def _unexpected_message(files: list[Path], unexpected: list[tuple[Path, str]], total: int | None = None) -> str:
    total = len(unexpected) if total is None else total
    shown = ", ".join(f"{k!r} (in {p.name})" for p, k in unexpected[:5])
    more = f" and {total - len(unexpected[:5])} more" if total > len(unexpected[:5]) else ""
    return f"checkpoint {files[0].parent} has tensors this CodeGen config does not use: {shown}{more}"


def _all_finite(tensor: torch.Tensor, total: torch.Tensor | None = None) -> bool:
    """Whether a tensor holds no NaN or infinity. `total`, its sum, is non-finite whenever an element
    is (IEEE arithmetic never turns inf or NaN back into a number); only then, or if the sum itself
    overflowed, look element by element, which is ~8x slower than the sum (isfinite makes a bool copy)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum() if total is None else total)):
        return True
    return bool(torch.isfinite(tensor).all())


def load_weights(model: torch.nn.Module, files: list[Path], strict: bool = True) -> None:
    """Fill every parameter of `model` from `files` (HF layout), converting dtype and layout.

    A tensor holding NaN or infinity (or values its new dtype cannot hold) is refused by name: loaded,
    it would only show up later as NaN logits, far from its cause."""
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
            _check_tensor(path, hf_key, tuple(tensor.shape), tensor.dtype, tuple(param.shape), param.dtype, config)
            total = _copy_into(param, tensor, perm if key.endswith(QKV_KEYS) else None, mapped)
            if not _all_finite(param, total):
                if _all_finite(tensor):
                    raise CheckpointError(f"{path}: tensor {hf_key!r} has values too large for {param.dtype}")
                raise CheckpointError(f"{path}: tensor {hf_key!r} holds NaN or infinite values")
            loaded.add(key)
    missing = [k for k in targets if k not in loaded]
    if missing:
        shown = [_hf_key(k, has_lm_head) if has_lm_head else k for k in missing[:5]]
        raise CheckpointError(_missing_message(files, shown, len(missing)))
    if unexpected:
        message = _unexpected_message(files, unexpected)
        if strict:
            raise CheckpointError(message + " (pass strict=False to ignore them)")
        warnings.warn(message, stacklevel=3)


# ---- checking a checkpoint before anything is allocated ----------------------------------------------

_LAYER_KEY = re.compile(r"^((?:transformer\.)?h)\.(0|[1-9][0-9]*)\.(.+)$")


def _meta_model(cls: type, config: CodeGenConfig, dtype: torch.dtype) -> torch.nn.Module:
    """`cls(config)` on the meta device, as loading builds it (int8 placeholders for an int8 config)."""
    with torch.device("meta"):
        model = cls(config)
        model.to(dtype=dtype)
        if is_quantized(config):  # int8 weights and their scales load into Int8Linear placeholders
            quantize_model(model, placeholders=True)
    return model


class ExpectedWeights:
    """The parameters (name, shape, dtype) a model of `cls` with `config` has, known from a one-layer
    model on the meta device whose layer stands for all of them: no step here grows with n_layer, so
    a config.json claiming 10^9 layers costs as little to check as a real one."""

    def __init__(self, cls: type, config: CodeGenConfig, dtype: torch.dtype = torch.float32) -> None:
        one = CodeGenConfig.from_dict({**config.to_dict(), "n_layer": 1})
        model = _meta_model(cls, one, dtype)
        model.tie_weights()
        self.config = config
        self.has_lm_head = hasattr(model, "lm_head")
        self.top: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.layer: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.order: list[str | None] = []  # top-level names in parameter order; None where the layers go
        self.prefix = ""
        for name, param in model.named_parameters(remove_duplicate=True):
            match = _LAYER_KEY.match(name)
            if match:
                self.prefix = match.group(1)
                if None not in self.order:
                    self.order.append(None)
                self.layer[match.group(3)] = (tuple(param.shape), param.dtype)
            else:
                self.order.append(name)
                self.top[name] = (tuple(param.shape), param.dtype)

    def get(self, key: str) -> tuple[tuple[int, ...], torch.dtype] | None:
        """(shape, dtype) of our parameter `key`, or None when the model has no such parameter."""
        if key in self.top:
            return self.top[key]
        match = _LAYER_KEY.match(key)
        if match and match.group(1) == self.prefix and int(match.group(2)) < self.config.n_layer:
            return self.layer.get(match.group(3))
        return None

    def count(self) -> int:
        return len(self.top) + self.config.n_layer * len(self.layer)

    def names(self) -> Iterator[str]:
        """Every parameter name, in the model's order (lazily: there may be billions)."""
        for name in self.order:
            if name is not None:
                yield name
                continue
            for i in range(self.config.n_layer):
                for suffix in self.layer:
                    yield f"{self.prefix}.{i}.{suffix}"

    def nbytes(self, dtype: torch.dtype) -> int:
        """Memory of the parameters in `dtype` (int8 ones stay int8), plus the rotary tables."""

        def size(entries: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> int:
            total = 0
            for shape, param_dtype in entries.values():
                numel = 1
                for dim in shape:
                    numel *= dim
                total += numel * (param_dtype.itemsize if param_dtype == torch.int8 else dtype.itemsize)
            return total

        rotary = 4 * self.config.n_positions * self.config.rotary_dims
        return size(self.top) + self.config.n_layer * size(self.layer) + rotary


def weight_manifest(files: list[Path]) -> Iterator[tuple[Path, str, tuple[int, ...], torch.dtype]]:
    """(file, name, shape, dtype) of every stored tensor, from safetensors headers (no data read) or
    a memory-mapped `.bin` (its pickle only; the tensor data stays on disk)."""
    for path in files:
        if path.suffix == ".safetensors":
            header, _ = _safetensors_header(path)
            for key, info in header.items():
                yield path, key, tuple(info["shape"]), _safetensors_dtype(path, key, info["dtype"])
        else:
            for key, tensor, _ in _iter_bin(path):
                yield path, key, tuple(tensor.shape), tensor.dtype


def check_weights(expected: ExpectedWeights, files: list[Path], strict: bool = True) -> None:
    """Check the stored tensors' names and shapes against the config before any memory is given to the
    model, with load_weights' messages: a config.json whose n_layer or n_embd does not match its weights
    is refused by naming the first missing, unexpected or misshapen tensor, not after allocating a model
    of the size the config claims."""
    config, has_lm_head = expected.config, expected.has_lm_head
    loaded: set[str] = set()
    unexpected: list[tuple[Path, str]] = []
    stored_layers: set[int] = set()
    for path, hf_key, shape, dtype in weight_manifest(files):
        key = _internal_key(hf_key, has_lm_head)
        if key is None:
            continue
        match = _LAYER_KEY.match(key)
        if match:
            stored_layers.add(int(match.group(2)))
        want = expected.get(key)
        if want is None:
            unexpected.append((path, hf_key))
            continue
        if key in loaded:
            raise CheckpointError(f"{path}: tensor {hf_key!r} appears twice in the checkpoint")
        _check_tensor(path, hf_key, shape, dtype, want[0], want[1], config)
        loaded.add(key)
    hint, limit = "", 5
    if stored_layers and len(stored_layers) != config.n_layer:  # the likely cause; one example will do
        hint, limit = f": config.json has n_layer={config.n_layer}, the weights hold {len(stored_layers)} layers", 1
    if len(loaded) < expected.count():
        shown = []
        for name in expected.names():
            if name not in loaded:
                shown.append(_hf_key(name, has_lm_head) if has_lm_head else name)
                if len(shown) == limit:
                    break
        raise CheckpointError(_missing_message(files, shown, expected.count() - len(loaded)) + hint)
    if unexpected and strict:
        message = _unexpected_message(files, unexpected[:limit], len(unexpected))
        raise CheckpointError(message + hint + " (pass strict=False to ignore them)")


def check_memory(nbytes: int, device: torch.device, what: str = "the model") -> None:
    """Refuse to build what cannot fit, before building it: on the CPU the kernel hands out memory
    lazily, so an oversized model is not refused by the allocator but killed halfway through loading."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if nbytes > free:
            raise CheckpointError(f"{what} needs {nbytes / 1e9:.1f} GB, but {device} has {free / 1e9:.1f} GB free")
    elif device.type == "cpu":
        available = _cpu_memory_available()
        if available is not None and nbytes > available:
            raise CheckpointError(
                f"{what} needs {nbytes / 1e9:.1f} GB, but this machine has {available / 1e9:.1f} GB of memory available"
            )


def _cpu_memory_available() -> int | None:
    """MemAvailable plus free swap from /proc/meminfo, or less where a cgroup (a container) caps this
    process's memory; None where neither can be read."""
    try:
        with open("/proc/meminfo") as fh:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.split()[1:2]}
        available = fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, ValueError, IndexError, KeyError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


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
    """Load a checkpoint: config, then the weights' names and shapes checked against it, then the
    memory it needs against what there is, and only then allocate and fill the model."""
    if quantize is not None and quantize != "int8":
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    folder = resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir)
    config = CodeGenConfig.from_json_file(folder / "config.json")
    files = find_weight_files(folder)
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but PyTorch sees no CUDA device")
    dtype = default_dtype(dtype, config, device)
    expected = ExpectedWeights(cls, config, dtype)
    check_weights(expected, files, strict=strict)
    check_memory(expected.nbytes(dtype), device, f"{folder} in {str(dtype).removeprefix('torch.')}")
    model = _meta_model(cls, config, dtype)
    model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, files, strict=strict)
    model.reset_rotary()
    if quantize is not None and not is_quantized(model.config):
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
        if key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"the model has LoRA layers ({key}): merge them first (codegen_lm.lora.merge_lora) "
                             "or save the adapter alone (codegen_lm.lora.save_adapter)")
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
                raise CheckpointError(f"{path}: not a readable safetensors file: {_first_line(exc)}") from None
        else:
            for key, tensor, _ in _iter_bin(path):
                count(key, tensor.numel(), str(tensor.dtype).removeprefix("torch."), tensor.element_size())
    return {"files": [p.name for p in files], "parameters": params, "bytes": nbytes, "dtypes": dtypes}
