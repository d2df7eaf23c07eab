"""`memgen sft-weaver` (not built yet: it says so and exits 2)."""

from __future__ import annotations

from memgen_cli.commands.options import not_available


def command() -> None:
    """Not available yet in this version."""
    not_available("sft-weaver")
