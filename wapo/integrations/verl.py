"""WAPO inside verl: the advantage estimator and the policy loss "wapo" (tested with verl 0.9.1).

Importing this module registers both in verl's registries (`verl.trainer.ppo.core_algos`):

    VERL_USE_EXTERNAL_MODULES=wapo.integrations.verl python -m verl.trainer.main_ppo \\
        algorithm.adv_estimator=wapo \\
        actor_rollout_ref.actor.policy_loss.loss_mode=wapo \\
        actor_rollout_ref.actor.clip_ratio_high=9.0 \\
        actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum-norm \\
        actor_rollout_ref.actor.loss_scale_factor=<data.max_response_length> ...

(the whole launch: docs/integrations.md). verl imports the module in every process that
imports verl when `VERL_USE_EXTERNAL_MODULES` names it.

- Estimator "wapo": `A_i = r_i − mean_{j∈g(i)} r_j` (`group_mean`, no std division) with the
  groups of verl's `uid` index, via `wapo.compute_advantages`.
- Policy loss "wapo": `wapo.policy_loss("wapo", ...)` with ε_high = verl's `clip_ratio_high`,
  π_old = verl's `old_log_prob`, and verl's `loss_agg_mode` as WAPO's normaliser (table in
  `wapo_policy_loss`). `seq-mean-token-sum-norm` with `loss_scale_factor = L` is WAPO's B·L.
- Taxonomy: with `actor.calculate_sum_pi_squared=True` verl computes Σπ² of every response
  token; `taxonomy_metrics(batch)` turns it into the bin fractions, and importing this module
  adds them to the metrics verl logs every step (`taxonomy/pos_peak_frac`, ...).

The math: docs/math.md.
"""

from __future__ import annotations

import sys

import torch
from verl.trainer.ppo import core_algos

from wapo.advantages import compute_advantages
from wapo.losses import policy_loss
from wapo.taxonomy import BINS, TokenStats, taxonomy_bins

TESTED_VERL = "0.9.1"
"""The verl release this adapter is tested against (`make test-verl`)."""


@core_algos.register_adv_est("wapo")
def wapo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index, config=None,
                   **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """WAPO's advantages: the reward minus its group's mean (no std division), per token.

        A_i = r_i − mean_{j: index_j = index_i} r_j,   r_i = Σ_t token_level_rewards[i, t]

    token_level_rewards, response_mask: (bs, T); index: (bs,) group ids (verl's `uid`; the rows
    of a group need not be adjacent nor the groups equal in size; a group of one gets A = 0).
    Returns (advantages, returns), both `A_i · response_mask`, as verl's outcome estimators.
    """
    scores = token_level_rewards.sum(dim=-1)
    advantages = torch.zeros_like(scores)
    groups: dict = {}
    for row, uid in enumerate(index):
        groups.setdefault(uid, []).append(row)
    for rows in groups.values():
        rows = torch.tensor(rows, device=scores.device)
        advantages[rows] = compute_advantages("group_mean", scores[rows], len(rows)).to(scores.dtype)
    advantages = advantages.unsqueeze(-1) * response_mask
    return advantages, advantages


