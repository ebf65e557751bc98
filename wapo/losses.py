"""Policy objectives: WAPO and the baselines it is compared with (SPEC.md "Objectives").

Every objective is a pure function registered in `LOSSES` by name, with the signature

    fn(logprobs, old_logprobs, advantages, mask, *, max_len, group_size=None,
       normalizer=None, **hparams) -> LossOutput

    logprobs      (B, T) float  logπ(i,t) of the sampled tokens under the current policy
    old_logprobs  (B, T) float  logμ(i,t), recorded when sampling (no gradient)
    advantages    (B,)   float  one per completion
    mask          (B, T) bool   completion tokens that are trained on

and returns the loss to *minimise*, written as `S / D`: `S` is a sum over rows (so a batch
split into row micro-batches adds up), `D` the objective's normaliser over the whole batch.
Pass the whole batch's `D` (see `normalizer()`) as `normalizer=` when the batch is split.

Objective and normalisation are separate steps: each function builds the per-token term
`ℓ(i,t)` and hands it to one of the reductions at the bottom of this file. `sg[·]` is
stop-gradient. Ratios use `ρ = exp(logπ − logμ)` on masked positions only, so whatever sits
in masked positions (padding, prompt, tool output, even inf/NaN) changes neither loss nor
gradient.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from wapo.registry import Registry


@dataclass(frozen=True)
class LossOutput:
    """A scalar loss and its diagnostics (detached 0-d tensors: no `.item()` in the hot path).

    `metrics` are this call's rates (clip fractions, mean ratio, ...); `counts` are the sums
    and extremes they come from. Rates of a batch split into micro-batches are merged from
    counts (`merge_counts`, then `metrics_from_counts`), never by averaging rates.
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    counts: dict[str, Tensor] = field(default_factory=dict)


LossFn = Callable[..., LossOutput]
LOSSES: Registry[LossFn] = Registry("loss")
DEFAULT_ADVANTAGE: dict[str, str] = {}
"""The advantage estimator each objective is defined with (the trainer's default)."""


def register_loss(name: str, *, advantage: str) -> Callable[[LossFn], LossFn]:
    def add(fn: LossFn) -> LossFn:
        LOSSES.register(name)(fn)
        DEFAULT_ADVANTAGE[name] = advantage
        return fn

    return add


def policy_loss(
    name: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    max_len: int,
    group_size: int | None = None,
    **hparams,
) -> LossOutput:
    """The objective registered as `name` on one batch; unknown hyper-parameters fail loudly."""
    fn = LOSSES[name]
    _check_inputs(logprobs, old_logprobs, advantages, mask)
    check_hyperparameters(name, hparams)
    return fn(logprobs, old_logprobs, advantages, mask, max_len=max_len, group_size=group_size, **hparams)


def hyperparameters(name: str) -> dict[str, object]:
    """The keyword-only hyper-parameters of loss `name` with their defaults.

    `max_len`, `group_size`, `normalizer` and `token_weights` describe the batch, not the
    objective: not listed.
    """
    params = inspect.signature(LOSSES[name]).parameters.values()
    skip = {"max_len", "group_size", "normalizer", "token_weights"}
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in skip}


def check_hyperparameters(name: str, hparams: dict) -> None:
    """Fail with the valid names if `hparams` holds a key that loss `name` does not take."""
    allowed = hyperparameters(name)
    unknown = sorted(set(hparams) - set(allowed) - {"normalizer", "token_weights"})
    if unknown:
        raise TypeError(f"loss {name!r} has no hyper-parameter {unknown}; valid: {sorted(allowed)}")


def normalizer(name: str, advantages: Tensor, mask: Tensor, *, max_len: int,
               group_size: int | None = None, **hparams) -> Tensor:
    """The whole batch's denominator `D` of loss `name`, for summing row micro-batches.

    Computed by running the objective on zero log-probabilities: each normaliser is then
    written once, inside its objective, and cannot drift from it (cost: a few (B, T) ops).
    """
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out = policy_loss(name, zeros, zeros, advantages, mask, max_len=max_len, group_size=group_size, **hparams)
    return out.metrics["normalizer"]


