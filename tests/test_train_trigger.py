"""`memgen train-trigger`: the artifact, a frozen weaver, the penalty at work, resume, errors.

Fast tests train the trigger of a tiny weaver artifact (2-layer Llama, ``--base DIR``) on a
small GSM8K-format JSONL; the tiny model never answers right, so the task reward is 0 and the
sparsity penalty alone moves the head. The core's golden values are in test_trigger_rl.py.
The slow ones use the embedded SmolLM2 model and torchrun.
"""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import distributed as dist
from torch import multiprocessing as mp

from helpers import invoke, rows, torchrun, write_jsonl
from memgen_cli.artifacts import FORMAT_VERSION, artifact_digest, load_artifact
from memgen_cli.config import GenerationConfig, TriggerRLConfig, TriggerTrainingConfig
from memgen_cli.errors import MemgenError
from memgen_cli.models.trigger import Trigger
from memgen_cli.stages import train_trigger as stage
from memgen_cli.training.trigger_rl import (
    Decision,
    TriggerRollouts,
    decision_batch,
    init_head,
    trigger_rollout,
    trigger_update,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "train-trigger.yaml"
WEAVER_FILES = ("weaver.safetensors", "weaver/adapter_model.safetensors")
# Sampled tokens and longer answers: tiny models then hit many clause boundaries.
SAMPLED = ["training.temperature=1.0", "training.max_completion_length=32"]

# What a two-step run with completions logged every step writes: the artifact's exact file set.
ARTIFACT_FILES = {
    "memgen.json",
    "recipe.yaml",
    "metrics.jsonl",
    "trigger.safetensors",
    "weaver.safetensors",
    "weaver/adapter_config.json",
    "weaver/adapter_model.safetensors",
    "completions/step_00001.jsonl",
    "completions/step_00002.jsonl",
}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny_weaver, tmp_path_factory):
    """(base_dir, weaver artifact, data file): conftest's tiny_weaver and problems of its own."""
    # Answers of 4+ digits: a tiny model's bytes never hit one, so the task reward is 0.
    problems = [
        {"question": f"What is {a}000 + {a}007?", "answer": f"#### {2 * a}007"}
        for a in range(1, 13)
    ]
    return (*tiny_weaver, write_jsonl(tmp_path_factory.mktemp("tiny") / "train.jsonl", problems))


def cfg_for(tiny, out: Path, *sets):
    base, art, data = tiny
    return stage.resolve_config(
        TINY, [*SAMPLED, *sets], artifact=art, base=str(base), data=str(data), output=out
    )


def mean_probability(artifact: Path, base: Path) -> float:
    """The trained head's mean INVOKE probability over fresh rollouts' decision states."""
    from memgen_cli.models.base import load_base

    model, _, _ = load_artifact(artifact, load_base(str(base), device="cpu"))
    msgs = [[{"role": "user", "content": f"What is {a} + {a}?"}] for a in range(4)]
    cfg = GenerationConfig(max_new_tokens=32, temperature=1.0, seed=99, memory="full")
    b = decision_batch(trigger_rollout(model, msgs, cfg, 4))
    with torch.no_grad():
        p = model.trigger.probability(b["states"])
    assert b["mask"].sum() >= 10
    return float((p * b["mask"]).sum() / b["mask"].sum())


def cli(*args):
    return invoke("train-trigger", *args)


