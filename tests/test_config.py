from pathlib import Path

import pytest

from wapo import config as cfg
from wapo.envs import make_env
from wapo.losses import LOSSES

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.[ty]*ml"))


def test_dump_and_reload_round_trip(tmp_path):
    config = cfg.from_dict({"algorithm": {"loss": "grpo", "loss_options": {"eps": 0.1}}, "optim": {"lr": 3e-6}})
    path = tmp_path / "config.toml"
    path.write_text(cfg.dump_toml(config))
    assert cfg.from_dict(cfg.load_file(path)) == config


def test_types_are_checked_and_coerced():
    config = cfg.from_dict({"optim": {"lr": "1e-5"}, "run": {"steps": "3"}, "model": {"bf16": "true"}})
    assert (config.optim.lr, config.run.steps, config.model.bf16) == (1e-5, 3, True)
    with pytest.raises(cfg.ConfigError, match=r"run.steps: expected int, got 'many'"):
        cfg.from_dict({"run": {"steps": "many"}})
    with pytest.raises(cfg.ConfigError, match=r"unknown config section\(s\) \['trainer'\]"):
        cfg.from_dict({"trainer": {}})


def test_every_leaf_field_is_documented_and_has_a_unique_flag():
    docs = cfg._field_docs()
    leaves = cfg.leaf_fields()
    assert set(docs) == set(leaves)
    assert all(docs[name] for name in leaves)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_are_valid(path):
    config = cfg.from_dict(cfg.load_file(path))
    LOSSES.check(config.algorithm.loss)
    make_env(config.env.env, config.env.env_options)
