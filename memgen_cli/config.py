"""Configuration: small dataclasses, one per recipe section.

A recipe YAML is one of these dataclasses written out. Every field is documented once, here,
in the field's docstring comment. Reading, overriding (``--set a.b=value``) and writing them is
``memgen_cli/recipe.py``; its names are importable from here too.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

# recipe.py's names, read through here by the stages and the tests (``X as X``: a re-export)
from memgen_cli.recipe import apply_overrides as apply_overrides
from memgen_cli.recipe import dump_yaml as dump_yaml
from memgen_cli.recipe import from_dict as from_dict
from memgen_cli.recipe import load_recipe as load_recipe
from memgen_cli.recipe import to_dict as to_dict


@dataclass
class ModelConfig:
    base: str = "smollm2-135m"
    """Reasoner: a hub id, a local model directory, or the embedded alias ``smollm2-135m``."""
    revision: str | None = None
    """Hub revision of the base model (branch, tag or commit)."""
    weaver_base: str | None = None
    """Weaver backbone; ``None`` shares the reasoner's weights (one copy in memory)."""
    device: str = "auto"
    """auto | cpu | cuda[:i]. auto picks CUDA when a GPU is visible."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16. auto is bfloat16 on CUDA and float32 on CPU."""


@dataclass
class MemoryConfig:
    prompt_latents: int = 8
    """K for the prompt insertion (latents woven once where the assistant turn starts)."""
    inference_latents: int = 8
    """K for each insertion inside the response."""
    max_inference_insertions: int = 5
    """Cap on insertions inside one response (the official recipes use 3 to 5)."""
    delimiters: list[str] = field(default_factory=lambda: [",", ".", "\n"])
    """A token whose text ends with one of these is a clause boundary (an insertion point)."""
    lora_r: int = 16
    """LoRA rank of the weaver adapter."""
    lora_alpha: int = 32
    """LoRA alpha of the weaver adapter."""
    lora_dropout: float = 0.1
    """LoRA dropout of the weaver adapter (training only)."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names the weaver's LoRA attaches to."""
    projection_init: str = "identity"
    """identity | neutral | random. How reasoner_to_weaver / weaver_to_reasoner start (see
    weaver.py; neutral: an untrained weaver writes spaces, the cheapest start measured)."""
    trigger_hidden: int = 256
    """Hidden width of the trigger head over the reasoner's hidden state."""
    trigger_threshold: float = 0.5
    """A trained trigger invokes the weaver when its probability is at least this."""
    inject: str = "input"
    """input | kv. Where the memory enters the reasoner. input (the paper): K vectors in its
    input-embedding stream, which it turns into keys and values itself. kv: the weaver's own
    keys and values at K slots, at every layer, written into the reasoner's cache (shared
    backbone and full-attention models only; no projections; LoRA on k_proj / v_proj acts
    directly on what is written). See models/memgen.py. Artifacts without it are input."""
    weaver_reads: str = "context"
    """context | cache. What the weaver reads the context as. context (the paper): the weaver
    runs over the context itself, its adapter on every position (a second pass over each
    prompt and clause). cache: its K query latents, adapter on, attend to the reasoner's own
    cached keys and values of the context, so a weave runs over K positions only and nothing
    is read twice (as Activated LoRA does). Shared backbone only. Artifacts without it are
    context."""
    kv_prefix: bool = False
    """A learned key and value per layer and memory slot (prefix tuning's parameters), added at
    every layer to the keys and values at the memory's slots: with kv, to the weaver's own;
    with input, to those the reasoner computes over the latents (so the memory also writes
    every layer). Starts at zero: the untrained memory is what the weaver alone writes.
    Artifacts without it have none."""
    kv_prefix_rate: float = 10.0
    """How much faster the kv prefix learns than the rest of the weaver: it is stored divided by
    this and multiplied back, so under Adam its step is this x training.learning_rate (prefix
    tuning's best rate here is 10x LoRA's)."""
    keep_latents: bool = True
    """Episodes (environment tasks): latents woven in a turn stay in the context of later turns
    (false: each turn sees only its own, the official code's multi-turn way). Training and
    playing read this one setting; artifacts without it are true. See docs/agents.md."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    """Most tokens generated per answer."""
    temperature: float = 0.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (only when temperature > 0)."""
    seed: int = 0
    """Seed for sampling."""
    memory: str = "weaver"
    """off (plain reasoner) | weaver (insert at every eligible point) | full (trigger decides)."""
    ignore_eos: bool = False
    """Keep generating past EOS up to max_new_tokens (benchmarks: equal work for every path)."""


