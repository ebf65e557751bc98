"""The `wapo` command on the tiny model: help, a one-step run and its files, config files and
flags, errors before any work, resume, eval of a checkpoint, and the retriever subcommand."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

import wapo.retrieval
from wapo import config as cfg
from wapo.cli import main
from wapo.losses import LOSSES, kl_penalty, policy_loss

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DOCS = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def _train_argv(model_dir: str, run: Path, *extra: str) -> list[str]:
    return ["train", "--model", model_dir, "--env", "test_digit", "--steps", "1", "--eval-size", "2",
            "--eval-samples", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2",
            "--max-new-tokens", "4", "--output-dir", str(run), "--progress", "false", *extra]


@pytest.fixture(scope="module")
def one_step_run(tiny_model_dir, tmp_path_factory) -> tuple[int, Path]:
    """(exit code, run folder) of the one-step run; tests that change the run work on a copy."""
    run = tmp_path_factory.mktemp("cli") / "run"
    return main(_train_argv(tiny_model_dir, run)), run


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width


# ---------------------------------------------------------------------------------------------
# Help
# ---------------------------------------------------------------------------------------------


def test_train_help_lists_every_flag_with_its_docstring_and_default(capsys):
    text = _help(["train", "--help"], capsys)
    assert "--lr FLOAT AdamW learning rate (peak). (default: 2e-05)" in text
    assert "--loss STR Objective: one of wapo.LOSSES. (default: 'wapo')" in text
    assert "--max-new-tokens INT Completion budget L in model tokens" in text
    assert "(default: 48)" in text
    for name in cfg.leaf_fields():
        assert "--" + name.replace("_", "-") in text


def test_train_help_shows_each_default_once_and_docstrings_intact(capsys):
    text = _help(["train", "--help"], capsys)
    assert "(default: None)" not in text
    assert '--device STR "auto" (CUDA when present, else CPU)' in text


def test_top_level_help_lists_the_three_commands(capsys):
    text = _help(["--help"], capsys)
    for command in ("train", "eval", "serve-retriever"):
        assert re.search(rf"\b{command}\b", text)


# ---------------------------------------------------------------------------------------------
# A run and its files
# ---------------------------------------------------------------------------------------------


def test_a_one_step_run_leaves_config_logs_plots_and_a_checkpoint(one_step_run):
    code, run = one_step_run
    assert code == 0
    config = tomllib.loads((run / "config.toml").read_text())
    assert (config["run"]["steps"], config["sampling"]["samples_per_prompt"], config["env"]["env"]) == \
        (1, 2, "test_digit")
    (row,) = _lines(run / "metrics.jsonl")
    assert row["step"] == 1
    assert len(_lines(run / "completions.jsonl")) == 4  # 2 prompts x 2 samples, log_completions = 4
    evals = _lines(run / "eval.jsonl")
    assert [(e["step"], e["when"]) for e in evals] == [(0, "before"), (1, "after")]
    assert all({"greedy_accuracy", "pass@2", "sampled_accuracy", "n"} <= set(e) for e in evals)
    for plot in ("reward.png", "entropy.png", "taxonomy.png"):
        assert (run / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    checkpoint = run / "checkpoints" / "step_000001"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model.safetensors", "progress.json", "rng.json", "trainer.pt"]
    assert json.loads((checkpoint / "progress.json").read_text())["data_position"] == 2


def test_docs_metrics_md_lists_every_metrics_key(one_step_run):
    _, run = one_step_run
    documented = set(re.findall(r"`([a-z0-9_@]+)`", DOCS.read_text()))
    (row,) = _lines(run / "metrics.jsonl")
    # keys this one step may not exercise: every objective's metrics (all steps carry them) and
    # the KL penalty's (only with kl_beta > 0)
    mask, zeros = torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3)
    conditional = {"skipped_step", *kl_penalty(zeros, zeros, mask, beta=0.1).metrics}
    for name in LOSSES:
        out = policy_loss(name, zeros, zeros, torch.tensor([1.0, -1.0]), mask, max_len=3, group_size=2)
        conditional |= set(out.metrics) - {"normalizer"}
    assert sorted((set(row) | conditional) - documented) == []


# ---------------------------------------------------------------------------------------------
# Config files and flags
# ---------------------------------------------------------------------------------------------

CONFIG_FILES = {
    "toml": """
[model]
model = "{model}"
[env]
env = "test_digit"
[sampling]
samples_per_prompt = 3
max_new_tokens = 5
[optim]
lr = 0.5
[run]
steps = 0
eval_size = 0
progress = false
""",
    "yaml": """
