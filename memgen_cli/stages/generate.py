"""``memgen generate``: answer one question, a JSONL file of them, or chat interactively.

Every memory insertion is shown inline as a dim marker such as ``⟨mem 8⟩``. With a retrieval
artifact (``--artifact R`` alone, or ``--retrieval R`` beside a weaver) each question comes
after its retrieved examples (``retrieval/prompt.py``), and an answer records their ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from memgen_cli.artifacts import read_manifest, require_kind
from memgen_cli.config import GenerationConfig
from memgen_cli.console import make_console
from memgen_cli.data.base import jsonl_objects
from memgen_cli.errors import MemgenError
from memgen_cli.generation import (
    GenerationOutput,
    Insertion,
    Skip,
    StepEvent,
    encode_prompts,
    generate,
    iter_generate,
)
from memgen_cli.outputs import check_output, write_output
from memgen_cli.rendering import MARKER, segments
from memgen_cli.retrieval import Shots, open_shots
from memgen_cli.stages import generate_play
from memgen_cli.stages.common import (
    Session,
    check_memory,
    insertion_record,
    open_session,
    resolve_memory,
    resolve_suffix,
    user_message,
)


@dataclass
class GenerateOptions:
    prompt: str | None = None
    input: Path | None = None
    output: Path | None = None
    interactive: bool = False
    base: str | None = None
    artifact: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    allow_base_mismatch: bool = False
    prompt_suffix: str | None = None
    batch_size: int = 8
    json: bool = False
    gen: GenerationConfig = field(default_factory=GenerationConfig)
    overwrite: bool = False  # replace an answers file of an earlier run at ``output``
    retrieval: Path | None = None  # a retrieval artifact whose examples frame each question
    play: str | None = None  # a game task: play one game and print it (``generate_play.py``)
    task_options: list[str] = field(default_factory=list)  # KEY=VALUE, as eval takes them
    play_seed: int | None = None  # --seed as given: picks the game as eval's data seed does


def run(opts: GenerateOptions, console: Console | None = None) -> object:
    """Validate, build, then answer (one-shot, batch or interactive)."""
    console = console or make_console()
    if opts.play is not None:
        return generate_play.run(opts, console)
    modes = sum([opts.prompt is not None, opts.input is not None, opts.interactive])
    if modes != 1:
        raise MemgenError(
            "Give exactly one of: a PROMPT argument, --input FILE, --interactive, or --play GAME."
        )
    if opts.input is not None:
        prompts = read_prompts(opts.input)
        if opts.output is None:
            raise MemgenError("--input needs --output OUT.jsonl for the answers.")
        check_output(opts.output, kind="generate", overwrite=opts.overwrite)
    check_memory(opts.gen.memory)
    session, shots = open_models(opts)
    note = None if opts.json else console
    if shots is not None and not session.has_memory:  # a retrieval artifact alone
        if note is not None:
            note.print("[dim]retrieval artifact: memory off, its examples before each question[/]")
        gen = replace(opts.gen, memory="off")
        suffix = resolve_suffix(replace(session, manifest=shots.manifest), opts.prompt_suffix, note)
    else:
        gen = replace(opts.gen, memory=resolve_memory(session, opts.gen.memory, note))
        suffix = resolve_suffix(session, opts.prompt_suffix, note)
    if opts.interactive:
        return chat(session, gen, suffix, console, shots)
    if opts.input is not None:
        return answer_file(
            session, gen, suffix, prompts, opts.output, opts.batch_size, console, shots
        )
    return answer_one(session, gen, suffix, opts.prompt, opts.json, console, shots)


def open_models(opts: GenerateOptions) -> tuple[Session, Shots | None]:
    """The session, and the retrieval artifact that frames each question (None without one):
    ``--artifact R`` of kind retrieval (then the plain reasoner it was built on answers) or
    ``--retrieval R`` beside a weaver's ``--artifact``."""
    artifact, retrieval = opts.artifact, opts.retrieval
    if artifact is not None and read_manifest(artifact).get("kind") == "retrieval":
        if retrieval is not None:
            raise MemgenError(
                "Give one retrieval artifact: --artifact RETRIEVAL alone, or --artifact WEAVER "
                "--retrieval RETRIEVAL."
            )
        artifact, retrieval = None, artifact
    base = opts.base
    if retrieval is not None:
        manifest = read_manifest(retrieval)
        require_kind(manifest, retrieval, "retrieval")
        if artifact is None and base is None:
            base = manifest["reasoner"]["name"]
    session = open_session(base, artifact, opts.device, opts.dtype, opts.allow_base_mismatch)
    if retrieval is None:
        return session, None
    return session, open_shots(retrieval, session.base, opts.allow_base_mismatch)


