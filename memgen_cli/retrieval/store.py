"""The experience store and its index: solved problems, found again by similarity.

An entry (``Experience``) is one training sample: its question and the worked solution the SFT
stages train on. ``build`` indexes the entries' questions; ``Retriever.search`` returns, for each
new question, the k entries most similar to it, best first, ties in store order (so a search is a
pure function of the store, the question and the reasoner's weights).

Similarity:

- ``embed``: the reasoner's own last-layer hidden states, adapters off, mean-pooled over the
  question's tokens (no chat template, no other model), centred on the store's mean and
  L2-normalised; a faiss ``IndexFlatIP`` over them ranks by cosine. Centring: mean-pooled LM
  states share a large common direction (Ethayarajh 2019), which makes every raw cosine close to
  1; subtracting the store's mean leaves the part that tells questions apart.
- ``bm25``: BM25 (bm25s, Lucene's variant, k1 1.5, b 0.75) over the reasoner tokenizer's tokens
  of the question, so numbers and symbols count (a word tokenizer drops "7" and "+").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import bm25s
import faiss
import numpy as np
import torch

from memgen_cli.models.memgen import MemGenModel

SIMILARITIES = ("embed", "bm25")
METHODS = ("expel",)
EMBED_BATCH = 32  # questions per reasoner pass when embedding


@dataclass(frozen=True)
class Experience:
    """One entry of the store: a solved training problem."""

    id: str
    question: str
    solution: str  # the worked solution, exactly the SFT target (``sft_data.target_text``)
    answer: str


@dataclass(frozen=True)
class Hit:
    """One retrieved entry: its position in the store, the entry, and its similarity."""

    index: int
    experience: Experience
    score: float


@dataclass
class Retriever:
    """The store, the index over it, and how new questions are compared with it.

    ``vectors`` (embed): the entries' centred, L2-normalised embeddings, row i for entry i, as
    ``index`` holds them; ``mean``: the mean the store was centred on (None: not centred).
    """

    experiences: list[Experience]
    similarity: str
    index: faiss.Index | bm25s.BM25
    vectors: np.ndarray | None = None
    mean: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.experiences)

    def search(self, model: MemGenModel, questions: list[str], k: int) -> list[list[Hit]]:
        """For each question, the ``min(k, len(store))`` most similar entries, best first. A
        question with no tokens matches nothing: every score 0, so the store's first entries."""
        k = min(k, len(self))
        scores = np.zeros((len(questions), len(self)))
        tokens = [bm25_tokens(model.tokenizer, q) for q in questions]
        asked = [i for i, t in enumerate(tokens) if t]
        if self.similarity == "bm25":
            for i in asked:
                scores[i] = self.index.get_scores(tokens[i])
        elif asked:
            query = self._normalised(embed_questions(model, [questions[i] for i in asked]))
            # Ask for k + 8: a tie at the k-th place is then broken by store order, not faiss.
            found, ids = self.index.search(query, min(k + 8, len(self)))
            for i, row_scores, row_ids in zip(asked, found, ids, strict=True):
                scores[i] = -np.inf  # outside faiss's answer: below every entry it returned
                scores[i, row_ids] = row_scores
        return [self._ranked(row, k) for row in scores]

    def _ranked(self, scores: np.ndarray, k: int) -> list[Hit]:
        order = np.lexsort((np.arange(len(scores)), -scores))[:k]  # score desc, then store order
        return [Hit(int(i), self.experiences[i], float(scores[i])) for i in order]

    def _normalised(self, vectors: np.ndarray) -> np.ndarray:
        out = vectors - self.mean if self.mean is not None else vectors.copy()
        out = np.ascontiguousarray(out, dtype=np.float32)
        faiss.normalize_L2(out)
        return out


def build(
    model: MemGenModel,
    experiences: list[Experience],
    similarity: str,
    center: bool = True,
    timings: dict | None = None,
) -> Retriever:
    """Index ``experiences`` by their questions with ``similarity`` (``SIMILARITIES``);
    ``timings``, if given, gets the seconds spent reading the store (``store_s``: tokenising,
    and for embed the reasoner's passes) and building the index (``index_s``)."""
    questions = [e.question for e in experiences]
    clock = time.perf_counter()
    if similarity == "bm25":
        tokens = [bm25_tokens(model.tokenizer, q) for q in questions]
        tick = time.perf_counter()
        index = bm25s.BM25()
        index.index(tokens, show_progress=False)
        retriever = Retriever(list(experiences), similarity, index)
    else:
        raw = embed_questions(model, questions)
        tick = time.perf_counter()
        retriever = Retriever(list(experiences), similarity, faiss.IndexFlatIP(raw.shape[1]))
        retriever.mean = raw.mean(axis=0) if center else None
        retriever.vectors = retriever._normalised(raw)
        retriever.index.add(retriever.vectors)
    if timings is not None:
        timings["store_s"] = tick - clock
        timings["index_s"] = time.perf_counter() - tick
    return retriever


@torch.no_grad()
def embed_questions(model: MemGenModel, texts: list[str], batch: int = EMBED_BATCH) -> np.ndarray:
    """(len(texts), hidden) float32: the reasoner's last hidden states (adapters off, through
    ``MemGenModel.reasoner_hidden``) mean-pooled over each text's tokens."""
    tok, out = model.tokenizer, []
    for start in range(0, len(texts), batch):
        enc = tok(
            texts[start : start + batch],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        ids, mask = enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left or right padding alike
        hidden = model.reasoner_hidden(model.embed(ids), mask, positions).float()
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        out.append(pooled.cpu().numpy())
    if not out:
        return np.zeros((0, model.reasoner.config.hidden_size), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def bm25_tokens(tokenizer, text: str) -> list[str]:
    """The tokens BM25 counts: the reasoner tokenizer's pieces of ``text``, lower-cased."""
    return [piece.lower() for piece in tokenizer.tokenize(text)]
