"""`wapo compare`: a study (a base config and axes whose product is a set of runs), run in parts.

A study file (docs/study.md) holds `[base.<section>]` tables (any section of a `wapo train
--config` file), `[axes]` (dotted config keys → lists of values; the cells are their product)
optionally `[variants]` (named bundles of settings, one more axis: `variant`) and `[study]`
(`keep_checkpoints`, `description`):

    [base.run]
    steps = 15
    [axes]
    "algorithm.loss" = ["wapo", "grpo"]
    "run.seed" = [0, 1, 2]
    "algorithm.loss_options.eps_high" = [0.28, 9.0]    # a key inside a table-valued field
    [variants]                                         # each: dotted keys -> values, set together
    base = {}
    ppo = { "algorithm.mini_batches" = 4, "algorithm.sampler_lag" = 1 }

Each cell is an ordinary run folder, `D/runs/<name>` with `<name>` its axis values
(`loss=grpo,seed=1,eps_high=9.0`, then `variant=ppo` when there are variants), run with
`wapo.trainer.build_trainer` + `fit()`. Its state is read from the folder alone:

    finished  metrics.jsonl's last row is step `run.steps` and, when `run.eval_size` > 0,
              eval.jsonl holds the "after" evaluation
    diverged  the trainer stopped it: its last `run.max_bad_steps` rows are skipped steps
    partial   it has a checkpoint: resumed from it (`build_trainer(config, resume=dir)`)
    started   it holds config.toml but no checkpoint yet: started again (`overwrite=True`)
    new       no folder, or an empty one

Rerunning the command skips finished and diverged cells and resumes the others, so a killed
study (Ctrl-C, SIGTERM, a hard kill) goes on where it stopped. A finished or diverged cell
keeps its logs; its `checkpoints/` are deleted unless `[study] keep_checkpoints = true`
(cells never export `hf/`: `run.export_final` is false). Cells run with the seed axis
outermost, so a study cut short has every setting's first seeds. `--jobs N` runs N cells at
once in subprocesses (`OMP_NUM_THREADS` set to each cell's `model.threads`); their output goes
to `D/logs/<name>.log`. At the end `wapo.report` writes D/report.html and the summaries. One
`wapo compare` at a time runs in a folder: a second one on the same D is refused (a lock on
`D/.compare.lock`, held by the first and by the workers it started, released when the last of
them ends, however it ends).

A cell's thread count is one of its settings: the matmul reduction order depends on it, and
under bf16 that changes sampled tokens. Where the study leaves `model.threads` at 0 (auto), a
cell gets, when first created, cores // N with `--jobs N` > 1, or torch's default (what
`OMP_NUM_THREADS` says, when set) with `--jobs 1`; its config.toml records it, and the cell
always resumes with that count, whatever `--jobs` is then.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wapo import checkpoint
from wapo import config as cfg
from wapo.runlog import read_evals, read_metrics

DONE = ("finished", "diverged")
SEED_AXIS = "run.seed"
VARIANT_AXIS = "variant"
"""The axis of a study's [variants]: its values are their names."""
IGNORED_WHEN_RESUMING = (("run", "progress"), ("run", "output_dir"))
"""Settings that may differ between the runs of one cell: they change the display, not results; and the
folder, which the cell is wherever it lies (`--output-dir` spelled another way, or the study moved)."""
DEFAULT_SECONDS = {"sample": 17.6 / (64 * 48), "train": 21.4 / (64 * 48)}
"""Seconds per sampled row per token of budget (`max_new_tokens`) when no cell has run yet: the
built-in model in float32 on 2 CPU cores took 17.6 s to sample and 21.4 s to update 8 × 8 rows
of 48 tokens (docs/study.md)."""
EXIT_DIVERGED = 3


@dataclass(frozen=True)
class Cell:
    name: str
    values: dict[str, Any]
    """Axis key -> this cell's value."""
    config: cfg.TrainConfig

    @property
    def dir(self) -> Path:
        return Path(self.config.run.output_dir)


