"""A sampler one update behind (`algorithm.sampler_lag` = 1), as with generation one step ahead.

Step t samples with the weights from before step t−1's update (step 1 with the initial ones);
the sampler copy is checkpointed, so a resumed or interrupted run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

import wapo.evaluate as evaluate_module
import wapo.trainer as trainer_module
import wapo.update as update_module
from wapo import checkpoint
from wapo import config as cfg
from wapo.trainer import build_trainer

SKIP = ("time_", "tokens_per_second", "peak_memory_mb")


def _config(model_dir, out, *, lag=1, **sections):
    base = {
        "model": {"model": model_dir, "bf16": "false", "bf16_sampling": "false"},
        "env": {"env": "test_digit"},
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 6, "temperature": 3.0},
        "algorithm": {"loss": "grpo", "sampler_lag": lag, "ratio_against": "sampler", "mini_batches": 2},
        "optim": {"lr": 1e-2, "micro_batch_size": 3},
        "run": {"steps": 3, "eval_size": 0, "progress": False, "output_dir": str(out), "seed": 2,
                "checkpoint_every": 1, "taxonomy_chunk_size": 5},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return cfg.from_dict(base)


def _trainable(model, names=None):
    names = names or {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in names}


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(SKIP)} for r in rows]


def test_sampler_lag_takes_0_or_1():
    with pytest.raises(cfg.ConfigError, match="--sampler-lag must be 0 .* or 1"):
        cfg.from_dict({"algorithm": {"sampler_lag": 2}})


def _record_weights_per_step(trainer, monkeypatch) -> tuple[set[str], list[dict], list[dict]]:
    """The trainable parameters' names, and two lists that fill as `trainer` fits: the policy's
    trainable weights before the first step and after each step, and the sampler's after each step."""
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    policy, sampler = [_trainable(trainer.model)], []
    real_step = trainer.train_step

    def step():
        out = real_step()
        policy.append(_trainable(trainer.model))
        sampler.append(_trainable(trainer.sampler, names))
        return out

    monkeypatch.setattr(trainer, "train_step", step)
    return names, policy, sampler


@pytest.mark.parametrize(("bf16_sampling", "lora"), [("false", 0), ("true", 0), ("false", 4)])
def test_the_sampler_holds_the_weights_from_before_the_previous_update(tiny_model_dir, tmp_path, monkeypatch,
                                                                        bf16_sampling, lora):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path / "run", model={"bf16_sampling": bf16_sampling,
                                                                             "lora_rank": lora}))
    names, policy, sampler = _record_weights_per_step(trainer, monkeypatch)  # policy: θ0, θ1, θ2, ...
    sampled_with, real_rollout = [], trainer_module.rollout

    def rollout(model, *args, **kwargs):
        sampled_with.append(model)
        return real_rollout(model, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "rollout", rollout)
    trainer.fit()
    assert len(sampled_with) == len(sampler) == 3 and len(policy) == 4  # one rollout per step, 3 steps
    assert all(model is trainer.sampler for model in sampled_with)
    dtype = torch.bfloat16 if bf16_sampling == "true" else torch.float32
    # after step 1 the sampler holds θ0 (step 2 samples with it, as step 1 did); after step t, θ_{t−1}
    for t, weights in enumerate(sampler, start=1):
        for name, value in weights.items():
            assert torch.equal(value, policy[t - 1][name].to(dtype)), (t, name)
        assert any(not torch.equal(policy[t][n], policy[t - 1][n]) for n in names)  # the policy itself moved on
    # the weights training never changes (LoRA's base) the copy holds from the start: only the others are synced
    frozen = {n: p for n, p in trainer.model.named_parameters() if n not in names}
    assert bool(frozen) == bool(lora)
    for name, value in trainer.sampler.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name].to(dtype)), name


