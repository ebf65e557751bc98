"""Sampling on the tiny model: padding and positions, behaviour log-probabilities, budgets, EOS,
stop strings, nucleus sampling, and the masking of environment tokens in multi-turn episodes."""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import wapo.sampling as sampling
from wapo.batch import RolloutBatch, row_token_stats
from wapo.envs.base import ENVIRONMENTS, Environment, RewardResult
from wapo.models import cache_argument, load_tokenizer
from wapo.sampling import Episode, Generation, generate, prompt_ids, rollout
from wapo.taxonomy import TokenStats


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny Llama re-initialised with weights of std 0.2 (not 0.02), and its tokenizer.

    At std 0.02 the next-token distribution is nearly uniform and greedy decoding repeats one
    character whatever the context; at 0.2 it depends on the context, so a padding mistake
    (attending to the left padding) changes the greedy continuation.
    """
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), load_tokenizer(tiny_model_dir)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


@contextmanager
def _steered(model, edit):
    """Call `edit(call_index, logits)` on the (n, 1, V) output-layer logits of each forward."""
    calls = [0]

    def hook(module, inputs, logits):
        edit(calls[0], logits)
        calls[0] += 1
        return logits

    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def test_greedy_continuation_does_not_depend_on_the_left_padding(tiny):
    model, tok = tiny
    short, long = _ids(tok, "Q:say 1\nA:"), _ids(tok, "Q:please say the digit seven\nA:")
    alone = generate(model, tok, [short], max_new_tokens=8, temperature=0.0)
    batched = generate(model, tok, [long, short], max_new_tokens=8, temperature=0.0)
    # batched, `short` gets 21 pad tokens on its left, masked out; its positions start at 0
    # (RoPE is blind to a shift of all positions, so on Llama this checks the attention mask)
    assert len(long) - len(short) == 21
    assert batched.tokens[1] == alone.tokens[0]
    assert len(set(alone.tokens[0])) > 3  # a context-dependent continuation, not one repeated token


def test_behaviour_logprobs_equal_a_full_forward_at_the_temperature(tiny):
    model, tok = tiny
    prompts = [_ids(tok, "Q:say 1\nA:"), _ids(tok, "Q:a longer question\nA:"), _ids(tok, "Q:say 1\nA:")]
    gen = generate(model, tok, prompts, max_new_tokens=6, temperature=1.3,
                   generator=torch.Generator().manual_seed(0))
    episodes = [Episode(p, t, [True] * len(t), lp) for p, t, lp in zip(prompts, gen.tokens, gen.logprobs)]
    batch = RolloutBatch.from_episodes(episodes, torch.zeros(3))
    # generate: left padding, KV cache, one token at a time; row_token_stats: right padding, one pass
    stats = row_token_stats(model, batch, [0, 1, 2], temperature=1.3, chunk_size=4)
    assert int(batch.mask.sum()) == sum(map(len, gen.tokens)) > 0
    torch.testing.assert_close(stats.logp[batch.mask], batch.old_logprobs[batch.mask], rtol=0, atol=1e-4)
    at_1 = row_token_stats(model, batch, [0, 1, 2], temperature=1.0, chunk_size=4)
    assert (at_1.logp - batch.old_logprobs)[batch.mask].abs().max() > 1e-2  # the temperature matters


def _cat(stats: list[TokenStats]) -> TokenStats:
    return TokenStats(*(torch.cat([getattr(s, f.name) for s in stats]) for f in dataclasses.fields(TokenStats)))


def test_the_sampler_records_the_taxonomy_the_trainer_computes(tiny):
    model, tok = tiny
    # two prompts of 3 samples each (each prompt run once); rows end at their own budgets or
    # EOS, so finished rows leave the batch and its cache on the way
    prompts = [_ids(tok, "Q:say 1\nA:")] * 3 + [_ids(tok, "Q:a longer question\nA:")] * 3
    gen = generate(model, tok, prompts, max_new_tokens=[12, 3, 8, 12, 5, 10], temperature=1.3,
                   generator=torch.Generator().manual_seed(0))
    episodes = [Episode(p, t, [True] * len(t), lp) for p, t, lp in zip(prompts, gen.tokens, gen.logprobs)]
    batch = RolloutBatch.from_episodes(episodes, torch.zeros(6))
    # the trainer's pass: right padding, no cache, the chunked output layer
    trainer = row_token_stats(model, batch, list(range(6)), temperature=1.3, chunk_size=4)
    sampler = _cat(gen.stats)
    assert len(sampler.logp) == int(batch.mask.sum()) == sum(map(len, gen.tokens)) > 30
    for name in ("logp", "entropy", "collision", "pred_dlogp", "pred_dentropy"):
        torch.testing.assert_close(getattr(sampler, name), getattr(trainer, name)[batch.mask], rtol=0, atol=1e-5)
    tie = (sampler.logp.exp() - sampler.collision).abs() < 1e-5  # p_s = C within rounding: either side
    assert torch.equal(sampler.is_peak[~tie], trainer.is_peak[batch.mask][~tie])
    assert sampler.is_peak.any() and not sampler.is_peak.all()  # both kinds occur
    assert sampler.entropy.max() - sampler.entropy.min() > 0.1  # varied distributions, not one repeated


def test_greedy_decoding_records_a_point_mass(tiny):
    model, tok = tiny
    eos = tok.eos_token_id

    def no_eos(call, logits):
        logits[..., eos] = -math.inf

    with _steered(model, no_eos):
        gen = generate(model, tok, [_ids(tok, "Q:say 1\nA:")], max_new_tokens=5, temperature=0.0)
    (stats,) = gen.stats
    # the limit T -> 0: p = 1 on the argmax, so log p = 0, H = 0, C = 1, p_s >= C, and
    # pred_dlogp = 1 - 2·1 + 1 = 0, pred_dentropy = -[1·(0 + 0) - (0 + 1·0)] = 0
    assert stats.logp.tolist() == stats.entropy.tolist() == [0.0] * 5
    assert stats.collision.tolist() == [1.0] * 5 and stats.is_peak.all()
    assert stats.pred_dlogp.tolist() == stats.pred_dentropy.tolist() == [0.0] * 5


def test_the_same_generator_seed_gives_the_same_tokens(tiny):
    model, tok = tiny
    prompts = [_ids(tok, "Q:say 1\nA:")] * 4

    def sample(seed):
        return generate(model, tok, prompts, max_new_tokens=10, temperature=1.5,
                        generator=torch.Generator().manual_seed(seed))

    first, again, other = sample(0), sample(0), sample(1)
    assert first.tokens == again.tokens and first.logprobs == again.logprobs
    assert first.tokens != other.tokens
    assert len({tuple(t) for t in first.tokens}) > 1  # rows of one prompt draw their own tokens


def test_a_shared_prompt_runs_once_and_its_rows_continue_as_alone(tiny):
    model, tok = tiny
    p, q = _ids(tok, "Q:say 1\nA:"), _ids(tok, "Q:say the digit 2\nA:")
    shapes = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        together = generate(model, tok, [p, q, p, p], max_new_tokens=6, temperature=0.0)
    finally:
        hook.remove()
    assert shapes[0] == (2, len(q))  # the prompt pass: the 2 distinct prompts, left-padded to q
    assert shapes[1] == (4, 1)  # then one token for each of the 4 rows
    for row, prompt in enumerate([p, q, p, p]):
        assert together.tokens[row] == generate(model, tok, [prompt], max_new_tokens=6, temperature=0.0).tokens[0]


@pytest.mark.parametrize("drop", [0.0, 0.5, 1.0])  # at each finish, at half the batch, never
def test_dropping_finished_rows_from_the_batch_changes_no_token(tiny, monkeypatch, drop):
    model, tok = tiny
    eos = tok.eos_token_id

    def no_eos(call, logits):
        logits[..., eos] = -math.inf

    prompts = [_ids(tok, f"Q:say {d}\nA:") for d in range(6)]
    budgets = [1, 9, 2, 9, 3, 9]
    with _steered(model, no_eos):
        alone = [generate(model, tok, [p], max_new_tokens=b, temperature=0.0).tokens[0]
                 for p, b in zip(prompts, budgets)]
        monkeypatch.setattr(sampling, "DROP_FINISHED", drop)
        together = generate(model, tok, prompts, max_new_tokens=budgets, temperature=0.0)
    assert together.tokens == alone
    assert [len(t) for t in together.tokens] == budgets
    assert len({tuple(t) for t in alone}) == 6  # the prompts lead to different continuations


def test_the_preallocated_cache_writes_each_step_in_place(tiny):
    from wapo.kv_cache import preallocated_cache

    model, _ = tiny
    ids = torch.randint(2, 40, (4, 10), generator=torch.Generator().manual_seed(0))
    cache_arg = cache_argument(model)

    def step(rows, t):  # one token for `rows`, checked against the logits of a pass without cache
        logits = model(input_ids=ids[rows, t:t + 1], use_cache=True, **{cache_arg: cache}).logits[:, -1]
        torch.testing.assert_close(logits, full[rows, t], rtol=0, atol=1e-5)

    def buffers():
        return [layer.keys.data_ptr() for layer in cache.layers]

    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = preallocated_cache(model.config, capacity=10)
        model(input_ids=ids[:, :5], use_cache=True, **{cache_arg: cache})
        step([0, 1, 2, 3], 5)  # the prompt's keys and values move into buffers with room for 10
        first = buffers()
        step([0, 1, 2, 3], 6)
        assert buffers() == first and [layer.keys.shape[2] for layer in cache.layers] == [7, 7]  # no copy
        # row 0 finished: row 3 moves into its slot, in place (the only row copied)
        cache.batch_select_indices(torch.tensor([3, 1, 2]))
        step([3, 1, 2], 7)
        assert buffers() == first
        # slot 0 <- slot 1 and slot 1 <- slot 0 would overwrite a row before reading it: a new buffer
        cache.batch_select_indices(torch.tensor([1, 0]))
        step([1, 3], 8)
        assert buffers() != first


# sparse weights over 600 entries: blocks of 128 (the last one padded), mass on both sides of
# each block edge, zeros elsewhere; integer weights, total 20 (the draw needs no normalising)
SPARSE = {0: 1.0, 1: 4.0, 255: 2.0, 256: 3.0, 300: 4.0, 511: 2.0, 512: 2.0, 599: 2.0}
CHI2_999 = {7: 24.32, 9: 27.88}  # chi-square quantiles at 0.999 by degrees of freedom


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draw", ["inverse_cdf", "multinomial"])
def test_the_draw_follows_the_weights(draw):
    # the same goodness-of-fit test passes for sampling._draw and for torch.multinomial
    weights = torch.zeros(600)
    weights[list(SPARSE)] = torch.tensor(list(SPARSE.values()))
    batch = weights.expand(20_000, 600)
    gen = torch.Generator().manual_seed(0)
    if draw == "inverse_cdf":
        ids = sampling._draw(batch, gen)
    else:
        ids = torch.multinomial(batch, 1, generator=gen).squeeze(-1)
    counts = torch.bincount(ids, minlength=600).double()
    assert counts[weights == 0].sum() == 0  # zero weight: never drawn
    nonzero = weights > 0
    assert _chi2(counts[nonzero], weights[nonzero].double() / 20) < CHI2_999[7]


def test_the_draw_follows_a_softmax_over_a_large_vocabulary():
    # 1,000 entries (not a multiple of the block), probabilities from 8e-7 to 0.05; the test
    # groups tokens into 10 bins of about equal probability (0.09 to 0.11)
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 1.5
    probs = torch.softmax(logits, -1)
    ids = sampling._draw(probs.expand(40_000, 1000), torch.Generator().manual_seed(0))
    order = probs.argsort()
    bin_of = torch.empty(1000, dtype=torch.long)
    bin_of[order] = torch.bucketize(probs[order].cumsum(0), torch.linspace(0.1, 0.9, 9))
    counts = torch.bincount(bin_of[ids], minlength=10).double()
    bin_probs = torch.zeros(10, dtype=torch.float64).index_add_(0, bin_of, probs.double())
    assert bin_probs.min() > 0.09
    assert _chi2(counts, bin_probs) < CHI2_999[9]


def test_same_uniform_same_token():
    # the draw is a function of the generator's state: equal seeds, equal tokens
    weights = torch.softmax(torch.randn(8, 700, generator=torch.Generator().manual_seed(2)), -1)
    first = sampling._draw(weights, torch.Generator().manual_seed(5))
    assert torch.equal(first, sampling._draw(weights, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, sampling._draw(weights, torch.Generator().manual_seed(6)))


def test_each_row_stops_at_its_own_budget(tiny):
    model, tok = tiny
    eos = tok.eos_token_id

    def no_eos(call, logits):
        logits[..., eos] = -math.inf

    prompt = _ids(tok, "Q:say 1\nA:")
    with _steered(model, no_eos):
        gen = generate(model, tok, [prompt] * 3, max_new_tokens=[0, 2, 5], temperature=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in gen.tokens] == [0, 2, 5]
    assert [len(lp) for lp in gen.logprobs] == [0, 2, 5]
    assert gen.stopped == [False, False, False]  # budget, not EOS


def test_eos_ends_its_row_and_is_kept_as_the_last_token(tiny):
    model, tok = tiny
    eos = tok.eos_token_id

    def eos_on_third_token_of_row_0(call, logits):
        logits[..., eos] = -math.inf
        if call == 2:
            logits[0] = -math.inf
            logits[0, :, eos] = 0.0  # p(EOS) = 1, so its log-probability is 0

    prompt = _ids(tok, "Q:say 1\nA:")
    with _steered(model, eos_on_third_token_of_row_0):
        gen = generate(model, tok, [prompt] * 2, max_new_tokens=5, temperature=1.0,
                       generator=torch.Generator().manual_seed(0))
    assert len(gen.tokens[0]) == 3 and gen.tokens[0][-1] == eos and gen.logprobs[0][-1] == 0.0
    assert len(gen.tokens[1]) == 5 and eos not in gen.tokens[1]
    assert gen.stopped == [True, False]


@pytest.mark.parametrize("stop", [
    "</b>",
    "</search>",  # 9 one-character tokens
])
def test_a_stop_string_ends_the_turn_as_soon_as_the_text_ends_with_it(tiny, stop):
    model, tok = tiny
    script = _ids(tok, f"x{stop}yy")  # the char-level tokenizer spends one token per character

    def spell_script(call, logits):  # greedy then writes `script`, one token per step
        logits[:] = -math.inf
        logits[..., script[min(call, len(script) - 1)]] = 0.0

    with _steered(model, spell_script):
        gen = generate(model, tok, [_ids(tok, "Q:go\nA:")], max_new_tokens=20, temperature=0.0,
                       stop_strings=(stop,))
    assert tok.decode(gen.tokens[0]) == f"x{stop}"
    assert gen.stopped == [True]


def test_top_p_samples_only_inside_the_nucleus_taken_at_the_temperature():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    # T = 1: probabilities before each token 0, .5, .8, .95; the nucleus of 0.7 is {0, 1}
    ids, (logp, *_) = sampling._sample(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {0, 1}
    # behaviour log-probabilities are of the untruncated distribution: log 0.5, log 0.3
    torch.testing.assert_close(logp, torch.tensor([0.5, 0.3]).log()[ids])
    # T = 2: p ∝ sqrt(p) = (.379, .294, .208, .120); before each: 0, .379, .673, .881 -> {0, 1, 2}
    ids, _ = sampling._sample(logits, 2.0, 0.7, torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {0, 1, 2}


# ---------------------------------------------------------------------------------------------
# Multi-turn: environment tokens are context, never actions
# ---------------------------------------------------------------------------------------------

SEARCH, REPLY, ANSWER = "<search>q</search>", "<information>xyz</information>", "ok"


@dataclass
class EchoToolEnv(Environment):
    """Answers every turn that ends in `</search>` with the same `<information>` block."""

    max_turns: int = field(default=3, init=False)
    stop_strings: tuple[str, ...] = field(default=("</search>",), init=False)

    def train_set(self):
        return [{"question": "q1", "answer": ANSWER}, {"question": "q2", "answer": ANSWER}]

    def eval_set(self):
        return self.train_set()

    def prompt(self, sample):
        return [{"role": "user", "content": sample["question"]}]

    def reward(self, sample, completion):
        ok = completion.endswith(sample["answer"])
        return RewardResult(float(ok), ok, "correct" if ok else "wrong answer")

    def observe(self, sample, completion):
        return REPLY if completion.endswith("</search>") else None


if "test_echo_tool" not in ENVIRONMENTS:
    ENVIRONMENTS.register("test_echo_tool")(EchoToolEnv)


class ScriptedGenerate:
    """Stands in for `wapo.sampling.generate`: call k returns `turns[k]` (texts, one per row).

    A text that does not end in a stop string gets EOS appended, as a real turn would.
    """

    def __init__(self, tokenizer, turns: list[list[str]]):
        self.tok, self.turns, self.calls = tokenizer, turns, []

    def __call__(self, model, tokenizer, prompts, *, max_new_tokens, stop_strings=(), **kwargs):
        self.calls.append({"prompts": prompts, "max_new_tokens": max_new_tokens, "stop_strings": stop_strings})
        texts = self.turns[len(self.calls) - 1]
        assert len(texts) == len(prompts)
        tokens = []
        for text in texts:
            ends_with_stop = any(text.endswith(s) for s in stop_strings)
            tokens.append(_ids(self.tok, text) + ([] if ends_with_stop else [self.tok.eos_token_id]))
        return Generation(tokens=tokens, stopped=[True] * len(tokens), stats=[_scripted_stats(len(t)) for t in tokens])


def _scripted_stats(n: int) -> TokenStats:
    """A scripted turn's taxonomy: every token at log p = -0.5, entropy 1, collision 0.25, a peak."""
    full = lambda value: torch.full((n,), value)  # noqa: E731
    return TokenStats(full(-0.5), full(1.0), full(0.25), torch.ones(n, dtype=torch.bool), full(0.0), full(0.0))


