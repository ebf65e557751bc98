"""A sampler one update behind (`algorithm.sampler_lag` = 1), as with generation one step ahead.

Step t samples with the weights from before step t−1's update (step 1 with the initial ones);
the sampler copy is checkpointed, so a resumed or interrupted run equals an uninterrupted one.
"""

from __future__ import annotations

import json

import pytest
import torch

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


@pytest.mark.parametrize(("bf16_sampling", "lora"), [("false", 0), ("true", 0), ("false", 4)])
def test_the_sampler_holds_the_weights_from_before_the_previous_update(tiny_model_dir, tmp_path, monkeypatch,
                                                                        bf16_sampling, lora):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path / "run", model={"bf16_sampling": bf16_sampling,
                                                                             "lora_rank": lora}))
    names = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    policy = [_trainable(trainer.model)]  # θ0, θ1, θ2, ...
    sampler, sampled_with = [], []
    real_step, real_rollout = trainer.train_step, trainer_module.rollout

    def step():
        out = real_step()
        policy.append(_trainable(trainer.model))
        sampler.append(_trainable(trainer.sampler, names))
        return out

    def rollout(model, *args, **kwargs):
        sampled_with.append(model)
        return real_rollout(model, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step)
    monkeypatch.setattr(trainer_module, "rollout", rollout)
    trainer.fit()
    assert all(model is trainer.sampler for model in sampled_with)
    dtype = torch.bfloat16 if bf16_sampling == "true" else torch.float32
    # after step 1 the sampler holds θ0 (step 2 samples with it, as step 1 did); after step t, θ_{t−1}
    for t, weights in enumerate(sampler, start=1):
        for name, value in weights.items():
            assert torch.equal(value, policy[t - 1][name].to(dtype)), (t, name)
        assert any(not torch.equal(policy[t][n], policy[t - 1][n]) for n in names)  # the policy itself moved on


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
            return trainer.token_stats(batch, rows_all).logp

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


@pytest.mark.parametrize(("lag", "bf16_sampling", "evaluated"), [(1, "true", "model"), (1, "false", "model"),
                                                                 (0, "true", "sampler")])
def test_evaluation_uses_the_current_weights(tiny_model_dir, tmp_path, monkeypatch, lag, bf16_sampling, evaluated):
    seen = []
    monkeypatch.setattr(trainer_module, "evaluate", lambda policy, *a, **k: seen.append(policy) or {"n": 0})
    trainer = build_trainer(_config(tiny_model_dir, tmp_path / "run", lag=lag, model={"bf16_sampling": bf16_sampling},
                                    run={"steps": 1, "eval_size": 1}))
    trainer.fit()
    assert len(seen) == 2 and all(policy is getattr(trainer, evaluated) for policy in seen)
