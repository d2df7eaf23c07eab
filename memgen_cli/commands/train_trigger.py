"""`memgen train-trigger`: learn when to weave (RL on the trigger, weaver frozen)."""

from __future__ import annotations

from pathlib import Path

from memgen_cli.commands import options as o
from memgen_cli.stages import train_trigger as stage

Artifact = o.option(Path, "--artifact", "The weaver artifact whose trigger to train (required).")
Recipe = o.option(Path, "--recipe", "Recipe YAML (a TriggerConfig).")
Data = o.option(str, "--data", "A task (gsm_symbolic, gsm8k, gym:<name>, ...) or a .jsonl.")
TaskOption = o.option(list[str], "--task-option", "A task option KEY=VALUE (repeatable).")
Reward = o.option(list[str], "--reward", "Extra reward module:function (repeatable).")


def command(
    artifact: Artifact = None,
    recipe: Recipe = None,
    set_: o.Set = None,
    base: o.Base = None,
    data: Data = None,
    task_option: TaskOption = None,
    reward: Reward = None,
    output: o.Output = None,
    resume: o.Resume = None,
    overwrite: o.Overwrite = False,
) -> None:
    """Train the memory trigger by RL: G rollouts per prompt with sampled INVOKE/SKIP decisions,
    rewarded by the task's grader minus the sparsity penalty (paper Eq. 9); the weaver is
    frozen and the new artifact records it as its parent."""
    o.train(stage, **locals())
