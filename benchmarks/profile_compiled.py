"""Where a compiled training step spends its time: self time by category, variant against variant.

Builds the variants of ``bench_step.py`` (same base model, batch, calibration, step) in one process,
compiles each with its own empty Inductor cache (C++ kernels compiled with
``torch._inductor.config.cpp.enable_kernel_profile``, so every generated kernel is a profiler event of
its own), then, in ``--rounds`` interleaved rounds (rotating order), profiles one training step of
every variant with ``torch.profiler`` and sorts each event's *self* CPU time into a category:

- ``GEMM base``      aten mm / addmm / bmm whose every dimension is > ``--skinny`` (the frozen
                     projections, their input gradients, the LM head);
- ``GEMM adapter``   the same ops with a dimension ≤ ``--skinny`` (LoRA A / B, router, threshold,
                     parallel adapter, their gradients; the shared-input GEMM's z = x·cat(W)ᵀ);
- ``attention``      SDPA forward and backward;
- ``inductor C++``   the kernels Inductor generated (pointwise, reductions, their fusions);
- ``custom op``      ``moa_fx::*`` (the lowered sites' fused ops, their torch path beneath them);
- ``copy / cat``, ``gather / scatter / sort``, ``alloc / fill``, ``other aten``: ATen ops that
                     Inductor left as fallbacks (or eager code: optimizer, loss glue);
- ``optimizer``      every op inside AdamW's ``Optimizer.step`` range (eager, not compiled: the
                     single-tensor loop's per-parameter ops);
- ``graph wrapper``  the compiled graph's own Python (``CompiledFunction``, ``Call CompiledFxGraph``,
                     Dynamo's guards) and the autograd engine's glue;
- ``outside ops``    wall time of the profiled step that no event covers (Python between calls).

Prints the self time of each category for every variant, its share of the step, each variant's
difference to the reference variant (``--ref``) and the number of calls, twice: as the sum over
events of each event's minimum over the rounds (noise from other processes only adds time, and every
event recurs every step, so this is the least loaded estimate: read it on a shared machine) and as
medians; then the events (GEMMs by shape, generated kernels by family) whose minima differ most
between ``--target`` and the reference; the Dynamo counters (graphs, graph breaks, graphs compiled
after warm-up = recompiles) and a summary of each variant's generated code (Inductor C++ kernels,
extern GEMMs, ATen fallbacks, custom-op calls); SDPA at the model's attention shape with
``is_causal=True`` against the same causal mask as a tensor (``--sdpa-reps``); and unprofiled step
times of the same variants, interleaved (``--steps``), as wall and thread CPU time
(``time.thread_time``, which preemption by other processes does not inflate). ``--json`` writes
everything, with the environment and the load average at start and end.

Usage::

    python benchmarks/profile_compiled.py --layers 6 --rounds 5 --steps 6 \\
        --json benchmarks/results/profile_sparse_moa_compiled_cpu_6l.json
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import statistics
import sys
import time
from collections import Counter
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets the inductor cache environment before torch)
import torch  # noqa: E402

from bench_step import Bench, is_compiled, peft_name  # noqa: E402

DEFAULT_VARIANTS = ("floor.compiled", peft_name("sparse_moa") + ".compiled", "sparse_moa.compiled",
                    "sparse_moa.lowered.compiled")
CATEGORIES = ("GEMM base", "GEMM adapter", "attention", "inductor C++", "custom op", "copy / cat",
              "gather / scatter / sort", "alloc / fill", "other aten", "optimizer", "graph wrapper",
              "outside ops")

GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv", "aten::_addmm_activation"}
COPIES = {"aten::copy_", "aten::clone", "aten::cat", "aten::_to_copy", "aten::contiguous", "aten::stack",
          "aten::to", "aten::_cat", "aten::constant_pad_nd"}
GATHERS = {"aten::index", "aten::index_select", "aten::gather", "aten::scatter", "aten::scatter_add",
           "aten::scatter_add_", "aten::index_add", "aten::index_add_", "aten::index_put_", "aten::nonzero",
           "aten::sort", "aten::topk", "aten::argsort", "aten::cumsum", "aten::bincount", "aten::masked_select",
           "aten::_index_put_impl_", "aten::embedding_dense_backward", "aten::embedding", "aten::searchsorted",
           "aten::repeat_interleave", "aten::masked_scatter"}
ALLOCS = {"aten::empty", "aten::empty_strided", "aten::zeros", "aten::zeros_like", "aten::empty_like",
          "aten::fill_", "aten::zero_", "aten::ones", "aten::ones_like", "aten::full", "aten::new_zeros",
          "aten::new_empty", "aten::new_empty_strided", "aten::full_like", "aten::resize_"}
WRAPPER_MARKS = ("CompiledFunction", "CompiledFxGraph", "Torch-Compiled Region", "TorchDynamo", "autograd::engine",
                 "Optimizer.zero_grad", "torch::autograd::", "cudaDeviceSynchronize", "AccumulateGrad")


# ------------------------------------------------------------------------------------------------
# categories
# ------------------------------------------------------------------------------------------------

def gemm_dims(shapes: list) -> list[int]:
    """Every dimension of the 2-D and 3-D operands of a GEMM event (its recorded input shapes)."""
    return [d for s in shapes or [] if isinstance(s, (list, tuple)) and len(s) in (2, 3) for d in s[-2:]]


def category(name: str, shapes: list, skinny: int) -> str:
    """The category (module docstring) of one profiler event."""
    if name in GEMMS:
        dims = gemm_dims(shapes)
        return "GEMM adapter" if dims and min(dims) <= skinny else "GEMM base"
    if "cpp_fused" in name or name.startswith("graph_") and "_cpp_" in name:
        return "inductor C++"
    if "scaled_dot_product" in name or "flash_attention" in name or "_efficient_attention" in name:
        return "attention"
    if name.startswith("moa_fx::"):
        return "custom op"
    if name.startswith("aten::_foreach") or name.startswith("aten::_fused_adam") or name.startswith("Optimizer.step"):
        return "optimizer"
    if any(m in name for m in WRAPPER_MARKS):
        return "graph wrapper"
    if name in COPIES:
        return "copy / cat"
    if name in GATHERS:
        return "gather / scatter / sort"
    if name in ALLOCS:
        return "alloc / fill"
    return "other aten"


def kernel_family(name: str) -> str:
    """An event name without the graph id and the kernel index Inductor puts in it, so that the same
    kind of kernel matches across variants (``graph_3_cpp_fused_add_mul_12`` -> ``cpp_fused_add_mul``)."""
    name = re.sub(r"^graph_\d+_", "", name)
    return re.sub(r"_\d+$", "", name) if "cpp_fused" in name else name


# ------------------------------------------------------------------------------------------------
# one profiled step
# ------------------------------------------------------------------------------------------------

def in_range(event, prefix: str) -> bool:
    """Whether ``event`` runs inside a profiler range whose name starts with ``prefix``."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def event_category(event, skinny: int) -> str:
    """:func:`category`, except that every op inside AdamW's ``step`` range is ``optimizer`` (the
    single-tensor loop's ``mul_`` / ``lerp_`` / ``addcdiv_`` would otherwise count as ATen ops)."""
    if in_range(event, "Optimizer.step"):
        return "optimizer"
    return category(event.name, event.input_shapes, skinny)


