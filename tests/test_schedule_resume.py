"""The learning-rate schedule across `--resume`: the same steps give the same rates; other steps warn."""

from __future__ import annotations

import json
import warnings

import pytest

from wapo import config as cfg
from wapo.trainer import build_trainer


def _config(model_dir, out, steps, schedule, warmup_steps=2):
    return cfg.from_dict({
        "model": {"model": model_dir, "bf16": "false", "bf16_sampling": "false"},
        "env": {"env": "test_digit"},
        "sampling": {"prompts_per_step": 1, "samples_per_prompt": 2, "max_new_tokens": 2, "temperature": 3.0},
        "optim": {"lr": 0.8, "warmup_steps": warmup_steps, "schedule": schedule},
        "run": {"steps": steps, "eval_size": 0, "progress": False, "output_dir": str(out), "seed": 2,
                "export_final": False},
    })


def _lrs(run_dir):
    return [json.loads(line)["lr"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stop_after(trainer, steps):
    """Run `trainer` as if it were killed after `steps` steps (the loop ends there, checkpointed)."""
    trainer.config = cfg.from_dict({"run": {"steps": steps}}, trainer.config)
    trainer.fit()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_a_resumed_run_logs_the_learning_rates_of_an_uninterrupted_one(tiny_model_dir, tmp_path, schedule):
    straight = build_trainer(_config(tiny_model_dir, tmp_path / "a", 6, schedule))
    straight.fit()
    # warm-up 2 steps to 0.8, then to 0 at step 6: linear 0.4, 0.8, then 0.8·(1 − (t−2)/4) for t = 2..5
    if schedule == "linear":
        assert _lrs(straight.run_dir) == pytest.approx([0.4, 0.8, 0.8, 0.6, 0.4, 0.2])

    config = _config(tiny_model_dir, tmp_path / "b", 6, schedule)
    _stop_after(build_trainer(config), 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = build_trainer(config, resume=tmp_path / "b")
    assert not [w for w in caught if "learning-rate" in str(w.message)]  # nothing changed: nothing to say
    resumed.fit()
    assert _lrs(resumed.run_dir) == _lrs(straight.run_dir)  # bit for bit


def test_resuming_with_more_steps_stretches_the_schedule_from_the_next_step_and_warns(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, 4, "linear")
    build_trainer(config).fit()
    assert _lrs(tmp_path) == pytest.approx([0.4, 0.8, 0.8, 0.4])  # ... and 0 planned for a step 5
    longer = cfg.from_dict({"run": {"steps": 8}, "optim": {"lr": 0.4}}, config)
    with pytest.warns(UserWarning, match=r"\(lr 0\.8 -> 0\.4, steps 4 -> 8\): step 5 trains at lr 0\.2667 where "
                                         r"the checkpoint planned 0, and each later step"):
        resumed = build_trainer(longer, resume=tmp_path)
    resumed.fit()
    # steps 1-4 as they were; then peak 0.4 linear to 0 at step 8: 0.4·(1 − (t−2)/6) for t = 4..7
    assert _lrs(tmp_path) == pytest.approx([0.4, 0.8, 0.8, 0.4, 0.4 * 4 / 6, 0.4 * 3 / 6, 0.4 * 2 / 6, 0.4 * 1 / 6])


def test_resuming_a_constant_schedule_with_more_steps_changes_no_rate(tiny_model_dir, tmp_path, recwarn):
    config = _config(tiny_model_dir, tmp_path, 3, "constant")
    build_trainer(config).fit()
    build_trainer(cfg.from_dict({"run": {"steps": 4}}, config), resume=tmp_path).fit()
    assert _lrs(tmp_path) == pytest.approx([0.4, 0.8, 0.8, 0.8])
    assert not [w for w in recwarn if "learning-rate" in str(w.message)]


def test_a_resume_that_changes_only_later_rates_warns_too(tiny_model_dir, tmp_path):
    """Warm-up 4 steps to 0.8, then linear to 0 at step 8; stopped after 2 steps and resumed with
    --steps 16. Step 3 trains at 0.8·3/4 = 0.6 either way (still warming up), but step 6 at
    0.8·(1 − 1/12) = 0.7333 instead of 0.8·(1 − 1/4) = 0.6: the change is named at the resume."""
    config = _config(tiny_model_dir, tmp_path, 8, "linear", warmup_steps=4)
    _stop_after(build_trainer(config), 2)
    assert _lrs(tmp_path) == pytest.approx([0.2, 0.4])
    with pytest.warns(UserWarning, match=r"settings \(steps 8 -> 16\): step 3 trains at lr 0\.6 where the "
                                         r"checkpoint planned 0\.6, and each later step t at lr · factor\(t\) of"):
        resumed = build_trainer(cfg.from_dict({"run": {"steps": 16}}, config), resume=tmp_path)
    rates = []
    for _ in range(4):  # the rates of steps 3-6, as the resumed scheduler gives them
        rates.append(resumed.scheduler.get_last_lr()[0])
        resumed.optimizer.step()
        resumed.scheduler.step()
    assert rates == pytest.approx([0.6, 0.8, 0.8, 0.8 * (1 - 1 / 12)])
