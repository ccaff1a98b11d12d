"""Overhead scaling (PERF.md "Scaling"): step − floor at 10%, 50% and 100% expert activation and
at growing token counts, for ``sparse_moa`` and ``adamole``, moa-fx eager and lowered.

The sparse (grouped) form's overhead must follow the number of active (token, expert) pairs, not
E·T. One transformed model per (method, lowering, activation) is built once (captured with dynamic
shapes, so it runs at every sequence length) and calibrated to its activation; at each sequence
length the floor and every variant are timed interleaved.

Defaults: GPU 1B-class shape bf16, 4 × 512 … 4 × 8192; CPU 6 layers of the SmolLM2-135M shape,
fp32, 1 thread, 4 × 128 … 4 × 1024, fewer steps (a trend, not a target: see BENCHMARKS.md).

Usage::

    python benchmarks/bench_scaling.py --json scaling.json
    python benchmarks/bench_scaling.py --seqs 128 256 512 --rates 0.1 0.5 1.0 --steps 3
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["sparse_moa", "adamole"])
    ap.add_argument("--rates", nargs="+", type=float, default=[0.1, 0.5, 1.0])
    ap.add_argument("--seqs", nargs="+", type=int, default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-lowered", action="store_true")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = common.setup_process(args.threads)
    gpu = device == "cuda"
    args.layers = args.layers or (16 if gpu else 6)
    args.seqs = args.seqs or ([512, 1024, 2048, 4096, 8192] if gpu else [128, 256, 512, 1024])
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.steps = args.steps if args.steps is not None else (10 if gpu else 3)
    t_start = time.perf_counter()
    env = common.env_info(device)
    lowering = common.transform_supports_lower() and not args.no_lowered
    notes = [] if lowering else ["lowered: skipped — transform() has no 'lower' keyword in this version"
                                 if not args.no_lowered else "lowered: not asked for"]

    shape = common.default_shape(device, args.layers, args.batch, max(args.seqs))
    base = common.build_base(shape, device)
    calib_ids = common.make_inputs(common.Shape(shape.config, shape.dtype, args.batch, min(args.seqs), shape.name),
                                   device)
    moas = {}
    for m in args.methods:
        for lower in ([None, "auto"] if lowering else [None]):
            for rate in args.rates:
                name = f"{m}.{'lowered' if lower else 'eager'}@{rate:g}"
                moa, _, _ = common.calibrated_moa(base, m, lower, calib_ids, rate)
                moas[name] = moa
                print(f"built {name}", flush=True)

    results = []
    for seq in args.seqs:
        sh = common.Shape(shape.config, shape.dtype, args.batch, seq, shape.name)
        ids = common.make_inputs(sh, device)
        steps = {"floor": common.floor_step(base, ids)}
        for name, moa in moas.items():
            steps[name] = common.train_step(moa, ids, [p for p in moa.parameters() if p.requires_grad], lr=args.lr)
        print(f"tokens {args.batch}×{seq}", flush=True)
        timings = common.interleaved(steps, device, args.warmup, args.steps)
        floor = timings["floor"].median
        for name, moa in moas.items():
            with torch.no_grad():
                moa(input_ids=ids)
            act = common.moa_activation(moa) or {}
            stats = moa.router_stats()
            experts = len(next(iter(stats.values()))["experts"]) if stats else 0
            pairs = act.get("activation_rate", 0) * experts * args.batch * seq * len(stats)
            ov = timings[name].median - floor
            results.append({"variant": name, "seq": seq, "tokens": args.batch * seq, "floor_s": floor,
                            "median_s": timings[name].median, "min_s": timings[name].min,
                            "overhead_s": ov, "overhead_over_floor": ov / floor, "activation": act,
                            "active_pairs": pairs, "overhead_us_per_1k_pairs": 1e6 * ov / (pairs / 1e3) if pairs else None,
                            "lowering": common.lowering_summary(moa)})
    cols = ["variant", "tokens", "activation", "active pairs", "floor ms", "step ms", "overhead ms", "ovh/floor",
            "µs per 1k pairs"]
    rows = [[r["variant"], r["tokens"], r["activation"].get("activation_rate"), int(r["active_pairs"]),
             r["floor_s"] * 1e3, r["median_s"] * 1e3, r["overhead_s"] * 1e3, r["overhead_over_floor"],
             r["overhead_us_per_1k_pairs"]] for r in sorted(results, key=lambda r: (r["variant"], r["tokens"]))]
    common.print_table(f"bench_scaling — {env['device_name']}, {args.layers} layers, {shape.dtype}, "
                       f"{torch.get_num_threads()} thread(s), median of {args.steps} after {args.warmup} warm-up",
                       cols, rows)
    for n in notes:
        print("note:", n)
    payload = {"env": env, "shape": shape.describe(), "args": vars(args), "results": results, "notes": notes,
               "markdown": common.markdown_table(cols, rows), "runtime_s": time.perf_counter() - t_start}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
