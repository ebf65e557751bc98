"""Every built-in environment trains and evaluates from the command line, offline."""

from __future__ import annotations

import json

import pytest

from wapo.cli import main
from wapo.envs import make_env

ENVS = ["arithmetic", "rg:chain_sum", "gsm8k", "math", "multihop", "hotpotqa"]


@pytest.mark.parametrize("env", ENVS)
def test_train_and_eval_each_environment(env, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WAPO_CACHE", str(tmp_path / "cache"))  # BM25 indexes land here
    run = tmp_path / "run"
    small = ["--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "12",
             "--max-observation-tokens", "32", "--eval-size", "2", "--eval-samples", "2", "--progress", "false"]
    assert main(["train", "--model", tiny_model_dir, "--env", env, "--steps", "1", "--output-dir", str(run), *small]) == 0
    (row,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and row["completion_len"] > 0
    # the step's 2 x 2 completions are all logged (log_completions = 4), each with its grade
    completions = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert len(completions) == 4 and all(c["reason"] for c in completions)
    assert all(0 <= c["reward"] <= 1 for c in completions)
    assert row["reward_mean"] == pytest.approx(sum(c["reward"] for c in completions) / 4)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--eval-size", "2", "--eval-samples", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    n = min(2, len(make_env(env, {}).eval_set()))  # the hotpotqa sample holds out only 1 question
    assert (result["env"], result["n"]) == (env, n)
    # counts over n problems (greedy, pass@2) and over 2n samples
    for key, total in (("greedy_accuracy", n), ("pass@2", n), ("sampled_accuracy", 2 * n)):
        assert result[key] * total == round(result[key] * total) and 0 <= result[key] <= 1, key
    assert result["sampled_accuracy"] <= result["pass@2"]
