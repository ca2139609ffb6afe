"""The engine's loop thread computes alone: the thread that starts it hands back its OpenMP pools
(kernels/openmp.py says why: with two threads' pools alive, libgomp's workers stop spinning)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from codegen_lm.engine import Engine
from codegen_lm.kernels import openmp


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_region() -> None:
    """An elementwise op large enough for PyTorch to run it on its OpenMP team."""
    x = torch.ones(4_000_000)
    torch.add(x, 1.0, out=x)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_release_frees_the_calling_threads_pool_and_it_comes_back(two_threads):
    parallel_region()
    if not any("torch" in p for p in openmp.gnu_openmp_runtimes()):
        pytest.skip("this PyTorch build does not run on GNU OpenMP (libgomp)")
    with_pool = os_threads()
    assert openmp.release_thread_pools() >= 1
    assert os_threads() <= with_pool - 1  # PyTorch's worker left (and numba's, if it had one here)
    parallel_region()
    assert os_threads() >= with_pool - 1 + 1  # the next parallel region builds a new pool


def test_release_is_harmless_without_a_pool():
    done = []
    worker = threading.Thread(target=lambda: done.append(openmp.release_thread_pools()))
    worker.start()
    worker.join()
    assert done and done[0] >= 0


def test_engine_start_hands_back_the_starting_threads_pools(model, monkeypatch):
    calls = []
    real = openmp.release_thread_pools
    monkeypatch.setattr(openmp, "release_thread_pools", lambda: calls.append(threading.get_ident()) or real())
    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        out = engine.submit([1, 2, 3], max_new_tokens=4, min_new_tokens=4, temperature=0.0).result()
        assert len(out.outputs[0].token_ids) == 4
    finally:
        engine.stop()
    assert calls == [threading.get_ident()]