def test_with_lag_0_the_sampler_takes_each_update_once_at_its_end(tiny_model_dir, tmp_path, monkeypatch):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path / "run", lag=0, model={"bf16_sampling": "true"},
                                    algorithm={"updates_per_batch": 2}, run={"steps": 2}))
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    syncs, in_step, real_sync, real_step = [], [], trainer._sync_sampler, trainer.train_step

    def sync():
        syncs.append(trainer.progress.step)
        real_sync()

    def step():
        out = real_step()
        policy, copy = _trainable(trainer.model), _trainable(trainer.sampler, names)
        in_step.append(all(torch.equal(copy[n], policy[n].to(torch.bfloat16)) for n in names))
        return out

    monkeypatch.setattr(trainer, "_sync_sampler", sync)
    monkeypatch.setattr(trainer, "train_step", step)
    trainer.fit()
    assert [r["optimizer_steps"] for r in _metrics(trainer.run_dir)] == [4, 4]
    assert syncs == [0, 1]  # once in each step's update of 2 × 2 optimizer steps ...
    assert in_step == [True, True]  # ... so that the next step samples with its result


def test_step_2_samples_with_the_initial_weights_and_its_ratio_carries_the_gap(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    batches, real = [], update_module.update_policy

    def spy(batch, *args, **kwargs):
        batches.append(batch)
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "update_policy", spy)
    trainer = build_trainer(_config(tiny_model_dir, tmp_path / "run", run={"steps": 2}))
    theta0 = _trainable(trainer.model)
    trainer.fit()
    rows = _metrics(trainer.run_dir)
    batch = batches[1]
    rows_all = list(range(len(batch)))

    def logp_at(weights):
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                p.copy_(weights[name])
            return trainer.token_stats(batch, rows_all).logp.cpu()  # the batch's μ is on the CPU

    theta1 = _trainable(trainer.sampler, set(theta0))  # after step 2 the sampler holds θ1 (test above)
    mu, m = batch.old_logprobs, batch.mask
    assert (logp_at(theta0) - mu)[m].abs().max() < 1e-5  # μ of step 2 is θ0's (float32 sampler and trainer agree)
    assert (logp_at(theta1) - mu)[m].abs().max() > 1e-3  # ... not θ1's, which the trainer starts step 2 from
    # step 1: sampler and trainer are one policy; step 2: the measured mismatch is one update
    assert rows[0]["kl_behaviour"] < 1e-6 and rows[1]["kl_behaviour"] > 1e-5
    assert rows[1]["ratio_max"] - rows[1]["ratio_min"] > 1e-3


def test_lag_1_samples_step_1_as_lag_0_does(tiny_model_dir, tmp_path):
    runs = {}
    for lag in (0, 1):
        trainer = build_trainer(_config(tiny_model_dir, tmp_path / str(lag), lag=lag, run={"steps": 2}))
        trainer.fit()
        runs[lag] = _metrics(trainer.run_dir)
    # step 1: both sample with θ0, the same tokens; the copy runs in eval mode, so its recorded
    # log-probabilities (and the taxonomy taken from them) may differ in the last float32 bits
    (zero, one), (zero_2, one_2) = (runs[0][0], runs[1][0]), (runs[0][1], runs[1][1])
    for key, value in zero.items():
        assert one[key] == (pytest.approx(value, rel=1e-5, abs=1e-6) if isinstance(value, float) else value), key
    assert zero_2["kl_behaviour"] < 1e-6 < one_2["kl_behaviour"]  # step 2: only the lagged sampler is behind


def test_resume_with_lag_1_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    straight = build_trainer(_config(tiny_model_dir, tmp_path / "a", run={"steps": 4}))
    straight.fit()
    first = _config(tiny_model_dir, tmp_path / "b", run={"steps": 2})
    build_trainer(first).fit()
    assert (tmp_path / "b" / "checkpoints" / "step_000002" / "sampler.safetensors").is_file()
    resumed = build_trainer(cfg.from_dict({"run": {"steps": 4}}, first), resume=tmp_path / "b")
    resumed.fit()
    assert [r["step"] for r in _metrics(resumed.run_dir)] == [1, 2, 3, 4]
    assert _metrics(resumed.run_dir) == _metrics(straight.run_dir)
    for model in ("model", "sampler"):
        a, b = _trainable(getattr(straight, model)), _trainable(getattr(resumed, model))
        for name, value in a.items():
            torch.testing.assert_close(b[name], value, rtol=0, atol=0)


