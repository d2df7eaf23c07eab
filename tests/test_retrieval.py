"""`memgen baseline retrieval`: the experience store (exactly the training samples, never a
held-out one), deterministic retrieval, the artifact's round trip, its place in eval and generate
(a row per artifact on the same problems, retrieved ids recorded, --retrieval beside a weaver),
its refusal where a weaver is required, and bad input at answer time (bad input to the build
is in test_bad_input).

Every test runs on the tiny Llama of conftest (``tiny_base``) and its weaver (``tiny_weaver``).
"""

from __future__ import annotations

import doctest
import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from rich.console import Console
from safetensors.torch import load_file

from helpers import WORKED, files, invoke, rows, write_jsonl, write_problems
from memgen_cli.artifacts import load_artifact, load_baseline
from memgen_cli.config import GenerationConfig, MemoryConfig, load_recipe
from memgen_cli.errors import MemgenError
from memgen_cli.generation import encode_prompts, generate
from memgen_cli.models.base import load_base
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.retrieval import (
    Experience,
    build,
    load_retrieval,
    open_shots,
    prompt,
    with_examples,
)
from memgen_cli.retrieval.config import RetrievalConfig
from memgen_cli.stages import retrieval as stage
from memgen_cli.training.sft_data import target_text, tokenize_samples
from memgen_cli.training.sft_run import load_examples

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny" / "sft-weaver.yaml"  # a weaver's recipe, as it stands
EMBED_FILES = {"memgen.json", "recipe.yaml", "store.jsonl", "index.faiss", "embeddings.safetensors"}
BM25_FILES = {"memgen.json", "recipe.yaml", "store.jsonl"} | {
    f"bm25/{name}"
    for name in (
        "params.index.json",
        "vocab.index.json",
        "data.csc.index.npy",
        "indices.csc.index.npy",
        "indptr.csc.index.npy",
    )
}
# Questions the stores below never hold: the eval and generate problems.
NEW = [f"What is {a} + {a + 2}?" for a in (3, 40, 7, 1)]

pytestmark = pytest.mark.usefixtures("one_thread")
quiet = Console(file=open(os.devnull, "w"))


def config(base: Path, data: Path, out: Path, *sets: str, **flags) -> RetrievalConfig:
    return stage.resolve_config(
        RECIPE, list(sets), base=str(base), data=str(data), output=out, **flags
    )


def plain(base: Path) -> MemGenModel:
    """The reasoner as eval runs it without memory."""
    loaded = load_base(str(base), "cpu")
    return MemGenModel(loaded.model, loaded.tokenizer, MemoryConfig()).eval()


def ids(hits) -> list[list[str]]:
    return [[h.experience.id for h in row] for row in hits]


@pytest.fixture(scope="module")
def built(tiny_weaver, tmp_path_factory) -> dict:
    """Stores of 12 worked problems on the tiny base (data.size 6, 2 held out: the tiny
    recipe's): embed with k 2, bm25 with k 3; and the weaver on the same base."""
    base, weaver = tiny_weaver
    tmp = tmp_path_factory.mktemp("retrieval")
    data = write_problems(tmp / "train.jsonl", 12, WORKED)
    embed = stage.run(config(base, data, tmp / "embed", k=2), console=quiet)
    bm25 = stage.run(config(base, data, tmp / "bm25", k=3, similarity="bm25"), console=quiet)
    test = write_jsonl(tmp / "test.jsonl", [{"question": q, "answer": "#### 0"} for q in NEW])
    return {"base": base, "weaver": weaver, "data": data, "embed": embed, "bm25": bm25,
            "test": test, "tmp": tmp}  # fmt: skip


