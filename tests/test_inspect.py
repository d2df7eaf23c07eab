"""`memgen inspect-memory`: probes with golden values, ablations equal suppressed generations,
seeded clustering, a stable documented JSON schema, bad input, and the HTML page in Chromium."""

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_memgen, torch_threads
from memgen_cli.artifacts import artifact_digest
from memgen_cli.cli import app
from memgen_cli.config import GenerationConfig
from memgen_cli.generation import encode_prompts, generate
from memgen_cli.inspection import clusters as C
from memgen_cli.inspection import probe as P

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
    torch.testing.assert_close(deep.attention.sum(-1), torch.ones(size), atol=1e-5, rtol=0)
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
    "attention",
    "ablation",
    "cluster",
    "correct",
}
ABLATION_KEYS = {
    "logprob_with",
    "logprob_without",
    "delta_logprob",
    "completion_without",
    "answer_with",
    "answer_without",
    "answer_changed",
    "completion_changed",
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
TIMING_KEYS = {
    "load_s",
    "generate_s",
    "probe_s",
    "ablation_s",
    "cluster_s",
    "intervention_s",
    "total_s",
}


def documented_keys() -> set[str]:
    """Every `name` quoted in a table row of the schema doc."""
    rows = [line for line in SCHEMA_DOC.read_text().splitlines() if line.startswith("|")]
    return {key for line in rows for key in re.findall(r"`(\w+)`", line)}


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
    assert set(data) == TOP_KEYS and data["schema_version"] == 2 and data["mode"] == "prompt"
    assert set(data["examples"][0]) == EXAMPLE_KEYS and set(data["timings"]) == TIMING_KEYS
    assert data["attention_implementation"] == "eager"
    recs = data["insertions"]
    assert len(recs) >= 2 and recs[0]["kind"] == "prompt" and recs[1]["kind"] == "inference"
    for rec in recs:
        assert set(rec) == INSERTION_KEYS and set(rec["ablation"]) == ABLATION_KEYS
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
    _fails(invoke("--artifact", no_weaver, "--base", base, "--prompt", "hi"), "has no weaver")
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