def test_environment_tokens_are_masked_out_of_the_episode_and_the_loss(tiny, monkeypatch):
    model, tok = tiny
    env = ENVIRONMENTS["test_echo_tool"]()
    # row 0 searches, reads the (truncated) reply and answers; row 1 answers at once
    fake = ScriptedGenerate(tok, [[SEARCH, ANSWER], [ANSWER]])
    monkeypatch.setattr(sampling, "generate", fake)
    episodes = rollout(model, tok, env, env.train_set(), samples_per_prompt=1, max_new_tokens=30,
                       temperature=1.0, max_observation_tokens=10)

    full = _ids(tok, REPLY)
    search, reply, answer = _ids(tok, SEARCH), full[:5] + full[-5:], _ids(tok, ANSWER) + [tok.eos_token_id]
    assert len(full) == 30 and tok.decode(reply) == "<infotion>"  # 10 tokens: head and tail (closing tag)
    first = episodes[0]
    assert first.completion_ids == search + reply + answer
    assert first.completion_mask == [True] * 18 + [False] * 10 + [True] * 3
    assert first.behaviour_logprobs == [-0.5] * 18 + [0.0] * 10 + [-0.5] * 3
    assert (first.turns, first.model_tokens, first.finished) == (2, 21, True)
    assert first.text == "<search>q</search><infotion>ok"
    second = episodes[1]
    assert (second.completion_mask, second.turns, second.finished) == ([True] * 3, 1, True)

    # turn 2 sees the reply as context, and its budget counts model tokens only: 30 - 18 = 12
    p0 = prompt_ids(tok, env, env.train_set()[0])
    assert fake.calls[1]["prompts"] == [p0 + search + reply]
    assert fake.calls[1]["max_new_tokens"] == [12]
    assert fake.calls[0]["stop_strings"] == ("</search>",)

    batch = RolloutBatch.from_episodes(episodes, torch.tensor([1.0, -1.0]))
    assert batch.mask[0].tolist() == first.completion_mask
    assert batch.mask[1].tolist() == [True] * 3 + [False] * 28
    assert batch.old_logprobs[0, 18:28].eq(0).all()
    stats = row_token_stats(model, batch, [0, 1], temperature=1.0, chunk_size=8)
    assert stats.logp[~batch.mask].eq(0).all()  # environment tokens never reach the output layer
    assert stats.logp[batch.mask].lt(0).all()


