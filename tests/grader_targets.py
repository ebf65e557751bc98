"""Comparisons that replace math-verify inside the grader process in tests/test_rewards.py.

`_GraderProcess(target="grader_targets:hog")` imports this module in its child, so it imports
nothing from wapo (which would load torch and slow each start).
"""

import time


def hog(pred: str, gold: str) -> bool:
    """Asks for 1 GiB when the answer is "hog"; otherwise compares spellings."""
    if pred == "hog":
        bytearray(1 << 30)
    return pred == gold


def slow(pred: str, gold: str) -> bool:
    """Never answers when the answer is "slow"; otherwise compares spellings."""
    if pred == "slow":
        time.sleep(600)
    return pred == gold


def sleepy(pred: str, gold: str) -> bool:
    """Answers after 1 s when the answer is "sleepy"; otherwise compares spellings at once."""
    if pred == "sleepy":
        time.sleep(1.0)
    return pred == gold
