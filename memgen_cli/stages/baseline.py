"""``memgen baseline sft``: LoRA-SFT of the reasoner itself, the comparison a weaver must beat,
or prompt or prefix tuning of it (``--method``), the static arms of the deep-memory comparison.

The paper sets MemGen-SFT beside LoRA-SFT of the same model on the same data (Table 3). This
stage trains that LoRA with TRL's ``SFTTrainer``, through its public API, at the weaver's
budget: the same examples and tokenisation as ``sft-weaver`` (the chat prompt rendered as
``generate`` renders it, the solution + EOS as target, loss on the target only), the same
optimizer, steps, batches and learning-rate schedule (``training/sft_run.py`` maps one recipe
section onto both trainers), and a LoRA rank whose trainable-parameter count is closest to the
weaver's (``lora.r: null``; both counts are recorded). ``method: prompt`` / ``prefix`` trains
PEFT prompt or prefix tuning instead, with everything else the same and as many virtual tokens
as bring the count closest to the weaver's (``prompt_learning.num_virtual_tokens: null``;
``models/prompt_learning.py``). Reads top to bottom:

1. validate: the config, the resume point, the task and its data;
2. build: the base model, the samples (pre-tokenised, with TRL's ``completion_mask``), the
   adapter at the weaver's budget, TRL's ``SFTTrainer`` with our progress, metrics and Ctrl-C
   callbacks;
3. loop: ``SFTTrainer.train`` (optimizer, schedule, checkpoints, ``--resume``, torchrun);
4. save: the main process writes the baseline artifact atomically (a PEFT adapter directory
   plus ``memgen.json`` of kind ``baseline``, with its ``method``).

The training frame (config, output guard, resume, Ctrl-C, summary, artifact) is
``stages/frame.py``'s; what every baseline method adds to it (a weaver recipe read as the
baseline's, LoRA settings at the weaver's budget, the artifact's LoRA rows) is below, and
``stages/baseline_grpo.py`` (``memgen baseline grpo``, LoRA only) builds on it.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Unpack

import datasets
import torch
import trl
from peft import LoraConfig, PeftModel
from rich.table import Table

from memgen_cli.artifacts import BASELINE_NAMES, BASELINE_SECTIONS, save_baseline
from memgen_cli.config import (
    BASELINE_METHODS,
    BaselineConfig,
    BaselineLoraConfig,
    BaselinePromptLearningConfig,
    MemoryConfig,
)
from memgen_cli.data.environment import EnvironmentTask
from memgen_cli.errors import MemgenError, did_you_mean
from memgen_cli.generation import prompt_learning
from memgen_cli.models.base import LoadedBase
from memgen_cli.models.compat import cache_geometry
from memgen_cli.models.weaver import Weaver
from memgen_cli.stages import frame
from memgen_cli.stages.frame import TrainingInterrupted as TrainingInterrupted
from memgen_cli.stages.frame import checkpoint_dir as checkpoint_dir
from memgen_cli.training.episode_data import check_episode_data, episode_pairs
from memgen_cli.training.sft_data import encode_splits, tokenize_samples
from memgen_cli.training.sft_run import (
    load_examples,
    trainer_arguments,
    validate_memory,
    validate_training,
)
from memgen_cli.training.trainer_parts import RichProgress

METHODS = ("sft", "grpo")
# The keys of a weaver's recipe a baseline accepts and does not read, so a resume ignores them:
# those that place latents, and the memory fields that do not set the weaver's parameter count.
WEAVER_ONLY = (
    "training.schedule",
    "training.prompt_insertion",
    "training.memory",
    "memory.delimiters",
    "memory.max_inference_insertions",
    "memory.keep_latents",
    "memory.lora_alpha",
    "memory.lora_dropout",
    "memory.projection_init",
    "memory.trigger_hidden",
    "memory.trigger_threshold",
)
IGNORE = -100
# The budget rule of the deep-memory comparison (docs DEEP-MEMORY): arms within ±5 % of the
# weaver's trainable parameters. A matched count outside it is printed with a warning.
TOLERANCE = 0.05


# ----------------------------------------------------------------------------- config
def resolve_config(recipe=None, overrides=None, method: str | None = None, **flags):
    """Recipe, then ``--set`` overrides, then the command's own flags (which win): ``method``,
    ``base``, ``data``, ``columns``, ``task_options``, ``output``, ``report_to``. A weaver's
    recipe writes beside the weaver's output (``beside_weaver``)."""
    cfg = frame.resolve_config(BaselineConfig, recipe, overrides, **flags)
    if method is not None:
        cfg = dataclasses.replace(cfg, method=method)
    return beside_weaver(cfg, recipe, overrides, flags, output="baseline-sft")