# ------------------------------------------------------------------------------- the store
def test_the_store_holds_exactly_the_training_samples_and_never_a_heldout_one(tiny_base, tmp_path):
    # File data: 12 problems, the third with a solution too long for data.max_length (SFT
    # drops it), 8 for training and 3 held out.
    problems = [
        {"question": f"What is {a} + {a + 1}?", "answer": f"Add.\n#### {2 * a + 1}"}
        for a in range(12)
    ]
    problems[2]["answer"] = "Add. " * 60 + "\n#### 5"
    data = write_jsonl(tmp_path / "train.jsonl", problems)
    sets = ["data.size=8", "data.heldout=3", "data.max_length=120"]
    cfg = config(tiny_base, data, tmp_path / "out", *sets)
    out = stage.run(cfg, console=quiet)
    _, train, held, _ = load_examples(cfg)
    tok = load_base(str(tiny_base), "cpu").tokenizer
    kept = [
        ex
        for ex in train
        if tokenize_samples(tok, [ex], "", None, 120)[0]  # what SFT trains on, sample by sample
    ]
    assert len(kept) == 7 and len(tokenize_samples(tok, train, "", None, 120)[0]) == 7
    store = rows(out / "store.jsonl")
    assert [r["id"] for r in store] == [ex.id for ex in kept]
    assert [r["solution"] for r in store] == [target_text(ex) for ex in kept]
    assert not {r["id"] for r in store} & {ex.id for ex in held}
    assert not {r["question"] for r in store} & {ex.question for ex in held}
    training = json.loads((out / "memgen.json").read_text())["training"]
    assert (training["samples"], training["dropped_too_long"], training["heldout_samples"]) == (
        7,
        1,
        3,
    )

    # A generated task: the recipe's training seed range, the held-out items after it.
    cfg = config(
        tiny_base, "gym:basic_arithmetic", tmp_path / "gym", "data.size=10", "data.heldout=4"
    )
    out = stage.run(cfg, console=quiet)
    task, train, held, seed = load_examples(cfg)
    store = rows(out / "store.jsonl")
    assert [r["id"] for r in store] == [ex.id for ex in train] and len(store) == 10
    assert not {r["id"] for r in store} & {ex.id for ex in held}
    manifest = json.loads((out / "memgen.json").read_text())
    assert manifest["training"]["data_seed"] == seed == task.train_seed
    assert manifest["training"]["task"] == "gym:basic_arithmetic"


def test_retrieval_is_deterministic_with_ties_in_store_order(built):
    model = plain(built["base"])
    experiences = [
        Experience(r["id"], r["question"], r["solution"], r["answer"])
        for r in rows(built["embed"] / "store.jsonl")
    ]
    questions = [e.question for e in experiences] + NEW
    for similarity in ("embed", "bm25"):
        a = build(model, experiences, similarity)
        b = build(model, experiences, similarity)
        first, again, other = a.search(model, questions, 3), a.search(model, questions, 3), b.search(model, questions, 3)  # fmt: skip
        assert ids(first) == ids(again) == ids(other)
        assert [[h.score for h in r] for r in first] == [[h.score for h in r] for r in other]
        for row in first:  # best first
            assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        # A stored question finds itself first.
        assert [row[0].experience.id for row in first[: len(experiences)]] == [
            e.id for e in experiences
        ]
        # The same question twice in the store: the earlier entry first, whatever the index.
        twins = [*experiences, Experience("twin", experiences[0].question, "s", "a")]
        hits = build(model, twins, similarity).search(model, [experiences[0].question], 2)[0]
        assert [h.experience.id for h in hits] == [experiences[0].id, "twin"]
        assert hits[0].score == pytest.approx(hits[1].score)
        # An empty question matches nothing: the store's first entries, in order.
        assert ids(a.search(model, ["", NEW[0]], 2))[0] == [e.id for e in experiences[:2]]
    # k larger than the store: the whole store, ranked.
    assert len(a.search(model, NEW[:1], 50)[0]) == len(experiences)


# ---------------------------------------------------------------------------- the artifact
def test_the_artifact_round_trips_with_the_same_top_k(built):
    model = plain(built["base"])
    for name, expected in (("embed", EMBED_FILES), ("bm25", BM25_FILES)):
        out = built[name]
        assert files(out) == expected
        manifest = json.loads((out / "memgen.json").read_text())
        assert manifest["kind"] == "retrieval" and manifest["retrieval"]["similarity"] == name
        assert manifest["retrieval"]["k"] == (2 if name == "embed" else 3)
        assert manifest["retrieval"]["method"] == "expel" and manifest["retrieval"]["size"] == 6
        assert manifest["prompt"]["examples"] == prompt.PROMPT_FORMAT
        assert load_recipe(RetrievalConfig, out / "recipe.yaml").retrieval.similarity == name
        retriever, _ = load_retrieval(out)
        experiences = retriever.experiences
        fresh = build(model, experiences, name)
        k = manifest["retrieval"]["k"]
        loaded, made = retriever.search(model, NEW, k), fresh.search(model, NEW, k)
        assert ids(loaded) == ids(made) and all(len(r) == k for r in loaded)
        scores = [[h.score for h in r] for r in loaded], [[h.score for h in r] for r in made]
        assert np.allclose(*scores, atol=1e-6)
    # The index is faiss's own file format, the vectors safetensors: no pickle anywhere.
    index = faiss.read_index(str(built["embed"] / "index.faiss"))
    vectors = load_file(built["embed"] / "embeddings.safetensors")["embeddings"]
    assert index.ntotal == vectors.shape[0] == 6 and index.d == vectors.shape[1] == 32
    assert np.allclose(np.linalg.norm(vectors.numpy(), axis=1), 1.0, atol=1e-5)
    assert not list(built["embed"].rglob("*.pkl")) and not list(built["bm25"].rglob("*.pkl"))


