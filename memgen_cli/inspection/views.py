"""What each view of inspect-memory shows for each ``memory.inject``, or why it does not apply.

The report carries this as ``views`` (docs/inspect-memory-schema.md), and the terminal view and
the HTML page list the views that do not apply, with the reason, instead of printing numbers.
With ``kv`` the memory is the weaver's keys and values at K slots, at every layer: there is no
input vector to take norms of and no reasoner output at the slots to read a logit lens from.
"""

from __future__ import annotations

KV_ONLY = "memory.inject: kv only: "
# view -> (what it shows with inject input, with inject kv); None where it does not apply
VIEWS = {
    "nearest_tokens": (
        "per latent, the vocabulary tokens whose input embeddings are nearest by cosine",
        "per slot, the vocabulary tokens whose input embeddings are nearest by cosine to the "
        "weaver's final-layer hidden state there (final norm applied, adapter on); those states "
        "are not what is written: the memory is the keys and values every layer computes there",
    ),
    "weaver_lens": (
        None,
        "the reasoner's LM head over the weaver's final-layer hidden state at each slot: what "
        "the weaver itself would predict next there (top 3)",
    ),
    "logit_lens": (
        "the reasoner's own next-token prediction at each latent position, at the last layer "
        "(every layer with --layers); --prompt only",
        None,
    ),
    "norms": ("each latent's L2 norm as a percentile of the token-embedding norms", None),
    "slot_norms": (
        None,
        "per layer, the mean L2 norm of the K slots' keys (and values) over that of the prompt "
        "and answer tokens' columns; --prompt only",
    ),
    "attention": (
        "attention the later answer tokens pay to the K latent positions, per layer and "
        "averaged over layers (mean over heads, eager attention); --prompt only",
        "attention the later answer tokens pay to the K slot columns, whose keys are the "
        "weaver's, per layer and averaged over layers (mean over heads, eager attention); "
        "--prompt only",
    ),
    "ablation": (
        "drop: the answer's teacher-forced log-probability with the latents removed from the "
        "stream (other latents as recorded), and a regeneration with the insertion suppressed; "
        "--prompt only",
        "drop: the answer's teacher-forced log-probability with the K slot columns masked out "
        "(other memories as recorded, positions unchanged), and a regeneration with the "
        "insertion suppressed; zero_values: the same answer with the slots' values zeroed at "
        "every layer (their keys still take attention); --prompt only",
    ),
    "clusters": (
        "k-means over mean-pooled latents (and --drop-cluster by the same vectors); --data",
        "k-means over the mean-pooled weaver final states at the slots (and --drop-cluster by "
        "the same vectors); --data",
    ),
}
# inject -> view -> why it does not apply
NOT_APPLICABLE = {
    "input": {
        "weaver_lens": KV_ONLY + "input latents are inputs, and logit_lens reads what the "
        "reasoner predicts at them",
        "slot_norms": KV_ONLY + "with input latents the reasoner computes its own keys and "
        "values there; norms compares the latents with the token embeddings",
    },
    "kv": {
        "logit_lens": "the reasoner never runs over the slot positions (their keys and values "
        "are the weaver's, written into its cache), so it makes no prediction there to read; "
        "weaver_lens reads the weaver's own final states at the slots instead",
        "norms": "the memory is keys and values at every layer, not vectors in the input space, "
        "so there is no latent norm to compare with the token-embedding norms; slot_norms "
        "compares the slots' keys and values with the context's at each layer",
    },
}


def views(inject: str) -> dict:
    """Every view, with ``applies`` and what it shows (``what``) or why not (``why``)."""
    out = {}
    for name, (for_input, for_kv) in VIEWS.items():
        what = for_kv if inject == "kv" else for_input
        why = NOT_APPLICABLE[inject].get(name)
        out[name] = {"applies": what is not None, "what": what, "why": why}
    return out


def not_applicable(report: dict) -> list[tuple[str, str]]:
    """(view, why) for each view that does not apply to the report's memory. Said for kv only:
    with input the views that do not apply are the kv ones, which nobody looks for there."""
    if report["inject"] != "kv":
        return []
    return [
        (name.replace("_", " "), view["why"])
        for name, view in report["views"].items()
        if not view["applies"]
    ]
