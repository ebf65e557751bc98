"""A run's weights as a standard Hugging Face model folder: `wapo export RUN_DIR OUT`.

A checkpoint holds only the weights that training changed (all of them, or the LoRA
adapters); the base model and the LoRA settings come from the run's `config.toml`. The
export loads that base model, puts the checkpoint's weights in and writes

    OUT/config.json, generation_config.json     the model, as `save_pretrained` writes them
    OUT/model.safetensors                      full weights (LoRA merged into them), or
    OUT/adapter_config.json,                   with `adapter=True`: the PEFT adapter alone
        adapter_model.safetensors              (its `base_model_name_or_path` is the base)
    OUT/tokenizer files                        the run's tokenizer (with its chat template)
    OUT/wapo_export.json                       which run, checkpoint and step it came from

so `transformers.AutoModelForCausalLM.from_pretrained(OUT)` (or
`peft.AutoPeftModelForCausalLM`) loads it anywhere, without wapo.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from wapo import checkpoint
from wapo import config as cfg
from wapo.models import load_policy, load_tokenizer, model_path


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) of a run folder (its last checkpoint) or one checkpoint."""
    path = Path(path)
    run_dir = path if (path / "config.toml").is_file() else path.parent.parent
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{path} is neither a wapo run folder nor a checkpoint inside one "
                                "(no config.toml found)")
    ckpt = checkpoint.latest(run_dir) if path == run_dir else path
    if ckpt is None or not (ckpt / "model.safetensors").is_file():
        raise FileNotFoundError(f"no checkpoint under {path}: train at least one step first")
    return run_dir, ckpt


def export_run(run_dir: str | Path, out_dir: str | Path, *, adapter: bool = False) -> Path:
    """Write the weights of `run_dir` (a run folder or one of its checkpoints) to `out_dir`.

    LoRA runs are merged into the base weights, or saved as a PEFT adapter with `adapter=True`
    (an error for runs that trained all weights). `out_dir` must not exist or be empty; it is
    written in a temporary folder beside it and renamed into place. Returns `out_dir`.
    """
    run_dir, ckpt = resolve_checkpoint(run_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    config = cfg.from_dict(cfg.load_file(run_dir / "config.toml"))
    lora = config.model.lora_rank > 0
    if adapter and not lora:
        raise cfg.ConfigError(f"{run_dir} trained all weights (lora_rank = 0): there is no adapter to save; "
                         "export without --adapter")
    model = load_policy(config.model.model, device=torch.device("cpu"), lora_rank=config.model.lora_rank,
                        lora_alpha=config.model.lora_alpha)
    checkpoint.load_weights(ckpt, model)
    if lora and not adapter:
        model = model.merge_and_unload()
    model.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    model.save_pretrained(tmp)
    load_tokenizer(config.model.model).save_pretrained(tmp)
    step = json.loads((ckpt / "progress.json").read_text())["step"]
    (tmp / "wapo_export.json").write_text(json.dumps({
        "run": str(run_dir.resolve()), "checkpoint": str(ckpt.resolve()), "step": step,
        "base_model": config.model.model, "base_model_path": model_path(config.model.model),
        "lora_rank": config.model.lora_rank, "weights": "adapter" if adapter else ("merged" if lora else "full"),
    }, indent=1))
    if out_dir.exists():
        out_dir.rmdir()  # empty, checked above
    os.replace(tmp, out_dir)
    return out_dir


def add_export_parser(sub) -> None:
    """The `wapo export RUN_DIR OUT` subcommand."""
    parser = sub.add_parser("export", help="write a run's (or a checkpoint's) weights as a Hugging Face model folder")
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run folder (its last checkpoint) or one checkpoint folder inside it")
    parser.add_argument("out", metavar="OUT", help="the folder to write (must not exist or be empty)")
    parser.add_argument("--adapter", action="store_true",
                        help="LoRA runs: save the PEFT adapter alone instead of merging it into the weights")
    parser.set_defaults(func=_export)


def _export(args) -> int:
    out = export_run(args.run_dir, args.out, adapter=args.adapter)
    loader = "peft.AutoPeftModelForCausalLM" if args.adapter else "transformers.AutoModelForCausalLM"
    print(f"Exported {args.run_dir} to {out}; load it with {loader}.from_pretrained({str(out)!r})")
    return 0
