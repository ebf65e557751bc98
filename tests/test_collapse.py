"""The collapse detector on synthetic metric streams, with each threshold's arithmetic."""

from __future__ import annotations

import json

import pytest

from wapo.collapse import FLAGS, CollapseDetector, repeat_ngram_frac, repeats_ngram


def _run(detector, rows, texts=None):
    texts = texts or [None] * len(rows)
    return [detector.update(row, t) for row, t in zip(rows, texts)]


def _rows(reward, entropy, truncated=None):
    truncated = truncated or [0.0] * len(reward)
    return [{"reward_mean": r, "entropy": h, "truncated_frac": t} for r, h, t in zip(reward, entropy, truncated)]


def _flag(out, name):
    return [o[name] for o in out]


def test_a_healthy_run_is_never_flagged():
    # the default run's shape: reward 0.30 -> 0.94 while entropy falls 2.1 -> 0.41 (0.195 of its start):
    # the averaged reward only rises, so it never falls 0.2 below its best and no entropy criterion fires
    reward = [0.30, 0.45, 0.52, 0.61, 0.70, 0.78, 0.85, 0.90, 0.94]
    entropy = [2.10, 1.80, 1.50, 1.20, 0.95, 0.80, 0.62, 0.50, 0.41]
    out = _run(CollapseDetector(), _rows(reward, entropy))
    assert all(o[f] == 0 for o in out for f in FLAGS)


def test_entropy_collapse_with_default_smoothing():
    # α = 0.5: r̄ = 0.5, 0.6, 0.45, 0.275; best 0.6 from step 2; drop = 0, 0, 0.15, 0.325
    #          H̄ = 2.0, 1.2, 0.7, 0.4;  0.25·H₀ = 0.5
    # step 3: drop 0.15 < 0.2; step 4: drop 0.325 ≥ 0.2 and H̄ 0.4 ≤ 0.5 -> collapse
    out = _run(CollapseDetector(), _rows([0.5, 0.7, 0.3, 0.1], [2.0, 0.4, 0.2, 0.1]))
    assert _flag(out, "collapse_entropy") == [0, 0, 0, 1]
    assert _flag(out, "collapsed") == [0, 0, 0, 1]
    assert _flag(out, "collapse_explosion") == [0, 0, 0, 0]


def test_low_entropy_without_a_reward_fall_is_not_collapse():
    # H falls to 0.05 (2.5% of its start) but the reward holds at its best: drop 0 < 0.2
    out = _run(CollapseDetector(smoothing=1), _rows([0.9, 0.9, 0.9], [2.0, 0.1, 0.05]))
    assert _flag(out, "collapsed") == [0, 0, 0]


def test_explosion_above_twice_the_start_whatever_the_reward():
    # α = 0.5: H̄ = 1.0, 1.25, 2.125, 2.3125 against 2·H₀ = 2.0 -> steps 3 and 4
    out = _run(CollapseDetector(), _rows([0.5] * 4, [1.0, 1.5, 3.0, 2.5]))
    assert _flag(out, "collapse_explosion") == [0, 0, 1, 1]
    assert _flag(out, "collapse_entropy") == [0, 0, 0, 0]


def test_explosion_when_the_reward_falls_while_entropy_is_above_its_start():
    # α = 1: best 0.8 at step 2; step 3 drop 0.8 − 0.55 = 0.25 ≥ 0.2 with H 1.1 ≥ 1.0·H₀ -> explosion
    out = _run(CollapseDetector(smoothing=1), _rows([0.6, 0.8, 0.55], [1.0, 0.9, 1.1]))
    assert _flag(out, "collapse_explosion") == [0, 0, 1]
    # the same fall with H 0.9: below its start (no explosion), above 0.25·H₀ (no collapse)
    out = _run(CollapseDetector(smoothing=1), _rows([0.6, 0.8, 0.55], [1.0, 0.9, 0.9]))
    assert _flag(out, "collapsed") == [0, 0, 0]


