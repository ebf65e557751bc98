"""Every documented default: each objective's advantage estimator and hyper-parameters, that a
call without hyper-parameters uses exactly those values, and which rows carry gradient."""

import math
import re
from pathlib import Path

import pytest
import torch

import wapo
from wapo.advantages import ADVANTAGES
from wapo.losses import DEFAULT_ADVANTAGE, LOSSES, hyperparameters, rows_with_gradient

ROOT = Path(__file__).resolve().parent.parent

# What README.md, docs/math.md ("Defaults") and the objectives' docstrings document.
DOCUMENTED = {
    "wapo": ("group_mean", {"eps_high": 9.0, "denominator": "all"}),
    "grpo": ("group_norm", {"eps": 0.2}),
    "dr_grpo": ("group_mean", {"eps": 0.2}),
    "dapo": ("group_norm", {"eps_low": 0.2, "eps_high": 0.28}),
    "gspo": ("group_norm", {"eps_low": 3e-4, "eps_high": 4e-4}),
    "cispo": ("group_norm", {"eps_low": 1.0, "eps_high": 4.0}),  # MiniMax-M1 uses GRPO's advantage
    "raft": ("best_of_group", {}),
}


def test_every_objective_is_documented():
    assert sorted(DOCUMENTED) == sorted(LOSSES) == sorted(DEFAULT_ADVANTAGE)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_default_advantage_estimator(name):
    assert DEFAULT_ADVANTAGE[name] == DOCUMENTED[name][0]
    ADVANTAGES.check(DEFAULT_ADVANTAGE[name])


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_hyperparameter_defaults(name):
    assert hyperparameters(name) == DOCUMENTED[name][1]


# ---------------------------------------------------------------------------------------------
# The documentation's tables say the same as the code
# ---------------------------------------------------------------------------------------------


