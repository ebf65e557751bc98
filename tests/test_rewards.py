"""Reward functions: extraction, math equivalence (and its time bound), grading, QA EM / F1."""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from wapo import rewards
from wapo.envs.base import Environment
from wapo.rewards import (
    GraderUnavailable,
    extract_answer,
    grade_math,
    last_boxed,
    math_equal,
    qa_exact_match,
    qa_f1,
)
from wapo.scoring import score_episodes

# --- extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("$\\boxed 5$", "5"),
        ("<answer> Paris </answer>", "Paris"),
        ("<answer>1</answer> <answer>2</answer>", "2"),
        ("<answer>7", "7"),  # generation stopped at the closing tag
        ("<answer>\\boxed{3}</answer>", "3"),  # \boxed is tried first
        ("3 + 5 = <<3+5=8>>8\n#### 8", "8"),
        ("#### 1,234\nthanks", "1,234"),
        ("we get 12 then 1,234.5 apples.", "1234.5"),  # last number, commas removed
        ("half is 3/4", "3/4"),
        ("it is -7", "-7"),
        ("5-3=2", "2"),  # a minus between operands is not a sign
        ("\\boxed{3", "3"),  # an unclosed box is no box: the last number
    ],
)
def test_extract_answer_finds(text: str, expected: str) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "no numbers here", "\\boxed{}", "<answer></answer>", "\\boxed{x", "{" * 10_000, "<answer>" * 10_000],
)
def test_extract_answer_finds_nothing(text: str) -> None:
    assert extract_answer(text) is None


def test_last_boxed_handles_unclosed_and_empty() -> None:
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed{open") is None
    assert last_boxed("no box") is None


# --- math equivalence ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "gold"),
    [
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("x=3", "3"),
        ("1,000", "1000"),
        ("18.0", "18"),
        ("$42$", "42"),
        ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
        ("1+x^2", "x^2+1"),
        ("\\{2,1\\}", "\\{1,2\\}"),
        ("2\\pi", "6.283185307"),  # math-verify rounds to 6 decimals
    ],
)
def test_math_equal_true(pred: str, gold: str) -> None:
    assert math_equal(pred, gold)


@pytest.mark.parametrize(
    ("pred", "gold"),
    [("3", "4"), ("0.5", "0.25"), ("\\frac{1}{3}", "\\frac{1}{2}"), ("x^2", "x^3"), ("", "3"), ("-3", "3")],
)
def test_math_equal_false(pred: str, gold: str) -> None:
    assert not math_equal(pred, gold)


HOSTILE = {
    "exponent tower": "\\boxed{9^{9^{9^{9}}}}",
    "bare tower": "\\boxed{9^9^9}",
    "huge exponent": "\\boxed{9^{99999999}}",
    "huge factorial": "\\boxed{10000000!}",
    "huge binomial": "\\boxed{\\binom{10000000}{5000000}}",
    "expanded power": "\\boxed{(a+b+c+d)^{50}}",
    "100 kB of digits": "1" * 100_000,
    "100 kB in a box": "\\boxed{" + "1" * 100_000 + "}",
    "10,000 open braces": "{" * 10_000,
    "10,000 nested braces in a box": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "30 nested parentheses": "\\boxed{" + "(" * 30 + "1" + ")" * 30 + "}",
}
TIME_BOUND_S = 2.0  # generous: each is refused by a pre-check in well under a millisecond


def grade_hostile() -> dict[str, tuple[float, float]]:
    """name -> (score, seconds) of each hostile completion against gold "3"."""
    timings = {}
    for name, completion in HOSTILE.items():
        start = time.perf_counter()
        score = grade_math(completion, "3").score
        timings[name] = (score, time.perf_counter() - start)
    return timings


def test_hostile_answers_score_zero_quickly_in_the_main_thread() -> None:
    for name, (score, seconds) in grade_hostile().items():
        assert score == 0.0, name
        assert seconds < TIME_BOUND_S, (name, seconds)


def test_hostile_answers_score_zero_quickly_in_a_worker_thread() -> None:
    results: dict[str, tuple[float, float]] = {}
    worker = threading.Thread(target=lambda: results.update(grade_hostile()))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and results.keys() == HOSTILE.keys()
    for name, (score, seconds) in results.items():
        assert score == 0.0, name
        assert seconds < TIME_BOUND_S, (name, seconds)


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("9^{9^{9}}", "answer refused: exponent tower"),
        ("9^9^9", "answer refused: exponent tower"),
        ("2^{1000000}", "answer refused: exponent above 100000"),
        ("(1+x)^{11}", "answer refused: exponent above 10"),
        ("10000000!", "answer refused: factorial or binomial of more than 100000"),
        ("((((((((1))))))))", "answer refused: brackets nested deeper than 6"),
        ("x" * 301, "answer refused: longer than 300 characters"),
    ],
)
def test_refusals_say_why(answer: str, reason: str) -> None:
    assert grade_math(f"\\boxed{{{answer}}}", "3").reason == reason


