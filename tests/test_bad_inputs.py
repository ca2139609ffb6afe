"""Bad input gets one `codegen-lm: error:` line naming the file, field or value, and a non-zero exit:
never a traceback, a hang, a huge allocation or NaNs from a broken checkpoint."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from codegen_lm import CodeGenConfig, CodeGenForCausalLM, CodeGenModel
from codegen_lm.checkpoint import ExpectedWeights
from codegen_lm.cli import main

from .conftest import make_hf_model, write_tokenizer_files

SHAPE = dict(vocab_size=1024, eos_token_id=2, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256)
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A 0.1M-parameter random checkpoint with tokenizer files: cheap to copy for every case."""
    folder = tmp_path_factory.mktemp("small")
    make_hf_model(seed=5, **SHAPE).save_pretrained(folder)
    write_tokenizer_files(folder)
    return folder


# ---- ways to break a checkpoint folder -----------------------------------------------------------------


def config(**changes) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = json.loads((folder / "config.json").read_text())
        data.update(changes)
        (folder / "config.json").write_text(json.dumps(data))  # NaN and Infinity written as JSON allows

    return apply


def write(name: str, content: bytes | str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).write_bytes(content.encode() if isinstance(content, str) else content)

    return apply


def tensor(key: str, value: float, at: tuple[int, ...] = (0, 0)) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        state = load_file(folder / WEIGHTS)
        state[key][at] = value
        save_file(state, folder / WEIGHTS, metadata={"format": "pt"})

    return apply


def truncate(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])


def index(shard: str, make: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """A safetensors index naming `shard` for every tensor; `make(folder)` lays out what it points to."""

    def apply(folder: Path) -> None:
        keys = list(load_file(folder / WEIGHTS))
        if make is not None:
            make(folder)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, shard)}))

    return apply


def outside(folder: Path) -> None:
    shutil.copy(folder / WEIGHTS, folder.parent / "outside.safetensors")


def escaping_link(folder: Path) -> None:
    outside(folder)
    (folder / "model-1.safetensors").symlink_to(folder.parent / "outside.safetensors")


def pickled(state: object, truncated: bool = False) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / WEIGHTS).unlink()
        torch.save(state, folder / "pytorch_model.bin")
        if truncated:
            data = (folder / "pytorch_model.bin").read_bytes()
            (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 3])

    return apply


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def bin_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def bin_of_small(truncated: bool) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        pickled(bin_weights(folder), truncated)(folder)

    return apply


NaN, INF = float("nan"), float("inf")
GEN = ["generate", "x", "--model", "{m}"]
INFO = ["info", "{m}"]

