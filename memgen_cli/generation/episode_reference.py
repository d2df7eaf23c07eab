"""The slow path for episodes: one episode at a time, the reasoner and the weaver recomputing
their whole input at every step (``reference.py``'s streams). With ``keep_latents=False`` each
turn starts a new stream from the text history, the official code's way (latents never enter
the history; each turn re-reads it all). Greedy only. Tests require ``episodes.play`` to give
the same replies, actions and insertions; ``benchmarks/episodes.py`` times both."""

from __future__ import annotations

import torch

from memgen_cli.config import GenerationConfig
from memgen_cli.data.environment import Environment
from memgen_cli.generation.episodes import (
    Episode,
    EpisodeConfig,
    next_tokens,
    opening,
    parse_action,
)
from memgen_cli.generation.reference import _InputStream, _KVStream
from memgen_cli.generation.sampling import _eos_ids, check_mode, encode_prompts
from memgen_cli.generation.trace import Insertion, Skip
from memgen_cli.models.memgen import MemGenModel


@torch.no_grad()
def reference_play(
    model: MemGenModel,
    envs: list[Environment],
    cfg: GenerationConfig,
    episode: EpisodeConfig | None = None,
    system: str | None = None,
) -> list[Episode]:
    """``episodes.play``'s episodes, one at a time, with nothing cached."""
    check_mode(model, cfg.memory)
    if cfg.temperature > 0:
        raise ValueError("the reference path is greedy only")
    model.eval()
    episode = episode or EpisodeConfig()
    return [_play_one(model, env, cfg, episode, system, row) for row, env in enumerate(envs)]


def _play_one(model, env, cfg, episode: EpisodeConfig, system, row: int) -> Episode:
    tokenizer = model.tokenizer
    eos = set() if cfg.ignore_eos else set(_eos_ids(tokenizer).tolist())
    obs = env.reset()
    out = Episode(opening(obs, system), won=obs.won, done=obs.done)
    enc = encode_prompts(tokenizer, [out.messages], model.device)
    history = enc["input_ids"][0].tolist()  # the text so far, as token ids
    stream = _stream(model, history)
    for turn in range(episode.max_turns):
        if out.done:
            break
        if not episode.keep_latents:
            stream = _stream(model, history)  # re-read the whole text history
        woven, skips = _open(model, cfg, stream, row)
        reply, finished = _reply(model, cfg, stream, eos, row, woven, skips)
        text = tokenizer.decode(reply, skip_special_tokens=True)
        action = parse_action(text, obs.commands)
        obs = env.step(action)
        out.actions.append(action)
        out.rewards.append(obs.reward)
        out.replies.append(reply)
        out.finished.append(finished)
        out.insertions.append(woven)
        out.skips.append(skips)
        out.won, out.done = obs.won, obs.done
        if not out.done and turn + 1 < episode.max_turns:
            tail = next_tokens(tokenizer, out.messages, obs.text)
            history += reply + tail
            if episode.keep_latents:  # the stream holds the reply but its last picked token
                for token in ([] if finished else reply[-1:]) + tail:
                    stream.append(token)
        out.messages.append({"role": "assistant", "content": text})
        out.messages.append({"role": "user", "content": obs.text})
    return out


def _stream(model: MemGenModel, ids: list[int]):
    tensor = torch.tensor([ids], device=model.device)
    return (_KVStream if model.kv else _InputStream)(model, tensor)


def _weave(model, stream, kind, row, index, prob) -> list[Insertion]:
    if model.weaver.num_latents(kind) == 0:
        return []
    latents, states = stream.weave(kind)
    return [Insertion(row, index, kind, prob, latents, states)]


def _open(model, cfg: GenerationConfig, stream, row: int):
    """Where the turn begins: the trigger's one decision, and the prompt latents."""
    if cfg.memory == "off":
        return [], []
    prob = None
    if cfg.memory == "full" and model.trigger.is_trained:
        prob = float(model.trigger.probability(stream.hidden())[0])
        if prob < model.cfg.trigger_threshold:
            return [], [Skip(row, 0, prob)]
    return _weave(model, stream, "prompt", row, 0, prob), []


def _reply(model, cfg, stream, eos, row, woven, skips) -> tuple[list[int], bool]:
    """Greedy tokens to EOS or ``max_new_tokens``; inference latents at clause boundaries
    (added to ``woven``, and the trained trigger's refusals in ``full`` to ``skips``)."""
    left, reply = model.cfg.max_inference_insertions, []
    for step in range(cfg.max_new_tokens):
        token = int(model.lm_head(stream.hidden())[0].argmax())
        if token in eos:
            return reply, True
        reply.append(token)
        if step + 1 == cfg.max_new_tokens:
            break  # the last token is fed with what follows it
        stream.append(token)
        if cfg.memory != "off" and model.delimiters[token] and left > 0:
            trigger = model.trigger
            prob = float(trigger.probability(stream.hidden())[0]) if trigger.is_trained else None
            if cfg.memory == "weaver" or prob is None or prob >= model.cfg.trigger_threshold:
                left -= 1
                woven += _weave(model, stream, "inference", row, len(reply), prob)
            elif cfg.memory == "full":
                skips.append(Skip(row, len(reply), prob))
    return reply, False
