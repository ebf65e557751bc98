"""WAPO and the token taxonomy inside TRL's `GRPOTrainer` (tested with trl 1.16.0).

    from trl import GRPOConfig
    from wapo.integrations.trl import WAPOTrainer, reward_funcs

    funcs, dataset = reward_funcs("arithmetic")          # any single-turn wapo environment
    trainer = WAPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=funcs, train_dataset=dataset,
                          args=GRPOConfig(output_dir="out", num_generations=8, max_completion_length=256))
    trainer.train()

Generation (transformers or vLLM), accelerate / DeepSpeed / FSDP, the optimizer, logging and
checkpoints stay TRL's. The subclass changes five things in TRL's step:

1. Advantages: `wapo.compute_advantages(advantage, r, G)` on the weighted sum `r` of the reward
   functions over the whole generation batch of all processes (`group_mean` for WAPO: no std
   division). TRL's `scale_rewards` and `loss_type` are not used.
2. Loss: `wapo.policy_loss(loss, logπ, logμ, A, mask, max_len=max_completion_length,
   group_size=G, normalizer=D)` for any name in `wapo.LOSSES`. π_old (logμ) is the sampler's
   log-probabilities where TRL has them (vLLM), else TRL's recomputed old log-probabilities
   (generation and optimizer steps out of step), else the detached current ones (ρ = 1).
3. Normaliser: `D` is the objective's denominator over the whole generation batch of all
   processes (`wapo.losses.normalizer`; WAPO: B·L), taken per optimizer step and per process,
   so the micro-batches of every process add up to the objective on the whole batch.
4. Rows whose gradient is zero by construction (`wapo.losses.rows_with_gradient`; WAPO:
   A ≤ 0) are left out of each micro-batch's backward pass (one row stays when none is left,
   so DDP and DeepSpeed still see a backward through every parameter); a no-grad pass through
   the unwrapped model gives their taxonomy (`diagnose_skipped_rows`).
5. The log-probabilities come from `wapo.chunked_token_stats` over the final hidden states
   (no (tokens × vocabulary) tensor), and each optimizer step logs the taxonomy bins of all its
   tokens (`taxonomy/pos_peak_frac`, ...; docs/metrics.md) through TRL's metrics, so they reach
   every `report_to` backend.

The math of every objective: docs/math.md.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable

import torch
from trl import GRPOTrainer

from wapo.advantages import ADVANTAGES, compute_advantages
from wapo.envs import make_env
from wapo.envs.base import Environment
from wapo.losses import (DEFAULT_ADVANTAGE, LOSSES, check_hyperparameters, kl_penalty, normalizer, policy_loss,
                         rows_with_gradient)
from wapo.models import check_output_head, decoder, output_head
from wapo.sampling import Episode
from wapo.scoring import score_episodes
from wapo.taxonomy import BINS, TokenStats, chunked_token_stats, taxonomy_bins

TESTED_TRL = "1.16.0"
"""The TRL release these adapters are tested against (`make test-trl`)."""

_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(TokenStats))


class WAPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose policy loss, advantages and per-token statistics are wapo's.

    Takes every argument of `GRPOTrainer`, plus (keyword-only):
        loss                     a name in `wapo.LOSSES` (default "wapo")
        advantage                a name in `wapo.ADVANTAGES`; default: the objective's own
                                 (`wapo.DEFAULT_ADVANTAGE`, "group_mean" for WAPO)
        loss_options             the objective's hyper-parameters, e.g. {"eps_high": 9.0}
        skip_zero_gradient_rows  leave rows without gradient out of the backward pass
        diagnose_skipped_rows    give them a no-grad pass so their taxonomy is still logged
        taxonomy_chunk_size      positions per chunk of `wapo.chunked_token_stats`

    The KL term (`GRPOConfig.beta > 0`) is `wapo.kl_penalty` (k3) over the generation batch's
    tokens. TRL options that change the loss this class replaces fail at construction.
    """

    def __init__(self, *args, loss: str = "wapo", advantage: str | None = None, loss_options: dict | None = None,
                 skip_zero_gradient_rows: bool = True, diagnose_skipped_rows: bool = True,
                 taxonomy_chunk_size: int = 1024, **kwargs):
        LOSSES[loss]  # an unknown name fails here, listing the known ones
        self.wapo_loss = loss
        self.wapo_advantage = advantage or DEFAULT_ADVANTAGE[loss]
        ADVANTAGES[self.wapo_advantage]
        self.wapo_loss_options = dict(loss_options or {})
        if "normalizer" in self.wapo_loss_options:
            raise TypeError("WAPOTrainer sets `normalizer` itself (the whole generation batch's); drop it")
        check_hyperparameters(loss, self.wapo_loss_options)
        self.skip_zero_gradient_rows = skip_zero_gradient_rows
        self.diagnose_skipped_rows = diagnose_skipped_rows
        self._rewards_per_func: torch.Tensor | None = None
        self._window: torch.Tensor | None = None
        super().__init__(*args, **kwargs)
        self._check_supported()
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        check_output_head(base, temperature=self.temperature)  # refuses heads the chunked path does not model
        add_token_stats_forward(base, temperature=self.temperature, chunk_size=taxonomy_chunk_size)

    def _check_supported(self) -> None:
        """Fail on TRL options that act inside the loss this class replaces (they would be ignored)."""
        a = self.args
        ignored = {
            "top_entropy_quantile < 1": a.top_entropy_quantile < 1.0,
            "off_policy_mask_threshold": a.off_policy_mask_threshold is not None,
            "entropy_coef / use_adaptive_entropy": self._entropy_bonus_enabled,
            "importance_sampling_level='sequence' (use loss='gspo')": a.importance_sampling_level != "token",
            "delta": a.delta is not None,
            "a MoE router auxiliary loss (set router_aux_loss_coef=0)": self.aux_loss_enabled,
        }
        bad = [name for name, on in ignored.items() if on]
        if bad:
            raise ValueError(f"WAPOTrainer replaces TRL's loss, so these GRPOConfig options would be ignored: "
                             f"{', '.join(bad)}; turn them off")
        if self.diagnose_skipped_rows and (self.is_fsdp_enabled or _zero3(self)):
            raise ValueError("diagnose_skipped_rows=True runs an uneven number of forward passes per process, "
                             "which FSDP / ZeRO-3 cannot gather for; pass diagnose_skipped_rows=False")

    # ------------------------------------------------------------------------------------
    # Rewards → advantages and the whole batch's normaliser (once per generation batch)
    # ------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the rewards of all processes (gathered); keep them for the advantages
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        per_func = self._rewards_per_func
        rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)
        advantages = compute_advantages(self.wapo_advantage, rewards, group)
        # a completion that every reward function declined to score (None) carries no signal
        advantages = torch.where(per_func.isnan().all(dim=1), torch.zeros_like(advantages), advantages)
        n = len(inputs)
        start = self.accelerator.process_index * n
        out["advantages"] = advantages[start:start + n].to(out["completion_ids"].device)
        all_masks = self.accelerator.gather(self.accelerator.pad_across_processes(_loss_mask(out).int(), dim=1))
        whole = normalizer(self.wapo_loss, advantages.to(all_masks.device), all_masks.bool(),
                           **self._loss_kwargs(group))
        out["wapo_normalizer"] = whole * self._share_per_process(mode)
        return out

    def _loss_kwargs(self, group: int) -> dict:
        return dict(max_len=self.max_completion_length, group_size=group, **self.wapo_loss_options)

    def _share_per_process(self, mode: str) -> float:
        """What one process's micro-batches divide a whole-generation-batch denominator by.

        An optimizer step takes `gradient_accumulation_steps` of the generation batch's
        `steps_per_generation` slices, and DDP / DeepSpeed / FSDP average gradients over the
        processes: each process scales its sum by `num_processes` (TRL's "dapo" does the same).
        """
        share = self.args.gradient_accumulation_steps / self.args.steps_per_generation if mode == "train" else 1.0
        return share / self.accelerator.num_processes

    # ------------------------------------------------------------------------------------
    # The loss of one micro-batch
    # ------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if any(key in inputs for key in ("pixel_values", "num_images")):
            raise NotImplementedError("WAPOTrainer does not support vision-language inputs yet")
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        mask, advantages = _loss_mask(inputs), inputs["advantages"]
        kwargs = dict(self._loss_kwargs(group), normalizer=inputs["wapo_normalizer"])
        if self.skip_zero_gradient_rows and self.beta == 0.0:  # the KL term has a gradient on every row
            with_grad = rows_with_gradient(self.wapo_loss, advantages, mask, **kwargs)
        else:
            with_grad = torch.ones_like(advantages, dtype=torch.bool)
        rows = with_grad.nonzero().squeeze(-1)
        placeholder = rows.numel() == 0
        if placeholder:  # its gradient is zero by construction, but every parameter joins the backward
            rows = rows.new_zeros(1)
        batch = _select(inputs, rows)
        stats = self._token_stats(model, batch)
        fallback = batch.get("old_per_token_logps", stats.logp.detach())
        old = batch.get("sampling_per_token_logps", fallback)
        old = torch.where(torch.isnan(old), fallback, old)  # tokens the sampler could not score
        out = policy_loss(self.wapo_loss, stats.logp, old, batch["advantages"], batch["mask"], **kwargs)
        loss = out.loss
        if self.beta != 0.0:
            tokens = inputs["num_items_in_batch"].clamp(min=1) * self._share_per_process(mode)
            kl = kl_penalty(stats.logp, batch["ref_per_token_logps"], batch["mask"], beta=self.beta,
                            estimator="k3", normalizer=tokens)
            loss = loss + kl.loss
            self._metrics[mode]["kl"].append(kl.metrics["kl_ref"].item())

        if not placeholder:  # the placeholder row is binned once, with the skipped rows below
            self._add_to_window(stats, batch, backward_rows=int(with_grad.sum()))
        skipped = (~with_grad).nonzero().squeeze(-1)
        if self.diagnose_skipped_rows and skipped.numel():
            with torch.no_grad():
                other = _select(inputs, skipped)
                self._add_to_window(self._token_stats(self.accelerator.unwrap_model(model), other), other)
        for key in ("clip_frac_pos", "clip_frac_neg", "ratio_max"):
            self._metrics[mode][f"wapo/{key}"].append(out.metrics[key].item())
        if mode == "eval" or self.accelerator.sync_gradients:
            self._flush_window(mode)
        return loss

    def _token_stats(self, model, batch: dict) -> TokenStats:
        """Taxonomy fields (rows, completion width) of `batch`'s completion tokens, one forward."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        width = batch["completion_ids"].shape[1]
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-width] = -100
        with self.accelerator.autocast():
            fields = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, wapo_token_stats=True)
        return TokenStats(**{name: fields[name][:, -width:] for name in _STATS_FIELDS})

    # ------------------------------------------------------------------------------------
    # Taxonomy: exact counts over an optimizer step's micro-batches and processes
    # ------------------------------------------------------------------------------------

    def _add_to_window(self, stats: TokenStats, batch: dict, backward_rows: int = 0) -> None:
        """Add counts and sums of one pass to this optimizer step's running totals."""
        mask = batch["mask"]
        bins = taxonomy_bins(stats, batch["advantages"], mask)
        counts = torch.stack([bins[f"{b}_count"] for b in BINS]).float()
        means = torch.stack([bins[f"{b}_pred_dentropy"] for b in BINS]).float()
        entropy = torch.where(mask, stats.entropy.float(), torch.zeros_like(stats.entropy.float())).sum()
        totals = torch.cat([counts, torch.nan_to_num(means) * counts,
                            torch.stack([mask.sum().float(), entropy, torch.tensor(float(backward_rows)).to(entropy),
                                         torch.tensor(float(len(mask))).to(entropy)])])
        self._window = totals if self._window is None else self._window + totals

    def _flush_window(self, mode: str) -> None:
        if self._window is None:
            return
        totals = self.accelerator.reduce(self._window, reduction="sum")
        self._window = None
        k = len(BINS)
        counts, dentropy = totals[:k], totals[k:2 * k]
        tokens, entropy, backward_rows, rows = totals[2 * k:].tolist()
        metrics = self._metrics[mode]
        for i, name in enumerate(BINS):
            metrics[f"taxonomy/{name}_frac"].append((counts[i] / max(tokens, 1.0)).item())
            # NaN for an empty bin: TRL's log() averages the values that are not NaN
            metrics[f"taxonomy/{name}_pred_dentropy"].append((dentropy[i] / counts[i]).item())
        metrics["entropy"].append(entropy / max(tokens, 1.0))
        metrics["wapo/backward_rows_frac"].append(backward_rows / max(rows, 1.0))