# Recipes are named for their stage (recipes/<model>/<task>/<stage>.yaml). A weaver stage's
# recipe names weaver artifacts in `output` (and grpo-weaver's `init`, an SFT weaver); when it
# drives a baseline, the baseline's own artifacts are the ones beside them.
WEAVER_RECIPES = ("sft-weaver", "grpo-weaver")


def counterpart(recipe: str | Path | None, path: str | None, name: str) -> str | None:
    """``path`` as a baseline reads it from ``recipe``: in a weaver stage's recipe a weaver
    artifact, whose baseline is the directory ``name`` beside it (``runs/x/sft-weaver`` ->
    ``runs/x/baseline-sft``); in any other recipe, ``path`` itself.

    >>> counterpart("recipes/a/sft-weaver.yaml", "runs/a/sft-weaver", "baseline-sft")
    'runs/a/baseline-sft'
    >>> counterpart("recipes/a/baseline-sft.yaml", "runs/a/lora", "baseline-sft")
    'runs/a/lora'
    """
    if recipe is None or path is None or Path(recipe).stem not in WEAVER_RECIPES:
        return path
    return str(Path(path).with_name(name))


def beside_weaver(cfg, recipe, overrides: list[str] | None, flags: dict, **names: str):
    """``cfg`` with each path key in ``names`` (``output="baseline-sft"``) read as a baseline
    reads it from ``recipe`` (``counterpart``), unless the user gave it: as a flag or by
    ``--set``, a path is the user's own and never mapped."""
    given = {item.split("=", 1)[0].strip() for item in overrides or []}
    mapped = {
        key: counterpart(recipe, getattr(cfg, key), name)
        for key, name in names.items()
        if flags.get(key) is None and key not in given
    }
    return dataclasses.replace(cfg, **mapped)


def validate_lora(lora: BaselineLoraConfig) -> None:
    if lora.r is not None and lora.r < 1:
        raise MemgenError(f"lora.r must be >= 1 (or null to match the weaver); got {lora.r}.")
    if not 0.0 <= lora.dropout < 1.0:
        raise MemgenError(f"lora.dropout must be in [0, 1); got {lora.dropout}.")
    if not lora.targets:
        raise MemgenError("lora.targets needs at least one module name (e.g. [q_proj, v_proj]).")


def validate_method(method: str) -> None:
    if method not in BASELINE_METHODS:
        raise MemgenError(
            f'method "{method}" is unknown; use one of {", ".join(BASELINE_METHODS)} '
            "(--method or --set method=...)." + did_you_mean(method, BASELINE_METHODS)
        )


def validate_prompt_learning(cfg: BaselinePromptLearningConfig) -> None:
    n = cfg.num_virtual_tokens
    if n is not None and n < 1:
        raise MemgenError(
            f"prompt_learning.num_virtual_tokens must be >= 1 (or null to match the weaver); got {n}."
        )
    if cfg.init not in ("text", "random"):
        raise MemgenError(f'prompt_learning.init must be text or random; got "{cfg.init}".')
    if cfg.init == "text" and not cfg.init_text.strip():
        raise MemgenError("prompt_learning.init_text is empty; give words, or init: random.")


def validate(cfg: BaselineConfig, resume: str | None) -> Path | None:
    """Check values the dataclass types cannot; return the checkpoint to resume from."""
    validate_method(cfg.method)
    if cfg.method == "lora":
        validate_lora(cfg.lora)
    else:
        validate_prompt_learning(cfg.prompt_learning)
    validate_training(cfg.training, cfg.data)
    validate_memory(cfg.memory)
    unread = sorted(set(BASELINE_SECTIONS.values()) - {BASELINE_SECTIONS[cfg.method]})
    return frame.resume_point(cfg, resume, unread=WEAVER_ONLY + tuple(unread))


# ----------------------------------------------------------------------------- budget
def lora_targets(model, targets: list[str]) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers a LoRA with these target names attaches to (PEFT's suffix match)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name.split(".")[-1] == t for t in targets)
    ]


