"""``python -m memgen_cli`` (also what ``torchrun -m memgen_cli`` runs)."""

from memgen_cli.cli import main

main()
