"""`wapo report`: the summary's numbers from hand-written run folders, and the page in a real browser."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from wapo import config as cfg
from wapo.cli import main
from wapo.report import load_runs, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _run(out: Path, loss: str, seed: int, rewards: list, entropies: list, evals: list, *, variant: str = "",
         optim: dict | None = None, **extra) -> Path:
    """A run folder as the trainer leaves it: config.toml, metrics.jsonl (3 steps), eval.jsonl."""
    d = out / "runs" / (f"loss={loss},seed={seed}" + (f",variant={variant}" if variant else ""))
    d.mkdir(parents=True)
    config = cfg.from_dict({"algorithm": {"loss": loss}, "optim": optim or {}, "run": {
        "seed": seed, "steps": 3, "eval_size": 4, "eval_samples": 2, "max_bad_steps": 2, "output_dir": str(d)}})
    (d / "config.toml").write_text(cfg.dump_toml(config))
    rows = [{"step": t, "reward_mean": r, "entropy": h, "truncated_frac": 0.0, "time_sample": 1.0, "time_train": 2.0,
             "skipped_step": 0, **{k: v[t - 1] for k, v in extra.items()}}
            for t, (r, h) in enumerate(zip(rewards, entropies), start=1)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # pass@2 = greedy + 0.25 in every evaluation, so its means are the greedy ones + 0.25 and its stds equal
    (d / "eval.jsonl").write_text("".join(
        json.dumps({"step": step, "when": when, "greedy_accuracy": acc, "pass@2": acc + 0.25, "n": 4}) + "\n"
        for step, when, acc in evals))
    return d


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """wapo × 3 seeds that learn; grpo × 3 seeds: one fine, one stopped for non-finite steps, one flagged;
    its report written once (tests only read it)."""
    out = tmp_path_factory.mktemp("report") / "D"
    up, h = [0.3, 0.5, 0.7], [2.0, 1.8, 1.6]
    for seed, (mid, final) in enumerate([(0.6, 0.7), (0.7, 0.6), (0.8, 0.9)]):
        _run(out, "wapo", seed, up, h, [(0, "before", 0.5), (2, "step 2", mid), (3, "after", final)])
    _run(out, "grpo", 0, up, h, [(0, "before", 0.5), (3, "after", 0.6)])
    # steps 2 and 3 skipped (non-finite): max_bad_steps = 2 in a row, the trainer stopped it -> diverged at step 2
    _run(out, "grpo", 1, [0.3] * 3, [2.0, None, None], [(0, "before", 0.5)], skipped_step=[0, 1, 1])
    flags = {"collapsed": [0, 0, 1], "collapse_entropy": [0, 0, 1], "collapse_explosion": [0, 0, 0],
             "collapse_repetition": [0, 0, 0], "collapse_length": [0, 0, 0]}
    _run(out, "grpo", 2, up, [2.0, 1.8, 1.2], [(0, "before", 0.5), (3, "after", 0.4)], **flags)
    (out / "study.toml").write_text('[study]\ndescription = "hand-written"\n'
                                    '[axes]\n"algorithm.loss" = ["wapo", "grpo"]\n"run.seed" = [0, 1, 2]\n')
    write_report(out)
    return out


def test_the_summary_holds_the_hand_computed_numbers(study_dir):
    with (study_dir / "summary.csv").open() as f:
        wapo, grpo = list(csv.DictReader(f))  # settings in the study's order
    assert (wapo["loss"], grpo["loss"]) == ("wapo", "grpo")

    def num(row, key):
        return float(row[key]) if row[key] else None

    # wapo greedy: before 0.5 ×3; peak max(0.5, 0.6, 0.7), max(0.5, 0.7, 0.6), max(0.5, 0.8, 0.9) = 0.7, 0.7, 0.9:
    # mean 0.7667, std sqrt((0.0667² + 0.0667² + 0.1333²) / 2) = sqrt(0.02667 / 2) = 0.1155;
    # final 0.7, 0.6, 0.9: mean 0.7333, std sqrt((0.0333² + 0.1333² + 0.1667²) / 2) = sqrt(0.04667 / 2) = 0.1528
    assert num(wapo, "greedy_before_mean") == pytest.approx(0.5) and num(wapo, "greedy_before_std") == 0
    assert num(wapo, "greedy_peak_mean") == pytest.approx(0.76667, abs=1e-5)
    assert num(wapo, "greedy_peak_std") == pytest.approx(0.11547, abs=1e-5)
    assert num(wapo, "greedy_final_mean") == pytest.approx(0.73333, abs=1e-5)
    assert num(wapo, "greedy_final_std") == pytest.approx(0.15275, abs=1e-5)
    assert num(wapo, "pass@k_final_mean") == pytest.approx(0.73333 + 0.25, abs=1e-5)
    assert num(wapo, "pass@k_final_std") == pytest.approx(0.15275, abs=1e-5)
    assert (wapo["collapses"], wapo["steps_to_collapse_mean"]) == ("0", "")
    # grpo: peak 0.6, 0.5, 0.5 -> 0.5333 ± 0.0577;
    # final only from the two runs that have one: 0.6, 0.4 -> 0.5 ± 0.1414
    assert num(grpo, "greedy_peak_mean") == pytest.approx(0.53333, abs=1e-5)
    assert num(grpo, "greedy_peak_std") == pytest.approx(0.057735, abs=1e-5)
    assert num(grpo, "greedy_final_mean") == pytest.approx(0.5) and num(grpo, "greedy_final_std") == pytest.approx(
        0.141421, abs=1e-5)
    # collapses: seed 1 stopped at step 2 (its first skipped step), seed 2 flagged at step 3 -> 2.5 ± 0.7071
    # entropy of the last third (3 steps: the last step): wapo 1.6 ×3; grpo 1.6, 1.2 (seed 1 diverged, unfinished: left out)
    # -> 1.4 ± sqrt(2 · 0.2² / 1) = 0.28284
    assert (num(wapo, "entropy_end_mean"), num(wapo, "entropy_end_std")) == pytest.approx((1.6, 0.0))
    assert (num(grpo, "entropy_end_mean"), num(grpo, "entropy_end_std")) == pytest.approx((1.4, 0.28284), abs=1e-5)
    # final below before (0.5): none of wapo's; grpo's seed 2 (0.4) of the 2 with a final (seed 1 diverged)
    assert (wapo["final_below_before"], wapo["with_final"]) == ("0", "3")
    assert (grpo["final_below_before"], grpo["with_final"]) == ("1", "2")
    assert (grpo["collapses"], grpo["collapse_kinds"]) == ("2", "diverged entropy")
    assert num(grpo, "steps_to_collapse_mean") == 2.5
    assert num(grpo, "steps_to_collapse_std") == pytest.approx(0.70711, abs=1e-5)
    assert (grpo["seeds"], grpo["finished"]) == ("3", "2")
    assert num(grpo, "seconds_per_step_mean") == 3.0  # 1 s sampling + 2 s update at every step
    assert grpo["runs"] == "runs/loss=grpo,seed=0; runs/loss=grpo,seed=1; runs/loss=grpo,seed=2"
    md = (study_dir / "summary.md").read_text()
    assert "| wapo | 3 (3) | 0.500 ± 0.000 | 0.767 ± 0.115 | 0.733 ± 0.153 |" in md
    # entropy, first step: every seed's 2.0 (the diverged one's too); last third (the last of 3 steps): the finished seeds' 1.6 and 1.2
    assert ("| 2.00 ± 0.00 | 1.40 ± 0.28 | 1/2 | 2/3 (diverged entropy) | 2.5 ± 0.7 | 3.0 ± 0.0 "
            "| runs/loss=grpo,seed=0; ") in md


def test_each_objective_is_compared_with_wapo_paired_by_seed(study_dir):
    with (study_dir / "summary.csv").open() as f:
        wapo, grpo = list(csv.DictReader(f))
    # grpo's finals: seed 0 0.6, seed 1 none (diverged), seed 2 0.4; wapo's: 0.7, 0.6, 0.9.
    # pairs: seeds 0 and 2 -> 0.6 − 0.7 = −0.1, 0.4 − 0.9 = −0.5: mean −0.3,
    # sd sqrt(2 · 0.2² / 1) = 0.28284,
    # half-width t(1 df) 12.706 × 0.28284 / sqrt(2) = 2.5412
    assert (grpo["reference"], grpo["paired_seeds"]) == ("wapo", "2")
    assert float(grpo["greedy_final_minus_reference_mean"]) == pytest.approx(-0.3)
    assert float(grpo["greedy_final_minus_reference_ci95"]) == pytest.approx(2.5412, abs=1e-4)
    # the last third's entropy (the last of 3 steps) over the same seeds: 1.6 − 1.6 = 0, 1.2 − 1.6 = −0.4
    # -> −0.2 ± 12.706 · 0.28284 / sqrt(2)
    assert float(grpo["entropy_end_minus_reference_mean"]) == pytest.approx(-0.2)
    assert float(grpo["entropy_end_minus_reference_ci95"]) == pytest.approx(2.5412, abs=1e-4)
    assert (wapo["paired_seeds"], float(wapo["greedy_final_minus_reference_mean"])) == ("3", 0.0)
    md = (study_dir / "summary.md").read_text()
    assert "| grpo | 2 (1 without a final) | -0.300 ± 2.541 | -0.20 ± 2.54 | 2/3 | 0/3 |" in md  # seed 1 diverged
    assert (grpo["unpaired_seeds"], wapo["unpaired_seeds"]) == ("1", "0")
    assert '<table id="reference">' in (study_dir / "report.html").read_text()


def test_the_last_steps_entropy_is_the_one_a_finished_run_logged_last(tmp_path):
    # dapo seed 1's last step had no token to describe (dynamic sampling found no mixed group: entropy
    # null, no update), so the entropy it logged last, 1.4, is still its policy's; seed 2 stopped after 2
    # of its 3 steps: its 0.5 is no last step's, and it is left out as its final accuracy is
    evals = [(0, "before", 0.5), (3, "after", 0.6)]
    _run(tmp_path, "wapo", 0, [0.3, 0.5, 0.7], [2.0, 1.8, 1.7], evals)
    _run(tmp_path, "wapo", 1, [0.3, 0.5, 0.7], [None, 1.8, 1.7], evals)  # its first step logged no entropy
    _run(tmp_path, "dapo", 0, [0.3, 0.5, 0.7], [2.0, 1.8, 1.6], evals)
    _run(tmp_path, "dapo", 1, [0.3, 0.5, 0.7], [2.2, 1.4, None], evals)
    _run(tmp_path, "dapo", 2, [0.3, 0.5], [2.3, 0.5], evals[:1])
    write_report(tmp_path)
    with (tmp_path / "summary.csv").open() as f:
        rows = {r["loss"]: r for r in csv.DictReader(f)}
    wapo, dapo = rows["wapo"], rows["dapo"]
    # the first step's entropy counts every run, finished or not: dapo 2.0, 2.2, 2.3 -> 2.1667 ±
    # sqrt((0.1667² + 0.0333² + 0.1333²) / 2) = 0.15275; wapo seed 1's first logged entropy is its step 2's
    assert float(dapo["entropy_first_mean"]) == pytest.approx(2.16667, abs=1e-5)
    assert float(dapo["entropy_first_std"]) == pytest.approx(0.15275, abs=1e-5)
    assert float(wapo["entropy_first_mean"]) == pytest.approx(1.9)
    # (1.6 + 1.4) / 2 = 1.5 ± sqrt(2 · 0.1² / 1) = 0.141421
    assert float(dapo["entropy_end_mean"]) == pytest.approx(1.5)
    assert float(dapo["entropy_end_std"]) == pytest.approx(0.141421, abs=1e-6)
    # against wapo (1.7 on both seeds): 1.6 − 1.7 = −0.1, 1.4 − 1.7 = −0.3 -> −0.2 ± 12.706 · 0.141421 / sqrt(2)
    assert float(dapo["entropy_end_minus_reference_mean"]) == pytest.approx(-0.2)
    assert float(dapo["entropy_end_minus_reference_ci95"]) == pytest.approx(1.2706, abs=1e-4)


def test_the_end_entropy_is_the_mean_over_the_last_third_of_the_steps(tmp_path):
    # 6 steps: the last ⌈6/3⌉ = 2 rows. wapo seed 0: (1.0 + 0.6) / 2 = 0.8; seed 1: its last step logged none,
    # so 1.2 alone; grpo seed 0: (0.4 + 0.2) / 2 = 0.3; seed 1: no entropy in the window, the 0.9 before it
    evals = [(0, "before", 0.5), (6, "after", 0.6)]
    up = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    _run(tmp_path, "wapo", 0, up, [2.0, 1.8, 1.6, 1.4, 1.0, 0.6], evals)
    _run(tmp_path, "wapo", 1, up, [2.0, 1.8, 1.6, 1.4, 1.2, None], evals)
    _run(tmp_path, "grpo", 0, up, [2.0, 1.8, 1.6, 1.4, 0.4, 0.2], evals)
    _run(tmp_path, "grpo", 1, up, [2.0, 1.8, 1.6, 0.9, None, None], evals)
    write_report(tmp_path)
    with (tmp_path / "summary.csv").open() as f:
        rows = {r["loss"]: r for r in csv.DictReader(f)}
    # wapo 0.8, 1.2 -> 1.0 ± sqrt(2 · 0.2² / 1) = 0.28284; grpo 0.3, 0.9 -> 0.6
    assert float(rows["wapo"]["entropy_end_mean"]) == pytest.approx(1.0)
    assert float(rows["wapo"]["entropy_end_std"]) == pytest.approx(0.28284, abs=1e-5)
    assert float(rows["grpo"]["entropy_end_mean"]) == pytest.approx(0.6)
    # paired: 0.3 − 0.8 = −0.5, 0.9 − 1.2 = −0.3 -> −0.4 ± 12.706 · 0.141421 / sqrt(2) = 1.2706
    assert float(rows["grpo"]["entropy_end_minus_reference_mean"]) == pytest.approx(-0.4)
    assert float(rows["grpo"]["entropy_end_minus_reference_ci95"]) == pytest.approx(1.2706, abs=1e-4)


def test_variants_are_a_column_and_hide_the_keys_they_set(tmp_path):
    up, h = [0.3, 0.5, 0.7], [2.0, 1.8, 1.6]
    for loss in ("wapo", "grpo"):
        for seed, final in enumerate((0.6, 0.8) if loss == "wapo" else (0.5, 0.5)):
            _run(tmp_path, loss, seed, up, h, [(0, "before", 0.5), (3, "after", final)], variant="hot",
                 optim={"lr": 1e-4, "warmup_steps": 2})
            _run(tmp_path, loss, seed, up, h, [(0, "before", 0.5), (3, "after", final - 0.1)], variant="base")
    (tmp_path / "study.toml").write_text('[axes]\n"algorithm.loss" = ["wapo", "grpo"]\n"run.seed" = [0, 1]\n'
                                         '[variants]\nbase = {}\n'
                                         'hot = { "optim.lr" = 1e-4, "optim.warmup_steps" = 2 }\n')
    write_report(tmp_path)
    with (tmp_path / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["loss"], r["variant"]) for r in rows] == [("wapo", "base"), ("wapo", "hot"), ("grpo", "base"),
                                                         ("grpo", "hot")]
    assert "lr" not in rows[0] and "warmup_steps" not in rows[0]  # the variant names them
    # grpo against wapo within each variant: (0.5 − 0.6, 0.5 − 0.8) and (0.4 − 0.5, 0.4 − 0.7): both mean −0.2
    assert [float(r["greedy_final_minus_reference_mean"]) for r in rows] == pytest.approx([0, 0, -0.2, -0.2])
    assert float(rows[2]["greedy_final_mean"]) == pytest.approx(0.4)
    assert "| grpo | hot | 2 | -0.200 ± 1.271 | +0.00 ± 0.00 | 0/2 | 0/2 |" in (tmp_path / "summary.md").read_text()
    # the overview: one colour per objective, one line style per variant, so each pair of them is told apart
    from matplotlib.colors import to_hex

    from wapo.report import _overview_figure, group_settings, setting_axes

    runs = load_runs(tmp_path)
    settings = group_settings(runs, setting_axes(runs, ["algorithm.loss", "variant"]), {})
    drawn = {tuple(re.search(r"loss=(\w+), variant=(\w+)", line.get_label()).groups()):
             (to_hex(line.get_color()), line.get_linestyle()) for line in _overview_figure(settings).axes[0].lines}
    assert len(drawn) == 4
    assert drawn["wapo", "base"][0] == drawn["wapo", "hot"][0] != drawn["grpo", "base"][0] == drawn["grpo", "hot"][0]
    assert drawn["wapo", "base"][1] == drawn["grpo", "base"][1] != drawn["wapo", "hot"][1] == drawn["grpo", "hot"][1]


def test_runs_without_a_variant_keep_the_columns_that_tell_them_apart(tmp_path):
    # an older study's cells (no variant, lr 2e-5 and 1e-4) beside a variant study's, all seed 0
    up, h, evals = [0.3, 0.5, 0.7], [2.0, 1.8, 1.6], [(0, "before", 0.5), (3, "after", 0.6)]
    _run(tmp_path, "wapo", 0, up, h, evals, optim={"lr": 2e-5})
    (tmp_path / "runs" / "loss=wapo,seed=0").rename(tmp_path / "runs" / "loss=wapo,lr=2e-05,seed=0")
    _run(tmp_path, "wapo", 0, up, h, evals, optim={"lr": 1e-4})
    _run(tmp_path, "wapo", 0, up, h, evals, variant="hot", optim={"lr": 1e-4})
    _run(tmp_path, "wapo", 0, up, h, evals, variant="table", optim={"lr": 2e-5})
    (tmp_path / "study.toml").write_text('[axes]\n"run.seed" = [0]\n[variants]\nhot = { "optim.lr" = 1e-4 }\n'
                                         'table = { "optim.lr" = 2e-5 }\n')
    write_report(tmp_path)
    with (tmp_path / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    # the runs without a variant differ in lr: it stays a column, and no setting holds seed 0 twice
    assert sorted((r["variant"], r["lr"], r["seeds"]) for r in rows) == [
        ("", "0.0001", "1"), ("", "2e-05", "1"), ("hot", "0.0001", "1"), ("table", "2e-05", "1")]


def test_a_variant_that_sets_a_whole_table_hides_its_fields_and_a_repeated_seed_warns(tmp_path):
    up, h, evals = [0.3, 0.5, 0.7], [2.0, 1.8, 1.6], [(0, "before", 0.5), (3, "after", 0.6)]
    for variant, eps in (("narrow", 0.2), ("wide", 0.5)):
        d = _run(tmp_path, "wapo", 0, up, h, evals, variant=variant)
        config = cfg.from_dict({**cfg.load_file(d / "config.toml"), "algorithm": {"loss": "wapo",
                                                                                  "loss_options": {"eps_high": eps}}})
        (d / "config.toml").write_text(cfg.dump_toml(config))
    (tmp_path / "study.toml").write_text('[axes]\n"run.seed" = [0]\n[variants]\n'
                                         'narrow = { "algorithm.loss_options" = { eps_high = 0.2 } }\n'
                                         'wide = { "algorithm.loss_options" = { eps_high = 0.5 } }\n')
    write_report(tmp_path)
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert "variant" in header and "eps_high" not in header and "loss_options.eps_high" not in header
    shutil.copytree(tmp_path / "runs" / "loss=wapo,seed=0,variant=wide", tmp_path / "runs" / "copy,variant=wide")
    with pytest.warns(UserWarning, match=r"holds seed\(s\) \[0\] more than once \(copy,variant=wide, "
                                         r"loss=wapo,seed=0,variant=wide\)"):
        write_report(tmp_path)


def test_a_whole_table_axis_shows_the_fields_inside_it(tmp_path):
    # "algorithm.loss_options" = [{eps_high = 0.2}, {eps_high = 0.5}] (docs/study.md: a whole table is an axis
    # too): the report shows eps_high, not a column of None for the table itself
    up, h, evals = [0.3, 0.5, 0.7], [2.0, 1.8, 1.6], [(0, "before", 0.5), (3, "after", 0.6)]
    for loss in ("wapo", "grpo"):
        for eps in (0.2, 0.5):
            d = _run(tmp_path, loss, 0, up, h, evals)
            config = cfg.from_dict({"algorithm": {"loss": loss, "loss_options": {"eps_high": eps}}},
                                   cfg.from_dict(cfg.load_file(d / "config.toml")))
            (d / "config.toml").write_text(cfg.dump_toml(config))
            d.rename(d.with_name(f"{d.name},eps={eps}"))
    (tmp_path / "study.toml").write_text('[axes]\n"algorithm.loss" = ["wapo", "grpo"]\n"run.seed" = [0]\n'
                                         '"algorithm.loss_options" = [{eps_high = 0.2}, {eps_high = 0.5}]\n')
    write_report(tmp_path)
    with (tmp_path / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:3] == ["loss", "eps_high", "seeds"]
    assert [(r["loss"], r["eps_high"]) for r in rows] == [("wapo", "0.2"), ("wapo", "0.5"), ("grpo", "0.2"),
                                                          ("grpo", "0.5")]


def test_the_paired_interval_uses_students_t():
    from wapo.report import paired_interval, t95

    # 5 pairs: mean 0.1, sd sqrt(((−0.1)² + 0 + 0.1² + 0 + 0) / 4) = 0.070711, t(4 df) 2.776 × 0.070711 / sqrt(5)
    mean, half = paired_interval([0.0, 0.1, 0.2, 0.1, 0.1])
    assert mean == pytest.approx(0.1) and half == pytest.approx(2.776 * 0.070711 / 5 ** 0.5, abs=1e-5)
    assert math.isnan(paired_interval([0.3])[1])
    # beyond the table: t(40) = 2.0211, t(100) = 1.9840, t(1000) = 1.9623 (exact values)
    assert [round(t95(df), 3) for df in (30, 40, 100, 1000)] == [2.042, 2.021, 1.984, 1.962]


def test_flagged_steps_are_marked_on_every_metrics_panel_of_their_run(study_dir):
    # grpo seed 2 is flagged at step 3 only (the fixture): a red × at step 3 on its own line in each panel of
    # metrics.jsonl, at that step's value (entropy 1.2, reward 0.7); none for the unflagged seeds; none on
    # held-out panels (eval.jsonl's steps are not the flagged ones)
    from matplotlib.colors import to_hex

    from wapo.report import CURVES, _setting_figure, panel_title

    runs = [r for r in load_runs(study_dir) if r.config.algorithm.loss == "grpo"]
    figure = _setting_figure("grpo", runs)
    marks = {ax.get_title(): [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines
                              if line.get_marker() == "x" and to_hex(line.get_color()) == "#ff0000"
                              and len(line.get_xdata())]
             for ax in figure.axes if ax.get_title()}
    assert marks["entropy"] == [([3], [1.2])] and marks["reward_mean"] == [([3], [0.7])]
    assert marks["held-out greedy_accuracy"] == [] and marks["held-out pass@k"] == []
    assert all(len(marks[panel_title(key)]) == 1 for key in CURVES if not key.startswith("eval:"))
    assert "neg_peak_pred_dentropy (per unit ηA)" in marks  # the forecasts' panels say their unit


def test_runs_logged_without_flags_are_replayed_through_the_detector(tmp_path):
    # the collapsing stream of tests/test_collapse.py: flagged at step 4 by the entropy criterion
    _run(tmp_path, "grpo", 0, [0.5, 0.7, 0.3, 0.1], [2.0, 0.4, 0.2, 0.1], [])
    (run,) = load_runs(tmp_path)
    assert run.collapse_steps == [4] and run.collapse_kinds == {"entropy"} and run.first_collapse == 4


def test_report_command_and_an_empty_folder(tmp_path, capsys):
    _run(tmp_path, "grpo", 0, [0.5, 0.7], [2.0, 1.0], [(0, "before", 0.5)])
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / n) for n in ("summary.csv", "summary.md", "report.html", "overview.png")]
    assert "| grpo | 1 (0) | 0.500 | 0.500 | — |" in (tmp_path / "summary.md").read_text()  # one seed: no ±
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_the_page_is_self_contained(study_dir):
    page = (study_dir / "report.html").read_text()
    assert "<script" not in page and not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert len(re.findall(r'<img alt="plot" src="data:image/png;base64,', page)) == 3  # overview + 2 settings


def test_the_overview_is_also_a_png_file_of_the_figures_size(study_dir):
    png = (study_dir / "overview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # IHDR's width and height (big-endian at bytes 16-24): the figure's 18 x 4 inches at 100 dpi
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (1800, 400)


def test_the_report_renders_in_headless_chromium(study_dir, tmp_path):
    if CHROMIUM is None:
        # CI sets WAPO_REQUIRE_BROWSER once it has a browser, so a lookup that misses it fails there
        if os.environ.get("WAPO_REQUIRE_BROWSER") == "1":
            pytest.fail("WAPO_REQUIRE_BROWSER=1 but no chromium / chromium-browser found on PATH")
        pytest.skip("no Chromium installed (Debian: apt-get install chromium)")
    # a copy with a probe that records, once the page has loaded, how many images the browser decoded
    page = (study_dir / "report.html").read_text().replace("</body>", (
        "<script>window.addEventListener('load', () => { document.body.dataset.decoded = "
        "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; });</script></body>"))
    probe = tmp_path / "probe.html"
    probe.write_text(page)
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-decoded="3"' in dom  # the overview and one figure per setting, all decoded
    table = re.search(r'<table id="summary">.*?</table>', dom, re.S).group(0)
    body_rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1], re.S)
    assert len(body_rows) == 2
    assert re.findall(r"<td>(.*?)</td>", body_rows[1])[:2] == ["grpo", "3 (2)"]
    assert "2/3 (diverged entropy)" in body_rows[1]


def test_threads_split_settings_only_when_they_are_a_study_axis():
    from types import SimpleNamespace

    from wapo.report import setting_axes

    def run(loss, threads, seed):
        config = cfg.from_dict({"algorithm": {"loss": loss}, "model": {"threads": threads},
                                "run": {"seed": seed, "output_dir": f"d{loss}{threads}{seed}"}})
        return SimpleNamespace(config=config, variant=None)

    runs = [run("wapo", 1, 0), run("wapo", 2, 1), run("grpo", 1, 0), run("grpo", 2, 1)]
    # threads differing as --jobs set them: one setting per objective
    assert setting_axes(runs, ["algorithm.loss", "run.seed"]) == ["algorithm.loss"]
    # a thread axis in the study file: its values are settings of their own
    assert setting_axes(runs, ["algorithm.loss", "model.threads", "run.seed"]) == ["algorithm.loss", "model.threads"]


def test_the_readme_table_script_prints_the_summarys_numbers(study_dir, benchmark_script):
    axes, rows = benchmark_script("study_table").rows_of("S", study_dir)
    assert axes == ["loss"]
    # the numbers of test_the_summary_holds_the_hand_computed_numbers and of the paired comparison
    assert rows == [
        ["S", "", "wapo", "3", "0.500 → 0.767 ± 0.115 → 0.733 ± 0.153", "—", "2.00 → 1.60 ± 0.00", "—", "0/3", "0/3"],
        ["S", "", "grpo", "3", "0.500 → 0.533 ± 0.058 → 0.500 ± 0.141", "-0.300 ± 2.541 (2, 1 without a final)",
         "2.00 → 1.40 ± 0.28", "-0.20 ± 2.54", "1/2", "2/3 (diverged entropy)"]]


def test_the_readme_table_shows_a_spread_start_and_seeds_it_could_not_pair(tmp_path, benchmark_script):
    # wapo starts at 0.5 and 0.6 (seeds that differ in the held-out start: its spread is shown) and ends 0.2 up;
    # both grpo seeds diverged (no final): no difference to show, and the two seeds it could not pair are said
    for seed, before in enumerate((0.5, 0.6)):
        _run(tmp_path, "wapo", seed, [0.3, 0.5, 0.7], [2.0, 1.8, 1.6],
             [(0, "before", before), (3, "after", before + 0.2)])
        _run(tmp_path, "grpo", seed, [0.3] * 3, [2.0, None, None], [(0, "before", before)], skipped_step=[0, 1, 1])
    (tmp_path / "study.toml").write_text('[axes]\n"algorithm.loss" = ["wapo", "grpo"]\n"run.seed" = [0, 1]\n')
    write_report(tmp_path)
    _, rows = benchmark_script("study_table").rows_of("T", tmp_path)
    # 0.55 ± sqrt(2 · 0.05² / 1) = 0.0707 for every mean here
    assert rows == [
        ["T", "", "wapo", "2", "0.550 ± 0.071 → 0.750 ± 0.071 → 0.750 ± 0.071", "—", "2.00 → 1.60 ± 0.00", "—", "0/2", "0/2"],
        ["T", "", "grpo", "2", "0.550 ± 0.071 → 0.550 ± 0.071 → —", "— (0, 2 without a final)", "2.00 → —", "—", "0/0",
         "2/2 (diverged)"]]


def test_tool_use_counts_each_steps_searches_and_leaves_out_what_it_cannot_know(tmp_path, benchmark_script):
    tool_use = benchmark_script("tool_use")
    # the counter since the process started: 300 after step 1 (an evaluation's searches in it), +64, +32;
    # a resume counts from 0 again (40: not this step's alone), then +16; one step without the counter
    counts = [300, 364, 396, 40, 56, None]
    per = tool_use.searches_per_episode([{"env_searches": c} for c in counts], episodes=32)
    assert per == [None, 2.0, 1.0, None, 0.5, None]
    run = _run(tmp_path, "wapo", 0, [0.25, 0.5, 0.0], [1.0, 1.0, 1.0], [], env_searches=[300, 364, 364])
    # the fixture's config: 8 prompts × 8 samples = 64 episodes a step; truncated_frac 0.0 every step
    assert tool_use.run_line(run) == "| loss=wapo,seed=0 | 0.25 0.50 0.00 | · 1.0 0.0 | 0.00 0.00 0.00 |"


def test_the_readme_table_shows_one_start_where_the_spread_is_only_rounding(tmp_path, benchmark_script):
    # 0.22 five times: its float mean is 0.22000000000000003, its std 3.1e-17, not 0: still one start
    for seed in range(5):
        _run(tmp_path, "wapo", seed, [0.3, 0.5, 0.7], [2.0, 1.8, 1.6], [(0, "before", 0.22), (3, "after", 0.3)])
    write_report(tmp_path)
    _, rows = benchmark_script("study_table").rows_of("T", tmp_path)
    assert rows[0][4].startswith("0.220 → ")


def test_length_cap_weighs_every_completion_once_and_names_fully_cut_steps(tmp_path, benchmark_script):
    def run(name, steps, sampling=None, algorithm=None):
        (tmp_path / name).mkdir()
        config = cfg.from_dict({"sampling": sampling or {}, "algorithm": algorithm or {}})
        (tmp_path / name / "config.toml").write_text(cfg.dump_toml(config))
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"step": i + 1, "sampling_rounds": r, "backward_rows": 8, "skipped_rows": 8,
                        "truncated_frac": t}) + "\n" for i, (r, t) in enumerate(steps)))
        return tmp_path / name

    # 8 prompts × 8 = 64 completions a step: 32 cut, then 64 cut
    a = run("a", [(1, 0.5), (1, 1.0)])
    # DAPO's dynamic sampling: 4 × 8 drawn a round; 3 rounds, 96 drawn, all of them in truncated_frac, though
    # only 16 rows (2 mixed groups) went into the update (backward_rows + skipped_rows)
    b = run("b", [(3, 0.0)], {"prompts_per_step": 4}, {"loss": "dapo", "dynamic_sampling": True})
    rows, share, full = benchmark_script("length_cap").at_the_cap([a, b])
    assert rows == 224 and share == pytest.approx(96 / 224)  # a plain mean of the steps would be 0.5
    assert full == {"a": [2]}
    # completion_len and entropy per step; the last third: the last ⌈n/3⌉ steps (a: step 2 of 2; b: its one step)
    for name, lengths, entropies in (("a", [20.0, 30.0], [2.0, 0.5]), ("b", [10.0], [None])):
        rows = [json.loads(line) | {"completion_len": n, "entropy": h} for line, n, h
                in zip((tmp_path / name / "metrics.jsonl").read_text().splitlines(), lengths, entropies)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert benchmark_script("length_cap").per_run_row(a) == "| a | 75.0% | 20 → 30 | 0.50 |"  # (32 + 64) / 128
    assert benchmark_script("length_cap").per_run_row(b) == "| b | 0.0% | 10 → 10 | nan |"  # no entropy logged
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.toml").write_text((tmp_path / "a" / "config.toml").read_text())
    with pytest.raises(SystemExit, match="no metrics.jsonl rows with truncated_frac"):
        benchmark_script("length_cap").at_the_cap([tmp_path / "empty"])

def test_runs_never_evaluated_are_not_counted_as_missing_a_final(tmp_path):
    # eval_size = 0: no eval.jsonl rows at all, so nothing to pair and nothing "without a final"
    for loss, seed in (("wapo", 0), ("wapo", 1), ("grpo", 0), ("grpo", 1), ("grpo", 2)):
        d = _run(tmp_path, loss, seed, [0.3] * 3, [2.0] * 3, [])
        config = cfg.from_dict({"run": {"eval_size": 0}}, cfg.from_dict(cfg.load_file(d / "config.toml")))
        (d / "config.toml").write_text(cfg.dump_toml(config))
    write_report(tmp_path)
    with (tmp_path / "summary.csv").open() as f:
        grpo, wapo = list(csv.DictReader(f))  # by folder name when no study file orders them
    assert (grpo["loss"], grpo["paired_seeds"], grpo["unpaired_seeds"]) == ("grpo", "0", "0")
    assert "| grpo | 0 | — | — | 0/3 | 0/2 |" in (tmp_path / "summary.md").read_text()


def test_the_overview_tells_apart_more_settings_than_there_are_line_styles(tmp_path):
    # the stress search's shape: 2 objectives × 6 variants; four line styles alone would draw variants 0 and 4
    # (and 1 and 5) of one objective alike, so past four the styles take markers
    from matplotlib.colors import to_hex

    from wapo.report import _overview_figure, group_settings, setting_axes

    for loss in ("wapo", "grpo"):
        for i in range(6):
            _run(tmp_path, loss, 0, [0.3, 0.5, 0.7], [2.0, 1.8, 1.6], [(0, "before", 0.5)], variant=f"v{i}")
    runs = load_runs(tmp_path)
    settings = group_settings(runs, setting_axes(runs, ["algorithm.loss", "variant"]), {})
    looks = [(to_hex(line.get_color()), line.get_linestyle(), line.get_marker())
             for line in _overview_figure(settings).axes[0].lines]
    assert len(looks) == 12 and len(set(looks)) == 12
    assert len({colour for colour, _, _ in looks}) == 2  # still one colour per objective


def test_a_run_stopped_before_its_first_evaluation_is_a_seed_without_a_final(tmp_path):
    # grpo seed 0 was to be evaluated (eval_size 4) but was stopped during its "before" evaluation: no eval
    # rows yet, and no final to pair with wapo's; it is not a run that is never evaluated
    _run(tmp_path, "wapo", 0, [0.3] * 3, [2.0] * 3, [(0, "before", 0.5), (3, "after", 0.6)])
    _run(tmp_path, "grpo", 0, [], [], [])
    write_report(tmp_path)
    with (tmp_path / "summary.csv").open() as f:
        grpo, wapo = list(csv.DictReader(f))  # by folder name when no study file orders them
    assert (grpo["loss"], grpo["paired_seeds"], grpo["unpaired_seeds"]) == ("grpo", "0", "1")
    assert "| grpo | 0 (1 without a final) | — | — | 0/1 | 0/1 |" in (tmp_path / "summary.md").read_text()
