"""Bad input to every command: exit code 2, one "error:" line that says what is wrong, no
traceback, and nothing written (the working directory and every input, byte for byte).

Each case is (argv, a fragment of the message). ``{name}`` in argv is an input built once per
module in ``inputs`` (a tiny base, a weaver, a LoRA baseline, damaged copies, bad files). No
case loads the embedded model or reaches the network: a guard fails any base load that is not
the tiny one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from typer.testing import CliRunner

from helpers import tiny_artifact
from memgen_cli.artifacts import save_baseline
from memgen_cli.cli import app
from memgen_cli.config import GenerationConfig
from memgen_cli.generation import _pick
from memgen_cli.models import base as base_module
from memgen_cli.models.base import load_base

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "tiny"
TINY = {
    "tiny_sft": RECIPES / "sft-weaver.yaml",
    "tiny_grpo": RECIPES / "grpo-weaver.yaml",
    "tiny_trigger": RECIPES / "train-trigger.yaml",
    "tiny_bsft": RECIPES / "baseline-sft.yaml",
    "tiny_bgrpo": RECIPES / "baseline-grpo.yaml",
}


# ------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every file a case points at, built once; cases must leave it byte for byte as it is."""
    root = tmp_path_factory.mktemp("inputs")
    base_dir, weaver = tiny_artifact(root)
    shutil.move(base_dir, root / "base")
    _rewrite(weaver / "memgen.json", lambda m: _rebase(m, root / "base"))
    shutil.move(weaver, root / "weaver")
    _baseline(root / "base", root / "baseline")

    (root / "not-artifact").mkdir()
    (root / "not-artifact" / "notes.txt").write_text("just a folder\n")
    _damaged(root, "bad-json", lambda d: (d / "memgen.json").write_text("{not json"))
    _damaged(root, "old-format", lambda d: _rewrite(d / "memgen.json", _format_99))
    _damaged(root, "bad-shapes", lambda d: _rewrite(d / "memgen.json", _wrong_shape))
    _damaged(root, "incomplete", lambda d: (d / "weaver.safetensors").unlink())
    _damaged(root, "truncated", _truncate)

    (root / "unknown-key.yaml").write_text("training:\n  learning_rat: 0.001\n")
    (root / "bad-yaml.yaml").write_text("training: [unclosed\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    (root / "no-prompt.jsonl").write_text('{"text": "where is the prompt?"}\n')
    (root / "empty.jsonl").write_text("\n")
    (root / "good.jsonl").write_text('{"prompt": "What is 2+2?"}\n')
    (root / "latin1.yaml").write_bytes("training:\n  seed: 1 # \xe9t\xe9\n".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    return root


def _rewrite(file: Path, change) -> None:
    manifest = json.loads(file.read_text())
    change(manifest)
    file.write_text(json.dumps(manifest, indent=2))


def _rebase(manifest: dict, base: Path) -> None:
    manifest["reasoner"]["name"] = manifest["reasoner"]["source"] = str(base)


def _format_99(manifest: dict) -> None:
    manifest["format_version"] = 99


def _wrong_shape(manifest: dict) -> None:
    name = next(iter(manifest["tensors"]["weaver"]))
    manifest["tensors"]["weaver"][name] = [7, 7]


def _truncate(art: Path) -> None:
    file = art / "weaver.safetensors"
    file.write_bytes(file.read_bytes()[:40])


def _damaged(root: Path, name: str, damage) -> None:
    shutil.copytree(root / "weaver", root / name)
    damage(root / name)


def _baseline(base_dir: Path, out: Path) -> None:
    """A real `memgen baseline sft` artifact (untrained LoRA) on the tiny base."""
    base = load_base(str(base_dir), device="cpu")
    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=lora["targets"])
    model = get_peft_model(base.model, config)
    save_baseline(model, base, out, lora=lora, budget={}, prompt={"prompt_suffix": ""})


# ------------------------------------------------------------------------------- cases
def case(id_: str, argv: str | list[str], fragment: str):
    return pytest.param(argv.split() if isinstance(argv, str) else argv, fragment, id=id_)


def across(commands: dict[str, str], rows: list[tuple]) -> list:
    """Each row (id, arguments, fragment) as a case of each command ({name: argv}), with the id
    ``name-id``: every command words it alike."""
    return [
        case(f"{name}-{id_}", f"{argv} {args}", fragment)
        for name, argv in commands.items()
        for id_, args, fragment in rows
    ]


SFT = "sft-weaver --recipe {tiny_sft} --base {base}"
GRPO = "grpo-weaver --recipe {tiny_grpo} --base {base}"
TRIGGER_ON = "train-trigger --recipe {tiny_trigger} --base {base}"
TRIGGER = f"{TRIGGER_ON} --artifact {{weaver}}"
EVAL = "eval --data gsm_symbolic --limit 2 --device cpu"
GEN = "generate --device cpu"
INSPECT = "inspect-memory --device cpu"
BSFT = "baseline sft --recipe {tiny_bsft} --base {base}"
BGRPO = "baseline grpo --recipe {tiny_bgrpo} --base {base}"
RETRIEVAL = "baseline retrieval --recipe {tiny_sft} --base {base}"

CASES = [
    # sft-weaver: recipe keys, --set syntax, types and ranges, recipe files, data
    case("sft-unknown-key-did-you-mean", f"{SFT} --set training.lerning_rate=0.1",
         'Did you mean "learning_rate"'),
    case("sft-set-without-equals", f"{SFT} --set training.learning_rate",
         "--set expects key=value"),
    case("sft-batch-size-not-int", f"{SFT} --set training.batch_size=abc",
         "training.batch_size must be int"),
    case("sft-negative-learning-rate", f"{SFT} --set training.learning_rate=-1e-5",
         "training.learning_rate must be > 0"),
    case("sft-zero-batch", f"{SFT} --set training.batch_size=0",
         "batch_size and grad_accumulation must be >= 1"),
    case("sft-unknown-schedule", f"{SFT} --set training.schedule=sometimes",
         "training.schedule must be one of"),
    case("sft-unknown-scheduler", f"{SFT} --set training.scheduler=wobbly",
         'training.scheduler "wobbly" is unknown'),
    case("sft-missing-recipe", "sft-weaver --recipe nowhere.yaml",
         "Recipe nowhere.yaml does not exist"),
    case("sft-recipe-unknown-key", "sft-weaver --recipe {inputs}/unknown-key.yaml",
         'Did you mean "learning_rate"'),
    case("sft-recipe-bad-yaml", "sft-weaver --recipe {inputs}/bad-yaml.yaml", "is not valid YAML"),
    case("sft-recipe-not-mapping", "sft-weaver --recipe {inputs}/list.yaml",
         "must be a mapping of config keys"),
    case("sft-recipe-not-utf8", "sft-weaver --recipe {inputs}/latin1.yaml", "is not valid YAML"),
    case("sft-given-a-grpo-recipe", "sft-weaver --recipe {tiny_grpo}",
         'Unknown config key "training.num_generations". Keys here:'),
    case("sft-set-value-not-yaml", f"{SFT} --set memory.lora_targets=[q_proj",
         "the value is not valid YAML"),
    case("sft-lora-target-not-in-model", f"{SFT} --set memory.lora_targets=[q_proj,nowhere]",
         "memory.lora_targets ['nowhere'] match no linear layer"),
    case("sft-kv-prefix-rate-zero", f"{SFT} --set memory.kv_prefix=true --set memory.kv_prefix_rate=0",
         "memory.kv_prefix_rate must be > 0"),
    case("sft-negative-warmup", f"{SFT} --set training.warmup=-1",
         "training.warmup must be >= 0"),
    case("sft-negative-latents", f"{SFT} --set memory.prompt_latents=-1",
         "memory.prompt_latents and inference_latents must be >= 0"),
    case("sft-unknown-projection-init", f"{SFT} --set memory.projection_init=zeros",
         "memory.projection_init must be one of identity, neutral, random"),
    case("sft-trigger-threshold-above-one", f"{SFT} --set memory.trigger_threshold=2",
         "memory.trigger_threshold must be in [0, 1]"),
    case("sft-unknown-device", f"{SFT} --set model.device=tpu", 'Unknown --device "tpu"'),
    case("sft-missing-data-file", f"{SFT} --data missing.jsonl", "data file not found"),
    case("sft-bad-columns", f"{SFT} --columns prompt", "--columns expects role=column pairs"),
    case("sft-bad-report-to", f"{SFT} --report-to mlflow", "none, tensorboard or wandb"),
    case("sft-resume-not-a-checkpoint", f"{SFT} --resume {{inputs}}/not-artifact",
         "not a checkpoint folder"),
    case("sft-task-option-without-equals", f"{SFT} --task-option steps",
         "--task-option expects key=value"),
    case("sft-markup-in-value", [*f"{SFT} --data".split(), "[/oops]"], "unknown task '[/oops]'"),
    # grpo-weaver (and baseline grpo: GRPO_BOTH, below): --init artifacts, memory full
    case("grpo-init-is-baseline-before-any-load",  # no --base: the recipe's is the embedded
         "grpo-weaver --recipe {tiny_grpo} --init {inputs}/baseline", "is a LoRA baseline"),
    case("grpo-memory-off-read-as-a-word", f"{GRPO} --set training.memory=off",
         'training.memory must be one of weaver, full; got "off"'),
    case("grpo-memory-full-without-init", f"{GRPO} --set training.memory=full",
         "training.memory full needs --init with a trained trigger"),
    case("grpo-memory-full-without-trigger",
         f"{GRPO} --init {{weaver}} --set training.memory=full",
         "needs a trained trigger"),
    # train-trigger
    case("trigger-no-artifact", TRIGGER_ON, "train-trigger needs --artifact DIR"),
    case("trigger-on-a-baseline", f"{TRIGGER_ON} --artifact {{inputs}}/baseline",
         "is a LoRA baseline"),
    case("trigger-initial-rate-out-of-range", f"{TRIGGER} --set trigger.initial_rate=1.5",
         "trigger.initial_rate must be in (0, 1)"),
    case("trigger-negative-penalty", f"{TRIGGER} --set trigger.penalty=-0.1",
         "trigger.penalty must be >= 0"),
    case("trigger-zero-steps", f"{TRIGGER} --set training.max_steps=0",
         "training.max_steps must be > 0"),
    # eval
    case("eval-limit-zero", f"{EVAL} --limit 0", "--limit must be at least 1"),
    case("eval-batch-size-zero", f"{EVAL} --batch-size 0", "--batch-size must be at least 1"),
    case("eval-unknown-memory-mode", f"{EVAL} --artifact {{weaver}} --memory weaver,ful",
         'unknown memory mode "ful"'),
    case("eval-memory-without-artifact", f"{EVAL} --memory weaver", "needs a trained weaver"),
    case("eval-full-without-trigger", f"{EVAL} --artifact {{weaver}} --memory full",
         "--memory full needs a trained trigger"),
    case("eval-memory-on-a-baseline", f"{EVAL} --artifact {{inputs}}/baseline --memory weaver",
         "needs a weaver artifact"),
    case("eval-malformed-data-file", "eval --data {inputs}/bad.jsonl --device cpu",
         "line 2 is not valid JSON"),
    case("eval-unknown-device", f"{EVAL} --device tpu", 'Unknown --device "tpu"'),
    case("eval-unknown-task-option", f"{EVAL} --task-option colour=blue", "has no option 'colour'"),
    # generate
    case("generate-input-without-output", f"{GEN} --input {{inputs}}/good.jsonl",
         "--input needs --output"),
    case("generate-input-missing", f"{GEN} --input nowhere.jsonl --output out.jsonl",
         "--input nowhere.jsonl does not exist"),
    case("generate-input-malformed", f"{GEN} --input {{inputs}}/bad.jsonl --output out.jsonl",
         "line 2 is not valid JSON"),
    case("generate-input-no-prompt-field",
         f"{GEN} --input {{inputs}}/no-prompt.jsonl --output out.jsonl",
         'needs a "prompt" (or "question") string field'),
    case("generate-input-empty", f"{GEN} --input {{inputs}}/empty.jsonl --output out.jsonl",
         "holds no prompts"),
    case("generate-input-not-utf8", f"{GEN} --input {{inputs}}/latin1.jsonl --output out.jsonl",
         "is not UTF-8 text"),
    case("generate-input-is-a-folder", f"{GEN} --input {{inputs}} --output out.jsonl",
         "is a folder, not a file"),
    case("generate-nothing-to-answer", GEN, "Give exactly one of"),
    case("generate-unknown-memory-mode", f"{GEN} Hi? --memory sometimes",
         "--memory must be off, weaver or full"),
    case("generate-full-without-trigger", f"{GEN} Hi? --artifact {{weaver}} --memory full",
         "--memory full needs a trained trigger"),
    case("generate-on-a-baseline", f"{GEN} Hi? --artifact {{inputs}}/baseline",
         "is a LoRA baseline"),
    # inspect-memory
    case("inspect-no-artifact", f"{INSPECT} --prompt Hi?", "inspect-memory needs --artifact DIR"),
    case("inspect-a-baseline", f"{INSPECT} --prompt Hi? --artifact {{inputs}}/baseline",
         "is a LoRA baseline"),
    case("inspect-prompt-and-data",
         f"{INSPECT} --artifact {{weaver}} --prompt Hi? --data gsm_symbolic",
         "Give exactly one of --prompt"),
    case("inspect-memory-off", f"{INSPECT} --artifact {{weaver}} --prompt Hi? --memory off",
         "--memory must be weaver or full"),
    case("inspect-drop-cluster-without-data",
         f"{INSPECT} --artifact {{weaver}} --prompt Hi? --drop-cluster 0",
         "--drop-cluster re-runs an evaluation"),
    case("inspect-unknown-drop-rule",
         f"{INSPECT} --artifact {{weaver}} --data gsm_symbolic --drop-rule farthest",
         "--drop-rule must be one of"),
    # baseline sft / grpo
    case("baseline-sft-unknown-lora-key", f"{BSFT} --set lora.rank=4",
         "Keys here: alpha, dropout, r, targets."),
    case("baseline-sft-negative-latents", f"{BSFT} --set memory.inference_latents=-2",
         "memory.prompt_latents and inference_latents must be >= 0"),
    case("baseline-sft-zero-rank", f"{BSFT} --set lora.r=0", "lora.r must be >= 1"),
    case("baseline-sft-dropout-out-of-range", f"{BSFT} --set lora.dropout=1.5",
         "lora.dropout must be in [0, 1)"),
    case("baseline-grpo-init-is-a-weaver", f"{BGRPO} --init {{weaver}}", "not a LoRA baseline"),
    case("baseline-grpo-unknown-lora-key", f"{BGRPO} --set lora.targts=[q_proj]",
         'Did you mean "targets"'),
    # baseline retrieval: the store's settings
    case("retrieval-k-zero", f"{RETRIEVAL} --k 0",
         "--k (retrieval.k) must be a whole number >= 1; got 0"),
    case("retrieval-negative-k", f"{RETRIEVAL} --set retrieval.k=-2",
         "must be a whole number >= 1; got -2"),
    case("retrieval-unknown-similarity", f"{RETRIEVAL} --similarity cosine",
         '--similarity "cosine" is unknown; use embed or bm25'),
    case("retrieval-similarity-did-you-mean", f"{RETRIEVAL} --similarity bm52",
         'Did you mean "bm25"'),
    case("retrieval-unknown-method", f"{RETRIEVAL} --method awm",
         'method "awm" is unknown; use expel'),
    case("retrieval-unknown-key", f"{RETRIEVAL} --set retrieval.kk=3", 'Did you mean "k"'),
    # --output that would destroy what memgen did not write
    case("sft-output-is-a-foreign-folder", f"{SFT} --output {{inputs}}/not-artifact",
         "the folder exists and is not a"),
    case("grpo-output-is-an-artifact-without-overwrite", f"{GRPO} --output {{weaver}}",
         "pass --overwrite to replace it"),
    case("eval-output-is-a-foreign-folder", f"{EVAL} --output {{inputs}}/not-artifact",
         "the folder exists and is not a"),
    case("generate-output-is-a-foreign-file",
         f"{GEN} --input {{inputs}}/good.jsonl --output {{inputs}}/bad.jsonl --overwrite",
         "the file exists and is not a memgen generate answers file"),
    # Typer's own usage errors
    case("usage-unknown-option", "eval --data gsm_symbolic --bogus", "No such option: --bogus"),
    case("usage-top-p-above-one", f"{GEN} Hi? --top-p 2", "Invalid value for '--top-p'"),
]  # fmt: skip

# grpo-weaver and baseline grpo read G, the batch, rewards and --init alike: each refuses these.
GRPO_BOTH = [
    ("one-generation", "--set training.num_generations=1",
     "training.num_generations must be >= 2"),
    ("batch-not-multiple-of-g", "--set training.batch_size=6",
     "must be a multiple of training.num_generations"),
    ("greedy-rollouts", "--set training.temperature=0", "training.temperature must be > 0"),
    ("unknown-loss", "--set training.loss_type=ppo", "training.loss_type must be one of"),
    ("reward-module-missing", "--reward no_such_module:fn",
     'cannot import module "no_such_module"'),
    ("reward-not-module-function", "--reward just_a_name", "--reward expects module:function"),
    ("reward-function-missing", "--reward math:no_such_fn", 'has no function "no_such_fn"'),
    ("reward-weight-count", "--reward math:sqrt --reward-weight 1 --reward-weight 2",
     "reward.weights has 2 values for 1 reward functions"),
    # at the first rollout, with the default output: the parents the run made (runs/tiny) go too
    ("reward-raises", "--reward helpers:broken_reward", "broken_reward raised ValueError"),
    ("init-missing", "--init nowhere", "Artifact nowhere does not exist"),
    ("init-bad-json", "--init {inputs}/bad-json", "is not valid JSON"),
]  # fmt: skip
CASES += across({"grpo": GRPO, "baseline-grpo": BGRPO}, GRPO_BOTH)

# Every command that reads a weaver artifact refuses a damaged one alike.
ARTIFACT_READERS = {
    "trigger": f"{TRIGGER_ON} --artifact",
    "eval": f"{EVAL} --artifact",
    "generate": f"{GEN} Hi? --artifact",
    "inspect": f"{INSPECT} --prompt Hi? --artifact",
}
DAMAGED = [
    ("not-an-artifact", "{inputs}/not-artifact",
     "is not a memgen artifact: memgen.json is missing"),
    ("bad-json", "{inputs}/bad-json", "is not valid JSON"),
    ("future-format", "{inputs}/old-format", "has format_version 99"),
    ("incomplete-artifact", "{inputs}/incomplete",
     "is incomplete: missing weaver.safetensors. Copy the whole folder again"),
    ("wrong-tensor-shapes", "{inputs}/bad-shapes", "does not match its manifest"),
    ("truncated-tensors", "{inputs}/truncated", "is not a readable safetensors file"),
]  # fmt: skip
CASES += across(ARTIFACT_READERS, DAMAGED)

# Every command that reads --data names a task it does not know the same way.
DATA_READERS = {
    "sft": SFT,
    "grpo": GRPO,
    "trigger": TRIGGER,
    "eval": "eval --device cpu",
    "inspect": f"{INSPECT} --artifact {{weaver}}",
    "baseline-sft": BSFT,
    "baseline-grpo": BGRPO,
    "retrieval": RETRIEVAL,
}
CASES += across(DATA_READERS, [("unknown-task", "--data gsm8kk", "unknown task 'gsm8kk'")])


# -------------------------------------------------------------------------------- test
def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def guarded(monkeypatch, inputs):
    """No network, and no base model but the tiny one (never the embedded SmolLM2)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    resolve = base_module.resolve_source

    def only_tiny(name, *args, **kwargs):
        assert str(name) == str(inputs / "base"), f"a case loaded base {name!r}"
        return resolve(name, *args, **kwargs)

    monkeypatch.setattr(base_module, "resolve_source", only_tiny)


@pytest.mark.parametrize(("argv", "fragment"), CASES)
def test_bad_input_exits_2_with_one_message_and_writes_nothing(
    argv, fragment, inputs, guarded, tmp_path, monkeypatch
):
    names = {"inputs": inputs, "base": inputs / "base", "weaver": inputs / "weaver"}
    argv = [a.format(**names, **TINY) for a in argv]
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path), snapshot(inputs)

    result = CliRunner().invoke(app, argv, env={"COLUMNS": "300"})

    text = result.output  # stdout and stderr together
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in text, text
    assert result.exit_code == 2, text
    lines = [line for line in text.splitlines() if re.search(r"\berror\b", line, re.I)]
    assert len(lines) == 1, text  # one message
    if lines[0].startswith("error: "):  # ours
        assert fragment in lines[0], text
    else:  # Typer's usage error: a box titled Error, the message inside it
        assert "─ Error ─" in lines[0] and fragment in text, text
    assert (snapshot(tmp_path), snapshot(inputs)) == before, "the command wrote files"


def test_top_p_zero_samples_the_top_token():
    """--top-p 0 with a temperature kept no token at all (an IndexError in the sampler)."""
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    cfg = GenerationConfig(temperature=1.0, top_p=0.0)
    assert _pick(logits, cfg, torch.Generator().manual_seed(0)).tolist() == [1, 0]
