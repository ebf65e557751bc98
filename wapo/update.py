"""One policy update on a sampled batch: mini-batches, micro-batches, optimizer steps.

    slices ← the batch cut into `mini_batches` runs of whole groups, in batch order, each with
             its own normaliser D_j (the objective's D on its own rows)
    π_old  ← μ, the sampler's log-probabilities                  ratio_against = "sampler"
             the policy before this step's first optimizer step   ratio_against = "trainer":
               slice 1: its own first grad pass, detached (free)
               slices 2..k: a no-grad pass now, before any optimizer step
    for epoch in 1..updates_per_batch:
        for each slice j:
            for each micro-batch of slice j's rows that carry gradient:
                logπ ← the policy's log-probabilities (the chunked pass, with grad)
                loss ← objective(logπ, π_old, A; D_j) [+ β·KL to the reference]
                loss.backward()                                  (gradients accumulate)
            no row carries gradient: every gradient is set to zero
            clip the gradient norm; one optimizer step

That is always `updates_per_batch × mini_batches` optimizer steps (PPO's epochs × mini-batches;
verl's `ppo_epochs` and `ppo_mini_batch_size`, which counts prompts: prompts_per_step /
mini_batches; TRL's `num_iterations` and `steps_per_generation`), whether or not
`skip_zero_gradient_rows` leaves rows out: a slice none of whose rows carries gradient takes
its step on zero gradients, as it would with every row in the backward pass (AdamW's momentum
and weight decay still move the weights), so skipping rows never changes the weights. Only a
batch with no rows (dynamic sampling found no mixed group) takes none. A group is never split:
its rows share a baseline, and WAPO's "contributing" normaliser counts groups. Against the
trainer the first slice's first pass is π_old, so the first optimizer step's ratio is exactly 1
whatever the sampler's numerics; the later slices' ratios already carry the earlier slices'
steps. `tis_cap` then re-weights each token by sg[min(π_old/μ, C)] (truncated importance
sampling). See docs/math.md for which objective's paper takes which denominator, and what a
per-slice D means for each.

Every row's taxonomy is recorded once, describing the policy before any optimizer step: from the
pre-update passes above, and for rows no such pass sees (rows without gradient; against the
sampler, the rows of slices 2..k) from the sampler's record, or a no-grad pass.

Rows whose gradient is zero by construction (WAPO's losers) stay out of the backward pass
(`wapo.losses.rows_with_gradient`). A non-finite loss or gradient norm skips that optimizer
step and ends the update (the steps before it stay applied: `optimizer_steps` says how many);
the caller counts it.
"""

from __future__ import annotations

import warnings
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
    mini_batches: int = 1
    """Optimizer steps per pass over the batch, each on a slice of whole groups."""
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


@dataclass(frozen=True)
class MiniBatch:
    """One optimizer step's slice of the batch: whole groups, and the normalisers of its own rows."""

    rows: list[int]
    trained: list[int]
    """The rows that go through the backward pass (all, or those with gradient)."""
    normalizer: Tensor
    """The objective's D on `rows` (`wapo.losses.normalizer`)."""
    kl_normalizer: Tensor
    """Model tokens of `rows` (at least 1): the KL penalty's token mean."""


