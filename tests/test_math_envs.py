"""Math environments: reasoning-gym splits and grading, GSM8K / MATH loading, `make_env`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from wapo.envs import ENVIRONMENTS, make_env
from wapo.envs.math_datasets import GSM8K_SAMPLE, MATH_SAMPLE, Gsm8kEnv, MathEnv, load_rows
from wapo.envs.reasoning_gym import ARITHMETIC_CONFIG, ArithmeticEnv, ReasoningGymEnv, extract_final_answer
from wapo.rewards import last_boxed


def questions(samples: list[dict]) -> set[str]:
    return {sample["question"] for sample in samples}


# --- reasoning-gym ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arithmetic() -> ArithmeticEnv:
    return ArithmeticEnv(seed=0)


def test_arithmetic_defaults_are_one_digit_addition(arithmetic: ArithmeticEnv) -> None:
    assert (len(arithmetic.train_set()), len(arithmetic.eval_set())) == (512, 64)
    for sample in arithmetic.train_set() + arithmetic.eval_set():
        a, plus, b = sample["metadata"]["expression"].split()
        assert plus == "+" and 0 <= int(a) <= 10 and 0 <= int(b) <= 10  # reasoning-gym's "1 digit"
        assert int(sample["answer"]) == int(a) + int(b)


def test_arithmetic_splits_never_share_a_question(arithmetic: ArithmeticEnv) -> None:
    held_out = questions(arithmetic.eval_set())
    assert len(held_out) == 64  # distinct
    assert not held_out & questions(arithmetic.train_set())
    # 121 possible sums (0..10 + 0..10), 64 held out: training uses at most the other 57
    assert len(questions(arithmetic.train_set())) <= 121 - 64


def test_splits_are_seeded(arithmetic: ArithmeticEnv) -> None:
    again, other = ArithmeticEnv(seed=0), ArithmeticEnv(seed=1)
    assert again.eval_set() == arithmetic.eval_set() and again.train_set() == arithmetic.train_set()
    assert other.eval_set() != arithmetic.eval_set()


def test_arithmetic_prompt_poses_the_question(arithmetic: ArithmeticEnv) -> None:
    sample = arithmetic.eval_set()[0]
    (message,) = arithmetic.prompt(sample)
    assert message["role"] == "user"
    assert message["content"].startswith(sample["question"]) and "<answer>" in message["content"]


@pytest.mark.parametrize(
    ("completion", "score", "correct", "reason"),
    [
        ("{expression} = {answer}", 1.0, True, "correct"),  # last number, no tags needed
        ("<answer>{answer}</answer>", 1.0, True, "correct"),
        ("<answer>{answer}</answer> and 99 later", 1.0, True, "correct"),  # the tag wins
        ("<answer>99</answer>", 0.0, False, "wrong answer"),
        ("1{answer}", 0.0, False, "wrong answer"),  # score_answer's partial credit is off
        ("no idea", 0.0, False, "no answer found"),
    ],
)
def test_arithmetic_reward(
    arithmetic: ArithmeticEnv, completion: str, score: float, correct: bool, reason: str
) -> None:
    sample = arithmetic.eval_set()[0]
    text = completion.format(expression=sample["metadata"]["expression"], answer=sample["answer"])
    result = arithmetic.reward(sample, text)
    assert (result.score, result.correct, result.reason) == (score, correct, reason)


def test_partial_credit_passes_score_answer_through() -> None:
    env = ArithmeticEnv(train_size=4, eval_size=4, partial_credit=True)
    sample = {**env.eval_set()[0], "answer": "5"}
    # basic_arithmetic: gold "5" inside "15" earns len("5") / len("15") = 0.5
    result = env.reward(sample, "15")
    assert (result.score, result.correct, result.reason) == (0.5, False, "partial credit")


def test_rg_shorthand_builds_any_dataset() -> None:
    env = make_env("rg:chain_sum", {"train_size": 8, "eval_size": 4, "config": {"max_terms": 2}})
    assert isinstance(env, ReasoningGymEnv) and env.dataset == "chain_sum"
    assert (len(env.train_set()), len(env.eval_set())) == (8, 4)
    sample = env.eval_set()[0]
    assert env.reward(sample, f"The answer is {sample['answer']}").correct


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs dataset="),
        ({"dataset": "no_such_task"}, "known: .*basic_arithmetic"),
        ({"dataset": "basic_arithmetic", "config": {"digits": 1}}, "its fields: .*max_digits"),
        ({"dataset": "basic_arithmetic", "config": ARITHMETIC_CONFIG, "eval_size": 200}, "too few"),  # 121 sums
    ],
)
def test_rg_errors_explain(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReasoningGymEnv(**options)


@pytest.mark.parametrize(
    ("completion", "numeric", "expected"),
    [
        ("3 + 4 = 7", True, "7"),
        ("<answer>yes</answer>", False, "yes"),
        ("so \\boxed{12}", True, "12"),
        ("thinking...\nthe word is Apple\n", False, "the word is Apple"),  # last non-empty line
        ("no number", True, None),
    ],
)
def test_extract_final_answer(completion: str, numeric: bool, expected: str | None) -> None:
    assert extract_final_answer(completion, numeric=numeric) == expected


# --- GSM8K and MATH files --------------------------------------------------------------------


def test_gsm8k_sample_loads_and_grades() -> None:
    env = Gsm8kEnv()
    rows = load_rows(GSM8K_SAMPLE)
    assert len(rows) == 30
    assert (len(env.train_set()), len(env.eval_set())) == (24, 6)  # a fifth held out
    for sample in env.train_set() + env.eval_set():
        assert sample["answer"].isdigit() and sample["solution"].endswith(f"#### {sample['answer']}")
        assert env.reward(sample, sample["solution"]).correct  # the reference solution is right
        assert not env.reward(sample, f"\\boxed{{{int(sample['answer']) + 1}}}").correct


def test_math_sample_loads_and_grades() -> None:
    env = MathEnv()
    rows = load_rows(MATH_SAMPLE)
    assert len(rows) == 30 and all(last_boxed(row["solution"]) == row["answer"] for row in rows)
    for sample in env.train_set() + env.eval_set():
        assert env.reward(sample, f"Done: \\boxed{{{sample['answer']}}}").correct
    sample = next(s for s in env.train_set() + env.eval_set() if s["answer"] == "\\frac{3}{4}")
    assert env.reward(sample, "\\boxed{0.75}").correct  # equivalent forms count
    assert env.prompt(sample)[0]["content"].endswith("within \\boxed{}.")


def test_file_splits_are_disjoint_and_seeded() -> None:
    first, again, other = MathEnv(seed=3), MathEnv(seed=3), MathEnv(seed=4, eval_size=10)
    assert not questions(first.train_set()) & questions(first.eval_set())
    assert len(questions(first.train_set()) | questions(first.eval_set())) == 30
    assert first.eval_set() == again.eval_set()
    assert (len(other.train_set()), len(other.eval_set())) == (20, 10)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_math_gold_falls_back_to_the_last_box(tmp_path: Path) -> None:
    rows = [{"problem": f"{i} + {i}?", "solution": f"\\boxed{{1}} no, \\boxed{{{2 * i}}}"} for i in range(5)]
    env = MathEnv(path=str(write_jsonl(tmp_path / "math.jsonl", rows)), eval_size=1)
    assert sorted(int(s["answer"]) for s in env.train_set() + env.eval_set()) == [0, 2, 4, 6, 8]


def test_eval_path_is_held_out_and_removed_from_training(tmp_path: Path) -> None:
    rows = [{"question": f"q{i}", "answer": f"{i} + 0 = {i}\n#### {i}"} for i in range(6)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", rows[4:] + [{"question": "q9", "answer": "#### 9"}])
    env = Gsm8kEnv(path=str(train), eval_path=str(test))
    assert questions(env.eval_set()) == {"q4", "q5", "q9"}
    assert questions(env.train_set()) == {"q0", "q1", "q2", "q3"}  # q4, q5 also held out
    assert len(Gsm8kEnv(path=str(train), eval_path=str(test), eval_size=2).eval_set()) == 2


def test_json_list_file(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.json"
    path.write_text(json.dumps([{"question": f"q{i}", "answer": f"#### {i:,}"} for i in (5, 1500)]))
    assert [row["question"] for row in load_rows(path)] == ["q5", "q1500"]
    env = Gsm8kEnv(path=str(path), eval_size=1)
    assert sorted(s["answer"] for s in env.train_set() + env.eval_set()) == ["1500", "5"]  # "1,500" -> "1500"


def test_parquet_file(tmp_path: Path) -> None:
    parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    rows = [{"problem": f"{i} + 1?", "solution": f"\\boxed{{{i + 1}}}", "answer": str(i + 1)} for i in range(5)]
    parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "math.parquet")
    assert load_rows(tmp_path / "math.parquet") == rows


def test_missing_files_and_hub_names_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_rows("missing/train.jsonl")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        load_rows("openai/gsm8k", hf_config="main")


def test_gsm8k_row_without_final_answer_fails(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "no final line"}])
    with pytest.raises(ValueError, match="####"):
        Gsm8kEnv(path=str(path))


# --- make_env --------------------------------------------------------------------------------


def test_registered_names() -> None:
    assert {"arithmetic", "rg", "gsm8k", "math"} <= set(ENVIRONMENTS)


def test_make_env_builds_with_options() -> None:
    env = make_env("arithmetic", {"train_size": 16, "eval_size": 8, "seed": 2})
    assert isinstance(env, ArithmeticEnv) and (len(env.train_set()), env.seed) == (16, 2)


def test_make_env_unknown_name_lists_the_known() -> None:
    with pytest.raises(KeyError, match="known: .*arithmetic.*gsm8k"):
        make_env("arithmetik")


def test_make_env_unknown_option_lists_the_valid() -> None:
    with pytest.raises(ValueError, match="unknown option.*train_sise.*valid: .*train_size"):
        make_env("arithmetic", {"train_sise": 3})
    with pytest.raises(ValueError, match="already names the dataset"):
        make_env("rg:chain_sum", {"dataset": "leg_counting"})
