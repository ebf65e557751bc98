"""How each run of a search study used its tool, step by step: searches per episode and the length cap.

    python benchmarks/tool_use.py docs/results/multihop_study

One row per run folder under DIR/runs (sorted by name), each step's value in turn: the mean
reward, the searches per training episode and the share of episodes that hit the length cap
(`truncated_frac`). Searches come from the environment's counter `env_searches` in metrics.jsonl, which
counts since the process started, held-out evaluations included (docs/metrics.md): a step's
searches are its counter minus the step before's. The first step of a process (the run's
first, or the first after a resume) also counts the evaluation before it, so it is shown as
"·". metrics.jsonl keeps no mark of a resume: one is seen where the counter went down, which
a resume soon after the run's first step (a short count before it) may not do.
Episodes per step: `prompts_per_step × samples_per_prompt` of the run's config.toml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wapo import config as cfg
from wapo.runlog import read_metrics


def searches_per_episode(metrics: list[dict], episodes: int) -> list[float | None]:
    """Per step, searches per episode from the cumulative `env_searches` (None where the delta is unknown).

    A step is unknown when it is the first row, when the counter is missing, or when it went down
    (a resumed process counts from 0 again: its first step's count may include an evaluation)."""
    out, before = [], None
    for row in metrics:
        now = row.get("env_searches")
        out.append((now - before) / episodes if now is not None and before is not None and now >= before else None)
        before = now
    return out


def run_line(run: Path) -> str:
    """One Markdown row of a run: its folder, then per step the reward, searches per episode and length-cap share."""
    config = cfg.from_dict(cfg.load_file(run / "config.toml"))
    episodes = config.sampling.prompts_per_step * config.sampling.samples_per_prompt
    metrics = read_metrics(run)
    rewards = " ".join(f"{m['reward_mean']:.2f}" for m in metrics)
    searches = " ".join("·" if s is None else f"{s:.1f}" for s in searches_per_episode(metrics, episodes))
    capped = " ".join(f"{m.get('truncated_frac', float('nan')):.2f}" for m in metrics)
    return f"| {run.name} | {rewards} | {searches} | {capped} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path)
    args = parser.parse_args()
    print("| run | reward, step 1 … | searches / episode, step 1 … | at the length cap, step 1 … |")
    print("|---|---|---|---|")
    for run in sorted(p.parent for p in (args.study / "runs").glob("*/metrics.jsonl")):
        print(run_line(run))


if __name__ == "__main__":
    main()
