"""Sampling an evaluation over several processes and machines, started by torchrun.

`torchrun --nproc-per-node N -m codegen_lm eval humaneval|mtpb ...`: every process (rank) loads the
model, samples its share of the work (round robin: item i goes to rank i mod world_size, so shares are
fixed by the problem list alone), and sends what it made to rank 0, which puts it back in the
single-process order, executes and scores. Seeds depend on the problem and sample number only, so the
merged samples are the ones one process would make.

The processes coordinate over gloo, whatever device they sample on: they exchange a few Python objects
(errors, finished samples), never tensors, so NCCL would add nothing but one-GPU-per-rank constraints,
and gloo's monitored barrier names the ranks that did not arrive. Environment detection and the
choice of each rank's device are training/distributed.py's `setup`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch.distributed as dist

from ..training.distributed import DistEnv, setup

T = TypeVar("T")

DEFAULT_WAIT_HOURS = 24.0  # how long ranks wait for one another's samples (a share can take hours)
STARTUP_TIMEOUT = timedelta(hours=1)  # joining, agreeing on errors, handing over samples
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The ranks could not join or finish together; the message says which step and why."""


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 when it is not set)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(text)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={text!r} is not an integer") from None
    if world < 1:
        raise DistributedError(f"WORLD_SIZE={world} must be >= 1")
    return world


class Group:
    """This process's place among the ranks, and the few collectives an evaluation needs."""

    def __init__(self, env: DistEnv, wait_s: float) -> None:
        self.env, self.wait_s = env, wait_s
        self.rank, self.world_size, self.device = env.rank, env.world_size, env.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world_size-th, starting at its rank."""
        return list(items[self.rank :: self.world_size])

    def _collective(self, what: str, fn, *args, **kwargs) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {self.rank} of {self.world_size}, {what}: {_reason(exc)}") from None

    def agree(self, error: str | None) -> str | None:
        """After a step that may fail on some ranks only: the first rank's error (prefixed with its rank
        when it is another's), or None when every rank succeeded."""
        errors: list[str | None] = [None] * self.world_size
        self._collective("sharing errors", dist.all_gather_object, errors, error)
        for rank, message in enumerate(errors):
            if message is not None:
                return message if rank == self.rank else f"rank {rank}: {message}"
        return None

    def barrier(self) -> None:
        self._collective("waiting for the other ranks", dist.barrier)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's obj on rank 0 (in rank order), None elsewhere. Waits up to wait_s for the slowest
        rank; a rank that stopped is named."""
        hours = self.wait_s / 3600
        self._collective(f"waiting up to {hours:g} h for every rank to finish sampling", dist.monitored_barrier,
                         timeout=timedelta(seconds=self.wait_s), wait_all_ranks=True)
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        self._collective("collecting the samples on rank 0", dist.gather_object, obj, out, dst=0)
        return out

    def release(self) -> None:
        """Rank 0: the merged results are written; the other ranks may clean up and exit."""
        self._collective("telling the ranks that the samples are merged", dist.broadcast_object_list, [True], src=0)

    def wait_for_main(self) -> None:
        """Other ranks: wait until rank 0 has written the merged samples (see release)."""
        box: list[Any] = [None]
        self._collective("waiting for rank 0 to write the merged samples", dist.broadcast_object_list, box, src=0)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def join(device: str = "cpu", wait_hours: float = DEFAULT_WAIT_HOURS) -> Group | None:
    """The torchrun group this process is part of (a gloo process group), or None when it runs alone.
    `device` is what the user asked for; Group.device is this rank's (cuda: the local rank's GPU)."""
    world = world_size_from_env()
    if world == 1:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if not os.environ.get(name)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the processes with "
                               f"torchrun (or set what it sets)")
    rank = os.environ["RANK"]
    try:
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=STARTUP_TIMEOUT)
        env = setup("cuda" if device.startswith("cuda") else device)
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(f"rank {rank} could not join the torchrun group (device {device}): {_reason(exc)}"
                               ) from None
    return Group(env, wait_hours * 3600)


def _reason(exc: BaseException) -> str:
    """The gist of a torch.distributed error: its first sentence, without gloo's source location, and
    what it means when a peer went away."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    text = text.split(". ")[0].rstrip(".")
    if "closed by peer" in text or "Connection reset" in text:
        text = f"another rank stopped ({text})"
    return text
