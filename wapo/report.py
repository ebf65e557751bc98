"""`wapo report D`: one offline HTML report and summary tables of the runs under D/runs.

Every folder `D/runs/*` holding a config.toml is a run. Runs are grouped into settings: runs
whose configs agree on everything but `run.seed` (and the folder, threads, progress bars).
The axes shown are the config keys that differ between runs, plus those of D/study.toml's
[axes], plus always `algorithm.loss`. Per setting:

- curves over steps, one line per seed and their mean with a band of ± one standard
  deviation over seeds: training reward, held-out accuracy (eval.jsonl), entropy, completion
  length, length-cap share, the five taxonomy bins' token fractions and forecast ΔH, clip
  fractions, gradient norm, repetition; a red × marks each step a collapse flag is up;
- one table row: held-out greedy accuracy and pass@k before training / at their peak over all
  evaluations / after training (mean ± std over seeds, n − 1 denominator), the entropy logged
  first by each run and over the last third of the steps by each finished run (mean ± std over
  seeds), the seeds whose final
  greedy accuracy is below their accuracy before training, collapses (seeds
  with a `collapsed` step or a run the trainer stopped for non-finite steps), steps to the first
  collapse, seconds per step (sampling + update), and the run folders the numbers come from;
- against the reference objective (WAPO where the study has it, else the first): the final
  greedy accuracy's and the last third's entropy's differences, paired by seed, with 95% t
  intervals, and both collapse counts.

Collapse flags are read from metrics.jsonl (`wapo.collapse`); a run logged without them is
replayed through `CollapseDetector()` with default thresholds. Written: D/report.html (plots
embedded as base64 PNG, no script, no network), D/summary.csv and D/summary.md.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from wapo import config as cfg
from wapo.collapse import FLAGS, CollapseDetector
from wapo.runlog import read_evals, read_metrics
from wapo.study import SEED_AXIS, VARIANT_AXIS, cell_state
from wapo.taxonomy import BINS

NOT_AN_AXIS = ("run.output_dir", SEED_AXIS, "model.threads", "run.progress")
CURVES = (["reward_mean", "eval:greedy_accuracy", "eval:pass@k", "entropy", "completion_len", "truncated_frac"]
          + [f"{b}_frac" for b in BINS] + [f"{b}_pred_dentropy" for b in BINS]
          + ["clip_frac_pos", "clip_frac_neg", "grad_norm", "repeat_ngram_frac"])
"""Panels of a setting's figure: metrics.jsonl keys, or `eval:<key>` for eval.jsonl."""
OVERVIEW = ("reward_mean", "eval:greedy_accuracy", "entropy", "completion_len")


def panel_title(key: str) -> str:
    """A panel's title: its key; `eval:` as "held-out"; the forecasts' unit, since a bin's
    `_pred_dentropy` is per unit ηA (negative for neg_peak, whose own term raises the entropy)."""
    return key.replace("eval:", "held-out ") + (" (per unit ηA)" if key.endswith("_pred_dentropy") else "")


