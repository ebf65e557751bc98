"""Held-out accuracy of the default run in bfloat16 against float32, over seeds, side by side.

Reads finished study cells (`wapo compare` run folders), `loss=wapo,lr=2e-05,seed=S` in both:
the bfloat16 runs of examples/study_precision_bf16.toml (bf16 autocast and sampler on by `auto`
on a CPU with native bf16 matmuls; `precision.json` in each run says what it used; the same
cells of examples/study_math.toml do as well), the float32 runs of
examples/study_precision.toml. Held-out evaluation runs on the sampler, so the bf16 arm is
also evaluated in bf16, as the default run is. Prints, per precision, the "after" evaluation's
greedy accuracy, pass@k and sampled accuracy as mean ± std over seeds, the median seconds per
training step, and per metric the paired differences with the 95% interval of their mean (a
t interval: with 3 seeds about ±4.3 standard errors).

    python benchmarks/bf16_accuracy.py studies/precision_bf16 studies/precision
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = ("greedy_accuracy", "pass@4", "sampled_accuracy")
CELL = "loss=wapo,lr=2e-05,seed={seed}"
T95 = [float("nan"), 12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26]
"""Two-sided 95% quantiles of Student's t by degrees of freedom (index), for a few seeds."""


def after_eval(run: Path) -> dict | None:
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()] if (run / "eval.jsonl").exists() else []
    return next((r for r in rows if r["when"] == "after"), None)


def step_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["time_sample"] + r["time_train"] for r in rows)


def collect(study: Path) -> dict[int, tuple[dict, float, dict]]:
    """seed -> (after evaluation, median s/step, precision.json) of every finished wapo cell."""
    found = {}
    for seed in range(100):
        run = study / "runs" / CELL.format(seed=seed)
        result = after_eval(run) if run.exists() else None
        if result is not None:
            precision = json.loads((run / "precision.json").read_text()) if (run / "precision.json").exists() else {}
            found[seed] = (result, step_seconds(run), precision)
    return found


def mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bf16_study", type=Path, help="output dir of examples/study_precision_bf16.toml")
    ap.add_argument("fp32_study", type=Path, help="output dir of examples/study_precision.toml")
    args = ap.parse_args()
    arms = {"bfloat16": collect(args.bf16_study), "float32": collect(args.fp32_study)}
    for name, cells in arms.items():  # `auto` may have resolved to off: then there is nothing to compare
        wrong = [s for s, (_, _, used) in cells.items() if used.get("bf16_sampling", used.get("bf16")) != (name == "bfloat16")]
        if wrong:
            raise SystemExit(f"the {name} arm's seeds {wrong} did not sample in {name} (precision.json)")
    seeds = sorted(set(arms["bfloat16"]) & set(arms["float32"]))
    if not seeds:
        raise SystemExit("no seed has a finished cell in both studies yet")
    print(f"seeds {seeds} (finished in both); held-out 'after' evaluation, n = "
          f"{arms['float32'][seeds[0]][0]['n']} questions\n")
    print(f"| precision | {' | '.join(METRICS)} | s/step (median) |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    for name, cells in arms.items():
        used = {json.dumps(cells[s][2], sort_keys=True) for s in seeds}
        cols = [mean_std([cells[s][0][m] for s in seeds]) for m in METRICS]
        print(f"| {name} | {' | '.join(cols)} | {statistics.median(cells[s][1] for s in seeds):.1f} |"
              + ("" if len(used) == 1 else "  (cells differ in precision.json!)"))
    print()
    for m in METRICS:
        diffs = [arms["bfloat16"][s][0][m] - arms["float32"][s][0][m] for s in seeds]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        per_seed = ", ".join(f"{d:+.3f}" for d in diffs)
        t = T95[len(diffs) - 1] if 1 < len(diffs) <= len(T95) else 1.96
        print(f"{m}: bf16 − fp32 per seed {per_seed}; mean {statistics.mean(diffs):+.3f} ± {t * se:.3f} "
              f"(95% interval of the paired mean, t with {len(diffs) - 1} degrees of freedom)")
    for name, cells in arms.items():
        print(f"{name} precision.json: {cells[seeds[0]][2]}")


if __name__ == "__main__":
    main()
