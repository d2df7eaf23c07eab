"""Run untrusted model-written Python against pytest tests, in a throwaway child process.

Each run gets a fresh temporary directory (removed afterwards) holding ``solution.py``
and ``test_solution.py``, and a child ``python -I`` that:

- has resource limits set before it starts (address space, CPU seconds, file size, open
  files, no core dumps, and a process cap for non-root users);
- runs in its own process group, killed whole on the wall-clock timeout and after exit;
- has no network: it moves itself into a new, empty network namespace (``unshare``
  through libc; Python 3.11 has no ``os.unshare``), which works for root and, through a
  user namespace, for users where the kernel allows it; and in every case an audit hook
  refuses IP sockets, name lookups and connects from Python code (plus starting
  processes when no namespace could be made, since a child could reach the network).

A crash, an endless loop or a memory hog gives a failed result; nothing escapes into the
caller's process or working directory.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OUTPUT_TAIL = 4000
MAX_FILE_BYTES = 16 * 1024 * 1024

# Runs inside the child before any user code. argv[1] is "1" to try a network namespace.
_BOOTSTRAP = r"""
import ctypes, socket, sys

def _unshare():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
            return True
        return libc.unshare(0x10000000 | 0x40000000) == 0  # CLONE_NEWUSER | CLONE_NEWNET
    except (OSError, AttributeError):
        return False

_isolated = sys.argv[1] == "1" and _unshare()
_INET = (socket.AF_INET, socket.AF_INET6, -1)  # -1: _socket.socket() default, IPv4
_LOOKUPS = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
            "socket.getnameinfo", "socket.sendto", "socket.sendmsg", "socket.connect"}
_SPAWN = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
          "subprocess.Popen", "pty.spawn"}

def _audit(event, args):
    if event == "socket.__new__" and args[1] in _INET or event in _LOOKUPS:
        raise PermissionError(f"network access is disabled in the sandbox ({event})")
    if not _isolated and event in _SPAWN:
        raise PermissionError(f"starting processes is disabled in the sandbox ({event})")

sys.addaudithook(_audit)
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-c", "pytest.ini",
                      "test_solution.py"]))
"""


@dataclass
class SandboxResult:
    """Outcome of one run: ``passed`` only when every test passed before the deadline."""

    passed: bool
    returncode: int | None
    timed_out: bool
    output: str


def run_python_tests(
    code: str,
    tests: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    tmp_root: str | Path | None = None,
    isolate_network: bool = True,
) -> SandboxResult:
    """Write ``code`` as ``solution.py`` and ``tests`` as ``test_solution.py``; run pytest.

    ``tmp_root`` is where the temporary directory is made (default: the system's).
    ``isolate_network=False`` skips the namespace and leaves only the audit hook.
    """
    workdir = Path(tempfile.mkdtemp(prefix="memgen-sandbox-", dir=tmp_root))
    try:
        _write(workdir / "solution.py", code)
        _write(workdir / "test_solution.py", tests)
        _write(workdir / "pytest.ini", "[pytest]\n")  # pins rootdir; no config from above
        return _run(workdir, timeout, memory_mb, isolate_network)
    except OSError as e:  # cannot write or spawn: a failed run, never a crash
        return SandboxResult(False, None, False, f"sandbox error: {e}")
    finally:
        _remove(workdir)


def _run(workdir: Path, timeout: float, memory_mb: int, isolate: bool) -> SandboxResult:
    cmd = [sys.executable, "-I", "-B", "-c", _BOOTSTRAP, "1" if isolate else "0"]
    limits = _limits(timeout, memory_mb)
    with open(workdir / ".output", "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=_child_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so one kill takes all of it
            preexec_fn=lambda: _apply_limits(limits),
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)  # also reaps stragglers the program left running
            proc.wait()
    output = _tail(workdir / ".output")
    passed = not timed_out and proc.returncode == 0
    return SandboxResult(passed, proc.returncode, timed_out, output)


def _limits(timeout: float, memory_mb: int) -> list[tuple[int, int]]:
    cpu = int(timeout) + 2  # CPU seconds: a backstop for the wall-clock timeout
    limits = [
        (resource.RLIMIT_AS, memory_mb * 1024 * 1024),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
    ]
    nproc = _nproc_limit()
    if nproc is not None:
        limits.append((resource.RLIMIT_NPROC, nproc))
    return limits


def _apply_limits(limits: list[tuple[int, int]]) -> None:
    # Runs in the forked child before exec: setrlimit calls only, nothing that allocates.
    for kind, value in limits:
        resource.setrlimit(kind, (value, value))


def _nproc_limit() -> int | None:
    """A process cap for fork bombs. RLIMIT_NPROC counts every task of the user, not
    just the child's, so it is set to what the user runs now plus headroom; root is
    exempt from it anyway."""
    if os.geteuid() == 0:
        return None
    uid, tasks = str(os.getuid()), 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue
        if fields.get("Uid", "").split()[:1] == [uid]:
            tasks += int(fields.get("Threads", "1"))
    return tasks + 64


def _child_env(workdir: Path) -> dict[str, str]:
    # No proxies, tokens or paths from the caller; single-threaded BLAS keeps numpy's
    # per-thread buffers inside the address-space limit.
    return {
        "PATH": os.defpath,
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", errors="replace")


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - OUTPUT_TAIL))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _remove(workdir: Path) -> None:
    def make_writable_and_retry(func, path, _exc_info):
        # The program may have made files or folders read-only.
        os.chmod(os.path.dirname(path), stat.S_IRWXU)
        if os.path.lexists(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
        func(path)

    try:
        shutil.rmtree(workdir, onerror=make_writable_and_retry)
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)
