"""Training survives kills, torn files and full disks: each fault set up for real on a tiny run (a killed
`codegen-lm train` process, a truncated or corrupted file, a deleted folder, a full tmpfs, ENOSPC raised
where the writes happen), then the resumed run must end with the log and weights of an uninterrupted one."""

from __future__ import annotations

import builtins
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from codegen_lm.cli import main as cli_main
from codegen_lm.training import checkpoints as C
from codegen_lm.training.data import TokenWindows, prepare
from codegen_lm.training.sources import find_sources
from codegen_lm.training.tokenizer_train import train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# log_every=5 with checkpoints every 4 steps: a run resumed from step 8 must log 10 and 12, not 9.
SETTINGS = dict(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, seq_len=32, batch_size=4,
                warmup_steps=2, lr=3e-3, min_lr=3e-4, max_steps=12, eval_every=4, eval_batches=2, save_every=4,
                keep_checkpoints=2, log_every=5, dropout=0.1, threads=1, peak_flops=1e12)
TIMINGS = ("tokens_per_s", "mfu", "time")


class Crash(BaseException):
    """Stands for the process dying: nothing in the training code handles it."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    tok = tmp_path_factory.mktemp("tok")
    sources = find_sources([STDLIB / "json", STDLIB / "email"])
    train_tokenizer(sources, 500, tok, progress=False)
    out = tmp_path_factory.mktemp("data")
    prepare(sources, tok, out, holdout=0.1, progress=False)
    return out


def args(data_dir: Path, out: Path, **extra) -> list[str]:
    line = ["train", "--data", str(data_dir), "--out-dir", str(out), "--no-progress"]
    for key, value in {**SETTINGS, **extra}.items():
        line += [f"--{key.replace('_', '-')}", str(value)]
    return line


def records(run: Path) -> list[dict]:
    """The log without its timings (what an interrupted run must repeat exactly)."""
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def run_in_fixture(argv: list[str]) -> int:
    """cli_main for a module fixture, which conftest's per-test thread reset does not cover: --threads 1
    must not leak into later tests (their exact comparisons depend on the thread count)."""
    threads = torch.get_num_threads()
    try:
        return cli_main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every recovery must reproduce."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert run_in_fixture(args(data_dir, run)) == 0
    return run


@pytest.fixture(scope="module")
def crashed(data_dir, tmp_path_factory, straight) -> Path:
    """A run that died starting step 11: the log has step 10, `latest` names step-0000008."""
    run = tmp_path_factory.mktemp("crashed") / "run"
    real = TokenWindows.batch

    def batch(self, first, n):
        if first >= 10 * SETTINGS["batch_size"] and self.shuffle:
            raise Crash
        return real(self, first, n)

    TokenWindows.batch = batch
    try:
        with pytest.raises(Crash):
            run_in_fixture(args(data_dir, run))
    finally:
        TokenWindows.batch = real
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    assert records(run) == [r for r in records(straight) if r["step"] <= 10]
    return run


def copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def assert_recovered(run: Path, straight: Path) -> None:
    """Nothing lost: the log and the final weights of the uninterrupted run, and no debris."""
    assert records(run) == records(straight)
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000008", "step-0000012"]
    assert (root / "latest").read_text() == "step-0000012\n"
    assert all(C.check_checkpoint(root / name)[1] is None for name in ("step-0000008", "step-0000012"))


def resume(data_dir: Path, run: Path, capsys) -> str:
    """Resume in this process; its stderr."""
    capsys.readouterr()
    assert cli_main([*args(data_dir, run), "--resume"]) == 0
    return capsys.readouterr().err


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def one_error(err: str) -> str:
    """The single `codegen-lm: error:` line of a failed run (no traceback)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("codegen-lm: error: ")]
    assert len(errors) == 1, err
    return errors[0]


# ---- the log -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail", [b"", b'{"step": 11, "loss": 4.2', b"\0" * 300, b'{"step": 10, "lo\n'],
                         ids=["killed", "torn-line", "zero-filled-tail", "torn-line-with-newline"])
