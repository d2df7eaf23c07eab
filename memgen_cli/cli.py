"""The ``memgen`` command line: one registry of stage commands, errors without tracebacks.

Each command lives in ``memgen_cli/commands/<stage>.py`` as a thin function (parse options ->
config -> ``stages.<stage>.run`` -> print). This file only registers them, so the list of
commands exists once.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from memgen_cli import __version__
from memgen_cli.commands import (
    baseline,
    evaluate,
    generate,
    grpo_weaver,
    inspect_memory,
    sft_weaver,
    train_trigger,
)
from memgen_cli.errors import MemgenError

COMMANDS = {
    "sft-weaver": sft_weaver.command,
    "grpo-weaver": grpo_weaver.command,
    "train-trigger": train_trigger.command,
    "eval": evaluate.command,
    "generate": generate.command,
    "inspect-memory": inspect_memory.command,
    "baseline": baseline.app,  # a group: memgen baseline sft
}

app = typer.Typer(
    name="memgen",
    help="Generative latent memory (MemGen) for any Hugging Face causal LM: train the weaver "
    "and trigger, evaluate against the memory-free model, chat, and inspect the memory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
err = Console(stderr=True)


def _user_errors(fn):
    """MemgenError -> one red line on stderr and exit code 2; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MemgenError as exc:
            # escape: a message quotes user input, and "[/x]" in it is not rich markup
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


for _name, _fn in COMMANDS.items():
    if isinstance(_fn, typer.Typer):  # a command group: `memgen NAME SUBCOMMAND`
        for _sub in _fn.registered_commands:
            _sub.callback = _user_errors(_sub.callback)
        app.add_typer(_fn, name=_name)
    else:
        app.command(_name)(_user_errors(_fn))


def _version(value: bool):
    if value:
        typer.echo(f"memgen {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
):
    """memgen: weave generative latent memory into a frozen reasoner."""
    quiet_libraries()


def quiet_libraries() -> None:
    """Library chatter (progress bars, deprecation notes) drowns the output users came for."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("datasets").setLevel(logging.ERROR)


def main() -> None:
    quiet_libraries()
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
