from pathlib import Path

import pytest

from wapo import config as cfg
from wapo.envs import make_env
from wapo.losses import LOSSES

EXAMPLES = sorted(p for p in (Path(__file__).parent.parent / "examples").glob("*.[ty]*ml")
                  if not p.name.startswith("study_"))  # study files: tests/test_study.py


def test_dump_and_reload_round_trip(tmp_path):
    config = cfg.from_dict({"algorithm": {"loss": "grpo", "loss_options": {"eps": 0.1}}, "optim": {"lr": 3e-6}})
    path = tmp_path / "config.toml"
    path.write_text(cfg.dump_toml(config))
    assert cfg.from_dict(cfg.load_file(path)) == config


def test_types_are_checked_and_coerced():
    config = cfg.from_dict({"optim": {"lr": "1e-5"}, "run": {"steps": "3"}, "model": {"bf16": "true"}})
    assert (config.optim.lr, config.run.steps, config.model.bf16) == (1e-5, 3, "true")
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


def test_resolved_config_with_nested_and_missing_options_reads_back(tmp_path):
    config = cfg.from_dict({"env": {"env": "gsm8k", "env_options": {"eval_path": None, "a.b": 1,
                                                                   "config": {"ops": ["+", "-"], "n": 2.5}}}})
    path = tmp_path / "config.toml"
    path.write_text(cfg.dump_toml(config))
    assert cfg.from_dict(cfg.load_file(path)).env.env_options == {"a.b": 1, "config": {"ops": ["+", "-"], "n": 2.5}}


@pytest.mark.parametrize("section, key, value, message", [
    ("run", "checkpoint_every", 0, "--checkpoint-every must be >= 1"),
    ("optim", "micro_batch_size", 0, "--micro-batch-size must be >= 1"),
    ("sampling", "temperature", 0.0, "--temperature must be > 0"),
    ("optim", "schedule", "step", "--schedule must be constant, linear or cosine"),
])
def test_out_of_range_values_fail_naming_the_flag(section, key, value, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.from_dict({section: {key: value}})


def test_auto_settings_take_auto_true_false_and_booleans_from_files():
    assert cfg.from_dict({"model": {"bf16": True, "bf16_sampling": False}}).model.bf16_sampling == "false"
    assert cfg.from_dict({"model": {"bf16": True}}).model.bf16 == "true"
    assert cfg.TrainConfig().model.bf16 == "auto" and cfg.TrainConfig().algorithm.ratio_against == "auto"
    with pytest.raises(cfg.ConfigError, match="--bf16 must be auto, true or false"):
        cfg.from_dict({"model": {"bf16": "maybe"}})
    with pytest.raises(cfg.ConfigError, match="--ratio-against must be auto, trainer or sampler"):
        cfg.from_dict({"algorithm": {"ratio_against": "mu"}})
    with pytest.raises(cfg.ConfigError, match="--tis-cap needs --ratio-against trainer"):
        cfg.from_dict({"algorithm": {"ratio_against": "sampler", "tis_cap": 2.0}})
