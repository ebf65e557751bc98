"""Checkpoints: trainable weights (safetensors), optimizer, scheduler, RNG states, progress.

Each checkpoint is a folder `checkpoints/step_N/` (N written with at least six digits) holding

    model.safetensors   the trainable weights
    sampler.safetensors only with `sampler_lag` = 1: the sampler copy's values of the same
                        weights (one update behind the policy; in bfloat16 with `bf16_sampling`)
    trainer.pt          optimizer and scheduler state, torch (and CUDA) RNG states: tensors
                        and plain containers only, read with `torch.load(weights_only=True)`,
                        which refuses anything that would run code while unpickling
    rng.json            the Python and NumPy RNG states (not tensors, so not in trainer.pt)
    progress.json       the step, the data position and the run's counters

Safe against a crash at any point:
- a checkpoint is written into a temporary folder `.tmp-*`, flushed to disk, then renamed
  into place, so a `step_N` folder is always complete;
- older checkpoints are removed only after the new one is in place, so with `keep=1` there
  is always one good checkpoint on disk;
- saving a step that already has a checkpoint moves the old folder aside
  (`.replaced-step_N`) before renaming the new one in, and deletes it after; if a crash
  falls between the two renames, the next `latest()` puts the old folder back.
Checkpoints are ordered by the step number parsed from their name, never by the name's
spelling (`step_1000000` is newer than `step_999999`); other folders are ignored.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_STEP_DIR = re.compile(r"step_(\d+)")
SAMPLER_FILE = "sampler.safetensors"
_REPLACED = ".replaced-"


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all weights, or only LoRA adapters)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def copy_state(copy, model) -> dict[str, torch.Tensor]:
    """The parameters of `copy` (a copy of `model`, e.g. the sampler) that training changes in `model`."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: p.detach().cpu().contiguous() for name, p in copy.named_parameters() if name in trainable}


def rng_state() -> dict:
    """The torch, Python and NumPy (and CUDA, if present) RNG states, for `set_rng_state`."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, model, optimizer, scheduler, progress: dict, *, keep: int = 1,
         rng: dict | None = None, sampler=None) -> Path:
    """Write checkpoint `step` atomically, then remove all checkpoints but the `keep` newest.

    Kept: the one just written and the `keep - 1` others of highest step (other spellings of
    the same step are replaced). `rng`: the RNG states to restore (default:
    the current ones); an interrupted step passes the states it started from, so resuming
    replays that step exactly. `sampler`: a copy of `model` whose weights are state of their
    own (a sampler one update behind), written to sampler.safetensors. Leftovers of saves that
    crashed (`.tmp-*`, `.replaced-*`) are removed.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (checkpoints kept on disk), got {keep}")
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        _write(tmp, model, optimizer, scheduler, {**progress, "step": step}, rng or rng_state(), sampler)
    except BaseException:
        shutil.rmtree(tmp)  # a failed save leaves no partial copy of the weights behind
        raise
    if target.exists():
        replaced = root / f"{_REPLACED}{target.name}"
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(target, replaced)
    os.replace(tmp, target)
    fsync(root)

    checkpoints = _checkpoint_dirs(root)
    others = [path for s, path in checkpoints if s != step]
    duplicates = [path for s, path in checkpoints if s == step and path != target]
    leftovers = [*root.glob(".tmp-*"), *root.glob(f"{_REPLACED}*")]
    for path in others[: max(len(others) - (keep - 1), 0)] + duplicates + leftovers:
        shutil.rmtree(path)
    return target


def _write(folder: Path, model, optimizer, scheduler, progress: dict, rng: dict, sampler=None) -> None:
    """The checkpoint's four files (five with a `sampler`) in `folder`, flushed to disk."""
    save_file(trainable_state(model), str(folder / "model.safetensors"))
    if sampler is not None:
        save_file(copy_state(sampler, model), str(folder / SAMPLER_FILE))
    tensors = {"torch": rng["torch"], **({"cuda": rng["cuda"]} if "cuda" in rng else {})}
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": tensors},
               folder / "trainer.pt")
    (folder / "rng.json").write_text(json.dumps(_rng_to_json(rng)))
    (folder / "progress.json").write_text(json.dumps(progress, indent=1))
    for file in folder.iterdir():
        fsync(file)
    fsync(folder)


