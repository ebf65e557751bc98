"""Multi-turn rollouts that keep each row's KV cache across turns equal those that re-run the context.

`rollout(keep_cache=True)` runs, at each turn after the first, only the row's last sampled
token and the environment's reply on the keys and values its previous turn left;
`keep_cache=False` runs the whole context again. Same tokens, same recorded numbers.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from wapo.envs.base import Environment, RewardResult
from wapo.kv_cache import RowCache, fill_rows, preallocated_cache, take_row
from wapo.models import cache_argument, load_tokenizer
from wapo.sampling import generate, rollout
from wapo.taxonomy import TokenStats


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny Llama at weight std 0.2: its next token depends on the context (as in test_sampling)."""
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), load_tokenizer(tiny_model_dir)


@dataclass
class ToolEnv(Environment):
    """A turn that ends in "?", "=" or "<" is a tool call; the reply's length depends on the text so far,
    so rows go on with replies of different lengths (padding between a row's past and its new tokens)."""

    max_turns: int = field(default=3, init=False)
    stop_strings: tuple[str, ...] = field(default=("?", "=", "<"), init=False)

    def prompt(self, sample):
        return [{"role": "user", "content": sample["question"]}]

    def reward(self, sample, completion):
        return RewardResult(0.0, False)

    def observe(self, sample, completion):
        return "\n:" + "x" * (len(completion) % 5) + ".\n"


SAMPLES = [{"question": "what is 2"}, {"question": "hello there"}, {"question": "ab"}]


class PrefillWidths:
    """Records the width of every forward that runs more than one token (a prefill)."""

    def __init__(self, model):
        self.widths = []
        self.handle = model.get_input_embeddings().register_forward_hook(self.record)

    def record(self, module, inputs, output):
        if inputs[0].shape[-1] > 1:
            self.widths.append(inputs[0].shape[-1])


def _both(model, tok, **kw):
    """Both rollouts: per `keep_cache`, the episodes, the prefills' widths and the warnings' texts."""
    out = {}
    for keep in (True, False):
        spy = PrefillWidths(model)
        generator = torch.Generator().manual_seed(7)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            episodes = rollout(model, tok, ToolEnv(), SAMPLES, samples_per_prompt=3, max_observation_tokens=6,
                               generator=generator, keep_cache=keep, **kw)
        spy.handle.remove()
        out[keep] = episodes, spy.widths, [str(w.message) for w in caught]
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_keeping_the_cache_gives_the_episodes_of_running_the_whole_context(tiny, temperature):
    model, tok = tiny
    (kept, kept_widths, _), (rerun, rerun_widths, _) = _both(model, tok, max_new_tokens=24,
                                                             temperature=temperature).values()
    # the case is exercised: replies and turns of different lengths; sampled, some rows end after 2 turns
    assert len({e.completion_mask.count(False) for e in kept}) > 1 and len({e.model_tokens for e in kept}) > 1
    assert temperature == 0 or {e.turns for e in kept} == {2, 3}
    for a, b in zip(kept, rerun, strict=True):
        assert a.completion_ids == b.completion_ids
        assert (a.completion_mask, a.turns, a.finished, a.text) == (b.completion_mask, b.turns, b.finished, b.text)
        torch.testing.assert_close(torch.tensor(a.behaviour_logprobs), torch.tensor(b.behaviour_logprobs),
                                   rtol=0, atol=1e-5)
        for f in dataclasses.fields(TokenStats):
            torch.testing.assert_close(getattr(a.behaviour_stats, f.name), getattr(b.behaviour_stats, f.name),
                                       rtol=0, atol=1e-5)
    # ... and the cache was kept: later turns ran only the last token and the reply (≤ 1 + 6 tokens)
    prompt_width = max(len(e.prompt_ids) for e in kept)
    assert kept_widths[0] == rerun_widths[0] == prompt_width
    assert len(kept_widths) == len(rerun_widths) > 1
    assert max(kept_widths[1:]) <= 7 and min(rerun_widths[1:]) > prompt_width


