"""Run untrusted model-written Python against pytest tests, and judge it from outside.

``run_python_tests(code, tests)`` writes ``solution.py`` and ``test_solution.py`` into a
fresh temporary directory (removed afterwards), runs pytest on them in a child, and says
whether every test passed. That pass is a reward in GRPO on code tasks, so the child must
not be able to fake it, nor harm the machine. Each protection is a named layer, and
:func:`isolation` probes (once per process, by running a probe in the sandbox) which of
them this machine gives:

``verdict``
    The exit status is ignored. The harness (``sandbox_harness.py``: a pytest plugin built
    before collection, so before the solution is imported) streams each test's outcome to
    the parent through an inherited pipe, every line prefixed with a random token that
    reached it through another pipe, read and closed before collection (so it is in no
    file, argument or environment variable). A pipe, not a report file: there is no name
    to find by listing a directory, and what the harness wrote cannot be rewritten, only
    followed by lines that fail the check. :mod:`~memgen_cli.data.sandbox_verdict` passes a
    run only if every line bears the token, the stream is whole, every collected test
    passed setup, call and teardown, the collected tests are the test file's own, as many
    as its AST defines (at least as many where ``parametrize`` and the like make the number
    unknowable), and the harness saw no tampering: before and after every test it checks
    that pytest's and pluggy's outcome machinery (module and class dictionaries, code
    objects), the registered plugins and hooks, ``builtins``, tracing hooks and each test
    function are still the objects they were. ``os._exit(0)``, ``sys.exit(0)``, a patched
    ``Function.runtest``, an added ``pytest_runtest_makereport`` hook, a replaced test
    function, edited harness globals and forged reports all fail.
``limits``
    Address space, CPU seconds, file size, open files, no core dumps (``setrlimit``), and
    a wall-clock timeout after which the run is killed and fails.
``process-cap``
    ``RLIMIT_NPROC`` (64 tasks), which binds only a uid that is not root. As root, the
    bubblewrap child runs as a fresh unprivileged uid, so a fork bomb stops at the cap.
``user-ns``
    Its own user namespace, as that unprivileged uid, with no capabilities.
``net-ns``
    An empty network namespace (loopback only): no network, whatever the code calls
    (ctypes, a subprocess). Abstract AF_UNIX sockets are per network namespace too.
``pid-ns``
    Its own PID namespace. The parent holds a pidfd on its first process and kills it; the
    kernel then kills every process in it, ``setsid`` or not, before that process is gone.
``fs-readonly``
    A new root holding, read-only, /usr, /lib*, /bin, the loader's files and localtime
    from /etc, and the interpreter's prefixes (with site-packages); the work directory (tests and solution
    bound read-only inside it), /tmp and /dev/shm are private tmpfs of 64 MiB each, gone
    with the run. The user's home, the project and the host's /tmp are not there.
``no-af-unix``
    A seccomp filter makes ``socket(AF_UNIX, ...)`` fail with EPERM, and
    ``io_uring_setup`` (whose socket ops bypass seccomp) with ENOSYS, so no local socket
    (Docker's, D-Bus, X11) is reachable even where a path or the network namespace leaks
    one. ``socketpair`` stays allowed: the pair is connected only to itself, and asyncio
    needs one. The filter knows x86_64 and aarch64, kills a process calling under another
    ABI (i386 ``int 0x80``) and refuses x32 calls; on other machines there is no filter.

Bubblewrap (``bwrap``, Debian's ``bubblewrap``; ``make sandbox-tools``) gives every layer.
It was chosen because it is one small C program (Flatpak's sandbox) that needs no daemon,
no image and no setuid bit where user namespaces are allowed, and sets up every namespace,
the read-only root, the tmpfs and the seccomp filter from its command line, dying with its
parent. As root it still runs the child as an unprivileged uid: it starts as that uid and
waits (``--userns-block-fd``) while the parent writes the namespace's id maps: that uid,
and root mapped to itself so that bwrap can bind an interpreter under a root-only home
(the child has no capabilities, so those files stay read-only to it). Docker and podman
need a daemon or images; nsjail is not packaged in Debian 12; firejail is setuid root.
Without bwrap, ``unshare`` (util-linux) gives ``net-ns`` and ``pid-ns`` (plus ``user-ns``
and ``process-cap`` for a non-root user) and the harness installs the seccomp filter
itself; with neither, ``verdict``, ``limits``, ``no-af-unix`` and, for a non-root user,
``process-cap`` remain. ``--task-option sandbox=strict`` (``KodCodeTask(sandbox=...)``)
refuses to run with any layer missing and says how to get it; ``best-effort``, the
default, says once which are missing.

What remains. The tests run in the solution's own interpreter, so a solution written
against this harness can still fake a pass: walk the heap (``gc``, frames,
``/proc/self/mem``) to the plugin's closures, read the token or rewrite the checks, then
write a forged stream; or swap a function between two checks and back. The token keeps
the solution from reporting on its own, and the checks catch patches made through the
names pytest and Python look up; neither stops code that targets the harness's private
state. The verdict is also no stronger than the tests: an object whose ``__eq__`` always
returns True passes ``assert f(x) == y``. The isolation layers do not depend on any of
this: whatever the code does, it does inside them.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memgen_cli.data.sandbox_launch import Launch, host_uid
from memgen_cli.data.sandbox_verdict import Expected, expected_tests, parse_events, verdict
from memgen_cli.errors import MemgenError

OUTPUT_TAIL = 4000
SANDBOX_MODES = ("best-effort", "strict")
LAYERS = (
    "verdict",
    "limits",
    "process-cap",
    "user-ns",
    "net-ns",
    "pid-ns",
    "fs-readonly",
    "no-af-unix",
)
HARNESS = Path(__file__).with_name("sandbox_harness.py")


@dataclass
class SandboxResult:
    """Outcome of one run: ``passed`` only when the verdict says every test passed."""

    passed: bool
    returncode: int | None
    timed_out: bool
    output: str
    reason: str = ""  # why it did not pass


@dataclass(frozen=True)
class Isolation:
    """How runs are isolated on this machine: the wrapper used and the layers it gives."""

    mechanism: str  # "bwrap", "unshare" or "none"
    layers: frozenset[str]
    notes: str = ""  # why a stronger mechanism was not used

    @property
    def missing(self) -> list[str]:
        return [layer for layer in LAYERS if layer not in self.layers]


def run_python_tests(
    code: str,
    tests: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    tmp_root: str | Path | None = None,
) -> SandboxResult:
    """Write ``code`` as ``solution.py`` and ``tests`` as ``test_solution.py``; run pytest.

    ``tmp_root`` is where the temporary directory is made (default: the system's).
    """
    try:
        expected = expected_tests(tests)
    except SyntaxError as e:
        return SandboxResult(False, None, False, "", f"the tests do not parse: {e}")
    home = Path(tempfile.mkdtemp(prefix="memgen-sandbox-", dir=tmp_root))
    try:
        _prepare(home, {"solution.py": code, "test_solution.py": tests})
        return _run(isolation(), home, timeout, memory_mb, expected)
    except OSError as e:  # cannot write or spawn: a failed run, never a crash
        return SandboxResult(False, None, False, "", f"sandbox error: {e}")
    finally:
        _remove(home)


# ------------------------------------------------------------------------------- layers
@functools.cache
def isolation() -> Isolation:
    """The strongest mechanism that works here, and the layers a probe run confirmed."""
    notes = []
    for mechanism in ("bwrap", "unshare", "none"):
        if mechanism != "none" and shutil.which(mechanism) is None:
            notes.append(f"{mechanism} not found")
            continue
        layers, why = _probe(mechanism)
        if layers is not None:
            return Isolation(mechanism, layers, "; ".join(notes))
        notes.append(f"{mechanism} does not work here ({why})")
    return Isolation("none", frozenset({"limits"}), "; ".join(notes))


_warned: set[str] = set()


def require_isolation(mode: str) -> Isolation:
    """Check ``mode`` ("strict" or "best-effort") against :func:`isolation`.

    ``strict`` raises :class:`MemgenError` naming the missing layers and how to get them;
    ``best-effort`` prints them to stderr, once per process.
    """
    if mode not in SANDBOX_MODES:
        raise MemgenError(f"sandbox must be one of {', '.join(SANDBOX_MODES)}; got {mode!r}.")
    iso = isolation()
    if not iso.missing:
        return iso
    message = (
        f"the code sandbox ({iso.mechanism}) lacks: {', '.join(iso.missing)}"
        + (f" [{iso.notes}]" if iso.notes else "")
        + ". For all layers install bubblewrap (`make sandbox-tools`, or apt-get install "
        "bubblewrap) on a kernel that allows user namespaces"
    )
    if mode == "strict":
        raise MemgenError(message + ", or pass --task-option sandbox=best-effort.")
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}.", file=sys.stderr)
    return iso


def _probe(mechanism: str) -> tuple[frozenset[str] | None, str]:
    """Run the harness's probe inside ``mechanism``; which layers held, or None and why."""
    home = Path(tempfile.mkdtemp(prefix="memgen-sandbox-probe-"))
    try:
        _prepare(home, {})
        canary = home / "canary"
        canary.mkdir()
        run = Launch(mechanism, home, ["--probe", str(canary)], timeout=20, memory_mb=1024)
        try:
            run.wait()
        finally:
            stream = run.stop()
        events = parse_events(stream, run.token)
        if not events or events[0][0] != "probe":
            output = _tail(home / "output").strip()
            return None, output.splitlines()[-1] if output else "no output"
        seen = events[0][1]
    except (OSError, ValueError) as e:
        return None, str(e)
    finally:
        _remove(home)
    own = {ns: os.readlink(f"/proc/self/ns/{ns}") for ns in ("user", "net", "pid")}
    held = {"verdict", "limits"}
    held |= {f"{ns}-ns" for ns in own if seen[ns] is not None and seen[ns] != own[ns]}
    if seen["unix_blocked"]:
        held.add("no-af-unix")
    if mechanism == "bwrap" and not seen["sees_canary"] and not seen["prefix_writable"]:
        held.add("fs-readonly")
    if host_uid(mechanism) != 0:
        held.add("process-cap")
    return frozenset(held), ""


# -------------------------------------------------------------------------------- a run
def _prepare(home: Path, files: dict[str, str]) -> None:
    work = home / "work"
    work.mkdir()
    for name, text in {**files, "pytest.ini": "[pytest]\n"}.items():  # pins rootdir
        (work / name).write_text(text, encoding="utf-8", errors="replace")
    shutil.copyfile(HARNESS, home / "harness.py")
    for path in (home, work):  # readable by the sandbox's uid; written by it only outside bwrap
        path.chmod(0o755)
    for path in [home / "harness.py", *work.iterdir()]:
        path.chmod(0o644)


def _run(
    iso: Isolation, home: Path, timeout: float, memory_mb: int, expected: Expected
) -> SandboxResult:
    run = Launch(iso.mechanism, home, ["test_solution.py"], timeout, memory_mb)
    try:
        timed_out = run.wait()
    finally:
        stream = run.stop()
    output = _tail(home / "output")
    if timed_out:
        return SandboxResult(False, run.proc.returncode, True, output, "timed out")
    passed, reason = verdict(stream, run.token, expected)
    return SandboxResult(passed, run.proc.returncode, False, output, reason)


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - OUTPUT_TAIL))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _remove(home: Path) -> None:
    def make_writable_and_retry(func, path, _exc_info):
        # The program may have made files or folders read-only.
        os.chmod(os.path.dirname(path), stat.S_IRWXU)
        if os.path.lexists(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
        func(path)

    try:
        shutil.rmtree(home, onerror=make_writable_and_retry)
    except OSError:
        shutil.rmtree(home, ignore_errors=True)