def ask(
    session: Session, shots: Shots | None, suffix: str, questions: list[str]
) -> tuple[list[list[dict]], list[list[str]] | list[None]]:
    """Each question's chat messages (after its retrieved examples, with ``shots``) and the
    retrieved ids (None each without)."""
    messages = [[user_message(q, suffix)] for q in questions]
    if shots is None:
        return messages, [None] * len(questions)
    return shots.frame(session.model, messages, questions, suffix)


def _run_batch(
    session: Session, gen: GenerationConfig, messages: list[list[dict]]
) -> GenerationOutput:
    enc = encode_prompts(session.model.tokenizer, messages, session.model.device)
    return generate(session.model, enc["input_ids"], enc["attention_mask"], gen)


def render(session: Session, tokens, insertions) -> Text:
    text = Text()
    for kind, piece in segments(session.model.tokenizer, tokens, insertions):
        text.append(piece, style="dim cyan" if kind == "mem" else None)
    return text


def record(
    session: Session,
    question: str,
    out: GenerationOutput,
    row: int,
    gen: GenerationConfig,
    retrieved: list[str] | None = None,
) -> dict:
    tok = session.model.tokenizer
    ins = out.trace.for_row(row)
    return {
        "prompt": question,
        "completion": tok.decode(out.tokens[row], skip_special_tokens=True),
        "memory": gen.memory,
        "num_tokens": len(out.tokens[row]),
        "finished": out.finished[row],
        "insertions": [insertion_record(i) for i in ins],
        "skipped": [
            {"token_index": k.token_index, "trigger_prob": round(k.trigger_prob, 4)}
            for k in out.trace.skips_for_row(row)
        ],
        **({} if retrieved is None else {"retrieved": retrieved}),
    }


def answer_one(session, gen, suffix, question, as_json, console, shots=None) -> dict:
    messages, retrieved = ask(session, shots, suffix, [question])
    out = _run_batch(session, gen, messages)
    result = record(session, question, out, 0, gen, retrieved[0])
    if as_json:
        print(json.dumps(result, ensure_ascii=False))  # not rich: no wrapping, no markup
    else:
        console.print(render(session, out.tokens[0], out.trace.for_row(0)))
        n = len(result["insertions"])
        found = f"; retrieved {', '.join(retrieved[0])}" if retrieved[0] is not None else ""
        console.print(
            Text(f"\n[memory {gen.memory}: {n} insertion{'s' * (n != 1)}{found}]", style="dim")
        )
    return result


