"""`memgen sft-weaver`: train the memory weaver by supervised fine-tuning."""

from __future__ import annotations

from pathlib import Path

from memgen_cli.commands import options as o
from memgen_cli.stages import sft_weaver as stage

Recipe = o.option(Path, "--recipe", "Recipe YAML (an SFTConfig).")
TaskOption = o.option(
    list[str],
    "--task-option",
    "A task option KEY=VALUE (repeatable), as `memgen eval` takes it, e.g. "
    "'config={min_terms: 2, max_terms: 3}' for a reasoning_gym difficulty; recorded in "
    "the artifact so that eval draws the same kind of problem.",
)


def command(
    recipe: Recipe = None,
    set_: o.Set = None,
    base: o.Base = None,
    data: o.SFTData = None,
    columns: o.Columns = None,
    task_option: TaskOption = None,
    output: o.Output = None,
    resume: o.Resume = None,
    report_to: o.ReportTo = None,
    overwrite: o.Overwrite = False,
) -> None:
    """Train the weaver by SFT: the frozen reasoner learns nothing; latents learn to help it."""
    o.train(stage, **locals())
