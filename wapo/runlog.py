"""The run folder's logs: metrics.jsonl, completions.jsonl, TensorBoard events, PNG plots (and W&B).

metrics.jsonl holds one JSON object per step with stable keys (docs/metrics.md lists them);
NaN (an empty taxonomy bin) is written as null. On resume, the rows of metrics.jsonl,
completions.jsonl and eval.jsonl past the checkpoint's step are dropped first, so no file
holds a step twice (`truncate_log`).

A hard kill can cut the last line of a log short. Readers drop such a torn last line; a bad
line anywhere else is an error. Truncation writes the kept lines to a temporary file beside
the log, flushes it to disk and renames it over the log, so a kill during truncation leaves
either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import uuid
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from wapo.checkpoint import fsync


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    def __init__(self, run_dir: Path, *, resume_step: int | None = None, tensorboard: bool = True,
                 sinks: Sequence[WandbSink] = ()):
        self.dir = run_dir
        self.sinks = list(sinks)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.completions_path = run_dir / "completions.jsonl"
        self.eval_path = run_dir / "eval.jsonl"
        if resume_step is not None:
            for path in (self.metrics_path, self.completions_path, self.eval_path):
                truncate_log(path, resume_step)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step is not None else None)

    def log_step(self, step: int, metrics: dict) -> dict:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key.replace("_", "/", 1) if key.startswith(_TB_GROUPS) else key, value, step)
        for sink in self.sinks:
            sink.log(step, row)
        return row

    def log_completions(self, step: int, items: list[dict]) -> None:
        with self.completions_path.open("a") as f:
            for item in items:
                f.write(json.dumps({"step": step, **item}) + "\n")

    def log_eval(self, step: int, name: str, results: dict) -> None:
        with self.eval_path.open("a") as f:
            f.write(json.dumps({"step": step, "when": name, **results}) + "\n")
        if self._tb is not None:
            for key, value in results.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"eval/{key}", value, step)
        for sink in self.sinks:
            sink.log(step, {f"eval/{key}": value for key, value in results.items()})

    def evaluated(self, when: str) -> bool:
        """Whether eval.jsonl holds a row of this `when` ("before", "step N", "after")."""
        path = self.dir / "eval.jsonl"
        return path.exists() and any(row.get("when") == when for row in _parse_rows(path.read_bytes(), path)[1])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        for sink in self.sinks:
            sink.close()


REPORT_TO = ("tensorboard", "wandb", "none")
"""Where metrics go besides metrics.jsonl (TRL's `report_to` names)."""


def report_sinks(report_to: str, run_dir: Path, config: dict) -> tuple[bool, list[WandbSink]]:
    """(TensorBoard on?, extra sinks) for a comma-separated `report_to`, e.g. "tensorboard,wandb"."""
    names = {name.strip() for name in report_to.split(",") if name.strip()}
    unknown = sorted(names - set(REPORT_TO))
    if unknown or ("none" in names and len(names) > 1):
        raise ValueError(f"--report-to {report_to!r}: use a comma-separated subset of tensorboard, wandb, or none")
    return "tensorboard" in names, [WandbSink(run_dir, config)] if "wandb" in names else []


class WandbSink:
    """Weights & Biases as an extra sink of `RunLog`: the same numeric metrics, at the same steps.

    The wandb run is named after the run folder and keeps its id in `run_dir/wandb_run_id`, so
    `wapo train --resume` continues the same wandb run. `config` (the resolved config) becomes
    the run's config. Needs `pip install wandb` (and `wandb login`, or WANDB_MODE=offline).
    """

    def __init__(self, run_dir: Path, config: dict, *, project: str = "wapo"):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("--report-to wandb needs the wandb package: pip install wandb") from exc
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self._run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                               config=config)

    def log(self, step: int, metrics: dict) -> None:
        numbers = {k: v for k, v in metrics.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._run.log(numbers, step=step)

    def close(self) -> None:
        self._run.finish()


_TB_GROUPS = ("reward_", "time_", "clip_", "ratio_", "pos_", "neg_", "zero_")


def truncate_log(path: Path, step: int) -> None:
    """Drop the rows of the log `path` that a run resumed from checkpoint `step` will write again.

    Dropped: rows with `"step"` > `step`, a torn last line, and in eval.jsonl the "after"
    evaluation (`"when": "after"`), whatever its step: the resumed run goes on training and
    evaluates "after" again at its end. Kept: every other row, byte for byte, e.g. the
    "before" evaluation and those of steps up to `step`. The file is replaced atomically
    (module docstring); a missing file is left missing. Temporary files that a kill during an
    earlier truncation left beside the log are removed.
    """
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink()
    if not path.exists():
        return
    data = path.read_bytes()
    lines, rows = _parse_rows(data, path)
    keep = [line for line, row in zip(lines, rows) if row["step"] <= step and row.get("when") != "after"]
    if len(keep) == len(lines) and data.endswith(b"\n"):
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(line + b"\n" for line in keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    fsync(path.parent)


def _parse_rows(data: bytes, path: Path) -> tuple[list[bytes], list[dict]]:
    """The non-blank lines of the JSON-lines log `data` (read from `path`) and their rows.

    A last line that does not parse (a write cut short by a hard kill) is left out; one that
    does not parse anywhere else means the file was damaged otherwise: ValueError.
    """
    numbered = [(number, line) for number, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    lines, rows = [], []
    for i, (number, line) in enumerate(numbered):
        try:
            rows.append(json.loads(line))
        except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError from a cut character
            if i == len(numbered) - 1:
                break
            raise ValueError(f"{path}, line {number}: not JSON ({error}); only the last line of a log "
                             f"may be cut short. Remove or repair that line.") from error
        lines.append(line)
    return lines, rows


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl` (none if absent); a torn last line is left out."""
    return _read_rows(run_dir / "metrics.jsonl")


def read_evals(run_dir: Path) -> list[dict]:
    """The rows of `run_dir/eval.jsonl` (none if absent); a torn last line is left out."""
    return _read_rows(run_dir / "eval.jsonl")


def _read_rows(path: Path) -> list[dict]:
    return _parse_rows(path.read_bytes(), path)[1] if path.exists() else []


def plot_run(run_dir: Path) -> list[Path]:
    """PNG plots of a run: reward/accuracy, entropy, taxonomy bins over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return []
    steps = [r["step"] for r in rows]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in rows]

    out = []
    panels = {
        "reward.png": ("Reward and accuracy", ["reward_mean", "accuracy", "mixed_group_frac"]),
        "entropy.png": ("Policy entropy of sampled tokens", ["entropy", "completion_len"]),
    }
    for name, (title, keys) in panels.items():
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys):
            ax.plot(steps, series(key), marker=".")
            ax.set_title(key)
            ax.set_xlabel("step")
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        out.append(run_dir / name)

    from wapo.taxonomy import BINS

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for b in BINS:
        left.plot(steps, series(f"{b}_frac"), marker=".", label=b)
        right.plot(steps, series(f"{b}_pred_dentropy"), marker=".", label=b)
    left.set_title("token fraction per bin")
    right.set_title("mean predicted ΔH per unit ηA")
    right.axhline(0, color="grey", lw=0.5)
    for ax in (left, right):
        ax.set_xlabel("step")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / "taxonomy.png", dpi=100)
    plt.close(fig)
    out.append(run_dir / "taxonomy.png")
    return out