@dataclass(frozen=True)
class Study:
    base: dict[str, dict]
    axes: dict[str, list]
    keep_checkpoints: bool = False
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Variant name -> {dotted key: value}: settings applied together, one more axis ("variant")."""
    description: str = ""
    text: str = ""
    """The study file as written (copied to D/study.toml, or .yaml)."""

    @property
    def all_axes(self) -> dict[str, list]:
        """The [axes], then the variants' names as the axis "variant" when there are any."""
        return {**self.axes, **({VARIANT_AXIS: list(self.variants)} if self.variants else {})}

    def cells(self, out_dir: Path, *, jobs: int = 1) -> list[Cell]:
        """Every cell's config, in run order (seed axis outermost); fails on any bad value."""
        axes = self.all_axes
        keys = sorted(axes, key=lambda k: k != SEED_AXIS)  # stable: the file's order otherwise
        labels = _labels(list(axes))
        cells, names = [], {}
        for combo in itertools.product(*(axes[k] for k in keys)):
            chosen = dict(zip(keys, combo))
            values = {k: chosen[k] for k in axes}  # names in the file's order
            name = _cell_name(values, labels)
            if name in names:
                raise cfg.ConfigError(f"cells {names[name]} and {values} both get the folder name {name!r}: "
                                      "make the axis values differ in letters or digits")
            names[name] = values
            data = copy.deepcopy(self.base)
            settings = {**self.variants.get(values.get(VARIANT_AXIS), {}),
                        **{k: v for k, v in values.items() if k != VARIANT_AXIS}}
            for key, value in settings.items():
                _set_dotted(data, key, value)
            run = data.setdefault("run", {})
            run.update(output_dir=str(out_dir / "runs" / name), export_final=False)
            model = data.setdefault("model", {})
            if not model.get("threads"):  # auto: the count the cell was created with, else a new cell's
                model["threads"] = _recorded_threads(out_dir / "runs" / name) or _auto_threads(jobs)
            if jobs > 1:
                run["progress"] = False
            try:
                config = cfg.from_dict(data)
            except cfg.ConfigError as exc:
                raise cfg.ConfigError(f"study cell {name}: {exc}") from None
            cells.append(Cell(name, values, config))
        return cells