def _table(path: Path, column: str) -> dict[str, dict[str, str]]:
    """Rows of the markdown table of `path` that has a `column` header: {first cell: {header: cell}}."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and column in cells:
            rows = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                values = [c.strip() for c in row.strip().strip("|").split("|")]
                rows[values[0].strip("`")] = dict(zip(cells, values))
            return rows
    raise AssertionError(f"no table with a {column!r} column in {path}")


def _numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?(?:e-?\d+)?", text)]


@pytest.mark.parametrize("doc", ["README.md", "docs/math.md"])
def test_the_defaults_tables_match_the_code(doc):
    table = _table(ROOT / doc, "defaults")
    assert sorted(table) == sorted(LOSSES)
    for name, (advantage, hparams) in DOCUMENTED.items():
        cell = table[name]["defaults"]
        # every numeric default, in signature order, and no other number
        assert _numbers(cell) == [v for v in hparams.values() if isinstance(v, float)], (doc, name, cell)
        if "advantage" in table[name]:
            assert table[name]["advantage"] == f"`{advantage}`", (doc, name)
    math_table = _table(ROOT / "docs/math.md", "defaults")
    assert 'denominator = "all"' in math_table["wapo"]["defaults"]


# ---------------------------------------------------------------------------------------------
# The defaults are the values used: a call without hyper-parameters gives the hand-computed
# number, the documented values passed explicitly give the same, and changing any one of them
# changes the number (the batch is built so that every clip bites).
# ---------------------------------------------------------------------------------------------


def _clipping_batch():
    """B = 4 rows in 2 groups of G = 2, T = 2 tokens, L = max_len = 4 (B·L = 16, 8 tokens).

    row 0: winner A = +1, ρ = [12, 1.5], logπ = [-1, -2]
    row 1: loser  A = -1, ρ = [0.5, 0.1], logπ = [-0.5, -3]
    rows 2, 3: an all-equal group, A = 0, ρ = 1, logπ = -1
    logμ = logπ − log ρ, so that exp(logπ − logμ) = ρ.
    """
    logprobs = torch.tensor([[-1.0, -2], [-0.5, -3], [-1, -1], [-1, -1]], dtype=torch.float64, requires_grad=True)
    ratios = torch.tensor([[12.0, 1.5], [0.5, 0.1], [1, 1], [1, 1]], dtype=torch.float64)
    old = (logprobs - ratios.log()).detach()
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64)
    return logprobs, old, adv, torch.ones(4, 2, dtype=torch.bool)


DEFAULT_LOSS = {
    # winner only: −1·[min(12, 10) + min(1.5, 10)] = −11.5, / (B·L = 16)
    "wapo": -11.5 / 16,
    # row 0: −min(12, 1.2) = −1.2, −min(1.5, 1.2) = −1.2 -> mean −1.2
    # row 1: −min(−0.5, −0.8) = 0.8, −min(−0.1, −0.8) = 0.8 -> mean 0.8; rows 2, 3: 0; / B = 4
    "grpo": (-1.2 + 0.8) / 4,
    # the same tokens summed: −2.4 + 1.6 = −0.8, / (B·L = 16)
    "dr_grpo": -0.8 / 16,
    # row 0: −1.28 − 1.28; row 1: 0.8 + 0.8 -> −0.96, / 8 tokens
    "dapo": -0.96 / 8,
    # s_0 = √(12·1.5) = 4.24 -> clipped to 1.0004: −1.0004; s_1 = √0.05 = 0.224, A = −1:
    # −min(−0.224, −0.9997) = 0.9997; rows 2, 3: 0 -> −0.0007, / B = 4
    "gspo": (-1.0004 + 0.9997) / 4,
    # weights clip(ρ, 0, 5) = [5, 1.5], [0.5, 0.1]; −w·A·logπ: 5 + 3 − 0.25 − 0.3 = 7.45, / 8 tokens
    "cispo": 7.45 / 8,
    # −logπ of the winner's tokens: 1 + 2 = 3, / its 2 tokens
    "raft": 3 / 2,
}

OTHER_VALUES = [
    # (loss, hyper-parameter, another value, the loss it gives)
    ("wapo", "eps_high", 0.2, -(1.2 + 1.2) / 16),
    ("wapo", "denominator", "contributing", -11.5 / 8),  # 1 group with a winner · G·L = 8
    ("grpo", "eps", 0.3, (-1.3 + 0.7) / 4),
    ("dr_grpo", "eps", 0.3, (-2.6 + 1.4) / 16),
    ("dapo", "eps_low", 0.3, (-2.56 + 1.4) / 8),
    ("dapo", "eps_high", 0.3, (-2.6 + 1.6) / 8),
    ("gspo", "eps_low", 4e-4, (-1.0004 + 0.9996) / 4),
    ("gspo", "eps_high", 3e-4, (-1.0003 + 0.9997) / 4),
    ("cispo", "eps_low", 0.5, (5 + 3 - 0.25 - 1.5) / 8),  # weight of ρ = 0.1 raised to 0.5
    ("cispo", "eps_high", 9.0, (10 + 3 - 0.25 - 0.3) / 8),  # weight of ρ = 12 capped at 10
]


def test_every_hyperparameter_has_another_value_that_changes_the_loss():
    covered = {(name, key) for name, key, _, _ in OTHER_VALUES}
    assert covered == {(name, key) for name in LOSSES for key in hyperparameters(name)}
    assert sorted(DEFAULT_LOSS) == sorted(LOSSES)


def _loss_and_grad(name, **hparams):
    logprobs, old, adv, mask = _clipping_batch()
    out = wapo.policy_loss(name, logprobs, old, adv, mask, max_len=4, group_size=2, **hparams)
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    return out.loss, grad


@pytest.mark.parametrize("name", sorted(DEFAULT_LOSS))
def test_a_call_without_hyperparameters_uses_the_documented_values(name):
    implicit, g_implicit = _loss_and_grad(name)
    explicit, g_explicit = _loss_and_grad(name, **DOCUMENTED[name][1])
    assert implicit.item() == pytest.approx(DEFAULT_LOSS[name], rel=1e-12)
    assert torch.equal(implicit, explicit) and torch.equal(g_implicit, g_explicit)


@pytest.mark.parametrize("name, key, value, expected", OTHER_VALUES,
                         ids=[f"{n}-{k}" for n, k, _, _ in OTHER_VALUES])
def test_another_value_of_each_hyperparameter_changes_the_loss(name, key, value, expected):
    loss, _ = _loss_and_grad(name, **{**DOCUMENTED[name][1], key: value})
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert expected != pytest.approx(DEFAULT_LOSS[name], rel=1e-6)  # so the default's test can tell


def test_raft_takes_no_hyperparameter():
    logprobs, old, adv, mask = _clipping_batch()
    with pytest.raises(TypeError, match=r"loss 'raft' has no hyper-parameter \['eps'\]; valid: \[\]"):
        wapo.policy_loss("raft", logprobs, old, adv, mask, max_len=4, eps=0.2)


# ---------------------------------------------------------------------------------------------
# Which rows carry gradient, for every objective with its own advantage estimator
# ---------------------------------------------------------------------------------------------

G = 4
REWARDS = torch.tensor([1.0, 0, 0, 1,        # a mixed 0/1 group
                        1, 1, 1, 1,          # an all-equal group
                        0.5, 1, 0, 0.5])     # a mixed group with two rows at the group mean
MASK = torch.ones(12, 3, dtype=torch.bool)
MASK[3] = False   # a winner with no model token (nothing to train on)
MASK[1, 2] = False

_NORM_0 = 0.5 / (math.sqrt(1 / 3) + 1e-6)  # unbiased std of [1, 0, 0, 1] = √(1/3)
_NORM_2 = 0.5 / (math.sqrt(1 / 6) + 1e-6)  # unbiased std of [.5, 1, 0, .5] = √(0.5/3)
ADVANTAGES_OF = {
    "group_mean": [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, 0, 0.5, -0.5, 0],
    "group_norm": [_NORM_0, -_NORM_0, -_NORM_0, _NORM_0, 0, 0, 0, 0, 0, _NORM_2, -_NORM_2, 0],
    "best_of_group": [1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0],  # the all-equal group has no best
}

#              group 0                  group 1 (all equal)         group 2
WINNERS = [True, False, False, False, False, False, False, False, False, True, False, False]
NONZERO = [True, True, True, False, False, False, False, False, False, True, True, False]
ROWS_WITH_GRADIENT = {
    # A > 0 only: rows 0 and 9 (row 3 wins but has no token); losers, the all-equal group and
    # the rows at their group's mean (8, 11) have no gradient
    "wapo": WINNERS,
    "raft": WINNERS,  # best_of_group: 1 on rows 0, 3, 9; row 3 has no token
    # A ≠ 0 (at ρ = 1 no clip bites, GSPO's s = 1 included): rows 0, 1, 2, 9, 10
    "grpo": NONZERO,
    "dr_grpo": NONZERO,
    "dapo": NONZERO,
    "gspo": NONZERO,
    "cispo": NONZERO,
}


@pytest.mark.parametrize("estimator", sorted(ADVANTAGES_OF))
def test_the_advantages_of_the_rows_batch(estimator):
    expected = torch.tensor(ADVANTAGES_OF[estimator], dtype=torch.float32)
    torch.testing.assert_close(wapo.compute_advantages(estimator, REWARDS, G), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ROWS_WITH_GRADIENT))
def test_rows_with_gradient_of_every_objective(name):
    assert sorted(ROWS_WITH_GRADIENT) == sorted(LOSSES)
    adv = wapo.compute_advantages(DEFAULT_ADVANTAGE[name], REWARDS, G)
    assert rows_with_gradient(name, adv, MASK, max_len=3, group_size=G).tolist() == ROWS_WITH_GRADIENT[name]