# (id, how to break the folder, command line, what the one error line must say)
CASES = [
    # config.json itself
    ("config-not-json", write("config.json", "{not json"), GEN, "config.json is not valid JSON"),
    ("config-not-object", write("config.json", "[1, 2]"), INFO, "config.json must hold a JSON object"),
    ("config-binary", write("config.json", b"\xff\xfe\x00\x01binary"), GEN,
     "config.json is not valid JSON: not UTF-8 text (byte 0xff at offset 0)"),
    ("config-huge", write("config.json", b" " * (17 << 20)), INFO, "config.json is over 16 MB"),
    ("config-deep", write("config.json", "[" * 100_000), INFO, "config.json is not valid JSON: nested too deeply"),
    ("config-dir", lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()), GEN,
     "config.json: cannot be read"),
    # absurd or wrong-typed values
    ("n_layer-negative", config(n_layer=-1), GEN, "config.json: invalid CodeGenConfig: n_layer=-1"),
    ("n_layer-zero", config(n_layer=0), INFO, "n_layer=0: must be a positive integer"),
    ("n_layer-string", config(n_layer="2"), GEN, "n_layer='2': must be a positive integer"),
    ("n_layer-bool", config(n_layer=True), GEN, "n_layer=True: must be a positive integer"),
    ("n_layer-nan", config(n_layer=NaN), GEN, "n_layer=nan: must be a positive integer"),
    ("n_layer-400-digits", config(n_layer=10**400), GEN, "n_layer=<an integer of 401 digits>"),
    ("n_layer-5000-digits", write("config.json", '{"n_layer": 1' + "0" * 5000 + "}"), INFO,
     "config.json is not valid JSON: it holds an integer of thousands of digits"),
    ("n_embd-huge", config(n_embd=2**40, n_head=4), INFO, "n_embd=1099511627776"),
    ("n_head-string", config(n_head="4"), GEN, "n_head='4': must be a positive integer"),
    ("vocab-zero", config(vocab_size=0), GEN, "vocab_size=0: must be a positive integer"),
    ("positions-huge", config(n_positions=10**9), GEN, "n_positions=1000000000: is more than 1,048,576"),
    ("rotary-negative", config(rotary_dim=-2), GEN, "rotary_dim=-2: must be a positive integer or null"),
    ("eps-nan", config(layer_norm_epsilon=NaN), GEN, "layer_norm_epsilon=nan: must be a finite positive number"),
    ("eps-inf", config(layer_norm_epsilon=INF), INFO, "layer_norm_epsilon=inf"),
    ("eps-negative", config(layer_norm_epsilon=-1e-5), GEN, "layer_norm_epsilon=-1e-05"),
    ("eps-string", config(layer_norm_epsilon="1e-5"), GEN, "layer_norm_epsilon='1e-5'"),
    ("pdrop-nan", config(resid_pdrop=NaN), GEN, "resid_pdrop=nan: must be a probability in [0, 1)"),
    ("init-nan", config(initializer_range=NaN), GEN, "initializer_range=nan"),
    ("tie-string", config(tie_word_embeddings="false"), GEN, "tie_word_embeddings='false': must be true or false"),
    ("activation-number", config(activation_function=3), GEN, "activation_function=3: unknown activation"),
    ("eos-string", config(eos_token_id="2"), GEN, "eos_token_id='2': must be a token id"),
    ("eos-out-of-vocab", config(eos_token_id=5000), GEN, "eos_token_id=5000: must be a token id below vocab_size"),
    ("pad-string", config(pad_token_id="x"), GEN, "pad_token_id='x'"),
    ("dtype-number", config(torch_dtype=16, dtype=None), GEN, "torch_dtype=16: must be a dtype name"),
    ("quantization-string", config(quantization_config="int8"), GEN, "quantization_config='int8': must be an object"),
    # weights that do not fit the config: refused from the headers, before the model exists
    ("n_layer-more-than-weights", config(n_layer=3), GEN,
     "lacks 'transformer.h.2.ln_1.weight' and 7 more: config.json has n_layer=3, the weights hold 2 layers"),
    ("n_layer-more-than-weights-info", config(n_layer=3), INFO, "lacks 'transformer.h.2.ln_1.weight'"),
    ("n_layer-fewer-than-weights", config(n_layer=1), GEN,
     "has tensors this CodeGen config does not use: 'transformer.h.1."),
    ("n_embd-mismatch", config(n_embd=64), GEN,
     "model.safetensors: tensor 'lm_head.weight' has shape [1024, 32], but the config"),
    # weights themselves
    ("nan-weight", tensor("transformer.h.1.mlp.fc_in.weight", NaN), GEN,
     "model.safetensors: tensor 'transformer.h.1.mlp.fc_in.weight' holds NaN or infinite values"),
    ("inf-weight", tensor("lm_head.bias", -INF, (3,)), GEN, "tensor 'lm_head.bias' holds NaN or infinite values"),
    ("fp16-overflow", tensor("transformer.wte.weight", 1e6), [*GEN, "--dtype", "float16"],
     "tensor 'transformer.wte.weight' has values too large for torch.float16"),
    ("safetensors-truncated", truncate, GEN, "model.safetensors: not a readable safetensors file"),
    ("safetensors-truncated-info", truncate, INFO, "model.safetensors: not a readable safetensors file"),
    ("safetensors-garbage", write(WEIGHTS, b"\x07" * 100), GEN, "model.safetensors: not a readable safetensors file"),
    ("pickle-code", pickled({"transformer.wte.weight": Payload()}), GEN,
     "pytorch_model.bin: refused to unpickle it: not a plain weights file (its pickle would call posix.system"),
    ("pickle-code-info", pickled({"transformer.wte.weight": Payload()}), INFO, "refused to unpickle it"),
    ("bin-truncated", bin_of_small(truncated=True), GEN, "pytorch_model.bin: not a readable PyTorch checkpoint"),
    # shard indexes
    ("index-dotdot", index("../outside.safetensors", outside), GEN,
     "names shard '../outside.safetensors', a path outside the checkpoint folder; refused"),
    ("index-absolute", index("/etc/passwd"), INFO, "names shard '/etc/passwd', a path outside the checkpoint folder"),
    ("index-symlink", index("model-1.safetensors", escaping_link), GEN,
     "names shard 'model-1.safetensors', a link to"),
    ("index-missing-shard", index("model-00001-of-00002.safetensors"), GEN,
     "lists shard model-00001-of-00002.safetensors, which is not in"),
    ("index-not-json", write("model.safetensors.index.json", "{"), GEN,
     "not a valid shard index: ", ),
    ("index-weight-map-list", write("model.safetensors.index.json", '{"weight_map": ["a"]}'), GEN,
     "model.safetensors.index.json: not a valid shard index"),
    # options
    ("threads-huge", None, [*GEN, "--threads", "1000000"], "argument --threads: 1000000 is out of range"),
    ("threads-zero", None, [*GEN, "--threads", "0"], "argument --threads: 0 is out of range"),
    ("threads-negative", None, [*GEN, "--threads", "-4"], "argument --threads: -4 is out of range"),
    ("threads-float", None, [*GEN, "--threads", "1e9"], "argument --threads: expected an integer, got '1e9'"),
    ("device-meta", None, [*GEN, "--device", "meta"], "--device meta: models run on cpu or cuda, not meta"),
    ("device-unknown", None, [*GEN, "--device", "tpu7"], "--device 'tpu7' is not a device PyTorch knows"),
    ("device-cuda-index", None, [*GEN, "--device", "cuda:99"], "--device cuda:99: "),
    ("samples-huge", None, [*GEN, "--num-samples", "1000000000", "--temperature", "1"],
     "argument --num-samples: 1000000000 is out of range: must be in [1, 10,000]"),
    ("samples-float", None, [*GEN, "--num-samples", "1e9"],
     "argument --num-samples: expected an integer, got '1e9' (write 1000000000)"),
    ("max-new-tokens-huge", None, [*GEN, "--max-new-tokens", "1000000000"],
     "argument --max-new-tokens: 1000000000 is out of range"),
    ("max-new-tokens-float", None, [*GEN, "--max-new-tokens", "1e9"], "argument --max-new-tokens: expected an integer"),
    ("max-new-tokens-over-context", None, [*GEN, "--max-new-tokens", "1000"],
     "--max-new-tokens 1000 is more than the model's context of 256 positions"),
    ("seed-float", None, [*GEN, "--seed", "1e3"], "argument --seed: expected an integer, got '1e3'"),
    ("temperature-inf", None, [*GEN, "--temperature", "inf"], "argument --temperature: inf is out of range"),
    ("temperature-nan", None, [*GEN, "--temperature", "nan"], "argument --temperature: nan is out of range"),
    ("model-is-a-file", None, ["generate", "x", "--model", "{m}/config.json"], "config.json: not a folder"),
    ("prompt-surrogate", None, ["generate", "ab\udcff", "--model", "{m}"],
     "the prompt argument is not UTF-8 text (byte 0xff at offset 2)"),
    ("stdin-binary", None, ["generate", "-", "--model", "{m}"], "stdin is not UTF-8 text (byte 0xff at offset 9)"),
    ("stdin-endless", None, ["generate", "-", "--model", "{m}"], "stdin holds more than 64 MB"),
]


