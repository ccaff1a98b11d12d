"""The fused LoRA-mixture ops alone (PERF.md): ``moa_fx::lora_mixture`` (dense-masked) and
``moa_fx::grouped_lora`` against their pure-torch references (``moa_fx.kernels.reference``),
a naive per-expert loop (gather, expert, scale, index_add) and the memory-bandwidth floor.

Bandwidth floor = bytes the op must read and write ÷ peak bandwidth, with
bytes = (T·d_in [x] + T·d_out [y] + T·d_out [out]) · elem + T·E·elem [weights] + (A, B) and
"peak" = a measured large-tensor copy (CPU: a 256 MiB ``copy_``; CUDA: 1 GiB), reported next to
the nominal figure where the device is known. On CUDA the ops run Triton; on CPU the "fused" ops
run the torch reference behind the custom op (so fused ≈ reference there, plus dispatch).

``--overhead`` measures instead the fixed host cost of one call (forward, forward+backward) of
each fused op at a tiny shape (T 8, d 16, ranks 2 and 4), where all of a call is per-call cost:
the torch path, and the Triton path's host side with every kernel launch made a no-op (the
custom-op wrapper, input checks, column tables, allocations, tile plan; not Triton's own
launcher), plus on CUDA the real Triton path. ``--profile`` adds a cProfile of each.

Usage::

    python benchmarks/bench_kernel.py --json kernel.json             # CPU: d 576, T 1k..16k, E 4, 8
    python benchmarks/bench_kernel.py --backward                     # also forward+backward
    python benchmarks/bench_kernel.py --overhead [--profile]         # µs per call at a tiny shape
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import timeit
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

NOMINAL_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s (SXM parts)


def copy_bandwidth(device: str, mib: int, reps: int = 5) -> float:
    """Measured bytes/s of ``dst.copy_(src)`` over a large tensor (read + write counted)."""
    n = mib * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 1):
        common.sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        common.sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def naive_loop(y, x, a_cat, b_cat, weights, ranks, scales):
    """The per-expert loop of the official code, on 2-D tensors."""
    out = y.clone()
    start = 0
    for e, (r, s) in enumerate(zip(ranks, scales)):
        idx = torch.where(weights[:, e] != 0)[0]
        if len(idx):
            xe = x[idx]
            delta = (xe @ a_cat[start:start + r].t()) @ b_cat[:, start:start + r].t()
            out.index_add_(0, idx, (weights[idx, e, None] * s) * delta)
        start += r
    return out


def bench(fn: Callable[[], object], device: str, warmup: int, iters: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    common.sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


class _NoLaunch:
    """Stands in for a kernel: ``kernel[grid](*args)`` does nothing (the host side alone is timed)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn: Callable[[], object], calls: int = 300, repeats: int = 7) -> float:
    """Best of ``repeats`` means over ``calls`` calls, in µs (after 20 warm-up calls)."""
    for _ in range(20):
        fn()
    return min(timeit.repeat(fn, number=calls, repeat=repeats)) / calls * 1e6


