"""Objectives on hand-worked tensors: values, gradients, reductions, masking invariance."""

import math

import pytest
import torch

import wapo
from wapo.losses import normalizer


def _inputs(logprobs, ratios, mask):
    """logπ as a leaf, logμ = logπ − log ρ so that exp(logπ − logμ) = ρ exactly."""
    logprobs = torch.tensor(logprobs, dtype=torch.float64, requires_grad=True)
    old = (logprobs - torch.tensor(ratios, dtype=torch.float64).log()).detach()
    return logprobs, old, torch.tensor(mask, dtype=torch.bool)


def _grad(out, logprobs):
    (g,) = torch.autograd.grad(out.loss, logprobs)
    return g


def test_wapo_hand_worked():
    # B=4 rows in groups of G=2, T=3, L=4. rewards [1,0,1,1] -> group_mean A = [0.5,-0.5,0,0]
    adv = wapo.compute_advantages("group_mean", torch.tensor([1.0, 0, 1, 1]), 2).double()
    logprobs, old, mask = _inputs(
        [[-1.0, -2, -3], [-1, -1, -1], [-2, -2, -2], [-1, -1, -1]],
        [[1.0, 2, 12], [3, 0.1, 5], [2, 2, 2], [1, 1, 1]],
        [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]],
    )
    out = wapo.policy_loss("wapo", logprobs, old, adv, mask, max_len=4, group_size=2)
    # winner row 0: -0.5 * min(rho, 10) = -0.5 * [1, 2, 10] -> sum -6.5; B*L = 16 -> -0.40625
    assert out.loss.item() == pytest.approx(-6.5 / 16)
    # gradient -A*rho/(B*L) below the cap, 0 above it, 0 on losers and zero-advantage rows
    expected = torch.zeros(4, 3, dtype=torch.float64)
    expected[0] = torch.tensor([-0.5 * 1 / 16, -0.5 * 2 / 16, 0.0])
    torch.testing.assert_close(_grad(out, logprobs), expected)
    assert out.metrics["grad_rows"].item() == 1 and out.metrics["grad_tokens"].item() == 2
    assert out.metrics["clip_frac_pos"].item() == pytest.approx(1 / 3)  # 12 > 10 on one of 3
    assert out.metrics["clip_frac_neg"].item() == 0
    assert out.metrics["ratio_max"].item() == pytest.approx(12)

    contributing = wapo.policy_loss("wapo", logprobs, old, adv, mask, max_len=4, group_size=2,
                                    denominator="contributing")
    # one group of two has a winner: 1 * G * L = 8 -> -6.5 / 8
    assert contributing.loss.item() == pytest.approx(-6.5 / 8)


def test_wapo_eps_high_moves_the_cap():
    logprobs, old, mask = _inputs([[-1.0, -1]], [[1.5, 3.0]], [[1, 1]])
    out = wapo.policy_loss("wapo", logprobs, old, torch.tensor([1.0]), mask, max_len=2, eps_high=1.0)
    # -1 * [min(1.5, 2), min(3, 2)] = -3.5, / (1*2) = -1.75; gradient only on the first token
    assert out.loss.item() == pytest.approx(-1.75)
    torch.testing.assert_close(_grad(out, logprobs), torch.tensor([[-1.5 / 2, 0.0]], dtype=torch.float64))


def _two_rows():
    # row 0: A=+1, rho=[1.5, 0.9], both tokens; row 1: A=-1, rho=[0.5, 1.1], second token masked
    logprobs, old, mask = _inputs([[-1.0, -2], [-0.5, -3]], [[1.5, 0.9], [0.5, 1.1]], [[1, 1], [1, 0]])
    return logprobs, old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask


def test_grpo_hand_worked():
    logprobs, old, adv, mask = _two_rows()
    out = wapo.policy_loss("grpo", logprobs, old, adv, mask, max_len=4)
    # row 0: -min(1.5, 1.2) = -1.2, -min(0.9, 0.9) = -0.9 -> mean -1.05
    # row 1: -min(-0.5, -0.8) = 0.8 (clipped)                -> mean 0.8
    # (-1.05 + 0.8) / 2 = -0.125
    assert out.loss.item() == pytest.approx(-0.125)
    # only row 0 token 1 is unclipped: -A*rho/(|o|*B) = -0.9/4
    torch.testing.assert_close(_grad(out, logprobs), torch.tensor([[0, -0.225], [0, 0]], dtype=torch.float64))
    assert out.metrics["clip_frac_pos"].item() == pytest.approx(0.5)
    assert out.metrics["clip_frac_neg"].item() == pytest.approx(1.0)
    assert out.metrics["grad_tokens"].item() == 1