def test_cli_writes_a_trigger_artifact_with_the_weaver_unchanged(tiny, tmp_path):
    base, art, data = tiny
    out = tmp_path / "out"
    sets = [f"--set={s}" for s in SAMPLED]
    result = cli(
        "--recipe", TINY, "--artifact", art, "--base", base, "--data", data, "--output", out, *sets
    )
    assert result.exit_code == 0, result.output
    assert "invocation rate" in result.output
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == ARTIFACT_FILES
    for name in WEAVER_FILES:  # the weaver is frozen: bit-identical tensors
        a, b = load_file(art / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["kind"] == "memgen" and manifest["trigger"]["trained"]
    assert manifest["parent"] == {"name": str(art), "sha256": artifact_digest(art)}
    assert manifest["training"]["stage"] == "train-trigger"
    logged = rows(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3]
    for key in ("reward", "penalty", "invocation_rate", "p_bar", "entropy", "clip_ratio"):
        assert key in logged[0], key
    decisions = [d for r in rows(out / "completions/step_00001.jsonl") for d in r["decisions"]]
    assert decisions and all(0 < d["prob"] < 1 and "invoke" in d for d in decisions)
    model, _, _ = load_artifact(out, device="cpu", allow_base_mismatch=True)
    assert model.trigger.is_trained
    assert not (tmp_path / "out.checkpoints").exists()


def test_a_large_penalty_lowers_the_invocation_rate(tiny, tmp_path):
    base = tiny[0]
    sets = ["training.max_steps=6", "training.learning_rate=0.05", "training.seed=1"]
    none = stage.run(cfg_for(tiny, tmp_path / "none", *sets, "trigger.penalty=0"))
    large = stage.run(cfg_for(tiny, tmp_path / "large", *sets, "trigger.penalty=5"))
    # Task reward is 0 for every rollout: without the penalty all advantages are 0 and the
    # head stays at its start (0.5); with it, invocations are punished.
    assert mean_probability(none, base) == pytest.approx(0.5, abs=1e-6)
    assert mean_probability(large, base) < 0.3
    logged = rows(large / "metrics.jsonl")
    assert all(r["penalty"] >= 0 for r in logged) and any(r["penalty"] > 0 for r in logged)
    assert logged[-1]["invocation_rate"] < logged[0]["invocation_rate"]


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny, tmp_path):
    sets = ["training.max_steps=4", "training.save_steps=10"]
    straight = stage.run(cfg_for(tiny, tmp_path / "a", *sets))

    def ctrl_c(step, metrics):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    cfg = cfg_for(tiny, tmp_path / "b", *sets)
    with pytest.raises(stage.TrainingInterrupted) as stop:
        stage.run(cfg, callbacks=[ctrl_c])
    assert stop.value.checkpoint.name == "checkpoint-2"
    assert not Path(cfg.output).exists()
    with pytest.raises(Exception, match="--resume auto"):
        stage.run(cfg)
    resumed = stage.run(cfg, resume="auto")
    a, b = load_file(straight / "trigger.safetensors"), load_file(resumed / "trigger.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    before, after = rows(straight / "metrics.jsonl"), rows(resumed / "metrics.jsonl")
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    for key in ("reward", "invocation_rate", "grad_norm"):
        assert [r[key] for r in after] == [r[key] for r in before], key


def baseline_like(path: Path) -> Path:
    path.mkdir()
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "baseline",
        **{k: {} for k in ("reasoner", "lora", "tensors", "prompt")},
    }
    (path / "memgen.json").write_text(json.dumps(manifest))
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (path / name).write_text("{}")
    return path


def test_bad_input_exits_2_with_one_message_and_writes_nothing(tiny, tmp_path):
    base, art, data = tiny
    no_weaver = tmp_path / "no-weaver"
    no_weaver.mkdir()
    for p in art.rglob("*"):
        if p.is_file() and p.name != "weaver.safetensors":
            (no_weaver / p.relative_to(art)).parent.mkdir(parents=True, exist_ok=True)
            (no_weaver / p.relative_to(art)).write_bytes(p.read_bytes())
    baseline = baseline_like(tmp_path / "baseline")
    common = ["--recipe", TINY, "--base", base, "--data", data]
    out = tmp_path / "out"
    cases = [
        ([], "needs --artifact DIR"),
        (["--artifact", tmp_path / "nowhere"], "does not exist"),
        (["--artifact", no_weaver], "incomplete: missing weaver.safetensors"),
        (["--artifact", baseline], "is a LoRA baseline"),
        (["--artifact", art, "--set", "training.num_generations=1"], "must be >= 2"),
        (["--artifact", art, "--set", "training.batch_size=6"], "must be a multiple"),
        (["--artifact", art, "--set", "trigger.initial_rate=1"], "initial_rate must be in (0, 1)"),
        (
            ["--artifact", art, "--set", "trigger.reference=best"],
            "trigger.reference must be one of median, successful",
        ),
        (["--artifact", art, "--set", "trigger.penalti=1"], 'Did you mean "penalty"'),
    ]
    for extra, message in cases:
        result = cli(*common, *extra, "--output", out)
        assert result.exit_code == 2, (extra, result.output)
        assert message in " ".join(result.output.split()), (extra, result.output)
        assert "Traceback" not in result.output
        assert not out.exists() and not (tmp_path / "out.checkpoints").exists()