def rows_with_gradient(name: str, advantages: Tensor, mask: Tensor, *, max_len: int,
                       group_size: int | None = None, **hparams) -> Tensor:
    """(B,) bool: rows whose on-policy gradient under loss `name` is not zero by construction.

    Found by differentiating the objective at ρ = 1 (zero log-probabilities), so no objective
    needs a second description of which rows it trains on (WAPO: A > 0; GRPO: A ≠ 0; ...).
    The trainer leaves the other rows out of the backward pass.
    """
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device, requires_grad=True)
    out = policy_loss(name, zeros, zeros.detach(), advantages.float(), mask, max_len=max_len,
                      group_size=group_size, **hparams)
    (grad,) = torch.autograd.grad(out.loss, zeros, allow_unused=True)
    return torch.zeros(mask.shape[0], dtype=torch.bool) if grad is None else (grad != 0).any(-1)


def _check_inputs(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> None:
    if logprobs.dim() != 2 or logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(
            f"logprobs, old_logprobs and mask must share one (B, T) shape; got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be (B,) = ({logprobs.shape[0]},), got {tuple(advantages.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")


def _log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """logπ − sg[logμ] on masked positions, 0 elsewhere (so padding never yields inf/NaN)."""
    return torch.where(mask, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))


def _requires_groups(name: str, group_size: int | None, batch: int) -> int:
    if group_size is None or group_size < 1 or batch % group_size:
        raise ValueError(f"loss {name!r} needs group_size dividing the batch of {batch}, got {group_size}")
    return group_size


# ---------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------


@register_loss("wapo", advantage="group_mean")
def wapo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              max_len: int, group_size: int | None = None, normalizer: Tensor | float | None = None,
              token_weights: Tensor | None = None,
              eps_high: float = 9.0, denominator: str = "all") -> LossOutput:
    """Winner Advantage Policy Optimization: clipped policy gradient on winners only.

        ℓ(i,t) = −min(ρ·A_i, min(ρ, 1+ε_high)·A_i) = −A_i·min(ρ, 1+ε_high)   if A_i > 0
        ℓ(i,t) = 0                                                            otherwise
        loss   = Σ_{i,t} ℓ(i,t)·mask / (B·L)                     denominator="all"
        loss   = Σ_{i,t} ℓ(i,t)·mask / (#groups with a winner · G · L)   "contributing"

    ∂ℓ/∂logπ = −A·ρ below the cap and 0 above it. Losers stay in `B`: a group with fewer
    winners moves the policy less. "contributing" matches the authors' released code.
    `ε_high = 9` caps the ratio at 10 (the reference setting).

    Paper: "A Gradient Perspective on RLVR Stability and Winner Advantage Policy
    Optimization", arXiv 2606.16154. SPEC.md "Objectives / WAPO".
    """
    if denominator not in ("all", "contributing"):
        raise ValueError(f"denominator must be 'all' or 'contributing', got {denominator!r}")
    batch = logprobs.shape[0]
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, mask))
    winners = advantages > 0
    a = advantages.unsqueeze(-1)
    per_token = -torch.minimum(ratio * a, ratio.clamp(max=1 + eps_high) * a)
    per_token = torch.where(winners.unsqueeze(-1), per_token, torch.zeros_like(per_token))
    if normalizer is None:
        if denominator == "all":
            normalizer = float(batch * max_len)
        else:
            g = _requires_groups("wapo", group_size, batch)
            groups_with_winner = winners.view(-1, g).any(-1).sum()
            normalizer = groups_with_winner.clamp(min=1).float() * (g * max_len)
    clipped_high = ratio > 1 + eps_high
    trained = mask & winners.unsqueeze(-1) & ~clipped_high
    metrics = _ratio_metrics(ratio, mask, advantages, clipped_high, torch.zeros_like(mask), trained)
    return _finish(token_sum(_weighted(per_token, token_weights), mask) / normalizer, normalizer, metrics)


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """ℓ = −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A), per token."""
    a = advantages.unsqueeze(-1)
    return -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)


