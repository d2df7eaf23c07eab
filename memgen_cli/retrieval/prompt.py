"""Retrieved examples in the prompt, at answer time (``memgen eval`` and ``memgen generate``).

ExpeL's use of experience (Zhao et al., 2024): the k stored problems most similar to the new
one are shown, solved, before it. Here they are chat turns in the reasoner's own template: per
retrieved entry a user turn (its question, with the answer-format suffix the question itself
gets) and an assistant turn (its worked solution, the SFT target), the most similar entry last,
right before the question. The system message, if any, stays first. With a weaver the memory is
woven on top: the prompt latents go where the assistant turn of the question begins, as always.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memgen_cli.artifacts import artifact_digest, check_base
from memgen_cli.data import Example, to_messages
from memgen_cli.errors import MemgenError
from memgen_cli.models.base import LoadedBase
from memgen_cli.models.memgen import MemGenModel
from memgen_cli.retrieval.artifact import load_retrieval
from memgen_cli.retrieval.store import Hit, Retriever

# What the manifest records as the prompt format (``prompt.examples``).
PROMPT_FORMAT = {
    "style": "few-shot chat turns in the reasoner's chat template",
    "turns": "per retrieved entry: user = its question + the prompt suffix, assistant = its "
    "worked solution; then the question",
    "order": "most similar entry last, next to the question",
}


def with_examples(messages: list[dict], hits: list[Hit], suffix: str) -> list[dict]:
    """``messages`` (optional system turn, then the question's user turn) with the retrieved
    entries' turns before the question, most similar last.

    >>> from memgen_cli.retrieval.store import Experience
    >>> hit = Hit(0, Experience("a/0", "1+1?", "1+1 = 2. \\\\boxed{2}", "2"), 0.9)
    >>> [m["role"] for m in with_examples([{"role": "user", "content": "2+2?"}], [hit], "")]
    ['user', 'assistant', 'user']
    """
    turns = []
    for hit in reversed(hits):
        e = hit.experience
        turns.append(to_messages(Example(e.id, e.question, e.answer), suffix)[-1])
        turns.append({"role": "assistant", "content": e.solution})
    return [*messages[:-1], *turns, messages[-1]]


@dataclass
class Shots:
    """A retrieval artifact ready to frame questions: its retriever, manifest and path."""

    retriever: Retriever
    manifest: dict
    path: Path

    @property
    def k(self) -> int:
        return int(self.manifest["retrieval"]["k"])

    def key(self) -> tuple[str, int]:
        """What makes two framings the same (``memgen eval`` reuses a row on it)."""
        return (artifact_digest(self.path), self.k)

    def frame(
        self, model: MemGenModel, messages: list[list[dict]], questions: list[str], suffix: str
    ) -> tuple[list[list[dict]], list[list[str]]]:
        """Each question's messages with its retrieved examples, and the examples' ids."""
        hits = self.retriever.search(model, questions, self.k)
        framed = [with_examples(m, h, suffix) for m, h in zip(messages, hits, strict=True)]
        return framed, [[hit.experience.id for hit in h] for h in hits]


def open_shots(path: str | Path, base: LoadedBase, allow_base_mismatch: bool = False) -> Shots:
    """Load a retrieval artifact for questions that ``base``'s reasoner will embed: its base
    must be the one recorded (the embeddings are that reasoner's)."""
    retriever, manifest = load_retrieval(path)
    check_base(manifest, base, allow_base_mismatch)
    hidden = base.model.get_input_embeddings().weight.shape[1]
    if retriever.vectors is not None and retriever.vectors.shape[1] != hidden:
        raise MemgenError(
            f"{path} holds embeddings of size {retriever.vectors.shape[1]}, and {base.name}'s "
            f"hidden size is {hidden}: rebuild the store on this base with "
            "`memgen baseline retrieval --base ...`."
        )
    return Shots(retriever, manifest, Path(path))
