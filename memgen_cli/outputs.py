"""What memgen writes, and the guard that keeps it from destroying anything else.

``check_output`` lets an ``--output`` path be replaced only when it holds memgen's own output
(an artifact, or the eval, inspect-memory or generate output that marks itself so) and the
user passed --overwrite (or a training stage's --resume). Commands call it when they validate
their options, before any model loads; ``atomic_dir`` and ``write_output`` call it again at the
swap, and write whole or not at all (``atomic.py``). An artifact is recognised by its file names,
so they are named here; what is in the files is ``artifacts.py``'s business.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

from memgen_cli import __version__, atomic
from memgen_cli.errors import MemgenError

# ------------------------------------------------------------------------ artifact file names
MANIFEST = "memgen.json"
WEAVER_FILES = (
    "weaver/adapter_config.json",
    "weaver/adapter_model.safetensors",
    "weaver.safetensors",
)
TRIGGER_FILE = "trigger.safetensors"
BASELINE_FILES = ("adapter_config.json", "adapter_model.safetensors")
# A retrieval artifact's files, by its similarity (``retrieval/artifact.py`` describes them);
# bm25's are the index files bm25s writes.
BM25_FILES = (
    "params.index.json",
    "vocab.index.json",
    "data.csc.index.npy",
    "indices.csc.index.npy",
    "indptr.csc.index.npy",
)
RETRIEVAL_FILES = {
    "embed": ("store.jsonl", "index.faiss", "embeddings.safetensors"),
    "bm25": ("store.jsonl", *(f"bm25/{name}" for name in BM25_FILES)),
}

# ------------------------------------------------------------------------------ the guard
OUTPUT_MARKER = "memgen-output.json"
# What memgen writes at the top of an artifact directory; anything else there is the user's.
ARTIFACT_ENTRIES = frozenset(
    {MANIFEST, TRIGGER_FILE, "recipe.yaml", "metrics.jsonl", "completions", *BASELINE_FILES}
    | {name.split("/")[0] for name in WEAVER_FILES}
    | {name.split("/")[0] for files in RETRIEVAL_FILES.values() for name in files}
)
OUTPUTS = {  # kind -> what it is called in messages
    "artifact": "memgen artifact",
    "eval": "memgen eval output",
    "inspect-memory": "memgen inspect-memory output",
    "generate": "memgen generate answers file",
    "html": "memgen inspect-memory page",
}
# How a file output is recognised: the fields of each line ``stages/generate.record`` writes;
# the title ``inspection/html.page`` writes.
ANSWER_FIELDS = frozenset({"prompt", "completion", "memory", "insertions"})
HTML_TITLE = b"<title>memgen inspect-memory</title>"


def check_output(path: str | Path, *, kind: str, overwrite: bool, flag: str = "--output") -> None:
    """Refuse an output path where writing would destroy something that is not memgen's.

    A new path, an empty folder or an empty file is free. An existing one is replaced only when
    it holds memgen's own output of ``kind`` (any artifact for the training stages; an earlier
    eval, inspect-memory or generate output for those commands), with nothing else beside it,
    and ``overwrite`` (--overwrite, or a training stage's --resume) says the user agrees.
    Commands call this when they validate their options, before any model is loaded.
    """
    path, what = Path(path), OUTPUTS[kind]
    if path.is_symlink():
        raise MemgenError(
            f"{flag} {path} is a symbolic link; give the path it points to ({path.resolve()})."
        )
    if not path.exists():
        return
    if kind in ("generate", "html"):
        _check_file(path, kind, overwrite, flag)
        return
    if not path.is_dir():
        raise MemgenError(
            f"{flag} {path} is a file, not a folder; choose a new path or remove it yourself."
        )
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    found, ours = output_kind(path)
    if found != kind:
        held = f"a {OUTPUTS[found]}" if found else _listing(entries)
        raise MemgenError(
            f"{flag} {path}: the folder exists and is not a {what} (it holds {held}); "
            "choose a new path or remove it yourself."
        )
    foreign = [name for name in entries if name not in ours]
    if foreign:
        raise MemgenError(
            f"{flag} {path} holds a {what}, and also {_listing(foreign)}, which memgen did not "
            "write; move those out or choose a new path."
        )
    if not overwrite:
        raise MemgenError(f"{flag} {path} holds a {what}; pass --overwrite to replace it.")


def output_kind(path: Path) -> tuple[str | None, frozenset[str]]:
    """The memgen output a folder holds (a kind of ``OUTPUTS``, None if none) and the names
    memgen wrote in it."""
    manifest = _json_object(path / MANIFEST)
    if manifest is not None and "format_version" in manifest:
        return "artifact", ARTIFACT_ENTRIES
    marker = _json_object(path / OUTPUT_MARKER)
    if marker is not None and marker.get("kind") in OUTPUTS and marker["kind"] != "artifact":
        files = [f for f in marker.get("files", []) if isinstance(f, str)]
        return marker["kind"], frozenset([OUTPUT_MARKER, *files])
    return None, frozenset()


def _check_file(path: Path, kind: str, overwrite: bool, flag: str) -> None:
    what = OUTPUTS[kind]
    if path.is_dir():
        raise MemgenError(f"{flag} {path} is a folder; give the path of a file to write.")
    if not path.is_file():
        raise MemgenError(f"{flag} {path} is not a regular file; choose a new path.")
    if path.stat().st_size == 0:
        return
    ours = _is_answers_file(path) if kind == "generate" else _is_inspect_page(path)
    if not ours:
        raise MemgenError(
            f"{flag} {path}: the file exists and is not a {what}; choose a new path or remove "
            "it yourself."
        )
    if not overwrite:
        raise MemgenError(f"{flag} {path} holds a {what}; pass --overwrite to replace it.")


def _is_answers_file(path: Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                return False
            if not isinstance(row, dict) or not ANSWER_FIELDS <= row.keys():
                return False
    return True


def _is_inspect_page(path: Path) -> bool:
    with path.open("rb") as page:
        return HTML_TITLE in page.read(4096)


def _json_object(file: Path) -> dict | None:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, a folder, unreadable, not JSON
        return None
    return value if isinstance(value, dict) else None


def _listing(names: list[str], shown: int = 3) -> str:
    """'a, b, c and 4 more'."""
    head = ", ".join(names[:shown])
    return head if len(names) <= shown else f"{head} and {len(names) - shown} more"


# -------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_dir(target: str | Path, kind: str = "artifact"):
    """Yield a temporary directory that replaces ``target`` only if the block succeeds.

    A crash or Ctrl-C inside the block, or during the swap, leaves ``target`` exactly as it
    was. ``kind`` names what is written: ``artifact``, or an output kind of ``OUTPUTS`` (those
    get a marker file naming the kind and the files). An existing ``target`` is replaced only
    where ``check_output`` would allow it with --overwrite: commands ask the user when they
    validate their options; this refuses a folder that is not memgen's even if one forgot.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    check_output(target, kind=kind, overwrite=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        if kind != "artifact":
            files = sorted(p.name for p in tmp.iterdir())
            marker = {"kind": kind, "memgen_version": __version__, "files": files}
            (tmp / OUTPUT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        check_output(target, kind=kind, overwrite=True)  # as it is now, not as it was
        atomic.swap_in(tmp, target)  # the old target, if any, is now at tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_output(path: str | Path, data: str | bytes, *, kind: str) -> Path:
    """Write an output file of ``kind`` (``generate``, ``html``) atomically, refusing to
    replace a file that is not memgen's (see ``check_output``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_output(path, kind=kind, overwrite=True)
    atomic.write_file(path, data)
    return path