def load_study(path: str | Path) -> Study:
    """Read and check a study file (TOML or YAML): sections, axis keys and values."""
    path = Path(path)
    data = cfg.load_file(path)
    unknown = sorted(set(data) - {"study", "base", "axes", "variants"})
    if unknown:
        raise cfg.ConfigError(f"{path}: unknown table(s) {unknown}; a study file has [study], [base.*], [axes] "
                              f"and [variants]")
    for table in ("study", "base", "axes", "variants"):
        if not isinstance(data.get(table, {}), dict):
            raise cfg.ConfigError(f"{path}: [{table}] must be a table (docs/study.md), got {data[table]!r}")
    meta = data.get("study", {})
    bad = sorted(set(meta) - {"keep_checkpoints", "description"})
    if bad:
        raise cfg.ConfigError(f"{path}: unknown key(s) {bad} in [study]; valid: description, keep_checkpoints")
    if not isinstance(meta.get("keep_checkpoints", False), bool):
        raise cfg.ConfigError(f"{path}: [study] keep_checkpoints must be true or false, got "
                              f"{meta['keep_checkpoints']!r}")
    base = data.get("base", {})
    cfg.from_dict(copy.deepcopy(base))  # the base alone must be a valid config
    if "output_dir" in base.get("run", {}):
        raise cfg.ConfigError(f"{path}: [base.run] output_dir is set by the study (D/runs/<cell>); remove it")
    axes = data.get("axes", {})
    for key, values in axes.items():
        if key in ("run.output_dir", "run.export_final"):
            raise cfg.ConfigError(f"{path}: axis {key!r} is set by the study, not an axis")
        _check_key(key, path)
        if not isinstance(values, list) or not values:
            raise cfg.ConfigError(f"{path}: axis {key!r} needs a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) < len(values):
            raise cfg.ConfigError(f"{path}: axis {key!r} lists a value twice: {values!r}")
    variants = data.get("variants", {})
    if VARIANT_AXIS in axes:
        raise cfg.ConfigError(f"{path}: {VARIANT_AXIS!r} is the axis of [variants], not a config key")
    for name, settings in variants.items():
        if not isinstance(settings, dict):
            raise cfg.ConfigError(f"{path}: variant {name!r} needs a table of dotted keys -> values, got {settings!r}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
            raise cfg.ConfigError(f"{path}: variant name {name!r} goes into folder names: use letters, digits, . _ + -")
        for key in settings:
            _check_key(key, path, what=f"variant {name!r}: key")
            # the same key, or one inside a table an axis replaces whole (or the reverse): one would undo the other
            clash = [a for a in axes if a == key or a.startswith(key + ".") or key.startswith(a + ".")]
            if clash:
                raise cfg.ConfigError(f"{path}: variant {name!r} sets {key!r}, which the axis {clash[0]!r} also sets")
            if key in ("run.output_dir", "run.export_final"):
                raise cfg.ConfigError(f"{path}: variant {name!r}: {key!r} is set by the study")
    return Study(base, axes, keep_checkpoints=meta.get("keep_checkpoints", False),
                 description=str(meta.get("description", "")), text=path.read_text(), variants=variants)


def _check_key(key: str, path: Path, what: str = "axis") -> None:
    parts = key.split(".")
    leaves = cfg.leaf_fields()
    section, name = (parts + ["", ""])[:2]
    if len(parts) not in (2, 3) or name not in leaves or leaves[name][0] != section:
        raise cfg.ConfigError(f"{path}: {what} {key!r} is not a config key; use section.field, e.g. "
                              f"'algorithm.loss' or 'optim.lr', quoted in TOML (`wapo train --help` lists the fields)")
    if len(parts) == 3 and not isinstance(getattr(getattr(cfg.TrainConfig(), section), name), dict):
        raise cfg.ConfigError(f"{path}: {what} {key!r}: only table fields (such as algorithm.loss_options) take a "
                              f"third part")


def _set_dotted(data: dict, key: str, value: Any) -> None:
    section, name, *inner = key.split(".")
    table = data.setdefault(section, {})
    if inner:
        table[name] = {**table.get(name, {}), inner[0]: value}
    else:
        table[name] = value


def _labels(keys: list[str]) -> dict[str, str]:
    """Each axis's label in cell names: its last part, or the whole key where two last parts clash."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (label if last.count(label) == 1 else k) for k, label in zip(keys, last)}


def _cell_name(values: dict[str, Any], labels: dict[str, str]) -> str:
    """`label=value,...` with every character outside [A-Za-z0-9._+=,-] replaced by `_`."""
    return ",".join(f"{labels[k]}={_cell_text(v)}" for k, v in values.items()) or "base"


def _cell_text(value: Any) -> str:
    """An axis value as a cell name writes it."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
    return re.sub(r"[^A-Za-z0-9._+=,-]", "_", text)


def _auto_threads(jobs: int) -> int:
    """A new cell's `model.threads` when the study leaves it at 0: cores // jobs for a --jobs
    worker, torch's default (OMP_NUM_THREADS when set) in this process."""
    if jobs > 1:
        return max(1, _cores() // jobs)
    import torch

    return torch.get_num_threads()


def _recorded_threads(cell_dir: Path) -> int:
    """`model.threads` of the cell's config.toml; 0 when it has none (or was written before
    cells recorded their count)."""
    saved = cell_dir / "config.toml"
    return int(cfg.load_file(saved).get("model", {}).get("threads", 0)) if saved.is_file() else 0


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ----------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------


def cell_state(config: cfg.TrainConfig, cell_dir: Path) -> str:
    """finished, diverged, partial, started or new (module docstring), from the folder's files."""
    rows = read_metrics(cell_dir)
    after = any(r.get("when") == "after" for r in read_evals(cell_dir))
    if (rows[-1]["step"] if rows else 0) >= config.run.steps and (config.run.eval_size == 0 or after):
        return "finished"
    bad = config.run.max_bad_steps
    if len(rows) >= bad and all(r.get("skipped_step") == 1 for r in rows[-bad:]):
        return "diverged"
    if checkpoint.latest(cell_dir) is not None:
        return "partial"
    return "started" if (cell_dir / "config.toml").is_file() else "new"


def run_cell(config: cfg.TrainConfig, *, keep_checkpoints: bool = False) -> str:
    """Bring one cell to an end (resume, restart or start it); its final state.

    A TrainingStopped run (non-finite steps) ends as "diverged". Other errors propagate.
    """
    from wapo.trainer import TrainingStopped, build_trainer

    cell_dir = Path(config.run.output_dir)
    state = cell_state(config, cell_dir)
    if state not in DONE:
        trainer = (build_trainer(config, resume=cell_dir) if state == "partial"
                   else build_trainer(config, overwrite=True))
        try:
            trainer.fit()
        except TrainingStopped as exc:
            print(f"{cell_dir.name}: {exc}", flush=True)
        state = cell_state(config, cell_dir)
    if state in DONE and not keep_checkpoints:
        _drop_checkpoints(cell_dir)
    return state


def _drop_checkpoints(cell_dir: Path) -> None:
    for name in ("checkpoints", "hf"):
        shutil.rmtree(cell_dir / name, ignore_errors=True)


def config_differences(saved: cfg.TrainConfig, wanted: cfg.TrainConfig) -> list[str]:
    """`section.field: old -> new` for each setting that differs, `IGNORED_WHEN_RESUMING` aside."""
    old, new = cfg.to_dict(saved), cfg.to_dict(wanted)
    return [f"{s}.{k}: {old[s][k]!r} -> {new[s][k]!r}" for s in new for k in new[s]
            if old[s][k] != new[s][k] and (s, k) not in IGNORED_WHEN_RESUMING]


def _check_cells_match(cells: list[Cell]) -> None:
    """A cell folder run with other settings (the study file changed) is never mixed in; a
    recorded thread count of 0 (written before cells recorded theirs) is unknown and matches any."""
    for cell in cells:
        path = cell.dir / "config.toml"
        if not path.is_file():
            continue
        saved = cfg.from_dict(cfg.load_file(path))
        if saved.model.threads == 0:
            unknown = dataclasses.replace(saved.model, threads=cell.config.model.threads)
            saved = dataclasses.replace(saved, model=unknown)
        diff = config_differences(saved, cell.config)
        if diff:
            hint = (" (the thread count changes the numbers: leave model.threads out of the study file to go on "
                    "with the recorded one)" if saved.model.threads != cell.config.model.threads else "")
            raise cfg.ConfigError(f"{cell.dir} was run with other settings ({'; '.join(diff)}){hint}: use a new "
                                  f"--output-dir, or delete that folder to run the cell again")


def _check_names(cells: list[Cell]) -> None:
    """Objectives, estimators and environments exist: a typo fails before any cell runs."""
    from wapo.advantages import ADVANTAGES
    from wapo.envs import RG_PREFIX, load_environments
    from wapo.losses import DEFAULT_ADVANTAGE, LOSSES, check_hyperparameters

    for cell in cells:
        alg, env = cell.config.algorithm, cell.config.env.env
        try:
            LOSSES.check(alg.loss)
            ADVANTAGES.check(alg.advantage or DEFAULT_ADVANTAGE[alg.loss])
            load_environments().check("rg" if env.startswith(RG_PREFIX) else env)
            check_hyperparameters(alg.loss, dict(alg.loss_options))
        except (KeyError, TypeError) as exc:
            raise cfg.ConfigError(f"study cell {cell.name}: {exc}") from None


# ----------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------


def compare(study_file: str | Path, out_dir: str | Path, *, jobs: int = 1, dry_run: bool = False,
            only: list[str] | None = None) -> int:
    """Run every unfinished cell of the study into `out_dir`, then write the report; exit status.

    `only` (`--only KEY=VALUE`, repeatable) runs a subset first: the cells whose axis KEY (the
    dotted key or its label in cell names) has VALUE; values of one key are alternatives, different
    keys must all match. The report still covers every cell in `out_dir`.
    """
    from wapo.report import write_report  # now: a study runs for hours, while its files on disk may change

    if jobs < 1:
        raise cfg.ConfigError(f"--jobs must be >= 1, got {jobs}")
    out_dir = Path(out_dir)
    study = load_study(study_file)
    cells = study.cells(out_dir, jobs=jobs)
    _check_cells_match(cells)
    _check_names(cells)
    if only:
        cells = select_cells(cells, study, only)
    if dry_run:
        print_plan(cells, {c.name: cell_state(c.config, c.dir) for c in cells}, out_dir, jobs)
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    with _only_compare_in(out_dir) as lock:
        return _run_study(study, study_file, cells, out_dir, jobs, write_report, lock)


@contextmanager
def _only_compare_in(out_dir: Path):
    """Hold `out_dir/.compare.lock` (an exclusive flock) or refuse: two studies in one folder would run the
    same cells into the same run folders. Yields the lock's file descriptor (None without flock), which
    `--jobs` workers inherit: the OS frees the lock when its last holder ends, so a worker that outlives
    this process (killed hard, or a second Ctrl-C while the workers finish their step) still holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unguarded
        yield None
        return
    with open(out_dir / ".compare.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise cfg.ConfigError(f"another `wapo compare` is running in {out_dir} ({lock.read().strip() or 'pid ?'}): "
                                  "wait for it to end, or stop it (it resumes); where that pid is gone, cells it "
                                  f"started still run (`fuser {out_dir / '.compare.lock'}` lists them)") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}")
        lock.flush()
        yield lock.fileno()


def _run_study(study: Study, study_file: str | Path, cells: list[Cell], out_dir: Path, jobs: int, write_report,
               lock: int | None) -> int:
    """`compare`'s work once it holds the folder: run the unfinished cells, write the report; exit status.
    The cells' states are read here, under the lock: a study that ended just before changed them."""
    states = {c.name: cell_state(c.config, c.dir) for c in cells}
    (out_dir / f"study{Path(study_file).suffix}").write_text(study.text)  # what the report reads the axes from
    todo = [c for c in cells if states[c.name] not in DONE]
    for c in cells:
        if states[c.name] in DONE and not study.keep_checkpoints:  # a kill between a cell's end and its
            _drop_checkpoints(c.dir)                                # clean-up left them behind
    print(f"Study {out_dir}: {len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run "
          f"(--jobs {jobs})", flush=True)
    with _sigterm_raises_interrupt():
        try:
            failed = (_run_here(todo, out_dir, jobs, study.keep_checkpoints) if jobs == 1 else
                      _run_in_subprocesses(todo, out_dir, jobs, study.keep_checkpoints, lock=lock))
        except KeyboardInterrupt:
            print(f"\nStudy interrupted: run the same command again to continue {out_dir}.", flush=True)
            raise
    if any((out_dir / "runs").glob("*/config.toml")):  # no report of a study whose every cell failed at once
        print("Report: " + ", ".join(str(p) for p in write_report(out_dir)))
    for name, where in failed.items():
        print(f"cell {name} failed: see {where}", file=sys.stderr)
    return 1 if failed else 0


def select_cells(cells: list[Cell], study: Study, only: list[str]) -> list[Cell]:
    """The cells matching every key of `only` (["KEY=VALUE", ...]; one key's values are alternatives)."""
    axes = study.all_axes
    labels = _labels(list(axes))
    by_name = {**{k: k for k in axes}, **{label: k for k, label in labels.items()}}
    wanted: dict[str, list] = {}
    for item in only:
        name, sep, text = item.partition("=")
        key = by_name.get(name.strip())
        if not sep or key is None:
            raise cfg.ConfigError(f"--only {item!r}: use KEY=VALUE with KEY one of the study's axes "
                                  f"({', '.join(f'{labels[k]} ({k})' for k in axes)})")
        value = _parse_value(text.strip())
        matches = [v for v in axes[key] if _same(v, value) or v == text.strip() or _cell_text(v) == text.strip()]
        if not matches:
            raise cfg.ConfigError(f"--only {item!r}: axis {key!r} has no value {text.strip()!r}; its values "
                                  f"(as in cell names): {', '.join(_cell_text(v) for v in axes[key])}")
        wanted.setdefault(key, []).extend(matches)
    chosen = [c for c in cells if all(c.values[k] in vs for k, vs in wanted.items())]
    return chosen


def _same(a: Any, b: Any) -> bool:
    """Equal values of one kind: 1e-4 == 0.0001 and 2 == 2.0, but true is not 1."""
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def _parse_value(text: str) -> Any:
    """A command-line value as TOML reads it (1e-4 -> 0.0001, 4 -> 4, true -> True), else the text."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _run_here(cells: list[Cell], out_dir: Path, jobs: int, keep: bool) -> dict[str, str]:
    """One cell after the other in this process; failed cell -> where its traceback is."""
    from tqdm.auto import tqdm

    failed = {}
    with tqdm(cells, desc="study", unit="cell", dynamic_ncols=True) as bar:
        for cell in bar:
            bar.set_postfix_str(cell.name)
            try:
                run_cell(cell.config, keep_checkpoints=keep)
            except Exception:  # one broken cell does not stop the others; rerunning retries it
                traceback.print_exc()
                failed[cell.name] = "the traceback above"
    return failed


def _run_in_subprocesses(cells: list[Cell], out_dir: Path, jobs: int, keep: bool, *,
                         lock: int | None = None) -> dict[str, str]:
    """Up to `jobs` cells at once, each in `python -m wapo.study` (output in D/logs/<cell>.log).

    Workers run in their own sessions, so a Ctrl-C reaches this process only; it then sends
    each worker one SIGTERM (the trainer finishes or saves its step) and waits for them. Each
    worker inherits `lock` (the folder's, `_only_compare_in`), so the folder stays locked while
    any worker runs, even one that outlives this process.
    """
    from tqdm.auto import tqdm

    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    pending, running, failed = list(cells), {}, {}
    bar = tqdm(total=len(cells), desc="study", unit="cell", dynamic_ncols=True)
    try:
        while pending or running:
            while pending and len(running) < jobs:
                cell = pending.pop(0)
                threads = str(cell.config.model.threads)  # the cell's own (a resumed one keeps its count)
                cell_env = {**env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
                log = (logs / f"{cell.name}.log").open("a")
                command = [sys.executable, "-m", "wapo.study", json.dumps(cfg.to_dict(cell.config))]
                command += ["--keep-checkpoints"] if keep else []
                worker = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=cell_env,
                                          start_new_session=True, pass_fds=() if lock is None else (lock,))
                running[worker] = (cell, log)
            for proc in [p for p in running if p.poll() is not None]:
                cell, log = running.pop(proc)
                log.close()
                if proc.returncode not in (0, EXIT_DIVERGED):
                    failed[cell.name] = str(logs / f"{cell.name}.log")
                bar.update(1)
            bar.set_postfix_str(",  ".join(c.name for c, _ in running.values()))
            time.sleep(0.2)
    except KeyboardInterrupt:
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        print(f"\nStopping {len(running)} running cell(s): each finishes or saves its step ...", flush=True)
        for proc, (_, log) in running.items():
            proc.wait()
            log.close()
        raise
    finally:
        bar.close()
    return failed


@contextmanager
def _sigterm_raises_interrupt():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, while the study runs (inside a cell the
    trainer's own guard takes over). Only in the main thread, and only over the default action."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ----------------------------------------------------------------------------------------
# --dry-run: the cells and an estimated time
# ----------------------------------------------------------------------------------------


def seconds_per_row_token(out_dir: Path) -> tuple[dict[str, float], int]:
    """Measured seconds per sampled row per budget token, for sampling and training, over every
    logged step under `out_dir/runs` (and how many steps); `DEFAULT_SECONDS` when none."""
    sums, n = {"sample": 0.0, "train": 0.0}, 0
    for saved in sorted((out_dir / "runs").glob("*/config.toml")):
        config = cfg.from_dict(cfg.load_file(saved))
        s, passes = config.sampling, config.algorithm.updates_per_batch
        for row in read_metrics(saved.parent):
            if row.get("time_sample") is None or row.get("time_train") is None:
                continue
            units = s.prompts_per_step * s.samples_per_prompt * (row.get("sampling_rounds") or 1) * s.max_new_tokens
            sums["sample"] += row["time_sample"] / units
            sums["train"] += row["time_train"] / (units * passes)  # per pass over the batch
            n += 1
    return ({k: v / n for k, v in sums.items()} if n else dict(DEFAULT_SECONDS)), n


def estimate_seconds(config: cfg.TrainConfig, state: str, steps_done: int, rate: dict[str, float]) -> float:
    """Time left for one cell: remaining steps × rows × budget × (sampling + passes × training)
    rates, with passes = `updates_per_batch`, plus its held-out evaluations (eval_size × (1 greedy
    + eval_samples) rows at the sampling rate). Model loading is not counted."""
    if state in DONE:
        return 0.0
    s, r, passes = config.sampling, config.run, config.algorithm.updates_per_batch
    left = max(r.steps - steps_done, 0)
    step = s.prompts_per_step * s.samples_per_prompt * s.max_new_tokens * (rate["sample"] + passes * rate["train"])
    evaluations = (steps_done == 0) + 1 + (sum(1 for t in range(steps_done + 1, r.steps) if r.eval_every and
                                               t % r.eval_every == 0))
    per_eval = r.eval_size * (1 + r.eval_samples) * s.max_new_tokens * rate["sample"] if r.eval_size else 0.0
    return left * step + evaluations * per_eval


def print_plan(cells: list[Cell], states: dict[str, str], out_dir: Path, jobs: int) -> None:
    rate, measured = seconds_per_row_token(out_dir)
    width = max(len(c.name) for c in cells)
    total = 0.0
    print(f"{'cell':<{width}}  {'state':<9}  {'steps':>9}  {'estimate':>9}")
    for c in cells:
        done = _steps_done(c.dir) if states[c.name] in DONE + ("partial",) else 0  # others start over
        seconds = estimate_seconds(c.config, states[c.name], done, rate)
        total += seconds
        print(f"{c.name:<{width}}  {states[c.name]:<9}  {f'{done}/{c.config.run.steps}':>9}  {_duration(seconds):>9}")
    source = (f"measured on {measured} logged steps in {out_dir}" if measured else
              "default rate of the built-in model on 2 CPU cores (docs/study.md)")
    to_run = sum(states[c.name] not in DONE for c in cells)
    print(f"{len(cells)} cells, {to_run} to run: about {_duration(total)} one after the other"
          + (f", about {_duration(total / jobs)} at best with --jobs {jobs}" if jobs > 1 else "")
          + f" ({source}; model loading not counted)")


def _steps_done(cell_dir: Path) -> int:
    """Steps a resumed cell keeps: its newest checkpoint's (later logged steps are replayed)."""
    last = checkpoint.latest(cell_dir)
    rows = read_metrics(cell_dir)
    return int(last.name.split("_")[1]) if last is not None else (rows[-1]["step"] if rows else 0)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _worker(argv: list[str]) -> int:
    """`python -m wapo.study CONFIG_JSON [--keep-checkpoints]`: run one cell (a --jobs worker)."""
    config = cfg.from_dict(json.loads(argv[0]))
    try:
        state = run_cell(config, keep_checkpoints="--keep-checkpoints" in argv[1:])
    except KeyboardInterrupt:
        return 130
    return EXIT_DIVERGED if state == "diverged" else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(_worker(sys.argv[1:]))
