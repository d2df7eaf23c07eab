"""The code sandbox: programs pass or fail on their merits, none can fake a pass, and none
reaches the network, local sockets, files outside, or outlives its run.

Each adversarial program is written so that it *would* pass if its trick worked; the test
asserts that it does not, and (``clean_dirs``) that nothing is left behind.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import time
from pathlib import Path

import pytest

from memgen_cli.data import sandbox
from memgen_cli.data.base import Example
from memgen_cli.data.kodcode import KodCodeTask, extract_code
from memgen_cli.data.sandbox import Isolation, isolation, run_python_tests
from memgen_cli.data.sandbox_launch import MAX_PROCESSES, Launch
from memgen_cli.data.sandbox_verdict import expected_tests, verdict
from memgen_cli.errors import MemgenError

TESTS = "from solution import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
EXAMPLE = Example(id="k/0", question="Write add(a, b).", answer=TESTS)
RIGHT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"


def needs(*layers: str):
    missing = [layer for layer in layers if layer not in isolation().layers]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"this machine's sandbox ({isolation().mechanism}) lacks {', '.join(missing)}: "
        "install bubblewrap (make sandbox-tools)",
    )


def completion(body: str) -> str:
    return f"Here is my solution:\n\n```python\n{body}\n```\n\nIt should work."


@pytest.fixture
def clean_dirs(tmp_path, monkeypatch):
    """A working directory and a sandbox root that must both stay empty."""
    cwd, root = tmp_path / "cwd", tmp_path / "sandboxes"
    cwd.mkdir()
    root.mkdir()
    monkeypatch.chdir(cwd)
    yield root
    assert list(cwd.iterdir()) == [], "the sandbox left files in the working directory"
    assert list(root.iterdir()) == [], "the sandbox's temporary directory was not removed"


def grade(body: str, root: Path, **limits) -> float:
    task = KodCodeTask(**limits)
    result = run_python_tests(
        extract_code(completion(body)),
        EXAMPLE.answer,
        timeout=task.timeout,
        memory_mb=task.memory_mb,
        tmp_root=root,
    )
    assert task.grade(completion(body), EXAMPLE) == float(result.passed)  # same verdict
    return float(result.passed)


def marked(name: str) -> list[int]:
    """Pids of processes whose name (comm) is ``name``."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == name:
                found.append(int(comm.parent.name))
        except (OSError, ValueError):
            pass
    return found


def name_self(name: str) -> str:
    """Solution code that renames its process (PR_SET_NAME), so the test can find it."""
    return f"ctypes.CDLL(None).prctl(15, {name.encode()!r}, 0, 0, 0)"


# ----------------------------------------------------------------------------- honest runs
def test_correct_program_passes(clean_dirs):
    body = "def add(a, b):\n    open('scratch.txt', 'w').write('x')\n    return a + b"
    assert grade(body, clean_dirs) == 1.0


def test_wrong_program_fails(clean_dirs):
    assert grade(WRONG, clean_dirs) == 0.0


def test_no_code_block_scores_zero():
    assert KodCodeTask().grade("def add(a, b): return a + b", EXAMPLE) == 0.0


def test_parametrized_class_and_fixture_tests_pass(clean_dirs):
    tests = (
        "import pytest\nfrom solution import add\n\n"
        "@pytest.mark.parametrize('a, b, c', [(1, 2, 3), (0, 0, 0)])\n"
        "def test_table(a, b, c, tmp_path, monkeypatch):\n    assert add(a, b) == c\n\n"
        "class TestAdd:\n    def test_neg(self):\n        assert add(-1, 1) == 0\n"
    )
    assert run_python_tests(RIGHT, tests, tmp_root=clean_dirs).passed
    assert not run_python_tests("def add(a, b):\n    return 0\n", tests, tmp_root=clean_dirs).passed


def test_crashing_program_fails(clean_dirs):
    body = "import ctypes\n\ndef add(a, b):\n    return ctypes.string_at(0)"  # segfault
    assert not run_python_tests(body, TESTS, tmp_root=clean_dirs).passed


