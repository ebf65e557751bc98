"""The README's headline table of the study, from the summaries `wapo report` wrote.

    python benchmarks/study_table.py "E2 math=docs/results/math" "E3 multi-hop=docs/results/multihop_study"

Each argument is `NAME=DIR` (or a bare DIR, named after it); DIR/summary.csv is read as
`wapo report DIR` wrote it (rerun that first when runs were added). One row per setting:
held-out greedy accuracy before → peak → final (mean ± std over seeds), the final's paired
difference with WAPO in the same setting (95% t interval), the policy's entropy at the last
step and its paired difference with WAPO's, the seeds that ended below their start, and the
collapses flagged online. The summary has the rest (pass@k, times, the run folders).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

def _number(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def _mean_std(row: dict, name: str, digits: int = 3) -> str:
    mean, std = _number(row[f"{name}_mean"]), _number(row[f"{name}_std"])
    if math.isnan(mean):
        return "—"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _difference(row: dict, name: str, digits: int) -> str:
    mean, half = _number(row[f"{name}_minus_reference_mean"]), _number(row[f"{name}_minus_reference_ci95"])
    if math.isnan(mean):
        return "—"
    return f"{mean:+.{digits}f}" + ("" if math.isnan(half) else f" ± {half:.{digits}f}")


def setting_columns(header: list[str]) -> list[str]:
    """The summary's axis columns (they come before `seeds`), the objective's (`loss`) first."""
    axes = header[:header.index("seeds")]
    return ["loss"] + [a for a in axes if a != "loss"]


def rows_of(name: str, folder: Path) -> tuple[list[str], list[list[str]]]:
    with (folder / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    axes = setting_columns(header)
    out = []
    for row in rows:
        setting = ", ".join(f"{a} {row[a]}" for a in axes[1:])
        before = _number(row["greedy_before_mean"])
        accuracy = (f"{before:.3f} → {_mean_std(row, 'greedy_peak')} → {_mean_std(row, 'greedy_final')}"
                    if not math.isnan(before) else "—")
        vs = entropy_vs = "—"
        mean = _number(row.get("greedy_final_minus_reference_mean", ""))
        if row.get("reference") and row["loss"] != row["reference"] and not math.isnan(mean):
            unpaired = f", {row['unpaired_seeds']} unpaired" if row["unpaired_seeds"] != "0" else ""
            vs = f"{_difference(row, 'greedy_final', 3)} ({row['paired_seeds']}{unpaired})"
            entropy_vs = _difference(row, "entropy_last", 2)
        kinds = f" ({row['collapse_kinds']})" if row["collapse_kinds"] else ""
        entropy = _mean_std(row, "entropy_last", 2)
        out.append([name, setting, row["loss"], row["seeds"], accuracy, vs, entropy, entropy_vs,
                    f"{row['final_below_before']}/{row['with_final']}", f"{row['collapses']}/{row['seeds']}{kinds}"])
    settings = list(dict.fromkeys(cells[1] for cells in out))  # by setting, then the objectives in the study's order
    return axes, sorted(out, key=lambda cells: settings.index(cells[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", metavar="NAME=DIR")
    args = parser.parse_args()
    print("| study | setting | objective | seeds | held-out greedy: before → peak → final | final − WAPO (seeds) "
          "| entropy, last step | − WAPO | final < before | collapses |")
    print("|---|---|---|---:|---|---|---|---|---:|---|")
    for item in args.studies:
        name, _, folder = item.rpartition("=")
        _, rows = rows_of(name or Path(folder).name, Path(folder))
        for cells in rows:
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
