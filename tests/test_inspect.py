"""`memgen inspect-memory`: probes with golden values, ablations equal suppressed generations,
seeded clustering, a stable documented JSON schema, bad input, the HTML page in Chromium, and
the views of a `memory.inject: kv` memory against references built another way."""

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from typer.testing import CliRunner

from conftest import make_memgen, torch_threads
from helpers import checked_kv
from memgen_cli.artifacts import artifact_digest
from memgen_cli.cli import app
from memgen_cli.config import GenerationConfig
from memgen_cli.generation import encode_prompts, generate
from memgen_cli.inspection import clusters as C
from memgen_cli.inspection import probe as P
from memgen_cli.inspection import slots as S

runner = CliRunner()
SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "inspect-memory-schema.md"
QUESTION = "Hi there, what is 2+2?"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """conftest's one_thread for the whole module: its shared runs are made on one thread too."""
    with torch_threads(1):
        yield


def invoke(*args):
    return runner.invoke(app, ["inspect-memory", *map(str, args)], catch_exceptions=False)


def diverse(mg):
    """A random clause table (25% of the vocabulary), so answers hold several insertions."""
    g = torch.Generator().manual_seed(1)
    mg.delimiters = torch.rand(len(mg.delimiters), generator=g) < 0.25
    return mg


def answer(mg, max_new_tokens=40, text=QUESTION):
    enc = encode_prompts(mg.tokenizer, [[{"role": "user", "content": text}]], "cpu")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, memory="weaver")
    out = generate(mg, enc["input_ids"], enc["attention_mask"], gen, keep_logits=True)
    return enc, gen, out


# ------------------------------------------------------------------------------- probes
def test_nearest_token_of_a_token_embedding_is_that_token():
    mg = make_memgen("llama")
    vocab = P.vocab_of(mg)
    weight = mg.reasoner.get_input_embeddings().weight.detach()
    wanted = torch.tensor([5, 40, 77, 200])
    latents = weight[wanted] * torch.tensor([[1.0], [3.0], [0.5], [10.0]])  # cosine ignores scale
    ids, cos = P.nearest_tokens(latents, vocab, k=4)
    assert ids[:, 0].tolist() == wanted.tolist()
    torch.testing.assert_close(cos[:, 0], torch.ones(4), atol=1e-5, rtol=0)
    assert (cos[:, 1:] < 1 - 1e-4).all()
    assert vocab.decode(ids[:, 0]) == [mg.tokenizer.decode([i]) for i in wanted.tolist()]