def test_timeout_fails_in_time(clean_dirs):
    start = time.monotonic()
    result = run_python_tests("while True:\n    pass\n", TESTS, timeout=2, tmp_root=clean_dirs)
    assert not result.passed and result.timed_out
    assert time.monotonic() - start < 5


def test_memory_hog_fails(clean_dirs):
    body = "def add(a, b):\n    hog = []\n    while True:\n        hog.append(bytearray(10**7))"
    result = run_python_tests(body, TESTS, memory_mb=300, timeout=10, tmp_root=clean_dirs)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.output


def test_file_bomb_fails(clean_dirs):
    body = "def add(a, b):\n    with open('big', 'wb') as f:\n        while True:\n            f.write(b'x' * 2**20)"
    assert not run_python_tests(body, TESTS, tmp_root=clean_dirs).passed


# ------------------------------------------------------------------- faking the verdict
# A whole passing report, as the harness would write it, under a guessed token.
FORGED = "".join(
    f"{'0' * 32}\t{event!r}\n"
    for event in [
        ("collected", ("test_solution.py::test_add",)),
        *[
            ("report", "test_solution.py::test_add", when, "passed")
            for when in ("setup", "call", "teardown")
        ],
        ("finished", 0),
    ]
)
TRICKS = {
    "exit-at-import": "import os\nos._exit(0)\n",
    "sys-exit-in-test": "import sys\n\ndef add(a, b):\n    sys.exit(0)\n",
    "harness-globals": (
        "import sys, builtins\n"
        "main = sys.modules['__main__']\n"
        "for name in list(vars(main)):\n"
        "    if not name.startswith('__'):\n"
        "        setattr(main, name, lambda *a, **k: None)\n"
        "builtins.isinstance = lambda *a: True\n"
        "import _pytest.python\n_pytest.python.Function.runtest = lambda self: None\n" + WRONG
    ),
    "patch-runtest": (
        "import _pytest.python\n_pytest.python.Function.runtest = lambda self: None\n" + WRONG
    ),
    "report-hook": (
        "import gc, pytest, _pytest.config\n\n"
        "class Pass:\n"
        "    @pytest.hookimpl(hookwrapper=True)\n"
        "    def pytest_runtest_makereport(self, item, call):\n"
        "        outcome = yield\n"
        "        outcome.get_result().outcome = 'passed'\n\n"
        "config = next(o for o in gc.get_objects() if isinstance(o, _pytest.config.Config))\n"
        "config.pluginmanager.register(Pass())\n" + WRONG
    ),
    "report-property": (
        "from _pytest.reports import TestReport\n"
        "TestReport.outcome = property(lambda self: 'passed', lambda self, value: None)\n" + WRONG
    ),
    "swap-test-function": (  # once the test module defines it, before pytest collects it
        "import sys, threading\n\n"
        "def swap():\n"
        "    while not hasattr(sys.modules.get('test_solution'), 'test_add'):\n"
        "        pass\n"
        "    sys.modules['test_solution'].test_add = lambda: None\n\n"
        "sys.setswitchinterval(1e-6)\n"
        "threading.Thread(target=swap, daemon=True).start()\n" + WRONG
    ),
    "swap-pytest-code": (  # same function object, new code
        "import _pytest.python\n\n"
        "def call(pyfuncitem):\n    return True\n\n"
        "_pytest.python.pytest_pyfunc_call.__code__ = call.__code__\n" + WRONG
    ),
    "forged-report": (
        "import os\n"
        f"forged = {FORGED!r}.encode()\n"
        "for name in ('report', 'report.json', '/tmp/report'):\n"
        "    open(name, 'wb').write(forged)\n"
        "for fd in map(int, os.listdir('/proc/self/fd')):\n"
        "    try:\n        os.write(fd, forged)\n    except OSError:\n        pass\n"
        "os._exit(0)\n"
    ),
}


@pytest.mark.parametrize("trick", TRICKS.values(), ids=TRICKS.keys())
def test_tricks_do_not_fake_a_pass(clean_dirs, trick):
    result = run_python_tests(trick, TESTS, timeout=5, tmp_root=clean_dirs)
    assert not result.passed, result.output
    assert not result.timed_out and result.reason


