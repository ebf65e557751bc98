"""How often completions hit the token budget, over every step of the given run folders.

    python benchmarks/length_cap.py docs/results/math/runs/* \
        $(ls -d docs/results/stress_search/runs/* | grep -v -e variant=base -e variant=lr1e-4)

A step's completions are `prompts_per_step × samples_per_prompt × sampling_rounds` (its
config.toml and metrics.jsonl: every round DAPO's dynamic sampling drew, which `truncated_frac`
covers, not only the rows of the update) and its share at the cap `truncated_frac`
(docs/metrics.md), so the overall share weighs every completion once. Also lists the runs with
a step where every completion was cut. (The stress search's `base` and `lr1e-4` cells are
copies of E2's seed-0 cells, hence left out above.)
With `--per-run`, a Markdown table first: each run's share at the cap, its mean completion
length (tokens) at the first step and over the last third of its steps, and its mean entropy
(nats) over that last third (the report's window):

    python benchmarks/length_cap.py --per-run docs/results/math_hard/runs/*lr=0.0001*
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from wapo import config as cfg
from wapo.report import last_third
from wapo.runlog import read_metrics


def at_the_cap(runs: list[Path]) -> tuple[int, float, dict[str, list[int]]]:
    """(completions, their share at the token budget, {run name: steps where every completion was cut})."""
    rows = cut = 0.0
    full = {}
    for run in runs:
        metrics = [m for m in read_metrics(run) if m.get("truncated_frac") is not None]
        if not metrics or not (run / "config.toml").is_file():
            raise SystemExit(f"{run}: no config.toml, or no metrics.jsonl rows with truncated_frac; a run folder?")
        sampling = cfg.from_dict(cfg.load_file(run / "config.toml")).sampling
        for m in metrics:
            n = sampling.prompts_per_step * sampling.samples_per_prompt * (m.get("sampling_rounds") or 1)
            rows += n
            cut += m["truncated_frac"] * n
        steps = [m["step"] for m in metrics if m["truncated_frac"] == 1.0]
        if steps:
            full[run.name] = steps
    return int(rows), cut / rows, full


def per_run_row(run: Path) -> str:
    """`| run | share at the cap | length: first step → last third | entropy, last third |` of one run
    folder; the last third is its last ⌈T/3⌉ of T metrics rows, as in `wapo report` (a mean of the
    values they logged)."""
    metrics = read_metrics(run)
    _, share, _ = at_the_cap([run])
    last = last_third(metrics)

    def mean(key: str) -> float:
        values = [m[key] for m in last if m.get(key) is not None]
        return sum(values) / len(values) if values else math.nan

    return (f"| {run.name} | {share:.1%} | {metrics[0]['completion_len']:.0f} → {mean('completion_len'):.0f} "
            f"| {mean('entropy'):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl)")
    parser.add_argument("--per-run", action="store_true", help="first a table of each run's share and length")
    args = parser.parse_args()
    if args.per_run:
        print("| run | completions at the cap | mean length: first step → last third | entropy, last third |\n"
              "|---|---:|---|---:|")
        print("\n".join(per_run_row(run) for run in args.runs) + "\n")
    rows, share, full = at_the_cap(args.runs)
    print(f"{len(args.runs)} runs, {rows} completions, {share:.1%} at the token budget")
    print("every completion cut in a step:",
          "; ".join(f"{name} (steps {', '.join(map(str, steps))})" for name, steps in full.items()) or "none")


if __name__ == "__main__":
    main()