def latest(run_dir: Path) -> Path | None:
    """The checkpoint of highest step in `run_dir/checkpoints`, or None if there is none."""
    checkpoints = _checkpoint_dirs(run_dir / "checkpoints")
    return checkpoints[-1][1] if checkpoints else None


def _checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of each checkpoint `step_N` under `root`, N parsed as an integer, by step.

    A folder `.replaced-step_N` without its `step_N` is the old checkpoint of a save that
    crashed between its two renames: it is renamed back first. When two spellings name the
    same step (`step_5`, `step_000005`), the one `save` writes (six digits or more) comes last.
    """
    if not root.is_dir():
        return []
    for replaced in root.glob(f"{_REPLACED}step_*"):
        original = root / replaced.name[len(_REPLACED):]
        if not original.exists():
            os.replace(replaced, original)
    found = [(_step_of(path), path) for path in root.iterdir() if path.is_dir()]
    return sorted(((step, path) for step, path in found if step is not None),
                  key=lambda item: (item[0], item[1].name == f"step_{item[0]:06d}"))


def _step_of(path: Path) -> int | None:
    match = _STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def load_weights(path: Path, model, file: str = "model.safetensors") -> None:
    """Load a checkpoint's trainable weights into `model`; every saved tensor must fit."""
    tensors = load_file(str(path / file))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"checkpoint {path} has weights this model lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything `save` wrote; returns the progress dict (step, data position, ...).

    trainer.pt is read with `weights_only=True`: a file holding anything but tensors and plain
    containers (which unpickling could turn into running code) is refused with a ValueError.
    """
    load_weights(path, model)
    try:
        state = torch.load(path / "trainer.pt", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path / 'trainer.pt'} holds objects other than tensors and plain containers, so loading "
            f"it could run code: refused. A checkpoint written by `wapo` holds only tensors there "
            f"(its other state is in rng.json and progress.json). ({error})"
        ) from error
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state({**state["rng"], **_rng_from_json(json.loads((path / "rng.json").read_text()))})
    return json.loads((path / "progress.json").read_text())


def load_sampler(path: Path, sampler) -> None:
    """Restore a sampler copy that is one update behind (`sampler_lag` = 1) from sampler.safetensors."""
    if not (path / SAMPLER_FILE).is_file():
        raise FileNotFoundError(
            f"checkpoint {path} has no {SAMPLER_FILE}: it was written by a run with sampler_lag = 0 (or by an "
            f"older wapo), so the weights one update behind that --sampler-lag 1 samples with are not in it. "
            f"Resume it with --sampler-lag 0, or start a new run with --sampler-lag 1."
        )
    load_weights(path, sampler, SAMPLER_FILE)


def _rng_to_json(state: dict) -> dict:
    """The Python and NumPy parts of `rng_state()` as JSON (integers, and floats that
    `json` writes exactly)."""
    version, internal, gauss_next = state["python"]
    generator, key, pos, has_gauss, cached_gaussian = state["numpy"]
    return {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {"generator": generator, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
    }


def _rng_from_json(data: dict) -> dict:
    """The inverse of `_rng_to_json`: the states `random.setstate` and `np.random.set_state` take."""
    python, numpy = data["python"], data["numpy"]
    return {
        "python": (python["version"], tuple(python["state"]), python["gauss_next"]),
        "numpy": (numpy["generator"], np.array(numpy["key"], dtype=np.uint32), numpy["pos"], numpy["has_gauss"],
                  numpy["cached_gaussian"]),
    }


def fsync(path: Path) -> None:
    """Flush a file's or a folder's contents to disk (a folder's: its entries, e.g. a rename)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