def test_an_interrupt_before_the_first_optimizer_step_replays_the_step_with_the_same_stale_sampler(
        tiny_model_dir, tmp_path, monkeypatch):
    # the sampler must not take this update's weights until the step can no longer be cut short
    straight = build_trainer(_config(tiny_model_dir, tmp_path / "a"))
    straight.fit()
    trainer = build_trainer(_config(tiny_model_dir, tmp_path / "b", run={"checkpoint_every": 5}))
    real = update_module.policy_loss

    def interrupt_in_step_2(*args, **kwargs):
        if trainer.progress.step == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(update_module, "policy_loss", interrupt_in_step_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.undo()
    assert checkpoint.latest(trainer.run_dir).name == "step_000001"
    resumed = build_trainer(trainer.config, resume=trainer.run_dir)
    resumed.fit()
    assert _metrics(resumed.run_dir) == _metrics(straight.run_dir)
    for name, value in _trainable(straight.model).items():
        torch.testing.assert_close(_trainable(resumed.model)[name], value, rtol=0, atol=0)


def test_resuming_a_checkpoint_without_the_sampler_weights_with_lag_1_is_refused(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path / "run", lag=0, run={"steps": 1})
    build_trainer(config).fit()
    assert not (tmp_path / "run" / "checkpoints" / "step_000001" / "sampler.safetensors").exists()
    lagged = cfg.from_dict({"algorithm": {"sampler_lag": 1}, "run": {"steps": 2}}, config)
    with pytest.raises(FileNotFoundError, match="has no sampler.safetensors.*--sampler-lag 0"):
        build_trainer(lagged, resume=tmp_path / "run")


@pytest.mark.parametrize(("lag", "bf16_sampling", "evaluated"), [(1, "true", "sampler"), (1, "false", "model"),
                                                                 (0, "true", "sampler")])
def test_evaluation_uses_the_current_weights_in_the_samplers_precision(tiny_model_dir, tmp_path, monkeypatch, lag,
                                                                      bf16_sampling, evaluated):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path / "run", lag=lag, model={"bf16_sampling": bf16_sampling},
                                    run={"steps": 2, "eval_size": 1}))
    seen = []

    def evaluate(policy, *args, **kwargs):  # the weights evaluated: the policy's, in the copy's dtype
        current = all(torch.equal(mine, theirs.to(mine.dtype))
                      for mine, theirs in zip(policy.parameters(), trainer.model.parameters(), strict=True))
        seen.append((policy, next(policy.parameters()).dtype, current))
        return {"n": 0}

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    trainer.fit()
    dtype = torch.bfloat16 if bf16_sampling == "true" else torch.float32
    assert seen == [(getattr(trainer, evaluated), dtype, True)] * 2  # before and after


def _bf16_lagged(model_dir, out, lag=1, **run):
    return _config(model_dir, out, lag=lag, model={"bf16_sampling": "true"},
                   run={"steps": 1, "eval_size": 3, "eval_samples": 2, **run})


def test_the_before_evaluation_is_the_same_with_lag_0_and_1(tiny_model_dir, tmp_path, monkeypatch):
    # a bf16 sampler: both evaluate the initial weights in bf16, so the same completions (temperature
    # 3) with the same log-probabilities, to the last bit (fp32 weights would differ there)
    episodes, real = [], evaluate_module.rollout

    def rollout(*args, **kwargs):
        out = real(*args, **kwargs)
        episodes[-1].extend((e.text, e.behaviour_logprobs) for e in out)
        return out

    monkeypatch.setattr(evaluate_module, "rollout", rollout)
    results = {}
    for lag in (0, 1):
        episodes.append([])
        results[lag] = build_trainer(_bf16_lagged(tiny_model_dir, tmp_path / str(lag), lag=lag)).evaluate("before")
    assert len(episodes[0]) == 3 * (1 + 2) and all(logp for _, logp in episodes[0])  # greedy + 2 samples of 3
    assert episodes[0] == episodes[1] and results[0] == results[1]


