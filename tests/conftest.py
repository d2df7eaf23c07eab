"""Hermetic fixtures: a byte-level tokenizer with a ChatML template and tiny models from config,
and the tiny base, weaver artifact, data file and TextWorld games that many modules read (built
once a session).

A module that runs tiny models asks for one torch thread with
``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import contextlib
import signal
import warnings
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from memgen_cli.config import MemoryConfig
from memgen_cli.models.base import prepare_tokenizer
from memgen_cli.models.memgen import MemGenModel

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer (no merges): every byte is a token, plus chat specials."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS,
    )
    tok.chat_template = CHATML
    prepare_tokenizer(tok)
    return tok


def tiny_config(kind: str, vocab: int, hidden: int = 32):
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.2,  # large weights: outputs depend strongly on the input
    )
    return LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)


def make_model(kind: str = "llama", hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    tok = make_tokenizer()
    cls = LlamaForCausalLM if kind == "llama" else Qwen2ForCausalLM
    model = cls(tiny_config(kind, len(tok), hidden)).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


# Many delimiters, so random tiny models hit clause boundaries often, at different steps per row.
TEST_DELIMITERS = [",", ".", "\n", "a", "e", "o", "t", "s", "1", "2"]


def make_memgen(kind="llama", weaver_kind=None, seed=0, **memory) -> MemGenModel:
    model, tok = make_model(kind, seed=seed)
    weaver = make_model(weaver_kind, hidden=48, seed=seed + 1)[0] if weaver_kind else None
    settings = dict(
        prompt_latents=3,
        inference_latents=2,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        delimiters=TEST_DELIMITERS,
        trigger_hidden=16,
    )
    cfg = MemoryConfig(**{**settings, **memory})
    torch.manual_seed(seed + 2)
    mg = MemGenModel(model, tok, cfg, weaver_backbone=weaver).eval()
    # LoRA B starts at zero; give it values so the adapter really changes the backbone.
    with torch.no_grad():
        for name, p in mg.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return mg


@pytest.fixture(autouse=True)
def sigint_handler_kept(request):
    """A test that leaves its own Ctrl-C handler installed changes what every later test in
    the process gets from Ctrl-C: say which test it was, and put the handler back."""
    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)
        warnings.warn(f"{request.node.nodeid} left a SIGINT handler installed", stacklevel=1)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=["llama", "qwen2"])
def memgen(request):
    return make_memgen(request.param)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block on ``n`` torch threads, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spinning costs
    ~4x (measured: the embedded model's 16-token GRPO rollouts took 95-150 s with 2 threads)."""
    with torch_threads(1):
        yield


@pytest.fixture
def one_thread_unless_slow(request):
    """``one_thread`` for the fast tests; the slow ones keep torch's own thread count."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_weaver(tmp_path_factory) -> tuple[Path, Path]:
    """(base_dir, artifact_dir) of ``helpers.tiny_artifact``: a tiny Llama saved as a model
    directory and a weaver artifact on it. Shared by every test: read them, never write them
    (copy the artifact first)."""
    from helpers import tiny_artifact  # helpers imports this module, so not at the top

    return tiny_artifact(tmp_path_factory.mktemp("tiny-weaver"))


@pytest.fixture(scope="session")
def tiny_base(tiny_weaver) -> Path:
    """A 2-layer Llama with the ChatML byte tokenizer, saved as a model directory (--base DIR)."""
    return tiny_weaver[0]


@pytest.fixture(scope="session")
def tiny_qwen_base(tmp_path_factory) -> Path:
    """A tiny Qwen2 saved as a model directory: another reasoner than tiny_base's."""
    from helpers import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("tiny-qwen") / "base", "qwen2")


@pytest.fixture(scope="session")
def tiny(tiny_weaver, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base_dir, weaver artifact, a GSM8K-format file of 12 problems), read-only like
    ``tiny_weaver``."""
    from helpers import write_problems

    return (*tiny_weaver, write_problems(tmp_path_factory.mktemp("tiny") / "train.jsonl", 12))


# ------------------------------------------------------------------ game cache (textworld tests)
@pytest.fixture(scope="session")
def home(tmp_path_factory):
    """One $MEMGEN_HOME for the whole session: a TextWorld game is keyed by challenge, settings
    and seed and made the same every time, so a game one test module makes (about 2 s) serves
    every later one."""
    return tmp_path_factory.mktemp("memgen-home")


@pytest.fixture
def cached(home, monkeypatch):
    """``home`` as this test's $MEMGEN_HOME (where TextWorld games are generated and cached)."""
    monkeypatch.setenv("MEMGEN_HOME", str(home))
    return home


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """An empty $MEMGEN_HOME of this test's own, for tests of what is written there and when
    (the shared ``home`` may already hold any game)."""
    monkeypatch.setenv("MEMGEN_HOME", str(tmp_path / "memgen-home"))
    return tmp_path / "memgen-home"