@core_algos.register_policy_loss("wapo")
def wapo_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                     response_mask: torch.Tensor, loss_agg_mode: str = "seq-mean-token-sum-norm", config=None,
                     rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """WAPO's loss with verl's policy-loss signature (the 7 arguments verl's actor passes).

    old_log_prob, log_prob, advantages, response_mask, rollout_is_weights: (bs, T); the
    advantages must be one value per response (any outcome estimator), broadcast over its
    tokens. config: verl's actor config: ε_high = `clip_ratio_high`; `global_batch_info`
    (dp_size, batch_num_tokens, global_batch_size, loss_scale_factor) when verl fills it.

    verl's aggregation modes as WAPO's normaliser D, with `loss = Σ_{i,t} ℓ(i,t) / D · dp_size`
    (verl's processes each hold a slice of the mini-batch and average their gradients):

        seq-mean-token-sum-norm   D = B · L     B = global_batch_size, L = loss_scale_factor
                                                (default: the padded response length) — WAPO's
        token-mean                D = batch_num_tokens (the mini-batch's response tokens)
        seq-mean-token-sum        D = B
        token-sum                 D = 1
        seq-mean-token-mean       D = B, each response's ℓ divided by its length (exact for
                                  WAPO: ℓ is linear in A > 0, so A_i / |o_i| is used)

    B and the token count default to this micro-batch's (responses with a token, as verl's
    `agg_loss`) when verl does not pass the global ones. Rollout correction: verl's weights
    w(i,t) (truncated π_old/π_rollout) multiply the per-token term, as in verl's own losses
    (`token_weights=` of the core).
    """
    info = dict(getattr(config, "global_batch_info", None) or {}) if config is not None else {}
    eps_high = float(config.clip_ratio_high) if config is not None else 9.0
    mask = response_mask.bool()
    lengths = mask.sum(-1)
    row_adv = torch.where(mask, advantages, torch.zeros_like(advantages)).sum(-1) / lengths.clamp(min=1)
    varying = torch.where(mask, (advantages - row_adv.unsqueeze(-1)).abs(), torch.zeros_like(advantages))
    if varying.numel() and float(varying.max()) > 1e-6 * (1 + float(row_adv.abs().max())):
        raise ValueError("the 'wapo' policy loss needs one advantage per response (an outcome estimator such "
                         "as algorithm.adv_estimator=wapo); got advantages that vary within a response")
    dp_size = info.get("dp_size") or 1
    responses = info.get("global_batch_size") or (lengths > 0).sum().clamp(min=1)
    if loss_agg_mode == "seq-mean-token-sum-norm":
        scale = info.get("loss_scale_factor") or getattr(config, "loss_scale_factor", None) or mask.shape[-1]
        denominator = responses * scale
    elif loss_agg_mode == "token-mean":
        denominator = info.get("batch_num_tokens") or mask.sum().clamp(min=1)
    elif loss_agg_mode == "seq-mean-token-sum":
        denominator = responses
    elif loss_agg_mode == "token-sum":
        denominator = 1.0
    elif loss_agg_mode == "seq-mean-token-mean":
        denominator = responses
        row_adv = row_adv / lengths.clamp(min=1)
    else:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; known: seq-mean-token-sum-norm, token-mean, "
                         "seq-mean-token-sum, token-sum, seq-mean-token-mean")
    normalizer = torch.as_tensor(denominator, dtype=torch.float32, device=log_prob.device) / dp_size
    out = policy_loss("wapo", log_prob, old_log_prob, row_adv, mask, max_len=mask.shape[-1], normalizer=normalizer,
                      token_weights=rollout_is_weights, eps_high=eps_high)
    kl = torch.where(mask, old_log_prob - log_prob, torch.zeros_like(log_prob)).sum() / mask.sum().clamp(min=1)
    metrics = {
        "actor/pg_clipfrac": out.metrics["clip_frac_pos"].item(),
        "actor/ppo_kl": kl.detach().item(),
        "actor/wapo_ratio_max": out.metrics["ratio_max"].item(),
        "actor/wapo_grad_tokens_frac": (out.metrics["grad_tokens"] / mask.sum().clamp(min=1)).item(),
    }
    return out.loss, metrics


def taxonomy_metrics(batch) -> dict[str, float]:
    """The token taxonomy's bin fractions of a verl batch that holds `sum_pi_squared`.

    batch: a `DataProto` (or a mapping of tensors) with `old_log_probs`, `sum_pi_squared` (Σπ²
    per token, from `actor.calculate_sum_pi_squared=True`), `advantages` and `response_mask`,
    all (bs, T). A token is a peak when π(s) ≥ Σπ² (docs/math.md); crossed with its response's
    advantage sign this gives `taxonomy/{pos_peak,pos_valley,neg_peak,neg_valley,zero}_frac`
    and `_count`. Empty when `sum_pi_squared` is absent. verl gives Σπ² but not Σπ² log π, so
    the predicted entropy change of each bin is not available here (wapo's trainers log it).
    """
    tensors = getattr(batch, "batch", batch)
    needed = ("old_log_probs", "sum_pi_squared", "advantages", "response_mask")
    if any(key not in tensors.keys() for key in needed):
        return {}
    logp, collision = tensors["old_log_probs"].float(), tensors["sum_pi_squared"].float()
    mask = tensors["response_mask"].bool()
    advantages = torch.where(mask, tensors["advantages"].float(), torch.zeros_like(logp)).sum(-1)
    p = logp.exp()
    unknown = torch.full_like(logp, float("nan"))
    stats = TokenStats(logp=logp, entropy=unknown, collision=collision, is_peak=p >= collision,
                       pred_dlogp=1 - 2 * p + collision, pred_dentropy=unknown)
    bins = taxonomy_bins(stats, advantages, mask)
    return {f"taxonomy/{b}_{kind}": float(bins[f"{b}_{kind}"]) for b in BINS for kind in ("frac", "count")}


def _log_taxonomy_with_verl_metrics() -> None:
    """Add `taxonomy_metrics` to verl's per-step metrics.

    verl has no hook for extra metrics; `compute_variance_proxy_metrics` is the one metric
    function its trainers call every step with the batch that holds `sum_pi_squared`, so it is
    wrapped: in `metric_utils` and in the trainer modules already imported (they bind the name
    on import).
    """
    from verl.trainer.ppo import metric_utils

    original = metric_utils.compute_variance_proxy_metrics
    if getattr(original, "wapo_taxonomy", False):
        return

    def with_taxonomy(batch, gradient_norm=None):
        return {**original(batch=batch, gradient_norm=gradient_norm), **taxonomy_metrics(batch)}

    with_taxonomy.wapo_taxonomy = True
    metric_utils.compute_variance_proxy_metrics = with_taxonomy
    for name, module in list(sys.modules.items()):
        if name.startswith("verl.") and vars(module).get("compute_variance_proxy_metrics") is original:
            module.compute_variance_proxy_metrics = with_taxonomy


_log_taxonomy_with_verl_metrics()
