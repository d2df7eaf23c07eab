"""One thin Typer command per stage; registered in ``memgen_cli/cli.py``."""