def test_repeats_ngram_counts_six_word_grams():
    loop = "the answer is 5. "  # 5 words: the, answer, is, 5, "."
    # 3 loops = 15 words: the 6-gram at 0 recurs at 5 only (at 10 it would need 16 words) -> 2 < 3
    assert not repeats_ngram(loop * 3)
    # 4 loops = 20 words: at 0, 5 and 10 -> 3
    assert repeats_ngram(loop * 4)
    # "5 5 5 5 5 5 5" (7 words) has two 6-grams; 8 words have three
    assert not repeats_ngram("5 " * 7) and repeats_ngram("5 " * 8)
    assert repeats_ngram("1+2=3\n" * 4)  # 5 words a line ("1+2=3" splits at the signs)
    assert not repeats_ngram("1+2=3\n" * 4, n=6, min_count=4)
    assert repeat_ngram_frac(["5 " * 8, "a b c", loop * 4, "x"]) == 0.5
    assert repeat_ngram_frac([]) is None


def test_repetition_rising_from_its_start_is_flagged_and_a_constant_share_is_not():
    healthy, loop = "one plus two is three", "the answer is 5. " * 4
    rows = _rows([0.5] * 3, [1.0] * 3)
    # α = 1: shares 0, 0.5, 0.75; step 2: 0.5 ≥ 0.5 and 0.5 − 0 ≥ 0.25
    out = _run(CollapseDetector(smoothing=1), rows,
               [[healthy] * 4, [healthy, healthy, loop, loop], [healthy, loop, loop, loop]])
    assert [o["repeat_ngram_frac"] for o in out] == [0, 0.5, 0.75]
    assert _flag(out, "collapse_repetition") == [0, 1, 1]
    # a task whose answers repeat themselves from the start (share 0.75 throughout): no rise, no flag
    out = _run(CollapseDetector(smoothing=1), rows, [[healthy, loop, loop, loop]] * 3)
    assert _flag(out, "collapse_repetition") == [0, 0, 0]


def test_replay_reads_the_logged_repetition_share():
    rows = [{**r, "repeat_ngram_frac": x} for r, x in zip(_rows([0.5] * 2, [1.0] * 2), [0.0, 0.6])]
    out = _run(CollapseDetector(smoothing=1), rows)
    assert _flag(out, "collapse_repetition") == [0, 1]


def test_length_cap_share_must_rise_to_count():
    # α = 1: 0.1, 0.4, 0.9 -> step 3: 0.9 ≥ 0.5 and 0.9 − 0.1 = 0.8 ≥ 0.25
    out = _run(CollapseDetector(smoothing=1), _rows([0.5] * 3, [1.0] * 3, [0.1, 0.4, 0.9]))
    assert _flag(out, "collapse_length") == [0, 0, 1]
    # starting at 0.6 (a long task) and staying there: rise 0.05 < 0.25
    out = _run(CollapseDetector(smoothing=1), _rows([0.5] * 3, [1.0] * 3, [0.6, 0.62, 0.65]))
    assert _flag(out, "collapse_length") == [0, 0, 0]


def test_a_step_without_entropy_keeps_the_averages():
    # step 2 has no token (entropy null): H̄ stays 2.0; step 3: H̄ = 0.5·0.2 + 0.5·2.0 = 1.1
    detector = CollapseDetector()
    out = _run(detector, _rows([0.5, 0.5, 0.5], [2.0, None, 0.2]))
    assert detector.averages["entropy"] == pytest.approx(1.1)
    assert _flag(out, "collapsed") == [0, 0, 0]


def test_state_round_trips_through_json_and_continues_the_same_detector():
    rows = _rows([0.5, 0.7, 0.3, 0.1, 0.1, 0.6], [2.0, 0.4, 0.2, 0.1, 3.0, 5.0])
    straight = _run(CollapseDetector(), rows)
    first = CollapseDetector()
    _run(first, rows[:3])
    resumed = CollapseDetector()
    resumed.load_state(json.loads(json.dumps(first.state())))
    assert straight[3:] == _run(resumed, rows[3:])
    assert _flag(straight, "collapse_entropy")[3] == 1  # the stream collapses, then explodes
    assert _flag(straight, "collapse_explosion")[5] == 1


@pytest.mark.parametrize("bad", [{"smoothing": 0}, {"entropy_low": 1.0}, {"entropy_rise": 3.0}, {"ngram_count": 1}])
def test_inconsistent_thresholds_are_refused(bad):
    with pytest.raises(ValueError):
        CollapseDetector(**bad)
