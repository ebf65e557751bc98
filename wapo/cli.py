"""The `wapo` command: train, eval, sft, serve-retriever, export, compare, report, probe.

    wapo train                                  # WAPO on 1-digit addition with the built-in model
    wapo train --loss grpo --steps 3 --lr 1e-5 --output-dir runs/x
    wapo train --config my.toml --env rg:chain_sum --env-options size=3
    wapo train --resume runs/x                  # continue from its last checkpoint
    wapo eval --checkpoint runs/x               # held-out accuracy of a run's last checkpoint
    wapo sft --output-dir runs/sft              # warm start on demonstrations -> runs/sft/model
    wapo serve-retriever --corpus corpus.jsonl  # BM25 search server (Search-R1 contract)
    wapo export runs/x hf/x                     # the last checkpoint as a Hugging Face model folder
    wapo compare study.toml --output-dir D      # objectives × seeds × settings, resumable -> D/report.html
    wapo report D                               # the report and summaries of a study folder
    wapo probe --loss grpo --json probe.json    # the taxonomy's forecasts against real updates
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from wapo import config as cfg
from wapo.registry import UnknownNameError
from wapo.trainer import TrainingStopped


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see the Makefile: spin-waiting costs 14x here
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (cfg.ConfigError, UnknownNameError, OSError, TrainingStopped) as exc:  # OSError: files, models
        print(f"wapo {args.command}: error: {exc}", file=sys.stderr)  # anything else is a bug: traceback
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wapo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a policy (default: WAPO, built-in model, 1-digit addition)")
    train.add_argument("--config", help="TOML or YAML file with [model], [env], [sampling], [algorithm], "
                                        "[optim], [run] sections; flags override it")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the run already in --output-dir (default: refuse to reuse a run's folder)")
    cfg.add_flags(train)
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="greedy accuracy and pass@k of a model or checkpoint on an environment")
    ev.add_argument("--checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                    help="a run folder (its last checkpoint) or one checkpoint folder; model/env from its config")
    ev.add_argument("--config", help="config file (as for train)")
    cfg.add_flags(ev)
    ev.set_defaults(func=_eval)

    from wapo.retrieval import add_serve_parser
    from wapo.sft import add_sft_parser

    add_sft_parser(sub)
    add_serve_parser(sub)
    from wapo.export import add_export_parser

    add_export_parser(sub)

    compare = sub.add_parser("compare", help="run a study (a base config × axes, e.g. objectives × seeds) in "
                                             "resumable parts, then report it")
    compare.add_argument("study", help="study file (TOML or YAML): [base.*], [axes], [study] (docs/study.md)")
    compare.add_argument("--output-dir", required=True, metavar="D", help="study folder; cells go to D/runs/<cell>")
    compare.add_argument("--jobs", type=int, default=1, help="cells run at once, each in a subprocess; a new cell "
                                                             "gets cores // jobs threads, a resumed one keeps its "
                                                             "own (default 1: in this process)")
    compare.add_argument("--dry-run", action="store_true", help="list the cells, their state and an estimated time")
    compare.add_argument("--only", action="append", metavar="KEY=VALUE",
                         help="run only the cells with this axis value (repeatable: one key's values are "
                              "alternatives, different keys must all match), e.g. --only lr=1e-4")
    compare.set_defaults(func=_compare)

    report = sub.add_parser("report", help="D/report.html, D/summary.csv and D/summary.md from the runs in D/runs")
    report.add_argument("output_dir", metavar="D", help="a study folder (`wapo compare --output-dir D`)")
    report.set_defaults(func=_report)

    probe = sub.add_parser("probe", help="the token taxonomy's forecasts against real updates, per bin")
    probe.add_argument("--config", help="config file (as for train); flags override it")
    probe.add_argument("--batches", type=int, default=5, help="sampled batches, each probed from the same weights")
    probe.add_argument("--logit-eta", type=float, default=0.01, help="η of the step on the logits alone")
    probe.add_argument("--sgd-lr", type=float, default=0.1, help="learning rate of the SGD update")
    probe.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    cfg.add_flags(probe)
    probe.set_defaults(func=_probe)
    return parser


def _config_from(args: argparse.Namespace, base: cfg.TrainConfig | None = None) -> cfg.TrainConfig:
    config = base or cfg.TrainConfig()
    if getattr(args, "config", None):
        config = cfg.from_dict(cfg.load_file(args.config), config)
    return cfg.from_dict(cfg.overrides_from_args(args), config)


def _train(args: argparse.Namespace) -> int:
    from wapo.trainer import train

    base = None
    if args.resume:
        saved = Path(args.resume) / "config.toml"
        if not saved.is_file():
            raise FileNotFoundError(f"{saved} not found: is {args.resume} a wapo run folder?")
        base = cfg.from_dict(cfg.load_file(saved))
    config = _config_from(args, base)
    run_dir, evals = train(config, resume=args.resume, overwrite=args.overwrite)
    print(f"Run folder: {run_dir}")
    if "before" in evals and "after" in evals:
        print("Held-out accuracy:")
        for key in evals["after"]:
            if key != "n":
                print(f"  {key:>18}: {evals['before'][key]:.3f} -> {evals['after'][key]:.3f}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from wapo import checkpoint
    from wapo.envs import make_env
    from wapo.evaluate import evaluate
    from wapo.models import load_policy, load_tokenizer, resolve_device

    base, ckpt = None, None
    if args.checkpoint:
        path = Path(args.checkpoint)
        run_dir = path if (path / "config.toml").is_file() else path.parent.parent
        base = cfg.from_dict(cfg.load_file(run_dir / "config.toml"))
        ckpt = checkpoint.latest(path) if (path / "checkpoints").is_dir() else path
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint under {path}")
    config = _config_from(args, base)
    env = make_env(config.env.env, config.env.env_options)
    torch.manual_seed(config.run.seed)
    tokenizer = load_tokenizer(config.model.model)
    model = load_policy(config.model.model, device=resolve_device(config.model.device),
                        lora_rank=config.model.lora_rank, lora_alpha=config.model.lora_alpha)
    if ckpt is not None:
        checkpoint.load_weights(ckpt, model)
    s = config.sampling
    results = evaluate(model, tokenizer, env, list(env.eval_set())[: config.run.eval_size], k=config.run.eval_samples,
                       temperature=s.temperature, max_new_tokens=s.max_new_tokens, top_p=s.top_p,
                       max_observation_tokens=s.max_observation_tokens)
    print(json.dumps({"model": config.model.model, "checkpoint": str(ckpt) if ckpt else None,
                      "env": config.env.env, **results}, indent=1))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from wapo.study import compare

    return compare(args.study, args.output_dir, jobs=args.jobs, dry_run=args.dry_run, only=args.only)


def _report(args: argparse.Namespace) -> int:
    from wapo.report import write_report

    for path in write_report(args.output_dir):
        print(path)
    return 0


def _probe(args: argparse.Namespace) -> int:
    from wapo.probe import format_table, probe

    # float32 sampling and scoring unless asked otherwise: bf16 rounding would blur small changes
    base = cfg.from_dict({"model": {"bf16": "false", "bf16_sampling": "false"}, "run": {"progress": False}})
    config = _config_from(args, base)
    rows = probe(config, batches=args.batches, logit_eta=args.logit_eta, sgd_lr=args.sgd_lr)
    print(f"model {config.model.model}, env {config.env.env}, loss {config.algorithm.loss}, {args.batches} batches "
          f"of {config.sampling.prompts_per_step} x {config.sampling.samples_per_prompt}; logit step eta "
          f"{args.logit_eta}, SGD lr {args.sgd_lr}, AdamW lr {config.optim.lr}")
    print(format_table(rows))
    if args.json:
        settings = {"model": config.model.model, "env": config.env.env, "loss": config.algorithm.loss,
                    "batches": args.batches, "logit_eta": args.logit_eta, "sgd_lr": args.sgd_lr, "lr": config.optim.lr}
        Path(args.json).write_text(json.dumps({**settings, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
