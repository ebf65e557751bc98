"""What one update saw, merged over its micro-batches: taxonomy, sampler mismatch, loss metrics.

Everything is accumulated as per-token tensors or additive counts and turned into rates once,
at the end, so no logged number depends on how the batch was cut into micro-batches.

- Taxonomy (docs/math.md, "Token taxonomy"): the bins of every row whose statistics were
  added (rows in the backward pass from the trainer's first pass, the others from the sampler
  or a no-grad pass), weighted by tokens.
- Sampler mismatch on the rows the trainer recomputed: `mismatch_abs_logp` = mean |log π_old −
  log μ|, `kl_behaviour` = k3 estimate of KL(μ ‖ π_old) from tokens sampled by μ
  (r = π_old/μ, k3 = (r − 1) − log r), `mismatch_ratio_max` = max π_old/μ.
- Loss metrics (`wapo.losses.LOSS_METRICS`) from the objective's counts of the last epoch
  (ratios and clipping bite after the first optimizer step), and `kl_ref` from the KL counts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wapo.losses import LOSS_METRICS, merge_counts, metrics_from_counts
from wapo.taxonomy import TokenStats, taxonomy_bins

_FIELDS = ("logp", "entropy", "collision", "pred_dlogp", "pred_dentropy")


class UpdateDiagnostics:
    """Collects one update's per-token statistics and counts; `summary()` gives the step metrics."""

    def __init__(self, mask: Tensor, advantages: Tensor, *, kl: bool = False):
        self.mask, self.advantages, self.kl = mask, advantages, kl
        self.seen = torch.zeros(mask.shape[0], dtype=torch.bool)
        self.fields = {k: torch.zeros(mask.shape) for k in _FIELDS}
        self.is_peak = torch.zeros(mask.shape, dtype=torch.bool)
        self.loss_counts: list[dict[str, Tensor]] = []
        self.kl_counts: list[dict[str, Tensor]] = []
        self.mismatch: list[dict[str, Tensor]] = []

    def add_stats(self, rows: list[int], stats: TokenStats) -> None:
        """Per-token statistics (len(rows), T) of `rows` under the policy that sampled them."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        self.seen[idx] = True
        for k in _FIELDS:
            self.fields[k][idx] = getattr(stats, k).detach().float().cpu()
        self.is_peak[idx] = stats.is_peak.cpu()

    def add_mismatch(self, old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor) -> None:
        """Trainer π_old against sampler μ on one micro-batch's tokens, as counts."""
        log_r = torch.where(mask, old_logprobs.detach().float() - behaviour_logprobs.float(), torch.zeros(()))
        self.mismatch.append({
            "abs_sum": log_r.abs().sum(), "k3_sum": ((torch.expm1(log_r) - log_r) * mask).sum(),
            "tokens": mask.sum(), "ratio_max": torch.where(mask, log_r, torch.tensor(float("-inf"))).max().exp(),
        })

    def add_loss_counts(self, counts: dict[str, Tensor]) -> None:
        self.loss_counts.append(counts)

    def add_kl_counts(self, counts: dict[str, Tensor]) -> None:
        self.kl_counts.append(counts)

    def summary(self) -> dict[str, float | None]:
        mask = self.mask & self.seen.unsqueeze(-1)
        stats = TokenStats(is_peak=self.is_peak, **self.fields)
        seen = mask.sum().item()
        out: dict[str, float | None] = {k: v.item() for k, v in taxonomy_bins(stats, self.advantages, mask).items()}
        out["entropy"] = (self.fields["entropy"] * mask).sum().item() / max(seen, 1)
        if not seen:  # an empty batch: no token to describe (0 would read as collapse)
            out.update({k: None for k in out if not k.endswith("_count")})
        out.update(dict.fromkeys(LOSS_METRICS), grad_rows=0, grad_tokens=0)  # stable keys: null when nothing trained
        if self.loss_counts:
            out.update({k: v.item() for k, v in metrics_from_counts(merge_counts(self.loss_counts)).items()})
        out.update(kl_behaviour=None, mismatch_abs_logp=None, mismatch_ratio_max=None)
        if self.mismatch:
            m = merge_counts(self.mismatch)
            n = max(m["tokens"].item(), 1)
            out.update(kl_behaviour=m["k3_sum"].item() / n, mismatch_abs_logp=m["abs_sum"].item() / n,
                       mismatch_ratio_max=m["ratio_max"].item() if m["tokens"] > 0 else None)
        if self.kl:
            k = merge_counts(self.kl_counts)
            out["kl_ref"] = k["kl_sum"].item() / max(k["kl_tokens"].item(), 1) if self.kl_counts else None
        return out
