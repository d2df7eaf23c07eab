"""Option types shared by several commands (one definition each), ``options_of``: a command
that takes another's options, and ``train``: how a training command runs its stage."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from memgen_cli.console import make_console
from memgen_cli.errors import MemgenError
from memgen_cli.evaluation.plan import parse_task_options
from memgen_cli.stages.frame import TrainingInterrupted


def option(kind, name: str, help: str):
    """An option with no default under ``name``, of type ``kind`` (a command's own wording of
    a shared flag: ``option(Path, "--recipe", "Recipe YAML (an SFTConfig).")``)."""
    return Annotated[kind | None, typer.Option(name, help=help)]


def options_of(template):
    """Decorator: the command takes ``template``'s options, in ``template``'s order, besides its
    own, and receives them in its ``**options``. An own option of the same name replaces the
    template's where it stands (a rewording: ``baseline grpo`` takes grpo-weaver's options); a
    new one goes right after the own option before it, or first. Typer reads the merged
    ``__signature__``, so ``--help`` lists them all."""

    def merge(command):
        params = list(inspect.signature(template, eval_str=True).parameters.values())
        at = 0
        for param in inspect.signature(command, eval_str=True).parameters.values():
            if param.kind is param.VAR_KEYWORD:
                continue
            names = [p.name for p in params]
            if param.name in names:
                at = names.index(param.name)
                params[at] = param
            else:
                params.insert(at, param)
            at += 1
        command.__signature__ = inspect.Signature(params, return_annotation=None)
        return command

    return merge


Base = option(
    str,
    "--base",
    "Reasoner: a hub id, a local model directory, or the embedded alias smollm2-135m "
    "(default; with --artifact, the base recorded in the artifact).",
)
Artifact = option(Path, "--artifact", "A memgen artifact directory (trained weaver/trigger).")
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:i].")]
Dtype = Annotated[
    str, typer.Option("--dtype", help="auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA).")
]
AllowMismatch = Annotated[
    bool,
    typer.Option(
        "--allow-base-mismatch", help="Load an artifact onto a base whose fingerprint differs."
    ),
]
Memory = Annotated[
    str, typer.Option("--memory", help="off | weaver | full (full: the trained trigger decides).")
]
MaxNewTokens = Annotated[
    int, typer.Option("--max-new-tokens", min=1, help="Most tokens per answer.")
]
Temperature = Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy.")]
TopP = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed.")]
PromptSuffix = option(
    str,
    "--prompt-suffix",
    "Answer-format instruction appended to each question "
    '(default: the one recorded in the artifact; "" for none).',
)
TaskOption = option(
    list[str],
    "--task-option",
    "A task option KEY=VALUE (repeatable), as `memgen eval` takes it, e.g. level=105: it "
    "replaces that key of the options the artifact recorded for this task; the others stay.",
)
Json = Annotated[bool, typer.Option("--json", help="Print one machine-readable JSON object.")]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an existing --output (and inspect-memory's --html), atomically, when "
        "memgen wrote it: an artifact, or this command's own earlier output. Without it an "
        "existing output is refused; a path holding anything else is refused even with it.",
    ),
]


def running(
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_base_mismatch: AllowMismatch = False,
    overwrite: Overwrite = False,
) -> None:
    """The options eval, generate and inspect-memory end with (``@options_of(running)``): where
    the model runs, whether an artifact may go onto another base, and whether an earlier
    output may be replaced. A template: never called."""


# Training stages
Set = option(list[str], "--set", "Override a recipe key: a.b=value (repeatable).")
SFTData = option(  # sft-weaver, baseline sft, baseline retrieval: the same training samples
    str,
    "--data",
    "gsm_symbolic (default, offline), gsm8k (hub), gym:<name> (any reasoning_gym task; "
    "tasks without worked solutions train on bare answers), or a .jsonl file: GSM8K format "
    "(question, answer ending in '#### N'), or any columns with --columns.",
)
GRPOData = option(  # grpo-weaver, baseline grpo
    str,
    "--data",
    "gsm_symbolic (default, offline), gsm8k (hub), gym:<name> (any reasoning_gym task), "
    "math, kodcode (rewarded by running its tests in the sandbox), or a GSM8K-format .jsonl "
    "file.",
)
Output = option(Path, "--output", "Artifact directory.")
Resume = option(
    str, "--resume", "auto (latest checkpoint of this output, if any) or a checkpoint folder."
)
ReportTo = option(str, "--report-to", "none | tensorboard | wandb.")
Columns = option(str, "--columns", "Columns of a generic .jsonl: prompt=…,solution=…,answer=…")
Reward = option(
    list[str],
    "--reward",
    "Extra reward module:function with TRL's signature f(prompts, completions, **columns) "
    "(repeatable; the task's grader always counts unless reward.task_weight=0).",
)
RewardWeight = option(
    list[float], "--reward-weight", "Weight of each --reward, in order (default 1)."
)


def train(
    stage,
    recipe: Path | None,
    set_: list[str] | None,
    resume: str | None,
    overwrite: bool,
    columns: str | None = None,
    task_option: list[str] | None = None,
    reward: list[str] | None = None,
    reward_weight: list[float] | None = None,
    **flags,
) -> None:
    """Run a training ``stage`` module from its command's options (``train(stage,
    **locals())``): its config is the recipe, then ``--set``, then the flags
    (``stage.resolve_config``). Ctrl-C leaves a checkpoint and exits 130."""
    cfg = stage.resolve_config(
        recipe,
        set_,
        columns=parse_columns(columns),
        task_options=parse_task_options(task_option or []),
        rewards=reward,
        reward_weights=reward_weight,
        **flags,
    )
    try:
        stage.run(cfg, resume=resume, console=make_console(), overwrite=overwrite)
    except TrainingInterrupted as stop:
        Console(stderr=True).print(
            f"interrupted: checkpoint saved in {stop.checkpoint}; continue with --resume auto"
        )
        raise typer.Exit(130) from None


def parse_columns(spec: str | None) -> dict[str, str] | None:
    """``--columns prompt=question,answer=label`` as a dict."""
    if spec is None:
        return None
    pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
    if not pairs or any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise MemgenError(
            f'--columns expects role=column pairs, e.g. prompt=question,answer=label; got "{spec}".'
        )
    return {role.strip(): col.strip() for role, col in pairs}