def _ppo_clip_masks(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float):
    """Where the PPO min picks the clipped branch (zero gradient): A>0, ρ>1+ε_h or A<0, ρ<1−ε_l."""
    a = advantages.unsqueeze(-1)
    return (a > 0) & (ratio > 1 + eps_high), (a < 0) & (ratio < 1 - eps_low)


def _ppo_style(ratio, advantages, mask, eps_low, eps_high):
    per_token = _clipped_surrogate(ratio, advantages, eps_low, eps_high)
    clip_high, clip_low = _ppo_clip_masks(ratio, advantages, eps_low, eps_high)
    trained = mask & (advantages != 0).unsqueeze(-1) & ~clip_high & ~clip_low
    return per_token, _ratio_metrics(ratio, mask, advantages, clip_high, clip_low, trained)


@register_loss("grpo", advantage="group_norm")
def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              max_len: int, group_size: int | None = None, normalizer: Tensor | float | None = None,
              token_weights: Tensor | None = None,
              eps: float = 0.2) -> LossOutput:
    """GRPO: PPO's clipped surrogate, mean over each sequence's tokens, then over sequences.

        ℓ(i,t) = −min(ρA_i, clip(ρ, 1−ε, 1+ε)·A_i)
        loss   = (1/B) Σ_i (1/|o_i|) Σ_t ℓ(i,t)·mask

    Paper: DeepSeekMath, arXiv 2402.03300 (KL term: see `kl_penalty`).
    """
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, mask))
    per_token, metrics = _ppo_style(ratio, advantages, mask, eps, eps)
    normalizer = float(logprobs.shape[0]) if normalizer is None else normalizer
    return _finish(sequence_mean_sum(_weighted(per_token, token_weights), mask) / normalizer, normalizer, metrics)


@register_loss("dr_grpo", advantage="group_mean")
def dr_grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 max_len: int, group_size: int | None = None, normalizer: Tensor | float | None = None,
              token_weights: Tensor | None = None,
                 eps: float = 0.2) -> LossOutput:
    """Dr. GRPO: GRPO's clipped surrogate with a constant normaliser (no length bias).

        ℓ(i,t) = −min(ρA_i, clip(ρ, 1−ε, 1+ε)·A_i),   A from `group_mean` (no std division)
        loss   = Σ_{i,t} ℓ(i,t)·mask / (B·L)

    Paper: "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv 2503.20783.
    """
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, mask))
    per_token, metrics = _ppo_style(ratio, advantages, mask, eps, eps)
    normalizer = float(logprobs.shape[0] * max_len) if normalizer is None else normalizer
    return _finish(token_sum(_weighted(per_token, token_weights), mask) / normalizer, normalizer, metrics)


@register_loss("dapo", advantage="group_norm")
def dapo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              max_len: int, group_size: int | None = None, normalizer: Tensor | float | None = None,
              token_weights: Tensor | None = None,
              eps_low: float = 0.2, eps_high: float = 0.28) -> LossOutput:
    """DAPO: decoupled ("clip-higher") clipping, token mean over the whole batch.

        ℓ(i,t) = −min(ρA_i, clip(ρ, 1−ε_low, 1+ε_high)·A_i)
        loss   = Σ_{i,t} ℓ(i,t)·mask / Σ_{i,t} mask

    Dynamic sampling (dropping groups whose rewards are all equal) is the trainer's job.
    Paper: "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476.
    """
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, mask))
    per_token, metrics = _ppo_style(ratio, advantages, mask, eps_low, eps_high)
    normalizer = _token_count(mask) if normalizer is None else normalizer
    return _finish(token_sum(_weighted(per_token, token_weights), mask) / normalizer, normalizer, metrics)