def test_each_mechanism_judges_by_the_report(clean_dirs, monkeypatch):
    """Without bubblewrap the verdict holds as well: the fallbacks run the same harness."""
    fallbacks = ("bwrap", "unshare", "none")
    for mechanism in fallbacks[fallbacks.index(isolation().mechanism) + 1 :]:
        iso = Isolation(mechanism, frozenset({"verdict"}))
        monkeypatch.setattr(sandbox, "isolation", lambda iso=iso: iso)
        assert run_python_tests(RIGHT, TESTS, tmp_root=clean_dirs).passed, mechanism
        exit_early = run_python_tests(TRICKS["exit-at-import"], TESTS, tmp_root=clean_dirs)
        assert not exit_early.passed, mechanism


def test_expected_tests_counts_the_test_file():
    plain = expected_tests(TESTS + "\n\ndef test_add():\n    pass\n\ndef helper():\n    pass\n")
    assert (plain.names, plain.count, plain.exact) == ({"test_add"}, 1, True)  # redefined
    classes = expected_tests(
        "class TestA:\n    def test_x(self): pass\n    def other(self): pass\n"
    )
    assert (classes.names, classes.count, classes.exact) == ({"TestA::test_x"}, 1, True)
    param = expected_tests(
        "import pytest\n@pytest.mark.parametrize('x', [1, 2])\ndef test_p(x): pass\n"
    )
    assert (param.count, param.exact) == (1, False)
    inherited = expected_tests(
        "import unittest\nclass Check(unittest.TestCase):\n    def test_a(self): pass\n"
    )
    assert inherited.exact is False


def test_verdict_needs_the_token_and_every_expected_test():
    token = secrets.token_hex(16)
    expected = expected_tests(TESTS)

    def stream(*events) -> bytes:
        return b"".join(f"{token}\t{event!r}\n".encode() for event in events)

    node = "test_solution.py::test_add"
    runs = [("report", node, when, "passed") for when in ("setup", "call", "teardown")]
    good = stream(("collected", (node,)), *runs, ("finished", 0))
    assert verdict(good, token, expected) == (True, "")
    assert not verdict(good, "f" * 32, expected)[0]  # someone else's token
    assert not verdict(good[:-1], token, expected)[0]  # cut off
    assert not verdict(good + b"junk\n", token, expected)[0]  # an unsigned line
    assert not verdict(stream(("collected", (node,)), *runs), token, expected)[0]  # no end
    assert not verdict(stream(("collected", ()), ("finished", 0)), token, expected)[0]
    extra = "test_solution.py::test_free"  # a test the solution smuggled in
    more = [("report", extra, when, "passed") for when in ("setup", "call", "teardown")]
    smuggled = stream(("collected", (node, extra)), *runs, *more, ("finished", 0))
    assert "not in the test file" in verdict(smuggled, token, expected)[1]
    tampered = stream(("collected", (node,)), ("tampered", ("x",)), *runs, ("finished", 0))
    assert not verdict(tampered, token, expected)[0]


# ------------------------------------------------------------------------------ escapes
@needs("user-ns", "net-ns", "pid-ns", "fs-readonly", "no-af-unix")
def test_inside_view(clean_dirs, tmp_path):
    tests = (
        "import ctypes, errno, os\n\n"
        "def test_view():\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    params = ctypes.create_string_buffer(120)\n"
        "    assert libc.syscall(425, 1, params) == -1  # io_uring_setup\n"
        "    assert ctypes.get_errno() == errno.ENOSYS\n"
        "    assert os.getuid() != 0 and os.getpid() < 10\n"
        f"    assert os.readlink('/proc/self/ns/net') != {os.readlink('/proc/self/ns/net')!r}\n"
        f"    assert not os.path.exists({str(tmp_path)!r})\n"
        f"    assert not os.path.exists({os.path.expanduser('~')!r} + '/.bashrc')\n"
        "    assert not os.access('/usr/bin', os.W_OK)\n"
    )
    result = run_python_tests("", tests, tmp_root=clean_dirs)
    assert result.passed, result.output


