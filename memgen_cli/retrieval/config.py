"""The recipe of ``memgen baseline retrieval``: a weaver's recipe as it stands, plus a
``retrieval`` section (``--k``, ``--similarity``, ``--method`` set its keys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from memgen_cli.config import DataConfig, MemoryConfig, ModelConfig, SFTTrainingConfig


@dataclass
class RetrievalSettings:
    method: str = "expel"
    """expel: retrieve solved training problems as worked examples (ExpeL, Zhao et al. 2024).
    The only method today; AWM's induced workflows need a model able to write them
    (docs/stages/baseline.md#retrieval)."""
    k: int = 2
    """Examples put in the prompt per question (fewer when the store is smaller)."""
    similarity: str = "embed"
    """embed: cosine of the reasoner's own mean-pooled last hidden states over the question's
    tokens, through a faiss index; bm25: BM25 over the reasoner tokenizer's tokens (bm25s)."""
    center: bool = True
    """embed: subtract the store's mean embedding before normalising (mean-pooled LM states
    share one large direction that makes every raw cosine close to 1)."""


@dataclass
class RetrievalConfig:
    """``memgen baseline retrieval``: an experience store of exactly the training samples a
    weaver's recipe uses. ``model`` and ``data`` mean what they mean in ``SFTConfig``, with the
    same sample selection (``data.size``, ``data.heldout``, ``data.seed``, and samples longer
    than ``data.max_length`` dropped as SFT drops them); ``memory`` and ``training`` are accepted
    so that a weaver's recipe loads as it stands, and not read."""

    model: ModelConfig = field(default_factory=ModelConfig)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """Not read (a weaver's recipe has it)."""
    data: DataConfig = field(default_factory=DataConfig)
    training: SFTTrainingConfig = field(default_factory=SFTTrainingConfig)
    """Not read (a weaver's recipe has it): a store is built, not trained."""
    output: str = "runs/baseline-retrieval"
    """Artifact directory (written atomically). In a weaver stage's recipe this is the weaver's
    directory, and the store is written beside it, as ``baseline-retrieval``."""