@register_loss("gspo", advantage="group_norm")
def gspo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              max_len: int, group_size: int | None = None, normalizer: Tensor | float | None = None,
              token_weights: Tensor | None = None,
              eps_low: float = 3e-4, eps_high: float = 4e-4) -> LossOutput:
    """GSPO: one length-normalised importance ratio per sequence, clipped per sequence.

        s_i    = exp( (1/|o_i|) Σ_t (logπ − sg[logμ])·mask )
        ℓ_i    = −min(s_i A_i, clip(s_i, 1−ε_low, 1+ε_high)·A_i)
        loss   = (1/B) Σ_i ℓ_i

    Computed in the paper's token form (its GSPO-token, and verl's): s_i,t = sg[s_i]·π/sg[π],
    ℓ(i,t) = −min(s_i,t A_i, clip(s_i,t)·A_i), sequence mean then batch mean. Value and
    gradient equal the sequence form's; per-token weights (`token_weights`) then act per token.
    Paper: "Group Sequence Policy Optimization", arXiv 2507.18071 (ε = 3e-4 / 4e-4).
    """
    lengths = mask.sum(-1).clamp(min=1)
    seq_ratio = torch.exp(_log_ratio(logprobs, old_logprobs, mask).sum(-1) / lengths)
    own = torch.where(mask, logprobs, torch.zeros_like(logprobs))
    token_ratio = seq_ratio.detach().unsqueeze(-1) * torch.exp(own - own.detach())
    per_token = _clipped_surrogate(token_ratio, advantages, eps_low, eps_high)
    clip_high, clip_low = _ppo_clip_masks(seq_ratio.unsqueeze(-1), advantages, eps_low, eps_high)
    rows_clipped = (clip_high | clip_low).squeeze(-1)
    trained = mask & ((advantages != 0) & ~rows_clipped).unsqueeze(-1)
    metrics = _ratio_metrics(seq_ratio.unsqueeze(-1).expand_as(mask), mask, advantages, clip_high.expand_as(mask),
                             clip_low.expand_as(mask), trained)
    normalizer = float(logprobs.shape[0]) if normalizer is None else normalizer
    return _finish(sequence_mean_sum(_weighted(per_token, token_weights), mask) / normalizer, normalizer, metrics)


@register_loss("cispo", advantage="group_norm")
def cispo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
               max_len: int, group_size: int | None = None, normalizer: Tensor | float | None = None,
              token_weights: Tensor | None = None,
               eps_low: float = 1.0, eps_high: float = 4.0) -> LossOutput:
    """CISPO: REINFORCE weighted by a clipped, stop-gradient importance ratio; no token dropped.

        ℓ(i,t) = −sg[clip(ρ, 1−ε_low, 1+ε_high)]·A_i·logπ(i,t)
        loss   = Σ_{i,t} ℓ(i,t)·mask / Σ_{i,t} mask

    Defaults: no lower bound (ε_low = 1), as MiniMax-M1; ε_high = 4 (ratio cap 5), our choice:
    the paper tunes only the upper bound and does not fix one value.
    Paper: "MiniMax-M1", arXiv 2506.13585.
    """
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, mask))
    weight = ratio.clamp(1 - eps_low, 1 + eps_high).detach()
    per_token = -weight * advantages.unsqueeze(-1) * logprobs
    a = advantages.unsqueeze(-1)
    clip_high, clip_low = (a != 0) & (ratio > 1 + eps_high), (a != 0) & (ratio < 1 - eps_low)
    trained = mask & (a != 0)  # clipping caps the weight but never zeroes the gradient
    metrics = _ratio_metrics(ratio, mask, advantages, clip_high, clip_low, trained)
    normalizer = _token_count(mask) if normalizer is None else normalizer
    return _finish(token_sum(_weighted(per_token, token_weights), mask) / normalizer, normalizer, metrics)