@dataclass
class Run:
    """One run folder's config, logs, state (`wapo.study.cell_state`) and collapse flags."""

    dir: Path
    config: cfg.TrainConfig
    metrics: list[dict]
    evals: list[dict]
    state: str
    collapse_steps: list[int] = field(default_factory=list)
    """Steps whose `collapsed` flag is up."""
    collapse_kinds: set[str] = field(default_factory=set)
    variant: str | None = None
    """The study variant its folder name says (`...,variant=NAME`), if any."""

    @property
    def seed(self) -> int:
        return self.config.run.seed

    @property
    def first_collapse(self) -> int | None:
        """The first flagged step; for a run stopped by non-finite steps without a flag, its first bad step."""
        if self.collapse_steps:
            return self.collapse_steps[0]
        if self.state == "diverged":
            good = [r["step"] for r in self.metrics if r.get("skipped_step") != 1]
            return (good[-1] if good else 0) + 1
        return None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a metrics key or `eval:<key>` (`eval:pass@k`: k = eval_samples); null -> NaN."""
        if key.startswith("eval:"):
            rows, name = self.evals, self._eval_key(key[5:])
        else:
            rows, name = self.metrics, key
        return [r["step"] for r in rows], [_number(r.get(name)) for r in rows]

    def eval_value(self, key: str, which: str) -> float:
        """eval.jsonl's `key` "before" training, at its "peak" over all evaluations, or "final"
        (the "after" evaluation); NaN when absent."""
        values = [(r.get("when"), _number(r.get(self._eval_key(key)))) for r in self.evals]
        if which == "peak":
            return max((v for _, v in values if not math.isnan(v)), default=math.nan)
        return next((v for when, v in values if when == {"final": "after"}.get(which, which)), math.nan)

    def _eval_key(self, name: str) -> str:
        return f"pass@{self.config.run.eval_samples}" if name == "pass@k" else name


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def load_runs(out_dir: Path) -> list[Run]:
    """Every run under out_dir/runs (a folder with a config.toml), by folder name."""
    runs = []
    for saved in sorted((out_dir / "runs").glob("*/config.toml")):
        config = cfg.from_dict(cfg.load_file(saved))
        variant = re.search(rf"(?:^|,){VARIANT_AXIS}=([^,]+)", saved.parent.name)
        run = Run(saved.parent, config, read_metrics(saved.parent), read_evals(saved.parent),
                  cell_state(config, saved.parent), variant=variant.group(1) if variant else None)
        _collapse_flags(run)
        runs.append(run)
    if not runs:
        raise FileNotFoundError(f"no run folder (with a config.toml) under {out_dir / 'runs'}")
    return runs


def _collapse_flags(run: Run) -> None:
    """The logged flags, or a replay of the detector over the logged rows."""
    rows = run.metrics
    if rows and "collapsed" not in rows[0]:
        detector = CollapseDetector()
        rows = [{**r, **detector.update(r)} for r in rows]
    run.collapse_steps = [r["step"] for r in rows if r.get("collapsed") == 1]
    run.collapse_kinds = {f.removeprefix("collapse_") for f in FLAGS[:-1] for r in rows if r.get(f) == 1}
    if run.state == "diverged":
        run.collapse_kinds.add("diverged")


# ----------------------------------------------------------------------------------------
# Settings and their summary
# ----------------------------------------------------------------------------------------


def _flat(config: cfg.TrainConfig) -> dict[str, Any]:
    """`section.field` (and `section.field.key` inside table fields) -> value."""
    out = {}
    for section, values in cfg.to_dict(config).items():
        for name, value in values.items():
            if isinstance(value, dict):
                out.update({f"{section}.{name}.{k}": v for k, v in value.items()})
            else:
                out[f"{section}.{name}"] = value
    return out


def _settings_of(run: Run) -> dict[str, Any]:
    """The run's flat config, and its variant when it has one."""
    return {**_flat(run.config), **({VARIANT_AXIS: run.variant} if run.variant else {})}


def setting_axes(runs: list[Run], study_axes: list[str], hidden: set[str] = frozenset()) -> list[str]:
    """The keys that tell settings apart: the loss, the study's axes, any other key that differs.

    A key the study's variants set (`hidden`, or a field inside a table they set) is left to the
    variant column, but only where the variant tells its values apart: when the runs of one
    variant (or the runs without one) differ in it, it stays a column."""
    flats = [_settings_of(r) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))

    def varies(k: str, group: list[dict]) -> bool:
        return len({json.dumps(f.get(k), sort_keys=True) for f in group}) > 1

    def told_by_variant(k: str) -> bool:
        if not any(k == h or k.startswith(h + ".") for h in hidden):
            return False
        by_variant: dict[Any, list[dict]] = {}
        for f in flats:
            by_variant.setdefault(f.get(VARIANT_AXIS), []).append(f)
        return not any(varies(k, group) for group in by_variant.values())

    differ = [k for k in keys if varies(k, flats) and not told_by_variant(k)]
    ordered = ["algorithm.loss"] + study_axes + differ
    # threads that merely differ between cells (set by --jobs) do not split a setting; a thread axis does
    return [k for k in dict.fromkeys(ordered) if k not in NOT_AN_AXIS or (k in study_axes and k != SEED_AXIS)]


