"""The single-machine RLVR trainer: sample → score → advantages → loss → step → log.

One step draws `prompts_per_step` problems, samples `samples_per_prompt` completions of each
(one group per problem), grades them, turns rewards into advantages, and updates the policy
with any objective of `wapo.LOSSES`. How a WAPO step differs from a GRPO step here:

1. Advantages are `group_mean` (no division by the group's std).
2. Only winners (A > 0) carry gradient; losers and zero-advantage rows are left out of the
   backward pass altogether (`rows_with_gradient`), and get a no-grad pass for diagnostics.
3. The ratio is clipped from above only, at 1 + ε_high = 10.
4. The loss is normalised by the constant B·L, so fewer winners means a smaller step.

Every step logs rewards, the token taxonomy (SPEC.md) of all sampled tokens, clipping, ratio
and KL statistics, gradient norm, times and memory (docs/metrics.md).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import signal
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from wapo import checkpoint
from wapo.advantages import ADVANTAGES, compute_advantages
from wapo.batch import RolloutBatch, row_token_stats
from wapo.config import ConfigError, TrainConfig, dump_toml
from wapo.envs import make_env
from wapo.envs.base import Environment
from wapo.evaluate import evaluate
from wapo.losses import DEFAULT_ADVANTAGE, LOSS_METRICS, LOSSES, check_hyperparameters, kl_penalty, normalizer, policy_loss, rows_with_gradient
from wapo.models import load_policy, load_tokenizer, resolve_device
from wapo.runlog import RunLog, plot_run
from wapo.sampling import rollout
from wapo.scoring import score_episodes
from wapo.taxonomy import TokenStats, taxonomy_bins


class TrainingStopped(RuntimeError):
    """Too many consecutive non-finite steps: the run stopped, its last good checkpoint kept."""


@dataclass
class Progress:
    """What a checkpoint must restore besides weights, optimizer and RNG."""

    step: int = 0
    data_position: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    reward_errors: int = 0


@dataclass
class Trainer:
    """Holds the run's objects; `fit()` is the loop."""

    config: TrainConfig
    run_dir: Path
    env: Environment
    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    reference: torch.nn.Module | None = None
    sampler: torch.nn.Module | None = None
    """A bfloat16 copy of the policy that samples (`bf16_sampling`); None samples with `model`."""
    progress: Progress = field(default_factory=Progress)
    log: RunLog | None = None
    resumed: bool = False
    _updated_mid_step: bool = False

    # ------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, env = self.config, self.env
        train_set = env.train_set()
        order = np.random.default_rng(cfg.run.seed).permutation(len(train_set))
        evals = {}
        if not self.resumed and cfg.run.eval_size > 0:
            evals["before"] = self.evaluate("before")
        bar = _progress_bar(cfg, self.progress.step)
        replay_rng = None  # RNG states a checkpoint of the current state must restore (None: current)
        try:
            with _interrupts_as_exception():
                while self.progress.step < cfg.run.steps:
                    replay_rng = checkpoint.rng_state()
                    step = self.progress.step + 1
                    samples = [train_set[order[(self.progress.data_position + i) % len(order)]]
                               for i in range(cfg.sampling.prompts_per_step)]
                    metrics = self.train_step(samples)
                    self.progress.step = step
                    self.progress.data_position += len(samples)
                    self._updated_mid_step, replay_rng = False, None
                    row = self.log.log_step(step, metrics)
                    _update_bar(bar, row)
                    if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.steps:
                        self.evaluate(f"step {step}")
                    if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps:
                        self.save()
        except KeyboardInterrupt:
            self._save_on_interrupt(replay_rng)
            raise
        finally:
            bar.close()
        if cfg.run.eval_size > 0:
            evals["after"] = self.evaluate("after")
        plot_run(self.run_dir)
        self.log.close()
        return evals

    def train_step(self, samples: list) -> dict:
        cfg = self.config
        g = cfg.sampling.samples_per_prompt
        t0 = time.perf_counter()
        policy = self.sampler if self.sampler is not None else self.model
        episodes = rollout(policy, self.tokenizer, self.env, samples, samples_per_prompt=g,
                           max_new_tokens=cfg.sampling.max_new_tokens, temperature=cfg.sampling.temperature,
                           top_p=cfg.sampling.top_p, max_observation_tokens=cfg.sampling.max_observation_tokens)
        t_sample = time.perf_counter() - t0
        scores = score_episodes(self.env, samples, episodes, g)
        self._record_reward_errors(scores)
        rewards = torch.tensor([r.score for r in scores.results], dtype=torch.float32)
        metrics = reward_metrics(rewards, scores, episodes, g)

        keep = groups_to_keep(rewards, g, cfg.algorithm.dynamic_sampling)
        advantages = compute_advantages(self.advantage_name, rewards[keep], g)
        batch = RolloutBatch.from_episodes([episodes[i] for i in keep.tolist()], advantages)
        t1 = time.perf_counter()
        metrics.update(self.update(batch))
        metrics.update(
            time_sample=t_sample, time_train=time.perf_counter() - t1, lr=self.scheduler.get_last_lr()[0],
            tokens_per_second=sum(e.model_tokens for e in episodes) / max(time.perf_counter() - t0, 1e-9),
            peak_memory_mb=_peak_memory_mb(), reward_errors_total=self.progress.reward_errors,
            skipped_steps_total=self.progress.skipped_steps,
            **{f"env_{k}": v for k, v in self.env.metrics().items()},
        )
        self.scheduler.step()
        self.log.log_completions(self.progress.step + 1, [
            {"prompt": self.env.prompt(samples[i // g])[-1]["content"], "completion": episodes[i].text,
             "reward": scores.results[i].score, "reason": scores.results[i].reason}
            for i in range(0, len(episodes), max(1, len(episodes) // max(cfg.run.log_completions, 1)))
        ][: cfg.run.log_completions])
        return metrics

    def update(self, batch: RolloutBatch) -> dict:
        """`updates_per_batch` optimizer steps on one batch; diagnostics of the first pass."""
        cfg, alg = self.config, self.config.algorithm
        loss_kwargs = dict(max_len=cfg.sampling.max_new_tokens, group_size=cfg.sampling.samples_per_prompt,
                           **alg.loss_options)
        norm = normalizer(alg.loss, batch.advantages, batch.mask, **loss_kwargs)
        all_rows = list(range(len(batch)))
        if alg.skip_zero_gradient_rows and alg.kl_beta == 0:  # the KL term has a gradient on every row
            with_grad = rows_with_gradient(alg.loss, batch.advantages, batch.mask, **loss_kwargs)
            trained = [i for i in all_rows if with_grad[i]]
        else:
            trained = all_rows
        skipped = sorted(set(all_rows) - set(trained))
        diag = _Diagnostics(batch)
        out = {"backward_rows": len(trained), "skipped_rows": len(skipped), "skipped_step": 0, "grad_norm": None}
        if alg.diagnose_skipped_rows and skipped:  # before the update: the policy that sampled them
            with torch.no_grad():
                for rows in batch.micro_batches(skipped, cfg.optim.micro_batch_size):
                    diag.add(rows, self._stats(batch, rows))
        for epoch in range(alg.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            finite = True
            for rows in batch.micro_batches(trained, cfg.optim.micro_batch_size):
                stats = self._stats(batch, rows)
                mask = batch.mask[rows].to(stats.logp.device)
                old = batch.old_logprobs[rows].to(stats.logp.device)
                loss_out = policy_loss(alg.loss, stats.logp, old, batch.advantages[rows].to(old.device), mask,
                                       normalizer=norm, **loss_kwargs)
                loss = loss_out.loss
                if alg.kl_beta > 0:
                    kl = kl_penalty(stats.logp, self._reference_logp(batch, rows), mask, beta=alg.kl_beta,
                                    estimator=alg.kl_estimator, normalizer=batch.mask.sum().clamp(min=1))
                    loss = loss + kl.loss
                    if epoch == 0:
                        diag.add_metrics(kl.metrics, weight=float(mask.sum()))
                if not torch.isfinite(loss):
                    finite = False
                    break
                loss.backward()
                if epoch == 0:  # the taxonomy of the policy that sampled
                    diag.add(rows, stats)
                if epoch == alg.updates_per_batch - 1:  # ratios and clipping bite after the first update
                    diag.add_metrics(loss_out.metrics, weight=float(mask.sum()))
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.max_grad_norm) \
                if finite and trained else torch.tensor(0.0)
            if not finite or not torch.isfinite(grad_norm):
                self._skip_bad_step()
                out["skipped_step"] = 1
                break
            self.progress.bad_steps = 0
            self.optimizer.step()  # parameters without a gradient (nothing trained) stay as they are
            self._updated_mid_step = True
            self._sync_sampler()
            if epoch == 0:
                out["grad_norm"] = grad_norm.item()
        out.update(diag.summary())
        return out

    # ------------------------------------------------------------------------------------
    # Helpers of the loop
    # ------------------------------------------------------------------------------------
    @property
    def advantage_name(self) -> str:
        return self.config.algorithm.advantage or DEFAULT_ADVANTAGE[self.config.algorithm.loss]

    def _stats(self, batch: RolloutBatch, rows: list[int]) -> TokenStats:
        return row_token_stats(self.model, batch, rows, temperature=self.config.sampling.temperature,
                               chunk_size=self.config.run.taxonomy_chunk_size,
                               autocast_dtype=torch.bfloat16 if self.config.model.bf16 else None,
                               share_prompts=self.config.model.share_prompts)

    @torch.no_grad()
    def _reference_logp(self, batch: RolloutBatch, rows: list[int]) -> torch.Tensor:
        if self.reference is None:  # LoRA: the reference is the base model with adapters off
            with self.model.disable_adapter():
                return self._stats(batch, rows).logp
        return row_token_stats(self.reference, batch, rows, temperature=self.config.sampling.temperature,
                               chunk_size=self.config.run.taxonomy_chunk_size).logp

    @torch.no_grad()
    def _sync_sampler(self) -> None:
        if self.sampler is not None:
            for mine, theirs in zip(self.sampler.parameters(), self.model.parameters()):
                mine.copy_(theirs)

    def _skip_bad_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.bad_steps += 1
        self.progress.skipped_steps += 1
        warnings.warn(f"step {self.progress.step + 1}: non-finite loss or gradient, update skipped "
                      f"({self.progress.bad_steps} in a row)", stacklevel=2)
        if self.progress.bad_steps >= self.config.run.max_bad_steps:
            last = checkpoint.latest(self.run_dir)
            raise TrainingStopped(
                f"{self.progress.bad_steps} consecutive non-finite steps: stopping. Last good checkpoint: "
                f"{last or 'none (no checkpoint was written yet)'}. Try a lower --lr or --max-grad-norm."
            )

    def _record_reward_errors(self, scores) -> None:
        if scores.errors and self.progress.reward_errors == 0:
            (self.run_dir / "reward_errors.log").write_text(scores.tracebacks[0])
            warnings.warn(f"the reward function raised; such completions score 0 and are counted "
                          f"(first traceback in {self.run_dir / 'reward_errors.log'})", stacklevel=2)
        self.progress.reward_errors += scores.errors

    def evaluate(self, when: str) -> dict:
        cfg = self.config
        samples = list(self.env.eval_set())[: cfg.run.eval_size]
        results = evaluate(self.model, self.tokenizer, self.env, samples, k=cfg.run.eval_samples,
                           temperature=cfg.sampling.temperature, max_new_tokens=cfg.sampling.max_new_tokens,
                           top_p=cfg.sampling.top_p, max_observation_tokens=cfg.sampling.max_observation_tokens)
        self.log.log_eval(self.progress.step, when, results)
        print(f"[eval {when}] " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in results.items()), flush=True)
        return results

    def _save_on_interrupt(self, replay_rng: dict | None) -> None:
        """Checkpoint unless the interrupted step had already moved the weights.

        Before that, the state is step k's, to be replayed from the RNG states the step began
        with; after it, the state is half of step k+1 and the last checkpoint is kept instead.
        """
        if self._updated_mid_step:
            last = checkpoint.latest(self.run_dir)
            print(f"\nInterrupted inside an update: nothing saved; the last checkpoint is {last}.")
            return
        self.save(rng=replay_rng)
        print(f"\nInterrupted: checkpoint of step {self.progress.step} written; "
              f"continue with `wapo train --resume {self.run_dir}`.")

    def save(self, rng: dict | None = None) -> Path:
        return checkpoint.save(self.run_dir, self.progress.step, self.model, self.optimizer, self.scheduler,
                               dataclasses.asdict(self.progress), keep=self.config.run.keep_checkpoints, rng=rng)


# ----------------------------------------------------------------------------------------
# Building a trainer
# ----------------------------------------------------------------------------------------


def build_trainer(config: TrainConfig, *, resume: str | Path | None = None) -> Trainer:
    """Validate every name first (no work is lost to a typo), then load model and state."""
    alg = config.algorithm
    LOSSES.check(alg.loss)
    ADVANTAGES.check(alg.advantage or DEFAULT_ADVANTAGE[alg.loss])
    env = make_env(config.env.env, config.env.env_options)
    _check_loss_options(config)
    run_dir = Path(resume) if resume else _new_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_toml(config))

    _seed_everything(config.run.seed)
    if config.model.threads:
        torch.set_num_threads(config.model.threads)
    device = resolve_device(config.model.device)
    tokenizer = load_tokenizer(config.model.model)
    model = load_policy(config.model.model, device=device, lora_rank=config.model.lora_rank,
                        lora_alpha=config.model.lora_alpha,
                        gradient_checkpointing=config.model.gradient_checkpointing)
    reference = None
    if alg.kl_beta > 0 and config.model.lora_rank == 0:
        reference = load_policy(config.model.model, device=device).eval().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    progress = Progress()
    resume_step = None
    if resume:
        last = checkpoint.latest(run_dir)
        if last is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints to resume from")
        fields = checkpoint.load(last, model, optimizer, scheduler)
        progress = Progress(**{k: fields[k] for k in dataclasses.asdict(progress)})
        resume_step = progress.step
        print(f"Resuming {run_dir} from step {progress.step}")
    sampler = None
    if config.model.bf16_sampling:
        sampler = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
    trainer = Trainer(config, run_dir, env, model, tokenizer, optimizer, scheduler, reference, sampler, progress)
    trainer.log = RunLog(run_dir, resume_step=resume_step)
    trainer.resumed = resume_step is not None
    return trainer


def train(config: TrainConfig, *, resume: str | Path | None = None) -> tuple[Path, dict]:
    trainer = build_trainer(config, resume=resume)
    return trainer.run_dir, trainer.fit()


def _check_loss_options(config: TrainConfig) -> None:
    options = dict(config.algorithm.loss_options)
    try:
        check_hyperparameters(config.algorithm.loss, options)
        if "normalizer" in options:
            raise TypeError("the trainer sets `normalizer` itself")
    except TypeError as exc:
        raise ConfigError(f"--loss-options: {exc}") from None


def _new_run_dir(config: TrainConfig) -> Path:
    if config.run.output_dir:
        return Path(config.run.output_dir)
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{config.algorithm.loss}"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _schedule(config: TrainConfig):
    warmup, total, kind = config.optim.warmup_steps, config.run.steps, config.optim.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total - warmup)
        return {"constant": 1.0, "linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[kind]

    return factor


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def groups_to_keep(rewards: torch.Tensor, group_size: int, dynamic_sampling: bool) -> torch.Tensor:
    """Row indices kept for the update: all, or (DAPO) those of groups with mixed rewards."""
    rows = torch.arange(rewards.numel())
    if not dynamic_sampling:
        return rows
    grouped = rewards.view(-1, group_size)
    mixed = grouped.max(-1).values > grouped.min(-1).values
    return rows.view(-1, group_size)[mixed].flatten()


def reward_metrics(rewards, scores, episodes, group_size: int) -> dict:
    """What the sampled batch earned: rewards, accuracy, mixed groups, lengths, truncation."""
    grouped = rewards.view(-1, group_size)
    lengths = torch.tensor([e.model_tokens for e in episodes], dtype=torch.float32)
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "accuracy": sum(r.correct for r in scores.results) / len(scores.results),
        "mixed_group_frac": (grouped.max(-1).values > grouped.min(-1).values).float().mean().item(),
        "completion_len": lengths.mean().item(),
        "truncated_frac": sum(not e.finished for e in episodes) / len(episodes),
        "reward_errors": scores.errors,
    }


class _Diagnostics:
    """Collects per-token statistics and loss metrics over micro-batches into batch tensors."""

    def __init__(self, batch: RolloutBatch):
        self.batch = batch
        shape = batch.mask.shape
        self.seen = torch.zeros(shape[0], dtype=torch.bool)
        self.fields = {k: torch.zeros(shape) for k in ("logp", "entropy", "collision", "pred_dlogp", "pred_dentropy")}
        self.is_peak = torch.zeros(shape, dtype=torch.bool)
        self.loss_metrics: list[tuple[dict, float]] = []

    def add(self, rows: list[int], stats: TokenStats) -> None:
        idx = torch.as_tensor(rows)
        self.seen[idx] = True
        for k in self.fields:
            self.fields[k][idx] = getattr(stats, k).detach().float().cpu()
        self.is_peak[idx] = stats.is_peak.cpu()

    def add_metrics(self, metrics: dict, weight: float) -> None:
        self.loss_metrics.append(({k: v.detach().float().cpu() for k, v in metrics.items()}, float(weight)))

    def summary(self) -> dict:
        b = self.batch
        mask = b.mask & self.seen.unsqueeze(-1)
        stats = TokenStats(is_peak=self.is_peak, **self.fields)
        out = {k: v.item() for k, v in taxonomy_bins(stats, b.advantages, mask).items()}
        n = mask.sum().clamp(min=1)
        out["entropy"] = (self.fields["entropy"] * mask).sum().item() / n.item()
        # k3 estimate of KL(μ‖π) from tokens sampled by μ: r = π/μ, k3 = (r − 1) − log r
        log_r = torch.where(mask, self.fields["logp"] - b.old_logprobs, torch.zeros(()))
        out["kl_behaviour"] = ((torch.expm1(log_r) - log_r) * mask).sum().item() / n.item()
        out.update(_merge_loss_metrics(self.loss_metrics))
        return out


def _merge_loss_metrics(items: list[tuple[dict, float]]) -> dict:
    """Micro-batch metrics to batch metrics: counts add, extremes take max/min, rest token-weighted."""
    out: dict = {key: None for key in LOSS_METRICS}  # stable keys: null when no row trained
    out.update(grad_rows=0, grad_tokens=0)
    for key in dict.fromkeys(k for m, _ in items for k in m):
        values = [(m[key], w) for m, w in items if key in m]
        if key in ("grad_rows", "grad_tokens"):
            out[key] = sum(v.item() for v, _ in values)
        elif key.endswith("_max"):
            out[key] = max(v.item() for v, _ in values)
        elif key.endswith("_min"):
            out[key] = min(v.item() for v, _ in values)
        elif key != "normalizer":
            total = sum(w for _, w in values) or 1.0
            out[key] = sum(v.item() * w for v, w in values) / total
    return out


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _progress_bar(config: TrainConfig, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.run.steps, initial=start, desc="train", unit="step", disable=not config.run.progress,
                dynamic_ncols=True)


def _update_bar(bar, row: dict) -> None:
    bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.2f}",
                    entropy=f"{row['entropy']:.2f}", s_step=f"{row['time_sample'] + row['time_train']:.0f}")
    bar.update(1)


@contextmanager
def _interrupts_as_exception():
    """SIGTERM behaves like Ctrl-C (both end with a checkpoint)."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler) if _main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
