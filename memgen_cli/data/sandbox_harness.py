"""The child side of :mod:`memgen_cli.data.sandbox`: run pytest and stream each outcome out.

Run only as a script inside the sandbox (``python -I -B sandbox_harness.py test_file``),
never imported; it imports nothing from memgen. In order:

1. ``MEMGEN_SANDBOX_FDS`` names three inherited descriptors: a pipe holding a random token,
   the write end of the report pipe, and a pipe holding a seccomp program (or -1). The
   token is read and its descriptor closed, and the variable deleted, before pytest starts:
   the solution never sees the token in a file, the environment or a descriptor.
2. When a seccomp program is given (no bubblewrap to install it), it is installed here.
3. pytest runs with the plugin from :func:`_make_plugin`, registered through
   ``pytest.main(plugins=...)`` like ``-p`` but under no importable name, before
   collection, i.e. before the solution is imported (the test file imports it). Each line the plugin writes to the
   report pipe is ``token<TAB>repr(event)``; the parent trusts only lines with its token.
4. Before collection the plugin fingerprints what decides outcomes (the module and class
   dictionaries of pytest's runner, reports, python, skipping, ..., of pluggy and of
   ``builtins``; every registered plugin and hook implementation; tracing hooks; after
   collection, each test's function) and re-checks it before and after every test: a
   replaced function or code object, or an added plugin or hook, is reported as tampering,
   which fails the run. The plugin's own logic lives in closures that bind the builtins it
   uses, so editing this module's globals or ``builtins`` does not disarm it.

Events are serialised with the builtin ``repr`` and written with ``os.write``, both taken
at start: builtins cannot be monkeypatched in place, so a patched ``json`` or ``io`` does
not change what the parent reads.

``--probe CANARY`` instead of a test file reports what isolation the child sees (its
namespaces; whether it can see the host path CANARY, open an AF_UNIX socket, or write into
``sys.prefix``), for :func:`memgen_cli.data.sandbox.isolation`.
"""

import ctypes
import os
import sys
import types

# What pytest and pluggy consult, at call time, to decide and dispatch an outcome.
_WATCHED = (
    "_pytest.runner",
    "_pytest.python",
    "_pytest.reports",
    "_pytest.main",
    "_pytest.skipping",
    "_pytest.unittest",
    "_pytest.outcomes",
    "_pytest.nodes",
    "_pytest.fixtures",
    "pluggy._callers",
    "pluggy._hooks",
    "pluggy._manager",
    "pluggy._result",
    "builtins",
)
# Class attributes pytest itself sets during a run.
_MUTABLE_CLASS_ATTRS = frozenset({"_pytest_diamond_inheritance_warning_shown"})


def main() -> None:
    token_fd, report_fd, seccomp_fd = map(int, os.environ.pop("MEMGEN_SANDBOX_FDS").split(","))
    token = _read_all(token_fd).decode()
    if seccomp_fd >= 0:
        _install_seccomp(_read_all(seccomp_fd))
    emit = _emitter(token, report_fd)
    del token
    if sys.argv[1] == "--probe":
        emit("probe", _probe(sys.argv[2]))
        os._exit(0)
    import pytest

    exit_now, stdout, stderr = os._exit, sys.stdout, sys.stderr  # the solution may clear globals
    args = ["-q", "-p", "no:cacheprovider", "--no-header", "-c", "pytest.ini", sys.argv[1]]
    try:
        pytest.main(args, plugins=[_make_plugin(emit, os.path.abspath(sys.argv[1]))])
    finally:
        stdout.flush()
        stderr.flush()
        exit_now(0)  # the exit status means nothing to the parent; skip atexit handlers


def _probe(canary: str) -> dict:
    """What the isolation looks like from inside, for the parent to compare."""
    import socket

    def namespace(kind: str) -> str | None:
        try:
            return os.readlink(f"/proc/self/ns/{kind}")
        except OSError:
            return None

    try:
        socket.socket(socket.AF_UNIX).close()
        unix_blocked = False
    except OSError:
        unix_blocked = True
    seen = {kind: namespace(kind) for kind in ("user", "net", "pid")}
    return {
        **seen,
        "unix_blocked": unix_blocked,
        "sees_canary": os.path.exists(canary),
        "prefix_writable": os.access(sys.prefix, os.W_OK),  # EROFS on a read-only bind
    }


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _emitter(token: str, fd: int):
    write, to_text = os.write, repr  # builtins, bound now

    def emit(*event) -> None:
        data = (token + "\t" + to_text(event) + "\n").encode()
        while data:
            data = data[write(fd, data) :]

    return emit


