"""One training step of wapo's trainer against TRL's `GRPOTrainer`, on the same setup.

Setup (both sides): the built-in model (SmolLM2-135M-Instruct, `builtin:smollm2-135m`, the local
safetensors copy of `wapo.models.builtin_model_path()`), the built-in task
(`make_env("arithmetic")`, its train set, its chat prompt and its reward), 8 prompts x 8
completions per step, at most 48 new tokens, temperature 1.0 (top-p 1, no top-k), float32 on
the CPU, AdamW at lr 2e-5 (constant, no weight decay, gradient clipping at 1.0), one optimizer
step per sampled batch, no KL term (beta 0, so no reference model on either side).

    python benchmarks/vs_trl.py --steps 3
    python benchmarks/vs_trl.py --prompts 2 --samples 2 --max-new-tokens 8 --steps 1   # smoke test

TRL is not a dependency of wapo; install it without letting pip touch torch/transformers:
`pip install --no-deps trl datasets`, then what `datasets` needs that is missing, none of which
depends on torch (`pyarrow dill pandas xxhash multiprocess`). Written against trl 1.16.0.

Each variant runs in its own subprocess (one model, one optimizer, no state shared), one after
the other: wapo with its default objective (WAPO), wapo with `loss="grpo"`, wapo's GRPO with
every row in the backward pass and no diagnostic pass (`wapo-grpo-all`: the same backward work
as TRL's), then TRL. Each does one warm-up step and then `--steps` measured steps (at least 3
for a median); the table shows medians.

What is timed
  wapo   `Trainer.train_step()` as `fit()` calls it (same data order: the permutation of the
         train set by `run.seed`), wall clock around the call. "generation" is its
         `time_sample` (batched sampling, rows dropped from the batch and KV cache as they end);
         "rest" is everything else: rewards, advantages, forward/backward over micro-batches
         of 16 rows, the optimizer step and wapo's per-token diagnostics.
  TRL    one optimizer step of `GRPOTrainer.train()`, from the `on_step_begin` to the
         `on_step_end` callback (TRL's own logging after the step is left out, like wapo's).
         "generation" is TRL's own profiling block `transformers.generate` (HF `generate`, one
         call of all 64 rows), read by hooking `trl.extras.profiling.ProfilingContext`, which
         otherwise only reports to wandb/mlflow/trackio; "rest" is the remainder.

What is matched
  same weights (the same folder), tokenizer (wapo's `load_tokenizer`), chat template with the
  generation prompt, the same prompts per step (TRL's dataset is laid out in wapo's order and
  `shuffle_dataset=False`), the same reward function (`env.reward(sample, text).score`);
  fp32 (`bf16=False`: TRL defaults to bf16), no gradient checkpointing (TRL defaults to it on),
  64 rows per optimizer step from one generation call: `per_device_train_batch_size=16`
  (wapo's `micro_batch_size`), `gradient_accumulation_steps=4`, `generation_batch_size=64`,
  `num_generations=8`; `num_iterations=1`, so neither side recomputes old log-probabilities
  (wapo keeps the sampling ones, TRL uses the detached current ones); `loss_type="grpo"` with
  `scale_rewards="group"` is the objective of wapo's `loss="grpo"` (per-sequence token mean,
  std-normalised group advantages, ratio clipped at 1 +- 0.2).

What can't be matched (read the ratio with these in mind)
  - The completions differ: both sample at temperature 1 with their own RNG streams, so
    lengths differ and so does the cost (the table shows mean completion tokens per row). wapo
    shrinks its generation batch as rows end; HF `generate` keeps all 64 rows (padded) until
    the last one ends or hits 48 tokens.
  - wapo leaves rows with zero gradient out of the backward pass (WAPO: every non-winner; GRPO:
    groups whose rewards are all equal) and gives them a no-grad pass for its diagnostics;
    TRL backpropagates all 64 rows. The "rows bwd" column shows how many rows each side trained.
  - TRL's training forward uses its fused LM head (log-probs without a full vocabulary
    softmax tensor); wapo's computes per-token log-probs, entropies and its token taxonomy.
  - The two run one after the other on a shared, noisy machine: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

VARIANTS = {"wapo": "wapo (WAPO, default loss)", "wapo-grpo": "wapo (loss=grpo)",
            "wapo-grpo-all": "wapo (grpo, all rows bwd)", "trl": "TRL GRPOTrainer (grpo)"}
WAPO_ALGORITHM = {
    "wapo": {"loss": "wapo"},
    "wapo-grpo": {"loss": "grpo"},
    # closest to TRL's work: every row backpropagates, no no-grad diagnostic pass
    "wapo-grpo-all": {"loss": "grpo", "skip_zero_gradient_rows": False, "diagnose_skipped_rows": False},
}
RESULT_TAG = "VS_TRL_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step (default 3)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (default 8)")
    ap.add_argument("--samples", type=int, default=8, help="completions per prompt (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="completion budget (default 48)")
    ap.add_argument("--micro-batch", type=int, default=16,
                    help="rows per forward/backward on both sides (default 16, wapo's micro_batch_size)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    ap.add_argument("--variants", default="wapo,wapo-grpo,wapo-grpo-all,trl",
                    help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)")
    ap.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # internal: one subprocess
    args = ap.parse_args(argv)
    rows = args.prompts * args.samples
    if args.samples < 2:
        ap.error("--samples must be at least 2 (a group needs two completions)")
    args.micro_batch = min(args.micro_batch, rows)
    if rows % args.micro_batch:
        ap.error(f"prompts x samples ({rows}) must be a multiple of --micro-batch ({args.micro_batch})")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}; known: {list(VARIANTS)}")
    return args


# ----------------------------------------------------------------------------------------
# wapo
# ----------------------------------------------------------------------------------------


def run_wapo(args, algorithm: dict) -> dict:
    from wapo import config as cfg
    from wapo.trainer import build_trainer

    config = cfg.from_dict({
        # float32 sampling and training, as TRL's GRPOTrainer runs on a CPU: the same work
        "model": {"device": "cpu", "threads": args.threads, "bf16": "false", "bf16_sampling": "false"},
        "sampling": {"prompts_per_step": args.prompts, "samples_per_prompt": args.samples,
                     "max_new_tokens": args.max_new_tokens, "temperature": 1.0},
        "algorithm": {**algorithm, "kl_beta": 0.0, "updates_per_batch": 1},
        "optim": {"lr": args.lr, "micro_batch_size": args.micro_batch},
        "run": {"eval_size": 0, "progress": False, "seed": args.seed, "steps": args.steps + 1,
                "output_dir": tempfile.mkdtemp(prefix="wapo-vs-trl-")},
    })
    trainer = build_trainer(config)
    steps = []
    for _ in range(args.steps + 1):  # the prompts fit() would draw, in its order
        start = time.perf_counter()
        metrics, counters = trainer.train_step()
        total = time.perf_counter() - start
        trainer.commit(counters)
        steps.append({"total": total, "generation": metrics["time_sample"], "train": metrics["time_train"],
                      "completion_len": metrics["completion_len"], "reward": metrics["reward_mean"],
                      "backward_rows": metrics["backward_rows"]})
    return {"steps": steps}


# ----------------------------------------------------------------------------------------
# TRL
# ----------------------------------------------------------------------------------------


def run_trl(args) -> dict:
    import numpy as np
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.extras import profiling

    from wapo.envs import make_env
    from wapo.models import builtin_model_path, load_tokenizer

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)

    # TRL's profiling blocks only report to wandb/mlflow/trackio: record their durations here.
    timings: dict[str, float] = {}
    original_log = profiling.ProfilingContext._log_metrics

    def record(self, duration: float) -> None:
        timings[self.name] = timings.get(self.name, 0.0) + duration
        original_log(self, duration)

    profiling.ProfilingContext._log_metrics = record

    env = make_env("arithmetic")
    train_set = env.train_set()
    order = np.random.default_rng(args.seed).permutation(len(train_set))  # wapo's order
    n_prompts = args.prompts * (args.steps + 1)
    indices = [int(order[i % len(order)]) for i in range(n_prompts)]
    dataset = Dataset.from_list([
        {"prompt": env.prompt(train_set[i]), "answer": str(train_set[i]["answer"]), "sample_index": i}
        for i in indices
    ])

    def arithmetic_reward(prompts, completions, sample_index, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [float(env.reward(train_set[i], t).score) for i, t in zip(sample_index, texts)]

    path = str(builtin_model_path())
    tokenizer = load_tokenizer("builtin:smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = args.prompts * args.samples
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-vs-wapo-"),
        # one optimizer step = one generation call of prompts x samples rows, in micro-batches
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=rows // args.micro_batch,
        generation_batch_size=rows,
        num_generations=args.samples,
        num_iterations=1,
        max_steps=args.steps + 1,
        shuffle_dataset=False,
        # sampling
        max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0,
        use_vllm=False,
        # objective: wapo's "grpo" (no KL, no reference model)
        beta=0.0, loss_type="grpo", scale_rewards="group", epsilon=0.2,
        # optimizer: wapo's AdamW defaults
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch",
        # precision / device / memory: fp32 on CPU, no activation recomputation (TRL defaults differ)
        bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        # bookkeeping
        report_to=[], logging_steps=1, save_strategy="no", log_completions=False,
        seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.steps: list[dict] = []
            self.start = 0.0

        def on_step_begin(self, a, state, control, **kw):
            timings.clear()
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            total = time.perf_counter() - self.start
            gen = sum(v for k, v in timings.items() if k.endswith(".transformers.generate"))
            self.steps.append({"total": total, "generation": gen, "train": None, "profiled": dict(timings)})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and self.steps and "reward" in logs:
                self.steps[-1]["completion_len"] = logs.get("completions/mean_length")
                self.steps[-1]["reward"] = logs.get("reward")

    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=arithmetic_reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    profiling.ProfilingContext._log_metrics = original_log
    checks = {"mixed_precision": str(trainer.accelerator.mixed_precision),
              "dtype": str(next(trainer.model.parameters()).dtype),
              "gradient_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
              "device": str(next(trainer.model.parameters()).device)}
    for s in timer.steps:
        s["backward_rows"] = rows
    return {"steps": timer.steps, "trl_version": trl.__version__, "trl_checks": checks}


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------


def run_variant(args) -> None:
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    out = run_trl(args) if args.variant == "trl" else run_wapo(args, WAPO_ALGORITHM[args.variant])
    out.update(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())
    print(RESULT_TAG + json.dumps(out), flush=True)


def summarize(result: dict) -> dict:
    measured = result["steps"][1:] or result["steps"]  # drop the warm-up step
    median = lambda key: statistics.median(s[key] for s in measured if s.get(key) is not None)  # noqa: E731
    return {"total": median("total"), "generation": median("generation"),
            "rest": statistics.median(s["total"] - s["generation"] for s in measured),
            "completion_len": _mean(s.get("completion_len") for s in measured),
            "reward": _mean(s.get("reward") for s in measured),
            "backward_rows": _mean(s.get("backward_rows") for s in measured),
            "warmup_total": result["steps"][0]["total"], "all_totals": [s["total"] for s in result["steps"]]}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def main() -> None:
    args = parse_args()
    if args.variant:
        run_variant(args)
        return
    passthrough = sys.argv[1:]
    results, versions = {}, {}
    for name in args.variants.split(","):
        print(f"running {VARIANTS[name]} ({args.steps} measured steps + 1 warm-up) ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *passthrough, "--variant", name],
                              capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)), None)
        if proc.returncode or line is None:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"variant {name} failed (exit code {proc.returncode})")
        raw = json.loads(line[len(RESULT_TAG):])
        results[name] = summarize(raw)
        versions = {k: raw[k] for k in ("torch", "transformers", "threads")} | versions
        if "trl_version" in raw:
            versions["trl"] = raw["trl_version"]
            print("  TRL ran with " + ", ".join(f"{k}={v}" for k, v in raw["trl_checks"].items()), flush=True)
        print(f"  done in {time.perf_counter() - start:.0f} s (incl. loading); per-step totals "
              + ", ".join(f"{t:.1f}" for t in results[name]["all_totals"]) + " s (first = warm-up)", flush=True)
    print_table(args, results, versions)


def print_table(args, results: dict, versions: dict) -> None:
    print(f"\n{args.prompts} prompts x {args.samples} completions, <= {args.max_new_tokens} new tokens, fp32 CPU, "
          f"micro-batch {args.micro_batch}; median of {args.steps} step(s) after 1 warm-up")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    header = f"{'':<28}{'s/step':>8}{'generation':>12}{'rest':>8}{'tokens/row':>12}{'reward':>8}{'rows bwd':>10}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{VARIANTS[name]:<28}{r['total']:>8.2f}{r['generation']:>12.2f}{r['rest']:>8.2f}"
              f"{fmt(r['completion_len'], '12.1f')}{fmt(r['reward'], '8.2f')}{fmt(r['backward_rows'], '10.1f')}")
    if "trl" in results:
        t = results["trl"]
        for name in (n for n in results if n != "trl"):
            r = results[name]
            print(f"TRL / {VARIANTS[name]}: step x{t['total'] / r['total']:.2f}, "
                  f"generation x{t['generation'] / r['generation']:.2f}, rest x{t['rest'] / r['rest']:.2f}")


if __name__ == "__main__":
    main()
