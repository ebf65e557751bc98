"""The trainer on a tiny random model: every objective runs, WAPO skips losers, resume is exact."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import pytest
import torch

import wapo
from wapo import checkpoint
from wapo import config as cfg
from wapo.trainer import TrainingStopped, build_trainer


def _config(model_dir, tmp_path, **sections):
    base = {
        "model": {"model": model_dir},
        "env": {"env": "test_digit"},
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 6},
        "optim": {"lr": 1e-2, "micro_batch_size": 3},
        "run": {"steps": 2, "eval_size": 0, "progress": False, "output_dir": str(tmp_path / "run"),
                "checkpoint_every": 1, "taxonomy_chunk_size": 5},
    }
    base["model"].update(bf16="false", bf16_sampling="false")  # the same numbers on every machine
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return cfg.from_dict(base)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("loss", sorted(wapo.LOSSES))
def test_two_steps_of_each_objective_change_the_parameters(tiny_model_dir, tmp_path, loss):
    # temperature 3 on a random model: rewards are mixed, so every objective has something to train
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, algorithm={"loss": loss},
                                    sampling={"temperature": 3.0}, run={"seed": 1}))
    before = _weights(trainer.model)
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["backward_rows"] > 0 and r["grad_norm"] > 0 for r in rows)
    after = _weights(trainer.model)
    assert all(not torch.equal(before[k], v) for k, v in after.items())  # every weight tensor moved
    for r in rows:
        assert r["reward_mean"] == pytest.approx(r["accuracy"])  # 0/1 rewards
        assert 0 < r["entropy"] <= math.log(len(trainer.tokenizer))
        fracs = [r[f"{b}_frac"] for b in ("pos_peak", "pos_valley", "neg_peak", "neg_valley", "zero")]
        assert sum(fracs) == pytest.approx(1.0)
        assert r["kl_behaviour"] < 1e-6  # float32 sampler and trainer: one policy, one set of numbers


def test_wapo_never_backpropagates_through_losers(tiny_model_dir, tmp_path, monkeypatch):
    import wapo.trainer as trainer_module

    trainer = build_trainer(_config(tiny_model_dir, tmp_path, sampling={"temperature": 3.0}, run={"seed": 1}))
    seen = []
    real = trainer_module.row_token_stats

    def spy(model, batch, rows, **kw):
        seen.append((torch.is_grad_enabled(), batch.advantages[rows].clone()))
        return real(model, batch, rows, **kw)

    monkeypatch.setattr(trainer_module, "row_token_stats", spy)
    trainer.fit()
    with_grad = torch.cat([a for grad, a in seen if grad])
    assert with_grad.numel() > 0 and bool((with_grad > 0).all())
    # the losers' taxonomy was recorded while sampling: no pass of the trainer touches them
    assert [a for grad, a in seen if not grad] == []
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["skipped_rows"] > 0 for r in rows) and sum(r["neg_peak_count"] + r["neg_valley_count"]
                                                            for r in rows) > 0


def test_resume_after_two_of_four_steps_equals_four_steps(tiny_model_dir, tmp_path):
    straight = build_trainer(_config(tiny_model_dir, tmp_path / "a", run={"steps": 4, "seed": 3},
                                     sampling={"temperature": 3.0}))
    straight.fit()

    first = _config(tiny_model_dir, tmp_path / "b", run={"steps": 2, "seed": 3}, sampling={"temperature": 3.0})
    build_trainer(first).fit()
    resumed_config = cfg.from_dict({"run": {"steps": 4}}, first)
    resumed = build_trainer(resumed_config, resume=tmp_path / "b" / "run")
    resumed.fit()

    def metrics(run):
        rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
        skip = ("time_", "tokens_per_second", "peak_memory_mb")
        return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in rows]

    a, b = metrics(straight), metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert a == b
    for k, v in _weights(straight.model).items():
        torch.testing.assert_close(_weights(resumed.model)[k], v, rtol=0, atol=0)


def test_a_raising_reward_function_is_counted_and_survived(tiny_model_dir, tmp_path):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, env={"env_options": {"raise_every": 3}}))
    with pytest.warns(UserWarning, match="reward function raised"):
        trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    # 8 rewards per step, every 3rd call raises: calls 3, 6 in step 1; 9, 12, 15 in step 2
    assert [r["reward_errors"] for r in rows] == [2, 3]
    assert rows[-1]["reward_errors_total"] == 5
    assert "ZeroDivisionError" in (trainer.run_dir / "reward_errors.log").read_text()


def test_a_nan_loss_is_skipped_and_repeated_ones_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    import wapo.update as update_module

    trainer = build_trainer(_config(tiny_model_dir, tmp_path, sampling={"temperature": 3.0},
                                    run={"seed": 1, "steps": 3, "max_bad_steps": 2},
                                    algorithm={"loss": "grpo"}))
    real = update_module.policy_loss
    calls = {"n": 0}

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        return wapo.LossOutput(loss=out.loss * float("nan"), metrics=out.metrics)

    monkeypatch.setattr(update_module, "policy_loss", nan_loss)
    before = _weights(trainer.model)
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(TrainingStopped, match="2 consecutive"):
        trainer.fit()
    assert trainer.progress.skipped_steps == 2
    for k, v in _weights(trainer.model).items():  # nothing was applied
        assert torch.equal(before[k], v)
    assert calls["n"] == 2  # one NaN micro-batch ends each step's update
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["skipped_step"], r["skipped_steps_total"]) for r in rows] == [(1, 1), (1, 2)]


def test_unknown_names_fail_before_any_work(tiny_model_dir, tmp_path):
    with pytest.raises(KeyError, match="known: cispo, dapo"):
        build_trainer(_config(tiny_model_dir, tmp_path, algorithm={"loss": "ppo"}))
    with pytest.raises(KeyError, match="unknown environment"):
        build_trainer(_config(tiny_model_dir, tmp_path, env={"env": "nope"}))
    with pytest.raises(ValueError, match="valid: \\['denominator', 'eps_high'\\]"):
        build_trainer(_config(tiny_model_dir, tmp_path, algorithm={"loss_options": {"eps": 0.1}}))
    with pytest.raises(cfg.ConfigError, match="unknown key"):
        cfg.from_dict({"optim": {"learning_rate": 1.0}})
    assert not (tmp_path / "run").exists()


def test_evaluation_reports_greedy_and_pass_at_k(tiny_model_dir, tmp_path):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, run={"steps": 0, "eval_size": 3, "eval_samples": 2}))
    evals = trainer.fit()
    for when in ("before", "after"):
        e = evals[when]
        assert set(e) == {"greedy_accuracy", "pass@2", "sampled_accuracy", "n"} and e["n"] == 3
        assert e["sampled_accuracy"] <= e["pass@2"]
        # whole numbers of problems (greedy, pass@2) and of samples (sampled: 3 x 2)
        assert (e["greedy_accuracy"] * 3, e["pass@2"] * 3, e["sampled_accuracy"] * 6) == tuple(
            float(round(v)) for v in (e["greedy_accuracy"] * 3, e["pass@2"] * 3, e["sampled_accuracy"] * 6))
    assert evals["before"] == evals["after"]  # no step in between, and evaluation has its own RNG


@pytest.mark.parametrize("sections", [
    {"algorithm": {"kl_beta": 0.1}},
    {"algorithm": {"kl_beta": 0.1, "kl_estimator": "k1"}, "model": {"lora_rank": 4}},
    {"model": {"gradient_checkpointing": True, "bf16": True, "bf16_sampling": True}},
    {"algorithm": {"dynamic_sampling": True, "updates_per_batch": 2, "loss": "dapo"}},
], ids=["kl", "lora+kl", "checkpointing+bf16", "dynamic-sampling+2-updates"])
def test_training_options_run_and_train(tiny_model_dir, tmp_path, sections):
    sections.setdefault("sampling", {})["temperature"] = 3.0
    sections.setdefault("run", {})["seed"] = 1
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, **sections))
    trainable = {k for k, p in trainer.model.named_parameters() if p.requires_grad}
    before = _weights(trainer.model)
    trainer.fit()
    after = _weights(trainer.model)
    changed = {k for k in trainable if not torch.equal(before[k], after[k])}
    assert changed == trainable  # every trainable tensor moved
    if trainer.config.model.lora_rank:
        assert all("lora_" in k for k in trainable)  # the base weights stay frozen
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    if trainer.config.algorithm.kl_beta:
        assert len(rows) == 2 and abs(rows[0]["kl_ref"]) < 1e-6  # step 1: still the reference
        assert abs(rows[1]["kl_ref"]) > 1e-6  # step 2: the policy has moved
    if trainer.precision.bf16_sampling:  # the sampler follows the policy
        for mine, theirs in zip(trainer.sampler.parameters(), trainer.model.parameters()):
            torch.testing.assert_close(mine, theirs.to(torch.bfloat16))


def test_gradient_checkpointing_recomputes_activations(tiny_model_dir, tmp_path):
    calls = {}
    for on in (False, True):
        model = {"gradient_checkpointing": on, "share_prompts": False}  # one forward per micro-batch
        trainer = build_trainer(_config(tiny_model_dir, tmp_path / str(on), model=model,
                                        sampling={"temperature": 3.0}, run={"seed": 1}))
        mlp = trainer.model.model.layers[0].mlp
        count, forward = [0], mlp.forward

        def counting_forward(*args, _forward=forward, _count=count, **kwargs):
            _count[0] += 1  # (forward hooks do not fire when checkpointing recomputes)
            return _forward(*args, **kwargs)

        mlp.forward = counting_forward
        trainer.config = cfg.from_dict({"algorithm": {"diagnose_skipped_rows": False}}, trainer.config)
        trainer.fit()
        calls[on] = count[0]
    # without checkpointing the MLP runs once per training forward; with it, once more in backward
    assert calls[False] > 0 and calls[True] > calls[False]


def test_dynamic_sampling_with_no_mixed_group_skips_the_update(tiny_model_dir, tmp_path):
    # temperature 0.05: each group's samples agree, so every group has equal rewards
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, algorithm={"dynamic_sampling": True},
                                    sampling={"temperature": 0.05}))
    before = _weights(trainer.model)
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["mixed_group_frac"] == 0 and r["backward_rows"] == 0 for r in rows)
    assert all(torch.equal(before[k], v) for k, v in _weights(trainer.model).items())


def test_the_logged_learning_rate_is_the_one_each_update_used(tiny_model_dir, tmp_path):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, run={"steps": 3},
                                    optim={"lr": 0.3, "warmup_steps": 3}, sampling={"temperature": 3.0}))
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    # linear warm-up over 3 steps: (step + 1) / 3 of the peak for steps 0, 1, 2
    assert [r["lr"] for r in rows] == pytest.approx([0.1, 0.2, 0.3])


def test_collapse_flags_are_logged_every_step_and_survive_resume(tiny_model_dir, tmp_path):
    # entropy_high 1.0: the averaged entropy reaches 1× its first value at step 1 already
    config = _config(tiny_model_dir, tmp_path, run={"steps": 3, "collapse_options": {"entropy_high": 1.0,
                                                                                     "smoothing": 1.0}},
                     sampling={"temperature": 3.0})
    trainer = build_trainer(config)
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["collapse_explosion"] == 1 and rows[0]["collapsed"] == 1
    assert all(r["collapse_entropy"] in (0, 1) and 0 <= r["repeat_ngram_frac"] <= 1 for r in rows)
    last = checkpoint.latest(trainer.run_dir)
    assert last.name == "step_000003"
    state = json.loads((last / "progress.json").read_text())["collapse"]
    assert state == trainer.collapse.state() and state["starts"]  # the detector's state is checkpointed
    with pytest.raises(cfg.ConfigError, match="--collapse-options"):
        build_trainer(_config(tiny_model_dir, tmp_path / "bad", run={"collapse_options": {"entropy_lo": 0.1}}))


def test_a_resume_that_fails_leaves_the_runs_record_as_it_was(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    first = _config(tiny_model_dir, tmp_path, run={"steps": 1})
    build_trainer(first).fit()
    record = {name: (run / name).read_text() for name in ("config.toml", "precision.json")}
    # a checkpoint of another shape (LoRA adapters the run never had) does not load ...
    other = cfg.from_dict({"model": {"lora_rank": 4}, "optim": {"lr": 5e-3}, "run": {"steps": 2}}, first)
    with pytest.raises(ValueError, match="weights this model lacks"):
        build_trainer(other, resume=run)
    # ... and with its checkpoints gone, nothing is left to resume from
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        build_trainer(cfg.from_dict({"optim": {"lr": 5e-3}}, first), resume=run)
    assert {name: (run / name).read_text() for name in record} == record  # lr 1e-2, no LoRA: as the run was
    # a bad option fails before any folder is made
    with pytest.raises(cfg.ConfigError, match="--collapse-options"):
        build_trainer(_config(tiny_model_dir, tmp_path / "typo", run={"collapse_options": {"entropy_lo": 0.1}}))
    assert not (tmp_path / "typo").exists()


def test_the_thread_count_is_recorded_and_a_resume_on_another_warns(tiny_model_dir, tmp_path):
    default = torch.get_num_threads()
    run = tmp_path / "run"
    try:
        # on the CPU: on an accelerator the thread count changes no number, so nothing warns
        first = _config(tiny_model_dir, tmp_path, run={"steps": 1}, model={"device": "cpu"})
        build_trainer(first).fit()
        assert cfg.from_dict(cfg.load_file(run / "config.toml")).model.threads == default  # 0: torch's default
        more = cfg.from_dict({"run": {"steps": 2}}, first)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_trainer(more, resume=run)  # threads 0 on resume: the recorded count
            build_trainer(cfg.from_dict({"model": {"threads": default}}, more), resume=run)  # the same, explicitly
        assert not [w for w in caught if "thread" in str(w.message)]
        other = default + 1
        with pytest.warns(UserWarning, match=rf"resumed with {other} CPU thread\(s\) where the run used {default}: "
                                             rf"from step 2 on .* resume with --threads {default}"):
            build_trainer(cfg.from_dict({"model": {"threads": other}}, more), resume=run)
        assert torch.get_num_threads() == other  # allowed: a run may move to another machine
        assert cfg.from_dict(cfg.load_file(run / "config.toml")).model.threads == other
    finally:
        torch.set_num_threads(default)