def lora_params_per_rank(model, targets: list[str]) -> int:
    """A LoRA of rank r on these layers trains r × this many parameters (A: r×in, B: out×r)."""
    return sum(m.in_features + m.out_features for _, m in lora_targets(model, targets))


def weaver_trainable_params(model, memory: MemoryConfig) -> int:
    """What ``sft-weaver`` trains with this memory config on ``model`` (shared backbone): its
    LoRA plus the weaver's own tensors (queries, norms, scales, both projections unless
    ``memory.inject`` is kv, which has none, or only the read-out with ``memory.weaver_reads:
    cache``, and the kv prefix with ``memory.kv_prefix``)."""
    hidden = model.get_input_embeddings().weight.shape[1]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        own = Weaver(
            hidden,
            hidden,
            memory.prompt_latents,
            memory.inference_latents,
            projections=memory.inject != "kv",
            reads_context=memory.weaver_reads != "cache",
            prefix=cache_geometry(model.config) if memory.kv_prefix else None,
        )
    lora = memory.lora_r * lora_params_per_rank(model, memory.lora_targets)
    return lora + sum(p.numel() for p in own.parameters())


def matched_rank(model, targets: list[str], budget: int) -> int:
    """The rank whose LoRA parameter count is closest to ``budget`` (at least 1)."""
    return closest_multiple(lora_params_per_rank(model, targets), budget)


def closest_multiple(unit: int, budget: int) -> int:
    """The count of ``unit``-sized pieces (LoRA ranks, virtual tokens) closest to ``budget``.

    >>> closest_multiple(576, 1_597_826), closest_multiple(11_520, 1_597_826)
    (2774, 139)
    """
    return max(1, round(budget / unit))


def measure_budget(model, weaver_count: int) -> dict:
    """The budget a baseline records: its trainable parameters (``model``: as its Trainer
    holds it, the adapter attached) and the weaver's it is matched with."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable_params": trainable, "weaver_trainable_params": weaver_count}


def budget_text(budget: dict) -> str:
    """The budget as the run's first line says it."""
    return (
        f"{budget['trainable_params']:,} trainable parameters (the weaver: "
        f"{budget['weaver_trainable_params']:,})"
    )


def off_budget(trainable: int, weaver: int, matched: bool = True) -> str | None:
    """A warning when ``trainable`` is outside ±TOLERANCE of the weaver's count, else None;
    ``matched``: the count was matched to the weaver's (else the recipe set it)."""
    gap = trainable / weaver - 1
    if abs(gap) <= TOLERANCE:
        return None
    why = "the closest this method's granularity allows" if matched else "as the recipe sets it"
    return (
        f"{trainable:,} trainable parameters are {gap:+.1%} from the weaver's {weaver:,}, "
        f"outside ±{TOLERANCE:.0%} ({why})."
    )


