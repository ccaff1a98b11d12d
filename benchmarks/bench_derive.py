"""Inference and derivation benchmark (PERF.md, CPU): decode, prefill, checkpointing memory and the
cost of deriving a graph, for ``lora``, ``sparse_moa`` and ``soft_moa``, side by side with the base.

Everything runs at the SmolLM2-135M shape (``common.smollm_config``, random weights, fp32, no
download). Every moa-fx model shares one frozen base; its adapters are randomised (normal, std
``--adapter-std`` = 0.02, seeded per preset) so that outputs differ from the base's; ``sparse_moa``'s
thresholds are then calibrated (``common.calibrate``, through an unfused twin, as bench_step does) so
that ``--activation`` (0.5) of its (token, expert) pairs fire (random thresholds fire everywhere).
``--lower-off`` adds ``<preset>.off`` decode / prefill variants (``transform(..., lower="off")``: plain
aten ops instead of the ``moa_fx::lora_*`` custom ops), to show what the lowered ops cost at S = 1.

1. **decode**: ms per generated token of ``moa.generate(ids, max_new_tokens=N, do_sample=False)``
   against the base model's own cached ``generate``, batch 1, a ``--prompt`` (64) token prompt,
   N = ``--new-tokens`` (32). Per token = (t(prompt + N) − t(prompt + 1)) / (N − 1), so prefill is
   excluded; the EOS id is removed from the generation config so every run makes exactly N tokens.
   All 2 × (1 + presets) variants interleaved, medians. Target ≤ 1.2.
2. **prefill**: a forward with ``use_cache=True, logits_to_keep=1`` on a ``--prefill-batch`` ×
   ``--prefill-seq`` (4 × 256) prompt under no_grad, the same call for both models (what
   ``generate`` runs first; the moa-fx model serves it with its cached, last-logits graph), moa / base.
   Target ≤ 1.1.
3. **training memory**: RSS high-water mark (VmHWM, reset through /proc/self/clear_refs just before
   the steps) of ``--mem-steps`` forward-with-labels + backward steps at ``--mem-batch`` ×
   ``--mem-seq`` (4 × 512), each configuration in a fresh subprocess, with and without activation
   checkpointing: moa-fx ``lora`` / ``sparse_moa`` (``moa.gradient_checkpointing_enable()``, a graph
   rewrite), the base model with HF's ``gradient_checkpointing_enable(use_reentrant=False)`` and the
   embedding output requiring grad (the PERF.md floor), and PEFT LoRA r 8 on q, k, v, o, down with HF
   checkpointing (``--no-peft`` skips it). The figure is the peak minus the RSS before the steps (the
   model itself excluded). RSS rather than saved-tensor hooks because a non-reentrant checkpoint keeps
   its blocks' inputs alive outside autograd's saved tensors (a hook would not see them, nor the
   logits, their gradient and the recomputed block's transient activations, which make the real
   peak); each child also reports the bytes autograd saved (unique storages, parameters excluded,
   seen by ``torch.autograd.graph.saved_tensors_hooks``) as a cross-check. Reported: ckpt / no-ckpt
   for each, side by side.
4. **deriving a graph** (one preset after another on the same base, so the process-wide one-time
   costs — torch.export's first use — are paid by a 1-layer warm-up transform, reported apart):
   ``transform`` wall time; the first ``generate`` after ``--train-steps`` training steps minus a warm
   ``generate`` of the same prompt (its KV-cache graph is derived then: ``moa.derivations`` gives the
   capture+passes and the last-logits rewrite); that derivation broken down by timing
   ``moa_fx.capture.capture(base, cache=True)`` alone, ``find_sites`` and the pass pipeline on a copy
   of that capture; and the first ``moa.to(torch.bfloat16)`` (and back to fp32, also a derivation).
   Target ≤ 2 s each.

Usage::

    python benchmarks/bench_derive.py --quick --json /tmp/derive6.json     # 6 layers, smoke run
    python benchmarks/bench_derive.py --lower-off --json benchmarks/results/derive_cpu_30l.json   # 30 layers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets the inductor cache environment before torch)
import torch  # noqa: E402

PRESETS = ("lora", "sparse_moa", "soft_moa")
MEM_PRESETS = ("lora", "sparse_moa")
QKVOD = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
TARGETS = {"decode": 1.2, "prefill": 1.1, "derive_s": 2.0}


# ================================================================================================
# models
# ================================================================================================

def make_shape(layers: int, batch: int = 1, seq: int = 64) -> common.Shape:
    return common.Shape(common.smollm_config(layers), torch.float32, batch, seq, "smollm2-135m")


def build_base(layers: int) -> torch.nn.Module:
    base = common.build_base(make_shape(layers), "cpu", seed=0)
    # random weights make EOS (id 2) a likely token: without an EOS every generate makes exactly N tokens
    base.generation_config.eos_token_id = None
    base.generation_config.pad_token_id = 0
    return base


@torch.no_grad()
def randomise(moa, std: float, seed: int) -> int:
    """Every adapter, router and threshold parameter ~ N(0, std²) (seeded); returns their count."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for _, p in sorted(moa.moa.named_parameters()):
        p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
        n += p.numel()
    return n


