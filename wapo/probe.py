"""`wapo probe`: the token taxonomy's forecasts against real updates of a real model.

For each of `batches` sampled batches (the trainer's own sampling, grading and advantages),
the policy's statistics of every sampled token are taken (`Trainer.token_stats`), one update
is applied, the same tokens are scored again, and per bin (`pos`/`neg` × `peak`/`valley`, from
the statistics before the update) it counts how often the real change agrees in sign with the
forecast of docs/math.md ("First-order forecasts"):

    Δ log p_s   forecast sign(A)                    (pred_dlogp = 1 − 2p_s + C ≥ 0, times ηA)
    ΔH          forecast sign(A · pred_dentropy)    (at the token's position)

Three updates, each from the same starting weights (restored after each):

    logits   the exact policy-gradient step on each position's own logits, nothing shared:
             z ← z + η·A·(onehot(s) − softmax(z)), in float64. Δ log p_s has the sign of A for
             every η (each gap z_s − z_k moves by ηA·(1 − p_s + p_k)), and Δ/(ηA) → the
             forecast as η → 0.
    sgd      one update of the configured objective (`Trainer.update`: micro-batches, clipping)
             on every trainable parameter with plain SGD at `sgd_lr`
    adamw    the same update with the trainer's AdamW in its initial state (lr = optim.lr)

Agreement is `real · forecast > 0`: a token whose real change is exactly 0 disagrees.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import defaultdict

import torch
from torch import Tensor

from wapo.advantages import compute_advantages
from wapo.batch import RolloutBatch
from wapo.config import TrainConfig
from wapo.taxonomy import BINS, TokenStats, token_stats

UPDATES = ("logits", "sgd", "adamw")
PROBE_BINS = tuple(b for b in BINS if b != "zero") + ("all",)
"""The four bins that an update moves, and "all" (every token with A ≠ 0)."""


def logit_step_deltas(logits: Tensor, tokens: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """(Δ log p_s, ΔH) of the exact step z ← z + step·(onehot(s) − softmax(z)) at each position.

    logits (N, V) at the sampling temperature, tokens (N,), step (N,) = η·A of each position's
    row. Computed in float64 with `wapo.taxonomy.token_stats` before and after.
    """
    z = logits.double()
    before = token_stats(z, tokens)
    direction = torch.nn.functional.one_hot(tokens, z.shape[-1]).double() - torch.softmax(z, -1)
    after = token_stats(z + step.double().unsqueeze(-1) * direction, tokens)
    return after.logp - before.logp, after.entropy - before.entropy


class Tally:
    """Per update and bin: tokens, sign agreements, sums of real and forecast changes."""

    def __init__(self):
        self.sums: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def add(self, update: str, before: TokenStats, dlogp: Tensor, dentropy: Tensor, advantages: Tensor,
            mask: Tensor) -> None:
        """Fold in one batch: `before` fields and the real changes are (B, T); advantages (B,).

        Counted on the CPU: the batch's tensors live there, the model's (and so `before`'s and an
        update's real changes) on the model's device.
        """
        dlogp, dentropy, mask, is_peak = dlogp.cpu(), dentropy.cpu(), mask.cpu(), before.is_peak.cpu()
        sign = advantages.cpu().sign().unsqueeze(-1).expand_as(mask).to(dlogp.dtype)
        forecast_h = sign * before.pred_dentropy.cpu().to(dlogp.dtype)
        cells = {"pos_peak": (sign > 0) & is_peak, "pos_valley": (sign > 0) & ~is_peak,
                 "neg_peak": (sign < 0) & is_peak, "neg_valley": (sign < 0) & ~is_peak,
                 "all": sign != 0}
        for name, cell in cells.items():
            cell = cell & mask
            s = self.sums[(update, name)]
            s["tokens"] += cell.sum().item()
            s["dlogp_agree"] += (cell & (dlogp * sign > 0)).sum().item()
            s["dentropy_agree"] += (cell & (dentropy * forecast_h > 0)).sum().item()
            s["dlogp"] += dlogp[cell].sum().item()
            s["dentropy"] += dentropy[cell].sum().item()

    def rows(self) -> list[dict]:
        """One dict per (update, bin): tokens, agreement rates, mean real Δ log p and ΔH (None if no token)."""
        out = []
        for update in UPDATES:
            for name in PROBE_BINS:
                s = self.sums.get((update, name))
                if s is None:
                    continue
                per_token = {k: (v / s["tokens"] if s["tokens"] else None) for k, v in s.items()}
                out.append({"update": update, "bin": name, "tokens": int(s["tokens"]),
                            "dlogp_agree": per_token["dlogp_agree"], "dentropy_agree": per_token["dentropy_agree"],
                            "mean_dlogp": per_token["dlogp"], "mean_dentropy": per_token["dentropy"]})
        return out


def probe(config: TrainConfig, *, batches: int = 5, logit_eta: float = 0.01, sgd_lr: float = 0.1,
          updates: tuple[str, ...] = UPDATES) -> list[dict]:
    """Sample `batches` batches with the config's policy and environment; `Tally.rows()` of the updates.

    The trainer is built in a temporary folder (nothing is left behind); the data order is the
    training run's (`run.seed`), one batch after the other.
    """
    from tqdm.auto import tqdm

    from wapo.trainer import build_trainer

    unknown = sorted(set(updates) - set(UPDATES))
    if unknown:
        raise ValueError(f"unknown update kind(s) {unknown}; known: {', '.join(UPDATES)}")
    tally = Tally()
    with tempfile.TemporaryDirectory() as tmp:
        run = dataclasses.replace(config.run, output_dir=tmp, eval_size=0, export_final=False, report_to="none")
        trainer = build_trainer(dataclasses.replace(config, run=run))
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        for group in trainer.optimizer.param_groups:  # optim.lr itself, not the first step of a warm-up
            group["lr"] = config.optim.lr
        adamw, adamw_state = trainer.optimizer, trainer.optimizer.state_dict()
        for _ in tqdm(range(batches), desc="probe", unit="batch", disable=not config.run.progress, dynamic_ncols=True):
            batch = _sample(trainer)
            rows = list(range(len(batch)))
            with torch.no_grad():
                before = trainer.token_stats(batch, rows)
            if "logits" in updates:
                dlogp, dentropy = _logit_step(trainer, batch, before, logit_eta)
                tally.add("logits", before, dlogp, dentropy, batch.advantages, batch.mask)
            for kind in ("sgd", "adamw"):
                if kind not in updates:
                    continue
                if kind == "adamw":
                    adamw.load_state_dict(adamw_state)  # the trainer's first step, whatever came before
                trainer.optimizer = adamw if kind == "adamw" else torch.optim.SGD(params, lr=sgd_lr)
                trainer.update(batch)
                with torch.no_grad():
                    after = trainer.token_stats(batch, rows)
                    for p, p0 in zip(params, start):
                        p.copy_(p0)
                trainer._sync_sampler()  # a bf16 sampler copy follows the restored weights
                tally.add(kind, before, after.logp - before.logp, after.entropy - before.entropy,
                          batch.advantages, batch.mask)
            trainer.optimizer = adamw
        trainer.log.close()
    return tally.rows()


def _sample(trainer) -> RolloutBatch:
    """One batch as the trainer's step draws it: sample and grade, advantages, tensors."""
    from wapo.trainer import groups_to_keep

    s, g = trainer.config.sampling, trainer.config.sampling.samples_per_prompt
    drawn = trainer.sample_and_score()
    trainer.progress.data_position += len(drawn.samples)
    rewards = torch.tensor([r.score for r in drawn.results], dtype=torch.float32)
    keep = groups_to_keep(rewards, g, trainer.config.algorithm.dynamic_sampling, s.prompts_per_step)
    advantages = compute_advantages(trainer.advantage_name, rewards[keep], g)
    return RolloutBatch.from_episodes([drawn.episodes[i] for i in keep.tolist()], advantages)


@torch.no_grad()
def _logit_step(trainer, batch: RolloutBatch, before: TokenStats, eta: float) -> tuple[Tensor, Tensor]:
    """(B, T) real Δ log p_s and ΔH of the per-position logit step, from the model's full logits."""
    model, temperature = trainer.model, trainer.config.sampling.temperature
    device = next(model.parameters()).device
    dlogp = torch.zeros(batch.mask.shape, dtype=torch.float64)
    dentropy = torch.zeros_like(dlogp)
    for i in range(len(batch)):
        n = batch.lengths[i]
        ids = torch.as_tensor(batch.prompt_ids[i] + batch.completion_ids[i, :n].tolist(), device=device)
        logits = model(input_ids=ids[None], use_cache=False).logits[0].double() / temperature
        cols = batch.mask[i].nonzero().squeeze(-1)
        p = len(batch.prompt_ids[i])
        step = eta * batch.advantages[i].double().expand(len(cols))
        dl, dh = logit_step_deltas(logits[p + cols - 1], batch.completion_ids[i, cols].to(device), step.to(device))
        dlogp[i, cols], dentropy[i, cols] = dl.cpu(), dh.cpu()
    return dlogp, dentropy


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (percentages of agreement, mean real changes)."""
    def pct(x):
        return "—" if x is None else f"{100 * x:.1f}%"

    def num(x):
        return "—" if x is None else f"{x:+.2e}"

    lines = [f"{'update':<7} {'bin':<11} {'tokens':>7} {'Δlogp sign':>11} {'ΔH sign':>8} {'mean Δlogp':>11} "
             f"{'mean ΔH':>10}"]
    for r in rows:
        lines.append(f"{r['update']:<7} {r['bin']:<11} {r['tokens']:>7} {pct(r['dlogp_agree']):>11} "
                     f"{pct(r['dentropy_agree']):>8} {num(r['mean_dlogp']):>11} {num(r['mean_dentropy']):>10}")
    return "\n".join(lines)