def lora_settings(
    base: LoadedBase, cfg: BaselineLoraConfig, weaver: MemoryConfig
) -> tuple[dict, LoraConfig, int]:
    """(the LoRA settings recorded in the manifest, PEFT's config, the weaver's trainable
    parameter count): the rank is ``cfg.r``, or the weaver's budget when that is null."""
    if not lora_targets(base.model, cfg.targets):
        raise MemgenError(
            f"lora.targets {cfg.targets} match no linear layer of {base.name}; name modules "
            "of this architecture (e.g. q_proj, v_proj)."
        )
    weaver_count = weaver_trainable_params(base.model, weaver)
    rank = cfg.r or matched_rank(base.model, cfg.targets, weaver_count)
    lora = {
        "r": rank,
        "alpha": cfg.alpha or 2 * rank,
        "dropout": cfg.dropout,
        "targets": list(cfg.targets),
        "rank_rule": "set" if cfg.r else "matched to the weaver's trainable parameters",
    }
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["targets"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    return lora, peft_config, weaver_count


def prompt_learning_settings(
    base: LoadedBase, cfg: BaselineConfig, longest: int
) -> tuple[dict, PeftModel, int]:
    """(the settings recorded in the manifest, the PEFT model of ``cfg.method`` prompt or
    prefix on ``base``, initialised, and the weaver's trainable parameter count): the virtual
    tokens are ``num_virtual_tokens``, or as many as bring the count closest to the weaver's;
    with the ``longest`` sample after them they must fit the model's positions.
    Prefix tuning runs without PEFT's reparameterisation MLP: at its default width that MLP
    alone trains 2.26M parameters on SmolLM2-135M, more than the weaver's whole budget (1.6M),
    and a start from real words (Li & Liang's other stabiliser) needs the prefix itself."""
    p, model = cfg.prompt_learning, base.model
    weaver_count = weaver_trainable_params(model, cfg.memory)
    unit = prompt_learning.params_per_token(model, cfg.method)
    n = p.num_virtual_tokens or closest_multiple(unit, weaver_count)
    most = getattr(model.config, "max_position_embeddings", None)
    if most is not None and n + longest > most:
        raise MemgenError(
            f"{n} virtual tokens + the longest sample's {longest} tokens exceed the {most} "
            f"positions of {base.name}; lower prompt_learning.num_virtual_tokens (the budget "
            "then differs) or data.max_length."
        )
    text = p.init_text if p.init == "text" else None
    settings = {
        "num_virtual_tokens": n,
        "params_per_token": unit,
        "init": p.init,
        "init_text": text,
        "tokens_rule": "matched to the weaver's trainable parameters",
        **({"prefix_projection": False} if cfg.method == "prefix" else {}),
    }
    if p.num_virtual_tokens:
        settings["tokens_rule"] = "set"
    peft = prompt_learning.new_adapter(base, cfg.method, n, text, cfg.model.revision)
    return settings, peft, weaver_count


# ------------------------------------------------------------------------------- data
def completion_mask(ids: list[int], target: int | list[int]) -> list[int]:
    """1 on the tokens the loss covers: from the prompt length ``target`` on, or where the
    mask ``target`` (an episode's: the agent's tokens) says.

    >>> completion_mask([5, 6, 7], 2), completion_mask([5, 6, 7], [0, 1, 0])
    ([0, 0, 1], [0, 1, 0])
    """
    return target if isinstance(target, list) else [0] * target + [1] * (len(ids) - target)


def as_dataset(pairs: list[tuple[list[int], int | list[int]]]) -> datasets.Dataset:
    """TRL's pre-tokenised format: ``input_ids`` and a ``completion_mask`` (1 on the target)."""
    rows = [{"input_ids": ids, "completion_mask": completion_mask(ids, n)} for ids, n in pairs]
    return datasets.Dataset.from_list(rows)


@torch.no_grad()
def heldout_loss(
    model, pairs: list[tuple[list[int], int | list[int]]], pad_id: int, batch: int
) -> float:
    """Token-weighted cross-entropy on the targets of held-out samples (prompt masked;
    ``pairs`` as ``as_dataset`` takes them)."""
    was_training, device = model.training, model.get_input_embeddings().weight.device
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i : i + batch]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
        for row, (seq, n) in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            keep = torch.tensor(completion_mask(seq, n), dtype=torch.bool)
            labels[row, : len(seq)] = torch.where(keep, ids[row, : len(seq)], IGNORE)
        # Logits of the text only: prompt tuning's model puts its virtual tokens before it.
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=width)
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        total += float(loss)
        count += int((target != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


# ------------------------------------------------------------------------------- run
def run(
    cfg: BaselineConfig, resume: str | None = None, **options: Unpack[frame.RunOptions]
) -> Path:
    """Train the baseline and write the artifact to ``cfg.output``; returns its path."""
    # 1. validate
    run = frame.Run.start("baseline sft", cfg, resume, validate(cfg, resume), **options)
    task, train_examples, held_examples, data_seed = load_examples(cfg)
    encode = tokenize_samples
    if isinstance(task, EnvironmentTask):  # expert episodes, as sft-weaver trains on them
        check_episode_data(task, cfg.data, len(train_examples) + len(held_examples), cfg.method)
        encode = functools.partial(episode_pairs, task=task)

    # 2. build
    d, t = cfg.data, cfg.training
    base = run.load_base()
    tok = base.tokenizer
    train, dropped, held, held_dropped = encode_splits(
        encode, tok, train_examples, held_examples, d
    )
    if cfg.method == "lora":
        settings, peft_config, weaver_count = lora_settings(base, cfg.lora, cfg.memory)
        model = base.model
    else:  # PEFT wraps base.model and leaves it as it is: the plain reasoner
        longest = max(len(ids) for ids, _ in train + held)
        settings, model, weaver_count = prompt_learning_settings(base, cfg, longest)
        peft_config = None
    args = trl.SFTConfig(
        **trainer_arguments(t, run.ckpts, base.model.device),
        completion_only_loss=True,  # loss on the target only, as sft-weaver
        max_length=None,  # too-long samples were dropped above, never truncated
        activation_checkpointing=False,  # TRL turns it on by default; sft-weaver does not
        dataset_num_proc=None,
    )
    losses: dict[str, float] = {}
    if held and run.main and run.resume_from is None:
        # Memory off: the plain reasoner (LoRA's B starts at zero: where a LoRA starts too).
        losses["memory_off"] = heldout_loss(base.model, held, tok.pad_token_id, t.batch_size)
    losses = run.begin(losses)  # a resumed run reads back what its fresh start measured
    datasets.disable_progress_bars()  # TRL maps the dataset once; no bar for that
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=as_dataset(train),
        processing_class=tok,
        peft_config=peft_config,
        callbacks=run.callbacks(RichProgress, args),
    )
    model = trainer.model
    budget = measure_budget(model, weaver_count)
    run.header(
        f"{describe(cfg.method, settings)}, {budget_text(budget)}; {len(train)} samples from "
        f"{task.name} ({dropped} dropped as longer than {d.max_length} tokens)"
    )
    matched = "set" not in (settings.get("rank_rule"), settings.get("tokens_rule"))
    if warning := off_budget(budget["trainable_params"], weaver_count, matched):
        run.say(f"[yellow]warning:[/] {warning}")
    if warning := prompt_learning.long_prompt(settings, longest if cfg.method != "lora" else 0):
        run.say(f"[yellow]warning:[/] {warning}")

    # 3. loop
    run.fit(trainer)

    # 4. save (main process; the others wait so that the run ends together)
    if run.main:
        if held:
            losses[f"{cfg.method}_final"] = heldout_loss(
                model, held, tok.pad_token_id, t.batch_size
            )
        summary = {
            "stage": "baseline-sft",
            "method": f"{cfg.method}-sft",
            **run.data_fields(task, data_seed),
            "samples": len(train),
            "dropped_too_long": dropped,
            "heldout_samples": len(held),
            "heldout_dropped_too_long": held_dropped,
            "heldout_loss": {k: round(v, 5) for k, v in losses.items()},
            **frame.loss_fields(trainer.state.log_history),
            **run.trainer_fields(trainer),
        }
        section = {BASELINE_SECTIONS[cfg.method]: settings}
        out = run.save(save_baseline, model, base, summary, **section, budget=budget)
        run.console.print(summary_table(summary, cfg.method, settings, budget, out))
    return run.end(trainer)


def describe(method: str, settings: dict) -> str:
    """The adapter in words: "LoRA r 28 on q_proj, v_proj", "prefix tuning, 139 virtual
    tokens"."""
    if method == "lora":
        return f"LoRA r {settings['r']} on {', '.join(settings['targets'])}"
    return f"{BASELINE_NAMES[method]}, {settings['num_virtual_tokens']} virtual tokens"


def summary_table(s: dict, method: str, settings: dict, budget: dict, out: Path) -> Table:
    adapter = (
        lora_rows(settings, budget)
        if method == "lora"
        else [(BASELINE_NAMES[method], describe(method, settings)), budget_row(budget)]
    )
    rows = [
        ("task", f"{s['task']} ({s['samples']} samples, {s['dropped_too_long']} dropped)"),
        *adapter,
        *frame.trainer_rows(s, frame.loss_row(s)),
        *frame.score_rows("held-out loss", s["heldout_loss"], 4),
    ]
    return frame.table(f"baseline sft → {out}", rows)


def lora_rows(lora: dict, budget: dict) -> list[tuple[str, str]]:
    """A baseline's rows of the summary table: its LoRA and the two parameter counts."""
    return [
        ("LoRA", f"r {lora['r']}, alpha {lora['alpha']} on {', '.join(lora['targets'])}"),
        budget_row(budget),
    ]


def budget_row(budget: dict) -> tuple[str, str]:
    return (
        "trainable parameters",
        f"{budget['trainable_params']:,} (weaver: {budget['weaver_trainable_params']:,})",
    )
