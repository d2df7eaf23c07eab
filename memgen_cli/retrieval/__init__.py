"""The retrieval baseline (``memgen baseline retrieval``): an experience store of solved
training problems, an index over it, and retrieved examples in the prompt at answer time.

``store`` (entries, similarity, the faiss or BM25 index, search), ``artifact`` (the artifact of
kind ``retrieval``: save, load), ``prompt`` (the examples as chat turns; ``open_shots`` for eval
and generate), ``config`` (the stage's recipe).
"""

from memgen_cli.retrieval.artifact import load_retrieval, save_retrieval
from memgen_cli.retrieval.prompt import PROMPT_FORMAT, Shots, open_shots, with_examples
from memgen_cli.retrieval.store import (
    METHODS,
    SIMILARITIES,
    Experience,
    Hit,
    Retriever,
    build,
    embed_questions,
)

__all__ = [
    "METHODS",
    "PROMPT_FORMAT",
    "SIMILARITIES",
    "Experience",
    "Hit",
    "Retriever",
    "Shots",
    "build",
    "embed_questions",
    "load_retrieval",
    "open_shots",
    "save_retrieval",
    "with_examples",
]
