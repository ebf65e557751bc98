"""Seconds per multi-hop rollout with and without keeping each row's KV cache across turns.

    python benchmarks/multihop_rollout_speed.py --model runs/sft/model [--prompts 2] [--samples 4]

`wapo.sampling.rollout` on the first `--prompts` training questions of `multihop` (the options
of benchmarks/multihop_measure.sh: top_k=2, max_observation_words=80) x `--samples` samples,
<= 64 model tokens per episode, replies cut to 200 tokens, temperature 1, one seeded generator
per rollout: `keep_cache` (each later turn runs only the last sampled token and the
environment's reply) against `rerun` (each turn runs the whole context again). The two are
interleaved within each of `--repeats` repeats, so load from other processes hits both alike;
each prints the median seconds per rollout, model tokens per second, and where the time went:
`prefill` (the forward pass over each turn's prompts, `wapo.sampling._prefill`), `decode` (the
rest of `generate`: one token per step) and `env` (the environment's searches). Both variants
sample the same tokens up to float rounding: a rare near-tie can flip a draw, after which that
episode goes its own way, so the last line counts the tokens that differ (0 expected) instead
of stopping. A model that never
calls the tool (the built-in one) has no second turn, so there is nothing to keep: use an SFT
model (`wapo sft`).
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    args = parser.parse_args()

    import torch

    import wapo.sampling as sampling
    from wapo.envs import make_env
    from wapo.models import load_policy, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    env = make_env("multihop", {"top_k": 2, "max_observation_words": 80})
    tokenizer, model = load_tokenizer(args.model), load_policy(args.model, device=torch.device("cpu")).eval()
    samples = list(env.train_set())[: args.prompts]
    clock = {"prefill": 0.0, "env": 0.0, "prefill_tokens": 0}

    def timed(fn, key):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                clock[key] += time.perf_counter() - start
        return wrapper

    real_prefill = sampling._prefill

    def prefill(model, prompts, pad, *, capacity, pasts=None):
        done = {tuple(p): (pasts[i].length if pasts and pasts[i] is not None else 0) for i, p in enumerate(prompts)}
        clock["prefill_tokens"] += sum(len(p) - d for p, d in done.items())
        return real_prefill(model, prompts, pad, capacity=capacity, pasts=pasts)

    sampling._prefill = timed(prefill, "prefill")
    env.observe_batch = timed(env.observe_batch, "env")
    runs = {"keep_cache": [], "rerun": []}
    differing, total = 0, 0  # completion tokens of keep_cache that rerun did not sample at the same place
    for _ in range(args.repeats):
        tokens = {}
        for name in runs:
            clock.update(prefill=0.0, env=0.0, prefill_tokens=0)
            start = time.perf_counter()
            episodes = sampling.rollout(model, tokenizer, env, samples, samples_per_prompt=args.samples,
                                        max_new_tokens=64, temperature=1.0, max_observation_tokens=200,
                                        generator=torch.Generator().manual_seed(0), keep_cache=name == "keep_cache")
            seconds = time.perf_counter() - start
            tokens[name] = [e.completion_ids for e in episodes]
            runs[name].append({"seconds": seconds, "model_tokens": sum(e.model_tokens for e in episodes),
                               "turns": sum(e.turns for e in episodes), **clock})
        for a, b in zip(tokens["keep_cache"], tokens["rerun"], strict=True):
            differing += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
            total += max(len(a), len(b))
    print(f"{args.prompts} prompts x {args.samples} samples, median of {args.repeats} ({args.model})")
    print(f"{'variant':<11} {'s/rollout':>9} {'tok/s':>6} {'prefill s':>9} {'prefill tok':>11} {'decode s':>8} "
          f"{'env s':>6} {'turns':>5}")
    for name, rows in runs.items():
        median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        decode = median["seconds"] - median["prefill"] - median["env"]
        print(f"{name:<11} {median['seconds']:>9.2f} {median['model_tokens'] / median['seconds']:>6.1f} "
              f"{median['prefill']:>9.2f} {median['prefill_tokens']:>11.0f} {decode:>8.2f} {median['env']:>6.2f} "
              f"{median['turns']:>5.0f}")
    print(f"tokens that differ between the variants: {differing} of {total}"
          + ("" if differing == 0 else " (a rounding flip: the timings compare different episodes)"))


if __name__ == "__main__":
    main()
