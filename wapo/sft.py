"""Supervised warm start (`wapo sft`): fine-tune a policy on demonstrations, write a model folder.

RL needs a policy that sometimes succeeds: a small model that never follows a tool protocol
(`<search>` ... `<answer>`) scores 0 on every row, and no objective has anything to learn from
all-zero groups. `wapo sft` trains on demonstrations first and writes a Hugging Face model
folder (config, tokenizer, safetensors) that `wapo train --model DIR` and
`wapo eval --model DIR` start from.

Demonstrations come from one of two sources:

1. An environment that writes gold episodes (`Environment.demonstration`, e.g. `multihop` and
   `hotpotqa`): its training questions only, never a held-out one. Each is played through the
   environment as `wapo.sampling.rollout` plays an episode: the same prompt ids (`prompt_ids`),
   the model turns as tokens with loss mask 1, the environment's replies (`observe_batch`,
   truncated to `max_observation_tokens` as in RL) with mask 0. Only episodes that earn full
   credit under the environment's own reward are kept.
2. A JSONL file of chat transcripts, one `{"messages": [{"role": ..., "content": ...}, ...]}`
   per line (TRL's conversational SFT format): loss on the assistant turns only.

The loss is the mean negative log-likelihood of the masked tokens of each batch,

    L = −(1/N) Σ_{rows r, positions t with mask 1} log π(y_{r,t} | y_{r,<t}),   N = Σ mask,

computed by the trainer's memory-safe path (`wapo.batch.row_token_stats`: no tokens ×
vocabulary logits are kept), summed over micro-batches before one optimizer step.

A run folder holds config.toml, metrics.jsonl (one line per step: `loss`, `tokens`, `lr`,
`grad_norm`, `entropy`, `epoch`, `time_step`), checkpoints/ (`--resume` continues to the same
weights as an uninterrupted run; Ctrl-C writes one first) and model/, the final model folder.

    wapo sft                                            # built-in model, multihop demonstrations
    wapo sft --env hotpotqa --env-options path=hotpot_train_v1.1.json --steps 500
    wapo sft --data chats.jsonl --model Qwen/Qwen2.5-0.5B-Instruct --output-dir runs/sft
    wapo train --model runs/sft/model --env multihop    # RL from the warm start
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import shutil
import tempfile
import time
import typing
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wapo import checkpoint
from wapo import config as cfg
from wapo.batch import RolloutBatch, row_token_stats
from wapo.envs import make_env
from wapo.envs.base import Environment, Sample
from wapo.sampling import Episode, _truncate, prompt_ids


@dataclass(frozen=True)
class SFTConfig:
    """Everything `wapo sft` reads; each field is a flag (`--n-demos 500`) and a key of the
    `[sft]` table of a TOML / YAML file (`--config`)."""

    model: str = cfg.BUILTIN_MODEL
    """Model to fine-tune: the built-in SmolLM2-135M-Instruct, a local Hugging Face folder or a hub id."""
    env: str = "multihop"
    """Environment whose training questions give the demonstrations (unused with `data`)."""
    env_options: dict = field(default_factory=dict)
    """Options of the environment, as for `wapo train --env-options`; give RL the same ones."""
    data: str = ""
    """JSONL file of chat transcripts ({"messages": [...]} per line) instead of an environment."""
    n_demos: int = 0
    """Demonstrations used: the first N of the environment's training set or of the file (0 = all)."""
    max_observation_tokens: int = cfg.SamplingConfig.max_observation_tokens
    """Longest environment reply kept (tokens; its end is kept), as `wapo train` cuts them."""
    max_length: int = 1024
    """Longest example (prompt + completion tokens); longer ones are left out and counted."""
    steps: int = 100
    """Optimizer steps."""
    batch_size: int = 16
    """Examples per optimizer step (the data is reshuffled each epoch)."""
    micro_batch_size: int = 8
    """Examples per forward/backward; gradients accumulate over the batch."""
    lr: float = 5e-5
    """AdamW learning rate (peak)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 5
    """Linear warm-up steps."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: constant, linear or cosine (to 0 at the last step)."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu" or "cuda[:N]"."""
    bf16: bool = False
    """Run forward/backward under bf16 autocast (weights and optimizer stay float32)."""
    threads: int = 0
    """torch CPU threads; 0: the count a resumed run recorded, else torch's default (config.toml records it)."""
    seed: int = 0
    """Seed of the data order and of the environment's demonstrations."""
    output_dir: str = ""
    """Run folder; empty means runs/<time>-sft."""
    checkpoint_every: int = 50
    """Write a checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest removed)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "micro_batch_size", "max_length", "max_observation_tokens",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise cfg.ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("n_demos", "warmup_steps", "threads"):
            if getattr(self, name) < 0:
                raise cfg.ConfigError(f"--{name.replace('_', '-')} must be >= 0")
        if self.schedule not in ("constant", "linear", "cosine"):
            raise cfg.ConfigError("--schedule must be constant, linear or cosine")
        if not self.lr >= 0 or not self.max_grad_norm > 0:
            raise cfg.ConfigError("--lr must be >= 0 and --max-grad-norm > 0")


# ---------------------------------------------------------------------------------------------
# Demonstrations
# ---------------------------------------------------------------------------------------------


def demonstration_episodes(tokenizer, env: Environment, samples: list[Sample], *,
                           max_observation_tokens: int) -> list[tuple[Sample, Episode]]:
    """The environment's gold episodes for `samples`, tokenised exactly as a rollout would be.

    Turn k of every demonstration is encoded as model tokens (mask 1); then all of them get
    the environment's replies from one `observe_batch` call, cut as `rollout` cuts them and
    appended with mask 0 (behaviour log-probabilities 0). Samples without a demonstration
    are skipped; `Episode.text` is the decoded completion, as the reward sees it.
    Returns (sample, episode) pairs in the order of `samples`.
    """
    scripts = [(sample, env.demonstration(sample)) for sample in samples]
    scripts = [(sample, turns) for sample, turns in scripts if turns]
    episodes = [Episode(prompt_ids=prompt_ids(tokenizer, env, sample)) for sample, _ in scripts]
    for k in range(max((len(turns) for _, turns in scripts), default=0)):
        calls = []
        for i, (_, turns) in enumerate(scripts):
            if k < len(turns):
                ids = tokenizer.encode(turns[k], add_special_tokens=False)
                _append(episodes[i], ids, model=True)
                episodes[i].turns += 1
                if k < len(turns) - 1:
                    calls.append(i)
        replies = env.observe_batch([scripts[i][0] for i in calls],
                                    [tokenizer.decode(episodes[i].completion_ids, skip_special_tokens=True)
                                     for i in calls])
        for i, reply in zip(calls, replies, strict=True):
            if reply is None:
                raise ValueError(f"{type(env).__name__} gave no reply to turn {k + 1} of its own "
                                 f"demonstration of {scripts[i][0].get('id', scripts[i][0])!r}")
            _append(episodes[i], _truncate(tokenizer.encode(reply, add_special_tokens=False),
                                           max_observation_tokens), model=False)
    for episode in episodes:
        episode.text = tokenizer.decode(episode.completion_ids, skip_special_tokens=True)
        episode.finished = True
    return [(sample, episode) for (sample, _), episode in zip(scripts, episodes)]


def _append(episode: Episode, ids: list[int], *, model: bool) -> None:
    episode.completion_ids += ids
    episode.completion_mask += [model] * len(ids)
    episode.behaviour_logprobs += [0.0] * len(ids)


def chat_episode(tokenizer, messages: list[dict[str, str]]) -> Episode:
    """A chat transcript as one example: mask 1 on the assistant turns' tokens only.

    With a chat template, the tokens of assistant message i are those that the template of
    messages[: i + 1] adds to the template of messages[: i] with the generation prompt (so
    the end-of-turn token is learned, the role header is not); the template must render
    each prefix as a prefix of the whole. Without one, each message is its content and a
    newline, as `prompt_ids` writes prompts. Everything before the first assistant token is
    the prompt.
    """
    _check_messages(messages)
    if getattr(tokenizer, "chat_template", None) is None:
        ids, mask = [], []
        for j, message in enumerate(messages):
            piece = tokenizer.encode(message["content"] + "\n", add_special_tokens=j == 0)
            ids += piece
            mask += [message["role"] == "assistant"] * len(piece)
    else:
        ids = _chat_ids(tokenizer, messages, generation_prompt=False)
        mask = [False] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = _chat_ids(tokenizer, messages[:i], generation_prompt=True)
            end = _chat_ids(tokenizer, messages[: i + 1], generation_prompt=False)
            if ids[: len(start)] != start or ids[: len(end)] != end or len(end) <= len(start):
                raise ValueError("the chat template does not render each prefix of a conversation as a "
                                 "prefix of the whole, so assistant tokens cannot be found; use a model "
                                 "whose template does, or environment demonstrations")
            mask[len(start) : len(end)] = [True] * (len(end) - len(start))
    first = mask.index(True)
    return Episode(prompt_ids=ids[:first], completion_ids=ids[first:], completion_mask=mask[first:],
                   behaviour_logprobs=[0.0] * (len(ids) - first), finished=True,
                   text=tokenizer.decode(ids[first:], skip_special_tokens=True))


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise ValueError('"messages" must be a list of {"role": str, "content": str}')
    roles = [m["role"] for m in messages]
    if "assistant" not in roles or roles[0] == "assistant":
        raise ValueError("a transcript needs an assistant message after at least one other message")


def _chat_ids(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def read_transcripts(path: str | Path) -> list[list[dict[str, str]]]:
    """The `messages` of each line of a JSONL file (blank lines skipped)."""
    transcripts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "messages" not in row:
                raise ValueError(f'{path}:{line_no}: expected an object with "messages"')
            try:
                _check_messages(row["messages"])
            except ValueError as err:
                raise ValueError(f"{path}:{line_no}: {err}") from None
            transcripts.append(row["messages"])
    if not transcripts:
        raise ValueError(f"{path} holds no transcript")
    return transcripts


@dataclass
class Examples:
    """The training examples and what was left out."""

    episodes: list[Episode]
    source: str
    skipped_no_demo: int = 0
    """Samples the environment wrote no demonstration for."""
    skipped_not_correct: int = 0
    """Demonstrations that did not earn full credit (should be 0: a bug in the environment)."""
    skipped_too_long: int = 0
    """Examples longer than `max_length`."""

    def summary(self) -> str:
        model_tokens = [e.model_tokens for e in self.episodes] or [0]
        return (f"{len(self.episodes)} examples from {self.source} (model tokens per example: mean "
                f"{np.mean(model_tokens):.1f}, max {max(model_tokens)}); left out: {self.skipped_no_demo} "
                f"without a demonstration, {self.skipped_not_correct} not correct, "
                f"{self.skipped_too_long} longer than max_length")


def build_examples(config: SFTConfig, tokenizer) -> Examples:
    """The examples `config` names: environment demonstrations or chat transcripts."""
    if config.data:
        try:
            transcripts = read_transcripts(config.data)[: config.n_demos or None]
            examples = Examples([chat_episode(tokenizer, m) for m in transcripts], config.data)
        except ValueError as err:  # the user's file or model does not fit: say so without a traceback
            raise cfg.ConfigError(str(err)) from None
    else:
        env = make_env(config.env, config.env_options)
        samples = list(env.train_set())[: config.n_demos or None]
        try:
            pairs = demonstration_episodes(tokenizer, env, samples,
                                           max_observation_tokens=config.max_observation_tokens)
        except NotImplementedError as err:
            raise cfg.ConfigError(f"{err}; give chat transcripts with --data FILE.jsonl instead") from None
        correct = [episode for sample, episode in pairs if env.reward(sample, episode.text).correct]
        examples = Examples(correct, f"environment {config.env!r}", skipped_no_demo=len(samples) - len(pairs),
                            skipped_not_correct=len(pairs) - len(correct))
    fits = [e for e in examples.episodes if len(e.prompt_ids) + len(e.completion_ids) <= config.max_length]
    examples.skipped_too_long = len(examples.episodes) - len(fits)
    examples.episodes = fits
    if not fits:
        raise cfg.ConfigError(f"no usable example: {examples.summary()}")
    return examples


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def sft(config: SFTConfig, *, resume: str | Path | None = None) -> Path:
    """Fine-tune `config.model` on `config`'s examples; returns the model folder it wrote."""
    from tqdm.auto import tqdm

    from wapo.models import load_policy, load_tokenizer, resolve_device
    from wapo.runlog import RunLog

    run_dir = Path(resume) if resume else Path(config.output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}-sft")
    if not resume and ((run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()):
        raise cfg.ConfigError(f"{run_dir} already holds a run: continue it with `wapo sft --resume {run_dir}`, "
                              f"or pick another --output-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / "config.toml"
    previous = config_from_dict(cfg.load_file(saved).get("sft", {})).threads if resume and saved.is_file() else 0
    threads = config.threads or previous or torch.get_num_threads()  # recorded: it sets the matmuls' rounding
    device = resolve_device(config.device)
    if previous and threads != previous and device.type == "cpu":  # on an accelerator it changes no number
        warnings.warn(f"resumed with {threads} CPU thread(s) where the run used {previous}: its numbers differ "
                      f"from an uninterrupted run's from here on; resume with --threads {previous} to keep them",
                      stacklevel=2)
    config = dataclasses.replace(config, threads=threads)
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    examples = build_examples(config, tokenizer)
    print(examples.summary(), flush=True)
    model = load_policy(config.model, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    step = 0
    if resume:
        last = checkpoint.latest(run_dir)
        if last is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints to resume from")
        step = checkpoint.load(last, model, optimizer, scheduler)["step"]
        # the saved rate followed the old run's schedule (e.g. cosine to 0 at its last step)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lr_factor(step, config)
        print(f"Resuming {run_dir} from step {step}", flush=True)
    saved.write_text(dump_config(config))  # after the resume has loaded: a failed one leaves the record as it was
    log = RunLog(run_dir, resume_step=step if resume else None)
    bar = tqdm(total=config.steps, initial=step, desc="sft", unit="step", disable=not config.progress,
               dynamic_ncols=True)
    updating = False  # inside optimizer.step(): the weights are neither step k's nor k+1's
    try:
        while step < config.steps:
            t0 = time.perf_counter()
            indices = batch_indices(step, config.batch_size, len(examples.episodes), config.seed)
            rows = [examples.episodes[i] for i in indices]
            metrics = accumulate_gradients(model, optimizer, rows, config)
            metrics["lr"] = optimizer.param_groups[0]["lr"]  # the rate this step uses
            updating = True
            optimizer.step()
            scheduler.step()
            step += 1
            updating = False
            metrics.update(epoch=step * config.batch_size / len(examples.episodes),
                           time_step=time.perf_counter() - t0)
            log.log_step(step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            bar.update(1)
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint.save(run_dir, step, model, optimizer, scheduler, {}, keep=config.keep_checkpoints)
    except KeyboardInterrupt:
        if not updating:
            checkpoint.save(run_dir, step, model, optimizer, scheduler, {}, keep=config.keep_checkpoints)
            print(f"\nInterrupted: checkpoint of step {step} written; continue with `wapo sft --resume {run_dir}`.")
        raise
    finally:
        bar.close()
        log.close()
    folder = save_model(model, tokenizer, run_dir / "model")
    print(f"Model folder: {folder}  (start RL with `wapo train --model {folder}`)", flush=True)
    return folder


def accumulate_gradients(model, optimizer, rows: list[Episode], config: SFTConfig) -> dict:
    """Gradients of the token-mean NLL over `rows` (micro-batched), clipped; the step's metrics."""
    device = next(model.parameters()).device
    batch = RolloutBatch.from_episodes(rows, torch.zeros(len(rows)))
    n_tokens = batch.mask.sum().clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    nll, entropy = 0.0, 0.0
    for part in batch.micro_batches(list(range(len(batch))), config.micro_batch_size):
        stats = row_token_stats(model, batch, part, temperature=1.0, chunk_size=1024,
                                autocast_dtype=torch.bfloat16 if config.bf16 else None)
        loss = -stats.logp.sum() / n_tokens.to(device)  # logp is 0 outside the mask
        loss.backward()
        nll += loss.item()
        entropy += (stats.entropy.sum() / n_tokens).item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"non-finite gradient norm {grad_norm.item()}: lower --lr")
    return {"loss": nll, "tokens": int(n_tokens), "grad_norm": grad_norm.item(), "entropy": entropy}


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of step `step` (0-based): a seeded permutation of all n per epoch."""
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[offset]))
    return out


def lr_factor(step: int, config: SFTConfig) -> float:
    """Multiplier of the peak learning rate at (0-based) step `step`: warm-up, then the schedule."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    frac = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return {"constant": 1.0, "linear": 1 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[config.schedule]


def save_model(model, tokenizer, folder: Path) -> Path:
    """Write a Hugging Face model folder atomically (a temporary sibling, then a rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Config files and flags
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ConfigFile:
    """The layout of an SFT config file: one `[sft]` table."""

    sft: SFTConfig


def dump_config(config: SFTConfig) -> str:
    """The config as TOML (the run folder's config.toml)."""
    return cfg.dump_toml(_ConfigFile(config))


def config_from_dict(values: dict[str, Any], base: SFTConfig | None = None) -> SFTConfig:
    """`base` (default: the defaults) with `values` applied; unknown keys fail listing the valid ones."""
    base = base or SFTConfig()
    hints = typing.get_type_hints(SFTConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise cfg.ConfigError(f"unknown sft key(s) {unknown}; valid: {sorted(hints)}")
    return dataclasses.replace(base, **{k: cfg._coerce(v, hints[k], f"sft.{k}") for k, v in values.items()})


def _field_docs() -> dict[str, str]:
    """Each field's docstring (the string literal under it in this module's source)."""
    lines = inspect.getsource(SFTConfig).splitlines()
    docs = {}
    for line, below in zip(lines, lines[1:]):
        name = line.strip().split(":")[0]
        if name.isidentifier() and below.strip().startswith('"""'):
            docs[name] = ast.literal_eval(below.strip())
    return docs


def add_sft_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `sft` subcommand (one flag per `SFTConfig` field) to argparse subparsers."""
    parser = subparsers.add_parser("sft", help=_HELP, description=_HELP)
    parser.add_argument("--config", help="TOML or YAML file with an [sft] table; flags override it")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an sft run from its last checkpoint")
    docs, defaults = _field_docs(), SFTConfig()
    for f in dataclasses.fields(SFTConfig):
        kind = typing.get_type_hints(SFTConfig)[f.name]
        help_text = f"{docs.get(f.name, '')} (default: {getattr(defaults, f.name)!r})".replace("%", "%%")
        extra = dict(nargs="+", metavar="KEY=VALUE") if kind is dict else dict(metavar=kind.__name__.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, help=help_text, **extra)
    parser.set_defaults(func=run_from_args)
    return parser


_HELP = "supervised warm start on demonstrations; writes a model folder for `wapo train --model DIR`"


def config_from_args(args: argparse.Namespace) -> SFTConfig:
    """Defaults, then a resumed run's config.toml or `--config`, then the flags given."""
    base = None
    source = Path(args.resume) / "config.toml" if args.resume else args.config
    if source:
        if args.resume and not Path(source).is_file():
            raise FileNotFoundError(f"{source} not found: is {args.resume} a wapo sft run folder?")
        table = cfg.load_file(source)
        if set(table) - {"sft"}:
            raise cfg.ConfigError(f"{source}: expected only an [sft] table, got {sorted(table)}")
        base = config_from_dict(table.get("sft", {}))
    given = {}
    for f in dataclasses.fields(SFTConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            given[f.name] = dict(cfg._parse_pair(item, f.name) for item in value) if isinstance(value, list) else value
    return config_from_dict(given, base)


def run_from_args(args: argparse.Namespace) -> int:
    sft(config_from_args(args), resume=args.resume)
    return 0
