"""Checkpoints: an exact round trip, no pickled code run on load, rotation by step number,
and no crash during a save that leaves a run without a good checkpoint."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from wapo import checkpoint


def _objects(seed: int):
    """A model, its AdamW optimizer and a LambdaLR schedule, seeded."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).square().sum().backward()
        optimizer.step()
        scheduler.step()


def _draws() -> list:
    """Numbers from every RNG a checkpoint restores, Gaussian caches included."""
    return [torch.rand(3).tolist(), random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
            np.random.normal()]


def _assert_identical(a, b) -> None:
    """Nested dicts/lists/tuples of tensors and plain values, equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_identical(x, y)
    else:
        assert a == b


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_restores_optimizer_scheduler_and_every_rng_exactly(tmp_path):
    model, optimizer, scheduler = _objects(seed=0)
    random.seed(1), np.random.seed(2)
    _train(model, optimizer, scheduler, steps=2)
    random.gauss(0, 1), np.random.normal()  # an odd number of Gaussians: both caches hold one
    path = checkpoint.save(tmp_path, 2, model, optimizer, scheduler, {"data_position": 8})
    expected_draws = _draws()
    _train(model, optimizer, scheduler, steps=1)
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_optimizer, fresh_scheduler = _objects(seed=99)
    random.seed(99), np.random.seed(99)
    progress = checkpoint.load(path, fresh, fresh_optimizer, fresh_scheduler)

    assert progress == {"data_position": 8, "step": 2}
    saved = torch.load(path / "trainer.pt", weights_only=True)
    _assert_identical(fresh_optimizer.state_dict(), saved["optimizer"])
    assert fresh_scheduler.state_dict() == saved["scheduler"]
    assert fresh_scheduler.last_epoch == 2 and fresh_scheduler.get_last_lr() == [0.1 / 3]  # 0.1 / (1 + 2)
    assert _draws() == expected_draws
    _train(fresh, fresh_optimizer, fresh_scheduler, steps=1)  # the same update as the original's third
    _assert_identical(fresh.state_dict(), expected_weights)


def test_trainer_pt_holds_only_tensors_and_the_rest_is_json(tmp_path):
    model, optimizer, scheduler = _objects(seed=0)
    path = checkpoint.save(tmp_path, 1, model, optimizer, scheduler, {})
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "progress.json", "rng.json", "trainer.pt"]
    state = torch.load(path / "trainer.pt", weights_only=True)  # numpy arrays or tuples of ints would be refused
    assert set(state["rng"]) == ({"torch", "cuda"} if torch.cuda.is_available() else {"torch"})
    rng = json.loads((path / "rng.json").read_text())
    assert (rng["python"]["version"], len(rng["python"]["state"])) == (3, 625)  # Mersenne Twister: 624 words + index
    assert (rng["numpy"]["generator"], len(rng["numpy"]["key"])) == ("MT19937", 624)


class _RunsCode:
    """Unpickled, this calls os.mkdir(marker): what a hostile trainer.pt could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_load_refuses_a_trainer_pt_that_would_run_code(tmp_path):
    model, optimizer, scheduler = _objects(seed=0)
    path = checkpoint.save(tmp_path, 1, model, optimizer, scheduler, {})
    marker = tmp_path / "code-ran"
    state = torch.load(path / "trainer.pt", weights_only=True)
    torch.save({**state, "optimizer": _RunsCode(marker)}, path / "trainer.pt")
    with pytest.raises(ValueError, match="could run code: refused"):
        checkpoint.load(path, *_objects(seed=0))
    assert not marker.exists()


# --- rotation and latest ---------------------------------------------------------------------


def _folders(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "checkpoints").iterdir())


def test_latest_goes_by_the_parsed_step_number(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_999999", "step_1000000", "step_5", "step_abc", ".tmp-crashed", "notes"):
        (root / name).mkdir(parents=True)
    assert checkpoint.latest(tmp_path) == root / "step_1000000"  # by name, "step_abc" > "step_999999" > ...
    (root / "step_1000000").rmdir()
    assert checkpoint.latest(tmp_path) == root / "step_999999"
    assert checkpoint.latest(tmp_path / "elsewhere") is None


def test_save_rotates_by_the_parsed_step_number(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_999999", "step_1000000", "step_abc", ".tmp-crashed"):
        (root / name).mkdir(parents=True)
    model, optimizer, scheduler = _objects(seed=0)
    checkpoint.save(tmp_path, 1_000_001, model, optimizer, scheduler, {}, keep=2)
    # the two of highest step stay; a crashed save's leftover goes; a folder that is no
    # checkpoint is left alone
    assert _folders(tmp_path) == ["step_1000000", "step_1000001", "step_abc"]


def test_default_keeps_one_checkpoint_and_replaces_other_spellings_of_its_step(tmp_path):
    (tmp_path / "checkpoints" / "step_3").mkdir(parents=True)
    model, optimizer, scheduler = _objects(seed=0)
    checkpoint.save(tmp_path, 1, model, optimizer, scheduler, {})
    checkpoint.save(tmp_path, 3, model, optimizer, scheduler, {})
    assert _folders(tmp_path) == ["step_000003"]


# --- crashes during a save -------------------------------------------------------------------


def test_a_failed_save_keeps_the_only_checkpoint_and_leaves_no_partial_copy(tmp_path, monkeypatch):
    model, optimizer, scheduler = _objects(seed=0)
    first = checkpoint.save(tmp_path, 1, model, optimizer, scheduler, {})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(tmp_path, 2, model, optimizer, scheduler, {})
    assert _folders(tmp_path) == ["step_000001"]
    assert checkpoint.load(first, *_objects(seed=0)) == {"step": 1}


def test_a_crash_while_resaving_a_step_never_loses_it(tmp_path, monkeypatch):
    model, optimizer, scheduler = _objects(seed=0)
    checkpoint.save(tmp_path, 3, model, optimizer, scheduler, {"data_position": 1})
    real_replace = os.replace

    def crash_on_moving_the_new_one_in(src, dst):
        if os.path.basename(src).startswith(".tmp-"):
            raise KeyboardInterrupt  # killed between moving the old checkpoint aside and the new one in
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_on_moving_the_new_one_in)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 3, model, optimizer, scheduler, {"data_position": 2})
    monkeypatch.undo()

    found = checkpoint.latest(tmp_path)
    assert found == tmp_path / "checkpoints" / "step_000003"
    assert checkpoint.load(found, *_objects(seed=0)) == {"data_position": 1, "step": 3}  # the old one, whole
    checkpoint.save(tmp_path, 3, model, optimizer, scheduler, {"data_position": 2})
    assert _folders(tmp_path) == ["step_000003"]  # the crash's leftovers are gone


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep must be >= 1"):
        checkpoint.save(tmp_path, 1, *_objects(seed=0), {}, keep=0)