def transform(base, preset: str, lower: str | None = None) -> tuple[Any, float]:
    """``moa_fx.transform(base, preset)`` (``lower`` passed only when given) and its wall time."""
    import moa_fx

    kwargs = {} if lower is None else {"lower": lower}
    t0 = time.perf_counter()
    moa = moa_fx.transform(base, preset, **kwargs)
    return moa, time.perf_counter() - t0


def calibrate(base, moa, preset: str, rate: float | None, ids: torch.Tensor, seed: int) -> str:
    """Thresholded routers (``sparse_moa``): make about ``rate`` of (token, expert) pairs fire on
    ``ids`` (``common.calibrate``), as bench_step does. The fused graph reads the routers through
    their weights only, so an unfused twin with the same random adapters is calibrated and its
    adapter state loaded. Returns what was done."""
    if rate is None:
        return "not calibrated"
    import moa_fx

    if not common.moa_routers(moa):
        return "no thresholded routers"
    was = base.training
    twin = moa_fx.transform(base, preset, fuse=False)
    twin.moa.load_state_dict(moa.moa.state_dict())  # the same random adapters
    twin.eval()
    with torch.no_grad():
        common.calibrate(common.moa_routers(twin), lambda: twin(input_ids=ids), rate)
    moa.moa.load_state_dict(twin.moa.state_dict())
    base.train(was)
    return f"calibrated to {rate} through an unfused twin"


