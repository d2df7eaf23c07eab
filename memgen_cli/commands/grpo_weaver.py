"""`memgen grpo-weaver`: train the memory weaver with GRPO on verifiable rewards."""

from __future__ import annotations

from pathlib import Path

from memgen_cli.commands import options as o
from memgen_cli.stages import grpo_weaver as stage

Recipe = o.option(Path, "--recipe", "Recipe YAML (a GRPOConfig).")
TaskOption = o.option(
    list[str],
    "--task-option",
    "A task option KEY=VALUE (repeatable), as `memgen eval` takes it, e.g. "
    "'config={min_terms: 2, max_terms: 3}' for a reasoning_gym difficulty or path=FILE "
    "for a local copy; recorded in the artifact so that eval draws the same problems.",
)
Init = o.option(Path, "--init", "Start from this artifact (e.g. an SFT weaver); its parent.")


def command(
    recipe: Recipe = None,
    set_: o.Set = None,
    base: o.Base = None,
    data: o.GRPOData = None,
    task_option: TaskOption = None,
    init: Init = None,
    reward: o.Reward = None,
    reward_weight: o.RewardWeight = None,
    output: o.Output = None,
    resume: o.Resume = None,
    report_to: o.ReportTo = None,
    overwrite: o.Overwrite = False,
) -> None:
    """Train the weaver by GRPO: G sampled answers per prompt with latents woven, rewarded by
    the task's grader; only the weaver learns."""
    o.train(stage, **locals())
