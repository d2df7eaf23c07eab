"""Start one sandboxed child and end it: the wrapper (bubblewrap, unshare or none), its
user namespace, resource limits and seccomp filter, the report pipe, the kill.

Used by :mod:`memgen_cli.data.sandbox`, whose docstring says what each layer gives.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import resource
import secrets
import select
import signal
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_PROCESSES = 64
TMPFS_BYTES = 64 * 1024 * 1024
MAX_REPORT_BYTES = 4 * 1024 * 1024
WORKDIR = "/sandbox"  # the work directory inside bubblewrap
# Uids no account uses; each bwrap run as root picks one, so that RLIMIT_NPROC binds and
# concurrent runs do not share a process count.
_UID_BASE, _UID_SPAN = 2_000_000_000, 1 << 20
_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_libc = ctypes.CDLL(None, use_errno=True)
_SIGKILL = int(signal.SIGKILL)


class Launch:
    """One child: the harness under ``mechanism``, its token, report pipe and deadline."""

    def __init__(self, mechanism: str, home: Path, args: list[str], timeout: float, memory_mb: int):
        self.token = secrets.token_hex(16)
        self.deadline = time.monotonic() + timeout
        self.uid = host_uid(mechanism)
        self.gid = self.uid if self.uid != os.getuid() else os.getgid()
        self.pid1: int | None = None  # a pidfd on the first process of its PID namespace
        self.stream = bytearray()
        token_r, token_w = os.pipe()
        os.write(token_w, self.token.encode())
        os.close(token_w)
        self.report, report_w = os.pipe()
        seccomp = _pipe_with(seccomp_program())
        inherit = [token_r, report_w, *([seccomp] if seccomp is not None else [])]
        harness_seccomp = seccomp if (seccomp is not None and mechanism != "bwrap") else -1
        env = {
            **_child_env(mechanism, home),
            "MEMGEN_SANDBOX_FDS": f"{token_r},{report_w},{harness_seccomp}",
        }
        harness = ["/harness.py" if mechanism == "bwrap" else str(home / "harness.py")]
        python = [sys.executable, "-I", "-B", *harness, *args]
        handshake = None
        if mechanism == "bwrap":
            info_r, info_w = os.pipe()
            block_r, block_w = os.pipe()
            inherit += [info_w, block_r]
            handshake = (info_r, block_w)
            cmd = _bwrap(home, seccomp, info_w, block_r, self.uid, self.gid) + python
        elif mechanism == "unshare":
            cmd = _unshare() + python
        else:
            cmd = python
        limits = _limits(timeout, memory_mb, self.uid)
        as_uid = {"user": self.uid, "group": self.gid, "extra_groups": []}
        if self.uid == os.getuid():
            as_uid = {}
        try:
            with open(home / "output", "wb") as out:
                self.proc = subprocess.Popen(
                    cmd,
                    cwd="/" if mechanism == "bwrap" else home / "work",
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, so one kill takes all of it
                    pass_fds=inherit,
                    preexec_fn=lambda: _apply_limits(limits),
                    **as_uid,
                )
        except BaseException:
            for fd in [self.report, *(handshake or ())]:
                os.close(fd)
            raise
        finally:
            for fd in inherit:
                os.close(fd)
        if handshake is not None:
            self._map_user(*handshake)

    def _map_user(self, info_r: int, block_w: int) -> None:
        """bwrap waits on the block pipe while we write its user namespace's id maps. As
        root: the sandbox's fresh uid, and root itself, so that bwrap (holding capabilities
        only inside the namespace) can bind an interpreter under a root-only home; the
        sandboxed process has no capabilities, so root's files stay read-only to it."""
        try:
            info = b""
            while time.monotonic() < self.deadline and select.select([info_r], [], [], 1)[0]:
                chunk = os.read(info_r, 4096)
                if not chunk:
                    break
                info += chunk
            pid = json.loads(info)["child-pid"]
            self.pid1 = os.pidfd_open(pid)  # pinned before bwrap can reap it
            root = "0 0 1\n" if os.geteuid() == 0 else ""
            proc_dir = Path(f"/proc/{pid}")
            (proc_dir / "setgroups").write_text("deny")
            (proc_dir / "uid_map").write_text(f"{root}{self.uid} {self.uid} 1\n")
            (proc_dir / "gid_map").write_text(f"{root}{self.gid} {self.gid} 1\n")
            os.write(block_w, b"1")
        except (OSError, ValueError, KeyError):
            pass  # bwrap failed to start: its output says why, and the run fails
        finally:
            os.close(info_r)
            os.close(block_w)

    def wait(self) -> bool:
        """Read the report stream until the child exits; True if the deadline came first."""
        while self.proc.poll() is None and len(self.stream) <= MAX_REPORT_BYTES:
            left = self.deadline - time.monotonic()
            if left <= 0:
                return True
            if select.select([self.report], [], [], min(left, 0.05))[0]:
                self.stream += os.read(self.report, 65536)
        return False

    def stop(self) -> bytes:
        """Kill everything the child started, wait until it is gone; the whole report."""
        alive = self.proc.poll() is None  # else its children were handed to init
        pins = [self.pid1] + [_pidfd(pid) for pid in (_children(self.proc.pid) if alive else ())]
        pins = [fd for fd in pins if fd is not None]
        for fd in pins:  # the first process of a PID namespace takes the rest with it
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for fd in pins:
            select.select([fd], [], [], 5)  # readable once that process has exited
            os.close(fd)
        self.stream += _drain(self.report)
        return bytes(self.stream) if len(self.stream) <= MAX_REPORT_BYTES else b""


