"""Environments: build one by name with `make_env`.

    make_env("arithmetic")                                # the built-in 1-digit addition
    make_env("gsm8k", {"path": "train.jsonl", "eval_path": "test.jsonl"})
    make_env("rg:chain_sum", {"config": {"max_terms": 3}})  # any reasoning-gym dataset

Every module of this package that defines environments registers them in `ENVIRONMENTS`
when imported. `load_environments()` imports them all; `make_env`, and reading
`wapo.envs.ENVIRONMENTS`, call it first. They are not imported when this package is, because
`wapo.rewards` needs `wapo.envs.base` and the environment modules need `wapo.rewards`:
importing them here would make `import wapo.rewards` circular.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from wapo.config import ConfigError
from wapo.envs.base import Environment, Messages, RewardResult, Sample
from wapo.envs.base import ENVIRONMENTS as _REGISTRY
from wapo.registry import Registry

__all__ = [
    "ENVIRONMENTS",
    "Environment",
    "Messages",
    "RewardResult",
    "Sample",
    "load_environments",
    "make_env",
]

RG_PREFIX = "rg:"
"""`rg:<dataset>` is shorthand for the "rg" environment with `dataset=<dataset>`."""


def load_environments() -> Registry[type[Environment]]:
    """Import every module of `wapo.envs` (so each registers its environments); the registry."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return _REGISTRY


def make_env(name: str, options: dict[str, Any] | None = None) -> Environment:
    """The environment registered as `name` (or `rg:<dataset>`), built with `options`.

    Unknown names fail with the list of registered ones; unknown option keys fail with the
    list of the environment's options (its dataclass fields).
    """
    options = dict(options or {})
    if name.startswith(RG_PREFIX):
        if "dataset" in options:
            raise ConfigError(f"{name!r} already names the dataset; drop the 'dataset' option")
        name, options["dataset"] = "rg", name[len(RG_PREFIX) :]
    cls = load_environments()[name]
    valid = sorted(field.name for field in dataclasses.fields(cls) if field.init)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for environment {name!r}; valid: {', '.join(valid)}"
        )
    try:
        return cls(**options)
    except ValueError as exc:  # a bad option value or data file: the user's to fix, say where
        raise ConfigError(f"environment {name!r}: {exc}") from exc


def __getattr__(name: str) -> Any:
    """`wapo.envs.ENVIRONMENTS`: the registry, after every environment module has registered."""
    if name == "ENVIRONMENTS":
        return load_environments()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