MEMORY_MODES = ("off", "weaver", "full")


@dataclass
class DataConfig:
    task: str = "gsm_symbolic"
    """gsm_symbolic | gsm8k | gym:<name> | jsonl | math | ..., or a GSM8K-format .jsonl path."""
    path: str | None = None
    """Local data for tasks that read files (gsm8k, jsonl): a .jsonl file or a directory."""
    columns: dict[str, str] = field(default_factory=dict)
    """jsonl task only: role -> column, roles prompt, solution (the target), answer, id."""
    options: dict = field(default_factory=dict)
    """Task options, as ``memgen eval --task-option`` takes them, e.g. for a reasoning_gym task
    ``{config: {min_terms: 2, max_terms: 3}}`` (difficulty) or ``{steps: false}`` (bare-answer
    targets). Recorded in the artifact: ``eval`` uses them for this task unless told otherwise."""
    split: str = "train"
    """Split to train on."""
    size: int | None = 2000
    """Training samples to take (generated tasks: how many to generate); null = all."""
    heldout: int = 0
    """Further samples, after the training ones, kept apart for a held-out loss at the end."""
    seed: int | None = None
    """Generator seed of generated tasks (null: the task's train seed, disjoint from its eval
    seed), or the shuffle seed of file data (null: file order). Recorded in the artifact."""
    prompt_suffix: str = ""
    """Answer-format instruction appended to each question; recorded so eval/generate reuse it.
    Empty by default: the targets themselves (e.g. '#### N') teach the format, and an
    instruction that contradicts them (e.g. a \\boxed{} request) would be trained against."""
    system: str | None = None
    """Optional system message (null: the chat template's own default)."""
    max_length: int = 1024
    """Longest prompt + target in tokens; longer samples are dropped and counted."""


