"""Environments over reasoning-gym's procedural datasets, and the built-in 1-digit addition.

One sample of the default `"arithmetic"` environment (reasoning-gym `basic_arithmetic`, two
terms, `+` only; reasoning-gym draws "1-digit" terms from 0..10 inclusive):

    sample  : {"question": "Calculate 4 + 1.", "answer": "5",
               "metadata": {"source_dataset": "basic_arithmetic", "expression": "4 + 1", ...}}
    prompt  : [{"role": "user", "content": "Calculate 4 + 1.\\nGive the final answer
                inside <answer></answer>."}]
    model   : "4 + 1 = 5"                          -> answer "5" (last number), score 1, "correct"
    model   : "<answer>6</answer>"                 -> answer "6", score 0, "wrong answer"

Splits. reasoning-gym item i of seed s is drawn with `Random(s + i)`, so datasets with nearby
seeds share items, and small spaces repeat questions (1-digit addition has only 121). We
therefore draw the held-out set first, keeping `eval_size` *distinct* questions, then draw
training items from a separately seeded stream and drop every one whose question is held out.
Training items may repeat (they sample the task's distribution); no held-out question ever
appears in training, so held-out accuracy measures generalisation to unseen problems. The
two streams' seeds are derived from `seed` by hashing, so environments with seeds 0 and 1
do not share shifted copies of the same items.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from wapo import rewards
from wapo.envs.base import ENVIRONMENTS, Environment, Messages, RewardResult, Sample

PROMPT = "{question}\nGive the final answer inside <answer></answer>."

MAX_DRAWS_PER_ITEM = 20
"""Draw at most this many items per wanted item before concluding the task space is too small."""

ARITHMETIC_CONFIG: dict[str, Any] = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+"],
    "allow_parentheses": False,
    "allow_negation": False,
}
"""reasoning-gym `basic_arithmetic` settings of the built-in task: `a + b` with a, b in 0..10."""

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


@ENVIRONMENTS.register("rg")
@dataclass
class ReasoningGymEnv(Environment):
    """Any reasoning-gym dataset, graded by the dataset's own `score_answer`."""

    dataset: str = ""
    """reasoning-gym dataset name, e.g. "basic_arithmetic", "chain_sum", "leg_counting"."""
    config: dict[str, Any] = field(default_factory=dict)
    """The dataset's config fields (its `*Config` dataclass), e.g. {"max_digits": 2}."""
    train_size: int = 512
    """Training items (questions may repeat; none is a held-out question)."""
    eval_size: int = 64
    """Held-out items, all distinct questions."""
    partial_credit: bool = False
    """Use `score_answer`'s partial scores as rewards. Off: 1 on full score, else 0, because
    e.g. basic_arithmetic gives len(gold)/len(answer) when the gold is a substring of the
    answer ("15" for gold "5" earns 0.5), which rewards wrong numbers."""

    def __post_init__(self) -> None:
        if not self.dataset:
            raise ValueError('the "rg" environment needs dataset=<reasoning-gym dataset name>')
        self._scorer = _create(self.dataset, size=1, seed=0, config=self.config).score_answer
        held_out = _distinct(self._stream("eval", self.eval_size), self.eval_size)
        questions = {item["question"] for item in held_out}
        stream = self._stream("train", self.train_size)
        self._train = _take((item for item in stream if item["question"] not in questions), self.train_size)
        self._eval = held_out

    def _stream(self, split: str, wanted: int) -> Iterator[Sample]:
        """The items of one split's seeded stream, at most MAX_DRAWS_PER_ITEM * wanted of them."""
        seed = random.Random(f"wapo-rg/{self.dataset}/{split}/{self.seed}").randrange(2**31)
        size = MAX_DRAWS_PER_ITEM * max(wanted, 1)
        data = _create(self.dataset, size=size, seed=seed, config=self.config)
        return (data[index] for index in range(size))

    def prompt(self, sample: Sample) -> Messages:
        return [{"role": "user", "content": PROMPT.format(question=sample["question"])}]

    def reward(self, sample: Sample, completion: str) -> RewardResult:
        """score_answer on the leniently extracted answer (`extract_final_answer`)."""
        numeric = bool(_NUMBER.fullmatch(sample["answer"].strip()))
        answer = extract_final_answer(completion, numeric=numeric)
        if answer is None:
            return RewardResult(score=0.0, correct=False, reason="no answer found")
        score = float(self._scorer(answer, sample))
        correct = score == 1.0
        if not self.partial_credit:
            score = float(correct)
        reason = "correct" if correct else "partial credit" if score > 0 else "wrong answer"
        return RewardResult(score=score, correct=correct, reason=reason, extracted=answer)


@ENVIRONMENTS.register("arithmetic")
@dataclass
class ArithmeticEnv(ReasoningGymEnv):
    """The built-in default: 1-digit addition `a + b` (512 training, 64 held-out problems)."""

    dataset: str = "basic_arithmetic"
    """reasoning-gym dataset name (see `ReasoningGymEnv`)."""
    config: dict[str, Any] = field(default_factory=lambda: dict(ARITHMETIC_CONFIG))
    """Settings of `basic_arithmetic`; the default is `ARITHMETIC_CONFIG`."""


def extract_final_answer(completion: str, *, numeric: bool) -> str | None:
    """The answer a small model most likely meant, or None.

    The last `<answer>` tag if any, else the last `\\boxed{}`; otherwise, when the task wants
    a number (`numeric`, known from the kind of the gold answer, not its value), the last
    number in the text (`rewards.extract_answer`), else the last non-empty line.
    """
    if "<answer>" in completion or "\\boxed" in completion or numeric:
        found = rewards.extract_answer(completion)
        if found is not None:
            return found
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines and not numeric else None


def _create(name: str, *, size: int, seed: int, config: dict[str, Any]) -> Any:
    """`reasoning_gym.create_dataset`, with errors that name the valid choices."""
    import reasoning_gym  # deferred: importing it takes more than a second
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ValueError(f"unknown reasoning-gym dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    try:
        return reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    except TypeError as error:  # an unknown config key; list the valid ones
        config_fields = sorted(DATASETS[name][1].__dataclass_fields__)
        message = f"bad config for {name!r} ({error}); its fields: {', '.join(config_fields)}"
        raise ValueError(message) from error


def _distinct(items: Iterator[Sample], wanted: int) -> list[Sample]:
    """The first `wanted` items with distinct questions; ValueError if the stream runs out."""
    return _take(_first_of_each_question(items), wanted)


def _first_of_each_question(items: Iterator[Sample]) -> Iterator[Sample]:
    seen: set[str] = set()
    for item in items:
        if item["question"] not in seen:
            seen.add(item["question"])
            yield item


def _take(items: Iterator[Sample], wanted: int) -> list[Sample]:
    """The first `wanted` items; ValueError if there are fewer (the task space is too small)."""
    taken = [item for _, item in zip(range(wanted), items)]
    if len(taken) < wanted:
        raise ValueError(
            f"found only {len(taken)} of {wanted} usable items in {MAX_DRAWS_PER_ITEM}x as many draws: "
            "the task has too few distinct questions for these sizes; lower eval_size or train_size"
        )
    return taken