def test_slow_comparison_times_out_and_the_grader_recovers() -> None:
    # Passes every pre-check but expands to ~3000 terms: about 9 s in SymPy.
    # The grader runs first: start-up is not what is timed (on a GPU machine start-up and timeout took 3 s).
    assert math_equal("\\frac{1}{2}", "0.5")
    assert rewards._GRADER._process.poll() is None
    start = time.perf_counter()
    result = grade_math("\\boxed{(a+b+c+d+e+f)^{10}}", "3", timeout_s=0.5)
    assert (result.score, result.reason) == (0.0, "grader timeout")
    assert time.perf_counter() - start < TIME_BOUND_S
    assert math_equal("\\frac{1}{2}", "0.5")  # a fresh grader process answers


def test_math_equal_from_many_threads() -> None:
    # thread i checks i/2 == i * 0.5, then i/2 != i * 0.5 + 1
    results: list[tuple[bool, bool]] = [(False, True)] * 6

    def check(i: int) -> None:
        half = f"\\frac{{{i}}}{{2}}"
        results[i] = (math_equal(half, str(i * 0.5)), math_equal(half, str(i * 0.5 + 1)))

    threads = [threading.Thread(target=check, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [(True, False)] * 6


# --- the grader process: start-up, memory, starts per scoring call ----------------------------
# `grader_targets.py` (beside this file) holds comparisons that replace math-verify inside the
# grader process; it imports nothing heavy, so that process starts fast.


@pytest.fixture
def install_grader(monkeypatch):
    """Make a fresh grader process running `target` the one `math_equal` uses; stopped after."""
    installed = []

    def install(target: str | None = None, **options) -> rewards._GraderProcess:
        grader = rewards._GraderProcess(target=target and f"grader_targets:{target}", **options)
        monkeypatch.setattr(rewards, "_GRADER", grader)
        installed.append(grader)
        return grader

    yield install
    for grader in installed:
        grader._stop()


@dataclass
class _MathEnv(Environment):
    """Grades with `grade_math` against `sample["answer"]`, or raises on "boom"."""

    timeout_s: float = rewards.TIMEOUT_S

    def reward(self, sample, completion):
        if completion == "boom":
            raise ValueError("boom")
        return grade_math(completion, sample["answer"], timeout_s=self.timeout_s)


def _score(env, completions: list[str], answer: str = "3"):
    """score_episodes on `completions`, all answering one problem whose answer is `answer`."""
    return score_episodes(env, [{"answer": answer}], [SimpleNamespace(text=c) for c in completions],
                          group_size=len(completions))


def test_a_grader_that_cannot_start_is_a_counted_reward_error_not_a_crash(install_grader, monkeypatch):
    install_grader()
    attempts = []

    def cannot_fork(*args, **kwargs):
        attempts.append(args)
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(rewards.subprocess, "Popen", cannot_fork)
    scores = _score(_MathEnv(), ["\\boxed{x+1}", "\\boxed{3}", "\\boxed{\\frac{6}{2}}"])
    assert [r.reason for r in scores.results] == [
        "reward error: GraderUnavailable: grader failed to start: OSError: [Errno 12] Cannot allocate "
        "memory",
        "correct",  # equal spellings never need the grader process
        "reward error: GraderUnavailable: grader unavailable: it failed to start earlier in this scoring call",
    ]
    assert [r.score for r in scores.results] == [0.0, 1.0, 0.0]
    assert scores.errors == 2 and len(scores.tracebacks) == 2
    assert len(attempts) == 1  # a failed start is not retried within the call


def test_a_grader_that_dies_during_start_up_says_so(install_grader):
    install_grader("no_such_comparison")  # the child fails to find it and exits
    with pytest.raises(GraderUnavailable, match="grader failed to start: the process exited during start-up"):
        math_equal("x+1", "1+x")


def test_an_answer_that_exhausts_the_graders_memory_scores_zero_quickly(install_grader):
    grader = install_grader("hog", memory_bytes=256 << 20)  # 1 GiB asked, 256 MiB allowed beyond start-up
    assert grader.verify("a", "a", timeout_s=60)  # started (start-up is not timed)
    pid = grader._process.pid
    start = time.perf_counter()
    result = grade_math("\\boxed{hog}", "3")
    assert (result.score, result.reason) == (0.0, "grader out of memory")
    assert time.perf_counter() - start < TIME_BOUND_S
    assert grader.verify("b", "b", timeout_s=60) and grader._process.pid == pid  # the same process goes on


def test_starts_of_the_grader_are_capped_per_scoring_call(install_grader, monkeypatch):
    install_grader("slow")
    monkeypatch.setattr(rewards, "MAX_GRADER_STARTS", 2)
    env = _MathEnv(timeout_s=0.2)
    scores = _score(env, ["\\boxed{slow}", "\\boxed{slow}", "\\boxed{3}", "\\boxed{slow}", "\\boxed{slow}"])
    unavailable = "reward error: GraderUnavailable: grader unavailable: started 2 times in this scoring call"
    # each timeout kills the process; the third "slow" would need a third start
    assert [r.reason for r in scores.results] == ["grader timeout", "grader timeout", "correct", unavailable,
                                                  unavailable]
    assert scores.errors == 2

    again = _score(env, ["\\boxed{slow}"])  # the next call has its own budget and its own count
    assert ([r.reason for r in again.results], again.errors) == (["grader timeout"], 0)


def test_reward_errors_are_counted_per_scoring_call():
    env = _MathEnv()
    first = _score(env, ["boom", "\\boxed{3}", "boom"])
    second = _score(env, ["boom"])
    assert (first.errors, second.errors) == (2, 1)  # not 3: nothing carries over between calls
    assert [r.reason for r in second.results] == ["reward error: ValueError: boom"]


# --- grading -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "gold", "weight", "score", "correct", "reason"),
    [
        ("so \\boxed{\\frac{1}{2}}", "0.5", 0.0, 1.0, True, "correct"),
        ("so \\boxed{3}", "4", 0.0, 0.0, False, "wrong answer"),
        ("I am not sure", "4", 0.0, 0.0, False, "no answer found"),
        ("it is 4", "4", 0.0, 1.0, True, "correct"),  # the last number counts as the answer
        # with format weight w = 0.1: score = 0.9 * correct + 0.1 * formatted
        ("<answer>4</answer>", "4", 0.1, 1.0, True, "correct"),
        ("it is 4", "4", 0.1, 0.9, False, "correct answer, unrecognised format"),
        ("\\boxed{5}", "4", 0.1, 0.1, False, "wrong answer"),
        ("#### 5", "4", 0.1, 0.1, False, "wrong answer"),
        ("it is 5", "4", 0.1, 0.0, False, "wrong answer"),
    ],
)
def test_grade_math(
    completion: str, gold: str, weight: float, score: float, correct: bool, reason: str
) -> None:
    result = grade_math(completion, gold, format_weight=weight)
    assert result.score == pytest.approx(score)
    assert (result.correct, result.reason) == (correct, reason)


def test_grade_math_reports_the_extracted_answer_and_checks_the_weight() -> None:
    assert grade_math("\\boxed{7}", "7").extracted == "7"
    with pytest.raises(ValueError, match="format_weight"):
        grade_math("\\boxed{7}", "7", format_weight=1.5)


# --- question answering --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "golds", "em"),
    [
        ("Paris", ["paris"], 1.0),
        ("The Eiffel Tower!", ["eiffel tower"], 1.0),  # case, punctuation and articles dropped
        ("an  apple", ["apple"], 1.0),
        ("Paris, France", ["Paris"], 0.0),
        ("Lyon", ["Paris", "lyon"], 1.0),  # max over golds
        ("Paris", [], 0.0),
    ],
)
def test_qa_exact_match(pred: str, golds: list[str], em: float) -> None:
    assert qa_exact_match(pred, golds) == em