def refused_everywhere(server: socket.socket, body: str, clean_dirs, refusal: str, ways: int):
    """The solution ``body`` fails its tests, printing ``refusal`` once for each of its ``ways``
    in, and nothing ever reached ``server`` (closed afterwards)."""
    try:
        result = run_python_tests(body, TESTS, tmp_root=clean_dirs)
        assert not result.passed, result.output
        assert result.output.count(refusal) == ways, result.output
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


@needs("net-ns")
def test_network_is_unreachable(clean_dirs):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    address = f"('127.0.0.1', {port})"
    connect = f"import socket; socket.create_connection({address}, 2)"
    # Three ways in, each of which would make add() right: Python's socket module; libc
    # through ctypes, past anything Python could hook (sockaddr_in: family, port, address);
    # a fresh interpreter with no hooks at all.
    body = (
        "import ctypes, socket, struct, subprocess, sys\n\n"
        "def python():\n"
        f"    socket.create_connection({address}, 2)\n\n"
        "def libc():\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
        f"    addr = struct.pack('=HH4s8x', socket.AF_INET, socket.htons({port}), bytes([127, 0, 0, 1]))\n"
        "    if fd < 0 or libc.connect(fd, addr, len(addr)) != 0:\n"
        "        raise OSError(ctypes.get_errno(), 'libc connect')\n\n"
        "def child():\n"
        f"    subprocess.run([sys.executable, '-c', {connect!r}], check=True)\n\n"
        "def add(a, b):\n"
        "    for way in (python, libc, child):\n"
        "        try:\n            way()\n            return a + b\n"
        "        except (OSError, subprocess.CalledProcessError) as e:\n"
        "            print(way.__name__, 'refused:', e)\n"
    )
    refused_everywhere(server, body, clean_dirs, "refused:", 3)


@needs("no-af-unix")
def test_local_sockets_are_unreachable(clean_dirs, tmp_path):
    path = str(tmp_path / "service.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    body = (
        "import ctypes, socket\n\n"
        "def python():\n"
        f"    socket.socket(socket.AF_UNIX).connect({path!r})\n\n"
        "def libc():\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    if libc.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0) < 0:\n"
        "        raise OSError(ctypes.get_errno(), 'libc socket')\n\n"
        "def add(a, b):\n"
        "    for way in (python, libc):\n"
        "        try:\n            way()\n            return a + b\n"
        "        except OSError as e:\n"
        "            print(way.__name__, 'refused:', repr(e))\n"
    )
    refused_everywhere(server, body, clean_dirs, "PermissionError", 2)  # seccomp's EPERM
    pair = "import socket\n\ndef add(a, b):\n    socket.socketpair()\n    return a + b"
    assert run_python_tests(pair, TESTS, tmp_root=clean_dirs).passed  # asyncio needs these


