"""Reward functions: answer extraction, math equivalence, QA exact match and F1.

Parsing and grading are separate steps (STYLE.md §6): `extract_answer` finds what the model
answered, `math_equal` / `qa_exact_match` / `qa_f1` judge it, and `grade_math` joins the two
into a `RewardResult` whose `reason` says why a completion scored what it did.

Bounded time. `math_verify` parses with ANTLR and compares with SymPy; some short inputs take
forever there (measured: `9^{9^{9}}` computes a 370-million-digit integer; eight nested
brackets take 2 s, thirty take minutes; `(a+b+c+d+e+f)^{10}` expands for 9 s). Its own
timeout uses `signal.alarm`, which only works in the main thread, so we switch it off and
bound the time ourselves, in three layers:

1. fast paths: equal spellings, and two plain decimals (`18` vs `18.0`), never reach SymPy,
   which keeps arithmetic and GSM8K grading cheap;
2. cheap pre-checks (`_refusal`) refuse, in microseconds, the shapes measured to blow up:
   long answers, deep bracket nesting, exponent towers, huge exponents, factorials and
   binomials; the reason names the rule;
3. the rest runs in a child process (`_GraderProcess`) given `timeout_s` seconds; past them
   the child is killed (and restarted on next use) and the answer scores 0 with reason
   "grader timeout". The child's address space is capped (`GRADER_MEMORY_BYTES` beyond what
   it holds once loaded, on Linux), so an answer that makes SymPy allocate without bound
   scores 0 with reason "grader out of memory" instead of swapping the machine.

Those are verdicts on the answer. A grader that cannot work at all raises
`GraderUnavailable` instead, which `wapo.scoring` counts as a reward error: the child failed
to start (the reason says why), or it was already started `MAX_GRADER_STARTS` times in the
same scoring call (`grader_start_budget`), which bounds what a batch of answers that each
time out or crash the child can cost a step.

`math_equal` and `grade_math` are safe to call from several threads at once (they share the
child process behind a lock).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import string
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from multiprocessing.connection import Connection
from pathlib import Path

from wapo.envs.base import RewardResult

TIMEOUT_S = 1.0
"""Default wall-clock bound of one `math_equal` comparison (parse both sides, then verify)."""
MAX_ANSWER_CHARS = 300
"""Longer answers are refused unparsed; MATH-500's longest answers are about 120 characters."""
MAX_NESTING = 6
"""Deepest bracket nesting ({, (, [) accepted: parsing takes 0.4 s at 6 and 2 s at 8."""
MAX_EXPONENT = 100_000
"""Largest integer exponent, factorial or binomial argument accepted."""
MAX_GROUP_EXPONENT = 10
"""Largest integer exponent of a bracketed base such as `(a+b)^{10}`: SymPy expands it."""
GRADER_MEMORY_BYTES = 2 << 30
"""Address space the grader process may take beyond what it holds once loaded (2 GiB)."""
MAX_GRADER_STARTS = 4
"""Starts of the grader process allowed in one scoring call (`grader_start_budget`)."""


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