def ids_of(batch: int, seq: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def activation(moa, ids) -> dict | None:
    with torch.no_grad():
        moa(input_ids=ids)
    try:
        return common.moa_activation(moa)
    except Exception as e:  # noqa: BLE001 - a report, not a check
        return {"error": repr(e)}


# ================================================================================================
# 4. deriving graphs
# ================================================================================================

def new_derivations(moa, since: int) -> list[dict[str, Any]]:
    return [{"key": k, "how": h, "seconds": s} for k, h, s in moa.derivations[since:]]


def derive_costs(args, base, presets: list[str], log: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Transform each preset, train a few steps, time the first (deriving) and a warm generate.

    Returns (per-preset results, the MoAModels, kept for the timing runs)."""
    vocab = base.config.vocab_size
    prompt = ids_of(1, args.prompt, vocab, seed=11)
    train_ids = ids_of(2, 64, vocab, seed=12)
    calib_ids = ids_of(args.prefill_batch, args.prefill_seq, vocab, seed=13)
    results: dict[str, Any] = {}
    moas: dict[str, Any] = {}
    for i, preset in enumerate(presets):
        base.train()
        moa, t_transform = transform(base, preset)
        log(f"{preset}: transform {t_transform:.2f} s")
        r: dict[str, Any] = {"transform_s": t_transform, "transform_derivations": new_derivations(moa, 0)}
        r["adapter_params"] = randomise(moa, args.adapter_std, seed=100 + i)
        r["calibration"] = calibrate(base, moa, preset, args.activation, calib_ids, seed=100 + i)
        moa.train()
        step = common.train_step(moa, train_ids, moa.parameters(), lr=1e-5)
        t0 = time.perf_counter()
        for _ in range(args.train_steps):
            step()
        r["train_steps"] = args.train_steps
        r["train_steps_s"] = time.perf_counter() - t0
        moa.eval()
        mark = len(moa.derivations)
        t0 = time.perf_counter()
        with torch.no_grad():
            first_out = moa.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
        t_first = time.perf_counter() - t0
        r["first_generate_derivations"] = new_derivations(moa, mark)
        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = moa.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
            warm.append(time.perf_counter() - t0)
        r["first_generate_s"] = t_first
        r["warm_generate_s"] = statistics.median(warm)
        r["first_generate_extra_s"] = t_first - r["warm_generate_s"]
        r["first_equals_warm_tokens"] = bool(torch.equal(first_out, out))
        r["new_tokens_made"] = int(out.shape[1] - prompt.shape[1])
        derivs = r["first_generate_derivations"]
        cached = next((d["seconds"] for d in derivs if d["how"] == "capture"), None)
        rewrite = next((d["seconds"] for d in derivs if "keep_last_logits" in d["how"]), None)
        r["cached_capture_and_passes_s"] = cached
        # the rewrite's recorded seconds include the cached graph it derived first (nested _derive)
        r["last_logits_rewrite_s"] = (rewrite - cached) if (rewrite is not None and cached is not None
                                                            and rewrite >= cached) else rewrite
        log(f"{preset}: first generate {t_first:.2f} s, warm {r['warm_generate_s']:.3f} s, "
            f"derivations {[(d['key'], d['how'][:30], round(d['seconds'], 2)) for d in derivs]}")
        results[preset] = r
        moas[preset] = moa
    return results, moas


def breakdown(base, moas: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The cached graph's derivation in parts: ``capture(base, cache=True)`` alone (preset-independent),
    then per preset ``find_sites`` and the pass pipeline on a copy of that capture (throwaway adapters)."""
    from torch import nn

    from moa_fx.capture import capture
    from moa_fx.derive import copy_graph_module
    from moa_fx.passes import PassContext, pipeline, run_pipeline
    from moa_fx.sites import find_sites

    out: dict[str, Any] = {}
    base.eval()
    t0 = time.perf_counter()
    cap = capture(base, cache=True, train=True)  # derive_by_capture's call for a model without batch norm
    out["capture_cached_s"] = time.perf_counter() - t0
    log(f"capture(base, cache=True) alone: {out['capture_cached_s']:.2f} s")
    for preset, moa in moas.items():
        try:
            gm = copy_graph_module(cap.gm)
            t0 = time.perf_counter()
            plan = find_sites(gm, moa.spec)
            t1 = time.perf_counter()
            ctx = PassContext(gm, moa.spec, plan, adapters=nn.Module())
            run_pipeline(ctx, pipeline(moa._options.lower, moa._options.fuse), until=moa._options.until)
            t2 = time.perf_counter()
            out[preset] = {"find_sites_s": t1 - t0, "passes_s": t2 - t1}
        except Exception as e:  # noqa: BLE001 - internals may move; the wall-clock figures stand
            out[preset] = {"error": f"{type(e).__name__}: {e}"}
        log(f"{preset}: {out[preset]}")
    return out


def to_costs(moas: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """The first ``.to(torch.bfloat16)`` of each model and the move back to fp32 (each a capture of the
    forward graph). The base is shared: its dtype follows the model being moved, and every model is back
    in fp32 (with its earlier fp32 graphs dropped only for the model that moved) before the next."""
    out: dict[str, Any] = {}
    for preset, moa in moas.items():
        r: dict[str, Any] = {}
        for name, dtype in (("to_bf16", torch.bfloat16), ("to_fp32", torch.float32)):
            mark = len(moa.derivations)
            t0 = time.perf_counter()
            moa.to(dtype)
            r[f"{name}_s"] = time.perf_counter() - t0
            r[f"{name}_derivations"] = new_derivations(moa, mark)
        out[preset] = r
        log(f"{preset}: .to(bf16) {r['to_bf16_s']:.2f} s, back to fp32 {r['to_fp32_s']:.2f} s")
    return out


# ================================================================================================
# 1, 2. decode and prefill
# ================================================================================================

def decode_prefill(args, base, moas: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    vocab = base.config.vocab_size
    prompt = ids_of(1, args.prompt, vocab, seed=11)
    pre_ids = ids_of(args.prefill_batch, args.prefill_seq, vocab, seed=13)
    n = args.new_tokens
    base.eval()
    for moa in moas.values():
        moa.eval()
    models = {"base": base, **moas}

    def gen(model, tokens):
        def run():
            with torch.no_grad():
                out = model.generate(prompt, max_new_tokens=tokens, do_sample=False)
            if out.shape[1] != prompt.shape[1] + tokens:
                raise RuntimeError(f"generate made {out.shape[1] - prompt.shape[1]} tokens, not {tokens}")
        return run

    import inspect

    from transformers import DynamicCache

    # transformers 5 calls the argument ``cache`` (``past_key_values`` is deprecated); older ones the latter
    base_cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def prefill(model):
        arg = base_cache_arg if model is base else "cache"

        def run():
            with torch.no_grad():
                model(input_ids=pre_ids, use_cache=True, logits_to_keep=1, **{arg: DynamicCache()})
        return run

    # the adapters change the outputs: max |logit - base logit| on the prompt, and the greedy tokens
    with torch.no_grad():
        ref_logits = base(input_ids=prompt).logits
        ref = base.generate(prompt, max_new_tokens=8, do_sample=False)
        same = {p: bool(torch.equal(m.generate(prompt, max_new_tokens=8, do_sample=False), ref))
                for p, m in moas.items()}
        dlogit = {p: float((m(input_ids=prompt).logits - ref_logits).abs().max()) for p, m in moas.items()}

    steps = {}
    for name, model in models.items():
        steps[f"{name}.gen1"] = gen(model, 1)
        steps[f"{name}.gen{n}"] = gen(model, n)
    log(f"decode: batch 1, prompt {args.prompt}, {n} new tokens; variants {list(steps)}")
    t = common.interleaved(steps, "cpu", args.warmup, args.iters, log=log)
    decode: dict[str, Any] = {"batch": 1, "prompt": args.prompt, "new_tokens": n, "same_tokens_as_base": same,
                              "max_abs_logit_diff_vs_base": dlogit, "variants": {}}
    for name in models:
        t1, tn = t[f"{name}.gen1"], t[f"{name}.gen{n}"]
        per_round = [(b - a) / (n - 1) for a, b in zip(t1.times, tn.times)]
        decode["variants"][name] = {"gen1_median_s": t1.median, f"gen{n}_median_s": tn.median,
                                    "gen1_times_s": t1.times, f"gen{n}_times_s": tn.times,
                                    "per_token_s": (tn.median - t1.median) / (n - 1),
                                    "per_token_round_median_s": statistics.median(per_round)}
    b = decode["variants"]["base"]["per_token_s"]
    for name in moas:
        v = decode["variants"][name]
        v["ratio"] = v["per_token_s"] / b
        v["prefill_plus_one_ratio"] = v["gen1_median_s"] / decode["variants"]["base"]["gen1_median_s"]

    psteps = {name: prefill(model) for name, model in models.items()}
    log(f"prefill: {args.prefill_batch} x {args.prefill_seq}, use_cache=True, logits_to_keep=1")
    tp = common.interleaved(psteps, "cpu", args.warmup, args.iters, log=log)
    pre: dict[str, Any] = {"batch": args.prefill_batch, "seq": args.prefill_seq,
                           "call": f"forward(input_ids, use_cache=True, {base_cache_arg}=DynamicCache(), "
                                   "logits_to_keep=1) under no_grad", "variants": {}}
    for name in models:
        pre["variants"][name] = {"median_s": tp[name].median, "min_s": tp[name].min, "times_s": tp[name].times,
                                 "ratio": tp[name].median / tp["base"].median}
    return {"decode": decode, "prefill": pre}


# ================================================================================================
# 3. training memory: one subprocess per configuration
# ================================================================================================

MEM_CONFIGS = ("base", "base.ckpt", "peft", "peft.ckpt") + tuple(
    f"{p}{s}" for p in MEM_PRESETS for s in ("", ".ckpt"))


def memory_child(args) -> None:
    name = args.child_memory
    ckpt = name.endswith(".ckpt")
    kind = name.removesuffix(".ckpt")
    base = build_base(args.layers)
    base.train()
    ids = ids_of(args.mem_batch, args.mem_seq, base.config.vocab_size, seed=14)
    if kind == "base":
        if ckpt:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = base
        step = common.floor_step(base, ids)
        how = "HF model, embedding output requires grad (PERF.md floor)" + (
            "; HF gradient_checkpointing_enable(use_reentrant=False)" if ckpt else "")
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules=list(QKVOD)))
        with torch.no_grad():
            for n_, p in model.named_parameters():
                if "lora_B" in n_:
                    p.normal_(0, args.adapter_std)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
        how = "PEFT LoRA r 8 on q,k,v,o,down" + ("; HF gradient_checkpointing_enable(use_reentrant=False)"
                                                 if ckpt else "")
    else:
        model, _ = transform(base, kind)
        randomise(model, args.adapter_std, seed=100 + PRESETS.index(kind))
        calibration = calibrate(base, model, kind, args.activation, ids, seed=100 + PRESETS.index(kind))
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
        how = f"moa-fx {kind}, {calibration}" + ("; moa.gradient_checkpointing_enable() (graph rewrite)"
                                                  if ckpt else "")

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in params and t.device.type != "meta":
                saved[s.data_ptr()] = s.nbytes()
        return t

    before = common.rss_now()
    reset = common.reset_rss_peak()
    t0 = time.perf_counter()
    for i in range(args.mem_steps):
        if i == args.mem_steps - 1:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                step()
        else:
            step()
    seconds = time.perf_counter() - t0
    peak = common.rss_peak()
    print("MEMORY_JSON " + json.dumps({
        "config": name, "how": how, "rss_before": before, "rss_peak": peak, "delta": peak - before,
        "peak_reset_before_steps": reset, "steps": args.mem_steps, "steps_s": seconds,
        "saved_tensor_bytes": sum(saved.values()),
        "derivations": [list(d) for d in getattr(model, "derivations", [])]}))


def memory_in_subprocesses(args, configs: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", name, "--layers", str(args.layers),
               "--threads", str(args.threads), "--mem-batch", str(args.mem_batch), "--mem-seq", str(args.mem_seq),
               "--mem-steps", str(args.mem_steps), "--adapter-std", str(args.adapter_std),
               "--activation", str(-1 if args.activation is None else args.activation)]
        log(f"memory: {name} …")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_JSON ")), None)
        if line is None:
            tail = proc.stderr.strip().splitlines()[-5:] if proc.stderr else ["?"]
            out[name] = {"error": "child failed (rc %s): %s" % (proc.returncode, " | ".join(tail))}
        else:
            out[name] = json.loads(line[len("MEMORY_JSON "):])
        out[name]["child_wall_s"] = time.perf_counter() - t0
        log(f"  {name}: " + (f"delta {out[name]['delta'] / 2**20:.0f} MB, saved "
                             f"{out[name]['saved_tensor_bytes'] / 2**20:.0f} MB" if "delta" in out[name]
                             else out[name]["error"]))
    ratios: dict[str, Any] = {}
    for kind in ("base", "peft", *MEM_PRESETS):
        a, b = out.get(kind), out.get(f"{kind}.ckpt")
        if a and b and "delta" in a and "delta" in b:
            ratios[kind] = {"rss_ckpt_over_no_ckpt": b["delta"] / a["delta"],
                            "saved_ckpt_over_no_ckpt": (b["saved_tensor_bytes"] / a["saved_tensor_bytes"])
                            if a["saved_tensor_bytes"] else None}
    return {"configs": out, "ratios": ratios}


# ================================================================================================
# report
# ================================================================================================

def report(res: dict[str, Any]) -> dict[str, str]:
    md: dict[str, str] = {}
    env, shape = res["env"], res["shape"]
    head = f"{env['device_name']}, {shape['layers']} layers, fp32, {env['threads']} thread(s)"
    tables = []
    if "decode" in res:
        d, n = res["decode"], res["decode"]["new_tokens"]
        rows = []
        for name, v in d["variants"].items():
            rows.append([name, v["gen1_median_s"] * 1e3, v[f"gen{n}_median_s"] * 1e3, v["per_token_s"] * 1e3,
                         v["per_token_round_median_s"] * 1e3, v.get("ratio"), TARGETS["decode"] if name != "base"
                         else None, d["max_abs_logit_diff_vs_base"].get(name),
                         d["same_tokens_as_base"].get(name) if name != "base" else None])
        cols = ["model", "prompt+1 ms", f"prompt+{n} ms", "ms/token", "ms/token (per-round)", "/base",
                "target", "max |Δlogit| vs base", "same 8 tokens as base"]
        tables.append((f"decode — batch 1, prompt {d['prompt']}, {n} new tokens, greedy — {head}", cols, rows,
                       "decode"))
    if "prefill" in res:
        p = res["prefill"]
        rows = [[name, v["median_s"] * 1e3, v["min_s"] * 1e3, v["ratio"] if name != "base" else None,
                 TARGETS["prefill"] if name != "base" else None] for name, v in p["variants"].items()]
        tables.append((f"prefill — {p['batch']}×{p['seq']}, use_cache=True, logits_to_keep=1 — {head}",
                       ["model", "median ms", "min ms", "/base", "target"], rows, "prefill"))
    if "memory" in res:
        m = res["memory"]
        rows = []
        for kind in ("base", "peft", *MEM_PRESETS):
            a, b = m["configs"].get(kind), m["configs"].get(f"{kind}.ckpt")
            if not a or not b:
                continue
            ok = "delta" in a and "delta" in b
            r = m["ratios"].get(kind, {})
            rows.append([kind, a.get("delta", 0) / 2**20 if ok else a.get("error", "—")[:40],
                         b.get("delta", 0) / 2**20 if ok else b.get("error", "—")[:40],
                         r.get("rss_ckpt_over_no_ckpt"),
                         a.get("saved_tensor_bytes", 0) / 2**20 if ok else None,
                         b.get("saved_tensor_bytes", 0) / 2**20 if ok else None,
                         r.get("saved_ckpt_over_no_ckpt")])
        tables.append((f"training memory — {m['batch']}×{m['seq']}, forward with labels + backward, "
                       f"RSS peak − RSS before steps, one subprocess each — {head}",
                       ["model", "no ckpt MB", "ckpt MB", "ckpt/no ckpt", "saved MB (no ckpt)", "saved MB (ckpt)",
                        "saved ckpt/no ckpt"], rows, "memory"))
    if "derive" in res:
        dv, bd = res["derive"], res.get("breakdown", {})
        rows = [["warm-up: transform of a 1-layer model (process one-time costs)", res["warmup_transform_s"],
                 None, None]]
        for preset, r in dv.items():
            rows.append([f"{preset}: transform", r["transform_s"], TARGETS["derive_s"], None])
            rows.append([f"{preset}: first generate − warm generate", r["first_generate_extra_s"],
                         TARGETS["derive_s"],
                         f"first {r['first_generate_s']:.2f} s, warm {r['warm_generate_s']:.2f} s"])
            rows.append([f"{preset}:   cached graph, capture + passes (derivations)", r["cached_capture_and_passes_s"],
                         None, None])
            rows.append([f"{preset}:   last-logits rewrite (derivations)", r["last_logits_rewrite_s"], None, None])
            b = bd.get(preset, {})
            if "passes_s" in b:
                rows.append([f"{preset}:   find_sites / passes alone", b["find_sites_s"], None,
                             f"passes {b['passes_s']:.3f} s"])
            t = res.get("to", {}).get(preset)
            if t:
                how = ", ".join(f"{d['key']}: {d['seconds']:.2f} s" for d in t["to_bf16_derivations"])
                rows.append([f"{preset}: first .to(torch.bfloat16)", t["to_bf16_s"], TARGETS["derive_s"], how])
                rows.append([f"{preset}: then .to(torch.float32)", t["to_fp32_s"], TARGETS["derive_s"], None])
        if "capture_cached_s" in bd:
            rows.append(["capture(base, cache=True) alone (any preset)", bd["capture_cached_s"], None, None])
        tables.append((f"deriving graphs — seconds — {head}", ["what", "s", "target s", "detail"], rows, "derive"))
    for title, cols, rows, key in tables:
        common.print_table(title, cols, rows)
        md[key] = common.markdown_table(cols, rows)
    for note in res.get("notes", []):
        print("note:", note)
    return md


# ================================================================================================
# main
# ================================================================================================

def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="6 layers and 1 memory step (smoke run); rounds stay --warmup 3, --iters 10")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    ap.add_argument("--only", nargs="+", default=["decode", "prefill", "memory", "derive"],
                    choices=["decode", "prefill", "memory", "derive"],
                    help="measurements to run (derive is always done: it builds the models)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-batch", type=int, default=4)
    ap.add_argument("--prefill-seq", type=int, default=256)
    ap.add_argument("--mem-batch", type=int, default=4)
    ap.add_argument("--mem-seq", type=int, default=512)
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--no-peft", action="store_true", help="skip the PEFT LoRA memory configurations")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--adapter-std", type=float, default=0.02)
    ap.add_argument("--activation", type=float, default=0.5,
                    help="sparse_moa: calibrate so this fraction of (token, expert) pairs fires (< 0: leave the "
                         "random thresholds, which fire almost everywhere)")
    ap.add_argument("--lower-off", action="store_true",
                    help="also time decode and prefill of each preset transformed with lower='off' (<preset>.off)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (per-token time is (t(N) - t(1)) / (N - 1))")
    if args.activation is not None and args.activation < 0:
        args.activation = None
    if args.quick and args.child_memory is None:
        args.layers = 6
        args.mem_steps = 1

    common.setup_process(args.threads)
    args.threads = torch.get_num_threads()
    if args.child_memory:
        memory_child(args)
        return {}

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_start = time.perf_counter()
    env = common.env_info("cpu")
    shape = make_shape(args.layers).describe()
    shape.pop("batch"), shape.pop("seq"), shape.pop("tokens")
    res: dict[str, Any] = {"env": env, "shape": shape, "args": {k: v for k, v in vars(args).items()
                                                                 if k != "child_memory"},
                           "targets": TARGETS, "notes": []}
    log(f"device {env['device_name']} | threads {args.threads} | {args.layers} layers | "
        f"load {env['load_average_start']}")

    # one-time process costs (torch.export's first use) on a 1-layer model, reported apart
    tiny = build_base(1)
    _, res["warmup_transform_s"] = transform(tiny, "lora")
    del tiny
    log(f"warm-up transform (1 layer): {res['warmup_transform_s']:.2f} s")

    base = build_base(args.layers)
    derive, moas = derive_costs(args, base, args.presets, log)
    res["derive"] = derive
    res["activation"] = {p: activation(m, ids_of(1, args.prompt, base.config.vocab_size, seed=11))
                         for p, m in moas.items()}
    for p, a in res["activation"].items():
        if a:
            log(f"{p}: activation on the decode prompt {a}")
    if "derive" in args.only:
        res["breakdown"] = breakdown(base, moas, log)
    timed = dict(moas)
    if args.lower_off:
        calib_ids = ids_of(args.prefill_batch, args.prefill_seq, base.config.vocab_size, seed=13)
        res["lower_off"] = {}
        for i, preset in enumerate(args.presets):
            base.train()
            m, seconds = transform(base, preset, lower="off")
            randomise(m, args.adapter_std, seed=100 + i)
            res["lower_off"][preset] = {"transform_s": seconds,
                                        "calibration": calibrate(base, m, preset, args.activation, calib_ids,
                                                                 seed=100 + i)}
            m.eval()
            timed[f"{preset}.off"] = m
        base.eval()
    if "decode" in args.only or "prefill" in args.only:
        res.update(decode_prefill(args, base, timed, log))
        if "decode" not in args.only:
            res.pop("decode")
        if "prefill" not in args.only:
            res.pop("prefill")
    if "derive" in args.only:
        res["to"] = to_costs(moas, log)  # last: it moves the shared base
    del moas, timed, base
    if "memory" in args.only:
        configs = [c for c in MEM_CONFIGS if not (args.no_peft and c.startswith("peft"))
                   and c.removesuffix(".ckpt") in ("base", "peft", *args.presets)]
        res["memory"] = memory_in_subprocesses(args, configs, log)
        res["memory"].update({"batch": args.mem_batch, "seq": args.mem_seq, "steps": args.mem_steps,
                              "measure": "RSS high-water mark (VmHWM, reset via /proc/self/clear_refs before the "
                                         "steps) minus RSS before the steps, fresh subprocess per configuration; "
                                         "saved_tensor_bytes: unique non-parameter storages packed by autograd "
                                         "during the last step (saved_tensors_hooks; excludes checkpoint-held "
                                         "block inputs and transients)"})
    res["notes"].append("adapters, routers and thresholds ~ N(0, %g²); sparse_moa %s; fraction of (token, expert) "
                        "pairs firing on the decode prompt: %s" % (
                            args.adapter_std, f"calibrated to {args.activation} of pairs firing (4×256 batch)"
                            if args.activation is not None else "not calibrated",
                            {p: round(a["activation_rate"], 3) for p, a in res["activation"].items()
                             if a and "activation_rate" in a}))
    res["runtime_s"] = time.perf_counter() - t_start
    res["markdown"] = report(res)
    common.write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