def test_log_after_a_kill(data_dir, crashed, straight, tmp_path, capsys, tail):
    """Records after the checkpoint are dropped and a torn last line with them, by truncation: the log
    keeps its inode and the bytes before the cut, and is never rewritten."""
    run = copy(crashed, tmp_path)
    with open(run / "log.jsonl", "ab") as f:
        f.write(tail)
    inode, kept = (run / "log.jsonl").stat().st_ino, (run / "log.jsonl").read_bytes().split(b'{"step": 10')[0]
    err = resume(data_dir, run, capsys)
    assert ("dropped a torn last line" in err) == bool(tail), err
    assert (run / "log.jsonl").stat().st_ino == inode and (run / "log.jsonl").read_bytes().startswith(kept)
    assert_recovered(run, straight)


KILL = textwrap.dedent('''
    import builtins, io, os, signal, sys
    from pathlib import Path
    point = sys.argv[1]
    real_open, real_truncate, real_replace = builtins.open, os.truncate, os.replace
    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    def named(path, name):
        return isinstance(path, (str, os.PathLike)) and Path(path).name == name
    def opening(file, mode="r", *a, **k):  # the first change to log.jsonl, whatever makes it
        f = real_open(file, mode, *a, **k)
        if point == "log" and named(file, "log.jsonl") and any(c in mode for c in "wax+"):
            die()
        return f
    def truncating(path, length):
        real_truncate(path, length)
        if point == "log" and named(path, "log.jsonl"):
            die()
    def replacing(src, dst, **k):
        real_replace(src, dst, **k)
        src, dst = Path(src), Path(dst)
        if point == "log" and dst.name == "log.jsonl":
            die()
        if point == "rotation" and dst.name.startswith("step-") and dst.suffix == ".old":
            die()  # between the two renames: step-N is step-N.old, the new one still step-N.tmp
        if point == "swap" and src.suffix == ".tmp" and dst.with_name(dst.name + ".old").exists():
            die()  # the new step-N in place, the old one not yet deleted
    builtins.open = io.open = opening
    os.truncate, os.replace = truncating, replacing
    from codegen_lm.cli import main
    sys.exit(main(sys.argv[2:]))
''')


def killed_at(point: str, data_dir: Path, run: Path) -> None:
    out = subprocess.run([sys.executable, "-c", KILL, point, *args(data_dir, run), "--resume"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]


def test_kill_while_resume_trims_the_log(data_dir, crashed, straight, tmp_path, capsys):
    """kill -9 at the moment `--resume` first changes log.jsonl (the old code rewrote it: 0 bytes)."""
    run = copy(crashed, tmp_path)
    killed_at("log", data_dir, run)
    assert records(run) == [r for r in records(straight) if r["step"] <= 8]
    resume(data_dir, run, capsys)
    assert_recovered(run, straight)


def test_kill_9_of_a_real_train_process_after_its_first_checkpoint(data_dir, straight, tmp_path, capsys):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "codegen_lm", *args(data_dir, run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not (run / "final").exists()
    resume(data_dir, run, capsys)
    assert_recovered(run, straight)


# ---- checkpoints ---------------------------------------------------------------------------------------


def _delete_newest(run: Path) -> None:
    shutil.rmtree(run / "checkpoints" / "step-0000012")


def _empty_latest(run: Path) -> None:
    (run / "checkpoints" / "latest").write_bytes(b"")


def _corrupt_state(run: Path) -> None:
    flip(run / "checkpoints" / "step-0000012" / "trainer_state.pt", 300)


def _corrupt_weights(run: Path) -> None:
    flip(run / "checkpoints" / "step-0000012" / "model.safetensors", -100)  # tensor data, not the header


def _truncate_weights(run: Path) -> None:
    path = run / "checkpoints" / "step-0000012" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])


def _legacy_truncated_state(run: Path) -> None:  # a checkpoint of the old code: no SHA256SUMS
    folder = run / "checkpoints" / "step-0000012"
    (folder / C.SUMS).unlink()
    (folder / C.STATE).write_bytes((folder / C.STATE).read_bytes()[:2000])


def _stale_old(run: Path) -> None:  # left by a kill after the rotation's second rename
    shutil.copytree(run / "checkpoints" / "step-0000008", run / "checkpoints" / "step-0000012.old")


def _half_pruned(run: Path) -> None:  # left by a kill during pruning, and half-written saves
    shutil.copytree(run / "checkpoints" / "step-0000008", run / "checkpoints" / "step-0000004.del")
    shutil.copytree(run / "checkpoints" / "step-0000008", run / "checkpoints" / "step-0000012.old.del")
    (run / "checkpoints" / "step-0000012.tmp").mkdir()
    (run / "final.tmp").mkdir()