def test_prompts_per_step_must_split_evenly_over_the_processes(tiny, tmp_path):
    cfg = cfg_for(tiny, tmp_path / "o", "training.batch_size=12")  # G=4: 3 prompts per step
    with pytest.raises(MemgenError) as error:
        stage.validate(cfg, None, world_size=2)
    assert str(error.value) == (
        "3 prompts per step (training.batch_size 12 / training.num_generations 4) do not split "
        "evenly over 2 processes; set training.batch_size to a multiple of 8, e.g. --set "
        "training.batch_size=16, or change --nproc_per_node."
    )
    stage.validate(cfg_for(tiny, tmp_path / "o", "training.batch_size=8"), None, world_size=2)


# ---------------------------------------------------------------------- several processes
def synthetic_head() -> tuple[Trigger, torch.Generator]:
    torch.manual_seed(0)  # nn.Linear's bias: the same start in every process
    gen = torch.Generator().manual_seed(0)
    head = Trigger(8, hidden=16)
    init_head(head, 0.4)
    with torch.no_grad():
        head.head[0].weight.normal_(generator=gen)
    return head, gen


def synthetic_update(rows: range, loss_type: str, out: Path) -> None:
    """``trigger_update`` on the given rows of a fixed synthetic batch (16 rollouts, G=4);
    writes the head and the metrics as JSON."""
    head, gen = synthetic_head()
    widths = torch.randint(0, 6, (16,), generator=gen).tolist()  # rows 0..: some without any
    states = [torch.randn(w, 8, generator=gen) for w in widths]
    acts = [(torch.rand(w, generator=gen) < 0.5).tolist() for w in widths]
    task_r = (torch.rand(16, generator=gen) < 0.5).float()
    roll = TriggerRollouts(
        group_size=4,
        completion_ids=[[1] * (3 + i) for i in rows],
        finished=[True] * len(rows),
        decisions=[
            [Decision(j, 7, 0.4, a, -0.9 + 0.1 * j) for j, a in enumerate(acts[i])] for i in rows
        ],
        states=[states[i] for i in rows],
    )
    t = TriggerTrainingConfig(
        num_generations=4, loss_type=loss_type, scale_rewards="batch", num_iterations=2
    )
    opt = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    tr = TriggerRLConfig(penalty=0.3, entropy_coef=0.01)
    m, _ = trigger_update(head, roll, task_r[list(rows)], opt, sched, t, tr)
    flat = torch.cat([p.detach().flatten() for p in head.parameters()]).tolist()
    out.write_text(json.dumps({"head": flat, "metrics": m}))


LOSS_TYPES = ("bnpo", "grpo", "dr_grpo", "dapo")


