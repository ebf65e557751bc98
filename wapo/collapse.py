"""Collapse detected online: a small stateful detector fed one metrics row per step.

Four criteria (docs/metrics.md, "Collapse flags"), each on exponential moving averages
x̄_t = α·x_t + (1 − α)·x̄_{t−1} (x̄_1 = x_1, α = `smoothing`) of the step's metrics, against
the values of the first step (the policy before any update) and the running best reward
r* = max_{τ≤t} r̄_τ, with drop = r* − r̄_t:

    collapse_entropy     drop ≥ reward_drop  and  H̄ ≤ entropy_low · H₀
    collapse_explosion   H̄ ≥ entropy_high · H₀,  or  drop ≥ reward_drop and H̄ ≥ entropy_rise · H₀
    collapse_repetition  R̄ ≥ repeat_frac      and  R̄ − R₀ ≥ repeat_rise       (R: repeat_ngram_frac)
    collapse_length      T̄ ≥ truncated_frac   and  T̄ − T₀ ≥ truncated_rise    (T: truncated_frac)
    collapsed            any of the four

H is the `entropy` key, r `reward_mean`. Each flag is 0/1 for its step (not latched); a null
metric (e.g. no token in the batch) leaves its averages unchanged and its flags 0. Because
entropy_low < 1 ≤ entropy_rise, a step is never flagged as both collapse and explosion.

The detector's state is plain JSON (`state()` / `load_state()`), so a resumed run continues
the same averages:

    detector = CollapseDetector(**options)
    out = detector.update(row, texts)   # {"repeat_ngram_frac": ..., "collapse_entropy": 0, ...}
    progress["collapse"] = detector.state()
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

FLAGS = ("collapse_entropy", "collapse_explosion", "collapse_repetition", "collapse_length", "collapsed")

_WORDS = re.compile(r"\w+|[^\w\s]")


def repeats_ngram(text: str, *, n: int = 6, min_count: int = 3) -> bool:
    """Whether some n-gram of the text's words occurs at least `min_count` times.

    Words are runs of letters/digits/underscore, and every other non-space character alone
    ("1+2=3" is five words), so loops of short formulas count as well as loops of prose.
    """
    words = _WORDS.findall(text)
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= min_count


def repeat_ngram_frac(texts: Sequence[str], *, n: int = 6, min_count: int = 3) -> float | None:
    """`repeat_ngram_frac`: the share of completions that repeat an n-gram (`repeats_ngram`);
    None for no completions."""
    if not texts:
        return None
    return sum(repeats_ngram(t, n=n, min_count=min_count) for t in texts) / len(texts)


@dataclass
class CollapseDetector:
    """Per-step collapse flags from metrics rows (module docstring). The fields are the thresholds;
    the running state lives in `averages`, `starts` and `best_reward` (see `state()`)."""

    smoothing: float = 0.5
    """α of the moving averages (1 = no smoothing)."""
    reward_drop: float = 0.2
    """Fall of the averaged reward below its running best (reward units) that counts as a fall."""
    entropy_low: float = 0.25
    """Entropy collapse: averaged entropy at most this fraction of the first step's."""
    entropy_rise: float = 1.0
    """Explosion with a reward fall: averaged entropy at least this multiple of the first step's."""
    entropy_high: float = 2.0
    """Explosion whatever the reward: averaged entropy at least this multiple of the first step's."""
    repeat_frac: float = 0.5
    """Repetition: averaged share of completions that repeat an n-gram, at least this ..."""
    repeat_rise: float = 0.25
    """... and at least this much above the first step's share."""
    truncated_frac: float = 0.5
    """Length: averaged share of completions cut at the token budget, at least this ..."""
    truncated_rise: float = 0.25
    """... and at least this much above the first step's share."""
    ngram: int = 6
    """n of `repeat_ngram_frac` (words)."""
    ngram_count: int = 3
    """Occurrences of one n-gram that make a completion repetitive."""

    def __post_init__(self):
        self.averages: dict[str, float] = {}  # moving average of "reward", "entropy", "repeat", "truncated"
        self.starts: dict[str, float] = {}  # each signal's first value
        self.best_reward: float | None = None  # running best of the averaged reward
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if not self.entropy_low < 1 <= self.entropy_rise <= self.entropy_high:
            raise ValueError("need entropy_low < 1 <= entropy_rise <= entropy_high, got "
                             f"{self.entropy_low}, {self.entropy_rise}, {self.entropy_high}")
        if self.ngram < 1 or self.ngram_count < 2:
            raise ValueError(f"need ngram >= 1 and ngram_count >= 2, got {self.ngram}, {self.ngram_count}")

    def update(self, row: dict, texts: Sequence[str] | None = None) -> dict:
        """Fold in one step's metrics; its flags (0/1) and `repeat_ngram_frac`.

        `texts`: the step's completions; without them `row["repeat_ngram_frac"]` is used (a
        replay of a logged run), or repetition is not judged.
        """
        repeat = (repeat_ngram_frac(texts, n=self.ngram, min_count=self.ngram_count) if texts is not None
                  else row.get("repeat_ngram_frac"))
        r = self._average("reward", row.get("reward_mean"))
        h = self._average("entropy", row.get("entropy"))
        rep = self._average("repeat", repeat)
        trunc = self._average("truncated", row.get("truncated_frac"))
        if r is not None:
            self.best_reward = r if self.best_reward is None else max(self.best_reward, r)
        fell = r is not None and self.best_reward - r >= self.reward_drop
        h0 = self.starts.get("entropy")
        flags = {
            "collapse_entropy": h is not None and fell and h <= self.entropy_low * h0,
            "collapse_explosion": h is not None and (h >= self.entropy_high * h0
                                                     or (fell and h >= self.entropy_rise * h0)),
            "collapse_repetition": rep is not None and rep >= self.repeat_frac
            and rep - self.starts["repeat"] >= self.repeat_rise,
            "collapse_length": trunc is not None and trunc >= self.truncated_frac
            and trunc - self.starts["truncated"] >= self.truncated_rise,
        }
        flags["collapsed"] = any(flags.values())
        return {"repeat_ngram_frac": repeat, **{k: int(v) for k, v in flags.items()}}

    def _average(self, name: str, value: float | None) -> float | None:
        """The signal's updated moving average, or None when it has no value this step."""
        if value is None:
            return None
        self.starts.setdefault(name, value)
        previous = self.averages.get(name, value)
        self.averages[name] = self.smoothing * value + (1 - self.smoothing) * previous
        return self.averages[name]

    def state(self) -> dict:
        """The running state as JSON-ready values (thresholds are the constructor's)."""
        return {"averages": dict(self.averages), "starts": dict(self.starts), "best_reward": self.best_reward}

    def load_state(self, state: dict) -> None:
        self.averages, self.starts = dict(state["averages"]), dict(state["starts"])
        self.best_reward = state["best_reward"]