_LAST_NUMBER = re.compile(r"(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
"""A number: optional sign (not a minus between two operands), thousands commas, decimals,
and an optional `/denominator`, e.g. `-1,234.5`, `3/4`."""


def extract_answer(text: str) -> str | None:
    """The model's final answer in `text`, or None.

    Tried in order, the first that matches wins:
    1. the content of the last `\\boxed{...}` (nested braces balanced; `\\boxed 5` too);
    2. the content of the last `<answer>...</answer>` (an unclosed last `<answer>` takes the
       rest of the text, as when generation stopped at the closing tag);
    3. the rest of the line after the last `####` (GSM8K's format);
    4. the last number in the text, commas removed (`1,234` -> `1234`).
    Empty contents count as no answer. Runs in linear time on any input.
    """
    return _extract(text)[0]


def _extract(text: str) -> tuple[str | None, str | None]:
    """(answer, format) where format is "boxed", "answer_tag", "hashes", "last_number" or None."""
    finders = (("boxed", last_boxed), ("answer_tag", _last_answer_tag), ("hashes", _after_hashes))
    for fmt, find in finders:
        found = find(text)
        if found:
            return found, fmt
    numbers = _LAST_NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace(",", ""), "last_number"
    return None, None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced; None if absent or unclosed."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    rest = text[start + len("\\boxed") :]
    if not rest.startswith("{"):
        if not rest.startswith(" "):
            return None
        token = rest.split(maxsplit=1)
        return token[0].rstrip("$.") if token else None
    depth = 0
    for i, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip()
    return None


def _last_answer_tag(text: str) -> str | None:
    """Content of the last `<answer>` tag (closed or, if last, unclosed)."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    content = text[start + len("<answer>") :]
    end = content.find("</answer>")
    return (content if end < 0 else content[:end]).strip()


def _after_hashes(text: str) -> str | None:
    """The rest of the line after the last `####`."""
    start = text.rfind("####")
    if start < 0:
        return None
    return text[start + 4 :].split("\n", 1)[0].strip()


# ---------------------------------------------------------------------------------------------
# Math equivalence
# ---------------------------------------------------------------------------------------------


class GraderFailure(Exception):
    """The grader process ran past its time or memory bound or died; the message is the reason."""


class GraderUnavailable(Exception):
    """The grader process could not be started, or its starts in this scoring call are spent;
    the message says which. Raised through `math_equal` and `grade_math`."""


def math_equal(pred: str, gold: str, *, timeout_s: float = TIMEOUT_S) -> bool:
    """Whether `pred` and `gold` denote the same mathematical object (math-verify).

    Equal: `1/2` and `0.5`, `\\frac{1}{2}` and `0.5`, `x=3` and `3`, `1,000` and `1000`,
    `\\{1,2\\}` and `\\{2,1\\}`. Refused (False) without parsing: see `_refusal`. Takes at
    most about `timeout_s` seconds once the grader process runs, and is thread-safe; raises
    `GraderUnavailable` when that process cannot run. See the module docstring.
    """
    return _compare(pred, gold, timeout_s=timeout_s)[0]


def _compare(pred: str, gold: str, *, timeout_s: float) -> tuple[bool, str]:
    """(equal, reason): "correct", "wrong answer", "grader timeout", "grader out of memory",
    "grader crashed" or a refusal such as "answer refused: exponent tower"."""
    pred, gold = _strip_math(pred), _strip_math(gold)
    if not pred or not gold:
        return False, "no answer found" if not pred else "empty gold answer"
    plain_pred, plain_gold = _plain_form(pred), _plain_form(gold)
    if plain_pred == plain_gold:
        return True, "correct"
    if _PLAIN_DECIMAL.fullmatch(plain_pred) and _PLAIN_DECIMAL.fullmatch(plain_gold):
        equal = Decimal(plain_pred) == Decimal(plain_gold)
        return equal, "correct" if equal else "wrong answer"
    for side, text in (("answer", pred), ("gold", gold)):
        refusal = _refusal(text)
        if refusal:
            return False, f"{side} refused: {refusal}"
    try:
        equal = _GRADER.verify(pred, gold, timeout_s)
    except GraderFailure as failure:
        return False, str(failure)
    return equal, "correct" if equal else "wrong answer"


_PLAIN_DECIMAL = re.compile(r"-?\d+(?:\.\d+)?")
"""A number without exponent notation, so `Decimal` on it is instant."""


def _strip_math(text: str) -> str:
    """Drop whitespace, surrounding `$`s and a final period: `$ 42. $` -> `42`."""
    return text.strip().strip("$").strip().rstrip(".").strip()


def _plain_form(text: str) -> str:
    """A cheap canonical spelling for the fast paths: no spaces, no thousands commas."""
    text = text.replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    return text


def _refusal(text: str) -> str | None:
    """Why `text` is too costly to hand to SymPy, or None if it looks safe.

    Each rule stops a shape measured to take seconds to hours (module docstring). A refused
    answer scores 0; no honest final answer to a grade-school or competition problem needs
    any of them.
    """
    if len(text) > MAX_ANSWER_CHARS:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    if _nesting_depth(text) > MAX_NESTING:
        return f"brackets nested deeper than {MAX_NESTING}"
    for base_end, exponent, after in _powers(text):
        if "^" in exponent or "**" in exponent or after.startswith(("^", "**")):
            return "exponent tower"
        limit = MAX_GROUP_EXPONENT if base_end and base_end in ")]}" else MAX_EXPONENT
        if _largest_integer(exponent) > limit:
            return f"exponent above {limit}"
    arguments = re.findall(r"(\d+)\s*!", text) + re.findall(r"binom\s*\{\s*(\d+)", text)
    if arguments and max(int(a) for a in arguments) > MAX_EXPONENT:
        return f"factorial or binomial of more than {MAX_EXPONENT}"
    return None


def _nesting_depth(text: str) -> int:
    """Deepest nesting of `{`, `(` and `[` (closing brackets of any kind close one level)."""
    depth = deepest = 0
    for char in text:
        if char in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "})]":
            depth = max(depth - 1, 0)
    return deepest


def _powers(text: str) -> list[tuple[str, str, str]]:
    """(last character of the base, exponent, text after the exponent) for each `^` or `**`
    in `text`; the exponent is the braced or parenthesised group, or the word, after it."""
    powers = []
    for match in re.finditer(r"\^|\*\*", text):
        rest = text[match.end() :].lstrip()
        exponent = _leading_group(rest)
        powers.append((text[: match.start()].rstrip()[-1:], exponent, rest[len(exponent) :].lstrip()))
    return powers


def _leading_group(text: str) -> str:
    """The balanced `{...}` or `(...)` group, or else the word, at the start of `text`."""
    if not text or text[0] not in "{(":
        return re.match(r"[\w.]*", text).group()
    depth = 0
    for i, char in enumerate(text):
        depth += char in "{("
        depth -= char in "})"
        if depth == 0:
            return text[: i + 1]
    return text


def _largest_integer(text: str) -> int:
    """The largest integer literal in `text` (0 if none); only called on capped-length text."""
    return max((int(n) for n in re.findall(r"\d+", text)), default=0)


@dataclass
class _StartBudget:
    """Grader process starts left in the current scoring call, and the reason once none are."""

    left: int
    spent: str


_START_BUDGET: ContextVar[_StartBudget | None] = ContextVar("grader_start_budget", default=None)


@contextlib.contextmanager
def grader_start_budget(max_starts: int | None = None) -> Iterator[None]:
    """Within the block, start the grader process at most `max_starts` times (default
    `MAX_GRADER_STARTS`; first start and restarts after a timeout or crash alike), and never
    again after a start that failed.

    Past that, each comparison that needs the process raises `GraderUnavailable("grader
    unavailable: ...")` at once, so a batch of answers that each stall or kill the grader
    costs at most `max_starts` starts and timeouts. Outside such a block starts are not
    capped. The budget belongs to the calling thread's context (threads started inside the
    block are not capped); `wapo.scoring.score_episodes` opens one per call.
    """
    max_starts = MAX_GRADER_STARTS if max_starts is None else max_starts
    if max_starts < 1:
        raise ValueError(f"max_starts must be >= 1, got {max_starts}")
    token = _START_BUDGET.set(_StartBudget(max_starts, f"grader unavailable: started {max_starts} times in this "
                                                       "scoring call"))
    try:
        yield
    finally:
        _START_BUDGET.reset(token)


class _GraderProcess:
    """A child Python process (`wapo/grader_child.py`) that runs math-verify, killed and
    replaced when a call overruns.

    A process, not a thread, because a thread stuck in SymPy cannot be stopped and would keep
    a CPU (and the GIL) busy. One child serves all threads, one comparison at a time, behind
    a lock. It is a plain subprocess (a script) talking over a socket pair rather than a
    `multiprocessing` "spawn" child, which would re-run the caller's `__main__` and so break
    scripts without an `if __name__ == "__main__"` guard; it is safe beside CUDA and threads
    (no fork of the parent). Starting it (importing SymPy and ANTLR) takes a second or two
    on first use and is not counted in `timeout_s`. It exits when the parent closes the
    socket, i.e. when the parent exits.

    `target` ("module:function") replaces math-verify as the comparison the child runs (for
    tests); `memory_bytes` is the address space the child may take beyond what it holds once
    loaded.
    """

    STARTUP_TIMEOUT_S = 120.0

    def __init__(self, target: str | None = None, memory_bytes: int = GRADER_MEMORY_BYTES) -> None:
        self.target, self.memory_bytes = target, memory_bytes
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None

    def verify(self, pred: str, gold: str, timeout_s: float) -> bool:
        """Whether `pred` equals `gold`, decided in the child; GraderFailure if it overran, ran
        out of memory or died; GraderUnavailable if the child cannot be started."""
        with self._lock:
            conn = self._ensure_started()
            try:
                conn.send((pred, gold))
                if not conn.poll(timeout_s):
                    raise GraderFailure("grader timeout")
                status, value = conn.recv()
            except (EOFError, OSError) as error:
                self._stop()
                raise GraderFailure("grader crashed") from error
            except BaseException:  # a timeout, or Ctrl-C: an unread reply would answer the next call
                self._stop()
                raise
        if status == "out of memory":
            raise GraderFailure("grader out of memory")
        if status == "error":
            raise RuntimeError(f"math-verify failed inside the grader process: {value}")
        return value

    def _ensure_started(self) -> Connection:
        """The running child's connection, starting one if there is none (within the budget)."""
        if self._process is not None and self._process.poll() is None:
            return self._conn
        self._stop()
        budget = _START_BUDGET.get()
        if budget is not None:
            if budget.left == 0:
                raise GraderUnavailable(budget.spent)
            budget.left -= 1
        try:
            return self._start()
        except GraderUnavailable:
            if budget is not None:
                budget.left, budget.spent = 0, "grader unavailable: it failed to start earlier in this scoring call"
            raise

    def _start(self) -> Connection:
        """Start the child and wait for it to say it is ready; GraderUnavailable if it does not."""
        parent_end, child_end = socket.socketpair()
        fd = child_end.fileno()
        try:
            self._process = subprocess.Popen(
                [sys.executable, str(_CHILD_SCRIPT), str(fd), str(self.memory_bytes),
                 *([self.target] if self.target else [])],
                pass_fds=[fd],
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)},
            )
        except OSError as error:
            parent_end.close()
            raise GraderUnavailable(f"grader failed to start: {type(error).__name__}: {error}") from error
        finally:
            child_end.close()
        self._conn = Connection(parent_end.detach())
        try:
            if self._conn.poll(self.STARTUP_TIMEOUT_S):
                self._conn.recv()  # "ready"; EOFError if the child died
                return self._conn
            why = f"was not ready after {self.STARTUP_TIMEOUT_S:.0f} s"
        except (EOFError, OSError):
            why = "exited during start-up (its error is on stderr)"
        except BaseException:  # Ctrl-C while waiting: its unread "ready" would answer a comparison
            self._stop()
            raise
        self._stop()
        raise GraderUnavailable(f"grader failed to start: the process {why}")

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._conn.close()
        self._process = self._conn = None


