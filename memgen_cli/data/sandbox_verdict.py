"""The verdict on a sandboxed run, from the harness's report stream and the test file.

The harness (``sandbox_harness.py``) writes one line per event, ``token<TAB>repr(event)``:
``("collected", nodeids)``, ``("report", nodeid, when, outcome)`` for each of setup, call
and teardown, ``("tampered", what)``, ``("error", what)`` and last ``("finished", status)``.
:func:`verdict` passes a run only if every line carries the run's token; the stream is
whole and ends; nothing was tampered with and nothing errored; every collected test
reported setup, call and teardown passed, and no other report came; every collected test
is one the test file defines; and as many were collected as :func:`expected_tests` reads
from the test file (at least as many where parametrize, fixture ``params`` or inheritance
make the number unknowable). The exit status plays no part.
"""

from __future__ import annotations

import ast
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class Expected:
    """What the test file holds, read here: test ids (``name`` or ``Class::name``), how
    many tests, and whether that is exact (False: parametrize etc. can add more)."""

    names: frozenset[str]
    count: int
    exact: bool


def expected_tests(source: str) -> Expected:
    """The tests pytest will collect from ``source``, as far as its AST says."""
    tree = ast.parse(source)
    tests: set[str] = set()  # a later definition of a name replaces an earlier one
    open_classes: set[str] = set()  # classes whose test methods may be inherited
    exact = True
    for node in tree.body:
        if _is_test_function(node):
            tests.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            tests |= {f"{node.name}::{m.name}" for m in node.body if _is_test_function(m)}
            if node.bases:
                open_classes.add(node.name)
        elif isinstance(node, ast.ClassDef) and node.bases:
            open_classes.add(node.name)  # a unittest.TestCase pytest collects, whatever its name
    if open_classes or any(_multiplies(node) for node in ast.walk(tree)):
        exact = False
    names = frozenset(tests | {f"{c}::*" for c in open_classes})
    return Expected(names, len(tests), exact)


def verdict(stream: bytes, token: str, expected: Expected) -> tuple[bool, str]:
    """(passed, why not) for the harness's report ``stream``; see the module docstring."""
    try:
        return _judge(parse_events(stream, token), expected)
    except (ValueError, TypeError, IndexError) as e:  # forged, cut off or malformed
        return False, str(e) or "malformed report"


def _judge(events: list[tuple], expected: Expected) -> tuple[bool, str]:
    kinds = [e[0] for e in events]
    if not events or kinds.count("collected") != 1 or kinds[-1] != "finished":
        return False, "no complete report (the child died or exited early)"
    for kind in ("tampered", "error"):
        if kind in kinds:
            return False, f"{kind}: {events[kinds.index(kind)][1:]}"
    (collected,) = events[kinds.index("collected")][1:]
    reports = sorted(e[1:] for e in events if e[0] == "report")
    want = sorted((n, when, "passed") for n in collected for when in ("setup", "call", "teardown"))
    if len(set(collected)) != len(collected) or reports != want:
        return False, "not every collected test passed"
    unknown = [n for n in collected if not _known(n, expected.names)]
    if unknown:
        return False, f"tests not in the test file: {unknown[:3]}"
    if len(collected) < expected.count or (expected.exact and len(collected) != expected.count):
        return False, f"{len(collected)} tests ran; the test file has {expected.count}"
    return True, ""


def parse_events(stream: bytes, token: str) -> list[tuple]:
    """The harness's events, each ``(kind, *fields)``; ValueError if any line is forged,
    malformed or cut off."""
    if stream and not stream.endswith(b"\n"):
        raise ValueError("report cut off")
    events = []
    for line in stream.splitlines():
        prefix, _, body = line.partition(b"\t")
        if not secrets.compare_digest(prefix, token.encode()):
            raise ValueError("report line without the token")
        try:
            event = ast.literal_eval(body.decode())
        except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError):
            raise ValueError("malformed report line") from None
        if not isinstance(event, tuple) or not event or not isinstance(event[0], str):
            raise ValueError("malformed report line")
        events.append(event)
    return events


def _is_test_function(node) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith(
        "test"
    )


def _multiplies(node) -> bool:
    """Can turn one test definition into several: parametrize (as a decorator or a
    ``pytestmark``), ``pytest_generate_tests``, or a fixture with ``params``."""
    if isinstance(node, ast.Call) and any(k.arg == "params" for k in node.keywords):
        return True
    name = getattr(node, "attr", None) or getattr(node, "id", None) or getattr(node, "name", None)
    return name in {"parametrize", "pytestmark", "pytest_generate_tests"}


def _known(nodeid: str, names: frozenset[str]) -> bool:
    file, _, rest = nodeid.partition("::")
    test = rest.split("[", 1)[0]
    cls = test.rpartition("::")[0]
    return file == "test_solution.py" and (test in names or f"{cls}::*" in names)
