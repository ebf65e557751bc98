"""The "wapo" estimator and policy loss in verl's real registries (verl 0.9.1), against wapo's core.

Skipped when verl is not installed: `make test-verl` builds an environment with it (verl pins
its own transformers, so it gets its own virtual environment).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import wapo  # noqa: E402
from wapo.integrations.verl import TESTED_VERL, taxonomy_metrics  # noqa: E402

L = 6  # padded response length = WAPO's L here


def _config(**kwargs) -> ActorConfig:
    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, clip_ratio_high=9.0, **kwargs)


def test_verl_version_is_the_tested_one():
    assert verl.__version__ == TESTED_VERL


def test_wapo_advantage_is_the_group_mean_of_the_core_and_of_verls_dr_grpo():
    estimator = core_algos.get_adv_estimator_fn("wapo")
    # groups "a" and "b" interleaved (verl's uid need not be adjacent); reward on the last token
    index = np.array(["a", "b", "a", "b", "a", "b", "a", "b"], dtype=object)
    rewards = torch.tensor([1.0, 0, 0, 0, 0, 0, 1, 1])
    lengths = torch.tensor([3, 6, 1, 4, 6, 2, 5, 6])
    mask = (torch.arange(L) < lengths.unsqueeze(-1)).float()
    token_rewards = torch.zeros(8, L)
    token_rewards[torch.arange(8), lengths - 1] = rewards
    adv, returns = estimator(token_level_rewards=token_rewards, response_mask=mask, index=index, config=None)
    # group a: r = 1, 0, 0, 1 (mean 0.5) -> ±0.5; group b: r = 0, 0, 0, 1 (mean 0.25) -> -0.25, 0.75
    per_row = torch.tensor([0.5, -0.25, -0.5, -0.25, -0.5, -0.25, 0.5, 0.75])
    torch.testing.assert_close(adv, per_row.unsqueeze(-1) * mask)
    torch.testing.assert_close(returns, adv)
    core = wapo.compute_advantages("group_mean", rewards.view(4, 2).T.flatten(), 4).view(2, 4).T.flatten()
    torch.testing.assert_close(per_row, core)
    verl_dr_grpo, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index,
                                                                norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(adv, verl_dr_grpo)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 2, 5, 1, 4, 6, 3, 6])
    mask = torch.arange(L) < lengths.unsqueeze(-1)
    row_adv = torch.tensor([0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75])  # winners: rows 0, 3, 7
    logp = (-torch.rand(8, L, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(8, L, generator=g, dtype=torch.float64)
    old[0, :2] = logp.detach()[0, :2] - 3.0  # ρ = e³ ≈ 20: above WAPO's cap of 10
    return logp, old, row_adv.double(), mask


def _wapo_per_token(logp, old, row_adv, mask):
    """WAPO's ℓ by hand: −A·min(ρ, 10) on winners' tokens, 0 elsewhere."""
    ratio = torch.exp(torch.where(mask, logp - old, torch.zeros_like(logp)))
    a = row_adv.unsqueeze(-1)
    return torch.where((a > 0) & mask, -a * ratio.clamp(max=10.0), torch.zeros_like(logp))


MODES = ["seq-mean-token-sum-norm", "token-mean", "seq-mean-token-sum", "token-sum", "seq-mean-token-mean"]
GLOBAL = {"dp_size": 2, "global_batch_size": 16, "batch_num_tokens": 70, "loss_scale_factor": 8}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("global_info", [False, True], ids=["local", "dp2"])
def test_policy_loss_equals_verls_own_aggregation_of_wapos_per_token_loss(mode, global_info):
    """verl's real `agg_loss` on WAPO's per-token term is the reference for every aggregation mode."""
    logp, old, row_adv, mask = _batch()
    config = _config(loss_agg_mode=mode)
    info = dict(GLOBAL) if global_info else {}
    config.global_batch_info.update(info)
    fn = core_algos.get_policy_loss_fn("wapo")
    loss, metrics = fn(old_log_prob=old, log_prob=logp, advantages=row_adv.unsqueeze(-1) * mask,
                       response_mask=mask, loss_agg_mode=mode, config=config, rollout_is_weights=None)
    (grad,) = torch.autograd.grad(loss, logp)
    reference = core_algos.agg_loss(_wapo_per_token(logp, old, row_adv, mask), mask, mode, **info)
    (expected,) = torch.autograd.grad(reference, logp)
    print(f"\n{mode} ({'dp2' if global_info else 'local'}): |Δloss| = {abs((loss - reference).item()):.1e}, "
          f"max |Δgrad| = {float((grad - expected).abs().max()):.1e}")
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert metrics["actor/pg_clipfrac"] > 0  # row 0's first two tokens are capped


def test_seq_mean_token_sum_norm_is_wapos_b_times_l_and_token_mean_its_token_normaliser():
    logp, old, row_adv, mask = _batch(seed=1)
    fn = core_algos.get_policy_loss_fn("wapo")
    adv = row_adv.unsqueeze(-1) * mask
    loss, _ = fn(old, logp, adv, mask, "seq-mean-token-sum-norm", _config(loss_scale_factor=L), None)
    core = wapo.policy_loss("wapo", logp, old, row_adv, mask, max_len=L)  # Σℓ / (B·L), B = 8
    torch.testing.assert_close(loss, core.loss, rtol=1e-12, atol=1e-12)
    (g1,) = torch.autograd.grad(loss, logp)
    (g2,) = torch.autograd.grad(core.loss, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    token_mean, _ = fn(old, logp, adv, mask, "token-mean", _config(), None)
    core = wapo.policy_loss("wapo", logp, old, row_adv, mask, max_len=L, normalizer=mask.sum())
    torch.testing.assert_close(token_mean, core.loss, rtol=1e-12, atol=1e-12)


def test_rollout_correction_weights_multiply_the_per_token_loss_as_in_verls_vanilla():
    logp, old, row_adv, mask = _batch(seed=2)
    w = torch.rand(logp.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    w[3, 0] = 0.0  # a token rollout correction rejected
    fn = core_algos.get_policy_loss_fn("wapo")
    loss, _ = fn(old, logp, row_adv.unsqueeze(-1) * mask, mask, "token-mean", _config(), w)
    (grad,) = torch.autograd.grad(loss, logp)
    reference = core_algos.agg_loss(_wapo_per_token(logp, old, row_adv, mask) * w, mask, "token-mean")
    (expected,) = torch.autograd.grad(reference, logp)
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_token_varying_advantages_are_refused():
    logp, old, row_adv, mask = _batch()
    gae_like = torch.randn(logp.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="one advantage per response"):
        core_algos.get_policy_loss_fn("wapo")(old, logp, gae_like, mask, "token-mean", _config(), None)


def _taxonomy_batch():
    # row 0 (A = +1): p = 0.9 ≥ C = 0.82 peak; p = 0.2 < 0.5 valley; p = 0.5 ≥ 0.5 peak
    # row 1 (A = −1): p = 0.1 < 0.3 valley; p = 0.6 ≥ 0.4 peak; third token is padding
    p = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.6, 0.9]])
    return {"old_log_probs": p.log(), "sum_pi_squared": torch.tensor([[0.82, 0.5, 0.5], [0.3, 0.4, 0.1]]),
            "advantages": torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]]),
            "response_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}


def test_taxonomy_metrics_from_sum_pi_squared():
    m = taxonomy_metrics(_taxonomy_batch())
    # 5 tokens: pos_peak 2, pos_valley 1, neg_peak 1, neg_valley 1
    assert (m["taxonomy/pos_peak_count"], m["taxonomy/pos_valley_count"], m["taxonomy/neg_peak_count"],
            m["taxonomy/neg_valley_count"], m["taxonomy/zero_count"]) == (2, 1, 1, 1, 0)
    assert m["taxonomy/pos_peak_frac"] == pytest.approx(2 / 5)
    assert taxonomy_metrics({"old_log_probs": torch.zeros(1, 1)}) == {}  # no sum_pi_squared: nothing


def test_verls_step_metrics_carry_the_taxonomy():
    from verl import DataProto
    from verl.trainer.ppo import metric_utils

    batch = DataProto.from_single_dict(_taxonomy_batch())
    metrics = metric_utils.compute_variance_proxy_metrics(batch=batch, gradient_norm=1.0)
    assert metrics["taxonomy/pos_peak_count"] == 2
    assert any(key.startswith("variance_proxy") or not key.startswith("taxonomy/") for key in metrics)


def test_verl_loads_the_module_through_verl_use_external_modules():
    code = ("from verl.trainer.ppo import core_algos as c; "
            "print(c.get_policy_loss_fn('wapo').__module__, c.get_adv_estimator_fn('wapo').__module__)")
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "wapo.integrations.verl", "VERL_USE_EXTERNAL_PLUGINS": "none"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["wapo.integrations.verl", "wapo.integrations.verl"]


def _documented_launch_overrides():
    """The `key=value` overrides of the verl launch in docs/integrations.md."""
    text = (Path(__file__).parents[2] / "docs" / "integrations.md").read_text()
    block = text[text.index("VERL_USE_EXTERNAL_MODULES=wapo.integrations.verl python -m verl.trainer.main_ppo"):]
    lines = block[: block.index("```")].splitlines()[1:]
    return [shlex.split(line.rstrip(" \\"))[0] for line in lines if line.strip()]


def test_the_documented_launch_fits_verls_config():
    """Every override of the documented launch names a key of verl's own ppo_trainer config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = _documented_launch_overrides()
    assert "actor_rollout_ref.actor.policy_loss.loss_mode=wapo" in overrides
    assert "algorithm.adv_estimator=wapo" in overrides
    config_dir = Path(verl.__file__).parent / "trainer" / "config"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)  # unknown keys raise here
    actor = config.actor_rollout_ref.actor
    assert actor.clip_ratio_high == 9.0 and actor.loss_agg_mode == "seq-mean-token-sum-norm"
    assert OmegaConf.select(config, "actor_rollout_ref.actor.loss_scale_factor") == config.data.max_response_length
    assert actor.calculate_sum_pi_squared is True
    assert config.data.train_batch_size == actor.ppo_mini_batch_size  # one optimizer step per batch
