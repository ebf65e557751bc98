"""The environment interface: a prompt from a sample, a reward result from a completion.

An environment owns its data (seeded, with train and held-out splits that never overlap),
turns one sample into chat messages, and grades a completion. Parsing (what did the model
answer?) and grading (is it right?) are separate steps, and a grader that cannot decide says
why in `RewardResult.reason` instead of raising.

Multi-turn (tool) environments set `max_turns > 1` and `stop_strings`; after each model turn
that ends in one of `stop_strings` the trainer calls `observe_batch()` once for all such rows
and appends each returned text to its row's context as environment tokens (mask 0 in the
loss), until the reply is None, `max_turns` is reached or the token budget runs out.

An environment that can write gold episodes (`demonstration()`) gives `wapo sft` its
supervised warm start: the model turns of a perfect episode, to which `observe_batch()` adds
the environment's replies exactly as in a rollout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from wapo.registry import Registry

Sample = dict[str, Any]
"""One problem. Keys depend on the environment; `answer` (str) is conventional."""

Messages = list[dict[str, str]]
"""Chat messages, e.g. [{"role": "user", "content": "What is 2 + 3?"}]."""


@dataclass(frozen=True)
class RewardResult:
    """What a grader says about one completion."""

    score: float
    """The reward used for training (usually in [0, 1])."""
    correct: bool
    """True only when the answer earned full credit; accuracy metrics count these."""
    reason: str = ""
    """Why: e.g. "correct", "wrong answer", "no answer found", "grader timeout"."""
    extracted: str | None = None
    """The answer the parser found in the completion, if any."""
    parts: dict[str, float] = field(default_factory=dict)
    """Named components of `score` (e.g. {"answer": 0.5, "format": 1.0}), each in [0, 1], so
    that a run can log format learning apart from answer learning; empty for a single-part
    reward."""


@dataclass
class Environment:
    """Base class of environments; subclasses fill in the data and `reward`.

    Subclasses are dataclasses whose fields are their options (seeded, documented), so that
    `ENVIRONMENTS[name](**options)` builds one from a config file or the command line.
    """

    seed: int = 0
    """Seed of the data generation and of the train/held-out split."""
    max_turns: int = field(default=1, init=False)
    """Model turns per episode; above 1 the environment answers tool calls via `observe`."""
    stop_strings: tuple[str, ...] = field(default=(), init=False)
    """Strings that end a model turn early so the environment can answer (multi-turn only)."""
    final_stop_strings: tuple[str, ...] = field(default=(), init=False)
    """Those of `stop_strings` that end the episode (an answer): a rollout keeps no KV cache for
    a row whose turn ends in one. Should the environment still answer such a turn, the episode
    goes on correctly, running its whole context again at the next turn."""

    def train_set(self) -> Sequence[Sample]:
        """Training problems, in a fixed (seeded) order; the trainer cycles through them.

        By default the `_train` list a subclass builds in `__post_init__`.
        """
        return self._train

    def eval_set(self) -> Sequence[Sample]:
        """Held-out problems, disjoint from `train_set()` (by default the `_eval` list)."""
        return self._eval

    def prompt(self, sample: Sample) -> Messages:
        """The chat messages that pose `sample` to the model."""
        raise NotImplementedError

    def reward(self, sample: Sample, completion: str) -> RewardResult:
        """Grade the model's text (all model turns and observations, as decoded)."""
        raise NotImplementedError

    def observe(self, sample: Sample, completion: str) -> str | None:
        """Multi-turn only: the environment's reply to the last model turn, or None to stop."""
        return None

    def observe_batch(self, samples: Sequence[Sample], completions: Sequence[str]) -> list[str | None]:
        """Multi-turn only: `observe` for every row that made a tool call in this turn.

        The trainer calls it once per turn, so an environment whose tool takes a batch (a
        retriever's list of queries) overrides it to send one request; by default each row is
        answered by `observe` in turn. Returns one reply (or None) per row, in order.
        """
        return [self.observe(s, c) for s, c in zip(samples, completions, strict=True)]

    def demonstration(self, sample: Sample) -> list[str] | None:
        """The model turns of a gold episode for `sample`, or None when it has none.

        `["<search>Velto Works</search>", "<search>Odo Sarn</search>", "<answer>Tarrin</answer>"]`:
        only the policy's turns; `wapo.sft` asks `observe_batch` for the replies between them,
        as a rollout does. Environments that cannot write demonstrations raise.
        """
        raise NotImplementedError(f"environment {type(self).__name__} does not write demonstrations")

    def metrics(self) -> dict[str, float]:
        """Running counters the trainer logs each step as `env_<name>` (e.g. search retries)."""
        return {}


ENVIRONMENTS: Registry[type[Environment]] = Registry("environment")
"""Environment classes by name, e.g. `ENVIRONMENTS["arithmetic"](seed=1)`."""
