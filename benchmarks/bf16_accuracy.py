"""Held-out accuracy of the default run in bfloat16 against float32, over seeds, side by side.

Reads finished study cells (`wapo compare` run folders), `loss=wapo,lr=2e-05,seed=S` in both:
the bfloat16 runs of examples/study_precision_bf16.toml (bf16 autocast and sampler on by `auto`
on a CPU with native bf16 matmuls; `precision.json` in each run says what it used; the same
cells of examples/study_math.toml do as well), the float32 runs of
examples/study_precision.toml. Prints, per precision, the "after"
evaluation's greedy accuracy, pass@k and sampled accuracy per seed and as mean ± std, the
seconds per training step, and the differences of the means with the noise they are read
against (the standard error of the difference over seeds).

    python benchmarks/bf16_accuracy.py studies/precision_bf16 studies/precision
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METRICS = ("greedy_accuracy", "pass@4", "sampled_accuracy")
CELL = "loss=wapo,lr=2e-05,seed={seed}"


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
        print(f"{m}: bf16 − fp32 per seed {per_seed}; mean {statistics.mean(diffs):+.3f} (standard error {se:.3f})")
    for name, cells in arms.items():
        print(f"{name} precision.json: {cells[seeds[0]][2]}")


if __name__ == "__main__":
    main()