def test_norm_percentiles_against_token_norms():
    mg = make_memgen("llama")
    vocab = P.vocab_of(mg)
    norms = vocab.sorted_norms
    unit = torch.zeros(3, mg.reasoner.config.hidden_size)
    unit[:, 0] = 1.0
    pct = P.norm_percentiles(
        unit * torch.tensor([[0.0], [float(norms[-1])], [10 * float(norms[-1])]]), vocab
    )
    assert pct.tolist() == [0.0, 100.0, 100.0]
    median = P.norm_percentiles(unit[:1] * norms[norms.numel() // 2], vocab)
    assert 45 <= float(median) <= 55


def test_teacher_forced_logprob_equals_what_the_generator_produced():
    mg = diverse(make_memgen("llama"))
    enc, _, out = answer(mg)
    found = out.trace.for_row(0)
    assert len(found) >= 3 and found[0].kind == "prompt"
    stream = P.build_stream(
        mg, enc["input_ids"][0].tolist(), out.tokens[0], P.emitted_eos(out), found
    )
    teacher = P.continuation_logprobs(mg, stream)
    produced = P.generated_logprobs(out)
    assert teacher.shape == produced.shape == (len(out.tokens[0]) + out.finished[0],)
    torch.testing.assert_close(teacher, produced, atol=1e-4, rtol=0)
    assert abs(float(teacher.sum() - produced.sum())) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_ablation_equals_generation_with_that_insertion_suppressed(kind):
    mg = diverse(make_memgen(kind))
    enc, gen, out = answer(mg)
    found = sorted(out.trace.for_row(0), key=lambda i: i.token_index)
    prompt = enc["input_ids"][0].tolist()
    stream = P.build_stream(mg, prompt, out.tokens[0], P.emitted_eos(out), found)
    ablated = P.ablated_generations(mg, prompt, gen, found)
    changed = 0
    for i, target in enumerate(found):
        alone = generate(
            mg,
            enc["input_ids"],
            enc["attention_mask"],
            gen,
            keep_logits=True,
            keep=P.suppress(target),
        )
        assert ablated.tokens[i] == alone.tokens[0]
        dropped = [x for x in alone.trace.insertions if not x.inserted]
        assert [(x.kind, x.token_index) for x in dropped] == [(target.kind, target.token_index)]
        t = target.token_index
        assert alone.tokens[0][:t] == out.tokens[0][:t]  # identical until the dropped point
        # The stream without chunk i predicts token t exactly as the suppressed run did.
        without = P.continuation_logprobs(mg, P.without(stream, mg, i))
        expected = torch.log_softmax(alone.step_logits[t][0], -1)[out.tokens[0][t]]
        torch.testing.assert_close(without[t], expected, atol=1e-4, rtol=0)
        changed += alone.tokens[0] != out.tokens[0]
    assert changed > 0  # the memory matters to this (random) model


def test_attention_mass_golden_and_eager_only_for_the_pass():
    mg = diverse(make_memgen("llama"))
    enc, _, out = answer(mg, max_new_tokens=20)
    found = sorted(out.trace.for_row(0), key=lambda i: i.token_index)
    stream = P.build_stream(
        mg, enc["input_ids"][0].tolist(), out.tokens[0], P.emitted_eos(out), found
    )
    before = mg.reasoner.config._attn_implementation
    with P.eager_attention(mg) as used:
        deep = P.deep_pass(mg, stream, layers=True)
    assert used == "eager" and mg.reasoner.config._attn_implementation == before
    size = stream.embeds.shape[1]
    layers = mg.reasoner.config.num_hidden_layers
    assert deep.attention.shape == (layers, size, size)
    torch.testing.assert_close(deep.attention.sum(-1), torch.ones(layers, size), atol=1e-5, rtol=0)
    assert len(deep.layers) == mg.reasoner.config.num_hidden_layers
    torch.testing.assert_close(deep.layers[-1], deep.hidden)
    # Golden: every row puts all its attention on stream position 0, except the last row,
    # which spreads it evenly; chunk 0 is the prompt insertion.
    fake = torch.zeros(size, size)
    fake[:, 0] = 1.0
    fake[-1] = 1.0 / size
    chunk = stream.chunk(0)
    answer_rows = stream.token_pos[stream.prompt_len : stream.prompt_len + stream.num_answer_tokens]
    got = P.attention_mass(fake, stream, 0)
    n = answer_rows.numel()
    last_is_answer = int(answer_rows[-1]) == size - 1
    expected = (len(chunk) / size if last_is_answer else 0.0) / n
    assert got["following_tokens"] == n
    assert got["mass"] == pytest.approx(expected, abs=1e-5)
    assert got["per_layer"] == [got["mass"]]  # one (S, S) map counts as one layer
    # Per layer: layer 0 as above, layer 1 all on the chunk's first position; mass is the mean.
    second = torch.zeros(size, size)
    second[:, chunk.start] = 1.0
    two = P.attention_mass(torch.stack([fake, second]), stream, 0)
    assert two["per_layer"] == pytest.approx([expected, 1.0], abs=1e-5)
    assert two["mass"] == pytest.approx((expected + 1.0) / 2, abs=1e-5)
    assert got["uniform"] == pytest.approx(
        float((len(chunk) / (answer_rows.float() + 1)).mean()), abs=1e-5
    )


# ----------------------------------------------------------------------------- clusters
def blobs(seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 16)) * 10
    return np.concatenate([c + rng.normal(size=(20, 16)) for c in centres]), np.repeat(
        [0, 1, 2], 20
    )


def test_clustering_is_deterministic_under_a_seed_and_finds_blobs():
    points, truth = blobs()
    a, b = C.kmeans(points, 3, seed=7), C.kmeans(points, 3, seed=7)
    assert (a.labels == b.labels).all() and np.array_equal(a.centroids, b.centroids)
    # k-means recovers the three blobs (up to renaming).
    assert len({(t, label) for t, label in zip(truth, a.labels, strict=True)}) == 3
    pa, pb = C.project(points, seed=7), C.project(points, seed=7)
    assert np.array_equal(pa.pca, pb.pca) and np.array_equal(pa.tsne, pb.tsne)
    assert pa.tsne.shape == (60, 2) and sum(pa.explained) <= 1.0


def test_drop_rules():
    mg = make_memgen("llama")
    vocab = P.vocab_of(mg)
    weight = mg.reasoner.get_input_embeddings().weight.detach().float()
    centroids = torch.stack([weight[10] + weight[11], -weight[10]]).numpy()
    at_centroid0 = torch.from_numpy(centroids[:1]).repeat(2, 1)
    assert C.drop_rule(centroids, vocab, 0)(at_centroid0)  # paper: centroid 0 is its top neighbour
    # A latent equal to token 50's embedding: with top=1 its nearest is token 50, not a centroid.
    assert not C.drop_rule(centroids, vocab, 0, top=1)(weight[50:51])
    assert not C.drop_rule(centroids, vocab, 1, top=5)(at_centroid0)
    assert C.drop_rule(centroids, vocab, 0, "nearest")(at_centroid0)
    assert not C.drop_rule(centroids, vocab, 1, "nearest")(at_centroid0)
    assert C.drop_rule(centroids, vocab, 1, "nearest")(-weight[10:11] * 2)


# ---------------------------------------------------------------------------------- CLI
TOP_KEYS = {
    "schema_version",
    "mode",
    "artifact",
    "base",
    "memory",
    "inject",
    "views",
    "generation",
    "prompt_suffix",
    "task",
    "top_k",
    "attention_implementation",
    "embedding_norms",
    "accuracy",
    "examples",
    "insertions",
    "skipped",
    "clusters",
    "drop_cluster",
    "episodes",
    "plots",
    "timings",
}
EXAMPLE_KEYS = {
    "index",
    "id",
    "question",
    "completion",
    "num_tokens",
    "finished",
    "answer",
    "gold",
    "correct",
    "segments",
}
INSERTION_KEYS = {
    "id",
    "example",
    "kind",
    "token_index",
    "relative_position",
    "text_before",
    "trigger_prob",
    "num_latents",
    "nearest_tokens",
    "nearest_cosines",
    "norms",
    "norm_percentiles",
    "logit_lens",
    "logit_lens_layers",
    "weaver_lens",
    "slot_norms",
    "attention",
    "ablation",
    "cluster",
    "correct",
    "turn",
}
VIEW_NAMES = {
    "nearest_tokens",
    "weaver_lens",
    "logit_lens",
    "norms",
    "slot_norms",
    "attention",
    "ablation",
    "clusters",
}
VIEW_KEYS = {"applies", "what", "why"}
ATTENTION_KEYS = {"mass", "per_latent", "per_layer", "uniform", "following_tokens"}
SLOT_NORM_KEYS = {"key_ratio", "value_ratio"}
ZERO_VALUES_KEYS = {"logprob", "delta_logprob"}
ABLATION_KEYS = {
    "logprob_with",
    "logprob_without",
    "delta_logprob",
    "completion_without",
    "answer_with",
    "answer_without",
    "answer_changed",
    "completion_changed",
    "zero_values",
}
CLUSTER_KEYS = {
    "k",
    "seed",
    "method",
    "inertia",
    "pca_explained_variance",
    "tsne_perplexity",
    "centroid_nearest_tokens",
    "stats",
    "points",
}
DROP_KEYS = {
    "cluster",
    "rule",
    "accuracy_with",
    "accuracy_without",
    "insertions_seen",
    "insertions_dropped",
    "answers_changed",
    "first_run",
    "rule_name",
    "warning",
}


def documented_keys() -> set[str]:
    """Every `name` quoted in a table row of the schema doc."""
    rows = [line for line in SCHEMA_DOC.read_text().splitlines() if line.startswith("|")]
    return {key for line in rows for key in re.findall(r"`(\w+)`", line)}


def documented_fields(key: str) -> set[str]:
    """The `names` that the schema doc's table row for `key` lists: the fields of that object."""
    (line,) = [x for x in SCHEMA_DOC.read_text().splitlines() if x.startswith(f"| `{key}` |")]
    return set(re.findall(r"`(\w+)`", line)) - {key}


TIMING_KEYS = documented_fields("timings")  # a time in seconds a step, as the doc lists them


@pytest.fixture(scope="module")
def artifact(tiny_weaver):
    return tiny_weaver  # K=3 prompt latents, 2 per inference insertion


@pytest.fixture(scope="module")
def prompt_run(artifact, tmp_path_factory):
    base, art = artifact
    out = tmp_path_factory.mktemp("prompt-run")
    before = artifact_digest(art)
    result = invoke(
        *("--artifact", art, "--base", base, "--prompt", QUESTION, "--max-new-tokens", 30),
        *("--layers", "--json", "--html", out / "report.html", "--output", out / "plots"),
    )
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), out, before


