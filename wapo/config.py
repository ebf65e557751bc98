"""The configuration tree: small frozen dataclasses, one docstring per field.

A config comes from the defaults, then a TOML or YAML file (sections named like the fields
of `TrainConfig`), then command-line flags. Every leaf field is a flag named after it
(`--lr`, `--max-new-tokens`, `--loss`); leaf names are unique across the tree so the flags
stay short. Dictionary fields take `key=value` pairs (`--env-options size=3`). Unknown keys
fail before any work, listing the valid ones. Only user settings live here; values derived
from them (the output folder's timestamp, the advantage estimator of a loss) are computed by
the trainer and recorded in the run, never written back into a field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

BUILTIN_MODEL = "builtin:smollm2-135m"
SWITCH = ("auto", "true", "false")
"""Values of the settings that `auto` resolves from the hardware."""


class ConfigError(ValueError):
    """A config file, flag or option that does not fit: the message says which and why."""


def _require(ok: bool, flag: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"--{flag.replace('_', '-')} {what}")


@dataclass(frozen=True)
class ModelConfig:
    model: str = BUILTIN_MODEL
    """Policy to train: the built-in SmolLM2-135M-Instruct, a local Hugging Face folder, or a hub id (when online)."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda[:N]"."""
    bf16: str = "auto"
    """Training forward/backward under bf16 autocast (weights and optimizer stay float32): true, false, or auto (on where the hardware has native bf16 matrix instructions)."""
    bf16_sampling: str = "auto"
    """Sample with a bfloat16 copy of the policy, synced after every update: true, false, or auto (as for --bf16)."""
    share_prompts: bool = True
    """Training passes run each distinct prompt once and its completions on its KV cache (same numbers, fewer tokens)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: less memory, ~30% more compute."""
    lora_rank: int = 0
    """LoRA rank via peft; 0 trains all weights."""
    lora_alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    threads: int = 0
    """torch CPU threads (they set the matmul reduction order, hence the numbers); 0: a resumed run's recorded count, else torch's default. config.toml records the count used."""

    def __post_init__(self):
        for name in ("bf16", "bf16_sampling"):
            _require(getattr(self, name) in SWITCH, name, "must be auto, true or false")
        _require(self.lora_rank >= 0, "lora_rank", "must be >= 0")
        _require(self.threads >= 0, "threads", "must be >= 0")


@dataclass(frozen=True)
class EnvConfig:
    env: str = "arithmetic"
    """Environment name (`wapo train --env NAME`); `rg:<dataset>` for any reasoning-gym dataset."""
    env_options: dict = field(default_factory=dict)
    """Options of the environment, e.g. {"size": 200} (see the environment's docstring)."""


@dataclass(frozen=True)
class SamplingConfig:
    prompts_per_step: int = 8
    """Prompts drawn per step (groups)."""
    samples_per_prompt: int = 8
    """Completions per prompt (G, the group size)."""
    max_new_tokens: int = 48
    """Completion budget L in model tokens (across all turns of a multi-turn episode)."""
    temperature: float = 1.0
    """Sampling temperature; log-probabilities and the taxonomy are taken at it."""
    top_p: float = 1.0
    """Nucleus sampling threshold (behaviour log-probabilities are of the untruncated distribution)."""
    max_observation_tokens: int = 512
    """Multi-turn environments: longest environment reply kept (tokens; its end is kept)."""

    def __post_init__(self):
        for name in ("prompts_per_step", "samples_per_prompt", "max_new_tokens", "max_observation_tokens"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.temperature > 0, "temperature", "must be > 0 for training (evaluation is greedy and sampled)")
        _require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")


@dataclass(frozen=True)
class AlgorithmConfig:
    loss: str = "wapo"
    """Objective: one of wapo.LOSSES."""
    advantage: str = ""
    """Advantage estimator (wapo.ADVANTAGES); empty means the one the objective is defined with."""
    loss_options: dict = field(default_factory=dict)
    """Hyper-parameters of the objective, e.g. {"eps_high": 9.0} (defaults: docs/math.md#defaults)."""
    updates_per_batch: int = 1
    """Passes over each sampled batch; above 1 the importance ratios and clipping matter."""
    mini_batches: int = 1
    """Optimizer steps per pass, each on a slice of whole groups with its own normaliser (PPO's mini-batches); at most prompts_per_step."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: keep sampling until the batch holds prompts_per_step groups with mixed rewards."""
    max_sampling_rounds: int = 4
    """Dynamic sampling: most sampling rounds per step (each draws prompts_per_step prompts); the batch is what they found."""
    ratio_against: str = "auto"
    """Denominator of the importance ratio: trainer (π_old recomputed by the trainer), sampler (the sampler's μ), or auto (trainer when the sampler's numerics differ, e.g. bf16)."""
    tis_cap: float = 0.0
    """Truncated importance sampling: weight each token by min(π_old/μ, cap) (0 = off; needs ratio_against trainer)."""
    kl_beta: float = 0.0
    """Coefficient of the KL penalty to the initial policy (0 = off: no reference model kept)."""
    kl_estimator: str = "k3"
    """KL estimator: k1 or k3."""
    skip_zero_gradient_rows: bool = True
    """Leave rows whose gradient is zero by construction (WAPO's losers) out of the backward pass."""
    diagnose_skipped_rows: bool = True
    """Run a no-grad pass over skipped rows so their taxonomy bins are still logged."""
    sampler_lag: int = 0
    """0: sample with the current weights; 1: with the weights from before the previous step's update (generation one step ahead, as in asynchronous trainers)."""

    def __post_init__(self):
        _require(self.updates_per_batch >= 1, "updates_per_batch", "must be >= 1")
        _require(self.mini_batches >= 1, "mini_batches", "must be >= 1 (1 = one optimizer step per pass over the batch)")
        _require(self.sampler_lag in (0, 1), "sampler_lag",
                 "must be 0 (sample with the current weights) or 1 (with the weights one update behind)")
        _require(self.kl_beta >= 0, "kl_beta", "must be >= 0")
        _require(self.kl_estimator in ("k1", "k3"), "kl_estimator", "must be k1 or k3")
        _require(self.max_sampling_rounds >= 1, "max_sampling_rounds", "must be >= 1")
        _require(self.ratio_against in ("auto", "trainer", "sampler"), "ratio_against", "must be auto, trainer or sampler")
        _require(self.tis_cap == 0 or self.tis_cap >= 1, "tis_cap",
                 "must be 0 (off) or >= 1 (a cap below 1 would shrink every on-policy token)")
        _require(not (self.tis_cap and self.ratio_against == "sampler"), "tis_cap",
                 "needs --ratio-against trainer or auto (against the sampler, π_old = μ and every weight is 1)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 2e-5
    """AdamW learning rate (peak)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant, linear or cosine (to 0 at the last step)."""
    micro_batch_size: int = 16
    """Rows per forward/backward; gradients accumulate over the batch."""

    def __post_init__(self):
        _require(self.lr >= 0, "lr", "must be >= 0")
        _require(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _require(self.schedule in ("constant", "linear", "cosine"), "schedule", "must be constant, linear or cosine")
        _require(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")


@dataclass(frozen=True)
class RunConfig:
    steps: int = 15
    """Training steps (one sampled batch each); the default run takes ~15 min on 2 CPU cores."""
    seed: int = 0
    """Seed of data order, sampling and initialisation."""
    output_dir: str = ""
    """Run folder; empty means runs/<time>-<loss>."""
    eval_size: int = 64
    """Held-out problems evaluated before and after training (0 = none; at most the environment's held-out set)."""
    eval_samples: int = 4
    """Sampled answers per held-out problem for pass@k (k = this)."""
    eval_every: int = 0
    """Also evaluate every N steps (0 = only before and after)."""
    checkpoint_every: int = 5
    """Write a checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 1
    """Checkpoints kept on disk (oldest removed); each holds the trainable weights and the optimizer state."""
    log_completions: int = 4
    """Sample completions written to completions.jsonl per step."""
    taxonomy_chunk_size: int = 1024
    """Positions per chunk in the memory-safe log-prob/taxonomy path."""
    max_bad_steps: int = 3
    """Consecutive non-finite steps (skipped) before the run stops."""
    progress: bool = True
    """Show progress bars."""
    collapse_options: dict = field(default_factory=dict)
    """Thresholds of the online collapse flags, e.g. {"entropy_low": 0.2} (docs/metrics.md, "Collapse flags")."""
    report_to: str = "tensorboard"
    """Where metrics go besides metrics.jsonl: comma-separated tensorboard, wandb (needs `pip install wandb`), or none (TRL's names)."""
    export_final: bool = True
    """At the end, export the last checkpoint as a Hugging Face model folder, RUN_DIR/hf (as `wapo export`)."""

    def __post_init__(self):
        for name in ("steps", "eval_size", "eval_samples", "eval_every"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        for name in ("checkpoint_every", "keep_checkpoints", "taxonomy_chunk_size", "max_bad_steps"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        sinks = {name.strip() for name in self.report_to.split(",")}
        _require(sinks <= {"tensorboard", "wandb", "none"} and not ("none" in sinks and len(sinks) > 1),
                 "report_to", "takes a comma-separated subset of tensorboard, wandb, or none")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        _require(self.algorithm.mini_batches <= self.sampling.prompts_per_step, "mini_batches",
                 f"({self.algorithm.mini_batches}) must be <= --prompts-per-step ({self.sampling.prompts_per_step}): "
                 f"a mini-batch holds whole groups, one group per prompt")


def leaf_fields(cls: type = TrainConfig) -> dict[str, tuple[str, dataclasses.Field]]:
    """Leaf field name -> (section, field); leaf names are unique across the tree."""
    out: dict[str, tuple[str, dataclasses.Field]] = {}
    for section in fields(cls):
        for f in fields(_field_type(cls, section.name)):
            assert f.name not in out, f"duplicate config field {f.name}"
            out[f.name] = (section.name, f)
    return out


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Apply a nested {section: {field: value}} mapping onto `base` (default: the defaults)."""
    base = base or TrainConfig()
    sections = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - sections)
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid: {sorted(sections)}")
    updates = {}
    for name, values in data.items():
        current = getattr(base, name)
        if not isinstance(values, dict):
            raise ConfigError(f"config section [{name}] must be a table, got {values!r}")
        valid = {f.name: f for f in fields(current)}
        bad = sorted(set(values) - set(valid))
        if bad:
            raise ConfigError(f"unknown key(s) {bad} in [{name}]; valid: {sorted(valid)}")
        hints = typing.get_type_hints(type(current))
        updates[name] = dataclasses.replace(
            current, **{k: _coerce(v, hints[k], f"{name}.{k}") for k, v in values.items()}
        )
    return dataclasses.replace(base, **updates)


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
    elif kind is dict:
        if isinstance(value, dict):
            return dict(value)
    elif kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is int and not isinstance(value, bool):
        try:
            if isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit()):
                return int(value)
        except ValueError:
            pass
    elif kind is str and isinstance(value, str):
        return value
    elif kind is str and isinstance(value, bool):  # `bf16 = true` in a file, for the auto/true/false settings
        return "true" if value else "false"
    raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        return tomllib.loads(path.read_text())
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(path.read_text()) or {}
    raise ConfigError(f"config file {path}: expected .toml, .yaml or .yml")


def dump_toml(config: TrainConfig) -> str:
    """The resolved config as TOML (the run folder's config.toml)."""
    lines = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    """A TOML literal; TOML has no null, so None entries of tables are left out (= default)."""
    if isinstance(value, dict):
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items() if v is not None)
        return f"{{ {items} }}" if items else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if value == value and abs(value) != float("inf") else json.dumps(str(value))
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic-string escapes


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per leaf field, with its docstring and default as help."""
    docs, defaults, groups = _field_docs(), TrainConfig(), {}
    for name, (section, _) in leaf_fields().items():
        default = getattr(getattr(defaults, section), name)
        flag = "--" + name.replace("_", "-")
        help_text = f"{docs.get(name, '')} (default: {default!r})".replace("%", "%%")
        kind = _field_type(type(getattr(defaults, section)), name)
        group = groups.setdefault(section, parser.add_argument_group(f"[{section}]"))
        if kind is dict:
            group.add_argument(flag, dest=name, metavar="KEY=VALUE", nargs="+", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, default=None, metavar=kind.__name__.upper(), help=help_text)


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The flags that were given, as a nested dict for `from_dict`."""
    out: dict[str, dict[str, Any]] = {}
    for name, (section, _) in leaf_fields().items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if isinstance(value, list):
            value = dict(_parse_pair(item, name) for item in value)
        out.setdefault(section, {})[name] = value
    return out


def _parse_pair(item: str, name: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--{name.replace('_', '-')} expects KEY=VALUE pairs, got {item!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare string such as rg dataset names
    return key, value


def _field_docs() -> dict[str, str]:
    """Field docstrings (the string literal under each field), read from this module's source."""
    import inspect

    docs: dict[str, str] = {}
    for section in fields(TrainConfig):
        cls = _field_type(TrainConfig, section.name)
        lines = inspect.getsource(cls).splitlines()
        for i, line in enumerate(lines[:-1]):
            name = line.strip().split(":")[0]
            nxt = lines[i + 1].strip()
            if name.isidentifier() and nxt.startswith('"""'):
                docs[name] = ast.literal_eval(nxt)
    return docs