def group_slices(rows: int, group_size: int, parts: int) -> list[list[int]]:
    """Row indices 0..rows−1 cut into `parts` runs of whole groups, in order, as even as possible.

    With n = rows / group_size groups, the first n mod parts runs take ⌈n/parts⌉ groups and the
    others ⌊n/parts⌋ (5 groups in 2 → 3 + 2; in 3 → 2 + 2 + 1). Fewer groups than `parts`:
    one run per group.
    """
    if group_size < 1 or rows % group_size:
        raise ValueError(f"mini-batches are cut at group boundaries: group_size {group_size} must divide the "
                         f"batch's {rows} rows")
    n = rows // group_size
    parts = min(parts, n)
    out, start = [], 0
    for j in range(parts):
        size = (n // parts + (j < n % parts)) * group_size
        out.append(list(range(start, start + size)))
        start += size
    return out


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
) -> UpdateResult:
    """`updates_per_batch × mini_batches` optimizer steps on `batch`; metrics of what it saw.

    `token_stats(rows)` is the policy's pass (grad-enabled when grad is on); `reference_logp`
    the reference model's log-probabilities through the same pass (needed when kl_beta > 0);
    `sampler_stats(rows)` the taxonomy recorded while sampling, or None (then a no-grad pass
    gives the taxonomy of rows no pre-update pass sees, if `diagnose_skipped_rows`).
    `settings.loss_kwargs["group_size"]` is needed when `mini_batches` > 1.
    `before_optimizer_step()` runs before each optimizer step (the trainer holds interrupts there).
    """
    s = settings
    everything = list(range(len(batch)))
    trained = set(everything)
    if s.skip_zero_gradient_rows and s.kl_beta == 0:  # the KL term has a gradient on every row
        with_grad = rows_with_gradient(s.loss, batch.advantages, batch.mask, **s.loss_kwargs)
        trained = {i for i in everything if with_grad[i]}
    slices = _mini_batches(batch, trained, s)
    skipped = sorted(set(everything) - trained)
    later = sorted(i for mb in slices[1:] for i in mb.trained)  # first reached after an optimizer step

    diag = UpdateDiagnostics(batch.mask, batch.advantages, kl=s.kl_beta > 0)
    _taxonomy_without_training_pass(batch, skipped, diag, token_stats, sampler_stats, s.micro_batch_size,
                                    pass_if_unrecorded=s.diagnose_skipped_rows)
    old_logprobs = batch.old_logprobs.clone()  # μ; against the trainer, replaced by the pre-update passes
    if s.ratio_against == "trainer":
        _pre_update_pass(batch, later, old_logprobs, diag, token_stats, s.micro_batch_size)
    else:
        _taxonomy_without_training_pass(batch, later, diag, token_stats, sampler_stats, s.micro_batch_size,
                                        pass_if_unrecorded=True)

    result = UpdateResult(metrics={"backward_rows": len(trained), "skipped_rows": len(skipped), "grad_norm": None,
                                   "grad_norm_max": None, "optimizer_steps": 0})
    grad_norms = []
    for epoch in range(s.updates_per_batch):
        for j, mb in enumerate(slices):
            optimizer.zero_grad(set_to_none=True)
            result.finite = _backward(batch, mb, s, old_logprobs, diag, token_stats, reference_logp,
                                      first_look=epoch == 0 and j == 0, epoch=epoch)
            if not mb.trained:  # its rows' gradient is 0; a zero grad, not None, makes AdamW step as unskipped
                for p in params:
                    p.grad = torch.zeros_like(p)
            if result.finite:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                result.finite = bool(torch.isfinite(grad_norm))
            if not result.finite:
                optimizer.zero_grad(set_to_none=True)
                break
            before_optimizer_step()
            optimizer.step()
            result.metrics["optimizer_steps"] += 1
            grad_norms.append(grad_norm.item())
        if not result.finite:
            break
    if grad_norms:
        result.metrics.update(grad_norm=grad_norms[0], grad_norm_max=max(grad_norms))
    result.metrics.update(diag.summary())
    return result


def _mini_batches(batch: RolloutBatch, trained: set[int], s: UpdateSettings) -> list[MiniBatch]:
    """The batch's slices of whole groups (`group_slices`), each with its own normalisers."""
    if s.mini_batches == 1:
        parts = [list(range(len(batch)))] if len(batch) else []
    else:
        group_size = s.loss_kwargs.get("group_size")
        if group_size is None:
            raise ValueError("mini_batches > 1 cuts the batch at group boundaries: pass group_size in loss_kwargs")
        parts = group_slices(len(batch), group_size, s.mini_batches)
        if 0 < len(parts) < s.mini_batches:  # only dynamic sampling keeps fewer groups than prompts_per_step
            warnings.warn(f"the batch holds {len(parts)} groups, fewer than mini_batches = {s.mini_batches}: "
                          f"one mini-batch per group this step", stacklevel=3)
    out = []
    for rows in parts:
        idx = torch.as_tensor(rows, dtype=torch.long)
        mask = batch.mask[idx]
        out.append(MiniBatch(rows, [i for i in rows if i in trained],
                             normalizer(s.loss, batch.advantages[idx], mask, **s.loss_kwargs),
                             mask.sum().clamp(min=1)))
    return out