def profile_step(step: Callable[[], None], skinny: int) -> dict[str, Any]:
    """Self time (ms) by category, by event (GEMMs by shape, kernels by family) of one call, with the
    call's wall time and the thread's CPU time (``time.thread_time``: what preemption does not inflate)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0, c0 = time.perf_counter(), time.thread_time()
        step()
        wall, cpu = (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3
    events: dict[str, dict[str, Any]] = {}
    for e in prof.events():
        shapes = [list(s) for s in (e.input_shapes or []) if isinstance(s, (list, tuple))]
        cat = event_category(e, skinny)
        key = f"{e.name} {shapes}" if e.name in GEMMS else kernel_family(e.name)
        if cat == "optimizer":
            key = "optimizer: " + key
        ev = events.setdefault(key, {"category": cat, "self_ms": 0.0, "calls": 0})
        ev["self_ms"] += e.self_cpu_time_total / 1e3
        ev["calls"] += 1
    return {"wall_ms": wall, "cpu_ms": cpu, "events": events}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the profiled rounds of one variant: per event the median and the minimum self time; per
    category the sum of its events' medians and the sum of their minima ("min": noise from other
    processes only adds time, and each event recurs every step, so the sum of minima is the least
    loaded estimate); the wall and CPU times' medians and minima; "outside ops" = wall − Σ self."""
    keys = set().union(*(r["events"] for r in runs))
    events = {}
    for k in keys:
        vals = [r["events"].get(k, {}).get("self_ms", 0.0) for r in runs]
        cat = next(r["events"][k]["category"] for r in runs if k in r["events"])
        calls = statistics.median([r["events"].get(k, {}).get("calls", 0) for r in runs])
        events[k] = {"category": cat, "median_ms": statistics.median(vals), "min_ms": min(vals), "calls": calls}
    out: dict[str, Any] = {"rounds": len(runs), "events": events}
    for stat in ("median", "min"):
        pick = statistics.median if stat == "median" else min
        cats = dict.fromkeys(CATEGORIES, 0.0)
        for ev in events.values():
            cats[ev["category"]] += ev[f"{stat}_ms"]
        walls = [r["wall_ms"] for r in runs]
        covered = [sum(ev["self_ms"] for ev in r["events"].values()) for r in runs]
        cats["outside ops"] = pick([max(w - c, 0.0) for w, c in zip(walls, covered)])
        out[stat] = {"categories": cats, "total_ms": sum(cats.values()), "wall_ms": pick(walls),
                     "cpu_ms": pick([r["cpu_ms"] for r in runs])}
    out["calls"] = {c: sum(ev["calls"] for ev in events.values() if ev["category"] == c) for c in CATEGORIES}
    return out