def test_an_evaluation_leaves_the_stale_sampler_as_it_was_even_when_interrupted(tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    trainer = build_trainer(_bf16_lagged(tiny_model_dir, tmp_path / "run"))
    theta0 = _trainable(trainer.model)
    trainer.fit()  # one step and the "after" evaluation of θ1: the sampler holds θ0 again
    stale = _trainable(trainer.sampler, set(theta0))
    assert all(torch.equal(stale[n], theta0[n].to(torch.bfloat16)) for n in theta0)
    assert any(not torch.equal(stale[n], p.to(torch.bfloat16)) for n, p in _trainable(trainer.model).items())

    def interrupted(policy, *args, **kwargs):
        assert all(torch.equal(mine, theirs.to(torch.bfloat16))  # evaluating θ1 ...
                   for mine, theirs in zip(policy.parameters(), trainer.model.parameters(), strict=True))
        raise KeyboardInterrupt  # ... when Ctrl-C lands

    monkeypatch.setattr(trainer_module, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.evaluate("step 1")
    after = _trainable(trainer.sampler, set(theta0))
    assert all(torch.equal(after[n], stale[n]) for n in stale)  # θ0 again, as a checkpoint saves it


def test_a_skipped_step_still_moves_the_sampler_to_the_weights_it_started_from(tiny_model_dir, tmp_path,
                                                                              monkeypatch):
    # step 3's loss is non-finite, so its update takes no optimizer step: the sampler must still
    # take θ2 at the end of it (after step t it holds θ_{t−1} whatever step t did)
    trainer = build_trainer(_config(tiny_model_dir, tmp_path / "run", algorithm={"mini_batches": 1}))
    names, policy, sampler = _record_weights_per_step(trainer, monkeypatch)
    real_loss = update_module.policy_loss

    def loss(*args, **kwargs):
        out = real_loss(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if trainer.progress.step == 2 else out

    monkeypatch.setattr(update_module, "policy_loss", loss)
    with pytest.warns(UserWarning, match="step 3: non-finite loss or gradient, update skipped"):
        trainer.fit()
    assert [r["optimizer_steps"] for r in _metrics(trainer.run_dir)] == [1, 1, 0]
    assert len(sampler) == 3 and all(torch.equal(policy[3][n], policy[2][n]) for n in names)  # step 3 skipped
    assert any(not torch.equal(policy[2][n], policy[1][n]) for n in names)
    for t in (1, 2, 3):
        assert all(torch.equal(sampler[t - 1][n], policy[t - 1][n]) for n in names), t


@pytest.mark.parametrize(("lag", "tis_cap", "against", "warns"), [(1, 0.0, "auto", True), (1, 2.0, "auto", False),
                                                                 (1, 0.0, "trainer", False), (0, 0.0, "auto", False)])
def test_auto_ratio_against_the_trainer_with_a_stale_sampler_and_no_tis_warns(tiny_model_dir, tmp_path, lag, tis_cap,
                                                                               against, warns):
    # bf16 sampling: auto resolves to the trainer, whose ratio starts at 1 and ignores the stale sampler
    config = _config(tiny_model_dir, tmp_path / "run", lag=lag, model={"bf16_sampling": "true"},
                     algorithm={"ratio_against": against, "tis_cap": tis_cap})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = build_trainer(config)
    assert trainer.precision.ratio_against == "trainer"
    stale = [w for w in caught if "one update behind" in str(w.message)]
    assert len(stale) == int(warns)
    if warns:
        assert "--tis-cap" in str(stale[0].message) and "--ratio-against sampler" in str(stale[0].message)