def read_prompts(path: Path) -> list[str]:
    """A JSONL file with one object per line holding "prompt" (or "question")."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise MemgenError(f"--input {path} {what}; give a JSONL file of prompts.")
    prompts = []
    for number, obj in jsonl_objects(path):  # not UTF-8, not a JSON object: a message each
        text = obj.get("prompt", obj.get("question"))
        if not isinstance(text, str):
            raise MemgenError(
                f'{path} line {number} needs a "prompt" (or "question") string field.'
            )
        prompts.append(text)
    if not prompts:
        raise MemgenError(f"{path} holds no prompts.")
    return prompts


def answer_file(
    session, gen, suffix, prompts, output: Path, batch_size, console, shots=None
) -> Path:
    rows = []
    columns = [TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("generate", total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            messages, retrieved = ask(session, shots, suffix, chunk)
            out = _run_batch(session, gen, messages)
            rows += [record(session, q, out, i, gen, retrieved[i]) for i, q in enumerate(chunk)]
            progress.advance(task, len(chunk))
    # atomic: an interrupted run never leaves half a file
    write_output(output, "".join(json.dumps(r) + "\n" for r in rows), kind="generate")
    console.print(f"wrote {len(rows)} answers to {output}")
    return output


# --------------------------------------------------------------------------- interactive
HELP = "commands: /memory off|weaver|full, /trace, /clear, /exit (Ctrl-D also leaves)"


def chat(
    session: Session, gen: GenerationConfig, suffix: str, console: Console, shots=None
) -> list[dict]:
    """A multi-turn REPL with streamed answers and memory markers; with ``shots``, each new
    question comes after its retrieved examples (kept out of the history)."""
    history: list[dict] = []
    last_trace: list = []
    console.print(Text(f"memgen chat — memory {gen.memory}. {HELP}", style="dim"))
    while True:
        try:
            line = console.input("[bold green]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return history
        if not line:
            continue
        if line.startswith("/"):
            verb, *args = line.split()
            if verb == "/exit":
                return history
            if verb == "/clear":
                history.clear()
                console.print(Text("history cleared", style="dim"))
            elif verb == "/trace":
                console.print(trace_table(last_trace))
            elif verb == "/memory" and len(args) == 1:
                try:
                    gen = replace(gen, memory=resolve_memory(session, args[0], console))
                    console.print(Text(f"memory {gen.memory}", style="dim"))
                except MemgenError as exc:
                    console.print(f"[red]{exc}[/]")
            else:
                console.print(Text(HELP, style="dim"))
            continue
        history.append(user_message(line, suffix))
        context = history
        if shots is not None:
            [context], [ids] = shots.frame(session.model, [history], [line], suffix)
            console.print(Text(f"[retrieved {', '.join(ids)}]", style="dim"))
        try:
            reply, last_trace = stream_reply(session, gen, context, console)
        except KeyboardInterrupt:
            console.print(Text("\n[interrupted]", style="dim"))
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def stream_reply(session: Session, gen: GenerationConfig, history, console: Console):
    tok = session.model.tokenizer
    enc = encode_prompts(tok, [history], session.model.device)
    console.print("[bold blue]memgen>[/] ", end="")
    tokens: list[int] = []
    shown = ""
    result = None
    for event in iter_generate(session.model, enc["input_ids"], enc["attention_mask"], gen):
        if not isinstance(event, StepEvent):
            result = event
            break
        if event.tokens is not None and event.active[0]:
            tokens.append(int(event.tokens[0]))
        text = tok.decode(
            [t for t in tokens if t not in tok.all_special_ids], skip_special_tokens=True
        )
        if text.startswith(shown) and not text.endswith("\ufffd"):
            console.print(text[len(shown) :], end="", markup=False, highlight=False)
            shown = text
        for ins in event.insertions:
            console.print(Text(MARKER.format(ins.latents.shape[0]), style="dim cyan"), end="")
    console.print()
    trace = (result.trace.for_row(0) + result.trace.skips_for_row(0)) if result else []
    return tok.decode(result.tokens[0], skip_special_tokens=True), trace


def trace_table(events) -> Table:
    """Insertions of the last answer, and (memory full) the boundaries the trigger skipped."""
    insertions = [e for e in events if isinstance(e, Insertion)]
    table = Table(title="insertions in the last answer")
    for col in ("#", "kind", "after token", "trigger p", "K", "mean ‖latent‖"):
        table.add_column(col)
    for n, ins in enumerate(insertions):
        rec = insertion_record(ins)
        p = "always" if ins.trigger_prob is None else f"{ins.trigger_prob:.3f}"
        norms = rec["latent_norms"]  # None with memory.inject kv: keys and values, no latents
        mean = f"{sum(norms) / len(norms):.3f}" if norms else "-"
        table.add_row(str(n), ins.kind, str(ins.token_index), p, str(rec["num_latents"]), mean)
    for skip in sorted((e for e in events if isinstance(e, Skip)), key=lambda k: k.token_index):
        table.add_row("-", "skipped", str(skip.token_index), f"{skip.trigger_prob:.3f}", "0", "-")
    return table
