"""`--report-to wandb`: RunLog's metrics reach Weights & Biases (a fake `wandb` module records the calls)."""

from __future__ import annotations

import sys
import types

import pytest

from wapo.runlog import RunLog, report_sinks


class _FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def log(self, data, step):
        self.calls.append(("log", step, data))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _FakeRun(calls)

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_metrics_and_evals_reach_wandb_at_their_steps(fake_wandb, tmp_path):
    tensorboard, sinks = report_sinks("wandb", tmp_path, {"algorithm": {"loss": "wapo"}})
    assert not tensorboard
    log = RunLog(tmp_path, tensorboard=tensorboard, sinks=sinks)
    log.log_step(1, {"reward_mean": 0.5, "neg_peak_pred_dentropy": float("nan"), "backward_rows": 3,
                     "skipped_step": True})
    log.log_eval(1, "after", {"accuracy": 0.75, "n": 4})
    log.close()
    init, step, evals, finish = fake_wandb
    run_id = (tmp_path / "wandb_run_id").read_text()
    assert len(run_id) == 12 and int(run_id, 16) >= 0  # made here: wandb 0.31 has no util.generate_id
    assert init == ("init", {"project": "wapo", "name": tmp_path.name, "id": run_id, "resume": "allow",
                             "dir": str(tmp_path), "config": {"algorithm": {"loss": "wapo"}}})
    # numbers only: the empty bin's NaN (null in metrics.jsonl) and booleans stay out
    assert step == ("log", 1, {"reward_mean": 0.5, "backward_rows": 3})
    assert evals == ("log", 1, {"eval/accuracy": 0.75, "eval/n": 4})
    assert finish == ("finish",)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1  # the file log is unchanged


def test_a_resumed_run_continues_the_same_wandb_run(fake_wandb, tmp_path):
    report_sinks("tensorboard,wandb", tmp_path, {})
    report_sinks("wandb", tmp_path, {})
    first, second = (call[1]["id"] for call in fake_wandb if call[0] == "init")
    assert first == second == (tmp_path / "wandb_run_id").read_text()


def test_report_to_names_are_checked_and_wandb_must_be_installed(tmp_path, monkeypatch):
    assert report_sinks("tensorboard", tmp_path, {}) == (True, [])
    assert report_sinks("none", tmp_path, {}) == (False, [])
    with pytest.raises(ValueError, match="tensorboard, wandb, or none"):
        report_sinks("mlflow", tmp_path, {})
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        report_sinks("wandb", tmp_path, {})
