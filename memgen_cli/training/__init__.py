"""Training, in one place: what every training stage shares.

- ``sft_data``: SFT samples as tensors (chat prompt + target, loss mask, insertion schedule),
  the collator, and the held-out loss;
- ``trainer_parts``: the pieces that put a MemGen objective on transformers' ``Trainer``
  (objective wrapper, progress line, metrics log, Ctrl-C checkpoint, epoch hook).

The stages in ``memgen_cli/stages`` compose these; they never import each other.
"""
