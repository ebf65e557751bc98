"""`wapo compare`: study files, cells, their states, rerun and resume, --jobs, --dry-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wapo import config as cfg
from wapo.runlog import read_metrics
from wapo.study import (
    DEFAULT_SECONDS,
    cell_state,
    compare,
    estimate_seconds,
    load_study,
    run_cell,
    seconds_per_row_token,
)

TIMING = ("time_sample", "time_train", "tokens_per_second", "peak_memory_mb")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _study(tmp_path: Path, model: str, *, env: str = "test_digit", steps: int = 2, eval_size: int = 1,
           axes: str = '"algorithm.loss" = ["wapo", "grpo"]\n"run.seed" = [0, 1]\n', extra: str = "") -> Path:
    return _write(tmp_path / "study.toml", f"""{extra}
[base.model]
model = "{model}"
bf16 = "false"
bf16_sampling = "false"
[base.env]
env = "{env}"
[base.sampling]
prompts_per_step = 2
samples_per_prompt = 4
max_new_tokens = 6
temperature = 3.0
[base.optim]
lr = 1e-2
micro_batch_size = 4
[base.run]
steps = {steps}
eval_size = {eval_size}
eval_samples = 1
checkpoint_every = 1
report_to = "none"
progress = false
[axes]
{axes}""")


@pytest.mark.parametrize("text, message", [
    ("[extra]\n", "unknown table"),
    ("[study]\nkeep = true\n", "unknown key"),
    ("[axes]\n\"optim.learning_rate\" = [1e-5]\n", "not a config key"),
    ("[axes]\n\"run.lr\" = [1e-5]\n", "not a config key"),  # lr lives in [optim]
    ("[axes]\n\"optim.lr.x\" = [1e-5]\n", "only table fields"),
    ("[axes]\n\"optim.lr\" = []\n", "non-empty list"),
    ("[axes]\n\"optim.lr\" = 1e-5\n", "non-empty list"),
    ("[axes]\n\"run.seed\" = [0, 1, 0]\n", "twice"),
    ("[axes]\n\"run.output_dir\" = [\"a\", \"b\"]\n", "set by the study"),
    ("[base.run]\noutput_dir = \"x\"\n", "set by the study"),
    ("[base.optim]\nlr = -1.0\n", "--lr must be >= 0"),
    # a table written as a value: said, not an AttributeError
    ("axes = 3\n", r"\[axes\] must be a table"),
    ("base = 3\n", r"\[base\] must be a table"),
    ("study = 3\n", r"\[study\] must be a table"),
    ("variants = [1]\n", r"\[variants\] must be a table"),
    ("[base]\nrun = 3\n", r"section \[run\] must be a table"),
    # a string is no boolean: "no" must not keep every checkpoint
    ("[study]\nkeep_checkpoints = \"no\"\n", "keep_checkpoints must be true or false"),
])
def test_bad_study_files_fail_before_any_work(tmp_path, text, message):
    with pytest.raises(cfg.ConfigError, match=message):
        load_study(_write(tmp_path / "s.toml", text))


def test_cells_are_the_product_with_the_seed_outermost_and_readable_names(tmp_path):
    study = load_study(_write(tmp_path / "s.toml", """
[base.algorithm]
loss_options = { eps_low = 0.2 }
[axes]
"algorithm.loss" = ["dapo", "grpo"]
"run.seed" = [0, 1]
"algorithm.loss_options.eps_high" = [0.28, 9.0]
"""))
    cells = study.cells(tmp_path / "D")
    assert len(cells) == 2 * 2 * 2
    # run order: seed 0 of every setting first; names keep the file's axis order
    assert [c.name for c in cells[:4]] == ["loss=dapo,seed=0,eps_high=0.28", "loss=dapo,seed=0,eps_high=9.0",
                                           "loss=grpo,seed=0,eps_high=0.28", "loss=grpo,seed=0,eps_high=9.0"]
    assert all(c.config.run.seed == 1 for c in cells[4:])
    last = cells[-1].config
    assert last.algorithm.loss == "grpo" and last.algorithm.loss_options == {"eps_low": 0.2, "eps_high": 9.0}
    assert last.run.output_dir == str(tmp_path / "D" / "runs" / "loss=grpo,seed=1,eps_high=9.0")
    assert last.run.export_final is False
    assert last.run.progress is True  # as the base says, when run in this process
    assert study.cells(tmp_path / "D", jobs=2)[0].config.run.progress is False


def test_variants_are_one_more_axis_whose_values_set_several_keys(tmp_path, no_training):
    path = _write(tmp_path / "s.toml", """
