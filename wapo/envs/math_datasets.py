"""Math word problems from files or the Hugging Face Hub: GSM8K and MATH / MATH-500 forms.

A GSM8K row and the sample it becomes (`"gsm8k"` environment):

    row    : {"question": "Tom has 3 apples and buys 5 more. How many apples does he have now?",
              "answer": "Tom has 3 + 5 = <<3+5=8>>8.\\n#### 8"}
    sample : {"question": "Tom has 3 apples ...", "answer": "8", "solution": "Tom has ... #### 8"}
    model  : "He has 3 + 5 = 8 apples. \\boxed{8}"          -> score 1, "correct"

A MATH row (`"math"`): {"problem": ..., "solution": "... \\boxed{\\frac{3}{4}}.", "answer":
"\\frac{3}{4}", ...}; the gold is `answer` when present (MATH-500), else the last `\\boxed{}`
of `solution` (the original MATH). Other row fields are kept in the sample.

Sources. `path` is a local `.jsonl`, `.json` (a list of rows) or `.parquet` file, or else a
Hugging Face dataset name loaded with `datasets.load_dataset(path, hf_config, split=...)`
(optional dependency, imported only then). Splits: with `eval_path`, the held-out problems
are that file's and training drops any problem whose question also occurs there; without
it, a seeded shuffle of `path` is cut into disjoint training and held-out parts (duplicate
questions are dropped first, so the parts never share a question). Grading: `grade_math`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from wapo.envs.base import ENVIRONMENTS, Environment, Messages, RewardResult, Sample
from wapo.rewards import grade_math, last_boxed

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
GSM8K_SAMPLE = DATA_DIR / "gsm8k_sample.jsonl"
MATH_SAMPLE = DATA_DIR / "math_sample.jsonl"

PROMPT = "{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}."

Row = dict[str, Any]


def gsm8k_sample(row: Row) -> Sample:
    """GSM8K row -> sample: the gold is the text after `####`, thousands commas removed."""
    solution = row["answer"]
    if "####" not in solution:
        raise ValueError(f"GSM8K answer without '#### N': {solution[-80:]!r}")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return {"question": row["question"], "answer": gold, "solution": solution}


def math_sample(row: Row) -> Sample:
    """MATH / MATH-500 row -> sample: the gold is `answer`, else the solution's last `\\boxed{}`."""
    gold = row.get("answer")
    if gold is None or gold == "":
        gold = last_boxed(row["solution"])
    if gold is None or gold == "":
        raise ValueError(f"MATH row with no 'answer' and no \\boxed{{}} solution: {row['problem'][:80]!r}")
    extra = {key: value for key, value in row.items() if key not in ("problem", "answer")}
    return {"question": row["problem"], "answer": str(gold), **extra}


def load_rows(path: str | Path, *, split: str = "train", hf_config: str | None = None) -> list[Row]:
    """Rows of a local .jsonl / .json / .parquet file, or of a Hugging Face dataset split."""
    local = Path(path)
    if local.is_file():
        return _read_file(local)
    if local.suffix in (".jsonl", ".json", ".parquet") or local.is_absolute():
        raise FileNotFoundError(f"no such data file: {local}")
    return _load_hub(str(path), split=split, hf_config=hf_config)


def _read_file(path: Path) -> list[Row]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            return [json.loads(line) for line in lines if line.strip()]
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        return pyarrow.parquet.read_table(path).to_pylist()
    raise ValueError(f"unsupported data file {path}: expected .jsonl, .json or .parquet")


def _load_hub(name: str, *, split: str, hf_config: str | None) -> list[Row]:
    """A Hugging Face Hub dataset split (needs the optional `datasets` package and network)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{name!r} is not a local file, so it would be loaded from the Hugging Face Hub, which "
            "needs the datasets package: pip install datasets"
        ) from None
    return list(datasets.load_dataset(name, hf_config, split=split))


@dataclass
class MathFileEnv(Environment):
    """Problems read from a file or Hub dataset, graded by `rewards.grade_math`."""

    path: str = ""
    """Training data: a local .jsonl/.json/.parquet file or a Hugging Face dataset name."""
    eval_path: str | None = None
    """Held-out data in the same forms; None: split off `path` (see `eval_size`)."""
    eval_size: int | None = None
    """Held-out problems. Without `eval_path`: this many cut off `path` (None: a fifth, at
    least one). With it: the first this many after a seeded shuffle (None: all)."""
    split: str = "train"
    """Split of `path` when it is a Hub dataset."""
    eval_split: str = "test"
    """Split of `eval_path` when it is a Hub dataset."""
    hf_config: str | None = None
    """Hub dataset configuration, e.g. "main" for openai/gsm8k."""
    format_weight: float = 0.0
    """Weight of the format reward in `grade_math` (0: correctness only)."""

    to_sample: ClassVar[Callable[[Row], Sample]] = staticmethod(math_sample)
    """Row -> sample conversion of the data's form (a class attribute, set by subclasses)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("path is required: a data file or a Hugging Face dataset name")
        rows = self._samples(self.path, self.split)
        if self.eval_path is None:
            self._train, self._eval = self._split(rows)
        else:
            held_out = self._shuffled(self._samples(self.eval_path, self.eval_split))
            self._eval = held_out if self.eval_size is None else held_out[: self.eval_size]
            questions = {sample["question"] for sample in self._eval}
            self._train = [sample for sample in rows if sample["question"] not in questions]

    def _samples(self, path: str, split: str) -> list[Sample]:
        return [self.to_sample(row) for row in load_rows(path, split=split, hf_config=self.hf_config)]

    def _shuffled(self, samples: list[Sample]) -> list[Sample]:
        samples = list(samples)
        random.Random(self.seed).shuffle(samples)
        return samples

    def _split(self, samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
        """(train, eval): distinct questions, seeded shuffle, the first `eval_size` held out."""
        distinct = list({sample["question"]: sample for sample in samples}.values())
        eval_size = max(1, len(distinct) // 5) if self.eval_size is None else self.eval_size
        if not 0 < eval_size < len(distinct):
            raise ValueError(f"cannot hold out {eval_size} of the {len(distinct)} problems in {self.path}")
        shuffled = self._shuffled(distinct)
        return shuffled[eval_size:], shuffled[:eval_size]

    def prompt(self, sample: Sample) -> Messages:
        return [{"role": "user", "content": PROMPT.format(question=sample["question"])}]

    def reward(self, sample: Sample, completion: str) -> RewardResult:
        return grade_math(completion, sample["answer"], format_weight=self.format_weight)


@ENVIRONMENTS.register("gsm8k")
@dataclass
class Gsm8kEnv(MathFileEnv):
    """GSM8K-form problems (`question`, `answer` ending in `#### N`); default: shipped sample."""

    path: str = str(GSM8K_SAMPLE)
    """Training data (GSM8K form); default: the 30-problem sample shipped with wapo."""

    to_sample = staticmethod(gsm8k_sample)


@ENVIRONMENTS.register("math")
@dataclass
class MathEnv(MathFileEnv):
    """MATH / MATH-500-form problems (`problem`, `solution`, optional `answer`)."""

    path: str = str(MATH_SAMPLE)
    """Training data (MATH form); default: the 30-problem sample shipped with wapo."""

    to_sample = staticmethod(math_sample)
