import pytest
import torch

import wapo


def test_group_mean():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    # group 1 mean 0.5 -> ±0.5; group 2 all equal -> 0
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    torch.testing.assert_close(wapo.compute_advantages("group_mean", r, 4), expected)


def test_group_norm_uses_unbiased_std():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1])
    # unbiased std of [1,0,0,1] = sqrt((4 * 0.25) / 3) = 0.57735; 0.5 / (0.57735 + 1e-6) = 0.866024
    a = 0.5 / ((1 / 3) ** 0.5 + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0, 0, 0, 0])
    torch.testing.assert_close(wapo.compute_advantages("group_norm", r, 4), expected)


def test_rloo():
    r = torch.tensor([1.0, 0, 0, 1, 2, 0])
    # r0: 1 - (0+0+1)/3 = 2/3; r1: 0 - (1+0+1)/3 = -2/3; group 2 (G=2): 2 - 0 = 2, 0 - 2 = -2
    r4 = torch.tensor([1.0, 0, 0, 1])
    torch.testing.assert_close(wapo.compute_advantages("rloo", r4, 4), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    torch.testing.assert_close(wapo.compute_advantages("rloo", r[4:], 2), torch.tensor([2.0, -2.0]))


def test_best_of_group():
    r = torch.tensor([0.2, 0.9, 0.9, 0.1, 1.0, 1.0, 1.0, 1.0])
    # group 1: both 0.9 rows are best; group 2 all equal -> nothing selected
    expected = torch.tensor([0.0, 1, 1, 0, 0, 0, 0, 0])
    torch.testing.assert_close(wapo.compute_advantages("best_of_group", r, 4), expected)


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match="multiple of group_size"):
        wapo.compute_advantages("group_mean", torch.ones(5), 2)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        wapo.compute_advantages("group_norm", torch.ones(4), 1)
    with pytest.raises(KeyError, match="known: best_of_group, group_mean, group_norm, rloo"):
        wapo.compute_advantages("gae", torch.ones(4), 2)


@pytest.mark.parametrize("name", sorted(wapo.ADVANTAGES))
def test_an_empty_batch_has_empty_advantages_without_warnings(name):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = wapo.compute_advantages(name, torch.zeros(0), 4)
    assert out.shape == (0,) and out.dtype == torch.float32