def _bwrap(
    home: Path, seccomp: int | None, info_w: int, block_r: int, uid: int, gid: int
) -> list[str]:
    cmd = ["bwrap", "--unshare-user", "--info-fd", str(info_w), "--userns-block-fd", str(block_r)]
    cmd += ["--uid", str(uid), "--gid", str(gid)]
    cmd += [
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ]
    cmd += ["--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            cmd += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            cmd += ["--ro-bind", top, top]
    for path in (*_ETC, *_python_roots()):
        cmd += ["--ro-bind-try", path, path]
    cmd += ["--proc", "/proc", "--dev", "/dev"]
    for tmpfs in (WORKDIR, "/tmp", "/dev/shm"):
        cmd += ["--size", str(TMPFS_BYTES), "--tmpfs", tmpfs]
    for file in (home / "work").iterdir():
        cmd += ["--ro-bind", str(file), f"{WORKDIR}/{file.name}"]
    cmd += ["--ro-bind", str(home / "harness.py"), "/harness.py", "--chdir", WORKDIR]
    if seccomp is not None:
        cmd += ["--seccomp", str(seccomp)]
    return [*cmd, "--"]


def _unshare() -> list[str]:
    cmd = ["unshare", "--fork", "--pid", "--kill-child", "--mount-proc", "--net", "--ipc", "--uts"]
    return cmd + (["--user", "--map-root-user"] if os.geteuid() != 0 else []) + ["--"]


def _python_roots() -> list[str]:
    """The interpreter's prefixes and package directories, outside /usr, none nested."""
    paths = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix}
    paths |= {sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths |= {os.path.realpath(p) for p in paths if p}
    roots: list[str] = []
    for path in sorted(p for p in paths if p and os.path.isdir(p)):
        inside = (path + "/").startswith(("/usr/", *(r + "/" for r in roots)))
        if not inside and path != "/":
            roots.append(path)
    return roots


def host_uid(mechanism: str) -> int:
    """The uid the child's processes count against on the host."""
    if mechanism == "bwrap" and os.geteuid() == 0:
        return _UID_BASE + secrets.randbelow(_UID_SPAN)
    return os.getuid()


def _child_env(mechanism: str, home: Path) -> dict[str, str]:
    # No proxies, tokens or paths from the caller; single-threaded BLAS keeps numpy's
    # per-thread buffers inside the address-space limit.
    work = WORKDIR if mechanism == "bwrap" else str(home / "work")
    return {
        "PATH": os.defpath,
        "HOME": work,
        "TMPDIR": "/tmp" if mechanism == "bwrap" else work,
        "LANG": "C.UTF-8",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }


def _limits(timeout: float, memory_mb: int, uid: int) -> list[tuple[int, int]]:
    cpu = int(timeout) + 2  # CPU seconds: a backstop for the wall-clock timeout
    limits = [
        (resource.RLIMIT_AS, memory_mb * 1024 * 1024),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_FSIZE, MAX_FILE_BYTES),
        (resource.RLIMIT_NOFILE, 256),
        (resource.RLIMIT_CORE, 0),
    ]
    if uid != 0:
        limits.append((resource.RLIMIT_NPROC, _nproc_limit(uid)))
    return limits


def _apply_limits(limits: list[tuple[int, int]]) -> None:
    # Runs in the forked child before exec, after the switch to the sandbox's uid.
    for kind, value in limits:
        resource.setrlimit(kind, (value, value))
    _libc.prctl(1, _SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die if memgen dies


def _nproc_limit(uid: int) -> int:
    """RLIMIT_NPROC also counts, host-wide, every task the uid already runs: a fresh uid
    (bwrap as root) runs none; for a real user, add what they run now."""
    if uid >= _UID_BASE:
        return MAX_PROCESSES
    tasks = 0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
        except (OSError, ValueError):
            continue
        if fields.get("Uid", "").split()[:1] == [str(uid)]:
            tasks += int(fields.get("Threads", "1"))
    return tasks + MAX_PROCESSES


# ------------------------------------------------------------------------------ seccomp
# platform.machine() -> (AUDIT_ARCH_*, __NR_socket, __NR_io_uring_setup)
_ARCHES = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}


def seccomp_program() -> bytes | None:
    """Classic BPF over seccomp_data: socket(AF_UNIX) -> EPERM, io_uring_setup -> ENOSYS,
    a foreign ABI (arch or x32 bit) -> kill or EPERM; None on an unknown machine."""
    arch = _ARCHES.get(platform.machine())
    if arch is None:
        return None
    audit_arch, nr_socket, nr_io_uring = arch
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, JGE, BPF_RET|K
    allow, kill, err = 0x7FFF0000, 0x80000000, 0x00050000
    program = [
        (ld, 0, 0, 4),  # 0: A = arch
        (jeq, 1, 0, audit_arch),  # 1: ours -> 3
        (ret, 0, 0, kill),  # 2: another ABI (i386 int 0x80): kill the process
        (ld, 0, 0, 0),  # 3: A = syscall number
        (jge, 5, 0, 0x40000000),  # 4: x32 ABI -> 10
        (jeq, 5, 0, nr_io_uring),  # 5: -> 11
        (jeq, 0, 2, nr_socket),  # 6: socket -> 7, else -> 9
        (ld, 0, 0, 16),  # 7: A = low word of args[0], the address family
        (jeq, 1, 0, 1),  # 8: AF_UNIX -> 10
        (ret, 0, 0, allow),  # 9
        (ret, 0, 0, err | errno.EPERM),  # 10
        (ret, 0, 0, err | errno.ENOSYS),  # 11
    ]
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


def _pipe_with(data: bytes | None) -> int | None:
    if data is None:
        return None
    read, write = os.pipe()
    os.write(write, data)  # far below a pipe's capacity
    os.close(write)
    return read


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 65536):
            data += chunk
    except BlockingIOError:
        pass
    os.close(fd)
    return data
