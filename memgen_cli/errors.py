"""One error type for every mistake a user can make.

Library code raises :class:`MemgenError` with a message that says what is wrong and how to
fix it; the CLI prints the message (no traceback) and exits with code 2.
"""

from __future__ import annotations

import difflib


class MemgenError(Exception):
    """A user-facing error: bad input, a missing file, an incompatible artifact."""


def did_you_mean(name: str, choices) -> str:
    """Return ' Did you mean "x"?' for the closest choice, or ''.

    >>> did_you_mean("lerning_rate", ["learning_rate", "epochs"])
    ' Did you mean "learning_rate"?'
    """
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f' Did you mean "{close[0]}"?' if close else ""


def require(checks, prefix: str = "") -> None:
    """Raise the first failed check as a MemgenError: ``checks`` are (ok, message) pairs, each
    message without its final period, ``prefix`` (a section, ``"memory."``) before it:
    ``require([(t.beta >= 0, "training.beta must be >= 0")])``."""
    for ok, message in checks:
        if not ok:
            raise MemgenError(f"{prefix}{message}.")


def require_choice(name: str, value, choices) -> None:
    """``value`` must be one of ``choices``; else a MemgenError that names ``name`` and them."""
    if value not in choices:
        raise MemgenError(f'{name} must be one of {", ".join(choices)}; got "{value}".')
