"""Peak extra memory of the taxonomy + log-prob path: chunked vs naive, forward and backward.

Each measurement runs in a fresh subprocess: it allocates the inputs (hidden (N, d), output
layer (V, d), tokens), records its peak resident memory, runs the path forward and backward
(`logp.sum().backward()`), and reports the growth of its peak resident memory. Both paths also
allocate the (V, d) weight gradient; that is included in both columns.

    python benchmarks/taxonomy_memory.py                 # V = 151,936 (Qwen), N in 512/2048/8192
    python benchmarks/taxonomy_memory.py --vocab 49152   # SmolLM2's vocabulary

The naive path materialises several (N, V) float32 tensors; sizes whose estimate exceeds
--max-naive-gb are skipped and printed as such rather than risking the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(path: str, n: int, vocab: int, dim: int, chunk: int) -> dict:
    import torch

    import wapo

    torch.manual_seed(0)
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) / dim**0.5).requires_grad_()
    tokens = torch.randint(0, vocab, (n,))
    before = _peak_mb()
    start = time.perf_counter()
    if path == "naive":
        stats = wapo.token_stats(hidden @ weight.T, tokens)
    else:
        stats = wapo.chunked_token_stats(hidden, weight, tokens, chunk_size=chunk)
    stats.logp.sum().backward()
    return {"extra_mb": _peak_mb() - before, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--dim", type=int, default=256, help="hidden size (memory of the chunked path does not depend on it much)")
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--max-naive-gb", type=float, default=12.0)
    ap.add_argument("--child", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        path, n = args.child
        print(json.dumps(measure(path, int(n), args.vocab, args.dim, args.chunk)))
        return

    print(f"V={args.vocab:,} d={args.dim} chunk={args.chunk}: peak extra memory (MB) and time (s), forward+backward")
    print(f"{'N':>6} | {'naive MB':>9} {'s':>6} | {'chunked MB':>10} {'s':>6} | naive/chunked")
    for n in args.tokens:
        row = {}
        for path in ("naive", "chunked"):
            estimate_gb = 7 * n * args.vocab * 4 / 1e9  # ~7 (N, V) float32 tensors at once
            if path == "naive" and estimate_gb > args.max_naive_gb:
                row[path] = None
                continue
            cmd = [sys.executable, __file__, "--child", path, str(n), "--vocab", str(args.vocab),
                   "--dim", str(args.dim), "--chunk", str(args.chunk)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row[path] = json.loads(out.strip().splitlines()[-1])
        naive, chunked = row["naive"], row["chunked"]
        naive_txt = f"{naive['extra_mb']:>9.0f} {naive['seconds']:>6.1f}" if naive else f"{'skipped':>9} {'':>6}"
        ratio = f"{naive['extra_mb'] / chunked['extra_mb']:.1f}x" if naive else f"(est. > {args.max_naive_gb:.0f} GB)"
        print(f"{n:>6} | {naive_txt} | {chunked['extra_mb']:>10.0f} {chunked['seconds']:>6.1f} | {ratio}", flush=True)


if __name__ == "__main__":
    main()
