"""The retrieval artifact (kind ``retrieval``, from ``memgen baseline retrieval``): save and load.

Layout (a directory, written atomically like every artifact; nothing pickled)::

    memgen.json               manifest: the reasoner (name, fingerprint), ``retrieval`` (method,
                              k, similarity, store size, embedding and index settings, the
                              store's sha256), ``prompt`` (chat template, suffix, system, how
                              retrieved examples are laid out), ``training`` (the data the
                              store was drawn from, as ``memgen eval`` reads it back)
    store.jsonl               one entry a line: {"id", "question", "solution", "answer"}
    index.faiss               similarity embed: the faiss index (``faiss.write_index``)
    embeddings.safetensors    similarity embed: ``embeddings`` (N, hidden), row i for entry i,
                              centred and L2-normalised as indexed; ``mean`` (hidden), the
                              centre (absent when not centred)
    bm25/                     similarity bm25: bm25s's index files (JSON + .npy, no pickle)
    recipe.yaml               the resolved configuration that produced it
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import bm25s
import faiss
import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from memgen_cli.artifacts import _manifest, _write_record, read_manifest, require_kind
from memgen_cli.errors import MemgenError
from memgen_cli.models.base import LoadedBase
from memgen_cli.outputs import atomic_dir
from memgen_cli.retrieval.store import Experience, Retriever

STORE, INDEX, EMBEDDINGS, BM25_DIR = "store.jsonl", "index.faiss", "embeddings.safetensors", "bm25"


def store_text(experiences: list[Experience]) -> str:
    return "".join(
        json.dumps(
            {"id": e.id, "question": e.question, "solution": e.solution, "answer": e.answer},
            ensure_ascii=False,
        )
        + "\n"
        for e in experiences
    )


def save_retrieval(
    retriever: Retriever,
    base: LoadedBase,
    out: str | Path,
    *,
    settings: dict,
    prompt: dict,
    training: dict,
    recipe_yaml: str | None = None,
) -> Path:
    """Write the retrieval artifact atomically; ``settings``: the manifest's ``retrieval``
    section (method, k, ...), completed here with the store's size and digest."""
    out = Path(out)
    store = store_text(retriever.experiences)
    section = {
        "similarity": retriever.similarity,
        **settings,
        "size": len(retriever),
        "store_sha256": hashlib.sha256(store.encode()).hexdigest(),
    }
    with atomic_dir(out) as tmp:
        (tmp / STORE).write_text(store, encoding="utf-8")
        if retriever.similarity == "embed":
            faiss.write_index(retriever.index, str(tmp / INDEX))
            tensors = {"embeddings": torch.from_numpy(retriever.vectors)}
            if retriever.mean is not None:
                tensors["mean"] = torch.from_numpy(np.ascontiguousarray(retriever.mean))
            save_file(tensors, tmp / EMBEDDINGS)
        else:
            retriever.index.save(str(tmp / BM25_DIR), show_progress=False)
        manifest = _manifest(
            "retrieval",
            base,
            None,
            training,
            retrieval=section,
            prompt={"chat_template": base.tokenizer.chat_template, **prompt},
        )
        _write_record(tmp, manifest, recipe_yaml, None)
    return out


def load_retrieval(path: str | Path) -> tuple[Retriever, dict]:
    """The retriever an artifact holds, validated (manifest, files, store, index sizes);
    returns (retriever, manifest). The reasoner it was built with is checked by the caller
    (``artifacts.check_base``) against the one that will embed the questions."""
    path = Path(path)
    manifest = read_manifest(path)
    require_kind(manifest, path, "retrieval")
    section = manifest["retrieval"]
    similarity = section.get("similarity")
    experiences = _read_store(path / STORE)
    if len(experiences) != section.get("size"):
        raise _damaged(
            path, f"{STORE} has {len(experiences)} entries, memgen.json says {section.get('size')}"
        )
    if similarity == "bm25":
        try:
            index = bm25s.BM25.load(str(path / BM25_DIR), show_progress=False)
        except (OSError, ValueError, KeyError) as exc:
            raise _damaged(path, f"{BM25_DIR}/ is not a readable bm25s index ({exc})") from exc
        return Retriever(experiences, similarity, index), manifest
    try:
        index = faiss.read_index(str(path / INDEX))
    except RuntimeError as exc:
        raise _damaged(path, f"{INDEX} is not a readable faiss index") from exc
    try:
        tensors = load_file(path / EMBEDDINGS)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, f"{EMBEDDINGS} is not a readable safetensors file ({exc})") from exc
    vectors = tensors.get("embeddings")
    if vectors is None or index.ntotal != len(experiences) or vectors.shape[0] != len(experiences):
        raise _damaged(path, f"{INDEX} and {EMBEDDINGS} do not hold one vector per store entry")
    if index.d != section.get("embedding", {}).get("dim") or vectors.shape[1] != index.d:
        raise _damaged(path, f"{INDEX} has vectors of size {index.d}, memgen.json says otherwise")
    mean = tensors.get("mean")
    return (
        Retriever(
            experiences,
            similarity,
            index,
            vectors.numpy(),
            None if mean is None else mean.numpy(),
        ),
        manifest,
    )


def _read_store(file: Path) -> list[Experience]:
    experiences = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            experiences.append(
                Experience(row["id"], row["question"], row["solution"], row["answer"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise MemgenError(
                f"{file}: line {number} is not a store entry with id, question, solution and "
                f"answer ({exc}); the artifact is damaged: re-create it with "
                "`memgen baseline retrieval`."
            ) from exc
    return experiences


def _damaged(path: Path, what: str) -> MemgenError:
    return MemgenError(
        f"Retrieval artifact {path} is damaged: {what}. Re-create it with "
        "`memgen baseline retrieval --overwrite`."
    )
