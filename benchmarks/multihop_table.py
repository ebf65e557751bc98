"""Print the multi-hop table from a folder written by benchmarks/multihop_measure.sh.

    python benchmarks/multihop_table.py docs/results/multihop

Reads eval_{base,sft}.json and, per RL run, eval_{wapo,grpo}.json (benchmarks/multihop_eval.py,
per question) or, for a run continued in segments, eval_{wapo,grpo}_N.json (its model after N
steps), and the metrics.jsonl of the sft, wapo and grpo runs. RL rows also give the change in held-out EM
over the SFT model with a 95% interval from the paired per-question differences
(mean ± 1.96 · sd / √n; the same questions are answered by both models).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

STAGES = {
    "base": "built-in SmolLM2-135M-Instruct",
    "sft": "+ `wapo sft`",
    "wapo": "+ `wapo train --loss wapo`",
    "grpo": "+ `wapo train --loss grpo`",
}


def training(folder: Path, stage: str, steps: int | None = None) -> str:
    """'N steps, M min' of a run's first `steps` metrics.jsonl rows (sampling and training, no evaluation)."""
    path = folder / stage / "metrics.jsonl"
    if not path.exists():
        return "—"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line][:steps]
    seconds = sum(r.get("time_step") or (r.get("time_sample", 0) + r.get("time_train", 0)) for r in rows)
    return f"{len(rows)} steps, {seconds / 60:.0f} min"


def rows_of(folder: Path) -> list[tuple[str, str, int | None, Path]]:
    """(name, run folder, steps or None for all, eval file) of every evaluated model, in table order."""
    out = []
    for stage, name in STAGES.items():
        numbered = sorted(folder.glob(f"eval_{stage}_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        if numbered:
            out += [(f"{name}, {int(p.stem.rsplit('_', 1)[1])} steps", stage, int(p.stem.rsplit("_", 1)[1]), p)
                    for p in numbered]
        else:
            out.append((name, stage, None, folder / f"eval_{stage}.json"))
    return out


def paired_change(after: dict, before: dict, key: str = "em") -> str:
    """after − before over the same questions, with a 95% interval of the paired mean."""
    b = {q["id"]: q[key] for q in before["questions"]}
    diffs = [q[key] - b[q["id"]] for q in after["questions"] if q["id"] in b]
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
    return f"{mean:+.3f} ± {1.96 * sd / math.sqrt(n):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", default=Path("docs/results/multihop"))
    folder = parser.parse_args().folder
    rows = rows_of(folder)
    evals = {path: json.loads(path.read_text()) for *_, path in rows if path.exists()}
    sft = evals.get(folder / "eval_sft.json")
    n = next(iter(evals.values()))["n"] if evals else 0
    print(f"Held-out questions: {n} (greedy; a world whose entities SFT and RL never see)\n")
    print("| model | EM | F1 | EM 2-hop | EM 3-hop | well-formed | searches / episode | own-query recall "
          "| EM vs SFT | training |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, stage, steps, path in rows:
        if path not in evals:
            print(f"| {name} | not measured | | | | | | | | |")
            continue
        e = evals[path]
        change = paired_change(e, sft) if stage in ("wapo", "grpo") and sft else ""
        print(f"| {name} | {e['em']:.3f} | {e['f1']:.3f} | {e['em_2hop']:.3f} | {e['em_3hop']:.3f} | "
              f"{e['format']:.2f} | {e['searches']:.2f} | {e['own_query_recall']:.3f} | {change} | "
              f"{training(folder, stage, steps)} |")


if __name__ == "__main__":
    main()