def test_prompt_json_has_the_documented_stable_keys(prompt_run, artifact):
    data, out, before = prompt_run
    assert set(data) == TOP_KEYS and data["schema_version"] == 4 and data["mode"] == "prompt"
    assert set(data["examples"][0]) == EXAMPLE_KEYS and set(data["timings"]) == TIMING_KEYS
    assert data["attention_implementation"] == "eager" and data["inject"] == "input"
    assert set(data["views"]) == VIEW_NAMES
    assert all(set(v) == VIEW_KEYS for v in data["views"].values())
    off = {name for name, v in data["views"].items() if not v["applies"]}
    assert off == {"weaver_lens", "slot_norms"}  # the kv-only views
    assert all(data["views"][name]["why"].startswith("memory.inject: kv only") for name in off)
    recs = data["insertions"]
    assert len(recs) >= 2 and recs[0]["kind"] == "prompt" and recs[1]["kind"] == "inference"
    for rec in recs:
        assert set(rec) == INSERTION_KEYS and set(rec["ablation"]) == ABLATION_KEYS
        assert rec["weaver_lens"] is rec["slot_norms"] is rec["ablation"]["zero_values"] is None
        assert set(rec["attention"]) == ATTENTION_KEYS and len(rec["attention"]["per_layer"]) == 2
        k = rec["num_latents"]
        assert len(rec["nearest_tokens"]) == k and all(
            len(row) == 5 for row in rec["nearest_tokens"]
        )
        assert all(isinstance(t, str) for row in rec["nearest_tokens"] for t in row)
        assert len(rec["norms"]) == len(rec["norm_percentiles"]) == len(rec["logit_lens"]) == k
        assert len(rec["logit_lens_layers"]) == 2 and all(
            len(layer) == k for layer in rec["logit_lens_layers"]
        )
        assert 0 <= rec["attention"]["mass"] <= 1
    # every ablation shares the same teacher-forced baseline; segments name every insertion
    assert len({r["ablation"]["logprob_with"] for r in recs}) == 1
    assert [s["insertion"] for s in data["examples"][0]["segments"] if "insertion" in s] == [
        r["id"] for r in recs
    ]
    documented = documented_keys()
    for group in (
        TOP_KEYS,
        EXAMPLE_KEYS,
        INSERTION_KEYS,
        ABLATION_KEYS,
        CLUSTER_KEYS,
        DROP_KEYS,
        TIMING_KEYS,
        VIEW_NAMES,
        VIEW_KEYS,
        ATTENTION_KEYS,
        SLOT_NORM_KEYS,
        ZERO_VALUES_KEYS,
    ):
        assert group <= documented, f"undocumented keys: {group - documented}"


