"""PPO mini-batches (`algorithm.mini_batches`): slices of whole groups, each its own optimizer step.

The update is checked against a hand-run reference in float64 (SGD, one optimizer step per
half of the batch, each half's loss divided by its own normaliser, π_old from the policy before
the update), written independently of the trainer's chunked pass.
"""

from __future__ import annotations

import copy
import json
from functools import partial

import pytest
import torch

import wapo.update as update_module
from wapo import config as cfg
from wapo.batch import RolloutBatch, row_token_stats
from wapo.diagnostics import UpdateDiagnostics
from wapo.losses import policy_loss
from wapo.trainer import build_trainer
from wapo.update import UpdateSettings, group_slices, update_policy

G, L = 2, 5  # group size, token budget


# ------------------------------------------------------------------------------------------
# Slicing
# ------------------------------------------------------------------------------------------


def test_slices_are_whole_groups_in_batch_order_as_even_as_possible():
    # 5 groups of 4 rows in 2 slices: 3 + 2 groups; in 3 slices: 2 + 2 + 1
    assert group_slices(20, 4, 2) == [list(range(0, 12)), list(range(12, 20))]
    assert group_slices(20, 4, 3) == [list(range(0, 8)), list(range(8, 16)), list(range(16, 20))]
    assert group_slices(20, 4, 1) == [list(range(20))]
    assert group_slices(8, 4, 4) == [list(range(4)), list(range(4, 8))]  # fewer groups than slices
    assert group_slices(0, 4, 2) == []
    with pytest.raises(ValueError, match="group_size 4 must divide the batch's 10 rows"):
        group_slices(10, 4, 2)


def test_mini_batches_are_validated_against_the_groups_a_step_samples():
    with pytest.raises(cfg.ConfigError, match="--mini-batches must be >= 1"):
        cfg.from_dict({"algorithm": {"mini_batches": 0}})
    with pytest.raises(cfg.ConfigError, match=r"--mini-batches \(9\) must be <= --prompts-per-step \(8\)"):
        cfg.from_dict({"algorithm": {"mini_batches": 9}})
    assert cfg.from_dict({"algorithm": {"mini_batches": 4}, "sampling": {"prompts_per_step": 4}}).algorithm.mini_batches == 4


# ------------------------------------------------------------------------------------------
# The update against a hand-run reference (float64, SGD)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model64(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    return model.train().requires_grad_(True)