@register_loss("raft", advantage="best_of_group")
def raft_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              max_len: int, group_size: int | None = None,
              normalizer: Tensor | float | None = None,
              token_weights: Tensor | None = None) -> LossOutput:
    """RAFT: supervised fine-tuning on the selected (A > 0) completions.

        ℓ(i,t) = −logπ(i,t) if A_i > 0 else 0
        loss   = Σ_{i,t} ℓ(i,t)·mask / Σ_{i,t} mask·1[A_i > 0]

    The selection is the advantage estimator's job, so the loss stays row-local: with
    `best_of_group` (its default) the kept rows are the completions that earned the best reward
    of their group, in groups whose rewards are not all equal; with 0/1 rewards any centred
    estimator keeps the same rows (the correct answers of mixed groups).
    Paper: "RAFT: Reward rAnked FineTuning", arXiv 2304.06767.
    """
    kept = mask & (advantages > 0).unsqueeze(-1)
    per_token = torch.where(kept, -logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(_log_ratio(logprobs, old_logprobs, mask))
    no_clip = torch.zeros_like(mask)
    metrics = _ratio_metrics(ratio, mask, advantages, no_clip, no_clip, kept)
    normalizer = _token_count(kept) if normalizer is None else normalizer
    return _finish(token_sum(_weighted(per_token, token_weights), mask) / normalizer, normalizer, metrics)


# ---------------------------------------------------------------------------------------------
# KL penalty (added by the caller: loss + kl_penalty(...).loss)
# ---------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, *, beta: float = 0.0,
               estimator: str = "k3", normalizer: Tensor | float | None = None) -> LossOutput:
    """β · token-mean of a per-token estimate of KL(π ‖ π_ref) on the sampled tokens.

        k1 = logπ − logπ_ref
        k3 = exp(logπ_ref − logπ) − (logπ_ref − logπ) − 1      (≥ 0, unbiased, low variance)

    logprobs/ref_logprobs/mask: (B, T). Estimators from J. Schulman, "Approximating KL
    Divergence" (2020); k3 is GRPO's choice (arXiv 2402.03300, eq. 4).
    """
    diff = torch.where(mask, ref_logprobs.detach() - logprobs, torch.zeros_like(logprobs))
    if estimator == "k1":
        per_token = -diff
    elif estimator == "k3":
        per_token = torch.exp(diff) - diff - 1
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; known: k1, k3")
    total = token_sum(per_token, mask)
    normalizer = _token_count(mask) if normalizer is None else normalizer
    # the metric is this batch's own token mean, whatever normaliser the loss uses
    counts = {"kl_sum": total.detach(), "kl_tokens": mask.sum()}
    return LossOutput(loss=beta * total / normalizer, metrics={"kl_ref": (total / _token_count(mask)).detach()},
                      counts=counts)


# ---------------------------------------------------------------------------------------------
# Reductions and metrics
# ---------------------------------------------------------------------------------------------


def token_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Σ_{i,t} x·mask (masked positions contribute exactly 0, even if x is inf/NaN there)."""
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum()


def sequence_mean_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Σ_i (Σ_t x·mask / |o_i|): a sum over rows of each row's token mean."""
    lengths = mask.sum(-1).clamp(min=1)
    return (torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1) / lengths).sum()


def _weighted(per_token: Tensor, token_weights: Tensor | None) -> Tensor:
    """ℓ(i,t)·w(i,t): per-token weights such as truncated importance sampling (`tis_weights`)."""
    return per_token if token_weights is None else per_token * token_weights.detach()