def test_examples_are_chat_turns_most_similar_last(built):
    result = doctest.testmod(prompt)
    assert result.attempted > 0 and result.failed == 0
    model = plain(built["base"])
    shots = open_shots(built["embed"], load_base(str(built["base"]), "cpu"))
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": NEW[0]}]
    [framed], [found] = shots.frame(model, [question], [NEW[0]], "Box it.")
    hits = shots.retriever.search(model, [NEW[0]], 2)[0]
    assert found == [h.experience.id for h in hits]
    assert [m["role"] for m in framed] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert framed[1]["content"] == f"{hits[1].experience.question}\nBox it."  # least similar first
    assert framed[4]["content"] == hits[0].experience.solution
    assert framed[-1] == question[-1]
    assert with_examples(question, [], "") == question


# ----------------------------------------------------------------------------- eval, generate
def test_eval_writes_one_row_per_artifact_on_the_same_problems(built, tmp_path):
    weaver, embed, test = built["weaver"], built["embed"], built["test"]
    result = invoke(
        "eval", "--artifact", f"{weaver},{embed}", "--data", test, "--memory", "weaver",
        "--max-new-tokens", 6, "--batch-size", 3, "--output", tmp_path / "ev", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    keys = [(r["artifact"], r["mode"]) for r in got["results"]]
    assert keys == [(str(weaver), "weaver"), (str(embed), "off")]
    assert got["config"]["artifacts"][1]["kind"] == "retrieval"
    assert got["results"][1]["retrieval_s"] >= 0 and "retrieval_s" not in got["results"][0]
    preds = rows(tmp_path / "ev" / "predictions.jsonl")
    by = {key: [p for p in preds if (p["artifact"], p["mode"]) == key] for key in keys}
    assert [p["index"] for p in by[keys[0]]] == [p["index"] for p in by[keys[1]]] == [0, 1, 2, 3]
    assert [p["id"] for p in by[keys[0]]] == [p["id"] for p in by[keys[1]]]
    assert all("retrieved" not in p for p in by[keys[0]])
    store = {r["id"]: r for r in rows(embed / "store.jsonl")}
    model = plain(built["base"])
    shots = open_shots(embed, load_base(str(built["base"]), "cpu"))
    assert [p["retrieved"] for p in by[keys[1]]] == ids(shots.retriever.search(model, NEW, 2))
    assert all(set(p["retrieved"]) <= set(store) for p in by[keys[1]])
    # The retrieval row is the plain reasoner answering after exactly those examples (greedy).
    messages = [
        with_examples(
            [{"role": "user", "content": q}], shots.retriever.search(model, [q], 2)[0], ""
        )
        for q in NEW
    ]
    enc = encode_prompts(model.tokenizer, messages, "cpu")
    out = generate(
        model, enc["input_ids"], enc["attention_mask"], GenerationConfig(6, memory="off")
    )
    completions = [model.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]
    assert [p["completion"] for p in by[keys[1]]] == completions

    # --retrieval: the weaver again with the examples, memory woven on top; same problems.
    result = invoke(
        "eval", "--artifact", weaver, "--retrieval", embed, "--data", test, "--max-new-tokens", 6,
        "--output", tmp_path / "both", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    keys = [(r["artifact"], r["mode"]) for r in json.loads(result.stdout)["results"]]
    both = f"{weaver}+{embed}"
    assert keys == [(str(weaver), "off"), (str(weaver), "weaver"), (both, "off"), (both, "weaver")]
    preds = rows(tmp_path / "both" / "predictions.jsonl")
    woven = [p for p in preds if p["artifact"] == both and p["mode"] == "weaver"]
    assert [p["index"] for p in woven] == [0, 1, 2, 3]
    assert [p["retrieved"] for p in woven] == [p["retrieved"] for p in by[(str(embed), "off")]]
    assert all(p["insertions"] for p in woven)  # the weaver wove: the prompt latents at least


def test_generate_answers_after_the_retrieved_examples(built, tmp_path):
    result = invoke(
        "generate", NEW[0], "--artifact", built["bm25"], "--max-new-tokens", 4, "--json"
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["memory"] == "off" and len(answer["retrieved"]) == 3
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in NEW[:2]])
    result = invoke(
        "generate", "--input", tmp_path / "q.jsonl", "--output", tmp_path / "a.jsonl",
        "--artifact", built["weaver"], "--retrieval", built["embed"], "--max-new-tokens", 4,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    answers = rows(tmp_path / "a.jsonl")
    assert [len(a["retrieved"]) for a in answers] == [2, 2]
    assert all(a["memory"] == "weaver" and a["insertions"] for a in answers)


# ---------------------------------------------------------------- refusals and bad input
def one_error(result, *fragments: str) -> str:
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and text.count("error:") == 1, result.output
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    return text


def test_a_retrieval_artifact_is_refused_where_a_weaver_is_required(built, tmp_path):
    embed = built["embed"]
    with pytest.raises(MemgenError, match="is a retrieval artifact .* not a weaver"):
        load_artifact(embed, device="cpu")
    with pytest.raises(MemgenError, match="not a LoRA baseline"):
        load_baseline(embed, device="cpu")
    recipes = ROOT / "recipes" / "tiny"
    cases = [
        ("train-trigger", "--recipe", recipes / "train-trigger.yaml", "--artifact", embed),
        ("grpo-weaver", "--recipe", recipes / "grpo-weaver.yaml", "--init", embed),
    ]
    for case in cases:
        result = invoke(*case, "--base", built["base"], "--output", tmp_path / "out")
        one_error(result, "is a retrieval artifact", "`memgen sft-weaver`")
        assert not (tmp_path / "out").exists()
    result = invoke("inspect-memory", "--artifact", embed, "--prompt", "Hi?")
    one_error(result, "is a retrieval artifact", "`memgen sft-weaver`")
    lora = ("baseline", "grpo", "--recipe", recipes / "baseline-grpo.yaml", "--init", embed)
    result = invoke(*lora, "--base", built["base"], "--output", tmp_path / "out")
    one_error(result, "kind retrieval, from `memgen baseline retrieval`", "`memgen baseline sft`")
    assert not (tmp_path / "out").exists()


def test_bad_artifacts_and_flags_at_answer_time(built, tmp_path):
    def damaged(name: str, damage) -> Path:
        copy = shutil.copytree(built["embed"], tmp_path / name)
        damage(copy)
        return copy

    test, weaver = built["test"], built["weaver"]
    cases = [
        (damaged("no-index", lambda d: (d / "index.faiss").unlink()), "is incomplete: missing index.faiss"),
        (damaged("no-store", lambda d: (d / "store.jsonl").unlink()), "missing store.jsonl"),
        (damaged("bad-index", lambda d: (d / "index.faiss").write_bytes(b"junk")), "index.faiss is not a readable faiss index"),
        (damaged("short-store", lambda d: (d / "store.jsonl").write_text('{"id": "a", "question": "q", "solution": "s", "answer": "1"}\n')), "store.jsonl has 1 entries, memgen.json says 6"),
        (damaged("bad-line", lambda d: (d / "store.jsonl").write_text("{not json\n")), "line 1 is not a store entry"),
    ]  # fmt: skip
    for path, message in cases:
        result = invoke("eval", "--artifact", path, "--data", test, "--output", tmp_path / "ev")
        one_error(result, message)
        result = invoke("generate", "Hi?", "--artifact", path)
        one_error(result, message)
    assert not (tmp_path / "ev").exists()
    flags = [
        (["--artifact", built["embed"], "--memory", "weaver"], "retrieval artifacts have no memory"),
        (["--retrieval", built["embed"]], "give the weaver with --artifact"),
        (["--artifact", built["embed"], "--retrieval", built["embed"]], "no --artifact is a weaver"),
        (["--artifact", weaver, "--retrieval", weaver], "is a weaver artifact, not a retrieval artifact"),
    ]  # fmt: skip
    for extra, message in flags:
        result = invoke("eval", "--data", test, "--output", tmp_path / "ev", *extra)
        one_error(result, message)
        assert not (tmp_path / "ev").exists()


def test_output_is_replaced_only_with_overwrite(built, tmp_path):
    out = shutil.copytree(built["bm25"], tmp_path / "store")
    args = ["--recipe", RECIPE, "--base", built["base"], "--data", built["data"], "--output", out]
    one_error(invoke("baseline", "retrieval", *args), "pass --overwrite to replace it")
    result = invoke("baseline", "retrieval", *args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert files(out) == EMBED_FILES  # the recipe's default similarity replaced the bm25 store
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine\n")
    args[-1] = tmp_path / "mine"
    one_error(invoke("baseline", "retrieval", *args, "--overwrite"), "is not a memgen artifact")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine\n"


def test_a_weaver_recipe_writes_beside_the_weaver():
    cfg = stage.resolve_config(RECIPE, [])
    assert cfg.output == "runs/tiny/baseline-retrieval"
    assert stage.resolve_config(RECIPE, ["output=x/y"]).output == "x/y"
    settings = stage.resolve_config(RECIPE, ["retrieval.k=3"], k=4, similarity="bm25").retrieval
    assert (settings.k, settings.similarity, settings.method) == (4, "bm25", "expel")
