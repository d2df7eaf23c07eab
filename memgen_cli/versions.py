"""The versions of Python and of the libraries that shape a result, as artifacts record them.

Every saved artifact's manifest and every ``metrics.json`` of ``memgen eval`` carry
``versions``: the same recipe gave a held-out loss of 0.199 in one ``.venv`` and 0.149 in
another, so a number without the versions that made it cannot be compared. ``make setup``
installs the versions pinned in ``requirements/lock.txt``; ``tests/test_lock.py`` checks
that the running environment still matches them.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from memgen_cli import __version__

# Manifest key -> distribution name: the libraries whose version can move a trained result.
PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "peft": "peft",
    "trl": "trl",
    "accelerate": "accelerate",
    "datasets": "datasets",
    "reasoning_gym": "reasoning-gym",
    "safetensors": "safetensors",
}


def environment_versions() -> dict[str, str | None]:
    """Python, the libraries of ``PACKAGES`` (None where one is not installed) and memgen.

    >>> sorted(environment_versions())  # doctest: +NORMALIZE_WHITESPACE
    ['accelerate', 'datasets', 'memgen', 'peft', 'python', 'reasoning_gym', 'safetensors',
     'torch', 'transformers', 'trl']
    """
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in PACKAGES.items():
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    out["memgen"] = __version__
    return out


def version_differences(recorded: dict | None) -> list[str]:
    """``name recorded -> now`` for each recorded version that differs from this environment
    (an artifact from before versions were recorded has none to compare).

    >>> version_differences({"python": "0.0.1", "memgen": None})[0].startswith("python 0.0.1 -> ")
    True
    """
    now = environment_versions()
    return [
        f"{key} {was} -> {now.get(key)}"
        for key, was in (recorded or {}).items()
        if was is not None and now.get(key) != was
    ]
