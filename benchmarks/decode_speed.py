"""How close sampling runs to this machine's matrix-multiply limit, measured side by side.

One process prints, for float32 and bfloat16 (a bf16 copy of the built-in model):

  matmul    the rate of 2048 x 2048 matrix products on this machine (GFLOP/s)
  floor     the tokens/s that rate allows the built-in model: 2 FLOPs per parameter per token,
            counting the parameters a token meets in a matmul, i.e. every decoder layer's
            weights and the output layer (tied to the embedding: its one copy counts once, as
            the output layer). The input embedding is a lookup, not a matmul; the norms'
            weights are elementwise; attention over the context (QK^T, AV) is left out.
  shapes    the matmuls of one 64-row decode step alone, at their own shapes (each decoder
            layer's projections and the output layer, `torch.nn.functional.linear` on the
            model's weights): the tokens/s a decode step could reach if nothing but its matmuls
            took time. Small-row matmuls run far below the 2048 x 2048 rate, so this, not the
            floor, bounds any sampler built on these kernels
  step      the model's own decode step: one new token for each of 64 rows on a 72-position
            cache (the default step's prompt + half its budget), with transformers' cache and
            with the sampler's preallocated one (`wapo.kv_cache`)
  generate  `wapo.sampling.generate` on the default step: the default arithmetic environment's
            first 8 training prompts x 8 samples = 64 rows, <= 48 new tokens, temperature 1;
            tokens/s counts the sampled tokens (rows stop at EOS)
each as tokens/s and as a fraction of the floor (the floor of the best matmul rate over the
thread counts tried). Times are medians of --repeats runs, the variants interleaved within each
repeat so that load from other processes hits all alike.

    python benchmarks/decode_speed.py [--repeats 3] [--threads 1,2] [--baseline 7c5d278]

--threads runs everything at each of these torch thread counts (default: torch's own).

--baseline REV also times `generate` as it is at git revision REV (7c5d278: before the speed
work), loaded from git into a module of its own. Its tokens differ (it draws with
torch.multinomial), so its token count is printed too.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

from wapo.config import BUILTIN_MODEL
from wapo.envs import make_env
from wapo.kv_cache import preallocated_cache
from wapo.models import cache_argument, load_policy, load_tokenizer
from wapo.sampling import generate, prompt_ids

ROOT = Path(__file__).resolve().parents[1]


def matmul_gflops(dtype: torch.dtype, size: int = 2048) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: thread pool, kernel selection
    start = time.perf_counter()
    a @ b
    return 2 * size**3 / (time.perf_counter() - start) / 1e9


def matmul_parameters(model) -> int:
    """Parameters a token meets in a matmul: the decoder layers' linear weights and the output layer."""
    body = model.get_decoder()
    linear = sum(m.weight.numel() for m in body.layers.modules() if isinstance(m, torch.nn.Linear))
    return linear + model.get_output_embeddings().weight.numel()


def shape_matmul_seconds(model, rows: int) -> float:
    """Seconds of the matmuls of one decode step: every Linear weight and the output layer, `rows` x in."""
    weights = [m.weight for m in model.get_decoder().layers.modules() if isinstance(m, torch.nn.Linear)]
    weights.append(model.get_output_embeddings().weight)
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    with torch.no_grad():
        for w in weights:  # warm-up: kernel selection for each shape
            torch.nn.functional.linear(inputs[w.shape[1]], w)
        start = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)
    return time.perf_counter() - start