_CHILD_SCRIPT = Path(__file__).with_name("grader_child.py")
_GRADER = _GraderProcess()


# ---------------------------------------------------------------------------------------------
# Math grading
# ---------------------------------------------------------------------------------------------

FORMATTED = frozenset({"boxed", "answer_tag", "hashes"})
"""Answer formats that earn the format reward: `\\boxed{}`, `<answer>` tags and `#### N`."""


def grade_math(
    completion: str, gold: str, *, format_weight: float = 0.0, timeout_s: float = TIMEOUT_S
) -> RewardResult:
    """Grade a math completion: extract the answer, then compare it with `gold`.

    score = (1 - w) * [answer equals gold] + w * [answer given in a recognised format]

    with w = `format_weight` in [0, 1] and the recognised formats in `FORMATTED` (the last
    number in the text is accepted as the answer but earns no format reward). With w > 0 the
    format term rewards a boxed answer even when it is wrong: that is the point, it teaches
    the format before the model can solve the problems; keep w small (e.g. 0.1, and below
    1/2 so that a right answer always beats a well-formatted wrong one). `correct` is True
    only on full score, so with w > 0 a right but unformatted answer is not counted correct.
    """
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    answer, fmt = _extract(completion)
    if answer is None:
        return RewardResult(score=0.0, correct=False, reason="no answer found")
    equal, reason = _compare(answer, gold, timeout_s=timeout_s)
    formatted = fmt in FORMATTED
    correct = equal and (formatted or format_weight == 0.0)  # full score, without float round-off
    score = 1.0 if correct else (1.0 - format_weight) * equal + format_weight * formatted
    if equal and not correct:
        reason = "correct answer, unrecognised format"
    return RewardResult(score=score, correct=correct, reason=reason, extracted=answer)


# ---------------------------------------------------------------------------------------------
# Question answering (SQuAD v2 evaluation script)
# ---------------------------------------------------------------------------------------------


def normalize_qa(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles a/an/the, squash spaces."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def qa_exact_match(pred: str, golds: list[str]) -> float:
    """1.0 if `pred` equals any gold after `normalize_qa`, else 0.0 (0.0 for no golds)."""
    normalized = normalize_qa(pred)
    return float(any(normalized == normalize_qa(gold) for gold in golds))


def qa_f1(pred: str, golds: list[str]) -> float:
    """SQuAD token F1, the maximum over `golds` (0.0 for no golds).

    F1 = 2 P R / (P + R), P = shared tokens / pred tokens, R = shared tokens / gold tokens,
    tokens of `normalize_qa` split on spaces and shared counted with multiplicity. As in
    SQuAD v2, when either side normalises to nothing F1 is 1 if both do, else 0.
    """
    return max((_token_f1(pred, gold) for gold in golds), default=0.0)


def _token_f1(pred: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_qa(pred).split(), normalize_qa(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    shared = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(pred_tokens), shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)
