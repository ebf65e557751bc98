"""WAPOTrainer inside TRL's real GRPOTrainer (trl 1.16.0), on CPU with a tiny random Llama.

Skipped when trl is not installed: `make test-trl` builds an environment with it.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

import wapo  # noqa: E402
from wapo.envs import make_env  # noqa: E402
from wapo.integrations.trl import TESTED_TRL, WAPOTrainer, reward_funcs  # noqa: E402
from wapo.losses import DEFAULT_ADVANTAGE, normalizer  # noqa: E402

MAX_LEN = 8


def _trainer(model_dir, tmp_path, *, loss="wapo", max_steps=2, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    funcs, dataset = reward_funcs(make_env("test_digit"))
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, gradient_accumulation_steps=2,
        num_generations=4, max_completion_length=MAX_LEN, max_steps=max_steps, learning_rate=1e-2,
        temperature=1.5, top_k=0, top_p=1.0, use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to=[], logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
        dataloader_num_workers=0, shuffle_dataset=False, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return WAPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=dataset,
                       processing_class=tokenizer, loss=loss)


def test_trl_version_is_the_tested_one():
    assert trl.__version__ == TESTED_TRL


def test_two_real_trl_steps_change_the_parameters_with_wapo_advantages_and_normaliser(tiny_model_dir, tmp_path):
    trainer = _trainer(tiny_model_dir, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    seen = []
    generate = trainer._generate_and_score_completions

    def spy(inputs):
        out = generate(inputs)
        seen.append((trainer._rewards_per_func[:, 0].clone(), out))
        return out

    trainer._generate_and_score_completions = spy
    trainer.train()

    assert len(seen) == 2  # one generation batch of 8 rows per optimizer step
    for rewards, out in seen:
        # group_mean: A_i = r_i − mean of its group of 4 (rows of one prompt are adjacent)
        expected = (rewards.view(2, 4) - rewards.view(2, 4).mean(-1, keepdim=True)).flatten()
        torch.testing.assert_close(out["advantages"], expected)
        # B·L over the whole generation batch: 8 rows x 8 tokens; one process, GA = steps_per_generation
        assert float(out["wapo_normalizer"]) == 8 * MAX_LEN
    assert any(rewards.min() != rewards.max() for rewards, _ in seen), "no group had a winner: nothing trained"
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter changed"

    logged = [row for row in trainer.state.log_history if "taxonomy/pos_peak_frac" in row]
    assert len(logged) == 2
    for row in logged:
        # every completion token falls in exactly one bin
        assert sum(row[f"taxonomy/{b}_frac"] for b in wapo.BINS) == pytest.approx(1.0, abs=1e-6)
        assert 0 < row["entropy"] and 0 < row["wapo/backward_rows_frac"] <= 1
        assert "rewards/wapo_reward/mean" in row and "accuracy" in row


def _fixed_batch(model, generator):
    """2 groups x 4 completions of a hand-made batch, TRL's layout (prompts left-, completions right-padded)."""
    prompt_lens, completion_lens = [3, 5, 4, 5, 2, 5, 3, 4], [6, 2, 8, 5, 1, 7, 8, 3]
    vocab = model.config.vocab_size
    prompt_ids = torch.zeros(8, 5, dtype=torch.long)
    prompt_mask = torch.zeros(8, 5, dtype=torch.long)
    completion_ids = torch.zeros(8, MAX_LEN, dtype=torch.long)
    completion_mask = torch.zeros(8, MAX_LEN, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        prompt_ids[i, 5 - p:] = torch.randint(2, vocab, (p,), generator=generator)
        prompt_mask[i, 5 - p:] = 1
        completion_ids[i, :c] = torch.randint(2, vocab, (c,), generator=generator)
        completion_mask[i, :c] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _reference_logp(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """log π of the completion tokens from full logits (the plain, unchunked path)."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention = torch.cat([prompt_mask, completion_mask], 1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, prompt_ids.shape[1] - 1:-1]
    return torch.log_softmax(logits.float() / 1.5, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("loss", sorted(wapo.LOSSES))
def test_adapter_loss_and_gradient_equal_the_core_on_a_fixed_batch(tiny_model_dir, tmp_path, loss):
    """Two shuffled micro-batches through WAPOTrainer.compute_loss add up to wapo.policy_loss on the batch.

    π_old is the sampler's log-probabilities (some ratios far above WAPO's cap of 10), with
    TRL's recomputed old log-probabilities where the sampler gave NaN.
    """
    trainer = _trainer(tiny_model_dir, tmp_path, loss=loss)
    model = trainer.model
    model.train()
    g = torch.Generator().manual_seed(1)
    prompt_ids, prompt_mask, completion_ids, completion_mask = _fixed_batch(model, g)
    mask = completion_mask.bool()
    rewards = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1])  # winners: rows 0, 3, 7
    advantages = wapo.compute_advantages(DEFAULT_ADVANTAGE[loss], rewards, 4)
    with torch.no_grad():
        logp = _reference_logp(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
    recomputed = logp + 0.1 * torch.randn(logp.shape, generator=g)
    sampling = logp + 0.5 * torch.randn(logp.shape, generator=g)
    sampling[0, :3] = logp[0, :3] - 3.0  # ρ = e³ ≈ 20 > 10: WAPO's cap
    sampling[3, 1] = float("nan")        # a token the sampler could not score
    behaviour = torch.where(sampling.isnan(), recomputed, sampling)

    # the core on the whole batch at once, with its own normaliser
    model.zero_grad()
    reference = wapo.policy_loss(loss, _reference_logp(model, prompt_ids, prompt_mask, completion_ids,
                                                       completion_mask), behaviour, advantages, mask,
                                 max_len=MAX_LEN, group_size=4)
    reference.loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    # the adapter, as TRL feeds it: shuffled rows, two micro-batches, the batch's normaliser
    model.zero_grad()
    whole = normalizer(loss, advantages, mask, max_len=MAX_LEN, group_size=4) * trainer._share_per_process("train")
    total = 0.0
    for rows in (torch.tensor([1, 2, 4, 5]), torch.tensor([6, 0, 7, 3])):  # the first has no winner
        inputs = {"prompt_ids": prompt_ids[rows], "prompt_mask": prompt_mask[rows],
                  "completion_ids": completion_ids[rows], "completion_mask": completion_mask[rows],
                  "advantages": advantages[rows], "old_per_token_logps": recomputed[rows],
                  "sampling_per_token_logps": sampling[rows], "num_items_in_batch": mask.sum(),
                  "wapo_normalizer": whole}
        micro = trainer.compute_loss(model, inputs)
        micro.backward()
        total += micro.detach()

    loss_diff = abs(float(total) - reference.loss.item())
    grad_diff = max(float((p.grad - expected_grads[n]).abs().max()) for n, p in model.named_parameters())
    scale = max(float(g.abs().max()) for g in expected_grads.values())
    print(f"\n{loss}: loss {reference.loss.item():.6g}, |Δloss| = {loss_diff:.2e}, "
          f"max |Δgrad| = {grad_diff:.2e} (largest gradient entry {scale:.2e})")
    assert scale > 0
    assert loss_diff <= 1e-6 * max(1.0, abs(float(reference.loss)))
    assert grad_diff <= 1e-5 * scale


def test_reward_funcs_grade_with_the_environment(tiny_model_dir):
    env = make_env("test_digit", {"raise_every": 3})
    funcs, dataset = reward_funcs(env)
    assert len(dataset) == 10 and dataset[4]["prompt"] == env.prompt(env.train_set()[4])
    logged = {}
    with pytest.warns(UserWarning, match="grader bug"):
        scores = funcs[0](completions=[[{"role": "assistant", "content": "7"}], [{"role": "assistant", "content": "?"}],
                                       [{"role": "assistant", "content": "a"}]],
                          wapo_index=[0, 1, 2], log_metric=lambda k, v: logged.setdefault(k, v))
    # "7" and "a" start with a digit / lowercase letter (1), "?" does not (0); the 3rd call raises: 0
    assert scores == [1.0, 0.0, 0.0]
    assert logged == {"accuracy": pytest.approx(1 / 3), "reward_errors": 1.0}


def test_reward_funcs_refuse_multi_turn_environments():
    with pytest.raises(ValueError, match="multi-turn"):
        reward_funcs("multihop")


def test_options_that_would_be_ignored_fail(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        _trainer(tiny_model_dir, tmp_path, top_entropy_quantile=0.2)
    # checked before TRL builds anything
    with pytest.raises(TypeError, match="eps_low"):
        WAPOTrainer(model=None, loss="wapo", loss_options={"eps_low": 0.1})
    with pytest.raises(KeyError, match="wapo"):
        WAPOTrainer(model=None, loss="wapoo")
