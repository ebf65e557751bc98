"""Where one decode step of the built-in model spends its time: torch's profiler, float32 and bfloat16.

One new token for each of 64 rows on a 72-position preallocated cache (the default step's
prompt + half its budget, as `decode_speed.py` times it), after one warm-up step. Prints the
operators by self CPU time: the matrix products (`aten::mm`, 30 layers × 7 projections + the
output layer), attention (`scaled_dot_product...`) and the elementwise rest.

    python benchmarks/profile_decode_step.py [--rows 64] [--context 72]
"""

from __future__ import annotations

import argparse
import copy
import warnings

import torch

from wapo.config import BUILTIN_MODEL
from wapo.kv_cache import preallocated_cache
from wapo.models import cache_argument, load_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--context", type=int, default=72)
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    fp32 = load_policy(BUILTIN_MODEL, device=torch.device("cpu")).eval()
    ids = torch.randint(100, 10_000, (args.rows, args.context + 2), generator=torch.Generator().manual_seed(0))
    for name, model in (("float32", fp32), ("bfloat16", copy.deepcopy(fp32).to(torch.bfloat16))):
        arg = cache_argument(model)
        cache = preallocated_cache(model.config, args.context + 2)
        with torch.no_grad():
            cache = getattr(model(input_ids=ids[:, :args.context], use_cache=True, **{arg: cache}), arg)
            model(input_ids=ids[:, args.context:args.context + 1], use_cache=True, logits_to_keep=1, **{arg: cache})
            with torch.profiler.profile() as prof:
                model(input_ids=ids[:, args.context + 1:], use_cache=True, logits_to_keep=1, **{arg: cache})
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n{name}: one {args.rows}-row decode step, {total / 1e3:.0f} ms in operators "
              f"(as the profiler times them on the calling thread: {args.rows / (total / 1e6):.0f} tokens/s)")
        for e in events[: args.top]:
            print(f"  {e.key:<52} {e.self_cpu_time_total / 1e3:8.1f} ms  {e.self_cpu_time_total / total:6.1%}  "
                  f"({e.count} calls)")


if __name__ == "__main__":
    main()
