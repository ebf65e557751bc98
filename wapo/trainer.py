"""The single-machine RLVR trainer: sample → score → advantages → update → log → checkpoint.

One step draws `prompts_per_step` problems, samples `samples_per_prompt` completions of each
(one group per problem), grades them, turns rewards into advantages, and updates the policy
with any objective of `wapo.LOSSES` (`wapo.update`). How a WAPO step differs from a GRPO
step here:

1. Advantages are `group_mean` (no division by the group's std).
2. Only winners (A > 0) carry gradient; losers and zero-advantage rows are left out of the
   backward pass altogether (`rows_with_gradient`); their taxonomy comes from sampling.
3. The ratio is clipped from above only, at 1 + ε_high = 10.
4. The loss is normalised by the constant B·L, so fewer winners means a smaller step.

Every step logs rewards, the token taxonomy (docs/math.md) of all sampled tokens, clipping,
ratio, sampler-mismatch and KL statistics, gradient norm, times and memory (docs/metrics.md).

A step is all or nothing. Ctrl-C or SIGTERM before its first optimizer step ends the run
with a checkpoint of the previous step and the RNG states this step began with, so
`--resume` replays it exactly; from the first optimizer step on, the interrupt waits until
the step is committed, logged and checkpointed. Counters (reward errors, bad steps) enter
the checkpointed progress only when their step is committed.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import random
import shutil
import signal
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import numpy as np
import torch

from wapo import checkpoint
from wapo.advantages import ADVANTAGES, compute_advantages
from wapo.batch import RolloutBatch, row_token_stats
from wapo.collapse import CollapseDetector
from wapo.config import ConfigError, TrainConfig, dump_toml, from_dict, load_file, to_dict
from wapo.envs import make_env
from wapo.envs.base import Environment
from wapo.evaluate import evaluate
from wapo.losses import DEFAULT_ADVANTAGE, LOSSES, check_hyperparameters
from wapo.models import load_policy, load_tokenizer, native_bf16, resolve_device
from wapo.runlog import RunLog, plot_run, report_sinks
from wapo.sampling import rollout
from wapo.scoring import score_episodes
from wapo.taxonomy import TokenStats
from wapo.update import UpdateResult, UpdateSettings, update_policy


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
    collapse: dict = field(default_factory=dict)
    """The collapse detector's state (`wapo.collapse`), so a resumed run flags as an uninterrupted one."""


@dataclass(frozen=True)
class Precision:
    """The run's `auto` settings resolved for this hardware (derived, never written to the config)."""

    bf16: bool
    bf16_sampling: bool
    ratio_against: str

    @classmethod
    def resolve(cls, config: TrainConfig, device: torch.device) -> Precision:
        m, native = config.model, native_bf16(device)
        bf16 = native if m.bf16 == "auto" else m.bf16 == "true"
        bf16_sampling = native if m.bf16_sampling == "auto" else m.bf16_sampling == "true"
        against = config.algorithm.ratio_against
        if against == "auto":  # the sampler's numerics are the trainer's only when neither is bf16
            against = "trainer" if bf16 or bf16_sampling else "sampler"
        return cls(bf16, bf16_sampling, against)

    def save(self, run_dir: Path) -> None:
        (run_dir / "precision.json").write_text(json.dumps(dataclasses.asdict(self)) + "\n")

    @classmethod
    def recorded(cls, run_dir: Path) -> Precision | None:
        """What the run resolved when it started: a resumed run keeps it on any hardware."""
        path = run_dir / "precision.json"
        return cls(**json.loads(path.read_text())) if path.is_file() else None

    def describe(self) -> str:
        on = {True: "on", False: "off"}
        return (f"bf16 autocast {on[self.bf16]}, bf16 sampler {on[self.bf16_sampling]}, "
                f"importance ratio against the {self.ratio_against}")