@dataclass
class SFTTrainingConfig:
    learning_rate: float = 1e-5
    """Peak learning rate (paper: 1e-5)."""
    epochs: float = 2.0
    """Passes over the training samples (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = as many as epochs give."""
    batch_size: int = 4
    """Samples per device per micro-batch."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step."""
    scheduler: str = "cosine"
    """Learning-rate schedule (any transformers SchedulerType: cosine, linear, constant, ...)."""
    warmup: float = 0.1
    """Warm-up: a fraction of all steps if < 1, else a number of steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    schedule: str = "first"
    """Insertion points in the target: first | random | all | subsets (see
    training/sft_data.py; subsets trains a weaver for a trigger that skips)."""
    group_by_length: bool = True
    """Batch samples of similar length together (transformers' LengthGroupedSampler): less
    padding, same samples per epoch. Off = uniformly shuffled batches."""
    prompt_insertion: bool = True
    """Insert the prompt latents where the assistant turn begins."""
    bf16: bool = False
    """bfloat16 mixed precision (CUDA; on CPU it is slower)."""
    seed: int = 42
    """Seed of initialisation, shuffling, dropout and the random schedule."""
    logging_steps: int = 1
    """Log loss and learning rate every this many steps."""
    save_steps: int = 50
    """Write a resumable checkpoint every this many steps (and at the end)."""
    save_total_limit: int | None = 2
    """Most checkpoints kept (oldest removed first); null = all."""
    report_to: str = "none"
    """none | tensorboard | wandb (comma-separated for several)."""


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: SFTTrainingConfig = field(default_factory=SFTTrainingConfig)
    output: str = "runs/sft-weaver"
    """Artifact directory (written atomically); checkpoints go to <output>.checkpoints/."""


@dataclass
class BaselineLoraConfig:
    r: int | None = None
    """LoRA rank of the baseline adapter; null: the rank whose trainable-parameter count is
    closest to the weaver's described in ``memory`` (an equal budget)."""
    alpha: int | None = None
    """LoRA alpha; null: 2 × r (the paper's r 16 / alpha 32 ratio)."""
    dropout: float = 0.1
    """LoRA dropout (training only)."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names the adapter attaches to."""


BASELINE_METHODS = ("lora", "prompt", "prefix")


@dataclass
class BaselinePromptLearningConfig:
    num_virtual_tokens: int | None = None
    """Virtual tokens of a prompt or prefix baseline; null: the count whose trainable parameters
    are closest to the weaver's described in ``memory`` (an equal budget). One token trains the
    hidden size (prompt) or layers × 2 × KV heads × head size (prefix) parameters."""
    init: str = "text"
    """text | random. text: the virtual tokens start as ``init_text``'s tokens, repeated to fill
    them: their input embeddings (prompt: PEFT's TEXT init) or the plain reasoner's keys and
    values over them (prefix: Li & Liang's start from real words). random: PEFT's default."""
    init_text: str = "Solve the problem step by step, then give the final answer."
    """The words the virtual tokens start from (``init: text``)."""


@dataclass
class BaselineConfig:
    """``memgen baseline sft``: LoRA-SFT of the reasoner itself (or prompt or prefix tuning of
    it), at the weaver's budget.

    A weaver's recipe drives its baseline as it stands (``memgen baseline sft --recipe
    sft-weaver.yaml``): ``model``, ``memory``, ``data`` and ``training`` mean what they mean in
    ``SFTConfig``, with the same defaults, so both train on the same examples, steps, batches
    and learning-rate schedule. Keys only the weaver reads are accepted and not read here:
    ``training.schedule`` and ``training.prompt_insertion`` (they place latents), and the
    ``memory`` fields that place latents. ``method``, ``lora`` and ``prompt_learning`` are this
    stage's own (a weaver recipe leaves them out: the defaults, a LoRA).
    tests/test_recipes.py loads every weaver recipe as both.
    """

    RENAMED: typing.ClassVar[dict[str, str]] = {"weaver": "memory"}
    """Sections read under their old names too (with a note)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: str = "lora"
    """lora | prompt | prefix: what is trained. lora: a LoRA on the reasoner's linear layers
    (``lora``). prompt: PEFT prompt tuning, trainable input embeddings before every prompt;
    prefix: PEFT prefix tuning without the reparameterisation MLP, trainable keys and values
    at every layer (both ``prompt_learning``). See docs/stages/baseline.md."""
    lora: BaselineLoraConfig = field(default_factory=BaselineLoraConfig)
    """Read when ``method`` is lora."""
    prompt_learning: BaselinePromptLearningConfig = field(
        default_factory=BaselinePromptLearningConfig
    )
    """Read when ``method`` is prompt or prefix."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The weaver this baseline is compared with, as the weaver's recipe writes it: its
    trainable-parameter count sets ``lora.r`` (``prompt_learning.num_virtual_tokens``) when that
    is null; the fields that place latents (delimiters, insertion caps, ...) are not read.
    Formerly ``weaver``, which still reads."""
    data: DataConfig = field(default_factory=DataConfig)
    training: SFTTrainingConfig = field(default_factory=SFTTrainingConfig)
    output: str = "runs/baseline-sft"
    """Artifact directory (written atomically); checkpoints go to <output>.checkpoints/. In a
    weaver stage's recipe (``sft-weaver.yaml``) this is the weaver's directory, and the baseline
    writes beside it, as ``baseline-sft`` (``stages/baseline.py: counterpart``)."""


@dataclass
class GRPOTrainingConfig:
    learning_rate: float = 1e-5
    """Peak learning rate (paper: 1e-5)."""
    epochs: float = 1.0
    """Passes over the training prompts (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Optimizer steps to run; -1 = as many as epochs give."""
    batch_size: int = 8
    """Completions per process per micro-batch (TRL's per_device_train_batch_size): a multiple
    of num_generations; each process answers batch_size / num_generations prompts."""
    grad_accumulation: int = 1
    """Micro-batches per optimizer step."""
    num_generations: int = 8
    """G: sampled completions per prompt (>= 2); advantages compare a prompt's G rewards."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; log-probs for the loss use the same one."""
    top_p: float = 1.0
    """Nucleus sampling mass of rollouts."""
    max_completion_length: int = 256
    """Most tokens per completion; longer ones are cut (see mask_truncated_completions)."""
    memory: str = "weaver"
    """Rollout memory: weaver (weave at every clause boundary up to the cap, as the official
    code trains) or full (the artifact's trained trigger decides)."""
    loss_type: str = "bnpo"
    """grpo | bnpo | dr_grpo | dapo: how per-token losses are averaged (see training/rl.py).
    bnpo is the official MemGen setting; TRL's default is dapo."""
    scale_rewards: str = "group"
    """group | batch | none: divide advantages by the group's std, the batch's, or not at all."""
    beta: float = 0.0
    """KL coefficient against the starting weaver (paper: 0, no reference policy)."""
    epsilon: float = 0.2
    """Lower clipping range of the ratio: clip(ρ, 1 - epsilon, 1 + epsilon_high)."""
    epsilon_high: float | None = None
    """Upper clipping range (DAPO's clip-higher); null = epsilon."""
    num_iterations: int = 1
    """μ: optimizer steps per rollout batch (old log-probs kept from the first pass)."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_completion_length out of the loss."""
    disable_dropout: bool = True
    """LoRA dropout off while training (TRL's default): the loss sees the sampling policy."""
    scheduler: str = "cosine"
    """Learning-rate schedule (any transformers SchedulerType)."""
    warmup: float = 0.1
    """Warm-up: a fraction of all steps if < 1, else a number of steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    bf16: bool = False
    """bfloat16 mixed precision (CUDA; on CPU it is slower)."""
    seed: int = 42
    """Seed of initialisation, prompt order and rollout sampling."""
    logging_steps: int = 1
    """Log metrics every this many steps."""
    log_completions_steps: int = 10
    """Write completions/step_NNNNN.jsonl (prompt, marked completion, rewards, advantage) at
    step 1 and every this many steps; 0 = never."""
    save_steps: int = 50
    """Write a resumable checkpoint every this many steps."""
    save_total_limit: int | None = 2
    """Most checkpoints kept (oldest removed first); null = all."""
    report_to: str = "none"
    """none | tensorboard | wandb (comma-separated for several)."""


@dataclass
class RewardConfig:
    task_weight: float = 1.0
    """Weight of the task's own grader (binary accuracy); 0 leaves it out."""
    functions: list[str] = field(default_factory=list)
    """Extra rewards as module:function, TRL's signature f(prompts, completions, **columns)."""
    weights: list[float] = field(default_factory=list)
    """One weight per extra function, in order (empty: 1.0 each)."""


@dataclass
class GRPOConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Used when starting fresh; with --init the artifact's memory settings apply."""
    data: DataConfig = field(default_factory=DataConfig)
    training: GRPOTrainingConfig = field(default_factory=GRPOTrainingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    init: str | None = None
    """Artifact to start from (usually an SFT weaver; recorded as the parent); null = fresh."""
    output: str = "runs/grpo-weaver"
    """Artifact directory (written atomically); checkpoints go to <output>.checkpoints/."""


@dataclass
class BaselineGRPOConfig:
    """``memgen baseline grpo``: LoRA-GRPO of the reasoner itself with TRL's ``GRPOTrainer``.

    ``model``, ``data``, ``training`` and ``reward`` mean what they mean in ``GRPOConfig``, with
    the same defaults, so a grpo-weaver recipe's sections can be copied as they are: same
    prompts, G, sampling, loss, steps, batches and schedule. ``training.batch_size`` counts
    completions, as TRL's ``per_device_train_batch_size`` does. A grpo-weaver recipe drives it
    as it stands; keys only the weaver reads are accepted and not read here:
    ``training.memory`` and ``training.log_completions_steps`` (there are no latents, and TRL
    logs its own completions only to its trackers). ``lora`` and ``memory`` mean what they
    mean in ``BaselineConfig``; a grpo-weaver recipe's ``init`` and ``output`` name weavers,
    read as the baselines beside them (``init``, ``output``).
    """

    RENAMED: typing.ClassVar[dict[str, str]] = {"weaver": "memory"}
    """Sections read under their old names too (with a note)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: BaselineLoraConfig = field(default_factory=BaselineLoraConfig)
    """The adapter of a fresh run; with ``init`` the artifact's adapter is trained as it is
    (its rank, alpha, dropout and targets) and this section is not read."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The weaver this baseline is compared with: its trainable-parameter count sets ``lora.r``
    when that is null, and is recorded beside the adapter's. Formerly ``weaver``."""
    data: DataConfig = field(default_factory=DataConfig)
    training: GRPOTrainingConfig = field(default_factory=GRPOTrainingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    init: str | None = None
    """A ``baseline sft`` artifact whose adapter is the starting point (trained further;
    recorded as the parent), as grpo-weaver starts from an SFT weaver; null = a fresh LoRA. In
    a grpo-weaver recipe this names the SFT weaver: read as the ``baseline-sft`` beside it."""
    output: str = "runs/baseline-grpo"
    """Artifact directory (written atomically); checkpoints go to <output>.checkpoints/. In a
    grpo-weaver recipe: the weaver's directory, and the baseline writes beside it, as
    ``baseline-grpo``."""


@dataclass
class TriggerRLConfig:
    penalty: float = 0.1
    """λ of the sparsity penalty λ·Σ_j max(0, d_ij − p̄) (paper Eq. 9; the paper gives no value).
    With binary task rewards, one unnecessary invocation then costs a tenth of a correct answer."""
    initial_rate: float = 0.5
    """INVOKE probability of the head at the start, for every state (unsaturated: the G
    rollouts of a group decide differently, so advantages are not all zero)."""
    entropy_coef: float = 0.0
    """Weight of the decisions' mean Bernoulli entropy, added to the objective (0 = off)."""
    reference: str = "median"
    """Whose invocation rate p̄ is: ``median`` (the group's rollouts with task reward at least
    the group median, as specified) or ``successful`` (those with a positive task reward; a
    group where none succeeded is not penalised, since no rollout shows that fewer invocations
    suffice)."""


@dataclass
class TriggerTrainingConfig:
    learning_rate: float = 1e-4
    """Peak learning rate of the trigger head (AdamW)."""
    max_steps: int = 50
    """Optimizer rollout steps: each draws batch_size / num_generations prompts."""
    batch_size: int = 16
    """Completions per step: a multiple of num_generations."""
    num_generations: int = 8
    """G: rollouts per prompt (>= 2; paper: 8)."""
    temperature: float = 0.0
    """Token sampling temperature of rollouts; 0 = greedy tokens (the official trigger
    training): the decisions alone then make a group's rollouts differ."""
    top_p: float = 1.0
    """Nucleus sampling mass of rollout tokens (when temperature > 0)."""
    max_completion_length: int = 256
    """Most tokens per completion."""
    loss_type: str = "bnpo"
    """grpo | bnpo | dr_grpo | dapo, over decisions instead of tokens (see training/rl.py)."""
    scale_rewards: str = "group"
    """group | batch | none: divide advantages by the group's std, the batch's, or not at all."""
    epsilon: float = 0.2
    """Clipping range of the decision ratio: clip(ρ, 1 - epsilon, 1 + epsilon_high)."""
    epsilon_high: float | None = None
    """Upper clipping range; null = epsilon."""
    num_iterations: int = 1
    """μ: optimizer updates per rollout batch (cheap: the head re-reads recorded states)."""
    scheduler: str = "constant"
    """Learning-rate schedule (any transformers SchedulerType)."""
    warmup: float = 0.0
    """Warm-up: a fraction of all steps if < 1, else a number of steps."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 = off)."""
    seed: int = 42
    """Seed of prompt order and of decision and token sampling."""
    logging_steps: int = 1
    """Print and log metrics every this many steps."""
    log_completions_steps: int = 10
    """Write completions/step_NNNNN.jsonl (completion, reward, penalty, advantage, each
    decision with its probability) at step 1 and every this many steps; 0 = never."""
    save_steps: int = 25
    """Write a resumable checkpoint every this many steps."""


@dataclass
class TriggerConfig:
    """``memgen train-trigger``: RL on the trigger head of a weaver artifact, weaver frozen."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(size=None, heldout=0))
    """``size`` null: a third of the training split, minus what the weaver saw (when the
    artifact records it)."""
    training: TriggerTrainingConfig = field(default_factory=TriggerTrainingConfig)
    trigger: TriggerRLConfig = field(default_factory=TriggerRLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    artifact: str | None = None
    """The weaver artifact whose trigger is trained (its parent); required."""
    output: str = "runs/train-trigger"
    """Artifact directory (written atomically); checkpoints go to <output>.checkpoints/."""
