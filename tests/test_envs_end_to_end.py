"""Every built-in environment trains and evaluates from the command line, offline."""

from __future__ import annotations

import json

import pytest

from wapo.cli import main

ENVS = ["arithmetic", "rg:chain_sum", "gsm8k", "math", "multihop", "hotpotqa"]


@pytest.mark.parametrize("env", ENVS)
def test_train_and_eval_each_environment(env, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WAPO_CACHE", str(tmp_path / "cache"))  # BM25 indexes land here
    run = tmp_path / "run"
    small = ["--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "12",
             "--max-observation-tokens", "32", "--eval-size", "2", "--eval-samples", "2", "--progress", "false"]
    assert main(["train", "--model", tiny_model_dir, "--env", env, "--steps", "1", "--output-dir", str(run), *small]) == 0
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= row["reward_mean"] <= 1 and row["completion_len"] > 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--eval-size", "2", "--eval-samples", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["env"] == env and 0 <= result["greedy_accuracy"] <= 1