def test_prompt_run_writes_files_and_never_touches_the_artifact(prompt_run, artifact):
    data, out, before = prompt_run
    assert artifact_digest(artifact[1]) == before == data["artifact"]["digest"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [
        "effects.png",
        "inspect.json",
        "latent_norms.png",
        "memgen-output.json",  # the marker that lets --overwrite recognise this output
    ]
    assert all(
        (out / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for n in ("effects.png", "latent_norms.png")
    )
    saved = json.loads((out / "plots" / "inspect.json").read_text())
    assert saved["insertions"] == data["insertions"]
    page = (out / "report.html").read_text()
    assert page.count('class="marker"') == len(data["insertions"])
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(
        r"""(src|href)=["']?(https?:)?//""", page
    )  # nothing fetched from a network


def test_terminal_view_shows_markers_and_one_table_per_insertion(artifact):
    base, art = artifact
    result = invoke("--artifact", art, "--base", base, "--prompt", QUESTION, "--max-new-tokens", 16)
    assert result.exit_code == 0, result.output
    assert "⟨mem 3 #0⟩" in result.output and "nearest tokens" in result.output
    assert result.output.count("trigger always") >= 2 and "Δlog-prob" in result.output
    assert "not applicable" not in result.output and "zero its values" not in result.output


def test_data_mode_clusters_and_drop_cluster(artifact, tmp_path):
    base, art = artifact
    rows = [{"question": f"Ann has {i} pens, and gets {i + 1}. How many?", "answer": f"#### {2 * i + 1}"} for i in range(6)]  # fmt: skip
    data_file = tmp_path / "mini.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = f"--artifact {art} --base {base} --data {data_file} --limit 6 --max-new-tokens 16 --clusters 3 --json".split()  # fmt: skip
    extra = (
        f"--drop-cluster 0 --drop-rule nearest --output {tmp_path / 'out'} --batch-size 4".split()
    )
    result = invoke(*args, *extra)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == TOP_KEYS and data["mode"] == "data" and len(data["examples"]) == 6
    assert set(data["clusters"]) == CLUSTER_KEYS and set(data["drop_cluster"]) == DROP_KEYS
    labels = [r["cluster"] for r in data["insertions"]]
    assert sorted(set(labels)) == [0, 1, 2]
    assert sum(s["size"] for s in data["clusters"]["stats"]) == len(labels)
    assert all(r["ablation"] is None and r["correct"] is not None for r in data["insertions"])
    drop = data["drop_cluster"]
    assert drop["insertions_dropped"] <= drop["insertions_seen"] and drop["rule_name"] == "nearest"
    # the nearest-centroid rule selects exactly the k-means cluster on the first run
    first = drop["first_run"]
    assert (
        first["rule_selects"]
        == first["rule_selects_in_cluster"]
        == first["cluster_size"]
        == labels.count(0)
    )
    assert drop["warning"] is None
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["cluster_stats.png", "clusters_pca.png", "clusters_tsne.png", "inspect.json", "latent_norms.png", "memgen-output.json"]  # fmt: skip
    again = json.loads(invoke(*args).stdout)
    assert [r["cluster"] for r in again["insertions"]] == labels  # seeded: the same clusters


# ----------------------------------------------------------------------------- bad input
def _fails(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_bad_input_gets_one_clear_message(artifact, tmp_path, monkeypatch):
    base, art = artifact
    before = artifact_digest(art)
    _fails(invoke("--prompt", "hi"), "needs --artifact DIR")
    no_weaver = tmp_path / "no-weaver"
    shutil.copytree(art, no_weaver)
    (no_weaver / "weaver.safetensors").unlink()
    incomplete = invoke("--artifact", no_weaver, "--base", base, "--prompt", "hi")
    _fails(  # as every command that reads an artifact words it
        incomplete,
        f"Artifact {no_weaver} is incomplete: missing weaver.safetensors. Copy the whole folder "
        "again if it was copied in part, or re-create the artifact.",
    )
    _fails(invoke("--artifact", tmp_path / "nowhere", "--prompt", "hi"), "does not exist")
    _fails(invoke("--artifact", art, "--base", base), "exactly one of --prompt")
    _fails(
        invoke("--artifact", art, "--base", base, "--prompt", "hi", "--drop-rule", "x"),
        "--drop-rule must be",
    )
    _fails(
        invoke("--artifact", art, "--base", base, "--prompt", "hi", "--drop-cluster", 0),
        "needs --data",
    )
    _fails(
        invoke("--artifact", art, "--prompt", "hi", "--html", art / "r.html"), "inside the artifact"
    )
    result = invoke(
        *("--artifact", art, "--base", base, "--prompt", "Hi, you."),
        *("--max-new-tokens", 8, "--clusters", 40),
    )
    _fails(result, "--clusters 40 is more than the")

    import memgen_cli.stages.inspect_memory as stage

    def weaves_nothing(*args, **kwargs):  # an artifact whose weaver never fires
        out = generate(*args, **kwargs)
        out.trace.insertions.clear()
        return out

    monkeypatch.setattr(stage, "generate", weaves_nothing)
    _fails(
        invoke("--artifact", art, "--base", base, "--prompt", "hi", "--max-new-tokens", 4),
        "No memory was inserted",
    )
    assert artifact_digest(art) == before


# -------------------------------------------------------------------------- headless page
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


@pytest.mark.skipif(
    not (CHROMIUM and DRIVER and HAVE_SELENIUM),
    reason="needs Chromium and its driver (apt-get install -y chromium chromium-driver) and "
    "selenium (pip install selenium)",
)
def test_html_page_in_headless_chromium(prompt_run, monkeypatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    data, out, _ = prompt_run
    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium look for drivers online
    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*BROWSER_FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=out)}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get((out / "report.html").as_uri())
        markers = driver.find_elements(By.CSS_SELECTOR, "button.marker")
        assert len(markers) == len(data["insertions"])
        assert not [
            d for d in driver.find_elements(By.CSS_SELECTOR, ".insertion") if d.is_displayed()
        ]
        for m in markers:
            m.click()
            shown = [
                d for d in driver.find_elements(By.CSS_SELECTOR, ".insertion") if d.is_displayed()
            ]
            assert [d.get_attribute("id") for d in shown] == [f"ins-{m.get_attribute('data-ins')}"]
            assert "nearest tokens" in shown[0].text and "drop it" in shown[0].text
            assert "active" in m.get_attribute("class")
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])"
        )
        assert len(sizes) == 2 and all(done and width > 300 for done, width in sizes)
        markers[-1].click()
        shot = out / "report-screenshot.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()


