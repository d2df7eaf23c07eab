"""The one rich ``Console`` factory of the CLI: tables read whole in a terminal and in a log.

Where the output is not a terminal (``make demo > demo.log``, a pipe, a CI job, ``CliRunner``)
rich lays tables out in ``$COLUMNS`` or 80 columns and cuts cells to fit: the eval table then
read ``gym:bas…``, ``+25.0±…``, ``p=1.6e…``. Every console that prints tables comes from here.
"""

from __future__ import annotations

from rich.console import Console

LOG_WIDTH = 1000
"""Width when not a terminal. A table takes only the width its cells need (none here expands),
so nothing is padded; no figure or name is cut or wrapped."""


def make_console(stderr: bool = False, **kwargs) -> Console:
    """A ``Console`` on stdout (or stderr); a terminal keeps its own width, anything else gets
    ``LOG_WIDTH``. ``kwargs`` go to ``Console`` (``quiet``, ``file``, ...)."""
    console = Console(stderr=stderr, **kwargs)
    if not console.is_terminal:
        console.width = LOG_WIDTH
    return console