def test_a_kept_row_holds_its_context_without_padding_and_refills_in_place(tiny):
    model, tok = tiny
    short, long = tok.encode("ab", add_special_tokens=False), tok.encode("hello there", add_special_tokens=False)
    cache = preallocated_cache(model.config, 16)
    ids = torch.tensor([[0] * (len(long) - len(short)) + short, long])
    mask = (torch.arange(len(long)) >= len(long) - len(short)).long()
    attention = torch.stack([mask, torch.ones(len(long), dtype=torch.long)])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
          **{cache_argument(model): cache})
    row = take_row(cache, 0, attention[0].bool())
    assert isinstance(row, RowCache) and row.length == len(short)
    torch.testing.assert_close(row.layers[1][0], cache.layers[1].keys[0][:, -len(short):], rtol=0, atol=0)
    # refilled right-aligned into width 5: zeros before it
    refilled = preallocated_cache(model.config, 16)
    fill_rows(refilled, [row, None], 5)
    keys = refilled.layers[1].keys
    assert keys.shape[:3] == (2, model.config.num_key_value_heads, 5)
    assert keys[0, :, : 5 - len(short)].eq(0).all() and keys[1].eq(0).all()
    torch.testing.assert_close(keys[0, :, 5 - len(short):], row.layers[1][0], rtol=0, atol=0)


