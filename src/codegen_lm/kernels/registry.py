"""Which kernel runs each matrix product, chosen per machine by measuring on the model's own shapes.

The fastest way to multiply depends on the CPU (AVX2 only, AVX-512, VNNI, AMX), on the number of rows
(one token decoding, a few samples, a prompt being prefilled) and on the weights' kind. So every way
we have is registered here as a `LinearPath` with a test of whether it can run on this machine; at
engine start `choose` times the paths that can, on the model's real product shapes, for each band of
row counts, and keeps the fastest. Choices are cached per CPU, library versions, threads and shapes
in the user cache folder (CODEGEN_LM_KERNEL_CACHE names the file), so a second start measures nothing.

Kinds (what the numbers are; paths of one kind agree to float rounding, so a choice among them never
changes the meaning of a result, only its speed):
- "fp32": fp32 weights and activations;
- "bf16": fp32 weights and activations rounded to bf16 at the product's input, fp32 sums and result
  (Engine(matmul_dtype="bfloat16"));
- "int8": int8 weights (one scale per output channel), fp32 activations (weight-only);
- "w8a8": int8 weights and activations quantized per row on the fly (w8a8.py).

Families (what `--kernels` forces): numba (our kernels), onednn (PyTorch's oneDNN paths), torch
(PyTorch's other paths: its BLAS, fbgemm). A forced family that has no path of a kind on this machine
falls back to the automatic choice for that kind.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import _numba, cpu, onednn, w8a8
from . import f32 as f32_kernels
from . import int8 as int8_kernels

KINDS = ("fp32", "bf16", "int8", "w8a8")
FAMILIES = ("auto", "numba", "onednn", "torch")
# Bands of row counts, by their largest member, and the row count each is timed at.
BANDS = (1, 4, 16, 32, None)
TIMED_ROWS = {1: 1, 4: 3, 16: 10, 32: 24, None: 160}
MARGIN = 0.05  # a path listed later must be this much faster to be chosen (timings on 2 busy cores are noisy)
MAX_TIMED_OUT = 4096  # output rows of a timed weight at most: time tracks in_features, not the weight's height
STREAMED_ROWS = 10  # up to this many timed rows, a product is timed on weights read from memory (see measure)
REGISTRY_VERSION = 6  # bumped when paths change, so cached choices from older ones are not trusted


@dataclass(frozen=True)
class Weights:
    """A product's weights as a path prepares them: fp32 [out, in], or int8 [out, in] and fp32 scales."""

    fp32: torch.Tensor | None = None
    w8: torch.Tensor | None = None
    scale: torch.Tensor | None = None


@dataclass(frozen=True)
class LinearPath:
    """One way to compute x [rows, in] @ W^T (no bias: the caller adds it) for weights of `kind`."""

    name: str
    family: str
    kind: str
    max_rows: int | None  # the most rows it is meant for (None: any)
    available: Callable[[], str | None]  # None where it can run here, else the reason it cannot
    prepare: Callable[[Weights], Any]  # whatever `run` needs, made once per weight
    run: Callable[[Any, torch.Tensor], torch.Tensor]
    group: int | None = None  # a numba row path: weight rows it takes at once (the block kernel follows it)

    def fits(self, rows: int) -> bool:
        return self.max_rows is None or rows <= self.max_rows


def _numba_available() -> str | None:
    return None if _numba.numba_ok() else "numba is not installed, is switched off or failed"


def _onednn_available() -> str | None:
    return None if onednn.available() else "this PyTorch build has no oneDNN packed products"


def _always() -> str | None:
    return None


def _bf16_native() -> str | None:
    return None if onednn.bf16_native() else "the CPU has no bf16 instructions (AVX512-BF16 or AMX)"


def _bf16_product(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(torch.bfloat16), w).float()