def overhead_main(args, device: str) -> dict:
    """Per-call µs of each fused op at a tiny shape; see the module docstring."""
    import cProfile
    import pstats

    from moa_fx.kernels import grouped_lora, lora_expand, lora_mixture

    g = torch.Generator().manual_seed(0)
    ranks, scales, T, d = [2, 4], [1.0, 0.5], 8, 16
    y, x = torch.randn(T, d, generator=g).to(device), torch.randn(T, d, generator=g).to(device)
    a_cat, b_cat = torch.randn(6, d, generator=g).to(device), torch.randn(d, 6, generator=g).to(device)
    w = torch.rand(T, 2, generator=g).to(device)
    leaves = [t.requires_grad_() for t in (y, x, a_cat, b_cat, w)]
    z = (x @ a_cat.t()).detach().requires_grad_()
    ops = {"lora_mixture": lambda be: lora_mixture(*leaves, ranks, scales, backend=be),
           "grouped_lora": lambda be: grouped_lora(*leaves, ranks, scales, backend=be),
           "lora_expand": lambda be: lora_expand(y, z, b_cat, w, ranks, scales, backend=be)}
    modes = ["torch", "triton host (no-op launches)"] + (["triton"] if device == "cuda" else [])
    rows, records = [], []
    for mode in modes:
        backend = "torch" if mode == "torch" else "triton"
        # every kernels module that looks runnable_kernel up (one today; three before launch.py),
        # so that the same harness also times an older checkout put first on PYTHONPATH
        launchers = [m for name, m in list(sys.modules.items())
                     if name.startswith("moa_fx.kernels") and hasattr(m, "runnable_kernel")]
        real = [m.runnable_kernel for m in launchers]
        if mode.startswith("triton host"):
            for m in launchers:
                m.runnable_kernel = lambda kernel, device: _NoLaunch()
        try:
            for name, op in ops.items():
                def fwd(op=op):
                    op(backend)
                    common.sync(device)

                def fwd_bwd(op=op):
                    op(backend).sum().backward()
                    common.sync(device)

                rec = {"mode": mode, "op": name, "fwd_us": per_call_us(fwd), "fwd_bwd_us": per_call_us(fwd_bwd)}
                records.append(rec)
                rows.append([mode, name, rec["fwd_us"], rec["fwd_bwd_us"]])
                if args.profile:
                    prof = cProfile.Profile()
                    prof.runcall(lambda: [fwd_bwd() for _ in range(200)])
                    print(f"--- {mode} {name}: forward+backward x 200, by own time")
                    pstats.Stats(prof).sort_stats("tottime").print_stats(12)
        finally:
            for m, fn in zip(launchers, real):
                m.runnable_kernel = fn
    cols = ["path", "op", "forward us", "forward+backward us"]
    common.print_table(f"bench_kernel --overhead — per call, T {T}, d {d}, ranks {ranks}", cols, rows)
    return {"env": common.env_info(device), "overhead": records, "markdown": common.markdown_table(cols, rows)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--dim", type=int, default=None, help="d_in = d_out (default 576 CPU, 2048 GPU)")
    ap.add_argument("--experts", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--activation", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--backward", action="store_true", help="also time forward+backward of each form")
    ap.add_argument("--overhead", action="store_true", help="fixed per-call cost of each op at a tiny shape")
    ap.add_argument("--profile", action="store_true", help="with --overhead: a cProfile of each op")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = common.setup_process(args.threads)
    if args.overhead:
        payload = overhead_main(args, device)
        common.write_json(args.json, payload)
        return payload
    from moa_fx.kernels import grouped_lora, lora_mixture
    from moa_fx.kernels.reference import grouped_lora_reference, lora_mixture_reference

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dim = args.dim or (2048 if device == "cuda" else 576)
    env = common.env_info(device)
    peak = copy_bandwidth(device, 1024 if device == "cuda" else 256)
    nominal = next((v for k, v in NOMINAL_BW.items() if k in env["device_name"]), None)
    elem = torch.empty((), dtype=dtype).element_size()
    print(f"{env['device_name']} | {dtype} | d {dim} | r {args.rank} | copy bandwidth {peak / 1e9:.1f} GB/s"
          + (f" (nominal {nominal / 1e9:.0f} GB/s)" if nominal else ""))

    rows, records = [], []
    g = torch.Generator(device="cpu").manual_seed(0)
    for E in args.experts:
        ranks, scales = [args.rank] * E, [1.0] * E
        R = sum(ranks)
        for T in args.tokens:
            x = torch.randn(T, dim, generator=g).to(device, dtype)
            y = torch.randn(T, dim, generator=g).to(device, dtype)
            a_cat = (torch.randn(R, dim, generator=g) / dim**0.5).to(device, dtype)
            b_cat = (torch.randn(dim, R, generator=g) / R**0.5).to(device, dtype)
            w = torch.rand(T, E, generator=g)
            w = (w * (torch.rand(T, E, generator=g) < args.activation)).to(device, dtype)
            active = float((w != 0).float().mean())
            forms = {
                "lora_mixture (fused dense)": lambda: lora_mixture(y, x, a_cat, b_cat, w, ranks, scales),
                "lora_mixture_reference": lambda: lora_mixture_reference(y, x, a_cat, b_cat, w, ranks, scales),
                "grouped_lora (fused grouped)": lambda: grouped_lora(y, x, a_cat, b_cat, w, ranks, scales),
                "grouped_lora_reference": lambda: grouped_lora_reference(y, x, a_cat, b_cat, w, ranks, scales),
                "per-expert loop": lambda: naive_loop(y, x, a_cat, b_cat, w, ranks, scales),
            }
            moved = (T * dim * 3 + T * E) * elem + (a_cat.numel() + b_cat.numel()) * elem
            floor_s = moved / peak
            rec = {"E": E, "T": T, "d": dim, "r": args.rank, "activation": active, "bytes": moved,
                   "bandwidth_floor_s": floor_s, "forms": {}}
            with torch.no_grad():
                for name, fn in forms.items():
                    med, mn = bench(fn, device, args.warmup, args.iters)
                    rec["forms"][name] = {"fwd_median_s": med, "fwd_min_s": mn, "fraction_of_peak_bw": floor_s / med}
            if args.backward:
                for name, op in (("lora_mixture (fused dense)", lora_mixture), ("grouped_lora (fused grouped)", grouped_lora),
                                 ("lora_mixture_reference", lora_mixture_reference), ("per-expert loop", naive_loop)):
                    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
                    aa, bb = a_cat.clone().requires_grad_(), b_cat.clone().requires_grad_()

                    def fb(op=op, xs=xs, ys=ys, aa=aa, bb=bb):
                        op(ys, xs, aa, bb, w, ranks, scales).sum().backward()

                    med, mn = bench(fb, device, args.warmup, args.iters)
                    rec["forms"][name].update({"fwd_bwd_median_s": med, "fwd_bwd_min_s": mn})
            records.append(rec)
            f = rec["forms"]
            rows.append([E, T, active, floor_s * 1e3,
                         f["lora_mixture (fused dense)"]["fwd_median_s"] * 1e3,
                         f["lora_mixture_reference"]["fwd_median_s"] * 1e3,
                         f["grouped_lora (fused grouped)"]["fwd_median_s"] * 1e3,
                         f["grouped_lora_reference"]["fwd_median_s"] * 1e3,
                         f["per-expert loop"]["fwd_median_s"] * 1e3,
                         100 * f["lora_mixture (fused dense)"]["fraction_of_peak_bw"],
                         100 * f["grouped_lora (fused grouped)"]["fraction_of_peak_bw"]]
                        + ([f["lora_mixture (fused dense)"]["fwd_bwd_median_s"] * 1e3,
                            f["per-expert loop"]["fwd_bwd_median_s"] * 1e3] if args.backward else []))
            print(f"E {E} T {T}: done", flush=True)
    cols = ["E", "T", "active", "bw floor ms", "dense op ms", "dense ref ms", "grouped op ms", "grouped ref ms",
            "loop ms", "dense % peak", "grouped % peak"] + (["dense fwd+bwd ms", "loop fwd+bwd ms"] if args.backward else [])
    common.print_table(f"bench_kernel — {env['device_name']}, {dtype}, d {dim}, r {args.rank}, forward "
                       f"(median of {args.iters}); peak = copy {peak / 1e9:.1f} GB/s", cols, rows)
    payload = {"env": env, "dtype": str(dtype), "d": dim, "copy_bandwidth_Bps": peak, "nominal_bandwidth_Bps": nominal,
               "args": vars(args), "results": records, "markdown": common.markdown_table(cols, rows)}
    common.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