def tis_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *, cap: float) -> Tensor:
    """Truncated importance sampling: w(i,t) = sg[min(π_old/μ, C)] on masked tokens, 1 elsewhere.

    Corrects for the sampler's numerics μ differing from the trainer's π_old when the ratio
    is taken against π_old (Yao et al. 2025, "Your efficient RL framework secretly brings
    you off-policy RL training"). Pass as `token_weights=`. Shapes (B, T); `cap` C > 0.
    """
    log_w = torch.where(mask, old_logprobs.detach() - behaviour_logprobs.detach(), torch.zeros_like(old_logprobs))
    return torch.exp(log_w).clamp(max=cap)


def _token_count(mask: Tensor) -> Tensor:
    return mask.sum().clamp(min=1).float()


def _finish(loss: Tensor, normalizer: Tensor | float, counts: dict[str, Tensor]) -> LossOutput:
    metrics = metrics_from_counts(counts)
    metrics["normalizer"] = torch.as_tensor(normalizer, dtype=torch.float32).detach()
    return LossOutput(loss=loss, metrics=metrics, counts=counts)


LOSS_METRICS = ("clip_frac_pos", "clip_frac_neg", "ratio_mean", "ratio_min", "ratio_max", "grad_rows", "grad_tokens")
"""The metrics every objective returns (besides `normalizer`)."""


@torch.no_grad()
def _ratio_metrics(ratio: Tensor, mask: Tensor, advantages: Tensor, clip_high: Tensor,
                   clip_low: Tensor, trained: Tensor) -> dict[str, Tensor]:
    """The counts behind clip fractions by advantage sign, ratio statistics and what carried gradient.

    clip_frac_pos / clip_frac_neg: fraction of the masked tokens of rows with A>0 / A<0 whose
    ratio fell outside the clip range (PPO's "clipfrac", split by sign: CleanRL's ppo.py).
    grad_rows / grad_tokens: rows and tokens whose gradient is not zero by construction.
    """
    pos = mask & (advantages > 0).unsqueeze(-1)
    neg = mask & (advantages < 0).unsqueeze(-1)
    clipped = (clip_high | clip_low) & mask
    r = torch.where(mask, ratio.float(), torch.zeros_like(ratio, dtype=torch.float32))
    inf = torch.tensor(float("inf"), device=ratio.device)
    return {
        "clipped_pos": (clipped & pos).sum(), "pos_tokens": pos.sum(),
        "clipped_neg": (clipped & neg).sum(), "neg_tokens": neg.sum(),
        "ratio_sum": r.sum(), "tokens": mask.sum(),
        "ratio_min": torch.where(mask, r, inf).min() if mask.numel() else inf,
        "ratio_max": torch.where(mask, r, -inf).max() if mask.numel() else -inf,
        "grad_rows": trained.any(-1).sum(), "grad_tokens": trained.sum(),
    }


def merge_counts(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Counts of micro-batches to the counts of their union: `*_min` / `*_max` keys take the
    extreme, every other key adds."""
    out: dict[str, Tensor] = {}
    for counts in parts:
        for key, value in counts.items():
            value = value.detach().float().cpu()
            merge = torch.minimum if key.endswith("_min") else torch.maximum if key.endswith("_max") else torch.add
            out[key] = value if key not in out else merge(out[key], value)
    return out


def metrics_from_counts(counts: dict[str, Tensor]) -> dict[str, Tensor]:
    """The `LOSS_METRICS` rates from counts; a ratio statistic with no token is 1 (on-policy)."""
    tokens = counts["tokens"]
    any_token, one = tokens > 0, torch.ones((), device=tokens.device)
    return {
        "clip_frac_pos": counts["clipped_pos"] / counts["pos_tokens"].clamp(min=1),
        "clip_frac_neg": counts["clipped_neg"] / counts["neg_tokens"].clamp(min=1),
        "ratio_mean": torch.where(any_token, counts["ratio_sum"] / tokens.clamp(min=1), one),
        "ratio_min": torch.where(any_token, counts["ratio_min"], one),
        "ratio_max": torch.where(any_token, counts["ratio_max"], one),
        "grad_rows": counts["grad_rows"],
        "grad_tokens": counts["grad_tokens"],
    }