class Zeros(io.RawIOBase):
    """An endless stream of NUL bytes, like /dev/zero."""

    def readinto(self, buffer) -> int:
        buffer[:] = bytes(len(buffer))
        return len(buffer)

    def readable(self) -> bool:
        return True


STDIN = {"stdin-binary": lambda: io.BytesIO(b"def f():\n\xff\xfe"), "stdin-endless": Zeros}


class BinaryStdin:
    def __init__(self, stream: io.RawIOBase) -> None:
        self.buffer = stream


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, expected: str) -> None:
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("codegen-lm: error: "), err
    assert expected in err, err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, small, tmp_path, capsys, monkeypatch):
    name, breaker, argv, expected = case
    if name == "device-cuda-index" and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("this machine has 100 CUDA devices")
    folder = tmp_path / "ckpt"
    shutil.copytree(small, folder)
    if breaker is not None:
        breaker(folder)
    if name in STDIN:
        monkeypatch.setattr(sys, "stdin", BinaryStdin(STDIN[name]()))
    code, err = run_main(capsys, [a.replace("{m}", str(folder)) for a in argv])
    assert_one_error_line(code, err, expected)


def test_refused_pickle_ran_nothing(small, tmp_path, capsys):
    class Marker:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    folder = tmp_path / "ckpt"
    shutil.copytree(small, folder)
    pickled({"transformer.wte.weight": Marker()})(folder)
    assert_one_error_line(*run_main(capsys, ["info", str(folder)]), "refused to unpickle it")
    assert not (tmp_path / "pwned").exists()