def _install_seccomp(program: bytes) -> None:
    """prctl(PR_SET_NO_NEW_PRIVS), then prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)."""

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buffer))
    zero = ctypes.c_ulong(0)
    if libc.prctl(38, ctypes.c_ulong(1), zero, zero, zero) != 0 or (
        libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(fprog), zero, zero) != 0
    ):
        raise SystemExit(f"sandbox: cannot install seccomp filter (errno {ctypes.get_errno()})")


def _make_plugin(emit, test_file: str):
    """The pytest plugin. Everything it runs is bound here, in closures: clearing or
    replacing this module's globals, or names in ``builtins``, does not change it."""
    _isinstance, _getattr, _vars, _len, _sorted, _repr, _tuple = (
        isinstance,
        getattr,
        vars,
        len,
        sorted,
        repr,
        tuple,
    )
    _property, _range, _id, _int = property, range, id, int
    _function, _type, _modules = types.FunctionType, type, sys.modules
    _gettrace, _getprofile = sys.gettrace, sys.getprofile
    _method_kinds = (classmethod, staticmethod)
    watched, mutable = _WATCHED, _MUTABLE_CLASS_ATTRS

    def code(obj):
        return obj.__code__ if _isinstance(obj, _function) else None

    def entry(value) -> tuple:
        """The objects whose identity must not change: the value, and the code it runs."""
        if _isinstance(value, _method_kinds):
            return (value, value.__func__, code(value.__func__))
        if _isinstance(value, _property):
            return (value, code(value.fget), code(value.fset), code(value.fdel))
        return (value, code(value))

    def unwrap(func):
        for _ in _range(100):  # functools.wraps chains (mock.patch, custom decorators)
            wrapped = _getattr(func, "__wrapped__", None)
            if wrapped is None:
                break
            func = wrapped
        return func

    def fingerprint(session, items) -> dict:
        prints = {}
        for name in watched:
            module = _modules.get(name)
            for key, value in _vars(module).items() if module else ():
                prints[name, key] = entry(value)
                if _isinstance(value, _type) and value.__module__ == name:
                    for attr, member in _vars(value).items():
                        if attr not in mutable:
                            prints[name, key, attr] = entry(member)
        pm = session.config.pluginmanager
        prints["pm"] = (pm.hook, pm._inner_hookexec, *_sorted(pm.get_plugins(), key=_id))
        for hook, caller in _vars(pm.hook).items():
            impls = caller.get_hookimpls()
            prints["hook", hook] = (
                caller,
                *[
                    x
                    for i in impls
                    for x in (i, i.function, code(_getattr(i.function, "__func__", None)))
                ],
            )
        prints["trace"] = (_gettrace(), _getprofile())
        threading = _modules.get("threading")
        if threading is not None:
            prints["thread-trace"] = (threading._trace_hook, threading._profile_hook)
        for item in items:
            func = _getattr(item.obj, "__func__", item.obj)
            prints["item", item.nodeid] = (func, code(func), _vars(item).get("runtest"))
        return prints

    def same(a: tuple | None, b: tuple | None) -> bool:
        if a is None or b is None or _len(a) != _len(b):
            return False
        for i in _range(_len(a)):
            if a[i] is not b[i]:
                return False
        return True

    state = {"baseline": {}, "items": [], "session": None}

    def check() -> None:
        now = fingerprint(state["session"], state["items"])
        baseline = state["baseline"]
        changed = [k for k in now.keys() | baseline.keys() if not same(now.get(k), baseline.get(k))]
        if changed:
            emit("tampered", _tuple(_sorted(_repr(k) for k in changed)[:8]))

    class Verdict:
        """Per-test outcomes to the report pipe, and tamper checks before and after each."""

        def pytest_collection(self, session) -> None:
            state["session"] = session
            state["baseline"] = fingerprint(session, [])

        def pytest_collectreport(self, report) -> None:
            if report.failed:
                emit("error", "collection: " + report.nodeid)

        def pytest_collection_finish(self, session) -> None:
            check()
            items = state["items"] = _tuple(session.items)
            for item in items:
                func = unwrap(_getattr(item.obj, "__func__", item.obj))
                if _getattr(code(func), "co_filename", None) != test_file:
                    emit("tampered", "test function not from the test file: " + item.nodeid)
            state["baseline"] = fingerprint(session, items)
            emit("collected", _tuple(item.nodeid for item in items))

        def pytest_runtest_logstart(self, nodeid, location) -> None:
            check()

        def pytest_runtest_logreport(self, report) -> None:
            check()
            emit("report", report.nodeid, report.when, report.outcome)

        def pytest_internalerror(self, excrepr, excinfo) -> None:
            emit("error", "pytest internal error")

        def pytest_sessionfinish(self, session, exitstatus) -> None:
            check()
            emit("finished", _int(exitstatus))

    return Verdict()


if __name__ == "__main__":
    main()
