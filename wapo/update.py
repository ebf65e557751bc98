"""One policy update on a sampled batch: micro-batches, gradient accumulation, optimizer steps.

    for epoch in 1..updates_per_batch:
        for each micro-batch of the rows that carry gradient:
            logπ ← the policy's log-probabilities (the chunked pass, with grad)
            π_old ← μ (the sampler's)                       ratio_against = "sampler"
                    logπ of epoch 1, detached                ratio_against = "trainer"
            loss ← objective(logπ, π_old, A; whole-batch normaliser) [+ β·KL to the reference]
            loss.backward()                                  (gradients accumulate)
        clip the gradient norm; one optimizer step

Against the trainer, π_old is the first epoch's own forward pass: every trained row is seen
once before the first optimizer step, so π_old costs no extra pass, and the first epoch's
ratio is exactly 1 whatever the sampler's numerics. `tis_cap` then re-weights each token by
sg[min(π_old/μ, C)] (truncated importance sampling). See docs/math.md for which objective's
paper takes which denominator.

Rows whose gradient is zero by construction (WAPO's losers) stay out of the backward pass
(`wapo.losses.rows_with_gradient`). A non-finite loss or gradient norm skips that optimizer
step and ends the update (with `updates_per_batch` > 1 the steps before it stay applied:
`optimizer_steps` says how many); the caller counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from wapo.batch import RolloutBatch
from wapo.diagnostics import UpdateDiagnostics
from wapo.losses import kl_penalty, normalizer, policy_loss, rows_with_gradient, tis_weights
from wapo.taxonomy import TokenStats


@dataclass(frozen=True)
class UpdateSettings:
    """What an update needs of the run's config, with `auto` settings already resolved."""

    loss: str
    loss_kwargs: dict
    """max_len, group_size and the objective's hyper-parameters."""
    ratio_against: str
    """"trainer" or "sampler"."""
    updates_per_batch: int = 1
    micro_batch_size: int = 16
    max_grad_norm: float = 1.0
    tis_cap: float = 0.0
    kl_beta: float = 0.0
    kl_estimator: str = "k3"
    skip_zero_gradient_rows: bool = True
    diagnose_skipped_rows: bool = True


@dataclass
class UpdateResult:
    metrics: dict = field(default_factory=dict)
    finite: bool = True
    """False when a non-finite loss or gradient skipped an optimizer step."""


def update_policy(
    batch: RolloutBatch,
    settings: UpdateSettings,
    *,
    optimizer: torch.optim.Optimizer,
    params: list[Tensor],
    token_stats: Callable[[list[int]], TokenStats],
    reference_logp: Callable[[list[int]], Tensor] | None = None,
    sampler_stats: Callable[[list[int]], TokenStats | None] = lambda rows: None,
    before_optimizer_step: Callable[[], None] = lambda: None,
    after_optimizer_step: Callable[[], None] = lambda: None,
) -> UpdateResult:
    """`settings.updates_per_batch` optimizer steps on `batch`; metrics of what it saw.

    `token_stats(rows)` is the policy's pass (grad-enabled when grad is on); `reference_logp`
    the reference model's log-probabilities through the same pass (needed when kl_beta > 0);
    `sampler_stats(rows)` the taxonomy recorded while sampling, or None (then a no-grad pass
    gives the skipped rows' taxonomy, if `diagnose_skipped_rows`).
    """
    s = settings
    mask, advantages = batch.mask, batch.advantages
    norm = normalizer(s.loss, advantages, mask, **s.loss_kwargs)
    everything = list(range(len(batch)))
    if s.skip_zero_gradient_rows and s.kl_beta == 0:  # the KL term has a gradient on every row
        with_grad = rows_with_gradient(s.loss, advantages, mask, **s.loss_kwargs)
        trained = [i for i in everything if with_grad[i]]
    else:
        trained = everything
    skipped = sorted(set(everything) - set(trained))
    diag = UpdateDiagnostics(mask, advantages, kl=s.kl_beta > 0)
    _skipped_rows_taxonomy(batch, skipped, diag, s, token_stats, sampler_stats)

    old_logprobs = batch.old_logprobs.clone()  # μ; against the trainer, replaced by epoch 1's pass
    result = UpdateResult(metrics={"backward_rows": len(trained), "skipped_rows": len(skipped), "grad_norm": None,
                                   "optimizer_steps": 0})
    for epoch in range(s.updates_per_batch if trained else 0):  # nothing to train: no optimizer step
        optimizer.zero_grad(set_to_none=True)
        last = epoch == s.updates_per_batch - 1
        for rows in batch.micro_batches(trained, s.micro_batch_size):
            stats = token_stats(rows)
            logp, m = stats.logp, mask[rows].to(stats.logp.device)
            mu = batch.old_logprobs[rows].to(logp.device)
            if epoch == 0:  # the policy that sampled: its taxonomy, and π_old against the trainer
                diag.add_stats(rows, stats)
                diag.add_mismatch(logp, mu, m)
                if s.ratio_against == "trainer":
                    old_logprobs[rows] = logp.detach().float().cpu()
            old = old_logprobs[rows].to(logp.device)
            weights = tis_weights(old, mu, m, cap=s.tis_cap) if s.tis_cap > 0 else None
            out = policy_loss(s.loss, logp, old, advantages[rows].to(logp.device), m, normalizer=norm,
                              token_weights=weights, **s.loss_kwargs)
            loss = out.loss
            if s.kl_beta > 0:
                kl = kl_penalty(logp, reference_logp(rows), m, beta=s.kl_beta, estimator=s.kl_estimator,
                                normalizer=mask.sum().clamp(min=1))
                loss = loss + kl.loss
                if epoch == 0:
                    diag.add_kl_counts(kl.counts)
            if not torch.isfinite(loss):
                result.finite = False
                break
            loss.backward()
            if last:
                diag.add_loss_counts(out.counts)
        if result.finite:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            result.finite = bool(torch.isfinite(grad_norm))
        if not result.finite:
            optimizer.zero_grad(set_to_none=True)
            break
        before_optimizer_step()
        optimizer.step()  # parameters without a gradient (nothing trained) stay as they are
        after_optimizer_step()
        result.metrics["optimizer_steps"] += 1
        if epoch == 0:
            result.metrics["grad_norm"] = grad_norm.item()
    result.metrics.update(diag.summary())
    return result


def _skipped_rows_taxonomy(batch, skipped, diag, s, token_stats, sampler_stats) -> None:
    """The taxonomy of rows left out of the backward pass: from sampling, or a no-grad pass."""
    if not skipped:
        return
    recorded = sampler_stats(skipped)
    if recorded is not None:
        diag.add_stats(skipped, recorded)
    elif s.diagnose_skipped_rows:
        with torch.no_grad():
            for rows in batch.micro_batches(skipped, s.micro_batch_size):
                diag.add_stats(rows, token_stats(rows))
