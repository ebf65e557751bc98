"""Faults: Ctrl-C / SIGTERM at every phase of a step, then --resume, equals an uninterrupted run.

Real signals are sent to this process from inside each phase. Before the first optimizer step
the interrupted step is replayed on resume; from it on the step completes and is saved first.
Either way weights, metrics and counters (reward errors) equal those of a run never stopped.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import wapo.checkpoint
import wapo.trainer as trainer_module
import wapo.update as update_module
from wapo import config as cfg
from wapo.trainer import build_trainer

SKIP = ("time_", "tokens_per_second", "peak_memory_mb")


def _config(model_dir, out, **run):
    return cfg.from_dict({
        "model": {"model": model_dir, "bf16": "false", "bf16_sampling": "false"},
        # completions starting with a-j make the grader raise: reward errors are counted
        "env": {"env": "test_digit", "env_options": {"raise_on": "abcdefghij"}},
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 6, "temperature": 3.0},
        "algorithm": {"loss": "grpo", "updates_per_batch": 2},
        "optim": {"lr": 1e-2, "micro_batch_size": 3},
        "run": {"steps": 3, "eval_size": 0, "progress": False, "output_dir": str(out), "seed": 5,
                "taxonomy_chunk_size": 5, **run},
    })


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(SKIP)} for r in rows]


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path_factory.mktemp("straight") / "run"))
    trainer.fit()
    return _metrics(trainer.run_dir), {k: v.detach().clone() for k, v in trainer.model.named_parameters()}


def _signal_once(monkeypatch, owner, name, signum, *, after: bool, when):
    """Patch owner.name so that, the first time `when()` holds, it sends `signum` to this process
    before (after=False) or after (after=True) doing its real work."""
    real = getattr(owner, name)
    sent = []

    def patched(*args, **kwargs):
        fire = not sent and when()
        if fire and not after:
            sent.append(1)
            os.kill(os.getpid(), signum)
        out = real(*args, **kwargs)
        if fire and after:
            sent.append(1)
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(owner, name, patched)
    return sent


PHASES = {
    # phase of step 2: (object holding the function, its name, signal after the real call?,
    # checkpoint_every, progress.step while it runs: logging and saving follow the commit)
    "sampling": (trainer_module, "rollout", False, 5, 1),
    "scoring": (trainer_module, "score_episodes", True, 5, 1),
    "backward": (update_module, "policy_loss", True, 5, 1),
    "optimizer step": (None, "step", True, 5, 1),
    "logging": (None, "log_step", True, 5, 2),
    "checkpoint write": (wapo.checkpoint, "save", True, 2, 2),
}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_an_interrupt_in_any_phase_then_resume_equals_an_uninterrupted_run(
        tiny_model_dir, tmp_path, monkeypatch, straight, phase, signum):
    owner, name, after, every, during = PHASES[phase]
    trainer = build_trainer(_config(tiny_model_dir, tmp_path / "run", checkpoint_every=every))
    owner = {"step": trainer.optimizer, "log_step": trainer.log}.get(name, owner)
    sent = _signal_once(monkeypatch, owner, name, signum, after=after, when=lambda: trainer.progress.step == during)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert sent, f"the {phase} phase was never reached"
    monkeypatch.undo()
    # before the first optimizer step the step is replayed; from it on, it completes first
    committed = 2 if phase in ("optimizer step", "logging", "checkpoint write") else 1
    assert trainer.progress.step == committed
    assert wapo.checkpoint.latest(trainer.run_dir).name == f"step_{committed:06d}"

    resumed = build_trainer(trainer.config, resume=trainer.run_dir)
    assert resumed.progress.step == committed
    resumed.fit()
    metrics, weights = straight
    assert _metrics(resumed.run_dir) == metrics
    assert metrics[-1]["reward_errors_total"] == sum(r["reward_errors"] for r in metrics)
    for key, value in weights.items():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[key].detach(), value, rtol=0, atol=0)


def test_the_straight_run_has_reward_errors_to_count(straight):
    metrics, _ = straight
    assert sum(r["reward_errors"] for r in metrics) > 0  # otherwise the test above proves nothing about them
    assert [r["step"] for r in metrics] == [1, 2, 3]


def test_an_interrupt_during_an_optimizer_step_waits_for_the_step(tiny_model_dir, tmp_path, monkeypatch):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path / "run", checkpoint_every=5))
    seen = {}
    real = trainer.optimizer.step

    def step_then_interrupt(*args, **kwargs):
        out = real(*args, **kwargs)
        if trainer.progress.step == 1 and not seen:
            os.kill(os.getpid(), signal.SIGINT)
            seen["after signal"] = trainer.interrupts.pending  # the handler ran and deferred it
        return out

    monkeypatch.setattr(trainer.optimizer, "step", step_then_interrupt)
    trainer.optimizer._opt_called = True  # (torch's scheduler warns when `step` is replaced; it is still called)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert seen["after signal"] == signal.SIGINT
    # both optimizer steps of step 2 (updates_per_batch = 2) ran and the step was saved
    assert trainer.progress.step == 2
    state = torch.load(wapo.checkpoint.latest(trainer.run_dir) / "trainer.pt", weights_only=False)
    assert {s["step"].item() for s in state["optimizer"]["state"].values()} == {4.0}


def test_an_evaluation_cut_by_an_interrupt_runs_when_the_run_resumes(tiny_model_dir, tmp_path, monkeypatch):
    config = cfg.from_dict({"run": {"eval_every": 1, "eval_size": 2, "eval_samples": 1}},
                           _config(tiny_model_dir, tmp_path / "run", checkpoint_every=1))
    trainer = build_trainer(config)
    real = trainer.evaluate

    def interrupted(when):
        if when == "step 1":
            raise KeyboardInterrupt
        return real(when)

    monkeypatch.setattr(trainer, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.undo()
    build_trainer(config, resume=trainer.run_dir).fit()
    rows = [json.loads(line) for line in (trainer.run_dir / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["when"]) for r in rows] == [(0, "before"), (1, "step 1"), (2, "step 2"), (3, "after")]