def interleaved_cpu(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, dict[str, list[float]]]:
    """Unprofiled steps, one of each variant per round in a rotating order: wall and thread CPU seconds."""
    names = list(steps)
    out = {n: {"wall_s": [], "cpu_s": []} for n in names}
    for i in range(rounds):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0, c0 = time.perf_counter(), time.thread_time()
            steps[n]()
            out[n]["wall_s"].append(time.perf_counter() - t0)
            out[n]["cpu_s"].append(time.thread_time() - c0)
        print(f"  round {i + 1}/{rounds}: " + ", ".join(f"{n} {out[n]['cpu_s'][-1]:.3f} s cpu" for n in names),
              flush=True)
    return out


def sdpa_check(shape: common.Shape, reps: int) -> dict[str, Any]:
    """SDPA forward + backward at the model's attention shape, ``is_causal=True`` (what transformers
    calls without an attention mask) against the same causal mask given as a tensor (what a graph
    that materialises the mask calls), interleaved; thread CPU ms, median and min."""
    import torch.nn.functional as F

    c = shape.config
    hd = c.hidden_size // c.num_attention_heads
    q, k, v = (torch.randn(shape.batch, c.num_attention_heads, shape.seq, hd, dtype=shape.dtype,
                           requires_grad=True) for _ in range(3))
    causal = torch.ones(shape.seq, shape.seq, dtype=torch.bool).tril()
    masks = {"is_causal": {"is_causal": True},
             "bool mask": {"attn_mask": causal.expand(shape.batch, 1, shape.seq, shape.seq)},
             "float mask": {"attn_mask": torch.zeros(shape.batch, 1, shape.seq, shape.seq, dtype=shape.dtype)
                            .masked_fill(~causal, float("-inf"))}}
    times: dict[str, dict[str, list[float]]] = {n: {"forward": [], "forward+backward": []} for n in masks}
    for _ in range(reps + 1):
        for name, kw in masks.items():
            for what in ("forward", "forward+backward"):
                c0 = time.thread_time()
                out = F.scaled_dot_product_attention(q, k, v, **kw)
                if what != "forward":
                    out.sum().backward()
                times[name][what].append((time.thread_time() - c0) * 1e3)
    return {n: {w: {"median_ms": statistics.median(t[1:]), "min_ms": min(t[1:])} for w, t in d.items()}
            for n, d in times.items()}


