"""The import graph runs one way: no module of memgen_cli imports from a layer above its own;
and no module passes 500 lines.

Layers, lowest first; a module may import from its own layer and the layers below it:

    0  the package itself (``__version__``), errors, versions, console, atomic, config,
       recipe, distributed: no memgen imports above this line
    1  models, data: the composition and the tasks
    2  generation, rendering, outputs, artifacts, retrieval: running a model, showing what it
       wrote, writing files and reading them back (retrieval: the experience store)
    3  training, inspection, evaluation: the library code of the stages
    4  stages: one module per command, ``run(opts)``
    5  commands: the Typer layer, options in, a stage called
    6  cli, __main__: the registry of commands

Every import counts: module-level, lazy ones inside functions, and ``TYPE_CHECKING`` ones (a
type named from above is a dependency on it all the same). A module of a new top-level name
fails until it is given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "memgen_cli"
LAYERS = {
    "": 0,  # memgen_cli/__init__.py
    "errors": 0,
    "versions": 0,
    "console": 0,
    "atomic": 0,
    "config": 0,
    "recipe": 0,
    "distributed": 0,
    "models": 1,
    "data": 1,
    "generation": 2,
    "rendering": 2,
    "outputs": 2,
    "artifacts": 2,
    "retrieval": 2,
    "training": 3,
    "inspection": 3,
    "evaluation": 3,
    "stages": 4,
    "commands": 5,
    "cli": 6,
    "__main__": 6,
}


def module_name(path: Path) -> str:
    """``memgen_cli/stages/evaluate.py`` -> ``memgen_cli.stages.evaluate``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether a dotted memgen_cli name is a module or package (not a name inside one)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer(name: str) -> int:
    top = name.split(".")[1] if "." in name else ""
    if top not in LAYERS:
        raise AssertionError(f"{name} has no layer: give memgen_cli.{top} one in LAYERS")
    return LAYERS[top]


def imports(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, memgen_cli module) for every import in ``source``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one more level per dot
                package = module.split(".")[: None if is_package else -1]
                package = package[: len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            for alias in node.names:  # `from memgen_cli import distributed` names a module
                full = f"{base}.{alias.name}"
                found.append((node.lineno, full if is_module(full) else base))
    return [(line, name) for line, name in found if name.split(".")[0] == "memgen_cli"]


def upward(path: Path, source: str) -> list[str]:
    """Each import of ``source`` (the module at ``path``) from a layer above its own."""
    module = module_name(path)
    own = layer(module)
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line} (layer {own}) imports {name} "
        f"(layer {layer(name)})"
        for line, name in imports(source, module, path.name == "__init__.py")
        if layer(name) > own
    ]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_all_here():
    names = {module_name(p) for p in MODULES}
    assert {"memgen_cli.cli", "memgen_cli.stages.evaluate", "memgen_cli.training.grpo"} <= names
    for name in names:
        layer(name)  # every top-level name has a layer


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_runs_up_a_layer(path):
    offending = upward(path, path.read_text(encoding="utf-8"))
    assert not offending, "imports from a higher layer:\n" + "\n".join(offending)


def test_the_check_sees_lazy_relative_and_package_imports():
    """The check itself: an import inside a function, a relative one and a module named in
    ``from memgen_cli import x`` are all caught; names from the package itself are not."""
    source = (
        "from memgen_cli import __version__, errors\n"
        "from ..stages import common\n"
        "def log():\n"
        "    from memgen_cli.stages.common import Session\n"
        "    import memgen_cli.commands.evaluate\n"
    )
    found = upward(PACKAGE / "training" / "grpo.py", source)
    assert found == [
        "memgen_cli/training/grpo.py:2 (layer 3) imports memgen_cli.stages.common (layer 4)",
        "memgen_cli/training/grpo.py:4 (layer 3) imports memgen_cli.stages.common (layer 4)",
        "memgen_cli/training/grpo.py:5 (layer 3) imports memgen_cli.commands.evaluate (layer 5)",
    ]


MAX_LINES = 500  # issue 27: a module past this has more than one job; split it by job


def test_no_module_passes_500_lines():
    long = {
        module_name(p): n for p in MODULES if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"
