"""Cost per element of drawing one dropout mask on CPU: ``nn.Dropout``, ``bernoulli_``, an element-wise
counter hash (eager and under ``torch.compile``), and the gap streams of ``moa_fx.kernels.dropout_mask``.

    python benchmarks/bench_dropout_mask.py --tokens 1024 --features 576 --p 0.05 --threads 1

Prints ns per element of the (tokens × features) mask, median of ``--repeats`` calls after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moa_fx.kernels.dropout_mask import MASK32, drop_positions, mix32, stream_keys


def elementwise_hash_keep(key: torch.Tensor, n: int, threshold: int) -> torch.Tensor:
    """One hash per element (the design drop_positions replaces): keep iff mix32(mix32(q ^ key) ^ key) ≥ p·2^32."""
    q = torch.arange(n, dtype=torch.int64)
    return mix32(mix32((q & MASK32) ^ key) ^ key) >= threshold


def _median_ns(fn, n: int, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / n * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--features", type=int, default=576)
    ap.add_argument("--p", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.tokens * args.features
    x = torch.randn(args.tokens, args.features)
    key = stream_keys(torch.tensor(1234), 1)[0]
    threshold = int(round(args.p * 2 ** 32))
    compiled = torch.compile(elementwise_hash_keep, dynamic=False)
    rows = {
        "F.dropout (mask + scale)": lambda: F.dropout(x, args.p, training=True),
        "bernoulli_ (mask only)": lambda: torch.empty_like(x).bernoulli_(1 - args.p),
        "element-wise hash, eager": lambda: elementwise_hash_keep(key, n, threshold),
        "element-wise hash, torch.compile": lambda: compiled(key, n, threshold),
        "gap stream (drop_positions), eager": lambda: drop_positions(key, args.p, n),
    }
    print(f"mask of {args.tokens} x {args.features} = {n} elements, p = {args.p}, {args.threads} thread(s)")
    for name, fn in rows.items():
        print(f"{name:40s} {_median_ns(fn, n, args.repeats):8.2f} ns/element")


if __name__ == "__main__":
    main()
