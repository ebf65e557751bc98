"""Held-out multi-hop QA of a model: EM, F1, format, searches per episode, recall of its own searches.

    python benchmarks/multihop_eval.py --model builtin:smollm2-135m --out base.json
    python benchmarks/multihop_eval.py --model runs/sft/model --out sft.json
    python benchmarks/multihop_eval.py --model runs/sft/model --checkpoint runs/rl --out rl.json

Greedy episodes on the first `--n` held-out questions of `multihop` (default options: a
held-out world whose entities training never sees), played by `wapo.sampling.rollout` as in
training. Per question: exact match and token F1 of the answer, whether the episode is
well formed, the number of searches, and the share of the question's chain documents that
came back in any of the model's own searches ("own-query recall"). `--checkpoint` loads a
`wapo train` run's last checkpoint (or one checkpoint folder) into the model first. Prints
and writes the means (and, with `--per-question`, every question).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

TITLE = re.compile(r"Doc \d+ \(([^)\n]*)\):")


def episode_stats(env, sample, text: str) -> dict:
    """What one episode did: its scores, searches, and which chain documents it saw."""
    from wapo.envs.multihop import _INFORMATION, parse_answer, well_formed
    from wapo.rewards import qa_exact_match, qa_f1

    answer = parse_answer(text) or ""
    docs = env._documents(sample["corpus"])
    chain = [docs[i].title for i in sample["chain"]]
    seen = {title for block in _INFORMATION.findall(text) for title in TITLE.findall(block)}
    return {
        "id": sample["id"],
        "hops": sample["hops"],
        "em": qa_exact_match(answer, sample["golds"]) if answer else 0.0,
        "f1": qa_f1(answer, sample["golds"]) if answer else 0.0,
        "format": float(well_formed(text)),
        "searches": text.count("<information>"),
        "own_query_recall": sum(title in seen for title in chain) / len(chain),
        "answer": answer,
        "gold": sample["answer"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--checkpoint", help="a wapo train run folder or checkpoint folder to load")
    parser.add_argument("--env-options", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--n", type=int, default=200, help="held-out questions")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-observation-tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=40, help="episodes per rollout call")
    parser.add_argument("--out", help="JSON file for the means (and per-question rows)")
    parser.add_argument("--per-question", action="store_true")
    args = parser.parse_args()

    import torch

    from wapo import checkpoint
    from wapo.config import _parse_pair
    from wapo.envs import make_env
    from wapo.models import load_policy, load_tokenizer
    from wapo.sampling import rollout

    torch.manual_seed(0)
    env = make_env("multihop", dict(_parse_pair(item, "env_options") for item in args.env_options))
    tokenizer = load_tokenizer(args.model)
    model = load_policy(args.model, device=torch.device("cpu"))
    if args.checkpoint:
        path = Path(args.checkpoint)
        checkpoint.load_weights(checkpoint.latest(path) if (path / "checkpoints").is_dir() else path, model)
    samples = list(env.eval_set())[: args.n]
    start, rows = time.perf_counter(), []
    for i in range(0, len(samples), args.batch):
        chunk = samples[i : i + args.batch]
        episodes = rollout(model, tokenizer, env, chunk, samples_per_prompt=1, max_new_tokens=args.max_new_tokens,
                           temperature=0.0, max_observation_tokens=args.max_observation_tokens)
        rows += [episode_stats(env, s, e.text) for s, e in zip(chunk, episodes)]
    keys = ("em", "f1", "format", "searches", "own_query_recall")
    means = {k: sum(r[k] for r in rows) / len(rows) for k in keys}
    result = {"model": args.model, "checkpoint": args.checkpoint, "n": len(rows), **means,
              "em_2hop": _mean(rows, "em", 2), "em_3hop": _mean(rows, "em", 3),
              "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps({**result, **({"questions": rows} if args.per_question else {})},
                                             indent=1) + "\n")


def _mean(rows: list[dict], key: str, hops: int) -> float | None:
    picked = [r[key] for r in rows if r["hops"] == hops]
    return sum(picked) / len(picked) if picked else None


if __name__ == "__main__":
    main()