# --------------------------------------------------------------------------- embedded model
@pytest.mark.slow
def test_probes_on_the_embedded_model(tmp_path):
    from memgen_cli.config import MemoryConfig
    from memgen_cli.models.base import load_base
    from memgen_cli.models.memgen import MemGenModel

    torch.manual_seed(0)
    base = load_base(device="cpu")
    mg = MemGenModel(base.model, base.tokenizer, MemoryConfig(inference_latents=4)).eval()
    enc, _, out = answer(
        mg, max_new_tokens=24, text="Tom has 3 apples, and buys 4 more. How many apples?"
    )
    found = out.trace.for_row(0)
    stream = P.build_stream(
        mg, enc["input_ids"][0].tolist(), out.tokens[0], P.emitted_eos(out), found
    )
    teacher, produced = P.continuation_logprobs(mg, stream), P.generated_logprobs(out)
    assert abs(float(teacher.sum() - produced.sum())) < 1e-3  # 30 layers in float32
    vocab = P.vocab_of(mg)
    weight = mg.reasoner.get_input_embeddings().weight.detach()
    ids, _ = P.nearest_tokens(weight[[1000, 2000]], vocab, 3)
    assert ids[:, 0].tolist() == [1000, 2000]


@pytest.mark.slow
def test_kv_probes_on_the_embedded_model():
    """A kv weaver on SmolLM2 (30 layers, GQA 9/3 heads): the recomputed memory reproduces
    the generator's log-probabilities and weaver states; attention has one mass per layer."""
    from memgen_cli.config import MemoryConfig
    from memgen_cli.models.base import load_base
    from memgen_cli.models.memgen import MemGenModel

    torch.manual_seed(0)
    base = load_base(device="cpu")
    cfg = MemoryConfig(inject="kv", inference_latents=4)
    mg = MemGenModel(base.model, base.tokenizer, cfg).eval()
    with torch.no_grad():
        for name, p in mg.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # an adapter that changes the keys and values
    enc, _, out = answer(
        mg, max_new_tokens=24, text="Tom has 3 apples, and buys 4 more. How many apples?"
    )
    found = sorted(out.trace.for_row(0), key=lambda i: i.token_index)
    stream = S.slot_stream(
        mg, enc["input_ids"][0].tolist(), out.tokens[0], P.emitted_eos(out), found
    )
    memory = S.weave(mg, stream)
    teacher, produced = S.continuation_logprobs(mg, memory), P.generated_logprobs(out)
    assert abs(float(teacher.sum() - produced.sum())) < 1e-3  # 30 layers in float32
    for i, ins in enumerate(found):
        states = memory.states[list(stream.chunk(i))]
        torch.testing.assert_close(states, ins.weaver_states, atol=1e-3, rtol=0)
    implementation, probes = S.probe_slots(mg, memory)
    assert implementation == "eager"
    layers = mg.reasoner.config.num_hidden_layers
    for fields in probes:
        assert len(fields["slot_norms"]["key_ratio"]) == layers
        if fields["attention"] is not None:
            assert len(fields["attention"]["per_layer"]) == layers
            assert all(0 <= v <= 1 for v in fields["attention"]["per_layer"])


def test_skipped_boundaries_are_reported_with_the_trigger_probability():
    from memgen_cli.inspection import report as R

    mg = diverse(make_memgen("llama", trigger_threshold=0.999))
    mg.trigger.trained.fill_(True)  # a trained trigger that (almost) never invokes
    enc = encode_prompts(mg.tokenizer, [[{"role": "user", "content": QUESTION}]], "cpu")
    gen = GenerationConfig(max_new_tokens=40, memory="full")
    out = generate(mg, enc["input_ids"], enc["attention_mask"], gen)
    skips = out.trace.skips_for_row(0)
    assert skips, "the random clause table gives boundaries to skip"
    got = R.skipped_records(mg.tokenizer, out.trace, 0, 3, out.tokens[0])
    assert [r["token_index"] for r in got] == sorted(s.token_index for s in skips)
    assert all(r["example"] == 3 and 0 < r["trigger_prob"] < 0.999 for r in got)
    first = min(skips, key=lambda s: s.token_index)
    text = mg.tokenizer.decode(out.tokens[0][: first.token_index], skip_special_tokens=True)
    assert got[0]["text_before"] == text[-len(got[0]["text_before"]) :]
    assert got[0]["trigger_prob"] == round(first.trigger_prob, 4)
    assert [i.kind for i in out.trace.for_row(0)] == ["prompt"]  # nothing woven inside


# ------------------------------------------------------------------- memory.inject: kv
# A kv memory is the weaver's keys and values at K slots, at every layer; inspect-memory
# recomputes them from the answer (inspection/slots.py). Each view is checked against a
# reference built another way: the per-row reference path's reading (slots appended to an
# ordinary cache between token segments), and with LoRA B = 0 the plain reasoner over the
# query latents as ordinary inputs.
KINDS = ["llama", "qwen2"]  # the tiny Qwen2 has GQA (2 KV heads for 4 query heads)


def kv_memgen(kind: str, zero_b: bool = False):
    return checked_kv(diverse(make_memgen(kind, inject="kv")), zero_b)


