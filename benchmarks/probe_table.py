"""The README's tables of E1 from `wapo probe --json` files.

    python benchmarks/probe_table.py docs/results/probe/e1_grpo.json
    python benchmarks/probe_table.py docs/results/probe/e1_grpo.json --against docs/results/probe/e1_wapo.json

The first prints, per bin (its share of the tokens with A ≠ 0), how often the real change of
log p of the sampled token and of the entropy at its position had the forecast sign, for each
update kind. With `--against`, a second probe of another objective on the same batches and step
sizes (same model, environment, seed, batches: checked through the bins' token counts, which
only the sampled batches decide) gives the mean real change of log p and of the entropy per bin
under each objective's update: what removing (or adding) terms does to the same tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BINS = ("pos_peak", "pos_valley", "neg_peak", "neg_valley")
UPDATES = ("logits", "sgd", "adamw")
UPDATE_NAMES = {"logits": "free logits", "sgd": "SGD", "adamw": "AdamW"}


def load(path: Path) -> tuple[dict, dict]:
    """(the probe's settings, its rows by (update, bin)) from a `wapo probe --json` file."""
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if k != "rows"}, {(r["update"], r["bin"]): r for r in data["rows"]}


def _bin_name(name: str) -> str:
    return name.replace("_", " ")


def _share(x: float | None) -> str:
    """A share as a whole percentage; one decimal where that would round a near-all or near-none to 100% or 0%."""
    if x is None:  # a bin without a token
        return "—"
    return f"{x:.1%}" if f"{x:.0%}" in ("0%", "100%") and x not in (0, 1) else f"{x:.0%}"


def _change(x: float | None) -> str:
    return "—" if x is None else f"{x:+.3f}"


def agreement_table(rows: dict) -> list[str]:
    """Markdown lines: per bin, the share of tokens whose real Δ log p and ΔH had the forecast sign."""
    total = rows[("logits", "all")]["tokens"]
    head = [f"Δ log p, {UPDATE_NAMES[u]}" for u in UPDATES] + [f"ΔH, {UPDATE_NAMES[u]}" for u in UPDATES]
    lines = ["| bin (share of tokens) | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for b in BINS:
        cells = [_share(rows[(u, b)][key]) for key in ("dlogp_agree", "dentropy_agree") for u in UPDATES]
        lines.append(f"| {_bin_name(b)} ({rows[('logits', b)]['tokens'] / total:.0%}) | " + " | ".join(cells) + " |")
    return lines


def same_batches(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    """Raise unless the two probes differ in objective only: the same model, environment, batches (their
    bins' token counts, which only the sampled batches decide) and step sizes of each update."""
    (meta_a, rows_a), (meta_b, rows_b) = a, b
    for key in ("model", "env", "batches", "logit_eta", "sgd_lr", "lr"):
        if meta_a.get(key) != meta_b.get(key):
            raise SystemExit(f"the probes differ in {key}: {meta_a.get(key)!r} vs {meta_b.get(key)!r} "
                             "(run both with the same settings but --loss)")
    counts = [[rows[("logits", x)]["tokens"] for x in BINS] for rows in (rows_a, rows_b)]
    if counts[0] != counts[1]:
        raise SystemExit(f"the probes saw different batches (tokens per bin {counts[0]} vs {counts[1]}): "
                         "run both with the same seed and code")


def change_table(a: tuple[dict, dict], b: tuple[dict, dict]) -> list[str]:
    """Markdown lines: mean real Δ log p and ΔH per bin and in all, under each probe's objective, SGD and AdamW."""
    same_batches(a, b)
    (meta_a, rows_a), (meta_b, rows_b) = a, b
    la, lb = meta_a["loss"], meta_b["loss"]
    head = [f"{q}, {UPDATE_NAMES[u]}: {la} / {lb}" for u in ("sgd", "adamw") for q in ("mean Δ log p", "mean ΔH")]
    lines = ["| bin | tokens | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
    for x in BINS + ("all",):
        cells = [f"{_change(rows_a[(u, x)][key])} / {_change(rows_b[(u, x)][key])}"
                 for u in ("sgd", "adamw") for key in ("mean_dlogp", "mean_dentropy")]
        lines.append(f"| {_bin_name(x)} | {rows_a[('logits', x)]['tokens']:,} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", type=Path, help="a `wapo probe --json` file")
    parser.add_argument("--against", type=Path, help="a probe of another objective on the same batches")
    args = parser.parse_args()
    first = load(args.probe)
    print("\n".join(agreement_table(first[1])))
    if args.against:
        print()
        print("\n".join(change_table(first, load(args.against))))


if __name__ == "__main__":
    main()
