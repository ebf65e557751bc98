"""Sampling: batched generation with behaviour log-probabilities and taxonomy, and multi-turn episodes.

`generate` runs all prompts × samples as one left-padded batch with explicit position ids and
a KV cache; a prompt shared by several rows (the G samples of a problem) is run once and its
cache copied to them. At each step it keeps, for the sampled token only, its log-probability
and its taxonomy (entropy, collision Σp², peak flag and first-order forecasts, docs/math.md),
at the sampling temperature and of the untruncated distribution (as TRL and verl record
log-probabilities), never a vocabulary-sized tensor per token.

What makes it fast on a CPU (measured by benchmarks/decode_speed.py):
- each distinct prompt is run once (`_prefill`): the G samples of a problem share its cache;
- full-attention cache layers write each step's keys and values into a preallocated buffer
  (`wapo.kv_cache`) instead of concatenating, which copies the whole cache every step;
- finished rows leave the batch once an eighth of it has finished (`DROP_FINISHED`), the
  rows past the live count moving into their slots, so the cache copies only those rows;
- the vocabulary-sized work of a step (log-softmax, the taxonomy's sums, the draw) runs in
  place in two reused buffers: fresh (rows × V) tensors each step cost more in page faults
  than in arithmetic;
- tokens are drawn by inverse CDF with one uniform per row (`_draw`); `torch.multinomial`
  draws one exponential per vocabulary entry, ~20x slower here.

`rollout` plays episodes: single-turn environments are one `generate` call; multi-turn ones
alternate model turns (ended by EOS, a stop string or the budget) with the environment's
replies, which enter the context as tokens with mask 0 (they are not the policy's actions).
A row's next turn starts from the keys and values its last turn left (`wapo.kv_cache.RowCache`)
and runs only the reply and what follows, not its whole context again. Only rows that can go
on keep theirs (not one that ended in one of `Environment.final_stop_strings`, an answer), and
a kept past lives until the next turn's prefill has copied it, not through that turn's decode.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from wapo.envs.base import Environment, Sample
from wapo.models import cache_argument
from wapo.taxonomy import TokenStats, _fields_from_sums, _log_softmax_, _moments_

if TYPE_CHECKING:
    from wapo.kv_cache import RowCache

DROP_FINISHED = 1 / 8
"""Finished rows leave the batch once they make up this fraction of it (a removal copies the cache)."""

SAMPLING_BLOCK = 128
"""Vocabulary entries per block of the inverse-CDF draw (`_draw`)."""


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
    behaviour_stats: TokenStats | None = None
    """The sampler's taxonomy of each completion token (fields shaped (len(completion_ids),), `logp`
    equal to `behaviour_logprobs`); environment tokens hold 0 (`is_peak` False). Set by `rollout`."""

    @property
    def model_tokens(self) -> int:
        return sum(self.completion_mask)


@dataclass
class Generation:
    tokens: list[list[int]]
    stopped: list[bool]
    """True when the row ended with EOS or a stop string (not the budget)."""
    stats: list[TokenStats]
    """Each row's taxonomy of its sampled tokens (fields shaped (len(tokens[i]),)), at the sampling
    temperature and of the untruncated distribution. Greedy decoding (temperature 0) records the
    limit T -> 0, a point mass on the argmax: logp 0, entropy 0, collision 1, peak, pred_* 0."""
    pasts: list[RowCache | None] | None = None
    """With `keep_past_at`: each row's cache when the row ended at one of those stop strings with
    budget left (it can go on: a tool call), covering its prompt and all its tokens but the last
    (never run), else None; all None for a model whose cache cannot hand rows on
    (`wapo.kv_cache.rows_can_be_taken`). Without `keep_past_at`: None."""

    @property
    def logprobs(self) -> list[list[float]]:
        return [s.logp.tolist() for s in self.stats]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: list[int] | int,
             temperature: float, top_p: float = 1.0, stop_strings: tuple[str, ...] = (),
             generator: torch.Generator | None = None, pasts: list[RowCache | None] | None = None,
             keep_past_at: tuple[str, ...] = ()) -> Generation:
    """Sample continuations of token-id prompts; temperature 0 means greedy.

    Rows stop at EOS (kept as the last token), at a stop string (decoded text ends with it)
    or at their own `max_new_tokens`. The same `generator` state gives the same tokens.
    pasts: per row, None or the cache of its prompt's first `length` tokens (a previous turn's
    `Generation.pasts`): only the rest of that prompt is run. The list is emptied in place once
    the new cache holds them, so a past the caller no longer names is freed before decoding.
    keep_past_at: stop strings after which a row's cache is kept (`Generation.pasts`), a subset
    of `stop_strings`: those after which the row goes on (tool calls), not those that end it.
    """
    n = len(prompts)
    if pasts is not None and len(pasts) != n:
        raise ValueError(f"pasts has {len(pasts)} entries for {n} prompts: give one per prompt (None for no past)")
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    steps = max([0, *budgets])
    tokens = torch.zeros(n, steps, dtype=torch.long)
    sums = torch.zeros(4, n, steps)  # log p_s, H, C and Σ p² log p of each sampled token
    lengths, stopped = [0] * n, [False] * n
    kept = [None] * n if keep_past_at else None
    was_training = model.training
    model.eval()
    try:
        if steps == 0 and pasts:
            pasts.clear()  # as promised: nothing holds them once generate returns
        if steps > 0:
            _decode(model, tokenizer, prompts, budgets, temperature=temperature, top_p=top_p, stop_strings=stop_strings,
                    generator=generator, pasts=pasts, tokens=tokens, sums=sums, lengths=lengths, stopped=stopped,
                    kept=kept, keep_past_at=keep_past_at)
    finally:
        model.train(was_training)
    stats = _fields_from_sums(*sums)
    return Generation(
        tokens=[tokens[i, :k].tolist() for i, k in enumerate(lengths)], stopped=stopped,
        stats=[TokenStats(*(getattr(stats, f.name)[i, :k] for f in dataclasses.fields(TokenStats)))
               for i, k in enumerate(lengths)],
        pasts=kept,
    )


def _decode(model, tokenizer, prompts, budgets, *, temperature, top_p, stop_strings, generator, pasts, tokens, sums,
            lengths, stopped, kept, keep_past_at) -> None:
    """`generate`'s decode loop: fills row i's `tokens[i]`, `sums[:, i]` (n, steps), `lengths[i]`, `stopped[i]`,
    and, when `kept` is a list, `kept[i]` (`Generation.pasts`).

    All rows advance together, so step t writes column t. A finished row stays in the batch
    (its samples ignored) until `DROP_FINISHED` of the batch has finished; then the rows past
    the live count move into the finished rows' slots (`_fill_from_the_end`), so the cache
    copies only them. A row that ends at a stop string of `keep_past_at` with budget left is
    copied out of the cache (`kept`) at that step, before any later step writes past its end.
    `pasts` is emptied once the prefill has copied it into the new cache.
    """
    from wapo.kv_cache import rows_can_be_taken, take_row

    device = next(model.parameters()).device
    rows = torch.as_tensor([i for i, b in enumerate(budgets) if b > 0], dtype=torch.long)  # original index of each row
    budget = torch.as_tensor(budgets, dtype=torch.long)[rows]
    live = torch.ones(len(rows), dtype=torch.bool)
    eos = torch.as_tensor(sorted(_eos_ids(model, tokenizer)))
    cache_arg = cache_argument(model)
    logits, cache, attention, positions = _prefill(model, [prompts[i] for i in rows], tokenizer.pad_token_id,
                                                   capacity=tokens.shape[1],
                                                   pasts=pasts and [pasts[i] for i in rows])
    if pasts:
        pasts.clear()  # the new cache holds them: a past the caller dropped is freed before the decode
    keep = kept is not None and rows_can_be_taken(cache)
    if kept is not None and not keep:
        warnings.warn(f"{type(model).__name__} has sliding-window or linear-attention layers, which do not hold "
                      f"a row's whole past: multi-turn rollouts run each turn's whole context again "
                      f"(no KV cache reuse)", stacklevel=2)
    scratch = torch.empty((2, *logits.shape), device=device)  # the sampler's (rows, V) buffers, reused
    for t in range(tokens.shape[1]):
        ids, step_sums = _sample(logits, temperature, top_p, generator, scratch[:, : len(logits)])
        ids_here = ids.cpu()
        tokens[rows[live], t] = ids_here[live]
        sums[:, rows[live], t] = torch.stack(step_sums).cpu()[:, live]
        ended = torch.isin(ids_here, eos) & live  # by EOS or, below, a stop string
        stop_at = {}  # row -> the stop string it ended at
        if stop_strings:
            for r in (live & ~ended).nonzero().flatten().tolist():
                stop_at[r] = _stop_string_at_end(tokenizer, tokens[rows[r], : t + 1].tolist(), stop_strings)
                ended[r] = stop_at[r] is not None
        finished = ended | (live & (budget <= t + 1))
        for r in finished.nonzero().flatten().tolist():
            lengths[rows[r]], stopped[rows[r]] = t + 1, bool(ended[r])
            if keep and stop_at.get(r) in keep_past_at and budget[r] > t + 1:
                kept[rows[r]] = take_row(cache, r, attention[r].bool())
        live &= ~finished
        if not live.any():
            return
        if (~live).sum() >= max(1.0, DROP_FINISHED * len(live)):  # drop finished rows from the batch and cache
            staying = _fill_from_the_end(live)
            cache.batch_select_indices(staying.to(device))
            rows, budget, live = rows[staying], budget[staying], live[staying]
            ids, attention, positions = (x[staying.to(device)] for x in (ids, attention, positions))
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        positions = positions + 1
        out = model(input_ids=ids.unsqueeze(-1), attention_mask=attention, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache, logits = getattr(out, cache_arg), out.logits[:, -1]


def _fill_from_the_end(live: torch.Tensor) -> torch.Tensor:
    """Indices of the `live` rows for `batch_select_indices`: the first k = live.sum() slots stay,
    and those of finished rows among them are refilled from the live rows past k, so the fewest
    rows move. [live, dead, live, dead, live, live] -> [0, 4, 2, 5].
    """
    k = int(live.sum())
    keep = torch.arange(k)
    keep[~live[:k]] = live[k:].nonzero().flatten() + k
    return keep


def _prefill(model, prompts: list[list[int]], pad: int, *, capacity: int, pasts: list[RowCache | None] | None = None):
    """Run `prompts` (left-padded, explicit positions) and get ready to decode `capacity` tokens.

    Each distinct prompt is run once and its cache copied to the rows that share it (the G
    samples of a problem). A row with a past (the cache of its prompt's first `length` tokens)
    runs only the rest: the pasts fill the first P positions, right-aligned, and the rest
    follows left-padded, the padding on both sides masked out of attention; positions go on
    from each row's past length. A row with a past of 3 tokens (k) and 2 to run (n), and one
    without a past: [. k k k | . . n n] and [. . . . | n n n n].

    Returns the last position's logits (n, V), the cache, the attention mask (n, P + width) and
    the last position ids (n, 1).
    """
    device = next(model.parameters()).device
    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    first_row: dict[int, int] = {}
    for row, u in enumerate(row_prompt):
        first_row.setdefault(u, row)
    held = [pasts[first_row[u]] if pasts else None for u in range(len(distinct))]
    done = [0 if past is None else past.length for past in held]
    rest = [p[d:] for p, d in zip(distinct, done)]
    if not all(rest):
        raise ValueError("a row's past covers its whole prompt: nothing is left to run for its next-token logits")
    past_width, width = max(done), max(map(len, rest))
    input_ids = torch.full((len(distinct), width), pad, dtype=torch.long)
    attention = torch.zeros((len(distinct), past_width + width), dtype=torch.long)
    for u, (p, d) in enumerate(zip(rest, done)):
        input_ids[u, width - len(p):] = torch.as_tensor(p)
        attention[u, past_width - d : past_width] = 1
        attention[u, past_width + width - len(p):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (torch.as_tensor(done, device=device)[:, None] + attention[:, past_width:].cumsum(-1) - 1).clamp(min=0)
    cache = _new_cache(model, past_width + width + capacity)
    if past_width:
        from wapo.kv_cache import fill_rows

        fill_rows(cache, held, past_width)
    cache_arg = cache_argument(model)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{cache_arg: cache})
    cache = getattr(out, cache_arg)
    row_prompt = torch.as_tensor(row_prompt, device=device)
    if len(distinct) < len(prompts):
        cache.batch_select_indices(row_prompt)
    return out.logits[row_prompt, -1], cache, attention[row_prompt], positions[row_prompt, -1:]


def _new_cache(model, capacity: int):
    """A cache that writes decode steps in place (`wapo.kv_cache`)."""
    from wapo.kv_cache import preallocated_cache  # imports transformers

    return preallocated_cache(model.config, capacity)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator,
            scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
    """Token ids (n,) drawn from `logits` (n, V), and each one's (log p_s, H, C, Σ p² log p).

    The four are of the untruncated distribution at the temperature, whatever `top_p` keeps,
    computed in float32 as the trainer computes them (`wapo.taxonomy`). Temperature 0 is
    greedy: the argmax, with the numbers of a point mass on it (0, 0, 1, 0). `scratch`: an
    optional (2, n, V) float32 buffer reused across calls, so that no step allocates (and page
    faults) vocabulary-sized tensors.
    """
    if temperature == 0:
        zeros = logits.new_zeros(logits.shape[0], dtype=torch.float32)
        return logits.argmax(-1), (zeros, zeros, torch.ones_like(zeros), zeros)
    if scratch is None:
        scratch = torch.empty((2, *logits.shape), device=logits.device)
    logp_all = scratch[0].copy_(logits).div_(temperature)
    _, probs = _log_softmax_(logp_all, out=scratch[1])
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        ids = _draw(torch.zeros_like(probs).scatter_(-1, order, sorted_p.masked_fill_(outside, 0)), generator)
    else:
        ids = _draw(probs, generator)
    logp = logp_all.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return ids, (logp, *_moments_(logp_all, probs))


def _draw(weights: torch.Tensor, generator) -> torch.Tensor:
    """One index per row of non-negative `weights` (n, V), drawn with probability weight / row sum.

    Inverse CDF with one float64 uniform u per row: the index k with F(k−1) ≤ u·F(V) < F(k), F the
    running sum. It is found in two levels, first the block of `SAMPLING_BLOCK` entries, then
    the entry inside it, so the float64 running sums cover V / B block totals and B entries, not
    V. `torch.multinomial(weights, 1)` draws the same distribution with V exponentials per row
    (~20x slower for a 49k vocabulary). A zero weight is never drawn, rounding included.
    """
    n, vocab = weights.shape
    pad = -vocab % SAMPLING_BLOCK
    blocks = (F.pad(weights, (0, pad)) if pad else weights).view(n, -1, SAMPLING_BLOCK)
    totals = blocks.sum(-1).double()
    ends = totals.cumsum(-1)  # (n, blocks): F at each block's end
    u = torch.rand(n, 1, dtype=torch.float64, device=weights.device, generator=generator) * ends[:, -1:]
    # the first block ending past u; where rounding puts u at the total, the last block with weight
    last_block = torch.searchsorted(ends, ends[:, -1:].contiguous())
    block = torch.minimum(torch.searchsorted(ends, u, right=True), last_block)
    before = ends.gather(-1, (block - 1).clamp(min=0)).masked_fill_(block == 0, 0)  # F before the block, <= u
    inside = blocks[torch.arange(n, device=weights.device), block.squeeze(-1)].double().cumsum(-1)
    last_entry = torch.searchsorted(inside, inside[:, -1:].contiguous())  # the last entry with weight
    entry = torch.minimum(torch.searchsorted(inside, u - before, right=True), last_entry)
    return (block * SAMPLING_BLOCK + entry).squeeze(-1)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {i for i in ids if i is not None}


def _stop_string_at_end(tokenizer, ids: list[int], stop_strings: tuple[str, ...]) -> str | None:
    """The longest of `stop_strings` that the decoded `ids` end with (the most specific), or None."""
    # a token covers at least one character, so this many tokens cover the longest stop string
    tail = tokenizer.decode(ids[-max(map(len, stop_strings)):], skip_special_tokens=True)
    return max((s for s in stop_strings if tail.endswith(s)), key=len, default=None)


def _concat_stats(first: TokenStats | None, then: TokenStats) -> TokenStats:
    if first is None:
        return then
    return TokenStats(*(torch.cat([getattr(first, f.name), getattr(then, f.name)])
                        for f in dataclasses.fields(TokenStats)))


def _blank_stats(n: int) -> TokenStats:
    """What is recorded for `n` tokens the policy did not sample (environment replies): zeros, no peak."""
    zeros = torch.zeros(n)
    return TokenStats(zeros, zeros, zeros, torch.zeros(n, dtype=torch.bool), zeros, zeros)


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
            generator: torch.Generator | None = None, keep_cache: bool = True) -> list[Episode]:
    """`samples_per_prompt` episodes per sample, rows of one sample adjacent (one group).

    keep_cache: each turn after the first runs only the tokens after the row's kept cache (its
    last sampled token and the environment's reply); False runs the whole context again each
    turn. Both give the same tokens and numbers up to float rounding (tests/test_kv_reuse.py).
    A row keeps its cache only after a stop string that is not one of `env.final_stop_strings`.
    """
    rows = [s for s in samples for _ in range(samples_per_prompt)]
    episodes = [Episode(prompt_ids=prompt_ids(tokenizer, env, s)) for s in rows]
    active = list(range(len(episodes)))
    pasts: dict[int, RowCache] = {}  # episode -> the cache of its context but the last token
    eos = _eos_ids(model, tokenizer)
    turns = max(env.max_turns, 1)
    tool_calls = tuple(s for s in env.stop_strings if s not in env.final_stop_strings) if keep_cache else ()
    for turn in range(turns):
        if not active:
            break
        gen = generate(
            model, tokenizer, [episodes[i].prompt_ids + episodes[i].completion_ids for i in active],
            max_new_tokens=[max_new_tokens - episodes[i].model_tokens for i in active],
            temperature=temperature, top_p=top_p, stop_strings=env.stop_strings, generator=generator,
            pasts=[pasts.pop(i, None) for i in active], keep_past_at=tool_calls if turn < turns - 1 else (),
        )
        kept = dict(zip(active, gen.pasts or [None] * len(active)))
        still_active, calls = [], []
        for row, i in enumerate(active):
            ep = episodes[i]
            ep.turns += 1
            ep.completion_ids += gen.tokens[row]
            ep.completion_mask += [True] * len(gen.tokens[row])
            ep.behaviour_logprobs += gen.stats[row].logp.tolist()
            ep.behaviour_stats = _concat_stats(ep.behaviour_stats, gen.stats[row])
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
            ep.behaviour_stats = _concat_stats(ep.behaviour_stats, _blank_stats(len(obs)))
            ep.finished = False  # the model still has to answer
            still_active.append(i)
        active = still_active
        pasts = {i: kept[i] for i in active if kept[i] is not None}
        del gen, kept  # the pasts of rows that stopped are freed here, the others once the next prefill copied them
    for ep in episodes:
        ep.text = tokenizer.decode(ep.completion_ids, skip_special_tokens=True)
    return episodes