@pytest.mark.parametrize(
    ("pred", "golds", "f1"),
    [
        ("hello world", ["hello"], 2 / 3),  # P = 1/2, R = 1 -> 2 * 1/2 / (3/2) = 2/3
        ("hello", ["hello world"], 2 / 3),  # P = 1, R = 1/2
        ("the cat sat", ["a cat sat down"], 0.8),  # tokens cat sat | cat sat down: P = 1, R = 2/3 -> 0.8
        ("new york city", ["york", "new york city"], 1.0),  # max over golds
        ("a a b", ["a b b"], 2 / 3),  # articles vanish: "b" vs "b b": P = 1, R = 1/2 -> 2/3
        ("b b c", ["b c c"], 2 / 3),  # shared with multiplicity: b 1 + c 1 = 2; P = R = 2/3
        ("x y", ["z"], 0.0),
        ("the", ["a"], 1.0),  # both normalise to nothing (SQuAD v2)
        ("the", ["paris"], 0.0),
        ("paris", [], 0.0),
    ],
)
def test_qa_f1(pred: str, golds: list[str], f1: float) -> None:
    assert qa_f1(pred, golds) == pytest.approx(f1)


def test_an_interrupt_while_waiting_never_shifts_the_next_verdicts(install_grader, monkeypatch):
    # Ctrl-C arrives while the child is still comparing "sleepy" with "b" (False, after 1 s). Its
    # unread reply must not answer the next question ("z" == "z": True).
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        grader = install_grader("sleepy")
        assert grader.verify("x", "x", timeout_s=30)  # started and warm
        signal.setitimer(signal.ITIMER_REAL, 0.2)  # the main thread is interrupted 0.2 s into the wait
        with pytest.raises(KeyboardInterrupt):
            grader.verify("sleepy", "b", timeout_s=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    time.sleep(1.2)  # the old child would have answered by now
    assert [grader.verify("z", "z", timeout_s=30), grader.verify("a", "b", timeout_s=30)] == [True, False]
