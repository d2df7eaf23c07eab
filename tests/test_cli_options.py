"""Shared option declarations (``commands/options.py``): a baseline takes its weaver command's
options by construction (``options_of``), and eval, generate and inspect-memory end with the
same running options."""

from __future__ import annotations

import inspect

import typer

from memgen_cli.cli import app
from memgen_cli.commands.options import options_of


def names(*path: str) -> list[str]:
    """The option names of the command at ``path``, in --help's order."""
    command = typer.main.get_command(app)
    for part in path:
        command = command.commands[part]
    return [name for p in command.params for name in p.opts if name.startswith("--")]


def test_a_baseline_takes_its_weaver_commands_options_in_their_order():
    weaver, baseline = names("sft-weaver"), names("baseline", "sft")
    assert [n for n in baseline if n != "--method"] == weaver
    assert baseline.index("--method") == weaver.index("--set") + 1  # after its own option before
    assert names("baseline", "grpo") == names("grpo-weaver")


def test_eval_generate_and_inspect_end_with_the_same_running_options():
    tail = ["--device", "--dtype", "--allow-base-mismatch", "--overwrite"]
    for path in (["eval"], ["generate"], ["inspect-memory"]):
        assert names(*path)[-len(tail) :] == tail


def test_options_of_replaces_in_place_and_inserts_after_the_own_option_before():
    def template(a: int = 1, b: int = 2, c: int = 3) -> None: ...

    @options_of(template)
    def command(b: str = "x", new: int = 0, **options) -> None: ...

    params = inspect.signature(command).parameters
    assert list(params) == ["a", "b", "new", "c"]
    assert params["b"].annotation is str and params["b"].default == "x"  # the own one, in place

    @options_of(template)
    def first(new: int = 0, **options) -> None: ...

    assert list(inspect.signature(first).parameters) == ["new", "a", "b", "c"]
