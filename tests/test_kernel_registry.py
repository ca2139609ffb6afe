"""The kernel registry (kernels/registry.py): every path computes its kind's product, the choice is
measured, cached per machine and shape, forced by family, and falls back where a path cannot run;
the engine's int8 x int8 products (matmul_dtype="int8") stay close to fp32; the numba kernels around
them (per-row quantization, tanh GELU) match PyTorch's."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from codegen_lm import CodeGenForCausalLM
from codegen_lm.engine import Engine, GenerationParams, runner
from codegen_lm.engine.runner import Row
from codegen_lm.engine.slot_cache import SlotCache
from codegen_lm.engine.weights import PackedLinear, PlannedInt8Linear, plans
from codegen_lm.kernels import _numba, cpu, registry, w8a8
from codegen_lm.quantize import quantize_weight

from .test_engine import prompts

SHAPES = [(48, 32), (303, 96), (64, 256), (6, 20), (45, 24)]  # [out, in]: small, odd, wide; out % 4 = 0-3
ROWS = [1, 3, 17, 70]


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    """A fresh choice cache and no memo, so a test sees its own measurements."""
    path = tmp_path / "kernels.json"
    monkeypatch.setenv("CODEGEN_LM_KERNEL_CACHE", str(path))
    registry.forget()
    yield path
    registry.forget()


def _weights(kind: str, shape: tuple[int, int], seed: int) -> tuple[registry.Weights, torch.Tensor]:
    """A path's weights of `kind` and the fp32 matrix they stand for."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    if kind in ("fp32", "bf16"):
        return registry.Weights(fp32=w), w
    w8, scale = quantize_weight(w)
    return registry.Weights(w8=w8, scale=scale), w8.float() * scale[:, None]


@pytest.mark.parametrize("name", [p.name for p in registry.PATHS])
def test_every_path_computes_its_product(name):
    """Forced one by one, on every test shape and row count it is meant for: fp32 and int8-weight
    paths equal x @ W^T to float rounding; bf16 paths equal it with inputs rounded to bf16; int8 x
    int8 paths stay within the rounding of activations to int8 per row."""
    path = registry.BY_NAME[name]
    if path.available() is not None:  # a CPU feature or library this machine lacks (oneDNN's int8 needs VNNI)
        pytest.skip(f"{name} cannot run here: {path.available()}")
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for i, shape in enumerate(SHAPES):
            weights, dense = _weights(path.kind, shape, seed=i)
            state = path.prepare(weights)
            for rows in [r for r in ROWS if path.fits(r)]:
                x = torch.randn(rows, shape[1], generator=g)
                x[:, 0] *= 8  # an outlier channel, as LayerNorm outputs have
                out = path.run(state, x)
                ref = x @ dense.t()
                assert out.shape == ref.shape and out.dtype == torch.float32
                if path.kind == "bf16":  # inputs rounded to bf16, fp32 sums, the result rounded to bf16 at most
                    rounded = x.bfloat16().float() @ dense.bfloat16().float().t()
                    torch.testing.assert_close(out, rounded, rtol=8e-3, atol=2e-3)
                    assert not torch.equal(out, ref)
                elif path.kind == "w8a8":
                    error = (out - ref).norm(dim=1) / ref.norm(dim=1)  # per row
                    assert 0 < error.median() < 0.04 and error.max() < 0.1, (shape, rows, error)
                else:
                    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_w8a8_quantizes_each_row_on_its_own():
    """A row's result does not depend on the other rows of the batch (activation scales per row), and
    the fbgemm path does not saturate on inputs at the top of the int8 range on this CPU."""
    path = registry.BY_NAME["torch-fbgemm-w8a8"]
    if path.available() is not None:
        pytest.skip(path.available())
    weights, _ = _weights("w8a8", (64, 128), seed=3)
    state = path.prepare(weights)
    g = torch.Generator().manual_seed(2)
    small = torch.randn(1, 128, generator=g)
    big = torch.randn(1, 128, generator=g) * 1000
    with torch.inference_mode():
        alone = path.run(state, small)
        together = path.run(state, torch.cat([small, big]))[:1]
        torch.testing.assert_close(alone, together)
        # every activation at the row's maximum and every weight at +127: sums of 127 * 127 pairs, which
        # overflow 16-bit intermediate sums where the CPU has no VNNI unless activations use 7 bits
        w8 = torch.full((8, 256), 127, dtype=torch.int8)
        scale = torch.full((8,), 1 / 127)
        top = path.prepare(registry.Weights(w8=w8, scale=scale))
        x = torch.ones(2, 256)
        torch.testing.assert_close(path.run(top, x), torch.full((2, 8), 256.0), rtol=0.01, atol=0)