@needs("fs-readonly")
def test_files_outside_are_untouched(clean_dirs, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("precious")
    body = (
        "import os, sys\n\n"
        "def add(a, b):\n"
        f"    home = {str(home)!r}\n"
        "    for attempt in (\n"
        "        lambda: open(os.path.join(home, 'notes.txt'), 'w').write('gone'),\n"
        "        lambda: os.remove(os.path.join(home, 'notes.txt')),\n"
        "        lambda: open(os.path.join(home, 'new.txt'), 'w').write('planted'),\n"
        "        lambda: open(os.path.join(sys.prefix, 'planted.txt'), 'w').write('x'),\n"
        "    ):\n"
        "        try:\n            attempt()\n        except OSError:\n            return None\n"
        "    return a + b\n"
    )
    assert not run_python_tests(body, TESTS, tmp_root=clean_dirs).passed
    assert [p.name for p in home.iterdir()] == ["notes.txt"]
    assert (home / "notes.txt").read_text() == "precious"
    assert not Path(sys.prefix, "planted.txt").exists()


@needs("process-cap", "pid-ns")
def test_fork_bomb_is_capped_and_killed(clean_dirs, monkeypatch):
    """Each process of the bomb forks 8 times (256 processes if nothing caps them) and sleeps.
    No clock decides what is counted: its first process waits until every process has stopped
    forking and renames itself, and only then does the run's deadline fall, however slow the
    machine; the count taken there is the bomb's peak, and the kill is the timeout's."""
    name = "bomb" + secrets.token_hex(4)
    done = "done" + name[4:]  # the first process's name once no process forks any more
    body = (
        "import ctypes, os, time\n\n"
        "def add(a, b):\n"
        f"    {name_self(name)}\n"
        "    first = os.getpid()\n"
        "    forking_r, forking_w = os.pipe()  # the write end: open while a process forks\n"
        "    for _ in range(8):  # 256 processes if nothing caps it\n"
        "        try:\n            os.fork()\n        except OSError:\n            pass\n"
        "    os.close(forking_w)\n"
        "    if os.getpid() == first:\n"
        "        os.read(forking_r, 1)  # end of file: every process has closed it\n"
        f"        {name_self(done)}\n"
        "    time.sleep(3600)\n"
    )
    wait, seen = Launch.wait, {}

    def deadline_once_the_bomb_is_done(launch: Launch) -> bool:
        while not marked(done) and launch.proc.poll() is None:
            if time.monotonic() > launch.deadline:
                return wait(launch)  # the bomb never got done: the asserts below say so
            time.sleep(0.02)
        seen["peak"] = len(marked(name)) + len(marked(done))
        seen["at"] = launch.deadline = time.monotonic()
        return wait(launch)

    monkeypatch.setattr(Launch, "wait", deadline_once_the_bomb_is_done)
    result = run_python_tests(body, TESTS, timeout=120, tmp_root=clean_dirs)
    assert "peak" in seen, "the bomb never finished forking"
    assert not result.passed and result.timed_out
    assert 0 < seen["peak"] <= MAX_PROCESSES
    assert marked(name) == marked(done) == []  # all gone, not just signalled
    assert time.monotonic() - seen["at"] < 60  # killed, not waited for: each sleeps an hour


@needs("pid-ns")
def test_setsid_child_does_not_survive(clean_dirs, tmp_path):
    name = "stray" + secrets.token_hex(4)
    escaped = tmp_path / "escaped"
    body = (
        "import ctypes, os, time\n\n"
        "def add(a, b):\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        f"        {name_self(name)}\n"
        "        time.sleep(2.5)\n"
        f"        open({str(escaped)!r}, 'w').write('still here')\n"
        "        os._exit(0)\n"
        "    time.sleep(30)\n"
    )
    start = time.monotonic()
    result = run_python_tests(body, TESTS, timeout=1.5, tmp_root=clean_dirs)
    assert not result.passed and result.timed_out
    assert marked(name) == []
    time.sleep(max(0.0, start + 3.5 - time.monotonic()))  # past the stray's wake-up
    assert marked(name) == [] and not escaped.exists()


# ------------------------------------------------------------------------------ settings
def test_strict_refuses_missing_layers_and_best_effort_says_once(monkeypatch, capsys):
    weak = Isolation("none", frozenset({"verdict", "limits"}), "bwrap not found")
    monkeypatch.setattr(sandbox, "isolation", lambda: weak)
    monkeypatch.setattr(sandbox, "_warned", set())
    with pytest.raises(MemgenError, match="lacks: process-cap, user-ns.*bubblewrap"):
        KodCodeTask(sandbox="strict")
    KodCodeTask()
    KodCodeTask(sandbox="best-effort")
    assert capsys.readouterr().err.count("lacks: process-cap") == 1
    with pytest.raises(MemgenError, match="best-effort, strict"):
        KodCodeTask(sandbox="loose")


@needs(*sandbox.LAYERS)
def test_strict_accepts_a_full_sandbox():
    assert KodCodeTask(sandbox="strict").grade(completion(RIGHT), EXAMPLE) == 1.0


def test_extract_code_takes_last_python_block():
    text = "```python\nx = 1\n```\nthen\n```\nplain\n```\n```python\nx = 2\n```"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("```python\nunclosed") is None