model: {{model: "{model}"}}
env: {{env: test_digit}}
sampling: {{samples_per_prompt: 3, max_new_tokens: 5}}
optim: {{lr: 0.5}}
run: {{steps: 0, eval_size: 0, progress: false}}
""",
}


@pytest.mark.parametrize("suffix", sorted(CONFIG_FILES))
def test_a_config_file_sets_sections_and_flags_override_it(tiny_model_dir, tmp_path, suffix):
    path = tmp_path / f"config.{suffix}"
    path.write_text(CONFIG_FILES[suffix].format(model=tiny_model_dir))
    run = tmp_path / "run"
    assert main(["train", "--config", str(path), "--lr", "0.001", "--output-dir", str(run)]) == 0
    saved = tomllib.loads((run / "config.toml").read_text())
    assert saved["model"]["model"] == tiny_model_dir
    assert (saved["sampling"]["samples_per_prompt"], saved["sampling"]["max_new_tokens"]) == (3, 5)
    assert saved["optim"]["lr"] == 0.001  # the flag, not the file's 0.5
    assert saved["sampling"]["temperature"] == 1.0  # neither: the default


@pytest.mark.parametrize("argv, message", [
    (["--config", "{bad_config}"], "unknown key(s) ['learning_rate'] in [optim]; valid: ["),
    (["--loss", "ppo"], "unknown loss 'ppo'; known: cispo, dapo, dr_grpo, grpo, gspo, raft, wapo"),
    (["--env", "nope"], "unknown environment 'nope'; known: "),
    (["--loss-options", "eps=0.1"], "valid: ['denominator', 'eps_high']"),
])
def test_a_wrong_name_exits_2_with_the_valid_names_before_any_run_folder(tiny_model_dir, tmp_path, capsys,
                                                                         argv, message):
    bad_config = tmp_path / "bad.toml"
    bad_config.write_text("[optim]\nlearning_rate = 1.0\n")
    run = tmp_path / "run"
    argv = [a.format(bad_config=bad_config) for a in argv]
    assert main(_train_argv(tiny_model_dir, run, *argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("wapo train: error: ") and message in err
    if "environment" in message:
        assert "test_digit" in err and "arithmetic" in err
    if "learning_rate" in message:
        assert "'lr'" in err
    assert not run.exists()


# ---------------------------------------------------------------------------------------------
# Resume and eval
# ---------------------------------------------------------------------------------------------


def test_resume_continues_the_run_without_repeating_a_step(one_step_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_step_run[1], run)
    assert main(["train", "--resume", str(run), "--steps", "2"]) == 0
    assert [r["step"] for r in _lines(run / "metrics.jsonl")] == [1, 2]
    assert tomllib.loads((run / "config.toml").read_text())["run"]["steps"] == 2
    progress = json.loads((run / "checkpoints" / "step_000002" / "progress.json").read_text())
    assert (progress["step"], progress["data_position"]) == (2, 4)  # 2 prompts per step
    # no second "before" evaluation; the "after" of step 1 is dropped, as the run went on
    assert [(e["step"], e["when"]) for e in _lines(run / "eval.jsonl")] == [(0, "before"), (2, "after")]


def test_eval_of_a_run_or_of_its_checkpoint_prints_the_same_json(one_step_run, capsys):
    _, run = one_step_run
    results = []
    for target in (run, run / "checkpoints" / "step_000001"):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(target), "--eval-size", "2", "--eval-samples", "2"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    by_run, by_checkpoint = results
    assert by_run == by_checkpoint
    assert by_run["checkpoint"] == str(run / "checkpoints" / "step_000001")
    assert (by_run["env"], by_run["n"]) == ("test_digit", 2)
    # counts over 2 problems (greedy, pass@2) and over 2 x 2 samples
    for key, total in (("greedy_accuracy", 2), ("pass@2", 2), ("sampled_accuracy", 4)):
        assert by_run[key] * total == round(by_run[key] * total) and 0 <= by_run[key] <= 1, key
    assert by_run["sampled_accuracy"] <= by_run["pass@2"]


# ---------------------------------------------------------------------------------------------
# serve-retriever (the server itself: tests/test_retrieval.py)
# ---------------------------------------------------------------------------------------------


def test_serve_retriever_passes_its_flags_to_serve(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(wapo.retrieval, "serve", lambda *args, **limits: calls.append((args, limits)))  # it blocks
    corpus = str(tmp_path / "corpus.jsonl")
    main(["serve-retriever", "--corpus", corpus, "--host", "127.0.0.1", "--port", "0", "--max-queries", "5",
          "--max-top-k", "7", "--max-body-bytes", "1000"])
    limits = {"max_queries": 5, "max_top_k": 7, "max_body_bytes": 1000, "max_json_depth": 8, "max_threads": 8,
              "max_pending": 64}
    assert calls == [((corpus, "127.0.0.1", 0), limits)]
    with pytest.raises(SystemExit) as exit_info:
        main(["serve-retriever", "--port", "0"])  # --corpus is required
    assert exit_info.value.code == 2


def test_a_run_ends_with_its_last_step_exported_as_a_hugging_face_folder(one_step_run):
    from transformers import AutoModelForCausalLM

    from wapo import checkpoint
    from wapo.models import load_policy

    code, run = one_step_run
    assert code == 0
    exported = AutoModelForCausalLM.from_pretrained(run / "hf")
    config = cfg.from_dict(cfg.load_file(run / "config.toml"))
    trained = load_policy(config.model.model, device=torch.device("cpu"))
    checkpoint.load_weights(checkpoint.latest(run), trained)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)


def test_report_to_is_checked_before_any_run_folder(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train_argv(tiny_model_dir, run, "--report-to", "tensorboard,mlflow")) == 2
    assert "--report-to takes a comma-separated subset of tensorboard, wandb, or none" in capsys.readouterr().err
    assert not run.exists()


def test_report_to_wandb_without_wandb_fails_before_any_run_folder(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    run = tmp_path / "run"
    assert main(_train_argv(tiny_model_dir, run, "--report-to", "tensorboard,wandb")) == 2
    assert "--report-to wandb needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not run.exists()


def test_the_core_never_imports_the_integrations():
    import subprocess

    code = ("import sys, wapo, wapo.cli, wapo.trainer, wapo.export, wapo.study, wapo.report; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'verl') or 'integrations' in m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