def test_dr_grpo_hand_worked():
    logprobs, old, adv, mask = _two_rows()
    out = wapo.policy_loss("dr_grpo", logprobs, old, adv, mask, max_len=4)
    # (-1.2 - 0.9 + 0.8) / (B*L = 8) = -0.1625
    assert out.loss.item() == pytest.approx(-1.3 / 8)
    torch.testing.assert_close(_grad(out, logprobs), torch.tensor([[0, -0.9 / 8], [0, 0]], dtype=torch.float64))


def test_dapo_hand_worked():
    logprobs, old, adv, mask = _two_rows()
    out = wapo.policy_loss("dapo", logprobs, old, adv, mask, max_len=4)
    # -min(1.5, 1.28) = -1.28; -0.9; -min(-0.5, -0.8) = 0.8 -> -1.38 / 3 tokens = -0.46
    assert out.loss.item() == pytest.approx(-0.46)
    torch.testing.assert_close(_grad(out, logprobs), torch.tensor([[0, -0.3], [0, 0]], dtype=torch.float64))


def test_gspo_hand_worked():
    logprobs, old, adv, mask = _two_rows()
    out = wapo.policy_loss("gspo", logprobs, old, adv, mask, max_len=4)
    # s0 = exp(mean(log 1.5, log 0.9)) = sqrt(1.35) = 1.1619 -> clipped to 1.0004: l0 = -1.0004
    # s1 = 0.5 (one token), A=-1: -min(-0.5, -0.9997) = 0.9997; (-1.0004 + 0.9997) / 2
    assert out.loss.item() == pytest.approx((-1.0004 + 0.9997) / 2)
    torch.testing.assert_close(_grad(out, logprobs), torch.zeros(2, 2, dtype=torch.float64))
    assert out.metrics["ratio_max"].item() == pytest.approx(math.sqrt(1.35))

    # on-policy (s = 1): gradient of row i is -A_i * s_i / (|o_i| * B) on each of its tokens
    logprobs, old, mask = _inputs([[-1.0, -2], [-0.5, -3]], [[1.0, 1.0], [1.0, 1.0]], [[1, 1], [1, 0]])
    out = wapo.policy_loss("gspo", logprobs, old, adv, mask, max_len=4)
    assert out.loss.item() == pytest.approx(0.0)  # -(1 - 1) / 2
    torch.testing.assert_close(_grad(out, logprobs), torch.tensor([[-0.25, -0.25], [0.5, 0]], dtype=torch.float64))


def _twin_gradients(losses: tuple[str, str], off_policy_spread: float):
    """(grads[on|off, loss], advantages, mask) of two objectives on one seeded 6 × 5 batch: at ρ = 1
    ("on") and at ρ = exp(spread · N(0, 1)) per token ("off")."""
    torch.manual_seed(0)
    mask = torch.rand(6, 5) < 0.8
    mask[:, 0] = True
    adv = torch.randn(6, dtype=torch.float64)
    values = (-torch.rand(6, 5, dtype=torch.float64)).tolist()
    grads = {}
    for ratios in ("on", "off"):
        rho = torch.ones(6, 5) if ratios == "on" else torch.exp(off_policy_spread * torch.randn(6, 5))
        for loss in losses:
            logprobs, old, m = _inputs(values, rho.tolist(), mask.tolist())
            grads[ratios, loss] = _grad(wapo.policy_loss(loss, logprobs, old, adv, m, max_len=5), logprobs)
    return grads, adv, mask


def test_on_policy_gspo_is_grpo_and_off_policy_it_is_not():
    # at ρ = 1 (one update per batch, the ratio against the trainer) both gradients are
    # −A_i / (|o_i|·B) on each token of row i: the same update, so runs of the two are identical
    # (seen in the math study: every logged number of grpo and gspo cells agrees)
    grads, adv, mask = _twin_gradients(("grpo", "gspo"), 0.05)  # off-policy: inside GRPO's clip
    expected = -adv.unsqueeze(-1) * mask / mask.sum(-1, keepdim=True) / 6
    torch.testing.assert_close(grads["on", "grpo"], expected)
    torch.testing.assert_close(grads["on", "gspo"], expected)
    assert not torch.allclose(grads["off", "grpo"], grads["off", "gspo"])