def kv_answer(mg, max_new_tokens=30):
    enc, gen, out = answer(mg, max_new_tokens)
    found = sorted(out.trace.for_row(0), key=lambda i: i.token_index)
    prompt = enc["input_ids"][0].tolist()
    stream = S.slot_stream(mg, prompt, out.tokens[0], P.emitted_eos(out), found)
    return enc, gen, out, found, S.weave(mg, stream)


@torch.no_grad()
def reference_reading(mg, stream, found, drop=None, zero=None):
    """The answer as the reference path reads it (generation._KVStream): at each insertion the
    weaver re-reads the prefix from an empty cache (``weave_kv``) and its slots are appended to
    an ordinary cache between token segments; ``drop``: that insertion's columns masked,
    ``zero``: its values zeroed. Returns the continuation's log-probs and, per token column,
    its attention row per layer (layers, columns so far), eager, mean over heads."""
    ids, prompt_len = stream.ids, stream.prompt_len
    points = {prompt_len - 1 + ins.token_index: i for i, ins in enumerate(found)}
    tokens = mg.embed(torch.tensor([ids]))
    cache = DynamicCache(config=mg.reasoner.config)
    seen, mask = tokens[:, :0], torch.ones(1, 0, dtype=torch.long)
    hidden, rows, prev = [], {}, -1
    for point in sorted(set(points) | {len(ids) - 1}):
        segment = tokens[:, prev + 1 : point + 1]
        start = mask.shape[1]
        mask = torch.cat([mask, torch.ones(1, segment.shape[1], dtype=torch.long)], 1)
        out = mg.reasoner.get_decoder()(
            inputs_embeds=segment,
            attention_mask=mask,
            position_ids=torch.arange(start, mask.shape[1])[None],
            past_key_values=cache,
            use_cache=True,
            output_attentions=True,
        )
        hidden.append(out.last_hidden_state[0])
        for j in range(segment.shape[1]):
            rows[start + j] = torch.stack([a[0, :, j].float().mean(0) for a in out.attentions])
        seen = torch.cat([seen, segment], 1)
        if point in points:
            i, n = points[point], seen.shape[1]
            ins = found[i]
            ones, positions = torch.ones(1, n, dtype=torch.long), torch.arange(n)[None]
            state, where = mg.new_weaver_cache(), torch.tensor([n])
            slots, _ = mg.weave_kv(ins.kind, seen, ones, positions, state, where)
            for layer, (key, value) in enumerate(zip(slots.keys, slots.values, strict=True)):
                cache.update(key, value * (zero != i), layer)
            k = slots.positions.shape[1]
            mask = torch.cat([mask, torch.full((1, k), int(drop != i))], 1)
            seen = torch.cat([seen, mg.weaver.query_embeds(ins.kind, 1).to(seen.dtype)], 1)
        prev = point
    hidden = torch.cat(hidden)  # row i: token i's state
    logp = torch.log_softmax(mg.lm_head(hidden[prompt_len - 1 : -1]), -1)
    target = torch.tensor(ids[prompt_len:])
    return logp.gather(-1, target[:, None])[:, 0], rows