def _backward(batch: RolloutBatch, mb: MiniBatch, s: UpdateSettings, old_logprobs: Tensor,
              diag: UpdateDiagnostics, token_stats, reference_logp, *, first_look: bool, epoch: int) -> bool:
    """Accumulate one mini-batch's gradient, micro-batch by micro-batch; False at a non-finite loss.

    `first_look`: no optimizer step has been taken on this batch yet, so this pass is the
    pre-update policy (its taxonomy, its mismatch to μ, and π_old against the trainer).
    Loss counts come from the last epoch (where ratios have left 1), KL counts from the first.
    """
    mask, advantages = batch.mask, batch.advantages
    for rows in batch.micro_batches(mb.trained, s.micro_batch_size):
        stats = token_stats(rows)
        logp, m = stats.logp, mask[rows].to(stats.logp.device)
        mu = batch.old_logprobs[rows].to(logp.device)
        if first_look:
            diag.add_stats(rows, stats)
            diag.add_mismatch(logp, mu, m)
            if s.ratio_against == "trainer":
                old_logprobs[rows] = logp.detach().to(old_logprobs.dtype).cpu()
        old = old_logprobs[rows].to(logp.device)
        weights = tis_weights(old, mu, m, cap=s.tis_cap) if s.tis_cap > 0 else None
        out = policy_loss(s.loss, logp, old, advantages[rows].to(logp.device), m, normalizer=mb.normalizer,
                          token_weights=weights, **s.loss_kwargs)
        loss = out.loss
        if s.kl_beta > 0:
            kl = kl_penalty(logp, reference_logp(rows), m, beta=s.kl_beta, estimator=s.kl_estimator,
                            normalizer=mb.kl_normalizer)
            loss = loss + kl.loss
            if epoch == 0:
                diag.add_kl_counts(kl.counts)
        if not torch.isfinite(loss):
            return False
        loss.backward()
        if epoch == s.updates_per_batch - 1:
            diag.add_loss_counts(out.counts)
    return True


@torch.no_grad()
def _pre_update_pass(batch: RolloutBatch, rows: list[int], old_logprobs: Tensor, diag: UpdateDiagnostics,
                     token_stats, micro_batch_size: int) -> None:
    """π_old of rows first trained after an optimizer step, from the policy before any step.

    Against the trainer every row's π_old is the pre-update policy: the rows of slices 2..k get
    it from this no-grad pass (their taxonomy and sampler mismatch too), run before the first
    optimizer step.
    """
    for part in batch.micro_batches(rows, micro_batch_size):
        stats = token_stats(part)
        diag.add_stats(part, stats)
        diag.add_mismatch(stats.logp, batch.old_logprobs[part].to(stats.logp.device),
                          batch.mask[part].to(stats.logp.device))
        old_logprobs[part] = stats.logp.to(old_logprobs.dtype).cpu()


def _taxonomy_without_training_pass(batch, rows, diag, token_stats, sampler_stats, micro_batch_size, *,
                                    pass_if_unrecorded: bool) -> None:
    """The taxonomy of rows no pre-update pass sees: from sampling, or a no-grad pass."""
    if not rows:
        return
    recorded = sampler_stats(rows)
    if recorded is not None:
        diag.add_stats(rows, recorded)
    elif pass_if_unrecorded:
        with torch.no_grad():
            for part in batch.micro_batches(rows, micro_batch_size):
                diag.add_stats(part, token_stats(part))