def _loss_mask(inputs: dict) -> torch.Tensor:
    """(B, T) bool: completion tokens that are trained on (TRL's tool-output tokens excluded)."""
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    return mask.bool()


_ROW_KEYS = ("advantages", "old_per_token_logps", "sampling_per_token_logps", "ref_per_token_logps")


def _select(inputs: dict, rows: torch.Tensor) -> dict:
    """`rows` of a TRL micro-batch, cut to the columns those rows use.

    Prompts are left-padded and completions right-padded to the generation batch's longest, so
    a subset of rows (WAPO's winners) often needs fewer columns: fewer positions to run.
    """
    prompt_mask, completion_mask = inputs["prompt_mask"][rows], inputs["completion_mask"][rows]
    used = prompt_mask.sum(0).nonzero()
    first = int(used[0]) if used.numel() else prompt_mask.shape[1] - 1
    width = max(int(completion_mask.sum(-1).max()), 1)
    out = {
        "prompt_ids": inputs["prompt_ids"][rows, first:], "prompt_mask": prompt_mask[:, first:],
        "completion_ids": inputs["completion_ids"][rows, :width], "completion_mask": completion_mask[:, :width],
        "mask": _loss_mask(inputs)[rows, :width],
    }
    for key in _ROW_KEYS:
        if inputs.get(key) is not None:
            out[key] = inputs[key][rows] if key == "advantages" else inputs[key][rows, :width]
    return out


