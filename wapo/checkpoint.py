"""Checkpoints: trainable weights (safetensors), optimizer, scheduler, RNG states, progress.

Each checkpoint is a folder `checkpoints/step_NNNNNN/`, written to a temporary folder first
and renamed into place, so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all weights, or only LoRA adapters)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
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


def save(run_dir: Path, step: int, model, optimizer, scheduler, progress: dict, *, keep: int = 2,
         rng: dict | None = None) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` checkpoints.

    `rng`: the RNG states to restore (default: the current ones); an interrupted step passes
    the states it started from, so resuming replays that step exactly.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    save_file(trainable_state(model), str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng or rng_state()},
               tmp / "trainer.pt")
    (tmp / "progress.json").write_text(json.dumps({**progress, "step": step}, indent=1))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return target


def latest(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def load_weights(path: Path, model) -> None:
    """Load a checkpoint's trainable weights into `model`; every saved tensor must fit."""
    tensors = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"checkpoint {path} has weights this model lacks: {unknown[:5]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def load(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything `save` wrote; returns the progress dict (step, data position, ...)."""
    load_weights(path, model)
    state = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return json.loads((path / "progress.json").read_text())