def test_choices_are_measured_cached_and_keyed_by_cpu_and_shape(cache_file, monkeypatch):
    shapes = [(96, 64), (64, 96)]
    plan = registry.choose("fp32", shapes)
    assert plan.source == "measured" and [band for band, _ in plan.choices] == list(registry.BANDS)
    data = json.loads(cache_file.read_text())
    (entry,) = data.values()
    assert entry["cpu"] == cpu.description() and entry["times_ms"]
    assert all(name in entry["times_ms"][str(band)] for band, name in plan.choices)  # the chosen were timed
    registry.forget()
    assert registry.choose("fp32", shapes) == registry.Plan("fp32", plan.choices, "cached")
    # another shape, another CPU: measured anew, the earlier entry kept
    registry.forget()
    assert registry.choose("fp32", [(96, 128)]).source == "measured"
    flags = cpu.cpu_info()[1]
    monkeypatch.setattr(cpu, "cpu_info", lambda: ("Another CPU", flags))
    registry.forget()
    assert registry.choose("fp32", shapes).source == "measured"
    assert len(json.loads(cache_file.read_text())) == 3
    # an entry naming a path that cannot run here is not trusted; a damaged file is measured over
    key = registry.machine_key("fp32", shapes, "auto")
    data = json.loads(cache_file.read_text())
    data[key]["choices"][0][1] = "no-such-path"
    cache_file.write_text(json.dumps(data))
    registry.forget()
    assert registry.choose("fp32", shapes).source == "measured"
    cache_file.write_text("{not json")
    registry.forget()
    assert registry.choose("fp32", shapes).source == "measured"
    assert key in json.loads(cache_file.read_text())


def test_a_forced_family_and_missing_paths_fall_back(cache_file, monkeypatch):
    shapes = [(96, 64)]
    assert registry.choose("fp32", shapes, "torch").names() == ["torch-f32"]
    forced = registry.choose("fp32", shapes, "numba")  # numba has fp32 kernels for one row only
    assert forced.path(1).name in ("numba-f32-row", "numba-f32-row1") and forced.path(2).family != "numba"
    assert registry.choose("int8", shapes, "onednn") == registry.choose("int8", shapes)  # none: auto
    with pytest.raises(ValueError, match="kernels must be one of"):
        registry.choose("fp32", shapes, "cuda")
    # numba missing: no numba path is offered or chosen
    monkeypatch.setattr(_numba, "HAVE_NUMBA", False)
    registry.forget()
    assert all(registry.BY_NAME[n].family != "numba" for n in registry.choose("int8", shapes).names())
    monkeypatch.setattr(_numba, "HAVE_NUMBA", True)
    # a CPU without AVX2 (nor VNNI, AMX) has no int8 x int8 path; one with VNNI may use oneDNN's, and fbgemm's 8 bits
    model, flags = cpu.cpu_info()
    plain = frozenset(flags - {"avx2", "avx_vnni", "avx512_vnni", "amx_int8"})
    monkeypatch.setattr(cpu, "cpu_info", lambda: (model, plain))
    assert w8a8.fbgemm_available() == "fbgemm needs AVX2"
    if w8a8.onednn_available() is None:
        pytest.fail("oneDNN's int8 product offered on a CPU without VNNI")
    registry.forget()
    with pytest.raises(RuntimeError, match="no w8a8 product path"):
        registry.choose("w8a8", shapes)
    monkeypatch.setattr(cpu, "cpu_info", lambda: (model, frozenset(flags | {"avx2", "avx512_vnni"})))
    assert cpu.int8_dot_products()
    if "onednn" in torch.backends.quantized.supported_engines:
        assert w8a8.onednn_available() is None
        assert {p.name for p in registry.paths("w8a8")} >= {"onednn-w8a8"}


