"""Scoring episodes with an environment's reward, surviving graders that raise.

A reward function that raises scores 0 with the reason "reward error: ...", is counted, and
its traceback is kept for the run log; it never stops training. (This is the one place where
an exception is caught broadly: the grader is user code, and one bad completion must not cost
a run. The error is not hidden: it is counted in the metrics and its first traceback logged.)
A math grader that cannot run (`rewards.GraderUnavailable`) is such an error; each call caps
the grader process's starts (`rewards.grader_start_budget`), so a batch of answers that stall
or crash it cannot stall the step.

Counts are per call: `Scores.errors` is this call's only, and nothing here carries over from
one call to the next, so a caller that scores a step twice (a replay after an interrupt) can
add each step's count once.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

from wapo.envs.base import Environment, RewardResult, Sample
from wapo.rewards import grader_start_budget
from wapo.sampling import Episode


@dataclass
class Scores:
    """What one `score_episodes` call found."""

    results: list[RewardResult]
    """One per episode, in order."""
    errors: int = 0
    """Episodes of this call whose reward function raised (each scored 0)."""
    tracebacks: list[str] = field(default_factory=list)
    """The traceback of each of those errors, in order."""


def score_episodes(env: Environment, samples: list[Sample], episodes: list[Episode], group_size: int) -> Scores:
    """Rewards of `episodes`, whose rows i*G..(i+1)*G-1 answer `samples[i]`."""
    scores = Scores(results=[])
    with grader_start_budget():
        for i, episode in enumerate(episodes):
            sample = samples[i // group_size]
            try:
                result = env.reward(sample, episode.text)
            except Exception as exc:  # noqa: BLE001 - see the module docstring
                scores.errors += 1
                scores.tracebacks.append(traceback.format_exc())
                result = RewardResult(score=0.0, correct=False, reason=f"reward error: {type(exc).__name__}: {exc}")
            scores.results.append(result)
    return scores