def test_on_policy_cispo_is_dapo_and_off_policy_it_is_not():
    # at ρ = 1 the weight sg[clip(1)] is 1 and DAPO's surrogate ρ·A has gradient A·∇logπ: both are
    # −A_i / D on each token, D the batch's token count, so with dynamic sampling off (DAPO's
    # default here) the runs are identical (seen in the math study: every logged number of the
    # dapo and cispo cells agrees). Off-policy, a token DAPO clips (ρ > 1.28 with A > 0, ρ < 0.8 with
    # A < 0) loses its gradient there and keeps it in CISPO.
    grads, adv, mask = _twin_gradients(("dapo", "cispo"), 0.5)  # off-policy: many outside DAPO's band
    expected = -adv.unsqueeze(-1) * mask / mask.sum()
    torch.testing.assert_close(grads["on", "dapo"], expected)
    torch.testing.assert_close(grads["on", "cispo"], expected)
    assert not torch.allclose(grads["off", "dapo"], grads["off", "cispo"])


def test_cispo_hand_worked():
    logprobs, old, adv, mask = _two_rows()
    out = wapo.policy_loss("cispo", logprobs, old, adv, mask, max_len=4)
    # -sg[clip(rho, 0, 5)] * A * logp: -1.5*1*(-1) = 1.5; -0.9*1*(-2) = 1.8; -0.5*(-1)*(-0.5) = -0.25
    # (1.5 + 1.8 - 0.25) / 3 = 1.016667; gradient -w*A/3 (the weight is a constant)
    assert out.loss.item() == pytest.approx(3.05 / 3)
    torch.testing.assert_close(_grad(out, logprobs), torch.tensor([[-0.5, -0.3], [0.5 / 3, 0]], dtype=torch.float64))
    capped = wapo.policy_loss("cispo", logprobs, old, adv, mask, max_len=4, eps_high=0.2)
    # weights clip(1.5) -> 1.2: (1.2 + 1.8 - 0.25) / 3
    assert capped.loss.item() == pytest.approx(2.75 / 3)


