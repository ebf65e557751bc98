"""The README's headline table of the study, from the summaries `wapo report` wrote.

    python benchmarks/study_table.py "E2 math=docs/results/math" "E3 multi-hop=docs/results/multihop_study"

Each argument is `NAME=DIR` (or a bare DIR, named after it); DIR/summary.csv is read as
`wapo report DIR` wrote it (rerun that first when runs were added). One row per setting:
held-out greedy accuracy before → peak → final (mean ± std over seeds; the start as one number
when every seed has it), the final's paired difference with WAPO in the same setting (95% t
interval; in brackets the seeds paired, and those without a final evaluation), the policy's
entropy at the first step (mean over seeds) and over the last third of the steps (mean ± std),
the latter's paired difference with WAPO's, the seeds that ended below their start, and the collapses flagged
online. The cells are `wapo report`'s own (`wapo.report.mean_std_text`, `difference_text`); the
summary has the rest (pass@k, times, the run folders).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from wapo.report import difference_text, mean_std_text


def _numbers(row: dict) -> dict:
    """A summary.csv row with its statistics as floats (an empty cell: NaN), as `wapo report` holds them."""
    return {k: (float(v) if v else math.nan) if k.endswith(("_mean", "_std", "_ci95")) else v for k, v in row.items()}


def setting_columns(header: list[str]) -> list[str]:
    """The summary's axis columns (they come before `seeds`), the objective's (`loss`) first."""
    axes = header[:header.index("seeds")]
    return ["loss"] + [a for a in axes if a != "loss"]


def rows_of(name: str, folder: Path) -> tuple[list[str], list[list[str]]]:
    """(axis columns, table rows) of the study `name` from folder/summary.csv, grouped by setting."""
    with (folder / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), [_numbers(row) for row in reader]
    axes = setting_columns(header)
    out = []
    for row in rows:
        setting = ", ".join(f"{a} {row[a]}" for a in axes[1:])
        # one number where every seed starts from the same accuracy (same model, same held-out set)
        before = (f"{row['greedy_before_mean']:.3f}" if round(row["greedy_before_std"], 3) == 0
                  else mean_std_text(row, "greedy_before"))
        accuracy = (f"{before} → {mean_std_text(row, 'greedy_peak')} → {mean_std_text(row, 'greedy_final')}"
                    if not math.isnan(row["greedy_peak_mean"]) else "—")  # no peak: never evaluated
        vs = entropy_vs = "—"
        if row.get("reference") and row["loss"] != row["reference"]:
            without = f", {row['unpaired_seeds']} without a final" if row["unpaired_seeds"] != "0" else ""
            vs = f"{difference_text(row, 'greedy_final_minus_reference', 3)} ({row['paired_seeds']}{without})"
            entropy_vs = difference_text(row, "entropy_end_minus_reference", 2)
        kinds = f" ({row['collapse_kinds']})" if row["collapse_kinds"] else ""
        # the start as its mean alone: on the same seeds every objective starts from the same batch
        entropy = (f"{row['entropy_first_mean']:.2f} → " if not math.isnan(row["entropy_first_mean"]) else ""
                   ) + mean_std_text(row, "entropy_end", 2)
        out.append([name, setting, row["loss"], row["seeds"], accuracy, vs, entropy, entropy_vs,
                    f"{row['final_below_before']}/{row['with_final']}", f"{row['collapses']}/{row['seeds']}{kinds}"])
    settings = list(dict.fromkeys(cells[1] for cells in out))  # by setting, then the objectives in the study's order
    return axes, sorted(out, key=lambda cells: settings.index(cells[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", metavar="NAME=DIR")
    args = parser.parse_args()
    print("| study | setting | objective | seeds | held-out greedy: before → peak → final | final − WAPO (seeds) "
          "| entropy: first step → last third | last third − WAPO's | final < before | collapses |")
    print("|---|---|---|---:|---|---|---|---|---:|---|")
    for item in args.studies:
        name, _, folder = item.rpartition("=")
        _, rows = rows_of(name or Path(folder).name, Path(folder))
        for cells in rows:
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