[base.optim]
lr = 2e-5
[axes]
"algorithm.loss" = ["wapo", "dapo"]
"run.seed" = [0, 1]
[variants]
base = {}
hot = { "optim.lr" = 1e-4 }
ppo = { "algorithm.mini_batches" = 2, "algorithm.sampler_lag" = 1, "algorithm.loss_options.eps_high" = 0.5 }
""")
    cells = load_study(path).cells(tmp_path / "D")
    assert len(cells) == 2 * 2 * 3
    assert [c.name for c in cells[:3]] == ["loss=wapo,seed=0,variant=base", "loss=wapo,seed=0,variant=hot",
                                           "loss=wapo,seed=0,variant=ppo"]
    by_name = {c.name: c.config for c in cells}
    base, hot, ppo = (by_name[f"loss=dapo,seed=1,variant={v}"] for v in ("base", "hot", "ppo"))
    assert (base.optim.lr, hot.optim.lr, ppo.optim.lr) == (2e-5, 1e-4, 2e-5)
    assert (base.algorithm.mini_batches, ppo.algorithm.mini_batches, ppo.algorithm.sampler_lag) == (1, 2, 1)
    assert (base.algorithm.loss_options, ppo.algorithm.loss_options) == ({}, {"eps_high": 0.5})
    assert hot.run.seed == 1 and hot.algorithm.loss == "dapo"
    assert compare(path, tmp_path / "D", only=["variant=ppo", "seed=0"]) == 0
    assert sorted(no_training) == ["loss=dapo,seed=0,variant=ppo", "loss=wapo,seed=0,variant=ppo"]


@pytest.mark.parametrize("text, message", [
    ('[axes]\n"optim.lr" = [1e-5]\n[variants]\nhot = { "optim.lr" = 1e-4 }\n', "which the axis 'optim.lr' also sets"),
    ('[variants]\nhot = { "optim.learning_rate" = 1e-4 }\n', "not a config key"),
    ('[variants]\n"a b" = {}\n', "folder names"),
    ('[variants]\nhot = 1e-4\n', "table of dotted keys"),
    ('[variants]\nx = { "run.output_dir" = "y" }\n', "set by the study"),
    ('[axes]\nvariant = [1]\n', "not a config key"),
    ('[variants]\n"" = {}\n', "folder names"),
    ('[variants]\nhot = { optim.lr = 1e-4 }\n', "variant 'hot': key 'optim' is not a config key; .* quoted"),
    # a key inside a table that an axis replaces whole, and the reverse: one would silently undo the other
    ('[axes]\n"algorithm.loss_options" = [{eps_high = 0.2}]\n[variants]\nb = { "algorithm.loss_options.eps_low" '
     '= 0.1 }\n', "which the axis 'algorithm.loss_options' also sets"),
    ('[axes]\n"algorithm.loss_options.eps_low" = [0.1]\n[variants]\nb = { "algorithm.loss_options" = {} }\n',
     "also sets"),
])
def test_bad_variants_fail_before_any_work(tmp_path, text, message):
    with pytest.raises(cfg.ConfigError, match=message):
        load_study(_write(tmp_path / "s.toml", text))


STUDIES = sorted((Path(__file__).parent.parent / "examples").glob("study_*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_example_studies_are_valid(path, tmp_path, capsys):
    assert compare(path, tmp_path / "D", dry_run=True) == 0  # every cell's config, names and options checked
    cells = load_study(path).cells(tmp_path / "D")
    assert f"{len(cells)} cells, {len(cells)} to run" in capsys.readouterr().out


def test_values_that_name_the_same_folder_are_refused(tmp_path):
    study = load_study(_write(tmp_path / "s.toml", '[axes]\n"env.env" = ["rg:a", "rg_a"]\n'))
    with pytest.raises(cfg.ConfigError, match="both get the folder name"):
        study.cells(tmp_path / "D")


def test_only_runs_the_cells_with_the_chosen_axis_values(tmp_path, no_training):
    study = _write(tmp_path / "s.toml", '[axes]\n"algorithm.loss" = ["wapo", "grpo", "dapo"]\n'
                                        '"optim.lr" = [2e-5, 1e-4]\n"run.seed" = [0, 1]\n')
    # a label or the dotted key; 1e-4 and 0.0001 are the same number; one key's values are alternatives
    assert compare(study, tmp_path / "D", only=["lr=1e-4", "algorithm.loss=grpo", "loss=dapo"]) == 0
    assert sorted(no_training) == ["loss=dapo,lr=0.0001,seed=0", "loss=dapo,lr=0.0001,seed=1",
                                   "loss=grpo,lr=0.0001,seed=0", "loss=grpo,lr=0.0001,seed=1"]
    assert list(no_training.values()) == [3, 3, 3, 3]  # seed outermost still: the first two are seed 0
    assert [name.endswith("seed=0") for name in no_training] == [True, True, False, False]


def test_only_from_the_command_line_matches_values_of_their_own_kind(tmp_path, no_training, capsys):
    from wapo.cli import main

    study = _write(tmp_path / "s.toml", '[axes]\n"model.bf16" = [true, false]\n"optim.lr" = [1.0, 2e-5]\n'
                                        '"algorithm.loss_options" = [{eps_high = 0.2}, {eps_high = 0.5}]\n')
    assert main(["compare", str(study), "--output-dir", str(tmp_path / "D"), "--only", "lr=1", "--only", "bf16=true",
                 "--only", "loss_options=__eps_high__0.5_"]) == 0  # 1: the rate 1.0; a value as cell names write it
    assert list(no_training) == ["bf16=true,lr=1.0,loss_options=__eps_high__0.5_"]
    assert main(["compare", str(study), "--output-dir", str(tmp_path / "D"), "--only", "bf16=1"]) == 2  # 1 is no bool
    assert "axis 'model.bf16' has no value '1'; its values (as in cell names): true, false" in capsys.readouterr().err


@pytest.mark.parametrize("only, message", [
    (["lr"], "KEY=VALUE"),
    (["beta=0.1"], "one of the study's axes"),
    (["lr=3e-4"], "has no value '3e-4'"),
])
def test_only_refuses_keys_and_values_the_study_does_not_have(tmp_path, only, message, no_training):
    study = _write(tmp_path / "s.toml", '[axes]\n"optim.lr" = [2e-5, 1e-4]\n')
    with pytest.raises(cfg.ConfigError, match=message):
        compare(study, tmp_path / "D", only=only)
    assert no_training == {}


def _rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_cells_state_is_read_from_its_folder(tmp_path):
    config = cfg.from_dict({"run": {"steps": 3, "eval_size": 2, "max_bad_steps": 2}})
    d = tmp_path / "cell"
    assert cell_state(config, d) == "new"
    d.mkdir()
    (d / "config.toml").write_text(cfg.dump_toml(config))
    assert cell_state(config, d) == "started"
    (d / "checkpoints" / "step_000002").mkdir(parents=True)
    assert cell_state(config, d) == "partial"
    _rows(d / "metrics.jsonl", [{"step": s, "skipped_step": 0} for s in (1, 2, 3)])
    _rows(d / "eval.jsonl", [{"step": 0, "when": "before"}])
    assert cell_state(config, d) == "partial"  # all steps logged, but the "after" evaluation is missing
    _rows(d / "eval.jsonl", [{"step": 0, "when": "before"}, {"step": 3, "when": "after"}])
    assert cell_state(config, d) == "finished"
    no_eval = cfg.from_dict({"run": {"steps": 3, "eval_size": 0}})
    (d / "eval.jsonl").unlink()
    assert cell_state(no_eval, d) == "finished"
    # the trainer stopped it: its last max_bad_steps = 2 rows are skipped steps
    _rows(d / "metrics.jsonl", [{"step": 1, "skipped_step": 0}, {"step": 2, "skipped_step": 1}])
    assert cell_state(config, d) == "partial"
    _rows(d / "metrics.jsonl", [{"step": 1, "skipped_step": 1}, {"step": 2, "skipped_step": 1}])
    assert cell_state(config, d) == "diverged"


def test_the_estimate_is_rows_times_budget_times_the_rates(tmp_path):
    config = cfg.from_dict({"sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 6},
                            "run": {"steps": 2, "eval_size": 2, "eval_samples": 2, "eval_every": 1}})
    rate = {"sample": 0.01, "train": 0.02}
    # a step: 2·4 rows × 6 tokens × (0.01 + 0.02) = 1.44 s; an evaluation: 2 problems × (1 + 2) × 6 × 0.01 = 0.36 s
    # new: 2 steps + before, step 1 and after = 2·1.44 + 3·0.36 = 3.96 s
    assert estimate_seconds(config, "new", 0, rate) == pytest.approx(3.96)
    # resumed after step 1: 1 step + after = 1.44 + 0.36
    assert estimate_seconds(config, "partial", 1, rate) == pytest.approx(1.80)
    assert estimate_seconds(config, "finished", 2, rate) == 0
    assert seconds_per_row_token(tmp_path) == (DEFAULT_SECONDS, 0)
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.toml").write_text(cfg.dump_toml(config))
    # 8 rows × 6 tokens = 48 row-tokens: 0.48 s and 0.96 s of sampling -> 0.01 and 0.02, mean 0.015
    _rows(run / "metrics.jsonl", [{"step": 1, "time_sample": 0.48, "time_train": 0.96},
                                  {"step": 2, "time_sample": 0.96, "time_train": 0.96, "sampling_rounds": 1}])
    rates, n = seconds_per_row_token(tmp_path)
    assert n == 2 and rates == pytest.approx({"sample": 0.015, "train": 0.02})
    # 4 passes over each batch: a step trains 4 times as long, and a logged update counts as 4 passes
    passes = cfg.from_dict({"algorithm": {"updates_per_batch": 4}}, config)
    assert estimate_seconds(passes, "new", 0, rate) == pytest.approx(2 * 8 * 6 * (0.01 + 4 * 0.02) + 3 * 0.36)
    (run / "config.toml").write_text(cfg.dump_toml(passes))
    assert seconds_per_row_token(tmp_path)[0] == pytest.approx({"sample": 0.015, "train": 0.005})


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_two_by_two_study_resumes_when_killed_and_skips_finished_cells_on_rerun(tiny_model_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    import wapo.trainer as trainer_module

    study = _study(tmp_path, tiny_model_dir)
    out = tmp_path / "D"
    cells = load_study(study).cells(out)
    assert compare(study, out, dry_run=True) == 0
    assert "4 cells, 4 to run" in capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing

    # Ctrl-C in the second cell's second step (the 4th update): the trainer saves step 1 and stops the study
    real_update, calls = trainer_module.Trainer.update, []

    def update(self, batch):
        calls.append(self.run_dir.name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_update(self, batch)

    monkeypatch.setattr(trainer_module.Trainer, "update", update)
    with pytest.raises(KeyboardInterrupt):
        compare(study, out)
    monkeypatch.undo()
    states = [cell_state(c.config, c.dir) for c in cells]
    assert states == ["finished", "partial", "new", "new"]
    assert not (cells[0].dir / "checkpoints").exists()  # a finished cell keeps its logs only
    (cells[0].dir / "checkpoints" / "step_000002").mkdir(parents=True)  # as a kill before the clean-up leaves it
    # the third cell was killed hard before its first checkpoint: config.toml and a stray log line
    cells[2].dir.mkdir(parents=True)
    (cells[2].dir / "config.toml").write_text(cfg.dump_toml(cells[2].config))
    _rows(cells[2].dir / "metrics.jsonl", [{"step": 1, "reward_mean": 99.0}])
    assert cell_state(cells[2].config, cells[2].dir) == "started"

    calls.clear()  # which steps the rerun trains: the partial cell only its step 2, from its checkpoint
    monkeypatch.setattr(trainer_module.Trainer, "update", lambda self, batch: calls.append(
        (self.run_dir.name, self.progress.step + 1)) or real_update(self, batch))
    assert compare(study, out) == 0
    monkeypatch.undo()
    assert calls == [(cells[1].name, 2), (cells[2].name, 1), (cells[2].name, 2), (cells[3].name, 1),
                     (cells[3].name, 2)]
    assert [cell_state(c.config, c.dir) for c in cells] == ["finished"] * 4
    for c in cells:
        assert [r["step"] for r in _metrics(c.dir)] == [1, 2]
        assert [r["when"] for r in map(json.loads, (c.dir / "eval.jsonl").read_text().splitlines())] == [
            "before", "after"]
        assert not (c.dir / "checkpoints").exists() and not (c.dir / "hf").exists()
    # the resumed and the restarted cells equal cells run straight through (all but wall times)
    for c in cells[1:3]:
        alone = cfg.from_dict({"run": {"output_dir": str(tmp_path / "alone" / c.name)}}, c.config)
        run_cell(alone)
        assert _metrics(c.dir) == _metrics(Path(alone.run.output_dir))
    summary = (out / "summary.md").read_text()
    assert "runs/loss=grpo,seed=0; runs/loss=grpo,seed=1" in summary and (out / "report.html").is_file()

    # rerun: every cell is finished, nothing is trained again
    monkeypatch.setattr(trainer_module, "build_trainer", lambda *a, **k: pytest.fail("a finished cell ran again"))
    before = {c.name: (c.dir / "metrics.jsonl").read_bytes() for c in cells}
    assert compare(study, out) == 0
    assert before == {c.name: (c.dir / "metrics.jsonl").read_bytes() for c in cells}


def test_a_changed_study_is_not_mixed_into_cells_run_with_other_settings(tiny_model_dir, tmp_path):
    study = _study(tmp_path, tiny_model_dir, axes='"run.seed" = [0]\n')
    cell = load_study(study).cells(tmp_path / "D")[0]
    cell.dir.mkdir(parents=True)
    other = cfg.from_dict({"optim": {"lr": 0.5}}, cell.config)
    (cell.dir / "config.toml").write_text(cfg.dump_toml(other))
    with pytest.raises(cfg.ConfigError, match=r"optim.lr: 0.5 -> 0.01"):
        compare(study, tmp_path / "D")


def test_a_study_folder_named_another_way_or_moved_is_the_same_study(tmp_path, monkeypatch, no_training):
    # a cell's config.toml records the folder it was created in (run.output_dir): `--output-dir studies/x` then
    # `--output-dir /abs/.../studies/x`, or a study moved (committed under docs/results), is the same folder of
    # cells, not a changed setting: its partial cell resumes
    monkeypatch.chdir(tmp_path)
    study = _write(tmp_path / "s.toml", '[axes]\n"run.seed" = [0]\n')
    cell = load_study(study).cells(Path("D"))[0]
    assert cell.config.run.output_dir == "D/runs/seed=0"
    cell.dir.mkdir(parents=True)
    (cell.dir / "config.toml").write_text(cfg.dump_toml(cell.config))
    (cell.dir / "checkpoints" / "step_000001").mkdir(parents=True)
    assert compare(study, tmp_path / "D") == 0 and no_training == {"seed=0": 3}
    (tmp_path / "D").rename(tmp_path / "moved")
    no_training.clear()
    assert compare(study, tmp_path / "moved") == 0 and no_training == {"seed=0": 3}


def test_keep_checkpoints_keeps_them(tiny_model_dir, tmp_path):
    study = _study(tmp_path, tiny_model_dir, steps=1, eval_size=0, axes='"run.seed" = [0]\n',
                   extra="[study]\nkeep_checkpoints = true\n")
    assert compare(study, tmp_path / "D") == 0
    assert (tmp_path / "D" / "runs" / "seed=0" / "checkpoints" / "step_000001").is_dir()


def test_jobs_run_cells_in_subprocesses_and_sigterm_stops_them_resumably(tiny_model_dir, tmp_path):
    # subprocesses do not see the test-only environment: the built-in arithmetic task, which the
    # tiny model never solves (no winner, so WAPO trains nothing; GRPO's advantages are 0)
    study = _study(tmp_path, tiny_model_dir, env="arithmetic", steps=30, eval_size=0,
                   axes='"algorithm.loss" = ["wapo", "grpo"]\n')
    out = tmp_path / "D"
    cells = load_study(study).cells(out, jobs=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                                    os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen([sys.executable, "-m", "wapo.cli", "compare", str(study), "--output-dir", str(out),
                               "--jobs", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not any(read_metrics(c.dir) for c in cells):  # a cell is training (a step takes ~0.05 s)
        assert parent.poll() is None and time.monotonic() < deadline, parent.communicate()[0].decode()[-2000:]
        time.sleep(0.05)
    parent.send_signal(signal.SIGTERM)
    log = parent.communicate(timeout=120)[0].decode()
    assert parent.returncode == 130, log[-2000:]
    assert "Stopping 2 running cell(s)" in log
    training = next(c for c in cells if read_metrics(c.dir))
    assert cell_state(training.config, training.dir) == "partial"  # the worker saved its step and stopped
    assert "Interrupted: checkpoint of step" in (out / "logs" / f"{training.name}.log").read_text()
    saved = cfg.from_dict(cfg.load_file(training.dir / "config.toml"))
    assert saved.model.threads == max(1, len(os.sched_getaffinity(0)) // 2)
    assert not any(cell_state(c.config, c.dir) == "finished" for c in cells)

    assert compare(study, out) == 0  # here, one after the other, each cell on its recorded thread count
    for c in cells:
        assert cell_state(c.config, c.dir) == "finished"
        assert [r["step"] for r in _metrics(c.dir)] == list(range(1, 31))


# ---------------------------------------------------------------------------------------------
# Threads: a cell's count is one of its settings
# ---------------------------------------------------------------------------------------------


class _Worker:
    """A finished `python -m wapo.study` worker that records its command and environment."""

    started: list[tuple[dict, dict]] = []

    def __init__(self, command, *, env, **kwargs):
        _Worker.started.append((json.loads(command[3]), env))
        self.returncode = 0

    def poll(self):
        return 0


@pytest.fixture
def no_training(monkeypatch):
    """compare() without training: the threads each cell would run with, by cell name."""
    import torch

    import wapo.report
    import wapo.study as study_module

    ran = {}
    monkeypatch.setattr(study_module, "run_cell", lambda config, **k: ran.setdefault(Path(config.run.output_dir).name,
                                                                                     config.model.threads))
    monkeypatch.setattr(study_module.subprocess, "Popen", _Worker)
    monkeypatch.setattr(wapo.report, "write_report", lambda out_dir: [])
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # torch's default in this process
    _Worker.started = []
    return ran


def test_auto_threads_are_cores_over_jobs_or_torchs_default_and_explicit_ones_are_kept(tmp_path, monkeypatch,
                                                                                          no_training):
    import wapo.study as study_module

    monkeypatch.setattr(study_module, "_cores", lambda: 4)
    study = load_study(_write(tmp_path / "s.toml", '[axes]\n"run.seed" = [0, 1]\n'))
    assert [c.config.model.threads for c in study.cells(tmp_path / "D", jobs=2)] == [2, 2]  # 4 cores // 2 jobs
    assert [c.config.model.threads for c in study.cells(tmp_path / "D", jobs=3)] == [1, 1]  # 4 // 3
    assert [c.config.model.threads for c in study.cells(tmp_path / "D", jobs=1)] == [3, 3]  # torch's default
    fixed = load_study(_write(tmp_path / "f.toml", '[base.model]\nthreads = 5\n[axes]\n"run.seed" = [0]\n'))
    assert fixed.cells(tmp_path / "E", jobs=2)[0].config.model.threads == 5
    axis = load_study(_write(tmp_path / "a.toml", '[axes]\n"model.threads" = [0, 1]\n'))
    assert [c.config.model.threads for c in axis.cells(tmp_path / "F", jobs=2)] == [2, 1]  # 0 is auto


def test_a_partial_cell_resumes_with_its_recorded_threads_whatever_the_jobs(tmp_path, monkeypatch, no_training):
    import wapo.study as study_module

    monkeypatch.setattr(study_module, "_cores", lambda: 2)
    path = _write(tmp_path / "s.toml", '[axes]\n"run.seed" = [0, 1]\n')
    out = tmp_path / "D"
    first = load_study(path).cells(out, jobs=2)[0]  # created by `--jobs 2` on 2 cores: 2 // 2 = 1 thread
    assert first.config.model.threads == 1
    first.dir.mkdir(parents=True)
    (first.dir / "config.toml").write_text(cfg.dump_toml(first.config))
    (first.dir / "checkpoints" / "step_000001").mkdir(parents=True)
    assert cell_state(first.config, first.dir) == "partial"

    # --jobs 1, in this process: the partial cell keeps its 1 thread, the new one gets torch's default 3
    assert compare(path, out, jobs=1) == 0
    assert no_training == {"seed=0": 1, "seed=1": 3}

    # --jobs 2 on a machine now with 8 cores: the partial cell's worker still runs on 1 thread, the new one on 4
    monkeypatch.setattr(study_module, "_cores", lambda: 8)
    assert compare(path, out, jobs=2) == 0
    threads = {Path(config["run"]["output_dir"]).name: (config["model"]["threads"], env["OMP_NUM_THREADS"],
                                                        env["MKL_NUM_THREADS"])
               for config, env in _Worker.started}
    assert threads == {"seed=0": (1, "1", "1"), "seed=1": (4, "4", "4")}


def test_a_study_that_sets_other_threads_than_a_cell_recorded_is_refused(tmp_path, no_training):
    out = tmp_path / "D"
    cell = load_study(_write(tmp_path / "s.toml", '[axes]\n"run.seed" = [0]\n')).cells(out, jobs=1)[0]
    cell.dir.mkdir(parents=True)
    (cell.dir / "config.toml").write_text(cfg.dump_toml(cfg.from_dict({"model": {"threads": 2}}, cell.config)))
    (cell.dir / "checkpoints" / "step_000001").mkdir(parents=True)
    explicit = _write(tmp_path / "t.toml", '[base.model]\nthreads = 1\n[axes]\n"run.seed" = [0]\n')
    with pytest.raises(cfg.ConfigError, match=r"model.threads: 2 -> 1\).*leave model.threads out of the study"):
        compare(explicit, out, jobs=1)
    assert no_training == {}
    same = _write(tmp_path / "u.toml", '[base.model]\nthreads = 2\n[axes]\n"run.seed" = [0]\n')
    assert compare(same, out, jobs=1) == 0 and no_training == {"seed=0": 2}


def test_a_cell_recorded_before_threads_were_recorded_matches_any_count(tmp_path, no_training):
    out = tmp_path / "D"
    cell = load_study(_write(tmp_path / "s.toml", '[axes]\n"run.seed" = [0]\n')).cells(out, jobs=1)[0]
    cell.dir.mkdir(parents=True)
    (cell.dir / "config.toml").write_text(cfg.dump_toml(cfg.from_dict({"model": {"threads": 0}}, cell.config)))
    assert compare(tmp_path / "s.toml", out, jobs=1) == 0 and no_training == {"seed=0": 3}  # auto: torch's default


def test_compare_loads_the_report_before_it_runs_a_cell(tmp_path, monkeypatch):
    # a study runs for hours: the report written at its end is the code it started with, not what is on disk then
    import wapo
    import wapo.report
    import wapo.study as study_module

    monkeypatch.setattr(wapo, "report", wapo.report)  # the package's attribute and sys.modules: both restored after
    monkeypatch.delitem(sys.modules, "wapo.report")
    loaded = []  # at the moment the cells run: is the report's module loaded?
    monkeypatch.setattr(study_module, "_run_here",
                        lambda todo, *rest: loaded.append("wapo.report" in sys.modules) or {})
    assert compare(_write(tmp_path / "s.toml", '[axes]\n"run.seed" = [0]\n'), tmp_path / "D") == 0
    assert loaded == [True]


def test_a_cell_that_fails_does_not_stop_the_others_and_the_study_exits_1(tmp_path, monkeypatch, no_training, capsys):
    import wapo.study as study_module

    ran = []

    def run_cell(config, **kwargs):
        ran.append(Path(config.run.output_dir).name)
        if ran[-1] == "seed=0":
            raise RuntimeError("broken cell")

    monkeypatch.setattr(study_module, "run_cell", run_cell)
    assert compare(_write(tmp_path / "s.toml", '[axes]\n"run.seed" = [0, 1]\n'), tmp_path / "D") == 1
    assert ran == ["seed=0", "seed=1"]
    err = capsys.readouterr().err
    assert "RuntimeError: broken cell" in err and "cell seed=0 failed: see the traceback above" in err


def test_a_second_compare_in_the_same_folder_is_refused_until_the_first_ends(tmp_path, no_training):
    import fcntl

    study = _write(tmp_path / "s.toml", '[axes]\n"run.seed" = [0, 1]\n')
    (tmp_path / "D").mkdir()
    with open(tmp_path / "D" / ".compare.lock", "w") as held:  # what a running compare holds
        held.write("pid 4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(cfg.ConfigError, match=r"another `wapo compare` is running in .*D \(pid 4242\)"):
            compare(study, tmp_path / "D")
        assert no_training == {}  # refused before any cell ran
    assert compare(study, tmp_path / "D") == 0  # released (as the OS does when that process ends)
    assert sorted(no_training) == ["seed=0", "seed=1"]
    assert (tmp_path / "D" / ".compare.lock").read_text() == f"pid {os.getpid()}"


def test_the_folder_stays_locked_while_a_worker_the_first_compare_started_still_runs(tmp_path, monkeypatch):
    # `--jobs 2`: workers run in their own sessions, so they outlive a compare killed hard (or stopped by a
    # second Ctrl-C while they finish their step); until they end, a new compare would train the same cells
    import wapo.report
    import wapo.study as study_module

    ran, sleepers, real_popen = [], [], subprocess.Popen
    monkeypatch.setattr(study_module, "run_cell", lambda config, **k: ran.append(Path(config.run.output_dir).name))
    monkeypatch.setattr(wapo.report, "write_report", lambda out_dir: [])

    class Gone:  # what the compare sees: a worker that has ended ...
        returncode = 0

        def poll(self):
            return 0

    def popen(command, **kwargs):  # ... while the real one, started as compare starts it, goes on
        sleepers.append(real_popen([sys.executable, "-c", "import time; time.sleep(120)"], **kwargs))
        return Gone()

    study = _write(tmp_path / "s.toml", '[axes]\n"run.seed" = [0]\n')
    with monkeypatch.context() as patch:
        patch.setattr(study_module.subprocess, "Popen", popen)
        assert compare(study, tmp_path / "D", jobs=2) == 0
    try:
        with pytest.raises(cfg.ConfigError, match=r"another `wapo compare` is running in .*D \(pid \d+\)"):
            compare(study, tmp_path / "D")
        assert ran == []
    finally:
        sleepers[0].kill()
        sleepers[0].wait()
    assert compare(study, tmp_path / "D") == 0 and ran == ["seed=0"]  # its last holder gone, the folder is free
