"""Per-completion advantage estimators (docs/math.md#advantages).

Every estimator maps rewards `(B,)`, with the `G` samples of each prompt in adjacent rows,
to advantages `(B,)`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from wapo.registry import Registry

AdvantageFn = Callable[[Tensor, int], Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")

STD_EPS = 1e-6
"""Added to the group std in `group_norm` (as TRL and verl)."""


def _grouped(rewards: Tensor, group_size: int, *, min_size: int = 1) -> Tensor:
    """(B,) -> (B // G, G) float, checking that the batch splits into whole groups."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (B,), got shape {tuple(rewards.shape)}")
    if group_size < min_size:
        raise ValueError(f"group_size must be >= {min_size} for this estimator, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"batch of {rewards.numel()} rewards is not a multiple of group_size={group_size}")
    return rewards.float().view(-1, group_size)


@ADVANTAGES.register("group_mean")
def group_mean(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = r_i − mean_{j∈g(i)} r_j  (Dr. GRPO, arXiv 2503.20783; WAPO)."""
    r = _grouped(rewards, group_size)
    return (r - r.mean(-1, keepdim=True)).flatten()


@ADVANTAGES.register("group_norm")
def group_norm(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = (r_i − mean_g r) / (std_g r + 1e-6), unbiased std  (GRPO, arXiv 2402.03300)."""
    r = _grouped(rewards, group_size, min_size=2)
    centred = r - r.mean(-1, keepdim=True)
    return (centred / (r.std(-1, unbiased=True, keepdim=True) + STD_EPS)).flatten()


@ADVANTAGES.register("rloo")
def rloo(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = r_i − mean_{j∈g(i), j≠i} r_j  (leave-one-out baseline, arXiv 2402.14740).

    Equals G/(G−1) · (r_i − mean_g r).
    """
    r = _grouped(rewards, group_size, min_size=2)
    loo_mean = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return (r - loo_mean).flatten()


@ADVANTAGES.register("best_of_group")
def best_of_group(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = 1 if r_i is the best reward of its group and the group is not all equal, else 0.

    The selection of rejection-sampling fine-tuning (RAFT); not a baseline-subtracted estimate.
    """
    r = _grouped(rewards, group_size)
    best, worst = r.max(-1, keepdim=True).values, r.min(-1, keepdim=True).values
    return ((r == best) & (best > worst)).float().flatten()


def compute_advantages(name: str, rewards: Tensor, group_size: int) -> Tensor:
    """Advantages `(B,)` of rewards `(B,)` by the estimator registered as `name`."""
    estimator = ADVANTAGES[name]
    if rewards.numel() == 0:  # e.g. dynamic sampling found no mixed group: nothing to estimate
        return rewards.float()
    return estimator(rewards, group_size)