@dataclass
class Sampled:
    """One step's graded groups (rows of a group adjacent)."""

    samples: list
    episodes: list
    results: list
    errors: int = 0
    rounds: int = 0


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
    precision: Precision
    reference: torch.nn.Module | None = None
    """The KL reference when it is a separate model; None with LoRA (the base model, adapters off)."""
    sampler: torch.nn.Module | None = None
    """A copy of the policy that samples: bfloat16 (`bf16_sampling`) and/or one update behind
    (`sampler_lag` = 1); None samples with `model`."""
    progress: Progress = field(default_factory=Progress)
    log: RunLog | None = None
    resumed: bool = False
    interrupts: InterruptGuard = field(default_factory=lambda: InterruptGuard())
    collapse: CollapseDetector = field(default_factory=CollapseDetector)

    def __post_init__(self):
        self.train_set = self.env.train_set()
        self.order = np.random.default_rng(self.config.run.seed).permutation(len(self.train_set))

    # ------------------------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.config
        evals = {}
        if not self.resumed and cfg.run.eval_size > 0:
            evals["before"] = self.evaluate("before")
        if self.resumed and self.eval_due(self.progress.step) and not self.log.evaluated(f"step {self.progress.step}"):
            self.evaluate(f"step {self.progress.step}")  # an interrupt had cut it short
        bar = _progress_bar(cfg, self.progress.step)
        saved = self.progress.step if self.resumed else None  # the step the newest checkpoint holds
        replay_rng = None  # RNG states an interrupted, uncommitted step starts from
        try:
            with self.interrupts:
                while self.progress.step < cfg.run.steps:
                    replay_rng = checkpoint.rng_state()
                    metrics, counters = self.train_step()  # interrupts wait from its first optimizer step
                    self.interrupts.hold()
                    step = self.commit(counters)
                    replay_rng = None
                    flags = self.collapse.update(metrics, counters["texts"])
                    self.progress.collapse = self.collapse.state()
                    row = self.log.log_step(step, {**metrics, **flags, **self.totals()})
                    _update_bar(bar, row)
                    if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps:
                        self.save()
                        saved = step
                    self.interrupts.release()  # an interrupt that waited is raised here
                    self.stop_if_diverging()
                    if self.eval_due(step):
                        self.evaluate(f"step {step}")
        except KeyboardInterrupt:
            if saved != self.progress.step:
                self.save(rng=replay_rng)
            print(f"\nInterrupted: checkpoint of step {self.progress.step} in {self.run_dir}; "
                  f"continue with `wapo train --resume {self.run_dir}`.")
            raise
        finally:
            bar.close()
        if cfg.run.eval_size > 0:
            evals["after"] = self.evaluate("after")
        plot_run(self.run_dir)
        self.log.close()
        if cfg.run.export_final and self.progress.step > 0:
            self.export()
        return evals

    def export(self) -> Path:
        """The last checkpoint as a Hugging Face model folder, RUN_DIR/hf (replacing an older one)."""
        from wapo.export import export_run

        target = self.run_dir / "hf"
        if target.exists():  # a resumed run exports its new last step
            shutil.rmtree(target)
        return export_run(self.run_dir, target)

    def train_step(self) -> tuple[dict, dict]:
        """One step up to its commit: the step's metrics and the counters to commit."""
        cfg, g = self.config, self.config.sampling.samples_per_prompt
        t0 = time.perf_counter()
        drawn = self.sample_and_score()
        t_sample = time.perf_counter() - t0
        rewards = torch.tensor([r.score for r in drawn.results], dtype=torch.float32)
        keep = groups_to_keep(rewards, g, cfg.algorithm.dynamic_sampling, cfg.sampling.prompts_per_step)
        advantages = compute_advantages(self.advantage_name, rewards[keep], g)
        batch = RolloutBatch.from_episodes([drawn.episodes[i] for i in keep.tolist()], advantages)

        t1 = time.perf_counter()
        update = self.update(batch)
        self.interrupts.hold()  # nothing below may be half-done when an interrupt lands
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update used
        self.scheduler.step()
        metrics = {
            **reward_metrics(rewards, drawn, g), **update.metrics, "skipped_step": int(not update.finite),
            "time_sample": t_sample, "time_train": time.perf_counter() - t1, "lr": lr,
            "tokens_per_second": sum(e.model_tokens for e in drawn.episodes) / max(time.perf_counter() - t0, 1e-9),
            "peak_memory_mb": _peak_memory_mb(), **{f"env_{k}": v for k, v in self.env.metrics().items()},
        }
        self.log_completions(drawn)
        counters = {"prompts": len(drawn.samples), "reward_errors": drawn.errors, "finite": update.finite,
                    "texts": [e.text for e in drawn.episodes]}
        return metrics, counters

    def sample_and_score(self) -> Sampled:
        """Sample G completions of each of `prompts_per_step` prompts and grade them.

        With DAPO's dynamic sampling, further rounds of `prompts_per_step` prompts are drawn
        until `prompts_per_step` groups have mixed rewards or `max_sampling_rounds` is reached.
        """
        cfg, g = self.config, self.config.sampling.samples_per_prompt
        s, need = cfg.sampling, cfg.sampling.prompts_per_step
        drawn = Sampled(samples=[], episodes=[], results=[])
        policy = self.sampler if self.sampler is not None else self.model
        while True:
            start = self.progress.data_position + len(drawn.samples)
            samples = [self.train_set[self.order[(start + i) % len(self.order)]] for i in range(need)]
            episodes = rollout(policy, self.tokenizer, self.env, samples, samples_per_prompt=g,
                               max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                               max_observation_tokens=s.max_observation_tokens)
            scores = score_episodes(self.env, samples, episodes, g)
            check_reward_parts(scores.results)  # a bad name fails here, before any optimizer step
            self._record_reward_errors(scores)
            drawn.samples += samples
            drawn.episodes += episodes
            drawn.results += scores.results
            drawn.errors += scores.errors
            drawn.rounds += 1
            if not cfg.algorithm.dynamic_sampling or drawn.rounds >= cfg.algorithm.max_sampling_rounds:
                return drawn
            rewards = torch.tensor([r.score for r in drawn.results]).view(-1, g)
            if int((rewards.max(-1).values > rewards.min(-1).values).sum()) >= need:
                return drawn

    def update(self, batch: RolloutBatch) -> UpdateResult:
        """`updates_per_batch × mini_batches` optimizer steps on `batch` (`wapo.update`); interrupts
        wait from the first.

        The sampler copy follows the policy: with `sampler_lag` 0 it takes the update's result
        at its end (from the first optimizer step on the step cannot be cut short, so nothing
        samples in between); with 1 it takes the weights this update starts from, once the step
        can no longer be cut short (at its first optimizer step, or at the end of an update that
        took none), so a step replayed after an interrupt samples with the same stale weights.
        """
        lagged, synced = self.config.algorithm.sampler_lag == 1, []

        def before_optimizer_step() -> None:
            self.interrupts.hold()
            if lagged and not synced:
                self._sync_sampler()
                synced.append(True)

        result = update_policy(
            batch, self.update_settings, optimizer=self.optimizer,
            params=[p for p in self.model.parameters() if p.requires_grad],
            token_stats=partial(self.token_stats, batch), reference_logp=partial(self.reference_logp, batch),
            sampler_stats=batch.recorded_stats, before_optimizer_step=before_optimizer_step,
        )
        if not lagged or not synced:  # lag 0: the update's result; lag 1 without a step: the weights it started from
            self.interrupts.hold()
            self._sync_sampler()
        return result

    def commit(self, counters: dict) -> int:
        """Make the step part of the run's progress (the checkpointed state); returns its number."""
        p = self.progress
        p.step += 1
        p.data_position += counters["prompts"]
        p.reward_errors += counters["reward_errors"]
        if counters["finite"]:
            p.bad_steps = 0
        else:
            p.bad_steps += 1
            p.skipped_steps += 1
            warnings.warn(f"step {p.step}: non-finite loss or gradient, update skipped ({p.bad_steps} in a row)",
                          stacklevel=2)
        return p.step

    def totals(self) -> dict:
        return {"reward_errors_total": self.progress.reward_errors,
                "skipped_steps_total": self.progress.skipped_steps}

    def eval_due(self, step: int) -> bool:
        """A held-out evaluation after `step` (`eval_every`; the last step has the "after" one)."""
        every = self.config.run.eval_every
        return bool(every) and step % every == 0 and 0 < step < self.config.run.steps

    def stop_if_diverging(self) -> None:
        if self.progress.bad_steps >= self.config.run.max_bad_steps:
            last = checkpoint.latest(self.run_dir)
            raise TrainingStopped(
                f"{self.progress.bad_steps} consecutive non-finite steps: stopping. Last good checkpoint: "
                f"{last or 'none (no checkpoint was written yet)'}. Try a lower --lr or --max-grad-norm."
            )

    # ------------------------------------------------------------------------------------
    # Helpers of the loop
    # ------------------------------------------------------------------------------------
    @property
    def advantage_name(self) -> str:
        return self.config.algorithm.advantage or DEFAULT_ADVANTAGE[self.config.algorithm.loss]

    @property
    def update_settings(self) -> UpdateSettings:
        cfg, alg = self.config, self.config.algorithm
        return UpdateSettings(
            loss=alg.loss, ratio_against=self.precision.ratio_against, updates_per_batch=alg.updates_per_batch,
            mini_batches=alg.mini_batches,
            loss_kwargs=dict(max_len=cfg.sampling.max_new_tokens, group_size=cfg.sampling.samples_per_prompt,
                             **alg.loss_options),
            micro_batch_size=cfg.optim.micro_batch_size, max_grad_norm=cfg.optim.max_grad_norm,
            tis_cap=alg.tis_cap, kl_beta=alg.kl_beta, kl_estimator=alg.kl_estimator,
            skip_zero_gradient_rows=alg.skip_zero_gradient_rows, diagnose_skipped_rows=alg.diagnose_skipped_rows,
        )

    def token_stats(self, batch: RolloutBatch, rows: list[int], *, reference: bool = False) -> TokenStats:
        """The one log-probability pass, for the policy and for the KL reference alike.

        Same autocast, same prompt sharing, same chunked output layer: at step 1 the
        reference's log-probabilities equal the policy's, so the KL starts at 0.
        """
        model = self.reference if reference and self.reference is not None else self.model
        adapters_off = self.model.disable_adapter() if reference and self.reference is None else nullcontext()
        with adapters_off, torch.no_grad() if reference else nullcontext():
            return row_token_stats(model, batch, rows, temperature=self.config.sampling.temperature,
                                   chunk_size=self.config.run.taxonomy_chunk_size,
                                   autocast_dtype=torch.bfloat16 if self.precision.bf16 else None,
                                   share_prompts=self.shares_prompts)

    @property
    def shares_prompts(self) -> bool:
        """Whether passes run each prompt once: not under gradient checkpointing, which drops the
        KV cache the shared pass needs. Decided here, so policy and reference take one path."""
        return self.config.model.share_prompts and not self.config.model.gradient_checkpointing

    def reference_logp(self, batch: RolloutBatch, rows: list[int]) -> torch.Tensor:
        return self.token_stats(batch, rows, reference=True).logp

    def _sampler_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(the sampler copy's, the policy's) parameter for each weight training changes; the frozen
        ones (LoRA's base) the copy already holds, as they never change."""
        pairs = zip(self.sampler.parameters(), self.model.parameters(), strict=True)
        return [(mine, theirs) for mine, theirs in pairs if theirs.requires_grad]

    @torch.no_grad()
    def _sync_sampler(self) -> None:
        if self.sampler is not None:
            for mine, theirs in self._sampler_weights():
                mine.copy_(theirs)

    def _record_reward_errors(self, scores) -> None:
        if scores.errors and self.progress.reward_errors == 0:
            (self.run_dir / "reward_errors.log").write_text(scores.tracebacks[0])
            warnings.warn(f"the reward function raised; such completions score 0 and are counted "
                          f"(first traceback in {self.run_dir / 'reward_errors.log'})", stacklevel=2)

    def log_completions(self, drawn: Sampled) -> None:
        g, n = self.config.sampling.samples_per_prompt, self.config.run.log_completions
        stride = max(1, len(drawn.episodes) // max(n, 1))
        self.log.log_completions(self.progress.step + 1, [
            {"prompt": self.env.prompt(drawn.samples[i // g])[-1]["content"], "completion": drawn.episodes[i].text,
             "reward": drawn.results[i].score, "reason": drawn.results[i].reason}
            for i in range(0, len(drawn.episodes), stride)
        ][:n])

    def evaluate(self, when: str) -> dict:
        """Held-out greedy accuracy and pass@k, on an RNG of its own (training's stream is untouched).

        Of the current weights, in the sampler's precision, so that both `sampler_lag` settings
        evaluate the same weights alike: with `bf16_sampling` the bf16 sampler copy (under
        `sampler_lag` = 1 holding the current weights for the evaluation only), else the policy.
        """
        cfg = self.config
        samples = list(self.env.eval_set())[: cfg.run.eval_size]
        bf16 = self.sampler is not None and self.precision.bf16_sampling
        stale = bf16 and cfg.algorithm.sampler_lag == 1
        with self._current_sampler() if stale else nullcontext(), \
                torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # CPU and every GPU
            torch.manual_seed(cfg.run.seed + 1_000_003 * (self.progress.step + 1))
            results = evaluate(self.sampler if bf16 else self.model, self.tokenizer, self.env, samples,
                               k=cfg.run.eval_samples, temperature=cfg.sampling.temperature,
                               max_new_tokens=cfg.sampling.max_new_tokens, top_p=cfg.sampling.top_p,
                               max_observation_tokens=cfg.sampling.max_observation_tokens,
                               progress=cfg.run.progress, desc=f"eval {when}")
        self.log.log_eval(self.progress.step, when, results)
        print(f"[eval {when}] " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in results.items()), flush=True)
        return results

    @contextmanager
    def _current_sampler(self):
        """Inside: the sampler copy holds the policy's current weights. After, even when an interrupt
        cut the inside short: its own stale ones again (`sampler_lag` = 1), as a checkpoint saves them."""
        stash = [mine.detach().clone() for mine, _ in self._sampler_weights()]
        try:
            self._sync_sampler()
            yield
        finally:
            holding = self.interrupts.holding
            self.interrupts.hold()  # put back whole
            with torch.no_grad():
                for (mine, _), value in zip(self._sampler_weights(), stash, strict=True):
                    mine.copy_(value)
            if not holding:
                self.interrupts.release()  # an interrupt that waited is raised here

    def save(self, rng: dict | None = None) -> Path:
        lagged = self.config.algorithm.sampler_lag == 1  # then the sampler's weights are state of their own
        return checkpoint.save(self.run_dir, self.progress.step, self.model, self.optimizer, self.scheduler,
                               dataclasses.asdict(self.progress), keep=self.config.run.keep_checkpoints, rng=rng,
                               sampler=self.sampler if lagged else None)



# ----------------------------------------------------------------------------------------
# Building a trainer
# ----------------------------------------------------------------------------------------


def build_trainer(config: TrainConfig, *, resume: str | Path | None = None, overwrite: bool = False) -> Trainer:
    """Validate every name and the run folder first (no work is lost to a typo), then load."""
    alg = config.algorithm
    LOSSES.check(alg.loss)
    ADVANTAGES.check(alg.advantage or DEFAULT_ADVANTAGE[alg.loss])
    env = make_env(config.env.env, config.env.env_options)
    _check_loss_options(config)
    if "wandb" in config.run.report_to and importlib.util.find_spec("wandb") is None:
        raise ConfigError("--report-to wandb needs the wandb package: pip install wandb")
    try:
        collapse = CollapseDetector(**config.run.collapse_options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--collapse-options: {exc}") from None
    run_dir = Path(resume) if resume else _fresh_run_dir(config, overwrite=overwrite)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.toml"
    previous = from_dict(load_file(saved)) if resume and saved.is_file() else None
    config = _apply_threads(config, previous)
    # config.toml and precision.json are written only once everything below has loaded: a resume
    # that fails (no checkpoint, a checkpoint of another model) leaves the run's record as it was

    _seed_everything(config.run.seed)
    device = resolve_device(config.model.device)
    precision = (resume and Precision.recorded(run_dir)) or Precision.resolve(config, device)
    print(f"Precision: {precision.describe()}", flush=True)
    if alg.sampler_lag and alg.ratio_against == "auto" and precision.ratio_against == "trainer" and not alg.tis_cap:
        warnings.warn("--sampler-lag 1 samples with weights one update behind, but --ratio-against auto took the "
                      "ratio against the trainer (bf16 numerics), which starts at 1 and corrects nothing of that gap: "
                      "add --tis-cap (e.g. 2) to weight each token by π_old/μ, or set --ratio-against sampler "
                      "(docs/math.md, \"Mini-batches and a stale sampler\")", stacklevel=2)
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
    if resume:
        last = checkpoint.latest(run_dir)
        if last is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints to resume from (the run stopped "
                                    f"before its first step): start it again with --output-dir {run_dir} --overwrite")
        fields = checkpoint.load(last, model, optimizer, scheduler)
        _resume_schedule(scheduler, config, previous)
        progress = Progress(**{k: fields[k] for k in dataclasses.asdict(progress) if k in fields})
        if device.type == "cpu":  # on an accelerator the threads do not touch the model's numbers
            _warn_if_threads_changed(previous, config, progress.step)
        if progress.collapse:
            collapse.load_state(progress.collapse)
        print(f"Resuming {run_dir} from step {progress.step}")
    sampler = None
    if precision.bf16_sampling or alg.sampler_lag:
        sampler = copy.deepcopy(model).eval().requires_grad_(False)
        if precision.bf16_sampling:
            sampler = sampler.to(torch.bfloat16)
        if resume and alg.sampler_lag:  # one update behind the restored policy: its own weights
            checkpoint.load_sampler(last, sampler)
    saved.write_text(dump_toml(config))
    precision.save(run_dir)
    trainer = Trainer(config, run_dir, env, model, tokenizer, optimizer, scheduler, precision, reference, sampler,
                      progress, collapse=collapse)
    tensorboard, sinks = report_sinks(config.run.report_to, run_dir, to_dict(config))
    trainer.log = RunLog(run_dir, resume_step=progress.step if resume else None, tensorboard=tensorboard, sinks=sinks)
    trainer.resumed = resume is not None
    return trainer


def train(config: TrainConfig, *, resume: str | Path | None = None, overwrite: bool = False) -> tuple[Path, dict]:
    trainer = build_trainer(config, resume=resume, overwrite=overwrite)
    return trainer.run_dir, trainer.fit()


def _check_loss_options(config: TrainConfig) -> None:
    options = dict(config.algorithm.loss_options)
    try:
        check_hyperparameters(config.algorithm.loss, options)
        if "normalizer" in options or "token_weights" in options:
            raise TypeError("the trainer sets `normalizer` and `token_weights` itself")
    except TypeError as exc:
        raise ConfigError(f"--loss-options: {exc}") from None


RUN_FILES = ("config.toml", "precision.json", "metrics.jsonl", "completions.jsonl", "eval.jsonl", "reward_errors.log",
             "reward.png", "entropy.png", "taxonomy.png", "tensorboard", "checkpoints", "hf", "wandb", "wandb_run_id")
"""What a run writes in its folder: all that `--overwrite` removes."""


def _fresh_run_dir(config: TrainConfig, *, overwrite: bool) -> Path:
    """The new run's folder; one that already holds a run is never silently reused."""
    if not config.run.output_dir:
        return _claim_new_dir(Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{config.algorithm.loss}")
    path = Path(config.run.output_dir)
    if not path.exists() or not any(path.iterdir()):
        return path
    if not _holds_a_run(path):
        raise ConfigError(f"--output-dir {path} is not empty and holds no wapo run: choose a new or empty folder")
    if not overwrite:
        raise ConfigError(f"--output-dir {path} already holds a run: continue it with `wapo train --resume {path}` "
                          f"or replace it with --overwrite")
    for name in RUN_FILES:  # the run's own files only: anything else in the folder stays
        target = path / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    return path


def _holds_a_run(path: Path) -> bool:
    """A wapo run writes its resolved config.toml first: a folder holds one if that file reads as one."""
    try:
        from_dict(load_file(path / "config.toml"))
        return True
    except (OSError, ValueError):  # ConfigError and TOML errors are ValueErrors
        return False


def _claim_new_dir(base: Path) -> Path:
    """`base`, or `base-2`, `base-3`, ... : the first that did not exist (created here, so two runs
    started in the same second never share a folder)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run folder next to {base}")


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


def _apply_threads(config: TrainConfig, previous: TrainConfig | None) -> TrainConfig:
    """Set torch's CPU threads; the config with `model.threads` resolved, so config.toml records
    the count the run used. 0 resumes with the recorded count (`previous`: the run's config.toml),
    and starts a run with torch's default (which follows OMP_NUM_THREADS)."""
    threads = config.model.threads or (previous.model.threads if previous else 0) or torch.get_num_threads()
    torch.set_num_threads(threads)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, threads=threads))


def _warn_if_threads_changed(previous: TrainConfig | None, config: TrainConfig, step: int) -> None:
    """Warn when a resume runs on another CPU thread count than the run recorded (0: not recorded).

    The thread count sets the reduction order of CPU matmuls, so logits differ in their last
    bits and sampling draws other tokens (measured on the default run's step 1, docs/study.md:
    reward 0.3125 on 1 thread, 0.375 on 2 under bf16; in float32 equal rewards, but a completion
    and the gradient norm differ). Allowed, since a run may move to another machine."""
    old, new = (previous.model.threads if previous else 0), config.model.threads
    if old and old != new:
        warnings.warn(f"resumed with {new} CPU thread(s) where the run used {old}: from step {step + 1} on its "
                      f"numbers differ from an uninterrupted run's (the matmul reduction order changes, so other "
                      f"tokens are sampled: often under bf16, more rarely in float32); resume with --threads {old} "
                      f"to keep them", stacklevel=3)


def _resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, config: TrainConfig,
                     previous: TrainConfig | None) -> None:
    """Go on with the schedule `config` describes, from a just-loaded checkpoint's step on.

    previous: the run's config before this resume (its config.toml), None when it has none.
    A resume whose `lr`, `steps`, `warmup_steps` or `schedule` differ trains every later step t
    at lr · factor(t) of the new settings (a longer `--steps` stretches a decaying schedule: the
    rate rises again) and leaves the rates of the steps already taken as they were. It warns,
    naming each changed setting (old -> new) and the next step's rate, whenever the rate of any
    step still to run differs from the previous settings' (a constant schedule given more steps
    does not), or the next one from the rate the checkpoint planned. With the same settings this
    changes nothing: the rate is computed as the scheduler computes it.
    """
    step, planned = scheduler.last_epoch, scheduler.get_last_lr()
    scheduler.base_lrs = [config.optim.lr] * len(scheduler.base_lrs)
    rates = [base * _schedule(config)(step) for base in scheduler.base_lrs]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["initial_lr"], group["lr"] = config.optim.lr, rate
    scheduler._last_lr = rates  # what get_last_lr() reports for the next step
    previous = previous or config
    old, new = ([c.optim.lr * _schedule(c)(t) for t in range(step, config.run.steps)] for c in (previous, config))
    if rates == planned and old == new:
        return
    settings = [{"lr": c.optim.lr, "steps": c.run.steps, "warmup_steps": c.optim.warmup_steps,
                 "schedule": c.optim.schedule} for c in (previous, config)]
    changed = ", ".join(f"{k} {a} -> {settings[1][k]}" for k, a in settings[0].items() if a != settings[1][k])
    warnings.warn(f"resumed with other learning-rate settings ({changed or 'not those the checkpoint was saved with'}): step {step + 1} "
                  f"trains at lr {rates[0]:.4g} where the checkpoint planned {planned[0]:.4g}, and each later step t "
                  f"at lr · factor(t) of the new settings; steps 1-{step} keep the rates they used", stacklevel=2)


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def groups_to_keep(rewards: torch.Tensor, group_size: int, dynamic_sampling: bool, groups: int) -> torch.Tensor:
    """Row indices kept for the update: all, or (DAPO) those of the first `groups` mixed groups."""
    rows = torch.arange(rewards.numel()).view(-1, group_size)
    if not dynamic_sampling:
        return rows.flatten()
    grouped = rewards.view(-1, group_size)
    mixed = grouped.max(-1).values > grouped.min(-1).values
    return rows[mixed][:groups].flatten()


REWARD_KEYS = ("reward_mean", "reward_std", "reward_errors", "reward_errors_total")
"""The logged metrics named `reward_*` (`reward_metrics`, `Trainer.totals`): no reward part may be logged as one."""


def check_reward_parts(results) -> None:
    """Refuse reward parts (`RewardResult.parts`) whose `reward_<part>` key is one of `REWARD_KEYS`.

    `sample_and_score` calls it as soon as a batch is graded, so a bad name stops the run before
    any optimizer step, not after an update that no checkpoint would hold.
    """
    for name in sorted({name for r in results for name in r.parts}):
        if f"reward_{name}" in REWARD_KEYS:
            raise ValueError(f"the reward part {name!r} would be logged as reward_{name}, a metric of its own: "
                             f"rename the part")


def reward_metrics(rewards: torch.Tensor, drawn: Sampled, group_size: int) -> dict:
    """What the sampled groups earned: rewards, accuracy, mixed groups, lengths, truncation, and
    `reward_<part>`, the mean of each part of the reward (`RewardResult.parts`, e.g. `reward_format`)
    over all sampled rows; a row without that part (its grader raised) counts 0, as its score does."""
    check_reward_parts(drawn.results)
    grouped = rewards.view(-1, group_size)
    lengths = torch.tensor([e.model_tokens for e in drawn.episodes], dtype=torch.float32)
    metrics = {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "accuracy": sum(r.correct for r in drawn.results) / len(drawn.results),
        "mixed_group_frac": (grouped.max(-1).values > grouped.min(-1).values).float().mean().item(),
        "completion_len": lengths.mean().item(),
        "truncated_frac": sum(not e.finished for e in drawn.episodes) / len(drawn.episodes),
        "reward_errors": drawn.errors,
        "sampling_rounds": drawn.rounds,
    }
    for name in sorted({name for r in drawn.results for name in r.parts}):
        metrics[f"reward_{name}"] = sum(r.parts.get(name, 0.0) for r in drawn.results) / len(drawn.results)
    return metrics


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
    entropy = "-" if row["entropy"] is None else f"{row['entropy']:.2f}"
    bar.set_postfix(reward=f"{row['reward_mean']:.2f}", acc=f"{row['accuracy']:.2f}", entropy=entropy,
                    s_step=f"{row['time_sample'] + row['time_train']:.0f}")
    bar.update(1)


class InterruptGuard:
    """Ctrl-C and SIGTERM as KeyboardInterrupt, except while `hold()`ing: then they wait.

    Used as a context manager around the loop (it installs the handlers in the main thread).
    `hold()` starts a section that must not be cut (an optimizer step, committing and saving a
    step); `release()` ends it and raises the KeyboardInterrupt that waited, if any.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.holding = False
        self.pending: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous, self.holding, self.pending = {}, False, None

    def _handle(self, signum, frame) -> None:
        if not self.holding:
            raise KeyboardInterrupt
        if self.pending is None:
            print(f"\n{signal.Signals(signum).name}: finishing this step's update and checkpoint first ...",
                  flush=True)
        self.pending = signum

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        if self.pending is not None:
            self.pending = None
            raise KeyboardInterrupt
