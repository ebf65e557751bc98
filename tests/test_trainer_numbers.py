"""The trainer trains on the right numbers under every option (issue: trust).

Ratio denominators (sampler μ or the trainer's π_old), truncated importance sampling, the KL
reference through the policy's own pass under bf16, loss metrics independent of the
micro-batch size, DAPO's dynamic sampling, and run folders that are never silently reused.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import wapo.update as update_module
from wapo import config as cfg
from wapo.losses import tis_weights
from wapo.trainer import Precision, build_trainer

TIME = ("time_", "tokens_per_second", "peak_memory_mb")


def _config(model_dir, tmp_path, **sections):
    base = {
        "model": {"model": model_dir, "bf16": "false", "bf16_sampling": "false"},
        "env": {"env": "test_digit"},
        "sampling": {"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 6, "temperature": 3.0},
        "optim": {"lr": 1e-2, "micro_batch_size": 3},
        "run": {"steps": 1, "eval_size": 0, "progress": False, "output_dir": str(tmp_path / "run"), "seed": 1,
                "checkpoint_every": 10, "taxonomy_chunk_size": 5},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return cfg.from_dict(base)


def _rows(trainer):
    return [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------
# 1. The ratio's denominator
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bf16", "bf16_sampling", "against", "resolved"), [
    (False, False, "auto", "sampler"), (True, False, "auto", "trainer"), (False, True, "auto", "trainer"),
    (True, True, "sampler", "sampler"), (False, False, "trainer", "trainer"),
])
def test_auto_takes_the_ratio_against_the_trainer_whenever_bf16_differs(bf16, bf16_sampling, against, resolved):
    config = cfg.from_dict({"model": {"bf16": bf16, "bf16_sampling": bf16_sampling},
                            "algorithm": {"ratio_against": against}})
    assert Precision.resolve(config, torch.device("cpu")).ratio_against == resolved


def test_bf16_auto_follows_the_hardware(monkeypatch):
    import wapo.trainer as trainer_module

    for native in (True, False):
        monkeypatch.setattr(trainer_module, "native_bf16", lambda device, native=native: native)
        p = Precision.resolve(cfg.TrainConfig(), torch.device("cpu"))
        assert (p.bf16, p.bf16_sampling, p.ratio_against) == (native, native, "trainer" if native else "sampler")


@pytest.mark.parametrize("loss", ["gspo", "grpo"])
def test_against_the_trainer_a_bf16_sampler_leaves_the_first_update_on_policy(tiny_model_dir, tmp_path, loss):
    # GSPO's band is 3e-4: against the bf16 sampler's μ most rows fall outside it; against the
    # trainer's own first pass every ratio is exactly 1 and nothing is clipped
    rows = {}
    for against in ("sampler", "trainer"):
        trainer = build_trainer(_config(tiny_model_dir, tmp_path / against, model={"bf16_sampling": "true"},
                                        algorithm={"loss": loss, "ratio_against": against}))
        trainer.fit()
        rows[against] = _rows(trainer)[0]
    t, s = rows["trainer"], rows["sampler"]
    assert (t["ratio_min"], t["ratio_max"], t["clip_frac_pos"], t["clip_frac_neg"]) == (1.0, 1.0, 0.0, 0.0)
    assert s["ratio_max"] - s["ratio_min"] > 1e-4  # bf16 rounding: the sampler is not the trainer
    assert t["mismatch_abs_logp"] > 1e-4 and t["kl_behaviour"] > 0 and t["mismatch_ratio_max"] > 1
    # the same sampled batch on both sides: the mismatch is the same measurement
    assert t["mismatch_abs_logp"] == pytest.approx(s["mismatch_abs_logp"], rel=1e-5)


def test_against_the_trainer_old_logprobs_are_the_first_pass_and_later_epochs_move(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    seen = []
    real = update_module.policy_loss

    def spy(name, logp, old, adv, mask, **kw):
        seen.append((logp.detach().clone(), old.clone(), mask.clone()))
        return real(name, logp, old, adv, mask, **kw)

    monkeypatch.setattr(update_module, "policy_loss", spy)
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, model={"bf16": "true"},
                                    algorithm={"loss": "grpo", "updates_per_batch": 2}))
    trainer.fit()
    n = len(seen) // 2
    for (logp, old, mask), (logp2, old2, _) in zip(seen[:n], seen[n:]):
        assert torch.equal(old[mask], logp[mask])  # epoch 1: π_old is this very pass
        assert torch.equal(old2, old)  # epoch 2 keeps π_old ...
    assert any(not torch.allclose(l2[m], old[m]) for (_, old, m), (l2, _, _) in zip(seen[:n], seen[n:]))  # ... π moved


def test_truncated_importance_sampling_weights_are_min_of_ratio_and_cap():
    old = torch.tensor([[math.log(0.5), math.log(0.9), 0.0]])
    mu = torch.tensor([[math.log(0.25), math.log(0.9), float("nan")]])
    mask = torch.tensor([[True, True, False]])
    # token 0: π_old/μ = 0.5/0.25 = 2 > C = 1.5 -> 1.5; token 1: 1; token 2 masked -> 1
    torch.testing.assert_close(tis_weights(old, mu, mask, cap=1.5), torch.tensor([[1.5, 1.0, 1.0]]))


def test_tis_weights_enter_the_loss_per_token(tiny_model_dir, tmp_path, monkeypatch):
    captured = []
    real = update_module.policy_loss

    def spy(name, logp, old, adv, mask, *, token_weights=None, **kw):
        out = real(name, logp, old, adv, mask, token_weights=token_weights, **kw)
        plain = real(name, logp, old, adv, mask, **kw)
        captured.append((token_weights, out.loss.detach(), plain.loss.detach(), old, mask))
        return out

    monkeypatch.setattr(update_module, "policy_loss", spy)
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, model={"bf16_sampling": "true"},
                                    algorithm={"loss": "dr_grpo", "tis_cap": 1.001}))
    trainer.fit()
    weights = torch.cat([w[m] for w, *_, m in [(c[0], c[4]) for c in captured]])
    assert weights.max() <= 1.001 and (weights < 1).any()  # truncated above, below 1 where π_old < μ
    # at ρ = 1 Dr. GRPO's loss is −Σ A·w / (B·L): the weights change it unless all are 1
    assert any(not torch.isclose(loss, plain) for _, loss, plain, *_ in captured)


# ------------------------------------------------------------------------------------------
# 2. One pass for the policy and the KL reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lora", "checkpointing"), [(0, False), (4, False), (0, True)])
def test_the_kl_to_the_reference_is_zero_at_step_one_under_bf16(tiny_model_dir, tmp_path, lora, checkpointing):
    # the policy and the reference take one path: under gradient checkpointing both run full sequences
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, algorithm={"kl_beta": 0.1}, run={"steps": 2},
                                    model={"bf16": "true", "lora_rank": lora, "gradient_checkpointing": checkpointing}))
    trainer.fit()
    rows = _rows(trainer)
    assert rows[0]["kl_ref"] == 0.0
    assert rows[1]["kl_ref"] > 1e-6  # after one update the policy has left the reference


# ------------------------------------------------------------------------------------------
# 4. Metrics merged from counts
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("loss", "updates"), [("grpo", 1), ("grpo", 3), ("dapo", 3), ("wapo", 3), ("gspo", 3)])
def test_micro_batch_size_changes_neither_weights_nor_logged_metrics(tiny_model_dir, tmp_path, loss, updates):
    runs = {}
    for size in (1, 64):
        # On the CPU, where the two shapes agree to the bounds below. On a GPU the kernels picked for
        # the two shapes round differently: on an H200 (dapo, 3 updates at lr 1e-2) grad_norm_max
        # came out 0.35894 against 0.35900, 1.7e-4 apart relatively, not 1e-5.
        trainer = build_trainer(_config(tiny_model_dir, tmp_path / str(size), optim={"micro_batch_size": size},
                                        algorithm={"loss": loss, "updates_per_batch": updates}, run={"seed": 5},
                                        model={"device": "cpu"}))
        grads, real_step = [], trainer.optimizer.step

        def step(*args, _grads=grads, _real=real_step, _model=trainer.model, **kwargs):
            _grads.append(torch.cat([p.grad.flatten() for p in _model.parameters() if p.grad is not None]))
            return _real(*args, **kwargs)

        trainer.optimizer.step = step
        trainer.optimizer._opt_called = True  # (torch's scheduler warns when `step` is replaced)
        trainer.fit()
        row = {k: v for k, v in _rows(trainer)[0].items() if not k.startswith(TIME)}
        weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
        runs[size] = (row, weights, grads)
    (one, w_one, g_one), (whole, w_whole, g_whole) = runs[1], runs[64]
    assert one["backward_rows"] > 1  # more than one micro-batch with size 1
    if updates > 1 and loss != "wapo":  # by the last epoch the policy moved: the clip bites
        assert one["clip_frac_pos"] + one["clip_frac_neg"] > 0
    assert one.keys() == whole.keys()
    for key in one:
        if isinstance(one[key], float):
            assert one[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), key
        else:
            assert one[key] == whole[key], key
    # accumulated gradients and weights differ by float summation order only
    assert len(g_one) == len(g_whole) == updates
    for a, b in zip(g_one, g_whole):
        assert (a - b).norm() <= 1e-5 * b.norm()
    assert (w_one - w_whole).norm() <= 1e-6 * w_whole.norm()


# ------------------------------------------------------------------------------------------
# 5. DAPO's dynamic sampling
# ------------------------------------------------------------------------------------------


def test_dynamic_sampling_draws_rounds_until_the_batch_holds_enough_mixed_groups(tiny_model_dir, tmp_path):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, algorithm={"loss": "dapo", "dynamic_sampling": True,
                                                                          "max_sampling_rounds": 20},
                                    sampling={"prompts_per_step": 3, "temperature": 0.5}, run={"steps": 3}))
    trainer.fit()
    rows = _rows(trainer)
    assert any(r["sampling_rounds"] > 1 for r in rows)  # some round lacked mixed groups
    for r in rows:
        # 3 mixed groups of 4 rows: every row has A != 0 under group_norm, so all 12 train
        assert r["backward_rows"] + r["skipped_rows"] == 12 and r["backward_rows"] == 12
    assert trainer.progress.data_position == 3 * sum(r["sampling_rounds"] for r in rows)


def test_dynamic_sampling_stops_at_the_round_cap(tiny_model_dir, tmp_path):
    # temperature 0.05: each group's samples agree, so no group is ever mixed
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, sampling={"temperature": 0.05},
                                    algorithm={"loss": "dapo", "dynamic_sampling": True, "max_sampling_rounds": 3}))
    trainer.fit()
    (row,) = _rows(trainer)
    assert (row["sampling_rounds"], row["backward_rows"], row["mixed_group_frac"]) == (3, 0, 0.0)
    assert trainer.progress.data_position == 2 * 3


# ------------------------------------------------------------------------------------------
# 8. A run folder is never silently reused
# ------------------------------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_unless_overwritten(tiny_model_dir, tmp_path):
    build_trainer(_config(tiny_model_dir, tmp_path)).fit()
    with pytest.raises(cfg.ConfigError, match=r"already holds a run: continue it with `wapo train --resume .*--overwrite"):
        build_trainer(_config(tiny_model_dir, tmp_path))
    trainer = build_trainer(_config(tiny_model_dir, tmp_path), overwrite=True)
    assert not (trainer.run_dir / "metrics.jsonl").exists() and not (trainer.run_dir / "checkpoints").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(cfg.ConfigError, match="not empty and holds no wapo run"):
        build_trainer(_config(tiny_model_dir, tmp_path, run={"output_dir": str(tmp_path / "other")}), overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_new_default_run_folder_is_never_one_that_exists(tmp_path):
    from wapo.trainer import _claim_new_dir

    base = tmp_path / "runs" / "20261129-210000-wapo"
    assert [_claim_new_dir(base) for _ in range(3)] == [base, base.with_name(base.name + "-2"),
                                                        base.with_name(base.name + "-3")]


def test_overwrite_removes_only_what_a_run_writes(tiny_model_dir, tmp_path):
    build_trainer(_config(tiny_model_dir, tmp_path)).fit()
    (tmp_path / "run" / "notes.md").write_text("mine")
    build_trainer(_config(tiny_model_dir, tmp_path), overwrite=True)
    assert (tmp_path / "run" / "notes.md").read_text() == "mine"
    # a project folder with a config.toml of its own is not a run: refused, nothing deleted
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.toml").write_text("[tool.black]\nline-length = 100\n")
    (project / "main.py").write_text("print(1)")
    with pytest.raises(cfg.ConfigError, match="holds no wapo run"):
        build_trainer(_config(tiny_model_dir, tmp_path, run={"output_dir": str(project)}), overwrite=True)
    assert sorted(p.name for p in project.iterdir()) == ["config.toml", "main.py"]


def test_a_nan_in_a_later_epoch_keeps_the_earlier_optimizer_steps_and_says_so(tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    calls = {"n": 0}
    real = update_module.policy_loss

    def nan_in_epoch_2(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > n_micro_batches:
            return type(out)(loss=out.loss * float("nan"), metrics=out.metrics, counts=out.counts)
        return out

    trainer = build_trainer(_config(tiny_model_dir, tmp_path, algorithm={"loss": "grpo", "updates_per_batch": 3},
                                    optim={"micro_batch_size": 64}))
    n_micro_batches = 1
    monkeypatch.setattr(update_module, "policy_loss", nan_in_epoch_2)
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.fit()
    (row,) = _rows(trainer)
    assert (row["skipped_step"], row["optimizer_steps"], row["skipped_steps_total"]) == (1, 1, 1)
    state = trainer.optimizer.state_dict()["state"]
    assert {s["step"].item() for s in state.values()} == {1.0}


def test_a_step_with_an_empty_batch_logs_null_not_zero_entropy(tiny_model_dir, tmp_path):
    trainer = build_trainer(_config(tiny_model_dir, tmp_path, sampling={"temperature": 0.05},
                                    algorithm={"loss": "dapo", "dynamic_sampling": True, "max_sampling_rounds": 1,
                                               "kl_beta": 0.1}))
    trainer.fit()
    (row,) = _rows(trainer)
    assert row["backward_rows"] == 0 and row["optimizer_steps"] == 0
    assert row["entropy"] is None and row["pos_peak_frac"] is None and row["pos_peak_count"] == 0
    assert "kl_ref" in row and row["kl_ref"] is None and row["grad_norm"] is None


def test_a_resumed_run_keeps_the_precision_it_started_with(tiny_model_dir, tmp_path, monkeypatch):
    import wapo.trainer as trainer_module

    config = _config(tiny_model_dir, tmp_path, model={"bf16": "auto", "bf16_sampling": "auto"}, run={"steps": 1})
    monkeypatch.setattr(trainer_module, "native_bf16", lambda device: True)
    first = build_trainer(config)
    first.fit()
    monkeypatch.setattr(trainer_module, "native_bf16", lambda device: False)  # other hardware
    resumed = build_trainer(cfg.from_dict({"run": {"steps": 2}}, config), resume=first.run_dir)
    assert resumed.precision == first.precision == Precision(True, True, "trainer")


def test_the_skipped_rows_taxonomy_from_sampling_equals_a_trainer_pass(tiny_model_dir, tmp_path, monkeypatch):
    # WAPO leaves its losers out of the backward pass; their taxonomy now comes from the sampler
    # (no extra pass). On a float32 sampler it must equal the no-grad trainer pass it replaced.
    from wapo.batch import RolloutBatch

    rows = {}
    for source in ("sampler", "trainer pass"):
        if source == "trainer pass":
            monkeypatch.setattr(RolloutBatch, "recorded_stats", lambda self, rows: None)
        trainer = build_trainer(_config(tiny_model_dir, tmp_path / source.replace(" ", "-"), run={"seed": 3}))
        trainer.fit()
        rows[source] = _rows(trainer)[0]
    a, b = rows["sampler"], rows["trainer pass"]
    assert a["skipped_rows"] > 0 and a["neg_peak_count"] + a["neg_valley_count"] > 0  # losers were binned
    for key, value in b.items():
        if key.endswith(("_count",)):
            assert a[key] == value, key
        elif key.endswith(("_frac", "_pred_dentropy")) or key == "entropy":
            assert a[key] == (None if value is None else pytest.approx(value, rel=1e-4, abs=1e-6)), key
