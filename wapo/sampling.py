"""Sampling: batched generation with behaviour log-probabilities, and multi-turn episodes.

`generate` runs all prompts × samples as one left-padded batch with explicit position ids and
a KV cache. At each step it keeps only the sampled token's log-probability (at the sampling
temperature, of the untruncated distribution, as TRL and verl record it), never a
vocabulary-sized tensor per step.

`rollout` plays episodes: single-turn environments are one `generate` call; multi-turn ones
alternate model turns (ended by EOS, a stop string or the budget) with the environment's
replies, which enter the context as tokens with mask 0 (they are not the policy's actions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wapo.envs.base import Environment, Sample
from wapo.models import cache_argument


@dataclass
class Episode:
    """One completion: model tokens (mask 1) and environment tokens (mask 0) after the prompt."""

    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)
    completion_mask: list[bool] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    """Ended by EOS, an answer or the environment; False means the budget ran out (truncated)."""
    turns: int = 0

    @property
    def model_tokens(self) -> int:
        return sum(self.completion_mask)


@dataclass
class Generation:
    tokens: list[list[int]]
    logprobs: list[list[float]]
    stopped: list[bool]
    """True when the row ended with EOS or a stop string (not the budget)."""


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: list[int] | int,
             temperature: float, top_p: float = 1.0, stop_strings: tuple[str, ...] = (),
             generator: torch.Generator | None = None) -> Generation:
    """Sample continuations of token-id prompts; temperature 0 means greedy.

    Rows stop at EOS (kept as the last token), at a stop string (decoded text ends with it)
    or at their own `max_new_tokens`.
    """
    device = next(model.parameters()).device
    n = len(prompts)
    budgets = torch.as_tensor([max_new_tokens] * n if isinstance(max_new_tokens, int) else max_new_tokens)
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.as_tensor(p)
        attention[i, width - len(p):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    eos = torch.as_tensor(sorted(_eos_ids(model, tokenizer)), device=device)

    was_training = model.training
    model.eval()
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    stopped = [False] * n
    rows = [i for i in range(n) if budgets[i] > 0]  # original index of each row still generating
    keep = torch.as_tensor(rows, dtype=torch.long, device=device)
    cache, cache_arg = None, cache_argument(model)
    step_ids, step_pos, attention = input_ids[keep], positions[keep], attention[keep]
    while rows:
        out = model(input_ids=step_ids, attention_mask=attention, position_ids=step_pos,
                    use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache = getattr(out, cache_arg)
        next_ids, next_logp = _sample(out.logits[:, -1].float(), temperature, top_p, generator)
        finished = torch.isin(next_ids, eos).tolist()
        for r, (i, tok, lp) in enumerate(zip(rows, next_ids.tolist(), next_logp.tolist())):
            tokens[i].append(tok)
            logprobs[i].append(lp)
            if not finished[r] and stop_strings and _ends_with_stop(tokenizer, tokens[i], stop_strings):
                finished[r] = True
            stopped[i] = finished[r]
        alive = [r for r, i in enumerate(rows) if not finished[r] and len(tokens[i]) < budgets[i]]
        if len(alive) < len(rows):  # drop finished rows from the batch and the KV cache
            keep = torch.as_tensor(alive, dtype=torch.long, device=device)
            if alive:
                cache.batch_select_indices(keep)
            next_ids, attention, step_pos = next_ids[keep], attention[keep], step_pos[keep]
            rows = [rows[r] for r in alive]
        step_ids = next_ids.unsqueeze(-1)
        attention = torch.cat([attention, torch.ones_like(step_ids)], dim=-1)
        step_pos = step_pos[:, -1:] + 1
    model.train(was_training)
    return Generation(tokens=tokens, logprobs=logprobs, stopped=stopped)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (n,) and their log-probabilities at the temperature (untruncated)."""
    if temperature == 0:
        ids = logits.argmax(-1)
        return ids, torch.zeros_like(ids, dtype=torch.float32)
    logp = torch.log_softmax(logits / temperature, -1)
    probs = logp.exp()
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return ids, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {i for i in ids if i is not None}


