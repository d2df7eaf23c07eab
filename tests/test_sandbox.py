"""The code sandbox: right and wrong programs, loops, memory hogs, network, leftovers."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest

from memgen_cli.data.base import Example
from memgen_cli.data.kodcode import KodCodeTask, extract_code
from memgen_cli.data.sandbox import run_python_tests

TESTS = "from solution import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
EXAMPLE = Example(id="k/0", question="Write add(a, b).", answer=TESTS)


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


def test_correct_program_passes(clean_dirs):
    body = "def add(a, b):\n    open('scratch.txt', 'w').write('x')\n    return a + b"
    assert grade(body, clean_dirs) == 1.0


def test_wrong_program_fails(clean_dirs):
    assert grade("def add(a, b):\n    return a - b", clean_dirs) == 0.0


def test_no_code_block_scores_zero():
    assert KodCodeTask().grade("def add(a, b): return a + b", EXAMPLE) == 0.0


def test_crashing_program_fails(clean_dirs):
    body = "import ctypes\n\ndef add(a, b):\n    return ctypes.string_at(0)"  # segfault
    assert grade(body, clean_dirs) == 0.0


def test_infinite_loop_is_killed_within_timeout(clean_dirs):
    start = time.monotonic()
    result = run_python_tests("while True:\n    pass\n", TESTS, timeout=2, tmp_root=clean_dirs)
    assert not result.passed and result.timed_out
    assert time.monotonic() - start < 6


def test_memory_hog_fails(clean_dirs):
    body = "def add(a, b):\n    hog = []\n    while True:\n        hog.append(bytearray(10**7))"
    result = run_python_tests(body, TESTS, memory_mb=300, timeout=10, tmp_root=clean_dirs)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.output


def test_file_bomb_fails(clean_dirs):
    body = "def add(a, b):\n    with open('big', 'wb') as f:\n        while True:\n            f.write(b'x' * 2**20)"
    assert grade(body, clean_dirs) == 0.0


def test_background_processes_are_killed(clean_dirs):
    body = (
        "import subprocess\n\n"
        "def add(a, b):\n"
        "    p = subprocess.Popen(['sleep', '60'])\n"
        "    print('PID', p.pid, flush=True)\n"
        "    return a + b\n"
    )
    tests = TESTS.replace("== 5\n", "== 5\n    assert False, 'show output'\n")
    result = run_python_tests(body, tests, tmp_root=clean_dirs)
    pid = re.search(r"PID (\d+)", result.output).group(1)
    status = Path(f"/proc/{pid}/status")
    time.sleep(0.2)
    # Gone, or a zombie waiting for a parent that does not reap: not running either way.
    assert not status.exists() or "State:\tZ" in status.read_text()


@pytest.mark.parametrize("isolate_network", [True, False], ids=["netns+audit", "audit-only"])
def test_network_is_blocked(clean_dirs, isolate_network):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    programs = [
        f"import socket\n\ndef add(a, b):\n    socket.create_connection(('127.0.0.1', {port}), 2)\n    return a + b",
        f"import _socket\n\ndef add(a, b):\n    s = _socket.socket()\n    s.connect(('127.0.0.1', {port}))\n    return a + b",
        # A fresh interpreter has no audit hook: only the namespace (or the ban on
        # starting processes when there is none) stops it.
        "import subprocess, sys\n\ndef add(a, b):\n    subprocess.run([sys.executable, '-c', "
        f"'import socket; socket.create_connection((\\'127.0.0.1\\', {port}), 2)'], check=True)\n"
        "    return a + b",
    ]
    try:
        for body in programs:
            result = run_python_tests(
                body, TESTS, isolate_network=isolate_network, tmp_root=clean_dirs
            )
            assert not result.passed, result.output
            blocked = ("Network is unreachable", "disabled in the sandbox")
            assert any(reason in result.output for reason in blocked), result.output
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected
    finally:
        server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace needs root here")
def test_child_runs_in_its_own_network_namespace(clean_dirs):
    ours = os.readlink("/proc/self/ns/net")
    tests = (
        f"import os\n\ndef test_ns():\n    assert os.readlink('/proc/self/ns/net') != {ours!r}\n"
    )
    assert run_python_tests("", tests, tmp_root=clean_dirs).passed


def test_extract_code_takes_last_python_block():
    text = "```python\nx = 1\n```\nthen\n```\nplain\n```\n```python\nx = 2\n```"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("```python\nunclosed") is None
