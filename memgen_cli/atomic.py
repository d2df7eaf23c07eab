"""Replace a directory or a file in one step, so that a crash or Ctrl-C leaves the old one or
the new one at the target, never neither.

Directories are swapped with Linux ``renameat2(RENAME_EXCHANGE)``: one system call puts the
new directory at the target and the old one at the new one's former path, for the caller to
remove. Where the system or filesystem cannot exchange, two renames (old aside, new in) run
with Ctrl-C held back until both are done, and the old directory is put back if the second
fails. Which paths may be replaced at all is decided by ``outputs.check_output``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import signal
import sys
import threading
from pathlib import Path

AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
RENAME_EXCHANGE = 2  # <linux/fs.h>
UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def swap_in(new: Path, target: Path) -> None:
    """Put directory ``new`` at ``target``. An old ``target`` ends at ``new``'s former path,
    where the caller removes it; on any failure ``target`` is what it was."""
    with ctrl_c_deferred():
        if not os.path.lexists(target):
            os.replace(new, target)
        elif not exchange(new, target):
            _two_renames(new, target)


def _two_renames(new: Path, target: Path) -> None:
    old = new.with_name(new.name + ".old")
    try:
        os.replace(target, old)
        os.replace(new, target)
        os.replace(old, new)  # the old one where the caller's clean-up removes it
    except BaseException:
        if os.path.lexists(old) and not os.path.lexists(target):
            os.replace(old, target)  # the second rename failed: put the old one back
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system or filesystem cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.cache
def _renameat2():
    """glibc's ``renameat2`` (2.28+), or None off Linux or on an older C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


@contextlib.contextmanager
def ctrl_c_deferred():
    """Hold a Ctrl-C (SIGINT) that arrives inside the block and deliver it once the block ends.

    A Python-level handler rather than ``pthread_sigmask``: the kernel may hand the signal to
    any thread that does not block it (torch starts several), and Python then raises in the
    main thread all the same. Off the main thread handlers cannot be set; the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        signal.raise_signal(signal.SIGINT)  # now, to whatever handler was there before


def write_file(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary sibling and a rename: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