# ------------------------------------------------------------------------------------------------
# compile: one fresh cache directory per variant, Dynamo's counters, the generated code
# ------------------------------------------------------------------------------------------------

def dynamo_counters() -> dict[str, dict[str, int]]:
    from torch._dynamo.utils import counters

    return {k: dict(v) for k, v in counters.items()}


def counter_diff(after: dict, before: dict) -> dict[str, dict[str, int]]:
    out = {}
    for group, values in after.items():
        d = {k: v - before.get(group, {}).get(k, 0) for k, v in values.items()}
        d = {k: v for k, v in d.items() if v}
        if d:
            out[group] = d
    return out


def code_summary(cache_dir: str) -> dict[str, Any]:
    """What Inductor generated for one variant: kernels defined, and the calls in the wrappers' ``call``
    functions (extern GEMMs, ATen fallbacks, custom ops). Read from the output code in ``cache_dir``."""
    files = [f for f in glob.glob(os.path.join(cache_dir, "**", "*.py"), recursive=True)
             if "def call(" in open(f, errors="replace").read()]
    kernels = externs = 0
    fallbacks: Counter = Counter()
    custom: Counter = Counter()
    extern_ops: Counter = Counter()
    for path in files:
        text = open(path, errors="replace").read()
        kernels += len(re.findall(r"= async_compile\.cpp", text))
        body = text[text.index("def call("):]
        for op in re.findall(r"extern_kernels\.(\w+)\(", body):
            extern_ops[op] += 1
            externs += 1
        for op in re.findall(r"torch\.ops\.aten\.(\w+)\.", body):
            fallbacks[op] += 1
        for op in re.findall(r"torch\.ops\.moa_fx\.(\w+)\.", body):
            custom[op] += 1
    return {"cache_dir": cache_dir, "graphs": len(files), "cpp_kernels": kernels, "extern_calls": externs,
            "extern_ops": dict(extern_ops), "aten_fallbacks": dict(fallbacks), "custom_op_calls": dict(custom)}


def compile_variants(bench: Bench, names: list[str], warmup: int) -> tuple[dict, dict]:
    """Build every variant's step; compile the compiled ones one by one (first call), each into a fresh
    cache directory. Returns (steps, per-variant compile info)."""
    steps, info = {}, {}
    for name in names:
        step = bench.build(name)
        common.fresh_compile_cache()  # after build: the compile happens at the first call
        before = dynamo_counters()
        t0 = time.perf_counter()
        step()
        first = time.perf_counter() - t0
        for _ in range(max(warmup - 1, 0)):
            step()
        after_warm = dynamo_counters()
        step()  # one more call: any graph compiled here is a recompile
        again = counter_diff(dynamo_counters(), after_warm)
        cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        info[name] = {"first_call_s": first, "dynamo": counter_diff(after_warm, before),
                      "after_warmup": again, "code": code_summary(cache) if is_compiled(name) else None}
        steps[name] = step
        graphs = info[name]["dynamo"].get("stats", {}).get("unique_graphs", 0)
        breaks = sum(info[name]["dynamo"].get("graph_break", {}).values())
        print(f"built {name}: first call {first:.1f} s, {graphs} graph(s), {breaks} graph break(s), "
              f"recompiles after warm-up: {again.get('stats', {}).get('unique_graphs', 0)}", flush=True)
    return steps, info


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------