def test_the_same_weights_still_load_and_run(small, tmp_path, capsys):
    """The checks refuse nothing good: a plain folder, a `.bin`, an index inside the folder, info."""
    folder = tmp_path / "ok"
    shutil.copytree(small, folder)
    code, err = run_main(capsys, ["generate", "x", "--model", str(folder), "--max-new-tokens", "2", "--threads", "1"])
    assert code == 0, err
    index(WEIGHTS)(folder)
    assert run_main(capsys, ["generate", "x", "--model", str(folder), "--max-new-tokens", "2"])[0] == 0
    (folder / "model.safetensors.index.json").unlink()
    bin_of_small(truncated=False)(folder)
    assert run_main(capsys, ["generate", "x", "--model", str(folder), "--max-new-tokens", "2"])[0] == 0
    assert run_main(capsys, ["info", str(folder)])[0] == 0


# ---- configs that claim giant models: refused quickly, in little memory -------------------------------


def run_process(argv: list[str], timeout: float = 60) -> tuple[int, str, float, int]:
    """(exit status, stderr, seconds, peak RSS in bytes) of `python -m codegen_lm ARGV`, killed after
    `timeout` seconds. wait4 gives this one child's peak memory, whatever else the test run started."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "codegen_lm", *argv], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, env=env)
        timer = threading.Timer(timeout, proc.kill)
        start = time.monotonic()
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        seconds = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return proc.returncode, err.read().decode("utf-8", "replace"), seconds, usage.ru_maxrss * 1024


GIANT = [
    ("info", 10**9, "make 4.96e+13 parameters, more than the 1e+12 this loader accepts"),
    ("generate", 10**9, "make 4.96e+13 parameters, more than the 1e+12 this loader accepts"),
    ("info", 10**7, "lacks 'transformer.h.2.ln_1.weight' and 79999983 more: config.json has n_layer=10000000"),
    ("generate", 10**5, "lacks 'transformer.h.2.ln_1.weight' and 799983 more: config.json has n_layer=100000"),
]


@pytest.mark.parametrize("command,n_layer,expected", GIANT, ids=[f"{c}-{n:.0e}" for c, n, _ in GIANT])
def test_giant_n_layer_is_refused_quickly_in_little_memory(command, n_layer, expected, small, tmp_path):
    folder = tmp_path / "giant"
    shutil.copytree(small, folder)
    config(n_layer=n_layer, n_embd=64 if n_layer == 10**9 else 32)(folder)
    argv = ["info", str(folder)] if command == "info" else ["generate", "x", "--model", str(folder)]
    code, err, seconds, peak = run_process(argv)
    assert seconds < 60, f"still running after {seconds:.0f} s"
    assert_one_error_line(code, err, expected)
    assert peak < 2 << 30, f"peak RSS {peak / 2**30:.1f} GB"


# ---- the pieces the checks rest on --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [
    dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, vocab_size=1024, eos_token_id=2),
    dict(n_embd=96, n_layer=3, n_head=6, rotary_dim=4, n_inner=200, vocab_size=300, eos_token_id=2),
    dict(n_embd=64, n_layer=1, n_head=2, rotary_dim=None, vocab_size=500, eos_token_id=2, tie_word_embeddings=True),
    dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=500, eos_token_id=2,
         quantization_config={"quant_method": "codegen-lm-int8"}),
])
def test_parameter_counts_and_shapes_match_the_model_without_building_it(shape):
    from codegen_lm.quantize import is_quantized, quantize_model

    config = CodeGenConfig(**shape)
    with torch.device("meta"):
        model = CodeGenForCausalLM(config)
    assert config.num_parameters() == model.num_parameters()
    for cls in (CodeGenForCausalLM, CodeGenModel):
        with torch.device("meta"):  # as loading builds it
            built = cls(CodeGenConfig.from_dict(config.to_dict()))
            if is_quantized(config):
                quantize_model(built, placeholders=True)
        built.tie_weights()
        expected = ExpectedWeights(cls, config)
        params = dict(built.named_parameters(remove_duplicate=True))
        assert list(expected.names()) == list(params)
        assert {k: expected.get(k) for k in params} == {k: (tuple(p.shape), p.dtype) for k, p in params.items()}
        assert expected.nbytes(torch.float32) == sum(p.numel() * p.element_size() for p in params.values()) + (
            4 * config.n_positions * config.rotary_dims)


def test_released_configs_pass_validation_and_count():
    from codegen_lm import RELEASED_CHECKPOINTS

    counts = {CodeGenConfig(**fields).num_parameters() for name, fields in RELEASED_CHECKPOINTS.items()}
    assert counts == {356_712_448, 2_779_356_160, 7_064_213_504, 16_032_155_648}


def test_nan_in_a_running_model_never_raises_in_a_kernel(small):
    """The load-time check keeps NaN weights out, but a NaN produced at run time (or set by code) must
    give NaN logits, not a ZeroDivisionError from a numba kernel."""
    from codegen_lm import CodeGenTokenizerFast
    from codegen_lm.engine import Engine, GenerationParams

    model = CodeGenForCausalLM.from_pretrained(small)
    tokenizer = CodeGenTokenizerFast.from_pretrained(small)
    with torch.no_grad():
        model.transformer.h[0].ln_1.weight.fill_(float("nan"))
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = float("nan")
    model.config.layer_norm_epsilon = float("nan")
    engine = Engine(model, tokenizer, max_batch=2, prefix_cache_mb=0)
    for params in (GenerationParams(max_new_tokens=3), GenerationParams(n=2, max_new_tokens=3, temperature=1.0,
                                                                         seed=0)):
        assert len(engine.submit([10, 20, 30], params).result().outputs) == params.n


def test_hub_cache_shards_linked_into_the_blob_store_still_load(small, tmp_path):
    """The index check refuses links out of the folder, but not the hub cache's own layout, where
    every file of a snapshot is a link into the repository's blob store."""
    model = CodeGenForCausalLM.from_pretrained(small)
    staging = tmp_path / "staging"
    model.save_pretrained(staging, max_shard_size="100KB")
    assert (staging / "model.safetensors.index.json").is_file()
    repo = tmp_path / "hub" / "models--someone--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(staging.iterdir())):
        blob = repo / "blobs" / f"{i:064d}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    loaded = CodeGenForCausalLM.from_pretrained(snapshot)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), model.parameters()))