def test_engine_plans_products_and_forced_kernels_agree(tiny_checkpoint, cache_file):
    """An engine plans every product; with each family forced the logits agree to float rounding and
    greedy tokens are the same; plans are described for reports."""
    ids = prompts(1, seed=11)[0] * 3
    params = GenerationParams(max_new_tokens=8)
    results = {}
    for kernels in ("auto", "numba", "onednn", "torch"):
        model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
        engine = Engine(model, max_batch=2, kernels=kernels)
        assert all(type(m) is PackedLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert "fp32" in plans(model)
        if kernels == "torch":
            assert plans(model)["fp32"].count("torch-f32") == len(registry.BANDS)
        cfg = model.config
        cache = SlotCache(cfg.n_layer, 1, cfg.n_head, cfg.head_dim, 256, torch.float32)
        with torch.inference_mode():
            logits = runner.run(model, cache, [Row(0, 0, ids, "all")])
        results[kernels] = (logits, engine.submit(ids, params).result().outputs[0].token_ids)
    for kernels, (logits, tokens) in results.items():
        torch.testing.assert_close(logits, results["auto"][0], atol=2e-4, rtol=1e-4)
        assert tokens == results["auto"][1], kernels
    with pytest.raises(ValueError, match="kernels must be one of"):
        Engine(CodeGenForCausalLM.from_pretrained(tiny_checkpoint), kernels="fast")
    model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    Engine(model, matmul_dtype="bfloat16")
    assert set(plans(model)) == {"fp32", "bf16"}
    # int8 products of a model not planned for them
    with pytest.raises(ValueError, match="prepared for them"), torch.inference_mode():
        runner.run(CodeGenForCausalLM.from_pretrained(tiny_checkpoint), cache, [Row(0, 0, ids)],
                   matmul_dtype=torch.int8)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_int8_products_stay_close_to_fp32(tiny_checkpoint, quantize):
    """matmul_dtype="int8": every product int8 x int8 (fp32 weights quantized at start, or an int8
    model's own); log-probabilities of a prompt and of sampled tokens within int8 rounding of fp32,
    and the weights themselves untouched."""
    if w8a8.fbgemm_available() is not None and w8a8.onednn_available() is not None:
        pytest.skip("no int8 x int8 product on this CPU")
    fp32 = CodeGenForCausalLM.from_pretrained(tiny_checkpoint)
    model = CodeGenForCausalLM.from_pretrained(tiny_checkpoint, quantize=quantize)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(model, max_batch=3, matmul_dtype="int8")
    assert "w8a8" in plans(model) and engine.matmul_dtype == torch.int8
    assert all(type(m) in (PackedLinear, PlannedInt8Linear) for m in model.modules()
               if isinstance(m, (torch.nn.Linear, PlannedInt8Linear)))
    ids = prompts(1, seed=12)[0] * 3
    cfg = model.config
    cache = SlotCache(cfg.n_layer, 1, cfg.n_head, cfg.head_dim, 256, torch.float32)
    with torch.inference_mode():
        approx = runner.run(model, cache, [Row(0, 0, ids, "all")], matmul_dtype=torch.int8).log_softmax(-1)
        exact = fp32(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert not torch.allclose(approx, exact, atol=1e-4)  # really computed otherwise
    assert (approx - exact).abs().max() < 0.25
    out = engine.submit(ids, GenerationParams(n=3, max_new_tokens=6, temperature=1.0, seed=2, logprobs=0)).result()
    for o in out.outputs:  # batched decoding and batch-1 steps both through the int8 products
        with torch.inference_mode():
            ref = fp32(torch.tensor([ids + o.token_ids])).logits[0, len(ids) - 1 : -1].log_softmax(-1)
        expected = ref.gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
        assert (torch.tensor(o.logprobs) - expected).abs().max() < 0.25
    solo = engine.submit(ids, GenerationParams(max_new_tokens=4, logprobs=0)).result().outputs[0]
    assert len(solo.token_ids) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="compile=True"):
        Engine(model, matmul_dtype="int8", compile=True)


def test_row_quantization_kernel_matches_pytorch(monkeypatch):
    """int8 x int8's per-row quantization in one numba call (w8a8.quantize_rows) gives PyTorch's scales
    exactly and its codes but for values within the last bit of a rounding tie; a zero row stays 128."""
    if not _numba.numba_ok():
        pytest.skip("numba is not installed")
    g = torch.Generator().manual_seed(5)
    for shape in [(1, 1024), (7, 100), (70, 4096), (3, 5)]:
        x = torch.randn(shape, generator=g) * 3
        x[:, 0] *= 10
        x[-1] = 0
        q, a = w8a8.quantize_rows(x)
        with monkeypatch.context() as m:
            m.setattr(_numba, "HAVE_NUMBA", False)
            q_ref, a_ref = w8a8.quantize_rows(x)
        assert q.dtype == torch.uint8 and a.shape == (shape[0], 1)
        assert torch.equal(a, a_ref)
        differ = q != q_ref
        assert differ.sum() <= max(1, x.numel() // 10_000) and (q.int() - q_ref.int()).abs().max() <= 1
        assert torch.all(q[-1] == 128)
        back = (q.float() - 128) * a / 127
        assert torch.all((back - x).abs() <= a / 254 * 1.001 + 1e-12)


def test_gelu_kernel_matches_pytorch():
    """The tanh GELU kernel (bf16 and int8 x int8 prefill) is within 1e-6 of float64 GELU, absolute
    below 1 and relative above, from -100 to 100; it declines what it cannot compute."""
    from codegen_lm.kernels import gelu

    if not _numba.numba_ok():
        pytest.skip("numba is not installed")
    x = torch.cat([torch.linspace(-100, 100, 200_001), torch.randn(9_999, generator=torch.Generator().manual_seed(6))])
    with torch.inference_mode():
        ref = F.gelu(x.double(), approximate="tanh")
        out = gelu.gelu_tanh_(x.clone().view(-1, 7))
        assert out is not None and out.shape == (len(x) // 7, 7)
        error = (out.reshape(-1).double() - ref).abs() / ref.abs().clamp(min=1)
        assert error.max() < 1e-6
        assert gelu.gelu_tanh_(x.bfloat16()) is None  # another dtype: the caller's own activation
    assert gelu.gelu_tanh_(x.clone()) is None  # autograd on


def test_few_rows_are_timed_on_weights_read_from_memory(cache_file, monkeypatch):
    """A decoding step reads every weight from memory, so timings of few rows cycle through copies of
    the weight that overflow the cache (stream_bytes), while many rows (compute-bound) reuse one; and
    the numba row paths say which dot-loop layout they use, which the batch-1 block kernel follows."""
    from codegen_lm.engine.weights import row_group

    seen: dict[int, set[int]] = {}

    def run(state, x):
        seen.setdefault(x.shape[0], set()).add(id(state))
        return x @ state.t()

    recorder = registry.LinearPath("recorder", "torch", "fp32", None, lambda: None, lambda w: w.fp32, run)
    monkeypatch.setattr(registry, "PATHS", (*registry.PATHS, recorder))
    monkeypatch.setitem(registry.BY_NAME, "recorder", recorder)
    shape = (64, 256)  # 64 KB of fp32
    copies = -(-registry.stream_bytes() // (64 * 256 * 4))
    registry.measure("fp32", [shape])
    streamed = [rows for band, rows in registry.TIMED_ROWS.items() if rows <= registry.STREAMED_ROWS]
    assert streamed and all(len(seen[rows]) >= min(copies, 3) for rows in streamed)
    assert registry.stream_bytes() >= 64 << 20 and copies >= 1024
    assert len(seen[registry.TIMED_ROWS[None]]) == 1
    # the block kernel's layout: the 1-row path's group (1 or 4), 4 where no numba row path was chosen
    module = PackedLinear(256, 64)
    for name, group in [("numba-f32-row1", 1), ("numba-f32-row", 4), ("torch-f32", 4)]:
        module.plans = {"fp32": registry.Plan("fp32", tuple((band, name) for band in registry.BANDS))}
        assert row_group(module) == group
    assert {registry.BY_NAME[n].group for n in ("numba-int8", "numba-int8-row1")} == {4, 1}