def category_rows(prof: dict[str, dict], names: list[str], ref: str, stat: str) -> tuple[list[str], list[list]]:
    cols = ["category"] + [f"{n} ms" for n in names] + [f"{n} share" for n in names] + \
        [f"{n} − {ref}" for n in names if n != ref] + [f"{n} calls" for n in names]
    rows = []
    for c in CATEGORIES + ("total (wall)", "thread CPU time"):
        def get(n, c=c):
            s = prof[n][stat]
            return s["wall_ms"] if c == "total (wall)" else s["cpu_ms"] if c == "thread CPU time" else s["categories"][c]
        row = [c] + [get(n) for n in names] + [get(n) / prof[n][stat]["wall_ms"] for n in names]
        row += [get(n) - get(ref) for n in names if n != ref]
        row += [prof[n]["calls"].get(c) for n in names]
        rows.append(row)
    return cols, rows


def diff_rows(prof: dict[str, dict], target: str, ref: str, top: int, stat: str) -> list[list]:
    a, b = prof[target]["events"], prof[ref]["events"]
    f = f"{stat}_ms"

    def diff(k):
        return a.get(k, {}).get(f, 0.0) - b.get(k, {}).get(f, 0.0)

    rows = []
    for k in sorted(set(a) | set(b), key=lambda k: -abs(diff(k)))[:top]:
        ea, eb = a.get(k, {}), b.get(k, {})
        rows.append([k[:110], (ea or eb)["category"], ea.get(f, 0.0), eb.get(f, 0.0), diff(k), ea.get("calls", 0),
                     eb.get("calls", 0)])
    return rows


