"""`torchrun -m codegen_lm eval humaneval|mtpb`: the processes share the sampling, rank 0 merges and
scores, and the outcome is the single-process run's, sample for sample; a rank that dies is reported
and its samples are resumed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from codegen_lm.cli import main

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    """The real launcher: python -m torch.distributed.run, two CPU processes (gloo)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "codegen_lm", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=clean_env())


def in_process(*argv: str) -> None:
    """The single-process run, in this interpreter (saves a start-up); torch's threads restored after."""
    threads = torch.get_num_threads()
    try:
        assert main(list(argv)) == 0
    finally:
        torch.set_num_threads(threads)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def humaneval_args(checkpoint) -> list[str]:
    # --num-samples, not --n: torchrun's own parser takes --n for one of its options
    return ["eval", "humaneval", "--model", str(checkpoint), "--problems", "0-4", "--num-samples", "3",
            "--temperature", "0.8", "--max-new-tokens", "16", "--k", "1,3", "--batch", "2", "--threads", "1",
            "--no-progress"]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory):
    """One process's HumanEval run."""
    out = tmp_path_factory.mktemp("he-single")
    in_process(*humaneval_args(tiny_checkpoint), "--out", str(out))
    return out


def test_torchrun_humaneval_equals_one_process(tiny_checkpoint, reference, tmp_path):
    out = tmp_path / "he-torchrun"
    proc = torchrun(*humaneval_args(tiny_checkpoint), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    assert (out / "samples.jsonl").read_bytes() == (reference / "samples.jsonl").read_bytes()
    assert len(read_jsonl(out / "samples.jsonl")) == 15
    assert read_jsonl(out / "results.jsonl") == read_jsonl(reference / "results.jsonl")
    ours, theirs = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert ours["pass_at_k"] == theirs["pass_at_k"] and ours["per_problem"] == theirs["per_problem"]
    assert ours["settings"]["processes"] == 2 and theirs["settings"]["processes"] == 1
    assert not list(out.glob("samples.rank-*"))  # merged, then removed
    assert proc.stdout.count("5 problems, 15 samples") == 1  # only rank 0 reports


MTPB_ROWS = [
    {"id": "1", "name": "sum", "category": "math", "max_gen_length": 8,
     "prompts": ["Assign the list {numbers} to numbers.", "Print the sum of numbers."],
     "inputs": [{"numbers": [1, 2, 3]}, {"numbers": [5]}, {"numbers": []}], "outputs": [6, 5, 0]},
    {"id": "2", "name": "upper", "category": "string", "max_gen_length": 8,
     "prompts": ["Set s to '{s}'.", "Make it upper case.", "Print s."],
     "inputs": [{"s": "ab"}, {"s": "x"}], "outputs": ["AB", "X"]},
]


def test_torchrun_mtpb_equals_one_process(tiny_checkpoint, tmp_path):
    data = tmp_path / "mtpb.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MTPB_ROWS))
    args = ["eval", "mtpb", "--data", str(data), "--model", str(tiny_checkpoint), "--samples", "2", "--threads", "1",
            "--timeout", "5", "--no-progress"]
    in_process(*args, "--out", str(tmp_path / "single"))
    proc = torchrun(*args, "--out", str(tmp_path / "torchrun"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
    single, merged = (read_jsonl(tmp_path / d / "results.jsonl") for d in ("single", "torchrun"))
    assert len(merged) == 2 * (3 + 2)  # every (problem, case, sample), in the single-process order
    assert [r["program"] for r in merged] == [r["program"] for r in single]
    assert merged == single
    assert proc.stdout.count("MTPB multi-turn: pass rate") == 1


def test_a_rank_that_dies_is_named_and_its_samples_resume(tiny_checkpoint, reference, tmp_path):
    """Two processes started as torchrun starts them (without its agent, which would stop rank 0 too);
    rank 1 is killed while it samples. Rank 0 says so in one line; a rerun (here by one process) keeps
    every sample both ranks made and ends with the uninterrupted run's samples."""
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "codegen_lm", *humaneval_args(tiny_checkpoint), "--out", str(out)]
    common = dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env(RANK=str(r), LOCAL_RANK=str(r), **common)) for r in (0, 1)]
    rank_file = out / "samples.rank-1-of-2.jsonl"
    deadline = time.monotonic() + 300
    while ranks[1].poll() is None and time.monotonic() < deadline:
        if rank_file.exists() and rank_file.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    ranks[1].kill()
    ranks[1].communicate()
    _, err = ranks[0].communicate(timeout=300)
    assert ranks[0].returncode == 1, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("codegen-lm: error: rank 0 of 2, waiting up to 24 h for every "
                                                   "rank to finish sampling: another rank stopped"), err
    assert f"the samples made so far are kept in {out}: run the same command again to resume" in lines[0]
    kept = rank_file.read_bytes().count(b"\n")
    assert kept >= 2 and (out / "samples.rank-0-of-2.jsonl").read_bytes().count(b"\n") == 9  # problems 0, 2, 4

    in_process(*humaneval_args(tiny_checkpoint), "--out", str(out))
    assert (out / "samples.jsonl").read_bytes() == (reference / "samples.jsonl").read_bytes()
    assert not list(out.glob("samples.rank-*"))
    assert json.loads((out / "summary.json").read_text())["samples"] == 15
