"""Each part of a reward (`RewardResult.parts`) is logged apart as `reward_<part>`."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from wapo import config as cfg
from wapo.envs.base import ENVIRONMENTS, RewardResult
from wapo.sampling import Episode
from wapo.trainer import REWARD_KEYS, Progress, Sampled, Trainer, build_trainer, reward_metrics


def _sampled(results: list[RewardResult]) -> Sampled:
    return Sampled(samples=[{}] * (len(results) // 2), episodes=[Episode(prompt_ids=[1]) for _ in results],
                   results=results)


def test_each_part_is_averaged_over_all_sampled_rows():
    results = [
        RewardResult(0.9, True, parts={"answer": 1.0, "format": 0.5}),
        RewardResult(0.1, False, parts={"answer": 0.0, "format": 1.0}),
        RewardResult(0.7, False, parts={"answer": 0.5, "format": 1.0}),
        RewardResult(0.0, False, reason="reward error: ZeroDivisionError"),  # no parts: counts 0
    ]
    metrics = reward_metrics(torch.tensor([r.score for r in results]), _sampled(results), group_size=2)
    assert metrics["reward_answer"] == pytest.approx((1.0 + 0.0 + 0.5 + 0) / 4)  # 0.375
    assert metrics["reward_format"] == pytest.approx((0.5 + 1.0 + 1.0 + 0) / 4)  # 0.625
    assert metrics["reward_mean"] == pytest.approx((0.9 + 0.1 + 0.7 + 0.0) / 4)  # 0.425


def test_a_single_part_reward_logs_no_part():
    results = [RewardResult(1.0, True), RewardResult(0.0, False)]
    keys = reward_metrics(torch.tensor([1.0, 0.0]), _sampled(results), group_size=2)
    assert not [k for k in keys if k.startswith("reward_") and k not in ("reward_mean", "reward_std", "reward_errors")]


@pytest.mark.parametrize("name", ["mean", "std", "errors", "errors_total"])
def test_a_part_named_like_a_reward_metric_is_refused(name):
    results = [RewardResult(1.0, True, parts={name: 1.0}), RewardResult(0.0, False, parts={name: 0.0})]
    with pytest.raises(ValueError, match=f"reward part '{name}'.*rename"):
        reward_metrics(torch.tensor([1.0, 0.0]), _sampled(results), group_size=2)


def test_the_refused_names_are_the_logged_reward_metrics():
    results = [RewardResult(1.0, True), RewardResult(0.0, False)]
    logged = {**reward_metrics(torch.tensor([1.0, 0.0]), _sampled(results), group_size=2),
              **Trainer.totals(type("T", (), {"progress": Progress()})())}
    assert {k for k in logged if k.startswith("reward_")} == set(REWARD_KEYS)


def _register_parts_env():
    if "test_parts" in ENVIRONMENTS:
        return

    @dataclass
    class PartsEnv(ENVIRONMENTS["test_digit"]):
        """The digit task's reward as part "answer", and a "format" part worth 0.25 on every row."""

        def reward(self, sample, completion):
            result = super().reward(sample, completion)
            return RewardResult(result.score, result.correct, result.reason,
                                parts={"answer": result.score, "format": 0.25})

    ENVIRONMENTS.register("test_parts")(PartsEnv)


def test_a_part_named_like_a_metric_stops_the_run_before_any_optimizer_step(tiny_model_dir, tmp_path):
    if "test_bad_part" not in ENVIRONMENTS:
        @dataclass
        class BadPartEnv(ENVIRONMENTS["test_digit"]):
            """A reward that differs between completions (so an update would move the weights), as part "mean"."""

            def reward(self, sample, completion):
                score = float(sum(map(ord, completion)) % 2)
                return RewardResult(score, score == 1.0, parts={"mean": score})

        ENVIRONMENTS.register("test_bad_part")(BadPartEnv)
    config = cfg.from_dict({
        "model": {"model": tiny_model_dir, "bf16": "false", "bf16_sampling": "false"},
        "env": {"env": "test_bad_part"},
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 4, "temperature": 3.0},
        "optim": {"lr": 0.1},
        "run": {"steps": 2, "eval_size": 0, "progress": False, "output_dir": str(tmp_path / "run")},
    })
    trainer = build_trainer(config)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match="reward part 'mean' would be logged as reward_mean"):
        trainer.fit()
    assert not trainer.optimizer.state and trainer.progress.step == 0  # no optimizer step, no step committed
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_trainer_logs_each_part_in_metrics_jsonl(tiny_model_dir, tmp_path):
    _register_parts_env()
    config = cfg.from_dict({
        "model": {"model": tiny_model_dir, "bf16": "false", "bf16_sampling": "false"},
        "env": {"env": "test_parts"},
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 4, "temperature": 3.0},
        "run": {"steps": 2, "eval_size": 0, "progress": False, "output_dir": str(tmp_path / "run")},
    })
    trainer = build_trainer(config)
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["reward_format"] == 0.25  # (8 × 0.25) / 8
        assert r["reward_answer"] == r["reward_mean"]  # the answer part is the whole score here
    assert 0 < sum(r["reward_answer"] for r in rows) < 2  # mixed rewards: the part is not a constant


def test_evaluation_reports_each_part_greedy_and_sampled(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from wapo.evaluate import evaluate
    from wapo.models import load_tokenizer

    _register_parts_env()
    env = ENVIRONMENTS["test_parts"]()
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    scores = evaluate(model, tok, env, list(env.eval_set()), k=4, temperature=3.0, max_new_tokens=3, progress=False)
    # "answer" is the digit task's 0/1 score, so its means are the accuracies; "format" is 0.25 on every answer
    assert scores["greedy_reward_answer"] == scores["greedy_accuracy"]
    assert scores["sampled_reward_answer"] == pytest.approx(scores["sampled_accuracy"])
    assert scores["greedy_reward_format"] == scores["sampled_reward_format"] == pytest.approx(0.25)
    assert 0 < scores["sampled_accuracy"] < 1  # about half of 12 answers are right: the comparison is not 0 == 0