def _zero3(trainer) -> bool:
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def add_token_stats_forward(model, *, temperature: float, chunk_size: int) -> None:
    """Let `model(..., labels=labels, wapo_token_stats=True)` return the taxonomy of the labels.

    The patched forward runs the transformer body once and hands its final hidden states and
    the output head (`wapo.models.output_head`: weight, bias, logit scale, soft-cap) to
    `wapo.chunked_token_stats`, for the positions whose next-token label is not -100; it returns a dict of `TokenStats` fields shaped (B, S − 1), zero elsewhere.
    Only `logp` carries gradient. Calls without the flag go to the previous forward unchanged,
    so TRL's own fused head and generation still work. It runs inside the model's forward,
    so DDP and accelerate's wrappers see it (as TRL's `add_fused_lm_head` does).
    """
    previous = model.forward

    @functools.wraps(previous)
    def forward(*args, wapo_token_stats: bool = False, labels=None, **kwargs):
        if not wapo_token_stats:
            return previous(*args, **kwargs) if labels is None else previous(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        hidden = decoder(model)(*args, **kwargs).last_hidden_state[:, :-1]
        head = output_head(model)
        labels = labels[:, 1:].to(head.weight.device)
        keep = labels != -100
        stats = chunked_token_stats(hidden.to(head.weight.device)[keep], head, labels[keep],
                                    temperature=temperature, chunk_size=chunk_size)
        return {name: getattr(stats, name).new_zeros(keep.shape).masked_scatter(keep, getattr(stats, name))
                for name in _STATS_FIELDS}

    model.forward = forward


def reward_funcs(env: Environment | str, options: dict | None = None, *,
                 split: str = "train") -> tuple[list[Callable], "datasets.Dataset"]:  # noqa: F821
    """A wapo environment as TRL reward functions and a `datasets.Dataset` of its prompts.

    env: an `Environment` or a name for `wapo.envs.make_env` (with `options`); split "train" or
    "eval". The dataset has the chat prompt (`prompt`) and the sample's position (`wapo_index`);
    the one reward function grades each completion with `env.reward` and returns its score. A
    grader that raises scores 0 (as in `wapo train`), is counted and warned about once; the
    fraction correct and the error count are logged through TRL's `log_metric` as `accuracy`
    and `reward_errors`. Multi-turn (tool) environments need wapo's own trainer.
    """
    from datasets import Dataset

    if isinstance(env, str):
        env = make_env(env, options)
    if env.max_turns > 1:
        raise ValueError(f"{type(env).__name__} is multi-turn (it answers tool calls between model turns); "
                         "TRL's tool protocol differs: train it with `wapo train`")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    samples = list(env.train_set() if split == "train" else env.eval_set())
    dataset = Dataset.from_list([{"prompt": env.prompt(s), "wapo_index": i} for i, s in enumerate(samples)])
    warned = []

    def wapo_reward(completions, wapo_index, log_metric=None, **_):
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        scores = score_episodes(env, [samples[i] for i in wapo_index],
                                [Episode(prompt_ids=[], text=t) for t in texts], group_size=1)
        if scores.errors and not warned:
            warned.append(True)
            warnings.warn(f"the reward function raised; such completions score 0. First traceback:\n"
                          f"{scores.tracebacks[0]}", stacklevel=2)
        if log_metric is not None:
            log_metric("accuracy", sum(r.correct for r in scores.results) / max(len(texts), 1))
            log_metric("reward_errors", float(scores.errors))
        return [r.score for r in scores.results]

    return [wapo_reward], dataset