def step_seconds(model, rows: int, context: int, preallocated: bool) -> float:
    """Seconds of one decode step (one token per row) on a `context`-position cache."""
    cache_arg = cache_argument(model)
    cache = preallocated_cache(model.config, context + 1) if preallocated else None
    ids = torch.randint(100, 10_000, (rows, context + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = getattr(model(input_ids=ids[:, :-1], use_cache=True, **{cache_arg: cache}), cache_arg)
        times = []
        for _ in range(2):  # the first step allocates; time the second
            start = time.perf_counter()
            model(input_ids=ids[:, -1:], use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            times.append(time.perf_counter() - start)
            cache.crop(-1)
    return times[-1]


def sampler_run(sample_fn, model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, int]:
    """Seconds and sampled tokens of one `generate` call on `prompts`."""
    start = time.perf_counter()
    gen = sample_fn(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                    generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - start, sum(map(len, gen.tokens))


def baseline_generate(rev: str):
    """`generate` of wapo/sampling.py at git revision `rev`, as a module of its own."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:wapo/sampling.py"], check=True,
                            capture_output=True, text=True).stdout
    name = f"wapo_sampling_at_{rev}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:wapo/sampling.py", "exec"), module.__dict__)
    return module.generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", default="", help="comma-separated torch thread counts (default: torch's own)")
    ap.add_argument("--baseline", default="", help="git revision whose generate is timed too (e.g. 7c5d278)")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (medians)")
    warnings.filterwarnings("ignore")

    tokenizer = load_tokenizer(BUILTIN_MODEL)
    env = make_env("arithmetic")
    problems = list(env.train_set())[: args.prompts]
    prompts = [prompt_ids(tokenizer, env, s) for s in problems for _ in range(args.samples)]
    fp32 = load_policy(BUILTIN_MODEL, device=torch.device("cpu")).eval()
    models = {"float32": fp32, "bfloat16": copy.deepcopy(fp32).to(torch.bfloat16)}
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    samplers = {"generate": generate}
    if args.baseline:
        samplers[f"generate at {args.baseline}"] = baseline_generate(args.baseline)
    rows, context = len(prompts), max(map(len, prompts)) + args.max_new_tokens // 2

    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    load_before = os.getloadavg()
    results: dict[tuple[int, str, str], list[float]] = {}
    tokens: dict[tuple[int, str, str], int] = {}
    for _ in range(args.repeats):
        for count in threads:
            torch.set_num_threads(count)
            for name, model in models.items():
                results.setdefault((count, name, "matmul"), []).append(matmul_gflops(dtypes[name]))
                rate = rows / shape_matmul_seconds(model, rows)
                results.setdefault((count, name, "matmuls at the step's shapes"), []).append(rate)
                for preallocated, label in ((False, "step, transformers' cache"), (True, "step, preallocated cache")):
                    rate = rows / step_seconds(model, rows, context, preallocated)
                    results.setdefault((count, name, label), []).append(rate)
                for label, fn in samplers.items():
                    seconds, tokens[(count, name, label)] = sampler_run(fn, model, tokenizer, prompts,
                                                                        args.max_new_tokens)
                    results.setdefault((count, name, label), []).append(tokens[(count, name, label)] / seconds)
    load_after = os.getloadavg()

    flops_per_token = 2 * matmul_parameters(fp32)
    print(f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after ({os.cpu_count()} CPUs); "
          f"medians of {args.repeats}")
    print(f"model: {matmul_parameters(fp32) / 1e6:.1f}M parameters in matmuls "
          f"(of {sum(p.numel() for p in fp32.parameters()) / 1e6:.1f}M), {flops_per_token / 1e6:.0f} MFLOP per token; "
          f"{rows} rows, <= {args.max_new_tokens} new tokens")
    floors = {}  # the machine's: the best matmul rate over the thread counts tried
    for name in models:
        rates = {count: statistics.median(results[(count, name, "matmul")]) for count in threads}
        floors[name] = max(rates.values()) * 1e9 / flops_per_token
        print(f"\n{name}: matmul " + ", ".join(f"{rate:.0f} GFLOP/s ({count} threads)" for count, rate in rates.items())
              + f" -> floor {floors[name]:.0f} tokens/s")
    for count in threads:
        for name in models:
            print(f"\n{count} thread(s), {name}")
            for (n_threads, dtype, label), values in results.items():
                if (n_threads, dtype) != (count, name) or label == "matmul":
                    continue
                rate = statistics.median(values)
                count_note = f"  ({tokens[(count, name, label)]} tokens)" if (count, name, label) in tokens else ""
                print(f"  {label:<32} {rate:7.0f} tokens/s  {rate / floors[name]:6.1%} of the floor{count_note}")
        fp32_rate, bf16_rate = (statistics.median(results[(count, n, "generate")]) for n in models)
        print(f"{count} thread(s): generate, bfloat16 / float32: {bf16_rate / fp32_rate:.2f}x")


if __name__ == "__main__":
    main()