def group_settings(runs: list[Run], axes: list[str], study_axes: dict[str, list]) -> list[tuple[dict, list[Run]]]:
    """(axis values, runs sorted by seed) per setting; settings in the study's value order."""
    groups: dict[str, tuple[dict, list[Run]]] = {}
    for run in runs:
        flat = _settings_of(run)
        values = {k: flat.get(k) for k in axes}
        groups.setdefault(json.dumps(values, sort_keys=True, default=str), (values, []))[1].append(run)

    def order(item):
        values = item[0]
        return [(study_axes[k].index(values[k]) if values[k] in study_axes.get(k, []) else len(study_axes.get(k, [])),
                 str(values[k])) for k in axes]

    for values, members in groups.values():
        seeds = [r.seed for r in members]
        twice = sorted({s for s in seeds if seeds.count(s) > 1})
        if twice:
            warnings.warn(f"the setting {values} holds seed(s) {twice} more than once ("
                          + ", ".join(str(r.dir.name) for r in members if r.seed in twice)
                          + "): they differ in nothing the report can see, and count as separate seeds", stacklevel=2)
    return [(values, sorted(members, key=lambda r: r.seed)) for values, members in sorted(groups.values(), key=order)]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1) of the non-NaN values; NaN where undefined."""
    xs = [v for v in values if not math.isnan(v)]
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
    return mean, std


EVALS = {"greedy": "greedy_accuracy", "pass@k": "pass@k"}
WHEN = ("before", "peak", "final")


def summarize(values: dict, runs: list[Run], out_dir: Path) -> dict[str, Any]:
    """One summary row of a setting (module docstring): its axis values by label, then counts
    and `*_mean` / `*_std` pairs (pass@k: k = eval_samples), then the run folders."""
    row: dict[str, Any] = {_label(key, values): value for key, value in values.items()}
    row.update(seeds=len(runs), finished=sum(r.state == "finished" for r in runs))
    for name, key in EVALS.items():
        for which in WHEN:
            stats = _mean_std([r.eval_value(key, which) for r in runs])
            row[f"{name}_{which}_mean"], row[f"{name}_{which}_std"] = stats
    row["entropy_first_mean"], row["entropy_first_std"] = _mean_std([_first_entropy(r) for r in runs])
    row["entropy_end_mean"], row["entropy_end_std"] = _mean_std([_end_entropy(r) for r in runs])
    # a plainer sign of an update gone wrong than the flags: the seeds that end below where they began
    ends = [(r.eval_value(EVALS["greedy"], "before"), r.eval_value(EVALS["greedy"], "final")) for r in runs]
    row["final_below_before"] = sum(1 for before, final in ends if final < before)  # NaN compares False
    row["with_final"] = sum(1 for before, final in ends if not (math.isnan(before) or math.isnan(final)))
    collapsed = [r for r in runs if r.first_collapse is not None]
    row["collapses"] = len(collapsed)
    row["collapse_kinds"] = " ".join(sorted(set().union(*(r.collapse_kinds for r in collapsed))))
    row["steps_to_collapse_mean"], row["steps_to_collapse_std"] = _mean_std([r.first_collapse for r in collapsed])
    per_step = []
    for r in runs:
        times = [_number(m.get("time_sample")) + _number(m.get("time_train")) for m in r.metrics]
        per_step.append(_mean_std(times)[0])
    row["seconds_per_step_mean"], row["seconds_per_step_std"] = _mean_std(per_step)
    row["runs"] = "; ".join(str(r.dir.relative_to(out_dir)) for r in runs)
    return row


T95 = [math.nan, 12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
       2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
       2.045, 2.042]
"""Two-sided 95% quantiles of Student's t by degrees of freedom (the index), to 30."""


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t: the table to 30 degrees of freedom, beyond it the
    Cornish-Fisher expansion around the normal's 1.96 (within 0.001 of the exact value there)."""
    if df < len(T95):
        return T95[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_interval(diffs: list[float]) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its 95% t interval (NaN below 2 pairs)."""
    mean, std = _mean_std(diffs)
    n = len(diffs)
    return mean, (t95(n - 1) * std / math.sqrt(n) if n > 1 else math.nan)


def compare_to_reference(settings: list[tuple[dict, list[Run]]], rows: list[dict]) -> str | None:
    """Add to each row its final greedy accuracy minus the reference objective's (WAPO where the study
    has it, else the first objective) in the setting that differs only in the loss, paired by seed
    over the seeds both have a final evaluation for: `reference`, `paired_seeds`, `unpaired_seeds` (seeds
    both ran with evaluations configured, `eval_size` > 0, where one has no final evaluation),
    `greedy_final_minus_reference_mean` and `..._ci95` (95% t interval half-width); the same for
    the entropy of the last third of the steps over those seeds (`entropy_end_minus_reference_*`). The reference."""
    losses = [values.get("algorithm.loss") for values, _ in settings]
    if len(set(losses)) < 2:
        return None
    reference = "wapo" if "wapo" in losses else losses[0]

    def keys(values: dict) -> tuple[tuple, tuple]:
        """(this setting, the reference's setting that differs from it only in the loss)."""
        rest = _all_but_the_loss(values)
        return (values.get("algorithm.loss"), rest), (reference, rest)

    finals, entropies, evaluated = {}, {}, {}
    for values, runs in settings:
        key = keys(values)[0]
        finals[key] = {r.seed: r.eval_value(EVALS["greedy"], "final") for r in runs}
        evaluated[key] = {r.seed for r in runs if r.config.run.eval_size > 0}  # to be, whether or not it got to it
        entropies[key] = {r.seed: _end_entropy(r) for r in runs}
    for (values, _), row in zip(settings, rows):
        key, ref_key = keys(values)
        mine, ref = finals[key], finals.get(ref_key, {})
        seeds = [s for s in sorted(mine) if s in ref and not math.isnan(mine[s]) and not math.isnan(ref[s])]
        mean, half = paired_interval([mine[s] - ref[s] for s in seeds]) if seeds else (math.nan, math.nan)
        # a seed both ran to be evaluated but one of them has no final evaluation (diverged, or unfinished, even
        # before its first evaluation): said, not hidden; a run never evaluated (`eval_size = 0`) misses nothing
        both_evaluated = evaluated[key] & evaluated.get(ref_key, set())
        unpaired = sum(1 for s in mine if s in ref and s in both_evaluated and s not in seeds)
        row.update(reference=reference, paired_seeds=len(seeds), unpaired_seeds=unpaired,
                   greedy_final_minus_reference_mean=mean, greedy_final_minus_reference_ci95=half)
        h, h_ref = entropies[key], entropies.get(ref_key, {})
        diffs = [h[s] - h_ref[s] for s in seeds if not (math.isnan(h[s]) or math.isnan(h_ref[s]))]
        row["entropy_end_minus_reference_mean"], row["entropy_end_minus_reference_ci95"] = (
            paired_interval(diffs) if diffs else (math.nan, math.nan))
    return reference


def _all_but_the_loss(values: dict) -> str:
    """A setting's axis values other than the objective, as one comparable text."""
    return json.dumps({k: v for k, v in values.items() if k != "algorithm.loss"}, sort_keys=True, default=str)


def last_third(rows: list) -> list:
    """The last ⌈T/3⌉ of T rows: the window of the end-of-run entropy (`_end_entropy`)."""
    return rows[len(rows) - math.ceil(len(rows) / 3):]


def _first_entropy(run: Run) -> float:
    """The entropy a run logged first: its starting policy's (a step that logs none updates nothing) on the
    first batch it described; NaN if it logged none."""
    return next((h for h in (_number(r.get("entropy")) for r in run.metrics) if not math.isnan(h)), math.nan)


def _end_entropy(run: Run) -> float:
    """The entropy of a finished run's last third of steps: the mean over the last ⌈T/3⌉ metrics rows
    (T its rows) of the entropy each logged; NaN for a run that did not finish (diverged, or not yet).

    A window, not the last step alone: one step's batch is small, and its entropy is noisy. A step
    with no token to describe (dynamic sampling found no mixed group) logs none and updates nothing:
    it is left out of the mean, and where the whole window logged none, the entropy logged before it
    (still the policy's) stands for it. An unfinished run's last steps are not the study's last steps."""
    if run.state != "finished":
        return math.nan
    entropies = [_number(r.get("entropy")) for r in run.metrics]
    window = [h for h in last_third(entropies) if not math.isnan(h)]
    if window:
        return sum(window) / len(window)
    return next((h for h in reversed(entropies) if not math.isnan(h)), math.nan)


def _label(key: str, values: dict) -> str:
    last = key.split(".")[-1]
    return last if [k.split(".")[-1] for k in values].count(last) == 1 else key


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------


def write_report(out_dir: str | Path) -> list[Path]:
    """D/report.html, D/summary.csv, D/summary.md and D/overview.png (the settings side by side, as in
    the page, for a README) from the runs under D/runs."""
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    copies = [out_dir / f"study{suffix}" for suffix in (".toml", ".yaml", ".yml")]
    study = next((cfg.load_file(path) for path in copies if path.is_file()), {})
    variants = study.get("variants", {})
    study_axes = _inner_axes({**study.get("axes", {}), **({VARIANT_AXIS: list(variants)} if variants else {})})
    axes = setting_axes(runs, list(study_axes), {k for v in variants.values() for k in v} - set(study_axes))
    settings = group_settings(runs, axes, study_axes)
    rows = [summarize(values, members, out_dir) for values, members in settings]
    reference = compare_to_reference(settings, rows)
    labels = [_label(k, settings[0][0]) for k in axes]
    paths = [out_dir / "summary.csv", out_dir / "summary.md", out_dir / "report.html", out_dir / "overview.png"]
    _write_csv(paths[0], rows)
    markdown = _markdown(*_table(labels, rows))
    if reference:
        markdown += f"\n\n{_reference_note(reference)}\n\n" + _markdown(*_reference_table(labels, rows, reference))
    paths[1].write_text(markdown + "\n")
    overview = _overview_figure(settings)
    overview.savefig(paths[3], format="png", dpi=100)
    paths[2].write_text(_html(out_dir, study.get("study", {}).get("description", ""), labels, settings, rows,
                              reference, overview))
    return paths


def _inner_axes(axes: dict[str, list]) -> dict[str, list]:
    """The study's axes with each whole-table axis (`"algorithm.loss_options" = [{eps_high = 0.2}, ...]`)
    replaced by the fields inside it (`algorithm.loss_options.eps_high` = [0.2, ...]), as runs' flat
    configs (`_flat`) name them."""
    out: dict[str, list] = {}
    for key, values in axes.items():
        if values and all(isinstance(v, dict) for v in values):
            for name in dict.fromkeys(k for v in values for k in v):
                inner = [v.get(name) for v in values]  # values may be tables or lists: no set
                out[f"{key}.{name}"] = [x for i, x in enumerate(inner) if x not in inner[:i]]
        else:
            out[key] = values
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                         for row in rows)