@pytest.mark.parametrize("fault, warning, start", [
    (_delete_newest, "latest names step-0000012, which is not a checkpoint there", 8),
    (_empty_latest, "latest is missing or empty", 12),
    (_corrupt_state, "step-0000012/trainer_state.pt is corrupt", 8),
    (_corrupt_weights, "step-0000012/model.safetensors is corrupt", 8),
    (_truncate_weights, "step-0000012/model.safetensors is corrupt", 8),
    (_legacy_truncated_state, "step-0000012/trainer_state.pt is unreadable", 8),
    (_stale_old, None, 12),
    (_half_pruned, None, 12),
], ids=lambda v: v.__name__.strip("_") if callable(v) else None)
def test_damaged_checkpoints(data_dir, straight, tmp_path, capsys, fault, warning, start):
    """The newest checkpoint missing, damaged or surrounded by debris: resume from the newest sound one
    (with a one-line warning naming the file), prune nothing that is still needed, tidy the rest."""
    run = copy(straight, tmp_path)
    if start < 12:
        shutil.rmtree(run / "final")  # so that the resumed run has to write it again
    fault(run)
    err = resume(data_dir, run, capsys)
    if warning:
        lines = [line for line in err.splitlines() if line.startswith("codegen-lm train: warning: ")]
        assert any(warning in line and str(run / "checkpoints") in line for line in lines), err
        assert f"resuming from {run / 'checkpoints' / f'step-{start:07d}'}" in err, err
    assert f"steps {start}->12" in err, err
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in straight.iterdir())
    assert_recovered(run, straight)


def test_kill_between_the_renames_of_a_rotation(data_dir, straight, tmp_path, capsys):
    """A run resumed from step 8 re-saves the (corrupt) step-0000012 and is killed between renaming it to
    step-0000012.old and the new one into place: .old is the only copy of that step, so it is restored
    (and, being corrupt, not used); the new one, complete in step-0000012.tmp, was never committed."""
    run = copy(straight, tmp_path)
    _corrupt_state(run)
    killed_at("rotation", data_dir, run)
    root = run / "checkpoints"
    assert not (root / "step-0000012").exists() and (root / "step-0000012.old").is_dir()
    assert (root / "latest").read_text() == "step-0000008\n"  # moved back by the resume that fell back
    err = resume(data_dir, run, capsys)
    assert f"restored {root / 'step-0000012'} from step-0000012.old" in err and "steps 8->12" in err, err
    assert_recovered(run, straight)


def test_kill_after_a_rotation_leaves_a_stale_old_folder(data_dir, straight, tmp_path, capsys):
    """Killed after the new step-0000012 is in place but before step-0000012.old is deleted and `latest`
    moves: the stale .old is removed, never used, and the run continues from `latest`."""
    run = copy(straight, tmp_path)
    _corrupt_state(run)
    killed_at("swap", data_dir, run)
    root = run / "checkpoints"
    assert (root / "step-0000012.old").is_dir() and (root / "latest").read_text() == "step-0000008\n"
    err = resume(data_dir, run, capsys)
    assert "steps 8->12" in err and "warning" not in err, err
    assert_recovered(run, straight)


def test_fresh_starts_never_prune_the_checkpoints_they_find(data_dir, straight, tmp_path, capsys):
    run = copy(straight, tmp_path)
    # every checkpoint unusable: --resume starts over (saying so) and keeps them until it replaces them
    _corrupt_state(run)
    flip(run / "checkpoints" / "step-0000008" / "trainer_state.pt", 300)
    err = resume(data_dir, run, capsys)
    assert "skipping checkpoint step-0000012" in err and "skipping checkpoint step-0000008" in err, err
    assert "no usable checkpoint" in err and "steps 0->12" in err, err
    assert_recovered(run, straight)
    # without --resume: a shorter fresh run keeps step-0000012 (the old code pruned its own step-0000004
    # instead, and left `latest` naming it)
    assert cli_main(args(data_dir, run, max_steps=8)) == 0
    assert "does not continue (pass --resume for that)" in capsys.readouterr().err
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004", "step-0000008", "step-0000012"]
    assert (root / "latest").read_text() == "step-0000008\n"


# ---- full disks ------------------------------------------------------------------------------------