@pytest.mark.parametrize("kind", KINDS)
def test_kv_recomputed_memory_gives_the_generators_logprobs_and_weaver_states(kind):
    mg = kv_memgen(kind)
    _, _, out, found, memory = kv_answer(mg)
    assert len(found) >= 3 and found[0].kind == "prompt"
    assert all(ins.latents.shape[1] == 0 for ins in found)  # no input-level latents with kv
    teacher, produced = S.continuation_logprobs(mg, memory), P.generated_logprobs(out)
    assert teacher.shape == produced.shape
    torch.testing.assert_close(teacher, produced, atol=1e-4, rtol=0)
    stream = memory.stream
    assert int(memory.slots.sum()) == sum(ins.weaver_states.shape[0] for ins in found)
    for i, ins in enumerate(found):
        states = memory.states[list(stream.chunk(i))]
        torch.testing.assert_close(states, ins.weaver_states, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_kv_prefix_recomputed_memory_gives_the_generators_logprobs(kind):
    """With ``memory.kv_prefix`` the recomputed slots carry the prefix the generator wrote."""
    mg = checked_kv(diverse(make_memgen(kind, inject="kv", kv_prefix=True)))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for table in (mg.weaver.prefix_keys, mg.weaver.prefix_values):
            for p in table.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    _, _, out, found, memory = kv_answer(mg)
    assert len(found) >= 3
    teacher, produced = S.continuation_logprobs(mg, memory), P.generated_logprobs(out)
    torch.testing.assert_close(teacher, produced, atol=1e-4, rtol=0)
    mg.weaver.prefix_keys = None  # the same memory without the prefix reads otherwise
    bare = S.continuation_logprobs(mg, S.weave(mg, memory.stream))
    assert (bare - produced).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_kv_attention_per_layer_and_ablations_equal_the_reference_reading(kind):
    mg = kv_memgen(kind)
    _, _, out, found, memory = kv_answer(mg)
    stream, layers = memory.stream, mg.reasoner.config.num_hidden_layers
    with P.eager_attention(mg):
        reading = S.read(mg, memory, attention=True)
        want, rows = reference_reading(mg, stream, found)
    torch.testing.assert_close(S.continuation_logprobs(mg, memory), want, atol=1e-4, rtol=0)
    answer_cols = stream.token_pos[stream.prompt_len : stream.prompt_len + stream.num_answer_tokens]
    checked = 0
    for i in range(len(found)):
        got = P.attention_mass(reading.attention, stream, i)
        chunk = stream.chunk(i)
        later = [int(c) for c in answer_cols if c >= chunk.stop]
        if not later:
            assert got is None
            continue
        # By hand: per layer, the mean over later answer tokens of their weight on the slots.
        hand = torch.stack([rows[c][:, chunk.start : chunk.stop].sum(-1) for c in later]).mean(0)
        assert len(got["per_layer"]) == layers and got["following_tokens"] == len(later)
        assert got["per_layer"] == pytest.approx(hand.tolist(), abs=2e-5)
        assert all(0.0 <= v <= 1.0 for v in got["per_layer"])
        assert got["mass"] == pytest.approx(float(hand.mean()), abs=2e-5)
        checked += 1
        with P.eager_attention(mg):
            dropped, _ = reference_reading(mg, stream, found, drop=i)
            zeroed, _ = reference_reading(mg, stream, found, zero=i)
        for ablate, reference in ({"drop": i}, dropped), ({"zero_values": i}, zeroed):
            got_logp = S.continuation_logprobs(mg, memory, **ablate)
            torch.testing.assert_close(got_logp, reference, atol=1e-4, rtol=0, msg=str(ablate))
    assert checked >= 2
    # Slot norms: per layer, the slots' key norms over the tokens', from the reasoner's cache.
    norms = S.slot_norms(reading, stream, 1)
    keys = reading.cache.layers[0].keys[0].float().norm(dim=-1)  # (kv_heads, S)
    chunk = stream.chunk(1)
    expected = keys[:, chunk.start : chunk.stop].mean() / keys[:, stream.token_pos].mean()
    assert len(norms["key_ratio"]) == len(norms["value_ratio"]) == layers
    assert norms["key_ratio"][0] == pytest.approx(float(expected), abs=1e-4)
    torch.testing.assert_close(  # the cache holds the weaver's keys at the slot columns
        reading.cache.layers[0].keys[:, :, chunk.start : chunk.stop],
        memory.keys[0][:, :, chunk.start : chunk.stop],
    )


@pytest.mark.parametrize("kind", KINDS)
def test_kv_ablations_with_zero_lora_b_equal_the_query_latents_as_inputs(kind):
    """With LoRA B = 0 the weaver is the reasoner, so its slots are what the reasoner computes
    for the query latents as ordinary inputs: the teacher-forced answer (read at the tokens'
    own columns) is the plain reasoner's over that stream, and so is a drop (those columns
    masked) until the next memory, which the plain reasoner would compute without the dropped
    one while the ablation keeps it as computed. Zeroing the values changes only what the
    memory can change: the tokens after the one right after the insertion."""
    mg = kv_memgen(kind, zero_b=True)
    _, _, _, found, memory = kv_answer(mg)
    stream = memory.stream  # token embeddings with the query latents at the slot columns
    size = stream.embeds.shape[1]
    rows = stream.token_pos[stream.prompt_len - 1 : len(stream.ids) - 1]
    target = torch.tensor(stream.ids[stream.prompt_len :])

    def plain(mask):
        with torch.no_grad():
            hidden = mg.reasoner_hidden(stream.embeds, mask, torch.arange(size)[None])[0]
        return torch.log_softmax(mg.lm_head(hidden[rows]), -1).gather(-1, target[:, None])[:, 0]

    ones = torch.ones(1, size, dtype=torch.long)
    torch.testing.assert_close(S.continuation_logprobs(mg, memory), plain(ones), atol=1e-5, rtol=0)
    for i, ins in enumerate(found):
        chunk = stream.chunk(i)
        mask = ones.clone()
        mask[0, chunk.start : chunk.stop] = 0
        dropped = S.continuation_logprobs(mg, memory, drop=i)
        upto = found[i + 1].token_index + 1 if i + 1 < len(found) else len(target)
        torch.testing.assert_close(dropped[:upto], plain(mask)[:upto], atol=1e-5, rtol=0)
        zeroed = S.continuation_logprobs(mg, memory, zero_values=i)
        with_memory = S.continuation_logprobs(mg, memory)
        same = ins.token_index + 1  # up to the token right after the insertion: unchanged
        torch.testing.assert_close(zeroed[:same], with_memory[:same], atol=1e-6, rtol=0)
        torch.testing.assert_close(dropped[:same], with_memory[:same], atol=1e-6, rtol=0)
        if len(target) > same:
            assert (zeroed[same:] - with_memory[same:]).abs().max() > 1e-4
            assert (zeroed[same:] - dropped[same:]).abs().max() > 1e-4  # keys still take mass


def test_kv_regenerated_ablation_equals_generation_with_that_insertion_suppressed():
    mg = kv_memgen("qwen2")
    enc, gen, out, found, _ = kv_answer(mg)
    ablated = P.ablated_generations(mg, enc["input_ids"][0].tolist(), gen, found)
    changed = 0
    for i, target in enumerate(found):
        alone = generate(mg, enc["input_ids"], enc["attention_mask"], gen, keep=P.suppress(target))
        assert ablated.tokens[i] == alone.tokens[0]
        dropped = [x for x in alone.trace.insertions if not x.inserted]
        assert [(x.kind, x.token_index) for x in dropped] == [(target.kind, target.token_index)]
        t = target.token_index  # identical through the token right after the dropped memory
        assert alone.tokens[0][: t + 1] == out.tokens[0][: t + 1]
        changed += alone.tokens[0] != out.tokens[0]
    assert changed > 0


@pytest.fixture(scope="module", params=KINDS)
def kv_prompt_run(request, tmp_path_factory):
    from helpers import tiny_artifact

    tmp = tmp_path_factory.mktemp(f"kv-{request.param}")
    base, art = tiny_artifact(tmp, request.param, inject="kv")
    before = artifact_digest(art)
    result = invoke(
        *("--artifact", art, "--base", base, "--prompt", QUESTION, "--max-new-tokens", 30),
        *("--layers", "--json", "--html", tmp / "report.html", "--output", tmp / "plots"),
    )
    assert result.exit_code == 0, result.output
    assert artifact_digest(art) == before
    return json.loads(result.stdout), tmp, base, art


def test_kv_prompt_json_marks_what_does_not_apply_and_fills_the_rest(kv_prompt_run):
    data, _, _, _ = kv_prompt_run
    assert set(data) == TOP_KEYS and data["schema_version"] == 4 and data["inject"] == "kv"
    views = data["views"]
    assert set(views) == VIEW_NAMES and all(set(v) == VIEW_KEYS for v in views.values())
    assert {name for name, v in views.items() if not v["applies"]} == {"logit_lens", "norms"}
    for view in views.values():
        assert (view["what"] is None) == (view["why"] is not None) == (not view["applies"])
    assert "never runs over the slot positions" in views["logit_lens"]["why"]
    assert "weaver's final-layer hidden state" in views["nearest_tokens"]["what"]
    assert data["attention_implementation"] == "eager" and data["embedding_norms"]
    recs = data["insertions"]
    assert len(recs) >= 2 and [r["num_latents"] for r in recs[:2]] == [3, 2]
    for rec in recs:
        k = rec["num_latents"]
        assert set(rec) == INSERTION_KEYS and set(rec["ablation"]) == ABLATION_KEYS
        for name in ("norms", "norm_percentiles", "logit_lens", "logit_lens_layers"):
            assert rec[name] is None, name  # --layers was given: still nothing to read
        assert len(rec["nearest_tokens"]) == len(rec["nearest_cosines"]) == k
        assert all(len(row) == 5 and -1 <= min(row) for row in rec["nearest_cosines"])
        assert len(rec["weaver_lens"]) == k and all(len(row) == 3 for row in rec["weaver_lens"])
        assert all(0 <= p["prob"] <= 1 for row in rec["weaver_lens"] for p in row)
        assert set(rec["slot_norms"]) == SLOT_NORM_KEYS
        assert all(len(v) == 2 and min(v) > 0 for v in rec["slot_norms"].values())
        att = rec["attention"]
        assert set(att) == ATTENTION_KEYS and len(att["per_layer"]) == 2
        assert all(0 <= v <= 1 for v in att["per_layer"]) and len(att["per_latent"]) == k
        assert att["mass"] == pytest.approx(sum(att["per_layer"]) / 2, abs=1e-4)
        ab, zero = rec["ablation"], rec["ablation"]["zero_values"]
        assert set(zero) == ZERO_VALUES_KEYS
        assert zero["delta_logprob"] == pytest.approx(
            zero["logprob"] - ab["logprob_with"], abs=2e-4
        )
    assert len({r["ablation"]["logprob_with"] for r in recs}) == 1


def test_kv_prompt_run_files_page_and_terminal_say_what_does_not_apply(kv_prompt_run):
    data, tmp, base, art = kv_prompt_run
    names = sorted(p.name for p in (tmp / "plots").iterdir())
    assert names == ["effects.png", "inspect.json", "memgen-output.json"]  # no latent norms
    page = (tmp / "report.html").read_text()
    assert page.count('class="marker"') == len(data["insertions"])
    assert page.count("data:image/png;base64,") == 1
    assert "Not applicable with inject: kv" in page and "never runs over the slot positions" in page
    assert "weaver state → LM head" in page and "zero its values" in page
    result = invoke("--artifact", art, "--base", base, "--prompt", QUESTION, "--max-new-tokens", 16)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "not applicable with inject: kv: logit lens (the reasoner never runs" in text
    assert "not applicable with inject: kv: norms" in text and "⟨mem 3 #0⟩" in text
    assert "weaver state: nearest tokens" in text and "zero its values: Δlog-prob" in text
    assert "inject kv" in text and "per layer" in text


def test_kv_data_mode_clusters_weaver_states_and_drops_a_cluster(tmp_path):
    from helpers import tiny_artifact

    base, art = tiny_artifact(tmp_path, inject="kv")
    rows = [{"question": f"Ann has {i} pens, and gets {i + 1}. How many?", "answer": f"#### {2 * i + 1}"} for i in range(6)]  # fmt: skip
    data_file = tmp_path / "mini.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = f"--artifact {art} --base {base} --data {data_file} --limit 6 --max-new-tokens 16 --clusters 2 --json".split()  # fmt: skip
    extra = f"--drop-cluster 0 --drop-rule nearest --output {tmp_path / 'out'}".split()
    result = invoke(*args, *extra)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["inject"] == "kv" and "weaver final states" in data["clusters"]["method"]
    for rec in data["insertions"]:
        assert rec["norms"] is None and rec["attention"] is None and rec["ablation"] is None
        assert len(rec["weaver_lens"]) == len(rec["nearest_tokens"]) == rec["num_latents"]
    labels = [r["cluster"] for r in data["insertions"]]
    first = data["drop_cluster"]["first_run"]
    assert first["rule_selects"] == first["rule_selects_in_cluster"] == labels.count(0)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["cluster_stats.png", "clusters_pca.png", "clusters_tsne.png", "inspect.json", "memgen-output.json"]  # fmt: skip