def mean_std_text(row: dict, name: str, digits: int = 3) -> str:
    """`mean ± std` of a summary row's `name` (`name_mean`, `name_std`), `mean` alone for one value, `—` for none."""
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _table(labels: list[str], rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the summary table (shared by Markdown and HTML); `labels`: the axes'."""
    header = labels + ["seeds (finished)"] + [f"{m} {w}" for m in EVALS for w in WHEN]
    header += ["entropy, first step", "entropy, last third", "greedy final < before", "collapses",
               "steps to collapse", "s / step", "runs"]
    body = []
    for row in rows:
        cells = [str(row[a]) for a in labels] + [f"{row['seeds']} ({row['finished']})"]
        cells += [mean_std_text(row, f"{m}_{w}") for m in EVALS for w in WHEN]
        kinds = f" ({row['collapse_kinds']})" if row["collapse_kinds"] else ""
        cells += [mean_std_text(row, "entropy_first", 2), mean_std_text(row, "entropy_end", 2),
                  f"{row['final_below_before']}/{row['with_final']}",
                  f"{row['collapses']}/{row['seeds']}{kinds}",
                  mean_std_text(row, "steps_to_collapse", 1),
                  mean_std_text(row, "seconds_per_step", 1), row["runs"]]
        body.append(cells)
    return header, body


def _reference_note(reference: str) -> str:
    return (f"Final greedy accuracy and the entropy of the last third of the steps against {reference}, "
            f"paired by seed: this objective's minus {reference}'s over the seeds both have a final evaluation "
            f"for, mean ± the half-width of its 95% t interval. A run the trainer stopped for non-finite steps "
            f"(diverged), or one not finished yet, has no final evaluation: its seed is counted as \"without a "
            f"final\", not paired.")


def _reference_table(labels: list[str], rows: list[dict], reference: str) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the comparison with the reference objective (rows of the other objectives)."""
    header = labels + ["paired seeds", f"greedy final − {reference}", f"entropy, last third − {reference}",
                       "collapses", f"{reference} collapses"]
    loss = labels[0]  # setting_axes puts algorithm.loss first
    key = lambda row: json.dumps({a: row[a] for a in labels[1:]}, sort_keys=True, default=str)  # noqa: E731
    ref = {key(row): row for row in rows if row[loss] == reference}
    body = []
    for row in rows:
        if row[loss] == reference:
            continue
        diff, entropy = (difference_text(row, f"{name}_minus_reference", digits)
                         for name, digits in (("greedy_final", 3), ("entropy_end", 2)))
        other = ref.get(key(row))
        paired = str(row["paired_seeds"]) + (f" ({row['unpaired_seeds']} without a final)" if row["unpaired_seeds"]
                                             else "")
        body.append([str(row[a]) for a in labels] + [paired, diff, entropy, f"{row['collapses']}/{row['seeds']}",
                     f"{other['collapses']}/{other['seeds']}" if other else "—"])
    return header, body


def difference_text(row: dict, name: str, digits: int) -> str:
    """`+mean ± half-width` of a summary row's paired difference `name` (`name_mean`, `name_ci95`), `—` for none."""
    mean, half = row[f"{name}_mean"], row[f"{name}_ci95"]
    return "—" if math.isnan(mean) else f"{mean:+.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def _html_table(table_id: str, header: list[str], body: list[list[str]]) -> str:
    esc = html.escape
    return (f'<table id="{table_id}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in header)
            + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>" for cells in body)
            + "</tbody></table>")


def _html(out_dir: Path, description: str, labels: list[str], settings: list[tuple[dict, list[Run]]],
          rows: list[dict], reference: str | None, overview) -> str:
    esc = html.escape
    table = _html_table("summary", *_table(labels, rows))
    if reference:
        table += (f"<h2>Against {esc(reference)}</h2><p>{esc(_reference_note(reference))}</p>"
                  + _html_table("reference", *_reference_table(labels, rows, reference)))
    parts = [f"<h1>Study report: {esc(out_dir.name)}</h1>",
             f"<p>{esc(description)}</p>" if description else "",
             f"<p>{sum(len(m) for _, m in settings)} runs in {len(settings)} settings, from <code>{esc(str(out_dir))}"
             f"/runs</code>; written {datetime.now():%Y-%m-%d %H:%M}. Mean ± standard deviation over seeds (n − 1); "
             "peak = best of all held-out evaluations of a run; final = after training; a collapse is a seed with "
             "a <code>collapsed</code> step (docs/metrics.md) or stopped for non-finite steps; entropy, first step = "
             "the entropy each run logged first (its starting policy's); entropy, last third = "
             "each finished run's mean entropy over the last third of its steps; greedy final &lt; before = the seeds that ended below their "
             "start, of those with both evaluations.</p>",
             "<h2>Summary</h2>", table,
             "<h2>Settings side by side</h2><p>Mean over seeds, band ± one standard deviation.</p>",
             _img(overview)]
    for (values, runs), row in zip(settings, rows):
        title = ", ".join(f"{_label(k, values)}={v}" for k, v in values.items())
        parts += [f"<h2>{esc(title)}</h2>",
                  f"<p>Runs: {esc(row['runs'])}. One line per seed, black: their mean (band ± one standard "
                  "deviation); red ×: a step with a collapse flag up.</p>",
                  _img(_setting_figure(title, runs))]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}td:last-child{text-align:left}"
             "img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>wapo study: {esc(out_dir.name)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(fig) -> str:
    """The figure as an <img> with its PNG inline (base64), in a 256-colour palette: line plots
    lose nothing visible and the PNG shrinks ~3× (a 60-cell study's report: 5.7 MB → about 2)."""
    from PIL import Image  # matplotlib's own dependency

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=72)
    _pyplot().close(fig)
    palette = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    buffer = io.BytesIO()
    palette.save(buffer, format="png", optimize=True)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _mean_band(runs: list[Run], key: str):
    """(steps, mean, std) over seeds at each step any seed logged (NaN where undefined)."""
    series = [dict(zip(*r.series(key))) for r in runs]
    steps = sorted(set().union(*series))
    stats = [_mean_std([s.get(t, math.nan) for s in series]) for t in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def _draw_mean(ax, runs: list[Run], key: str, color, label: str | None = None, style: str = "-") -> None:
    import numpy as np

    steps, mean, std = _mean_band(runs, key)
    mean, std = np.array(mean), np.nan_to_num(np.array(std))
    ax.plot(steps, mean, style, color=color, lw=2, label=label)
    ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
    if not np.isfinite(mean).any():
        ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")


def _setting_figure(title: str, runs: list[Run]):
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = 5
    fig, axes = plt.subplots(math.ceil(len(CURVES) / cols), cols, figsize=(18, 11), squeeze=False)
    for ax, key in zip(axes.flat, CURVES):
        for i, run in enumerate(runs):
            steps, values = run.series(key)
            ax.plot(steps, values, lw=1, alpha=0.7, color=f"C{i % 10}", label=f"seed {run.seed}")
            if not key.startswith("eval:"):
                at = dict(zip(steps, values))
                flagged = [t for t in run.collapse_steps if t in at]
                ax.plot(flagged, [at[t] for t in flagged], "x", color="red", ms=7, mew=2)
        _draw_mean(ax, runs, key, "black", "mean")
        ax.set_title(panel_title(key), fontsize=10)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(CURVES):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.supxlabel("step")
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.06, top=0.93, wspace=0.25, hspace=0.35)  # not
    return fig  # tight_layout: it draws the figure once more, and drawing is most of a report's time


def _overview_figure(settings: list[tuple[dict, list[Run]]]):
    """The overview's metrics, one mean line (and band) per setting: a colour per objective, a line style per
    value of the other axes (solid, dashed, dotted, dash-dot, then those with a marker: o, s, ^, D), so each
    setting has a look of its own up to ten objectives × twenty others (then they cycle)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    losses = list(dict.fromkeys(str(values.get("algorithm.loss")) for values, _ in settings))
    others = list(dict.fromkeys(_all_but_the_loss(values) for values, _ in settings))
    fig, axes = plt.subplots(1, len(OVERVIEW), figsize=(18, 4), squeeze=False)
    for ax, key in zip(axes[0], OVERVIEW):
        for values, runs in settings:
            label = ", ".join(f"{_label(k, values)}={v}" for k, v in values.items())
            other = others.index(_all_but_the_loss(values))
            _draw_mean(ax, runs, key, f"C{losses.index(str(values.get('algorithm.loss'))) % 10}", label,
                       ("-", "--", ":", "-.")[other % 4] + ("", "o", "s", "^", "D")[other // 4 % 5])
        ax.set_title(panel_title(key), fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=7)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.14, top=0.9, wspace=0.2)
    return fig