def _worker(rank: int, port: int, folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for loss_type in LOSS_TYPES:
            rows = range(8 * rank, 8 * rank + 8)
            synthetic_update(rows, loss_type, folder / f"{loss_type}-rank{rank}.json")
    finally:
        dist.destroy_process_group()


def test_two_processes_update_the_head_as_one_process_with_all_groups(tmp_path):
    """Halves of a batch on two gloo processes: the same step, and the same metrics, as the
    whole batch on one (batch-std advantages, every loss type's normaliser, entropy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the loaded modules instead of importing the CLI again
    mp.start_processes(_worker, args=(port, tmp_path), nprocs=2, start_method="fork")
    start = torch.cat([p.detach().flatten() for p in synthetic_head()[0].parameters()])
    for loss_type in LOSS_TYPES:
        synthetic_update(range(16), loss_type, tmp_path / f"{loss_type}-one.json")
        one, *two = (
            json.loads((tmp_path / f"{loss_type}-{n}.json").read_text())
            for n in ("one", "rank0", "rank1")
        )
        assert two[0]["head"] == two[1]["head"], loss_type  # bit-identical on every process
        assert two[0]["head"] == pytest.approx(one["head"], abs=1e-6), loss_type
        assert one["head"] != pytest.approx(start.tolist(), abs=1e-4)  # it did move
        for key, value in one["metrics"].items():
            assert two[0]["metrics"][key] == pytest.approx(value, abs=1e-6), (loss_type, key)


# ------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_tiny_recipe_on_the_embedded_model(tmp_path):
    """A weaver artifact on the embedded model (untrained weaver), then two trigger steps."""
    from memgen_cli.artifacts import save_artifact
    from memgen_cli.config import MemoryConfig
    from memgen_cli.models.base import load_base
    from memgen_cli.models.memgen import MemGenModel

    base = load_base("smollm2-135m", device="cpu")
    memory = MemoryConfig(prompt_latents=2, inference_latents=2, max_inference_insertions=2)
    art = save_artifact(MemGenModel(base.model, base.tokenizer, memory), base, tmp_path / "w")
    sets = ["training.max_steps=2", "training.batch_size=4", "training.num_generations=2"]
    sets += ["training.max_completion_length=12"]
    result = cli(
        "--recipe",
        TINY,
        "--artifact",
        art,
        "--output",
        tmp_path / "out",
        *(f"--set={s}" for s in sets),
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "memgen.json").read_text())
    assert manifest["trigger"]["trained"] and manifest["reasoner"]["name"] == "smollm2-135m"
    logged = rows(tmp_path / "out" / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2]
    assert any(r["decisions_per_completion"] > 0 for r in logged), logged  # the head was asked


@pytest.mark.slow
def test_two_process_torchrun_writes_one_artifact(tiny, tmp_path):
    base, art, data = tiny
    out = tmp_path / "out"
    sets = [f"--set={s}" for s in [*SAMPLED, "training.max_steps=2"]]
    args = ["train-trigger", "--recipe", TINY, "--artifact", art, "--base", base]
    proc = torchrun([*args, "--data", data, "--output", out, *sets], cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert proc.stdout.count("invocation rate") == 1  # one summary: rank 0's
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert files == ARTIFACT_FILES
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    for name in WEAVER_FILES:  # the weaver is frozen: bit-identical tensors
        a, b = load_file(art / name), load_file(out / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["training"]["world_size"] == 2 and manifest["trigger"]["trained"]
    assert manifest["parent"] == {"name": str(art), "sha256": artifact_digest(art)}
    logged = rows(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2] and {r["world_size"] for r in logged} == {2}
    # batch_size 8, G=4: 2 prompts per step, one per process; the log holds both groups.
    shown = rows(out / "completions" / "step_00001.jsonl")
    assert len(shown) == 8 and [r["group"] for r in shown] == [0] * 4 + [1] * 4
    model, _, _ = load_artifact(out, device="cpu", allow_base_mismatch=True)
    assert model.trigger.is_trained


def test_eval_and_generate_use_the_trained_trigger(tiny, tmp_path):
    base, _, data = tiny
    sets = ["training.max_steps=6", "training.learning_rate=0.05", "trigger.penalty=5"]
    art = stage.run(cfg_for(tiny, tmp_path / "trig", *sets))
    args = ["eval", "--data", data, "--artifact", art, "--base", base, "--limit", 8]
    args += ["--memory", "off,weaver,full", "--max-new-tokens", 32, "--json"]
    result = invoke(*args, "--output", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    by_mode = {r["mode"]: r for r in report["results"]}
    assert set(by_mode) == {"off", "weaver", "full"}
    assert by_mode["full"]["mean_insertions"] < by_mode["weaver"]["mean_insertions"]
    assert all(by_mode[m]["tokens_per_s"] for m in by_mode)
    answers = {}
    for mode in ("weaver", "full"):
        gen = ["generate", "What is 1000 + 1007?", "--artifact", art, "--base", base]
        gen += ["--memory", mode, "--max-new-tokens", 32, "--json"]
        result = invoke(*gen)
        assert result.exit_code == 0, result.output
        answers[mode] = json.loads(result.stdout)
    kinds = {m: [i["kind"] for i in a["insertions"]] for m, a in answers.items()}
    assert "inference" in kinds["weaver"] and kinds["full"] == ["prompt"]  # the trigger skips
    skipped = answers["full"]["skipped"]  # ... and says where, with its probability
    assert skipped and all(s["trigger_prob"] < 0.5 for s in skipped)
    assert answers["weaver"]["skipped"] == []
    chat = ["generate", "--interactive", "--artifact", art, "--base", base, "--memory", "full"]
    chat += ["--max-new-tokens", 32]
    result = invoke(*chat, input="What is 1000 + 1007?\n/trace\n")
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output  # /trace lists the boundaries the trigger skipped


def test_default_prompts_are_a_third_of_the_split_without_the_weavers(tiny, tmp_path):
    _, _, data = tiny  # 12 problems, in file order
    cfg = cfg_for(tiny, tmp_path / "o", "data.size=null")
    questions = [json.loads(x)["question"] for x in data.read_text().splitlines()]
    seen = {"data": str(data), "split": "train", "samples": 5, "heldout_samples": 1}
    _, train, _, excluded = stage.select_examples(cfg, {"training": seen})
    assert excluded == 6 and [e.question for e in train] == questions[6:10]  # 12 // 3 = 4
    # An artifact trained on another task (or recording nothing) excludes nothing.
    _, train, _, excluded = stage.select_examples(cfg, {"training": {"data": "gsm8k"}})
    assert excluded == 0 and [e.question for e in train] == questions[:4]