def test_raft_hand_worked():
    adv = torch.tensor([0.5, -0.5, 0.0, 0.0], dtype=torch.float64)  # group 2 is all equal
    logprobs, old, mask = _inputs([[-1.0, -2, -3], [-1, -1, -1], [-2, -2, -2], [-1, -1, -1]],
                                  [[1.0] * 3] * 4, [[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    out = wapo.policy_loss("raft", logprobs, old, adv, mask, max_len=4)
    # only row 0 (A > 0) is kept: -(-1 - 2 - 3) / 3 tokens = 2
    assert out.loss.item() == pytest.approx(2.0)
    expected = torch.zeros(4, 3, dtype=torch.float64)
    expected[0] = -1 / 3
    torch.testing.assert_close(_grad(out, logprobs), expected)


def test_kl_penalty_estimators():
    logprobs = torch.tensor([[-1.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-2.0, 0.0]])
    mask = torch.tensor([[True, False]])
    # k1 = logp - ref = 1; k3 = exp(ref - logp) - (ref - logp) - 1 = exp(-1) + 1 - 1 = 0.367879
    k1 = wapo.kl_penalty(logprobs, ref, mask, beta=0.1, estimator="k1")
    k3 = wapo.kl_penalty(logprobs, ref, mask, beta=0.1, estimator="k3")
    assert k1.metrics["kl_ref"].item() == pytest.approx(1.0)
    assert k3.metrics["kl_ref"].item() == pytest.approx(math.exp(-1))
    assert k3.loss.item() == pytest.approx(0.1 * math.exp(-1))
    # d k3 / d logp = 1 - exp(ref - logp) = 1 - e^-1, times beta
    (g,) = torch.autograd.grad(k3.loss, logprobs)
    torch.testing.assert_close(g, torch.tensor([[0.1 * (1 - math.exp(-1)), 0.0]]))
    assert wapo.kl_penalty(logprobs, ref, mask).loss.item() == 0  # beta defaults to 0


def _random_batch(seed, b=8, t=6, g=4):
    gen = torch.Generator().manual_seed(seed)
    logprobs = (-torch.rand(b, t, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    old = logprobs.detach() + torch.randn(b, t, generator=gen, dtype=torch.float64) * 0.3
    mask = torch.rand(b, t, generator=gen) > 0.3
    rewards = (torch.rand(b, generator=gen) > 0.5).double()
    return logprobs, old, mask, rewards, g


def test_wapo_equals_dr_grpo_when_all_advantages_positive_and_on_policy():
    logprobs, _, mask, _, _ = _random_batch(0)
    adv = torch.rand(8, dtype=torch.float64) + 0.1
    old = logprobs.detach()
    a = wapo.policy_loss("wapo", logprobs, old, adv, mask, max_len=6)
    b = wapo.policy_loss("dr_grpo", logprobs, old, adv, mask, max_len=6)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(_grad(a, logprobs), _grad(b, logprobs))


def test_grpo_without_clipping_is_reinforce_on_the_same_normaliser():
    logprobs, old, mask, rewards, g = _random_batch(1)
    adv = wapo.compute_advantages("group_norm", rewards, g).double()
    out = wapo.policy_loss("grpo", logprobs, old, adv, mask, max_len=6, eps=1e9)
    ratio = torch.exp(logprobs - old)
    per_token = -adv[:, None] * ratio * mask
    reinforce = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    torch.testing.assert_close(out.loss, reinforce)
    torch.testing.assert_close(_grad(out, logprobs), torch.autograd.grad(reinforce, logprobs)[0])


@pytest.mark.parametrize("name", sorted(wapo.LOSSES))
def test_masked_positions_never_change_a_loss(name):
    logprobs, old, mask, rewards, g = _random_batch(2)
    adv = wapo.compute_advantages(wapo.DEFAULT_ADVANTAGE[name], rewards, g).double()
    base = wapo.policy_loss(name, logprobs, old, adv, mask, max_len=6, group_size=g)
    garbage_lp = torch.where(mask, logprobs, torch.full_like(logprobs, float("nan")))
    garbage_old = torch.where(mask, old, torch.full_like(old, 1e4))
    other = wapo.policy_loss(name, garbage_lp, garbage_old, adv, mask, max_len=6, group_size=g)
    torch.testing.assert_close(other.loss, base.loss)
    g_base, g_other = _grad(base, logprobs), _grad(other, logprobs)
    torch.testing.assert_close(g_other, g_base)
    assert torch.all(g_base[~mask] == 0) and torch.any(g_base[mask] != 0)  # not two zero gradients


@pytest.mark.parametrize("name", sorted(wapo.LOSSES))
def test_row_micro_batches_add_up_with_the_batch_normaliser(name):
    logprobs, old, mask, rewards, g = _random_batch(6)  # rewards [0,1,1,0 | 0,0,0,1]: both groups mixed
    adv = wapo.compute_advantages(wapo.DEFAULT_ADVANTAGE[name], rewards, g).double()
    whole = wapo.policy_loss(name, logprobs, old, adv, mask, max_len=6, group_size=g)
    norm = normalizer(name, adv, mask, max_len=6, group_size=g)
    parts = [
        wapo.policy_loss(name, logprobs[s], old[s], adv[s], mask[s], max_len=6, group_size=g, normalizer=norm).loss
        for s in (slice(0, 4), slice(4, 8))
    ]
    assert all(part != 0 for part in parts)  # each micro-batch contributes
    torch.testing.assert_close(sum(parts), whole.loss)


def test_unknown_names_and_hyperparameters_fail_with_the_valid_ones():
    logprobs, old, mask, rewards, g = _random_batch(4)
    with pytest.raises(KeyError, match="known: cispo, dapo, dr_grpo, grpo, gspo, raft, wapo"):
        wapo.policy_loss("ppo", logprobs, old, rewards, mask, max_len=6)
    with pytest.raises(TypeError, match=r"has no hyper-parameter \['epsilon'\]"):
        wapo.policy_loss("grpo", logprobs, old, rewards, mask, max_len=6, epsilon=0.1)
    with pytest.raises(ValueError, match="denominator"):
        wapo.policy_loss("wapo", logprobs, old, rewards, mask, max_len=6, denominator="rows")
    with pytest.raises(ValueError, match=r"advantages must be \(B,\)"):
        wapo.policy_loss("wapo", logprobs, old, rewards[:3], mask, max_len=6)