def _bf16_packed_product(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return onednn.packed_linear(x.to(torch.bfloat16), packed, None).float()


def _int8(weights: Weights) -> tuple[torch.Tensor, torch.Tensor]:
    assert weights.w8 is not None and weights.scale is not None
    return weights.w8, weights.scale


PATHS: tuple[LinearPath, ...] = (
    LinearPath("numba-f32-row", "numba", "fp32", 1, _numba_available, lambda w: w.fp32,
               lambda w, x: f32_kernels.f32_product(x, w, 4), group=4),
    LinearPath("numba-f32-row1", "numba", "fp32", 1, _numba_available, lambda w: w.fp32,
               lambda w, x: f32_kernels.f32_product(x, w, 1), group=1),
    LinearPath("onednn-f32-packed", "onednn", "fp32", None, _onednn_available,
               lambda w: onednn.pack_weight(w.fp32), lambda p, x: onednn.packed_linear(x, p, None)),
    LinearPath("torch-f32", "torch", "fp32", None, _always, lambda w: w.fp32, lambda w, x: F.linear(x, w)),
    LinearPath("onednn-bf16-packed", "onednn", "bf16", None, _bf16_native,
               lambda w: onednn.pack_weight(w.fp32, torch.bfloat16), _bf16_packed_product),
    LinearPath("torch-bf16", "torch", "bf16", None, _always, lambda w: w.fp32.to(torch.bfloat16), _bf16_product),
    LinearPath("numba-int8", "numba", "int8", int8_kernels.SMALL_ROWS, _numba_available, _int8,
               lambda w, x: int8_kernels.numba_product(x, *w, 4), group=4),
    LinearPath("numba-int8-row1", "numba", "int8", 1, _numba_available, _int8,
               lambda w, x: int8_kernels.numba_product(x, *w, 1), group=1),
    LinearPath("numba-int8-dequant", "numba", "int8", None, _numba_available, _int8,
               lambda w, x: int8_kernels.numba_dequant_product(x, *w)),
    LinearPath("torch-int8-dequant", "torch", "int8", None, _always, _int8,
               lambda w, x: int8_kernels.torch_dequant_product(x, *w)),
    LinearPath("torch-fbgemm-w8a8", "torch", "w8a8", None, w8a8.fbgemm_available,
               lambda w: w8a8.pack_fbgemm(*_int8(w)), w8a8.fbgemm_linear),
    LinearPath("onednn-w8a8", "onednn", "w8a8", None, w8a8.onednn_available,
               lambda w: w8a8.pack_onednn(*_int8(w)), w8a8.onednn_linear),
)


def paths(kind: str, family: str = "auto", exclude: frozenset[str] = frozenset()) -> list[LinearPath]:
    """The registered paths of `kind` that can run on this machine (of `family` unless "auto"), less
    those named in `exclude`."""
    return [p for p in PATHS if p.kind == kind and (family == "auto" or p.family == family)
            and p.name not in exclude and p.available() is None]


@dataclass(frozen=True)
class Plan:
    """The chosen path for each band of row counts (bands as in BANDS), and how the choice was made."""

    kind: str
    choices: tuple[tuple[int | None, str], ...]  # (band's largest row count or None, path name)
    source: str = "measured"  # measured | cached | only one path

    def path(self, rows: int) -> LinearPath:
        for limit, name in self.choices:
            if limit is None or rows <= limit:
                return BY_NAME[name]
        return BY_NAME[self.choices[-1][1]]

    def names(self) -> list[str]:
        """The distinct paths this plan uses, in band order."""
        return list(dict.fromkeys(name for _, name in self.choices))

    def describe(self) -> str:
        """"1 row: numba-f32-row; 2-4 rows: onednn-f32-packed; ...", for logs and benchmark reports."""
        parts, low = [], 1
        for limit, name in self.choices:
            band = f"{low}+" if limit is None else ("1 row" if limit == 1 else f"{low}-{limit}")
            parts.append(f"{band}{'' if limit == 1 else ' rows'}: {name}")
            low = (limit or 0) + 1
        return "; ".join(parts)


BY_NAME = {p.name: p for p in PATHS}


def cache_file() -> Path:
    """Where measured choices are kept (CODEGEN_LM_KERNEL_CACHE, else the user cache folder)."""
    env = os.environ.get("CODEGEN_LM_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "codegen-lm" / "kernels.json"


def machine_key(kind: str, shapes: Sequence[tuple[int, int]], family: str,
                exclude: frozenset[str] = frozenset()) -> str:
    """What a choice depends on: the CPU and its features, the libraries, threads, kind and shapes."""
    model, flags = cpu.cpu_info()
    numba_version = getattr(_numba.numba, "__version__", "none") if _numba.HAVE_NUMBA else "none"
    facts = {"cpu": model, "flags": sorted(flags), "torch": torch.__version__, "numba": numba_version,
             "threads": torch.get_num_threads(), "kind": kind, "family": family,
             "shapes": sorted([list(s) for s in shapes]), "registry": REGISTRY_VERSION,
             "paths": [p.name for p in paths(kind, family, exclude)]}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


_lock = threading.Lock()
_memo: dict[str, Plan] = {}


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, plan: Plan, times: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = {"kind": plan.kind, "choices": [[limit, name] for limit, name in plan.choices],
                     "cpu": cpu.description(), "times_ms": times}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
    except OSError:  # a read-only home: the choice is remade next start, nothing else is lost
        pass


def _valid(entry: object, kind: str, exclude: frozenset[str]) -> Plan | None:
    try:
        choices = tuple((None if limit is None else int(limit), str(name)) for limit, name in entry["choices"])
    except (TypeError, KeyError, ValueError):
        return None
    usable = {p.name for p in paths(kind, "auto", exclude)}
    if [c[0] for c in choices] != list(BANDS) or not all(name in usable for _, name in choices):
        return None
    return Plan(kind, choices, "cached")


def _time_together(runs: dict[str, list[Callable[[], object]]], least: int = 3, most: int = 30,
                   span: float = 0.004) -> dict[str, float]:
    """For each path, the fastest of its runs, a run being one product on every shape. The paths take
    turns, round after round (each round in another order), for `least` to `most` rounds or until
    `span` seconds per path and shape have passed: a shared machine's speed drifts over a measurement,
    and timing one path after the other would charge the drift to whichever came last."""
    names = list(runs)  # (the caller has run each once: first-call costs are not timed)
    if not names:
        return {}
    best = dict.fromkeys(names, float("inf"))
    budget = span * len(names) * max(len(fns) for fns in runs.values())
    begin = time.perf_counter()
    rounds = 0
    while rounds < least or (rounds < most and time.perf_counter() - begin < budget):
        shift = rounds % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for fn in runs[name]:
                fn()
            best[name] = min(best[name], time.perf_counter() - start)
        rounds += 1
    return best


def _timing_weights(kind: str, shape: tuple[int, int], generator: torch.Generator) -> Weights:
    out_features, in_features = min(shape[0], MAX_TIMED_OUT), shape[1]
    w = torch.randn(out_features, in_features, generator=generator) * 0.02
    if kind in ("fp32", "bf16"):
        return Weights(fp32=w)
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return Weights(w8=torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale=scale)


def _weight_bytes(w: Weights) -> int:
    return sum(t.numel() * t.element_size() for t in (w.fp32, w.w8) if t is not None)


def _copy(w: Weights) -> Weights:
    return Weights(*(None if t is None else t.clone() for t in (w.fp32, w.w8, w.scale)))


def _cycling(run: Callable[[Any, torch.Tensor], torch.Tensor], states: list, x: torch.Tensor) -> Callable[[], object]:
    """A product by the next of `states` (a weight's prepared copies) at each call."""
    ring = itertools.cycle(states)
    return lambda: run(next(ring), x)


@functools.lru_cache(maxsize=1)
def stream_bytes() -> int:
    """Bytes of distinct weights a timing of few rows cycles through: twice the last-level cache, at
    least 64 MB. A model's decoding step reads each weight from memory, but one 16 MB weight timed
    again and again sits in a 32 MB cache, and the path fastest from the cache is not always the one
    fastest from memory (on an AMD EPYC with AVX-512, oneDNN's packed product won from the cache and
    lost by 1.3x from memory)."""
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "level").read_text().strip() == "3":
                text = (index / "size").read_text().strip().upper()
                factor = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
                largest = max(largest, int(text.rstrip("KM")) * factor)
        except (OSError, ValueError):
            continue
    return max(2 * largest, 64 << 20)


def measure(kind: str, shapes: Sequence[tuple[int, int]], family: str = "auto",
            exclude: frozenset[str] = frozenset()) -> tuple[Plan, dict]:
    """Time every usable path of `kind` on `shapes` ([out, in] of the model's products) at each band's
    row count; returns the plan of the fastest and the times (ms, summed over the shapes). Up to
    STREAMED_ROWS rows, each run takes the next of enough copies of the weight to overflow the cache."""
    candidates = paths(kind, family, exclude)
    generator = torch.Generator().manual_seed(0)
    distinct = list(dict.fromkeys(tuple(s) for s in shapes))
    weights = [_timing_weights(kind, s, generator) for s in distinct]
    times: dict[str, dict[str, float]] = {}
    choices = []
    copies: list[list[Weights]] = []  # per shape: the weight and its copies, made when first needed
    with torch.inference_mode():
        prepared: dict[str, list] = {}
        streamed: dict[str, list[list]] = {}
        for band in BANDS:
            rows = TIMED_ROWS[band]
            stream = rows <= STREAMED_ROWS
            if stream and not copies:
                copies = [[w] + [_copy(w) for _ in range(max(0, -(-stream_bytes() // _weight_bytes(w)) - 1))]
                          for w in weights]
            # a forced family without a path for this many rows: the other families' paths
            fitting = ([p for p in candidates if p.fits(rows)]
                       or [p for p in paths(kind, "auto", exclude) if p.fits(rows)])
            runs: dict[str, list[Callable[[], object]]] = {}
            for path in fitting:
                try:
                    if path.name not in prepared:
                        prepared[path.name] = [path.prepare(w) for w in weights]
                    if stream and path.name not in streamed:
                        streamed[path.name] = [[first] + [path.prepare(c) for c in shape_copies[1:]]
                                               for first, shape_copies in zip(prepared[path.name], copies)]
                    xs = [torch.randn(rows, in_features, generator=generator) for _, in_features in distinct]
                    states = streamed[path.name] if stream else [[p] for p in prepared[path.name]]
                    runs[path.name] = [_cycling(path.run, group, x) for group, x in zip(states, xs)]
                    for fn in runs[path.name]:
                        fn()  # warm-up (numba's compile cache, oneDNN primitives); a path that fails is not chosen
                except Exception:
                    runs.pop(path.name, None)
            best, best_time = None, float("inf")
            for name, elapsed in _time_together(runs).items():  # (in registration order)
                times.setdefault(str(band), {})[name] = round(elapsed * 1e3, 4)
                if best is None or elapsed < best_time * (1 - MARGIN):
                    best, best_time = BY_NAME[name], elapsed
            if best is None:
                raise RuntimeError(f"no {kind} product path ran on this machine")
            choices.append((band, best.name))
            if not stream:
                streamed.clear()  # (bands only grow: the copies are not needed again)
                copies = [[w] for w in weights]
    return Plan(kind, tuple(choices), "measured"), times


def choose(kind: str, shapes: Sequence[tuple[int, int]], family: str = "auto",
           exclude: frozenset[str] = frozenset()) -> Plan:
    """The plan for products of `kind` with weights of `shapes` on this machine: from this process's
    memo, else the cache file, else measured (and cached). family: "auto", or a family to force
    (see module doc); exclude: paths not to use (the engine excludes packed copies of big models)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if family not in FAMILIES:
        raise ValueError(f"kernels must be one of {', '.join(FAMILIES)}, got {family!r}")
    if family != "auto" and not paths(kind, family, exclude):
        family = "auto"  # this family has no path of this kind here: the automatic choice
    key = machine_key(kind, shapes, family, exclude)
    with _lock:
        plan = _memo.get(key)
        if plan is not None:
            return plan
        usable = paths(kind, family, exclude)
        if not usable:
            raise RuntimeError(f"no {kind} product path can run on this machine")
        if len(usable) == 1 and usable[0].max_rows is None:
            plan = Plan(kind, tuple((band, usable[0].name) for band in BANDS), "only one path")
        else:
            path = cache_file()
            plan = _valid(_read_cache(path).get(key), kind, exclude)
            if plan is None:
                plan, times = measure(kind, shapes, family, exclude)
                _write_cache(path, key, plan, times)
        _memo[key] = plan
        return plan


def forget() -> None:
    """Drop this process's memo of plans (tests; a changed cache file is read again)."""
    with _lock:
        _memo.clear()
