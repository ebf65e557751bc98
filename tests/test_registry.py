import pytest

from wapo.registry import Registry


def test_register_lookup_and_listing():
    reg = Registry("thing")
    reg.register("b")(2)
    reg.register("a")(1)
    assert reg["a"] == 1 and sorted(reg) == ["a", "b"] and list(reg) == ["a", "b"] and len(reg) == 2


def test_duplicate_name_fails():
    reg = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        reg.register("a")(2)
    assert reg["a"] == 1


def test_unknown_name_lists_known_ones():
    reg = Registry("loss")
    reg.register("wapo")(1)
    reg.register("grpo")(2)
    with pytest.raises(KeyError, match=r"unknown loss 'ppo'; known: grpo, wapo"):
        reg["ppo"]
    with pytest.raises(KeyError, match="known: grpo, wapo"):
        reg.check("ppo")