def test_taking_a_row_finds_its_positions_once_for_all_layers(tiny):
    """A boolean mask as index makes each layer look for the True positions again (on a GPU, a
    wait for the device per layer): `take_row` finds them once (one `nonzero`) and selects them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[str(func)] = self.counts.get(str(func), 0) + 1
            return func(*args, **(kwargs or {}))

    model, _ = tiny
    cache = preallocated_cache(model.config, 4)
    attention = torch.tensor([[0, 1, 1, 0, 1]])
    model(input_ids=torch.tensor([[5, 6, 7, 8, 9]]), attention_mask=attention, position_ids=torch.tensor([[0, 0, 1, 2, 2]]),
          use_cache=True, **{cache_argument(model): cache})
    with CountOps() as ops:
        row = take_row(cache, 0, attention[0].bool())
    assert ops.counts.get("aten.nonzero.default") == 1 and "aten.index.Tensor" not in ops.counts
    assert len(cache.layers) == 2 and ops.counts["aten.index_select.default"] == 2 * 2  # keys and values per layer
    for layer, (keys, values) in zip(cache.layers, row.layers, strict=True):
        torch.testing.assert_close(keys, layer.keys[0][:, [1, 2, 4]], rtol=0, atol=0)
        torch.testing.assert_close(values, layer.values[0][:, [1, 2, 4]], rtol=0, atol=0)


def test_generate_keeps_the_cache_of_rows_ended_by_a_stop_string_only(tiny):
    model, tok = tiny
    prompts = [tok.encode(q, add_special_tokens=False) for q in ("Q:what is 2\nA:", "Q:hello there\nA:")]
    # greedy: row 0 writes "FFFFFi?" (stop string "?"), row 1 "<<<<oPPL9W" (the budget of 10)
    gen = generate(model, tok, prompts, max_new_tokens=10, temperature=0.0, stop_strings=("?",),
                   keep_past_at=("?",))
    assert tok.decode(gen.tokens[0]) == "FFFFFi?" and gen.pasts[1] is None
    assert gen.pasts[0].length == len(prompts[0]) + 6  # the prompt and all tokens but the last ("?", never run)
    assert generate(model, tok, prompts, max_new_tokens=2, temperature=0.0).pasts is None  # nothing kept unless asked


@pytest.mark.parametrize("family", ["Qwen2Config", "Gemma2Config"])
def test_other_families_give_the_same_episodes_either_way(save_tiny_model, family):
    """Qwen2 (biases on q, k, v) keeps its cache; Gemma2's sliding-window layers hold only their
    window, so its rows cannot be handed on and each turn runs the whole context: same episodes."""
    import transformers

    from wapo.kv_cache import rows_can_be_taken

    extra = {"head_dim": 8} if family == "Gemma2Config" else {}
    path = save_tiny_model(getattr(transformers, family), initializer_range=0.2, **extra)
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    (kept, kept_widths, kept_warnings), (rerun, _, rerun_warnings) = _both(model, tok, max_new_tokens=16,
                                                                           temperature=1.0).values()
    assert [e.completion_ids for e in kept] == [e.completion_ids for e in rerun]
    assert [e.turns for e in kept] == [e.turns for e in rerun] and max(e.turns for e in kept) > 1
    torch.testing.assert_close(torch.tensor(sum((e.behaviour_logprobs for e in kept), [])),
                               torch.tensor(sum((e.behaviour_logprobs for e in rerun), [])), rtol=0, atol=1e-5)
    can_keep = rows_can_be_taken(preallocated_cache(model.config, 4))
    assert can_keep == (family == "Qwen2Config")
    assert (max(kept_widths[1:]) <= 7) == can_keep  # later turns ran only the new tokens, or everything
    # ... and a model that cannot keep its cache says so, at each generate call asked to keep one (turns 1
    # and 2 of 3; Python's default filter shows it once per process)
    reuse_off = [m.split(" has ")[0] for m in kept_warnings if "no KV cache reuse" in m]
    assert reuse_off == ([] if can_keep else ["Gemma2ForCausalLM"] * 2) and not rerun_warnings


def test_generate_keeps_no_cache_for_a_row_that_cannot_go_on(tiny):
    model, tok = tiny
    prompts = [tok.encode(q, add_special_tokens=False) for q in ("Q:what is 2\nA:", "Q:hello there\nA:")]
    # greedy as above: row 1 ends at "<" (its first token), an answer here; row 0 at "?" after 7 tokens
    gen = generate(model, tok, prompts, max_new_tokens=10, temperature=0.0, stop_strings=("?", "<"),
                   keep_past_at=("?",))
    assert [tok.decode(t) for t in gen.tokens] == ["FFFFFi?", "<"] and gen.stopped == [True, True]
    assert gen.pasts[0].length == len(prompts[0]) + 6 and gen.pasts[1] is None
    # a budget of 7: row 0's "?" is its last allowed token, so no turn can follow and nothing is kept
    gen = generate(model, tok, prompts, max_new_tokens=7, temperature=0.0, stop_strings=("?",), keep_past_at=("?",))
    assert tok.decode(gen.tokens[0]) == "FFFFFi?" and gen.stopped[0] and gen.pasts == [None, None]



def test_the_longest_stop_string_at_the_end_decides_whether_a_row_goes_on(tiny):
    model, tok = tiny
    prompts = [tok.encode("Q:what is 2\nA:", add_special_tokens=False)]
    # greedy "FFFFFi?" ends with both "?" (a tool call: the row would go on) and "i?" (final):
    # the longer, more specific one wins, so the row ends and keeps no past
    gen = generate(model, tok, prompts, max_new_tokens=10, temperature=0.0, stop_strings=("?", "i?"),
                   keep_past_at=("?",))
    assert tok.decode(gen.tokens[0]) == "FFFFFi?" and gen.stopped == [True] and gen.pasts == [None]
    # with "?" alone it goes on and keeps the cache of all but its last token
    gen = generate(model, tok, prompts, max_new_tokens=10, temperature=0.0, stop_strings=("?",), keep_past_at=("?",))
    assert gen.pasts[0].length == len(prompts[0]) + 6


def test_generate_wants_one_past_per_prompt(tiny):
    model, tok = tiny
    prompts = [tok.encode(q, add_special_tokens=False) for q in ("Q:a\nA:", "Q:b\nA:")]
    with pytest.raises(ValueError, match="pasts has 1 entries for 2 prompts"):
        generate(model, tok, prompts, max_new_tokens=3, temperature=0.0, pasts=[None])
    pasts = [None, None]
    generate(model, tok, prompts, max_new_tokens=0, temperature=0.0, pasts=pasts)
    assert pasts == []  # emptied even when nothing is decoded

@dataclass
class AnswerEnv(ToolEnv):
    """`ToolEnv` where "=" gives the answer: the episode ends there (no reply), as `</answer>` does in multihop."""

    final_stop_strings: tuple[str, ...] = field(default=("=",), init=False)

    def observe(self, sample, completion):
        return None if completion.endswith("=") else super().observe(sample, completion)


def test_a_kept_past_lives_until_the_next_prefill_and_only_rows_that_go_on_keep_one(tiny, monkeypatch):
    import weakref

    import wapo.kv_cache as kv_cache
    import wapo.sampling as sampling

    model, tok = tiny
    real_take, real_prefill = kv_cache.take_row, sampling._prefill
    taken = []  # per kept past: the generate call (its prefill's number) it was taken in, weak refs to its tensors
    prefills, alive_bytes = [], []

    def take_row(cache, row, tokens):
        past = real_take(cache, row, tokens)
        taken.append((len(prefills), [weakref.ref(t) for pair in past.layers for t in pair]))
        return past

    def prefill(*args, **kwargs):
        prefills.append(True)
        return real_prefill(*args, **kwargs)

    def at_each_forward(module, inputs, output):
        if inputs[0].shape[-1] == 1:  # a decode step: what pasts of earlier turns are still alive?
            alive_bytes.append(sum(t().numel() * t().element_size() for call, refs in taken if call < len(prefills)
                                   for t in refs if t() is not None))

    monkeypatch.setattr(kv_cache, "take_row", take_row)
    monkeypatch.setattr(sampling, "_prefill", prefill)
    handle = model.get_input_embeddings().register_forward_hook(at_each_forward)
    try:
        episodes = rollout(model, tok, AnswerEnv(), SAMPLES, samples_per_prompt=3, max_new_tokens=24,
                           temperature=1.0, max_observation_tokens=6, generator=torch.Generator().manual_seed(7))
    finally:
        handle.remove()
    # the case is exercised: episodes of 1, 2 and 3 turns; some answered ("=") before their last turn
    assert {e.turns for e in episodes} == {1, 2, 3} and len(prefills) == 3
    assert [e for e in episodes if e.text.endswith("=") and e.turns < 3]
    # a past is taken only for a turn the row goes on from: each episode's turns but its last (7 here;
    # 13 when answers and rows out of budget kept theirs too)
    assert len(taken) == sum(e.turns - 1 for e in episodes) > 0
    # ... and once the next turn's prefill has copied it into the new cache, nothing holds it: 0 bytes
    # of earlier turns' pasts are alive at any decode step (41 kB at a turn-2 step when they were held)
    assert len(alive_bytes) > 0 and max(alive_bytes) == 0


@pytest.mark.parametrize("share_prompts", [True, False])
def test_the_kept_cache_rollout_records_what_the_trainer_recomputes(tiny, share_prompts):
    """μ and the taxonomy recorded while sampling with kept caches (left-padded prompts of three
    lengths, replies of different lengths, rows ending in turns 1, 2 and 3) equal the trainer's
    pass over the whole episodes (`row_token_stats`, as `Trainer.token_stats` calls it)."""
    from wapo.batch import RolloutBatch, row_token_stats

    model, tok = tiny
    episodes = rollout(model, tok, AnswerEnv(), SAMPLES, samples_per_prompt=3, max_new_tokens=24, temperature=0.7,
                       max_observation_tokens=6, generator=torch.Generator().manual_seed(7), keep_cache=True)
    assert {e.turns for e in episodes} == {1, 2, 3} and len({len(e.prompt_ids) for e in episodes}) == 3
    batch = RolloutBatch.from_episodes(episodes, torch.zeros(len(episodes)))
    assert sum(e.completion_mask.count(False) for e in episodes) > 0  # replies inside rows, masked out
    with torch.no_grad():
        stats = row_token_stats(model, batch, list(range(len(batch))), temperature=0.7, chunk_size=64,
                                share_prompts=share_prompts)
    m = batch.mask
    torch.testing.assert_close(stats.logp[m], batch.old_logprobs[m], rtol=0, atol=1e-5)
    for f in dataclasses.fields(TokenStats):
        recomputed, recorded = getattr(stats, f.name)[m], getattr(batch.sampler_stats, f.name)[m]
        if f.name == "is_peak":
            assert torch.equal(recomputed, recorded)
        else:
            torch.testing.assert_close(recomputed, recorded, rtol=0, atol=1e-5)
