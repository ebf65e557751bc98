"""Held-out evaluation: greedy accuracy and pass@k on sampled answers."""

from __future__ import annotations

from tqdm.auto import tqdm

from wapo.envs.base import Environment, Sample
from wapo.sampling import rollout
from wapo.scoring import score_episodes


def evaluate(model, tokenizer, env: Environment, samples: list[Sample], *, k: int, temperature: float,
             max_new_tokens: int, top_p: float = 1.0, max_observation_tokens: int = 256,
             batch_prompts: int = 32, progress: bool = True, desc: str = "eval") -> dict[str, float]:
    """greedy_accuracy, pass@k (any of k samples correct), sampled_accuracy (mean over samples), and
    per part of the reward (`RewardResult.parts`, e.g. `format`) `greedy_reward_<part>` and
    `sampled_reward_<part>`: its mean over the answers (an answer without that part counts 0).

    progress: a progress bar (labelled `desc`) of the answers written, 1 + k per problem, advanced
    after each batch of `batch_prompts` problems is answered greedily and again when sampled.
    """
    greedy, passed, sampled = 0, 0, 0
    parts: dict[str, dict[str, float]] = {"greedy": {}, "sampled": {}}

    def add_parts(kind: str, results) -> None:
        for r in results:
            for name, value in r.parts.items():
                parts[kind][name] = parts[kind].get(name, 0.0) + value
    with tqdm(total=len(samples) * (1 + k), desc=desc, unit="answer", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(samples), batch_prompts):
            chunk = samples[start:start + batch_prompts]
            kwargs = dict(max_new_tokens=max_new_tokens, top_p=top_p, max_observation_tokens=max_observation_tokens)
            g = rollout(model, tokenizer, env, chunk, samples_per_prompt=1, temperature=0.0, **kwargs)
            results = score_episodes(env, chunk, g, 1).results
            greedy += sum(r.correct for r in results)
            add_parts("greedy", results)
            bar.update(len(chunk))
            bar.set_postfix(greedy_accuracy=f"{greedy / (start + len(chunk)):.2f}")
            if k > 0:
                s = rollout(model, tokenizer, env, chunk, samples_per_prompt=k, temperature=temperature, **kwargs)
                results = score_episodes(env, chunk, s, k).results
                add_parts("sampled", results)
                correct = [r.correct for r in results]
                sampled += sum(correct)
                passed += sum(any(correct[i * k:(i + 1) * k]) for i in range(len(chunk)))
                bar.update(len(chunk) * k)
    n = max(len(samples), 1)
    out = {"greedy_accuracy": greedy / n, "n": len(samples)}
    if k > 0:
        out.update({f"pass@{k}": passed / n, "sampled_accuracy": sampled / (n * k)})
    for kind, answers in (("greedy", n), ("sampled", n * max(k, 1))):
        out.update({f"{kind}_reward_{name}": total / answers for name, total in sorted(parts[kind].items())})
    return out
