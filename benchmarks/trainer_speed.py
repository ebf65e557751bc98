"""Where a trainer step's time goes, and what each speed choice buys, measured side by side.

One process, the built-in model, the default step (8 prompts x 8 samples, 48 new tokens):

  sampling   one batched call for all 64 rows vs one call per prompt; a bfloat16 sampler copy
  training   on the *same* sampled batch: GRPO (every row with A != 0 backpropagates) with one
             full sequence per row and with each prompt run once for its G completions; WAPO
             (losers skipped, their taxonomy recorded while sampling), WAPO with a no-grad pass
             for the losers' taxonomy instead, WAPO with losers kept in the backward pass, and
             WAPO under bf16 autocast
  agreement  how far bf16 moves log-probabilities on that batch: the bf16 sampler's μ and the
             bf16-autocast trainer against the float32 trainer (mean |Δ log p|, KL, largest ratio)
  accuracy   held-out greedy accuracy of the float32 policy and of its bfloat16 copy

    python benchmarks/trainer_speed.py [--repeats 3]

Times are medians over repeats; ratios are against the first line of each block. The machine
is noisy: compare ratios within one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import tempfile
import time
import warnings

import torch

from wapo import config as cfg
from wapo.advantages import compute_advantages
from wapo.batch import RolloutBatch
from wapo.diagnostics import UpdateDiagnostics
from wapo.evaluate import evaluate
from wapo.sampling import rollout
from wapo.scoring import score_episodes
from wapo.trainer import build_trainer


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def report(title: str, rows: list[tuple[str, float]]) -> None:
    print(f"\n{title}")
    base = rows[0][1]
    for name, seconds in rows:
        print(f"  {name:<48} {seconds:7.1f} s   x{base / seconds:4.2f} speed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--accuracy-problems", type=int, default=64, help="0 skips the accuracy check")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    config = cfg.from_dict({
        "model": {"bf16": "false", "bf16_sampling": "false"},  # each variant below sets its own
        "sampling": {"prompts_per_step": args.prompts, "samples_per_prompt": args.samples,
                     "max_new_tokens": args.max_new_tokens},
        "run": {"eval_size": 0, "progress": False, "output_dir": tempfile.mkdtemp(prefix="wapo-bench-")},
    })
    trainer = build_trainer(config)
    env, tok, model = trainer.env, trainer.tokenizer, trainer.model
    samples = list(env.train_set())[: args.prompts]
    g = args.samples
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=1.0)

    def sample_batched(m=model):
        torch.manual_seed(0)
        return rollout(m, tok, env, samples, samples_per_prompt=g, **kw)

    def sample_per_prompt():
        torch.manual_seed(0)
        return [e for s in samples for e in rollout(model, tok, env, [s], samples_per_prompt=g, **kw)]

    bf16_copy = copy.deepcopy(model).to(torch.bfloat16).eval()
    t_batched, episodes = timed(sample_batched, args.repeats)
    t_single, _ = timed(sample_per_prompt, args.repeats)
    t_bf16, _ = timed(lambda: sample_batched(bf16_copy), args.repeats)
    tokens = sum(e.model_tokens for e in episodes)
    report(f"Sampling {len(episodes)} rows ({tokens} completion tokens)", [
        ("one call per prompt (8 x 8 rows), fp32", t_single),
        ("one batched call (64 rows), fp32", t_batched),
        ("one batched call, bfloat16 sampler copy", t_bf16),
    ])

    scores = score_episodes(env, samples, episodes, g)
    rewards = torch.tensor([r.score for r in scores.results])
    print(f"  (reward mean {rewards.mean():.2f}; {int((rewards > 0).sum())} winners of {len(rewards)})")
    state = copy.deepcopy(model.state_dict())

    base_precision = trainer.precision

    def train(loss: str, bf16: bool = False, share_prompts: bool = True, recorded: bool = True, **algorithm):
        trainer.config = dataclasses.replace(
            config, algorithm=dataclasses.replace(config.algorithm, loss=loss, **algorithm),
            model=dataclasses.replace(config.model, share_prompts=share_prompts))
        trainer.precision = dataclasses.replace(base_precision, bf16=bf16)
        model.load_state_dict(state)
        batch = RolloutBatch.from_episodes(episodes, compute_advantages(trainer.advantage_name, rewards, g))
        if not recorded:  # as before the sampler recorded the taxonomy: a no-grad pass over skipped rows
            batch.sampler_stats = None
        return trainer.update(batch).metrics

    rows = []
    for name, loss, changes in [
        ("GRPO, one full sequence per row", "grpo", {"share_prompts": False}),
        ("GRPO, each prompt run once (default)", "grpo", {}),
        ("WAPO: losers skipped, their taxonomy from sampling (default)", "wapo", {}),
        ("WAPO: losers skipped, a no-grad pass for their taxonomy", "wapo", {"recorded": False}),
        ("WAPO: losers in the backward pass (weight 0)", "wapo", {"skip_zero_gradient_rows": False}),
        ("WAPO: default, bf16 autocast", "wapo", {"bf16": True}),
    ]:
        seconds, out = timed(lambda: train(loss, **changes), args.repeats)
        rows.append((f"{name} [{out['backward_rows']} rows]", seconds))
    report("Training on that batch (one update)", rows)

    model.load_state_dict(state)
    trainer.config, trainer.precision = config, base_precision
    bf16_episodes = sample_batched(bf16_copy)
    print("\nAgreement with the float32 trainer's log-probabilities on the sampled tokens")
    for name, eps, bf16 in (("float32 sampler μ", episodes, False), ("bfloat16 sampler μ", bf16_episodes, False),
                            ("bf16-autocast trainer", episodes, True)):
        print(f"  {name:<24} " + agreement(trainer, eps, g, bf16=bf16))

    if args.accuracy_problems:
        held_out = list(env.eval_set())[: args.accuracy_problems]
        model.load_state_dict(state)
        print(f"\nHeld-out greedy accuracy, {len(held_out)} problems (does bf16 hold accuracy?)")
        for name, m in (("float32 policy", model), ("bfloat16 copy", copy.deepcopy(model).to(torch.bfloat16))):
            acc = evaluate(m, tok, env, held_out, k=0, temperature=1.0, max_new_tokens=args.max_new_tokens)
            print(f"  {name:<20} {acc['greedy_accuracy']:.3f}")


def agreement(trainer, episodes, g: int, *, bf16: bool) -> str:
    """mean |Δ log p|, k3 KL and the largest ratio between the float32 trainer and `episodes`'
    recorded μ (bf16=False), or between the float32 and the bf16-autocast trainer (bf16=True)."""
    batch = RolloutBatch.from_episodes(episodes, torch.zeros(len(episodes)))
    rows = list(range(len(batch)))
    with torch.no_grad():
        fp32 = torch.cat([trainer.token_stats(batch, r).logp for r in batch.micro_batches(rows, 16)])
        order = [i for r in batch.micro_batches(rows, 16) for i in r]
        if bf16:
            trainer.precision = dataclasses.replace(trainer.precision, bf16=True)
            other = torch.cat([trainer.token_stats(batch, r).logp for r in batch.micro_batches(rows, 16)])
            trainer.precision = dataclasses.replace(trainer.precision, bf16=False)
        else:
            other = batch.old_logprobs[order]
    diag = UpdateDiagnostics(batch.mask[order], batch.advantages[order])
    diag.add_mismatch(fp32, other, batch.mask[order])
    m = diag.summary()
    smallest = torch.exp((fp32 - other)[batch.mask[order]]).min().item()
    return (f"mean |Δ log p| {m['mismatch_abs_logp']:.4f} nats/token   KL {m['kl_behaviour']:.5f}   "
            f"ratio π/μ in [{smallest:.3f}, {m['mismatch_ratio_max']:.3f}]")


if __name__ == "__main__":
    main()