def report(results: dict[str, Any], names: list[str], ref: str, target: str, top: int) -> None:
    prof = results["profiles"]
    markdown = {}
    rounds = results["args"]["rounds"]
    for stat, what in (("min", f"sum over events of the minimum over {rounds} profiled steps"),
                       ("median", f"median of {rounds} profiled steps")):
        cols, rows = category_rows(prof, names, ref, stat)
        common.print_table(f"self time by category, ms ({what})", cols, rows)
        markdown[f"categories:{stat}"] = common.markdown_table(cols, rows)
    for t in [n for n in names if n != ref]:
        drows = diff_rows(prof, t, ref, top, "min")
        dcols = ["event (GEMMs by shape, kernels by family)", "category", f"{t} ms", f"{ref} ms", "difference ms",
                 f"{t} calls", f"{ref} calls"]
        if t == target:
            common.print_table(f"largest differences (per-event minima): {t} vs {ref}", dcols, drows)
        markdown[f"events:{t}"] = common.markdown_table(dcols, drows)
    crow = []
    for n in names:
        c = results["compile"][n]
        code = c["code"] or {}
        crow.append([n, c["first_call_s"], c["dynamo"].get("stats", {}).get("unique_graphs", 0),
                     sum(c["dynamo"].get("graph_break", {}).values()),
                     c["after_warmup"].get("stats", {}).get("unique_graphs", 0), code.get("cpp_kernels"),
                     code.get("extern_calls"), sum((code.get("aten_fallbacks") or {}).values()),
                     sum((code.get("custom_op_calls") or {}).values())])
    ccols = ["variant", "first call s", "graphs", "graph breaks", "recompiles", "C++ kernels", "extern calls",
             "ATen fallbacks", "custom-op calls"]
    common.print_table("compile: Dynamo and the generated code", ccols, crow)
    markdown["compile"] = common.markdown_table(ccols, crow)
    if results.get("sdpa"):
        srows = [[n, d["forward"]["median_ms"], d["forward"]["min_ms"], d["forward+backward"]["median_ms"],
                  d["forward+backward"]["min_ms"]] for n, d in results["sdpa"].items()]
        scols = ["SDPA, one layer", "fwd median ms", "fwd min ms", "fwd+bwd median ms", "fwd+bwd min ms"]
        common.print_table("attention with and without a materialised causal mask (thread CPU time)", scols, srows)
        markdown["sdpa"] = common.markdown_table(scols, srows)
    if results["timings"]:
        floor = names[0]
        t = results["timings"]
        fm = {k: statistics.median(t[floor][k]) for k in ("wall_s", "cpu_s")}
        trows = [[n, statistics.median(v["wall_s"]) * 1e3, statistics.median(v["cpu_s"]) * 1e3, min(v["cpu_s"]) * 1e3,
                  statistics.median(v["cpu_s"]) / fm["cpu_s"], (statistics.median(v["cpu_s"]) - fm["cpu_s"]) * 1e3]
                 for n, v in t.items()]
        tcols = ["variant", "wall median ms", "CPU median ms", "CPU min ms", f"CPU / {floor}",
                 f"CPU overhead vs {floor} ms"]
        common.print_table(f"unprofiled steps, interleaved ({results['args']['steps']} rounds; thread CPU time)",
                           tcols, trows)
        markdown["timings"] = common.markdown_table(tcols, trows)
    results["markdown"] = markdown


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    help="bench_step variant names; the first is the floor of the timing table")
    ap.add_argument("--ref", default=DEFAULT_VARIANTS[1], help="the variant the differences are taken against")
    ap.add_argument("--target", default="sparse_moa.compiled", help="the variant whose event diff is printed")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--activation", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=2, help="calls before profiling (the first compiles)")
    ap.add_argument("--rounds", type=int, default=5, help="profiled steps per variant (interleaved)")
    ap.add_argument("--steps", type=int, default=6, help="unprofiled interleaved timing rounds (0: none)")
    ap.add_argument("--sdpa-reps", type=int, default=10,
                    help="repetitions of the SDPA check, is_causal against a materialised mask (0: none)")
    ap.add_argument("--skinny", type=int, default=128,
                    help="a GEMM with a dimension <= this is an adapter GEMM (rank, router, bottleneck)")
    ap.add_argument("--top", type=int, default=25, help="rows of the difference tables")
    ap.add_argument("--no-kernel-profile", dest="kernel_profile", action="store_false",
                    help="do not compile C++ kernels with profiler records (they then count as 'graph wrapper')")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.inference = False
    for n in (args.ref, args.target):
        if n not in args.variants:
            ap.error(f"--ref / --target {n!r} is not among --variants {args.variants}")
    if args.batch * args.seq <= args.skinny:
        ap.error(f"--skinny {args.skinny} must be below the token count {args.batch * args.seq}, or every GEMM "
                 "counts as an adapter GEMM; lower --skinny or raise --seq")

    device = common.setup_process(args.threads)
    if args.kernel_profile:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True
    env = common.env_info(device)
    print(f"device {env['device_name']} | threads {torch.get_num_threads()} | load {env['load_average_start']}")
    bench = Bench(args, device)
    steps, compile_info = compile_variants(bench, args.variants, args.warmup)
    runs: dict[str, list] = {n: [] for n in args.variants}
    for i in range(args.rounds):
        order = args.variants[i % len(args.variants):] + args.variants[:i % len(args.variants)]
        for n in order:
            runs[n].append(profile_step(steps[n], args.skinny))
        print(f"  profiled round {i + 1}/{args.rounds}: "
              + ", ".join(f"{n} {runs[n][-1]['cpu_ms']:.0f} ms cpu" for n in args.variants), flush=True)
    timings = interleaved_cpu(steps, args.steps) if args.steps else {}
    results = {"env": env, "shape": bench.shape.describe(), "args": vars(args), "compile": compile_info,
               "profiles": {n: summarise(r) for n, r in runs.items()},
               "rounds_raw": {n: [{"wall_ms": r["wall_ms"], "cpu_ms": r["cpu_ms"]} for r in rs]
                              for n, rs in runs.items()},
               "timings": timings, "sdpa": sdpa_check(bench.shape, args.sdpa_reps) if args.sdpa_reps else None}
    report(results, args.variants, args.ref, args.target, args.top)
    results["env"]["load_average_end"] = list(os.getloadavg())
    print(f"load average: start {env['load_average_start']}, end {results['env']['load_average_end']}")
    common.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