def _in(path: object, part: str) -> bool:
    return isinstance(path, (str, os.PathLike)) and part in str(path)


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_at_weights(monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if _in(filename, "step-0000012.tmp"):
            Path(filename).write_bytes(b"\0" * 4096)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _full_at_trainer_state(monkeypatch):
    real = torch.save

    def save(obj, f, *a, **k):
        if _in(getattr(f, "name", f), "step-0000012.tmp"):
            f.write(b"PK\3\4" + b"\0" * 100)
            try:  # how torch reports it: a RuntimeError whose context is the OSError
                raise _enospc()
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


def _full_at_fsync(monkeypatch):  # delayed allocation (or NFS) reports ENOSPC only when the data is flushed
    real = os.fsync

    def fsync(fd):
        if "step-0000012.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise _enospc()
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _full_at_latest(monkeypatch):
    real = builtins.open

    def opening(file, mode="r", *a, **k):
        if _in(file, "latest.tmp"):
            raise _enospc()
        return real(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", opening)


def _full_at_log(monkeypatch):
    real = builtins.open

    class ShortWrite:  # writes the first half of the record, then the disk is full
        def __init__(self, f):
            self.f = f

        def write(self, text):
            if '"step": 12' in text:
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise _enospc()
            return self.f.write(text)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opening(file, mode="r", *a, **k):
        f = real(file, mode, *a, **k)
        return ShortWrite(f) if _in(file, "log.jsonl") and "a" in mode else f

    monkeypatch.setattr(builtins, "open", opening)


@pytest.mark.parametrize("fault, where", [
    (_full_at_weights, "cannot save checkpoint {root}/step-0000012"),
    (_full_at_trainer_state, "cannot save checkpoint {root}/step-0000012"),
    (_full_at_fsync, "cannot save checkpoint {root}/step-0000012"),
    (_full_at_latest, "cannot save checkpoint {root}/step-0000012"),
    (_full_at_log, "cannot write {run}/log.jsonl"),
], ids=lambda v: v.__name__.removeprefix("_full_at_") if callable(v) else None)
def test_disk_full_simulated(data_dir, crashed, straight, tmp_path, capsys, monkeypatch, fault, where):
    """ENOSPC raised where the real write would raise it, the way each library reports it: one line,
    exit status 1, the previous checkpoint and `latest` intact, nothing a resume would pick up."""
    run = copy(crashed, tmp_path)
    root = run / "checkpoints"
    with monkeypatch.context() as patch:
        fault(patch)
        capsys.readouterr()
        assert cli_main([*args(data_dir, run), "--resume"]) == 1
    line = one_error(capsys.readouterr().err)
    assert line.startswith(f"codegen-lm: error: {where.format(root=root, run=run)}: the disk is full"), line
    assert "run again with --resume" in line, line
    if "checkpoint" in where:
        assert f"the last checkpoint, {root / 'step-0000008'}, is intact" in line, line
    assert (root / "latest").read_text() == "step-0000008\n"
    assert C.check_checkpoint(root / "step-0000008")[1] is None
    assert not list(root.glob("*.tmp")) and not (run / "final").exists()
    resume(data_dir, run, capsys)
    assert_recovered(run, straight)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs of a given size (we are root here, and in CI); skipped where mounting is not allowed."""
    mounts: list[Path] = []

    def mount(size_kib: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_disk_full_for_real(data_dir, straight, small_tmpfs, capsys):
    """`codegen-lm train` on a tmpfs with room for two checkpoints, not three (keep_checkpoints=2)."""
    step8 = straight / "checkpoints" / "step-0000008"
    per_checkpoint = sum(-(-p.stat().st_size // 4096) * 4096 for p in step8.iterdir())
    fixed = sum(-(-(straight / name).stat().st_size // 4096) * 4096 for name in ("loss.png", "log.jsonl"))
    disk = small_tmpfs((int(2.5 * per_checkpoint) + 2 * fixed + 64 * 1024) // 1024)
    run = disk / "run"
    out = subprocess.run([sys.executable, "-m", "codegen_lm", *args(data_dir, run)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    line = one_error(out.stderr)
    root = run / "checkpoints"
    assert line == (f"codegen-lm: error: cannot save checkpoint {root / 'step-0000012'}: the disk is full (no space "
                    f"left on device); the last checkpoint, {root / 'step-0000008'}, is intact (free some space, "
                    "then run again with --resume)")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000004", "step-0000008"]
    assert (root / "latest").read_text() == "step-0000008\n"
    assert C.check_checkpoint(root / "step-0000008")[1] is None
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    resume(data_dir, run, capsys)
    assert_recovered(run, straight)
