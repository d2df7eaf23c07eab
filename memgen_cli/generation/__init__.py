"""Weave-aware generation: a batched state machine over tensors that keeps every KV cache.

Per step, for all rows at once (see ``_Run``):
  1. choose the next token from the current logits (greedy, or temperature + top-p);
  2. feed it to the reasoner (one cached position) and remember it as weaver context;
  3. rows whose token ends a clause, with insertions left, ask the trigger;
  4. each invoking row's weaver reads the context that row has not read yet (its own cache)
     and writes K latents; only those rows run the K-position chunk through the reasoner (a
     sub-batch of their cache rows), and the chunk goes back into the batch cache, into K
     masked columns of each invoking row where it has them (``kv.write_rows``), else into K
     new columns masked for the rows that did not invoke, so the batch stays rectangular
     without growing by K for every row's every insertion; invoking rows take the logits
     after their latents, and their text positions shift by K.
With ``memory.inject: kv`` step 4 runs no reasoner chunk: the weaver's keys and values at the
K slots are written straight into those columns of the reasoner's cache (``kv.write_slots`` /
``append_slots``, at the positions the weaver computed them at), and the row's next logits are
still the boundary token's (memory changes the tokens after it). The weaver keeps its query
slots in its own cache (earlier memory is what it reads), so nothing woven is re-read as
context.
An invoking row's weave may wait one step (``_Run.DEFER``) to share the weaver pass and the
latent chunk with the next step's; a waiting row picks no token meanwhile, so nothing changes
but the number of passes.
Prompt latents are woven once, right after the prompt (where the assistant turn begins).
With ``repeat=G`` (GRPO rollouts) each prompt is prefilled and woven once, then its caches are
copied to G rows, instead of running G copies of the prompt as TRL's sampler does.

``reference_generate`` is the slow path the official code takes: one row at a time, and the
reasoner and the weaver recompute the whole sequence at every step. Tests check that both
paths give identical greedy tokens and next-token logits within 1e-4.

Modules: ``trace`` (what a run returns and streams), ``sampling`` (token choice, prompts),
``state`` (``_Run``, the state machine), ``cached`` (``iter_generate`` / ``generate``),
``reference`` (``reference_generate``), ``episodes`` (``play``: multi-turn episodes in an
environment, the caches kept across turns) and ``episode_reference`` (``reference_play``).
"""

from memgen_cli.config import GenerationConfig
from memgen_cli.generation.cached import decode, generate, iter_generate
from memgen_cli.generation.episode_reference import reference_play
from memgen_cli.generation.episodes import Episode, EpisodeConfig, parse_action, play
from memgen_cli.generation.reference import reference_generate
from memgen_cli.generation.sampling import _eos_ids, _pick, check_mode, encode_prompts, sample
from memgen_cli.generation.state import PASS_COST, _Run, pass_groups
from memgen_cli.generation.trace import (
    GenerationOutput,
    Insertion,
    MemoryTrace,
    Skip,
    StepEvent,
)

__all__ = [
    "PASS_COST",
    "Episode",
    "EpisodeConfig",
    "GenerationConfig",
    "GenerationOutput",
    "Insertion",
    "MemoryTrace",
    "Skip",
    "StepEvent",
    "check_mode",
    "decode",
    "encode_prompts",
    "generate",
    "iter_generate",
    "parse_action",
    "pass_groups",
    "play",
    "reference_generate",
    "reference_play",
    "sample",
    # private, read by tests and by models/prompt_learning.py
    "_Run",
    "_eos_ids",
    "_pick",
]