def _batch(advantages) -> RolloutBatch:
    """4 groups of G = 2 rows; lengths differ so the token-count normalisers of the halves differ.
    Row 3's position 1 is an environment token (mask 0). μ is θ0's log-probabilities minus 0.1·i
    per row i, filled in by `_with_mu`."""
    gen = torch.Generator().manual_seed(0)
    prompts = [[2, 3, 4], [5, 6], [7, 8, 9, 10], [11]]
    lengths = [5, 2, 4, 3, 1, 5, 3, 2]
    ids = torch.randint(2, 70, (8, L), generator=gen)
    mask = torch.arange(L) < torch.tensor(lengths).unsqueeze(-1)
    ids[~mask] = 0
    mask[3, 1] = False
    return RolloutBatch([prompts[i // G] for i in range(8)], ids, mask, torch.zeros(8, L, dtype=torch.float64),
                        torch.tensor(advantages, dtype=torch.float64), lengths)


def _logp(model, batch: RolloutBatch, rows: list[int]) -> torch.Tensor:
    """(len(rows), L) log-probabilities of the sampled tokens, one full sequence per row (no padding)."""
    out = torch.zeros(len(rows), L, dtype=torch.float64)
    for r, i in enumerate(rows):
        p, n = batch.prompt_ids[i], batch.lengths[i]
        seq = torch.tensor(p + batch.completion_ids[i, :n].tolist())
        logits = model(input_ids=seq.unsqueeze(0)).logits[0, len(p) - 1: len(p) - 1 + n]
        out[r, :n] = logits.log_softmax(-1).gather(-1, seq[len(p):].unsqueeze(-1)).squeeze(-1)
    return out * batch.mask[rows]


def _with_mu(model, batch):
    with torch.no_grad():
        batch.old_logprobs = _logp(model, batch, list(range(8))) - 0.1 * torch.arange(8).unsqueeze(-1) * batch.mask
    return batch


def _reference(model, batch, loss, *, against, k, epochs, lr, max_norm, kl_beta=0.0, reference=None):
    """k SGD steps per epoch on k slices of whole groups, each loss over its own rows with the
    objective's own normaliser (its default: D of the rows it is given), π_old before any step;
    with `kl_beta`, plus β·Σ k3 / (the slice's model tokens), k3 = exp(d) − d − 1, d = logπ_ref − logπ."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr)
    with torch.no_grad():
        old = _logp(model, batch, list(range(8))) if against == "trainer" else batch.old_logprobs
    half = len(batch) // k
    for _ in range(epochs):
        for rows in [list(range(j * half, (j + 1) * half)) for j in range(k)]:
            opt.zero_grad()
            logp, m = _logp(model, batch, rows), batch.mask[rows]
            out = policy_loss(loss, logp, old[rows], batch.advantages[rows], m, max_len=L, group_size=G)
            total = out.loss
            if kl_beta:
                with torch.no_grad():
                    ref = _logp(reference, batch, rows)
                d = ref - logp
                total = total + kl_beta * ((d.exp() - d - 1) * m).sum() / m.sum()
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            opt.step()
    return model


def _run(model, batch, loss, *, against, k, epochs, lr, max_norm, micro=3, kl_beta=0.0, reference=None, **options):
    model = copy.deepcopy(model)
    params = list(model.parameters())
    settings = UpdateSettings(loss=loss, loss_kwargs={"max_len": L, "group_size": G, **options}, ratio_against=against,
                              updates_per_batch=epochs, mini_batches=k, micro_batch_size=micro, max_grad_norm=max_norm,
                              kl_beta=kl_beta)
    stats = partial(row_token_stats, model, batch, temperature=1.0, chunk_size=4)
    reference_logp = None
    if reference is not None:
        def reference_logp(rows):
            with torch.no_grad():
                return row_token_stats(reference, batch, rows, temperature=1.0, chunk_size=4).logp
    result = update_policy(batch, settings, optimizer=torch.optim.SGD(params, lr=lr), params=params, token_stats=stats,
                           reference_logp=reference_logp)
    return model, result


ADVANTAGES = [0.5, -0.5, 1.0, -1.0, 0.25, -0.25, 0.0, 0.0]  # a winner in each half


@pytest.mark.parametrize("loss", ["wapo", "dapo", "grpo"])
@pytest.mark.parametrize("against", ["trainer", "sampler"])
@pytest.mark.parametrize(("k", "epochs"), [(1, 1), (2, 1), (2, 2)])
def test_each_mini_batch_is_one_step_on_its_own_normaliser_from_the_pre_update_policy(model64, loss, against, k,
                                                                                      epochs):
    batch = _with_mu(model64, _batch(ADVANTAGES))
    kw = dict(against=against, k=k, epochs=epochs, lr=0.5, max_norm=0.3)
    expected = _reference(model64, batch, loss, **kw)
    got, result = _run(model64, batch, loss, **kw)
    assert result.metrics["optimizer_steps"] == k * epochs
    moved = sum((a - b).norm() ** 2 for a, b in zip(expected.parameters(), model64.parameters())) ** 0.5
    assert moved > 1e-2  # the steps are large enough for a wrong normaliser or π_old to show
    for (name, a), b in zip(got.named_parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference64(model64):
    """A KL reference away from the policy (θ0 + noise), so the penalty's gradient is first order from step 1."""
    reference = copy.deepcopy(model64).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return reference


@pytest.mark.parametrize("loss", ["wapo", "dapo"])
@pytest.mark.parametrize(("k", "epochs"), [(1, 1), (2, 1), (2, 2)])
def test_the_kl_penalty_of_each_mini_batch_is_a_token_mean_over_its_own_tokens(model64, reference64, loss, k, epochs):
    # the halves' model tokens differ (13 and 12 with row 3's environment token out), so a
    # whole-batch token count (25) as the KL normaliser would miss the reference
    batch = _with_mu(model64, _batch(ADVANTAGES))
    kw = dict(against="trainer", k=k, epochs=epochs, lr=0.5, max_norm=0.3, kl_beta=0.5, reference=reference64)
    expected = _reference(model64, batch, loss, **kw)
    got, result = _run(model64, batch, loss, **kw)
    assert result.metrics["optimizer_steps"] == k * epochs and result.metrics["backward_rows"] == 8
    without_kl = _reference(model64, batch, loss, **{**kw, "kl_beta": 0.0})
    assert max((a - b).abs().max() for a, b in zip(expected.parameters(), without_kl.parameters())) > 1e-3
    for (name, a), b in zip(got.named_parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_a_whole_batch_normaliser_would_have_been_caught(model64):
    # the reference above with DAPO's D taken over both halves (k = 2): far from the update
    batch = _with_mu(model64, _batch(ADVANTAGES))
    got, _ = _run(model64, batch, "dapo", against="trainer", k=2, epochs=1, lr=0.5, max_norm=1e9)
    whole = batch.mask.sum().double()
    model = copy.deepcopy(model64)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.no_grad():
        old = _logp(model, batch, list(range(8)))
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        opt.zero_grad()
        policy_loss("dapo", _logp(model, batch, rows), old[rows], batch.advantages[rows], batch.mask[rows],
                    max_len=L, group_size=G, normalizer=whole).loss.backward()
        opt.step()
    gap = max((a - b).abs().max().item() for a, b in zip(got.parameters(), model.parameters()))
    assert gap > 1e-4


def test_pi_old_of_the_second_mini_batch_is_the_pre_update_policy(model64, monkeypatch):
    batch = _with_mu(model64, _batch(ADVANTAGES))
    with torch.no_grad():
        before = _logp(model64, batch, list(range(8)))
    calls, real = [], update_module.policy_loss

    def spy(name, logp, old, adv, mask, **kw):
        calls.append((logp.detach().clone(), old.clone(), mask.clone()))
        return real(name, logp, old, adv, mask, **kw)

    monkeypatch.setattr(update_module, "policy_loss", spy)
    monkeypatch.setattr(update_module.RolloutBatch, "micro_batches", lambda self, rows, size: [sorted(rows)])
    _run(model64, batch, "grpo", against="trainer", k=2, epochs=1, lr=0.5, max_norm=1e9)
    (logp1, old1, m1), (logp2, old2, m2) = calls
    assert torch.equal(old1[m1], logp1[m1])  # the first mini-batch's ratio is exactly 1
    # the second's is the pre-update policy's (rows 4, 5: rows 6, 7 have A = 0, no gradient under GRPO);
    # 1e-6: the chunked shared-prompt pass against full sequences (rotary tables stay float32)
    torch.testing.assert_close(old2, before[[4, 5]], rtol=0, atol=1e-6)
    assert (logp2[m2] - old2[m2]).abs().max() > 1e-4  # one optimizer step later π moved: ρ ≠ 1


def test_loss_metrics_count_every_mini_batch_of_the_last_epoch(model64):
    # GRPO (ε = 0.1), k = 2, one epoch, against the trainer: slice 1 (rows 0-3, 13 model tokens)
    # has ρ = 1 exactly; slice 2's trained rows 4 (A > 0, 1 token) and 5 (A < 0, 5 tokens) are
    # first reached after slice 1's SGD step, so their ρ = π_θ1/π_θ0 is taken from a float64 step
    batch = _with_mu(model64, _batch(ADVANTAGES))
    _, result = _run(model64, batch, "grpo", against="trainer", k=2, epochs=1, lr=2.5, max_norm=1e9, eps=0.1)
    model = copy.deepcopy(model64)
    with torch.no_grad():
        before = _logp(model, batch, [0, 1, 2, 3, 4, 5])
    policy_loss("grpo", _logp(model, batch, [0, 1, 2, 3]), before[:4], batch.advantages[:4], batch.mask[:4],
                max_len=L, group_size=G, eps=0.1).loss.backward()
    torch.optim.SGD(model.parameters(), lr=2.5).step()
    with torch.no_grad():
        ratio = (_logp(model, batch, [4, 5]) - before[4:]).exp()
    r4, r5 = ratio[0][batch.mask[4]], ratio[1][batch.mask[5]]
    # row 4: ρ = 1.18 > 1 + ε, clipped; row 5: ρ = 1.05, 0.62, 0.96, 0.95, 0.70, two below 1 − ε
    assert r4.numel() == 1 and r4.item() > 1.15 and r5.numel() == 5 and int((r5 < 0.9).sum()) == 2
    metrics = result.metrics
    # positive tokens: rows 0, 2 (5 + 4, ρ = 1) and 4 (1): 1 of 10 clipped; negative: rows 1, 3
    # (2 + 2, ρ = 1) and 5 (5): 2 of 9
    assert metrics["clip_frac_pos"] == pytest.approx(1 / 10) and metrics["clip_frac_neg"] == pytest.approx(2 / 9)
    ratios = torch.cat([torch.ones(13, dtype=torch.float64), r4, r5])
    assert metrics["ratio_mean"] == pytest.approx(ratios.mean().item(), rel=1e-5)  # (13 + Σρ) / 19
    assert metrics["ratio_min"] == pytest.approx(ratios.min().item(), rel=1e-5)  # row 5's 0.62
    assert metrics["ratio_max"] == pytest.approx(ratios.max().item(), rel=1e-5)  # row 4's 1.18
    # the 3 clipped tokens carry no gradient; row 4 had only one
    assert metrics["grad_rows"] == 5 and metrics["grad_tokens"] == 19 - 3


def test_every_row_is_diagnosed_once_before_any_optimizer_step(model64, monkeypatch):
    batch = _with_mu(model64, _batch(ADVANTAGES))
    summaries = {}
    for against in ("trainer", "sampler"):
        for k in (1, 2):
            added, real_add = [], UpdateDiagnostics.add_stats
            steps = {"n": 0}

            def add(self, rows, stats, _added=added, _real=real_add, _steps=steps):
                _added.append((list(rows), _steps["n"]))
                return _real(self, rows, stats)

            monkeypatch.setattr(UpdateDiagnostics, "add_stats", add)
            monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, _s=steps, _r=torch.optim.SGD.step, **kw:
                                (_s.__setitem__("n", _s["n"] + 1), _r(self, *a, **kw))[1])
            _, result = _run(model64, batch, "wapo", against=against, k=k, epochs=2, lr=0.5, max_norm=1e9)
            monkeypatch.undo()
            rows = sorted(i for part, _ in added for i in part)
            assert rows == list(range(8)), (against, k)  # every row once
            assert all(n == 0 for _, n in added)  # ... from the policy before any optimizer step
            summaries[against, k] = result.metrics
    # so the taxonomy is the same whether the batch is cut or not (one policy, one set of rows)
    for against in ("trainer", "sampler"):
        one, two = summaries[against, 1], summaries[against, 2]
        for key in one:
            if key.endswith(("_count", "_frac", "_pred_dentropy")) or key == "entropy":
                assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12, nan_ok=True), key
    # against the trainer the second half's mismatch to μ is measured too: μ = θ0 − 0.1·i, so
    # |log π_old − log μ| = 0.1·i averaged over the trained tokens of both halves: winners 0, 2, 4
    # with 5, 4, 1 tokens, (0·5 + 0.2·4 + 0.4·1) / 10 = 0.12 (the first half alone: 0.8 / 9 = 0.089)
    assert summaries["trainer", 2]["mismatch_abs_logp"] == pytest.approx(0.12, rel=1e-5)


def test_a_mini_batch_without_a_gradient_row_steps_on_zero_gradients_and_grad_norms_are_first_and_max(
        model64, monkeypatch):
    # WAPO: the second half has no winner; with k = 2 and 2 epochs all 4 steps are taken, the
    # second half's on zero gradients (norm 0)
    batch = _with_mu(model64, _batch([0.5, -0.5, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0]))
    norms, real = [], torch.nn.utils.clip_grad_norm_

    def clip(params, max_norm):
        norms.append(real(params, max_norm).item())
        return torch.tensor(norms[-1], dtype=torch.float64)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    _, result = _run(model64, batch, "wapo", against="trainer", k=2, epochs=2, lr=0.5, max_norm=1e9)
    m = result.metrics
    assert m["optimizer_steps"] == 4 == len(norms) and m["backward_rows"] == 2
    assert norms[1] == norms[3] == 0.0 and norms[0] > 0 and norms[2] > 0
    assert norms[0] != norms[2]  # the second epoch's gradient, after a step, differs
    assert (m["grad_norm"], m["grad_norm_max"]) == (norms[0], max(norms))


def _adamw_run(model, batches, *, k, skip):
    """WAPO against the trainer, 2 epochs of k mini-batches on each batch in turn, one AdamW (with
    weight decay) throughout; the weights after each batch, and its optimizer steps."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    settings = UpdateSettings(loss="wapo", loss_kwargs={"max_len": L, "group_size": G}, ratio_against="trainer",
                              updates_per_batch=2, mini_batches=k, micro_batch_size=3, skip_zero_gradient_rows=skip)
    after, steps = [], []
    for batch in batches:
        stats = partial(row_token_stats, model, batch, temperature=1.0, chunk_size=4)
        result = update_policy(batch, settings, optimizer=optimizer, params=params, token_stats=stats)
        after.append([p.detach().clone() for p in params])
        steps.append(result.metrics["optimizer_steps"])
    return after, steps


@pytest.mark.parametrize(("k", "second"), [(1, [0.0] * 8), (2, [0.5, -0.5, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0])])
def test_skipping_rows_without_gradient_leaves_the_weights_as_with_every_row_in_the_backward_pass(model64, k, second):
    # The first batch gives AdamW momentum; in the second a mini-batch has no winner (k = 1: the
    # whole batch). With every row in the backward pass that mini-batch's gradient is exactly 0 and
    # AdamW still steps (momentum, weight decay); skipping its rows must step the same way.
    batches = [_with_mu(model64, _batch(ADVANTAGES)), _with_mu(model64, _batch(second))]
    skipped, steps = _adamw_run(model64, batches, k=k, skip=True)
    all_rows, steps_all_rows = _adamw_run(model64, batches, k=k, skip=False)
    for a, b in zip(skipped[1], all_rows[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert steps == steps_all_rows == [2 * k, 2 * k]
    # the steps on zero gradients moved the weights (a dropped step would be ~1e-2 away)
    assert max((a - b).abs().max() for a, b in zip(skipped[1], skipped[0])) > 1e-3


def test_fewer_groups_than_mini_batches_is_one_mini_batch_per_group_with_a_warning(model64):
    batch = _with_mu(model64, _batch(ADVANTAGES))
    with pytest.warns(UserWarning, match="the batch holds 4 groups, fewer than mini_batches = 6"):
        _, result = _run(model64, batch, "grpo", against="trainer", k=6, epochs=1, lr=0.5, max_norm=1e9)
    # one step per group: group 4 (rows 6, 7: A = 0) trains nothing under GRPO, its step is on zero gradients
    assert result.metrics["optimizer_steps"] == 4


# ------------------------------------------------------------------------------------------
# In the trainer
# ------------------------------------------------------------------------------------------


def test_the_trainer_takes_updates_times_mini_batches_adam_steps(tiny_model_dir, tmp_path):
    config = cfg.from_dict({
        "model": {"model": tiny_model_dir, "bf16": "false", "bf16_sampling": "false"},
        "env": {"env": "test_digit"},
        "sampling": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 4, "temperature": 3.0},
        "algorithm": {"loss": "grpo", "mini_batches": 2, "updates_per_batch": 2, "kl_beta": 0.1},
        "optim": {"micro_batch_size": 3},
        "run": {"steps": 1, "eval_size": 0, "progress": False, "output_dir": str(tmp_path / "run"), "seed": 1},
    })
    trainer = build_trainer(config)
    trainer.fit()
    (row,) = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    # (with the KL penalty every row trains; a slice of all-equal groups at the reference has gradient 0)
    assert row["optimizer_steps"] == 4 and row["grad_norm_max"] >= row["grad_norm"] >= 0 and row["grad_norm_max"] > 0
    state = trainer.optimizer.state_dict()["state"]
    assert {s["step"].item() for s in state.values()} == {4.0}
    assert row["lr"] == config.optim.lr  # the schedule steps once per trainer step


def test_both_options_are_flags_of_wapo_train():
    import argparse

    parser = argparse.ArgumentParser()
    cfg.add_flags(parser)
    args = parser.parse_args(["--mini-batches", "4", "--sampler-lag", "1", "--prompts-per-step", "4"])
    config = cfg.from_dict(cfg.overrides_from_args(args))
    assert (config.algorithm.mini_batches, config.algorithm.sampler_lag) == (4, 1)