def test_a_turn_ended_by_eos_ends_the_episode(tiny, monkeypatch):
    model, tok = tiny
    env = ENVIRONMENTS["test_echo_tool"]()
    monkeypatch.setattr(env, "observe", lambda sample, completion: REPLY)  # a tool that always replies
    fake = ScriptedGenerate(tok, [[ANSWER], [ANSWER], [ANSWER]])
    monkeypatch.setattr(sampling, "generate", fake)
    (episode,) = rollout(model, tok, env, env.train_set()[:1], samples_per_prompt=1, max_new_tokens=30,
                         temperature=1.0)
    # environments answer turns that end in a stop string (wapo.envs.base); EOS means "done"
    assert (episode.turns, len(fake.calls)) == (1, 1)
    assert all(episode.completion_mask)


def test_a_tokenizer_without_chat_template_gets_plain_text(tiny):
    model, tok = tiny
    env = ENVIRONMENTS["test_echo_tool"]()
    sample = env.train_set()[0]
    templated = prompt_ids(tok, env, sample)
    plain = copy.copy(tok)
    plain.chat_template = None
    assert tok.decode(prompt_ids(plain, env, sample)) == sample["question"] + "\n"
    assert templated != prompt_ids(plain, env, sample)


def test_shared_prompt_pass_equals_full_sequences(tiny):
    # G completions of a prompt share it: running it once must give the same numbers and gradients
    model, _ = tiny
    gen = torch.Generator().manual_seed(0)
    episodes = []
    for prompt in ([3, 4, 5, 6], [7, 8]):
        for length in (3, 5, 1):
            ids = torch.randint(2, 40, (length,), generator=gen).tolist()
            mask = [True] * (length - 1) + [length > 2]  # a masked-out last token in some rows
            episodes.append(Episode(prompt_ids=prompt, completion_ids=ids, completion_mask=mask,
                                    behaviour_logprobs=[0.0] * length))
    batch = RolloutBatch.from_episodes(episodes, torch.ones(len(episodes)))
    rows = [0, 3, 1, 4, 5]
    results = []
    for share in (False, True):
        model.zero_grad()
        stats = row_token_stats(model, batch, rows, temperature=0.7, chunk_size=4, share_prompts=share)
        weights = torch.arange(1.0, stats.logp.numel() + 1).view_as(stats.logp)
        (stats.logp * weights).sum().backward()
        results.append((stats, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full, g_full), (shared, g_shared) = results
    for stat in ("logp", "entropy", "collision", "pred_dentropy"):
        torch.testing.assert_close(getattr(shared, stat), getattr(full, stat), rtol=1e-5, atol=1e-5)
    assert [name for name, g in g_full.items() if not g.any()] == []  # every weight has a gradient to compare
    for name in g_full:  # float32 summation order only (entries that nearly cancel may differ more)
        assert (g_shared[name] - g_full[name]).norm() <= 1e-5 * g_full[name].norm() + 1e-7, name