def _ends_with_stop(tokenizer, ids: list[int], stop_strings: tuple[str, ...]) -> bool:
    # a token covers at least one character, so this many tokens cover the longest stop string
    tail = tokenizer.decode(ids[-max(map(len, stop_strings)):], skip_special_tokens=True)
    return any(tail.endswith(s) for s in stop_strings)


OBSERVATION_TAIL_TOKENS = 8
"""A cut environment reply keeps its last tokens, so its closing tag survives."""


def _truncate(ids: list[int], limit: int) -> list[int]:
    if len(ids) <= limit:
        return ids
    tail = min(OBSERVATION_TAIL_TOKENS, limit // 2)
    return ids[: limit - tail] + ids[len(ids) - tail:]


def prompt_ids(tokenizer, env: Environment, sample: Sample) -> list[int]:
    """The sample's chat messages through the tokenizer's chat template, ready to generate.

    A base model without a chat template gets the messages' contents, one per line.
    """
    messages = env.prompt(sample)
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer.encode("\n".join(m["content"] for m in messages) + "\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def rollout(model, tokenizer, env: Environment, samples: list[Sample], *, samples_per_prompt: int,
            max_new_tokens: int, temperature: float, top_p: float = 1.0, max_observation_tokens: int = 256,
            generator: torch.Generator | None = None) -> list[Episode]:
    """`samples_per_prompt` episodes per sample, rows of one sample adjacent (one group)."""
    rows = [s for s in samples for _ in range(samples_per_prompt)]
    episodes = [Episode(prompt_ids=prompt_ids(tokenizer, env, s)) for s in rows]
    active = list(range(len(episodes)))
    eos = _eos_ids(model, tokenizer)
    turns = max(env.max_turns, 1)
    for turn in range(turns):
        if not active:
            break
        gen = generate(
            model, tokenizer, [episodes[i].prompt_ids + episodes[i].completion_ids for i in active],
            max_new_tokens=[max_new_tokens - episodes[i].model_tokens for i in active],
            temperature=temperature, top_p=top_p, stop_strings=env.stop_strings, generator=generator,
        )
        still_active, calls = [], []
        for row, i in enumerate(active):
            ep = episodes[i]
            ep.turns += 1
            ep.completion_ids += gen.tokens[row]
            ep.completion_mask += [True] * len(gen.tokens[row])
            ep.behaviour_logprobs += gen.logprobs[row]
            ep.finished = gen.stopped[row]
            # only a turn ended by a stop string (not EOS, not the budget) is a tool call
            tool_call = gen.stopped[row] and bool(gen.tokens[row]) and gen.tokens[row][-1] not in eos
            if tool_call and ep.model_tokens < max_new_tokens and turns > 1:
                calls.append(i)
        # one call for all of this turn's tool calls (a retriever takes them as one batch)
        texts = [tokenizer.decode(episodes[i].completion_ids, skip_special_tokens=True) for i in calls]
        replies = env.observe_batch([rows[i] for i in calls], texts)
        for i, reply in zip(calls, replies, strict=True):
            ep = episodes[i]
            if reply is None:
                continue
            if turn == turns - 1:  # no turn left to read the reply: the episode ran out of turns
                ep.finished = False
                continue
            obs = _truncate(tokenizer.encode(reply, add_special_tokens=False), max_observation_tokens)
            ep.completion_ids += obs
            ep.completion_mask += [False] * len(obs)
            ep.behaviour_logprobs += [0.0] * len(obs)
            ep.finished = False  # the model still has to answer
            still_active.append(i)
        active = still_active
    for ep in episodes:
        ep.text = tokenizer.decode(ep.completion_ids, skip_special_tokens=True)
    return episodes
