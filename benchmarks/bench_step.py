"""Training-step benchmark (PERF.md): every variant side by side in one process, interleaved.

Variants (PERF.md "The variants every benchmark runs"):
1. ``floor``            frozen base: forward with labels, backward to the input embeddings, no
                         weight gradients, no optimizer (``floor.compiled``: the same, torch.compile);
2. ``peft(...)``        PEFT LoRA of the same total rank on the same projections
                         (sparse_moa / soft_moa: r = 8 on q, k, v, o, down; adamole, E experts of
                         rank r: r·E on q, k, v, o);
3. ``<method>.loop``    Sparse MoA / AdaMoLE written the way the official code does it — for each
                         expert ``idx = torch.where(sel[:, e])[0]``; ``if len(idx)``: gather, run the
                         expert, scale, ``index_add_`` back — by wrapping the HF model's nn.Linear
                         modules (and, for Sparse MoA, a block router hooked on each decoder layer's
                         input norm). Written here, not library code;
4. ``<method>.eager`` / ``.compiled`` / ``.lowered`` / ``.lowered.compiled``: moa-fx
                         (``transform(model, spec, lower="off")`` / torch.compile of it /
                         ``transform(model, spec, lower="auto")`` / torch.compile of that), all
                         with the shared-input fusion (the default); ``--unfused`` adds
                         ``.eager.unfused`` / ``.lowered.unfused`` (``fuse=False``); ``--flat``
                         adds ``.lowered.compiled.flat`` (``compile_regions=False``: one flat graph).

Step = forward with labels + backward + AdamW step + zero_grad (the floor has no optimizer).
Sparse methods are calibrated so that ``--activation`` (default 0.5) of (token, expert) pairs fire;
the measured rate (``moa.router_stats()``) is reported.

Usage::

    python benchmarks/bench_step.py --layers 6 --methods sparse_moa adamole --json out.json
    python benchmarks/bench_step.py --methods sparse_moa adamole --no-compile   # 30 layers
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets the inductor cache environment before torch)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

METHODS = ("sparse_moa", "adamole", "soft_moa")
LOOP_METHODS = ("sparse_moa", "adamole")
QKVOD = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")

# PEFT LoRA of equal total rank, per method: (r, alpha, dropout, target modules)
PEFT_EQUAL = {
    "sparse_moa": (8, 8, 0.0, QKVOD),  # one r-8 LoRA per projection (+ a parallel adapter, not LoRA)
    "soft_moa": (8, 8, 0.0, QKVOD),
    "adamole": (32, 128, 0.05, QKVO),  # 8 experts × r 4 (α 16: scale 4) → r 32, same scale
}


def peft_name(method: str) -> str:
    r, _, _, targets = PEFT_EQUAL[method]
    short = ",".join(t.split("_")[0] for t in targets)
    return f"peft(r={r};{short})"


# ================================================================================================
# The per-expert-loop baselines (official style). Not library code.
# ================================================================================================

def _lora_pair(d_in: int, d_out: int, r: int, like: torch.Tensor) -> tuple[nn.Linear, nn.Linear]:
    a = nn.Linear(d_in, r, bias=False, device=like.device, dtype=like.dtype)  # Kaiming-uniform
    b = nn.Linear(r, d_out, bias=False, device=like.device, dtype=like.dtype)
    nn.init.zeros_(b.weight)
    return a, b


class LoopAdaMoLELinear(nn.Module):
    """AdaMoLE at one projection, as in the official ``AdaMoeLayer``: softmax router, learned
    threshold τ = sigmoid(W_t x)/E, weights (p − τ)·sel renormalised, then a loop over experts."""

    def __init__(self, base: nn.Linear, num_experts: int = 8, r: int = 4, alpha: float = 16,
                 dropout: float = 0.05) -> None:
        super().__init__()
        w = base.weight
        self.base = base
        self.d_in, self.d_out = base.in_features, base.out_features
        self.num_experts, self.scale, self.max_threshold = num_experts, alpha / r, 1.0 / num_experts
        self.router = nn.Linear(self.d_in, num_experts, bias=False, device=w.device, dtype=w.dtype)
        self.threshold = nn.Linear(self.d_in, 1, device=w.device, dtype=w.dtype)
        pairs = [_lora_pair(self.d_in, self.d_out, r, w) for _ in range(num_experts)]
        self.lora_A = nn.ModuleList(p[0] for p in pairs)
        self.lora_B = nn.ModuleList(p[1] for p in pairs)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_rate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        flat = x.reshape(-1, self.d_in)
        gate = torch.softmax(self.router(flat).float(), dim=-1).to(flat.dtype)
        tau = torch.sigmoid(self.threshold(flat)) * self.max_threshold
        adapted = gate - tau
        selected = torch.ge(adapted, 0).to(flat.dtype)
        weights = adapted * selected
        sums = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(sums == 0, torch.ones_like(sums), sums)
        out = torch.zeros(flat.shape[0], self.d_out, device=flat.device, dtype=flat.dtype)
        for e in range(self.num_experts):
            idx = torch.where(selected[:, e])[0]
            if len(idx):
                xe = flat[idx]
                delta = self.lora_B[e](self.lora_A[e](self.dropout(xe))) * self.scale
                out = out.index_add(0, idx, weights[idx, e, None] * delta)
        self.last_rate = selected.detach().mean()
        return result + out.view(*result.shape)


class SwiGLURouter(nn.Module):
    """MoA's block router: W₂(silu(W₁h + b₁) ⊙ (W₃h + b₃)) + b₂, hidden 4E, zero biases."""

    def __init__(self, dim: int, num_experts: int, like: torch.Tensor) -> None:
        super().__init__()
        hidden = 4 * num_experts
        kw = dict(device=like.device, dtype=like.dtype)
        self.w1, self.w3 = nn.Linear(dim, hidden, **kw), nn.Linear(dim, hidden, **kw)
        self.w2 = nn.Linear(hidden, num_experts, **kw)
        for lin in (self.w1, self.w2, self.w3):
            nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(h)) * self.w3(h))


class LoopBlockRouter(nn.Module):
    """Sparse MoA's router for one decoder layer, run on the layer's normalised input (a forward
    hook on ``input_layernorm``): g = sigmoid(logits), τ = 0.5·sigmoid(W_t h + b_t),
    sel = [g ≥ τ], w = g·sel. The layer's expert wrappers read ``w`` and ``sel``."""

    def __init__(self, dim: int, num_experts: int, like: torch.Tensor, tau_max: float = 0.5) -> None:
        super().__init__()
        self.router = SwiGLURouter(dim, num_experts, like)
        self.threshold = nn.Linear(dim, 1, device=like.device, dtype=like.dtype)
        self.tau_max = tau_max
        self.w: torch.Tensor | None = None
        self.sel: torch.Tensor | None = None

    def route(self, h: torch.Tensor) -> None:
        flat = h.reshape(-1, h.shape[-1])
        g = torch.sigmoid(self.router(flat))
        tau = self.tau_max * torch.sigmoid(self.threshold(flat))
        self.sel = (g - tau >= 0).to(g.dtype)
        self.w = g * self.sel


class LoopSparseLinear(nn.Module):
    """One Sparse MoA LoRA expert at a projection: gather the tokens where it fires, run it,
    scale by its weight, index_add back."""

    def __init__(self, base: nn.Linear, block: LoopBlockRouter, col: int, r: int = 8, alpha: float = 8) -> None:
        super().__init__()
        self.base, self._block, self.col, self.scale = base, [block], col, alpha / r
        self.d_in, self.d_out = base.in_features, base.out_features
        self.lora_A, self.lora_B = _lora_pair(self.d_in, self.d_out, r, base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        blk = self._block[0]
        flat = x.reshape(-1, self.d_in)
        out = torch.zeros(flat.shape[0], self.d_out, device=flat.device, dtype=flat.dtype)
        idx = torch.where(blk.sel[:, self.col])[0]
        if len(idx):
            delta = self.lora_B(self.lora_A(flat[idx])) * self.scale
            out = out.index_add(0, idx, blk.w[idx, self.col, None] * delta)
        return result + out.view(*result.shape)


class LoopSparseAdapter(nn.Module):
    """Sparse MoA's parallel adapter expert beside the MLP (bottleneck 16, silu), same loop."""

    def __init__(self, mlp: nn.Module, block: LoopBlockRouter, col: int, dim: int, bottleneck: int = 16) -> None:
        super().__init__()
        like = next(mlp.parameters())
        self.mlp, self._block, self.col, self.dim = mlp, [block], col, dim
        self.down = nn.Linear(dim, bottleneck, device=like.device, dtype=like.dtype)
        self.up = nn.Linear(bottleneck, dim, device=like.device, dtype=like.dtype)
        for lin in (self.down, self.up):
            nn.init.xavier_uniform_(lin.weight, gain=1e-4)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.mlp(x)
        blk = self._block[0]
        flat = x.reshape(-1, self.dim)
        out = torch.zeros_like(flat)
        idx = torch.where(blk.sel[:, self.col])[0]
        if len(idx):
            delta = self.up(F.silu(self.down(flat[idx])))
            out = out.index_add(0, idx, blk.w[idx, self.col, None] * delta)
        return result + out.view(*result.shape)


def build_loop_adamole(model: nn.Module) -> tuple[nn.Module, list[LoopAdaMoLELinear]]:
    sites = []
    for layer in model.model.layers:
        attn = layer.self_attn
        for name in QKVO:
            wrapped = LoopAdaMoLELinear(getattr(attn, name))
            setattr(attn, name, wrapped)
            sites.append(wrapped)
    return model, sites


def build_loop_sparse_moa(model: nn.Module) -> tuple[nn.Module, list[LoopBlockRouter]]:
    blocks = []
    dim = model.config.hidden_size
    for layer in model.model.layers:
        like = layer.self_attn.q_proj.weight
        block = LoopBlockRouter(dim, 6, like)
        layer.add_module("loop_router", block)
        layer.input_layernorm.register_forward_hook(lambda mod, inp, out, b=block: b.route(out))
        attn, mlp = layer.self_attn, layer.mlp
        for col, name in enumerate(QKVOD[:4]):
            setattr(attn, name, LoopSparseLinear(getattr(attn, name), block, col))
        mlp.down_proj = LoopSparseLinear(mlp.down_proj, block, 4)
        layer.mlp = LoopSparseAdapter(mlp, block, 5, dim)
        blocks.append(block)
    return model, blocks


def loop_handles(method: str, parts: list) -> list[common.RouterHandle]:
    if method == "adamole":
        return [common.RouterHandle(s.router, s.threshold, s.max_threshold, "softmax", None, s.router.weight)
                for s in parts]
    return [common.RouterHandle(b.router, b.threshold, b.tau_max, "sigmoid", b.router.w2.bias, None) for b in parts]


def loop_activation(method: str, parts: list) -> dict[str, float]:
    if method == "adamole":
        rates = [float(s.last_rate) for s in parts if s.last_rate is not None]
        e = parts[0].num_experts
    else:
        rates = [float(b.sel.mean()) for b in parts if b.sel is not None]
        e = 6
    mean = sum(rates) / max(len(rates), 1)
    return {"activation_rate": mean, "mean_active": mean * e, "routers": len(rates),
            "min_rate": min(rates), "max_rate": max(rates)}


# ================================================================================================
# variants
# ================================================================================================

class Bench:
    """Builds the variants lazily over one base model and one batch."""

    def __init__(self, args, device: str) -> None:
        self.args, self.device = args, device
        self.shape = common.default_shape(device, args.layers, args.batch, args.seq)
        self.base = common.build_base(self.shape, device, seed=0)
        self.ids = common.make_inputs(self.shape, device)
        self.moas: dict[tuple[str, str | None, bool], Any] = {}
        self.notes: dict[str, str] = {}
        self.info: dict[str, dict[str, Any]] = {}  # per variant: activation, lowering, ...
        self.activation_fns: dict[str, Callable[[], dict | None]] = {}
        self.transform_s: dict[str, float] = {}
        self._models: dict[str, nn.Module] = {}  # variant -> its eager model (for --inference)

    # -- pieces ------------------------------------------------------------------------------
    def moa(self, method: str, lower: str | None, fuse: bool = True, regions: bool = True):
        key = (method, lower, fuse, regions)
        if key not in self.moas:
            moa, note, seconds = common.calibrated_moa(self.base, method, lower, self.ids, self.args.activation, fuse,
                                                       regions)
            self.transform_s[f"{method}:{lower or 'off'}{'' if fuse else ':unfused'}{'' if regions else ':flat'}"] \
                = seconds
            self.moas[key] = (moa, note)
        return self.moas[key]

    def build(self, name: str) -> Callable[[], None]:
        """The step function of variant ``name`` (see the module docstring for the names)."""
        if self.args.inference:
            return self._inference(name)
        return self._build(name)

    def _inference(self, name: str) -> Callable[[], None]:
        """``--inference``: forward only, under no_grad (floor: the base model's forward)."""
        if name.startswith("floor"):
            fwd = self.base
            if is_compiled(name):
                common.fresh_compile_cache()
                fwd = torch.compile(self.base, dynamic=False)
        else:
            self._build(name)  # builds (and calibrates) the model behind the variant
            model = self._models[name]
            model.eval()
            fwd = model
            if is_compiled(name):
                common.fresh_compile_cache()
                fwd = torch.compile(model, dynamic=False)

        def run():
            with torch.no_grad():
                fwd(input_ids=self.ids)

        return run

    def _build(self, name: str) -> Callable[[], None]:
        a = self.args
        if name == "floor":
            return common.floor_step(self.base, self.ids)
        if name == "floor.compiled":
            common.fresh_compile_cache()
            compiled = torch.compile(self.base, dynamic=False)
            step = common.floor_step(self.base, self.ids)
            return lambda: step(compiled)
        if name.startswith("peft("):
            method = next(m for m in METHODS if peft_name(m) == name.removesuffix(".compiled"))
            return self._peft(method, compiled=name.endswith(".compiled"))
        method, _, kind = name.partition(".")
        if kind == "loop":
            return self._loop(method)
        lower = "auto" if kind.startswith("lowered") else None
        regions = not kind.endswith(".flat")
        kind = kind.removesuffix(".flat")
        fuse = not kind.endswith("unfused")
        kind = kind.removesuffix(".unfused")
        moa, note = self.moa(method, lower, fuse, regions)
        self.notes[name] = note
        self.info[name] = {"lowering": common.lowering_summary(moa)} if lower else {}
        self.activation_fns[name] = lambda m=moa: self._moa_activation(m)
        fwd = moa
        self._models[name] = moa
        if kind.endswith("compiled") and not a.inference:
            common.fresh_compile_cache()
            fwd = torch.compile(moa, dynamic=False)
        params = [p for p in moa.parameters() if p.requires_grad]
        return common.train_step(fwd, self.ids, params, lr=a.lr)

    def _moa_activation(self, moa):
        with torch.no_grad():
            moa(input_ids=self.ids)
        return common.moa_activation(moa)

    def _peft(self, method: str, compiled: bool) -> Callable[[], None]:
        from peft import LoraConfig, get_peft_model

        r, alpha, dropout, targets = PEFT_EQUAL[method]
        model = get_peft_model(common.share_copy(self.base),
                               LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets)))
        model.train()
        fwd = model
        self._models[peft_name(method) + (".compiled" if compiled else "")] = model
        if compiled and not self.args.inference:
            common.fresh_compile_cache()
            fwd = torch.compile(model, dynamic=False)
        return common.train_step(fwd, self.ids, model.parameters(), lr=self.args.lr)

    def _loop(self, method: str) -> Callable[[], None]:
        model = common.share_copy(self.base)
        model, parts = build_loop_adamole(model) if method == "adamole" else build_loop_sparse_moa(model)
        model.train()
        if self.args.activation is not None:
            with torch.no_grad():
                common.calibrate(loop_handles(method, parts), lambda: model(input_ids=self.ids), self.args.activation)

        def activation():
            with torch.no_grad():
                model(input_ids=self.ids)
            return loop_activation(method, parts)

        self.activation_fns[f"{method}.loop"] = activation
        self._models[f"{method}.loop"] = model
        return common.train_step(model, self.ids, model.parameters(), lr=self.args.lr)


def is_compiled(name: str) -> bool:
    """Whether variant ``name`` runs under torch.compile (``….compiled`` or ``….compiled.flat``)."""
    return name.removesuffix(".flat").endswith("compiled")


def variant_names(args, lowering: bool) -> list[str]:
    names = ["floor"]
    if args.compile:
        names.append("floor.compiled")
    peft_seen = []
    for m in args.methods:
        p = peft_name(m)
        if p not in peft_seen:
            peft_seen.append(p)
            names.append(p)
            if args.compile and args.compile_peft:
                names.append(p + ".compiled")
    for m in args.methods:
        if m in LOOP_METHODS and not args.no_loop:
            names.append(f"{m}.loop")
        names.append(f"{m}.eager")
        if args.unfused:
            names.append(f"{m}.eager.unfused")
        if args.compile and m in args.compile_methods:
            names.append(f"{m}.compiled")
        if lowering and not args.no_lowered:
            names.append(f"{m}.lowered")
            if args.unfused:
                names.append(f"{m}.lowered.unfused")
            if args.compile and m in args.compile_methods and args.compile_lowered:
                names.append(f"{m}.lowered.compiled")
                if args.flat:
                    names.append(f"{m}.lowered.compiled.flat")
    if args.variants:
        names = [n for n in names if n in args.variants or n == "floor"]
    return names


# ================================================================================================
# memory: one subprocess per variant (CPU), so that each has its own RSS high-water mark
# ================================================================================================

def memory_child(args, device: str) -> None:
    bench = Bench(args, device)
    step = bench.build(args.child_memory)
    before = common.rss_now()
    reset = common.reset_rss_peak()  # the peak then covers the steps only, not building the models
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        alloc0 = torch.cuda.memory_allocated()
    for _ in range(3):
        step()
    result = {"variant": args.child_memory, "rss_before": before, "rss_peak": common.rss_peak(),
              "delta": common.rss_peak() - before, "peak_reset_before_steps": reset}
    if device == "cuda":
        torch.cuda.synchronize()
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
        result["cuda_delta"] = result["cuda_peak"] - alloc0
    print("MEMORY_JSON " + json.dumps(result))


def memory_in_subprocesses(args, names: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        if is_compiled(name):
            out[name] = {"note": "not measured (a compile in a subprocess costs minutes on this CPU)"}
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", name, "--layers", str(args.layers),
               "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
               "--methods", *args.methods]
        if args.activation is not None:
            cmd += ["--activation", str(args.activation)]
        print(f"memory: {name} …", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("MEMORY_JSON ")), None)
        if line is None:
            out[name] = {"note": "child failed: " + proc.stderr.strip().splitlines()[-1] if proc.stderr else "?"}
        else:
            out[name] = json.loads(line[len("MEMORY_JSON "):])
    return out


# ================================================================================================
# main
# ================================================================================================

def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 30 CPU, 16 GPU)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default 1)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--activation", type=float, default=0.5,
                    help="fraction of (token, expert) pairs that fire in the sparse methods")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-methods", nargs="+", default=["sparse_moa", "adamole"])
    ap.add_argument("--compile-peft", action="store_true", help="also time torch.compile(PEFT model)")
    ap.add_argument("--compile-lowered", action="store_true", default=True)
    ap.add_argument("--no-compile-lowered", dest="compile_lowered", action="store_false")
    ap.add_argument("--no-lowered", action="store_true")
    ap.add_argument("--no-loop", action="store_true")
    ap.add_argument("--unfused", action="store_true",
                    help="also time <method>.eager.unfused / .lowered.unfused (fuse=False: one GEMM per reader)")
    ap.add_argument("--flat", action="store_true",
                    help="also time <method>.lowered.compiled.flat (compile_regions=False: one flat graph)")
    ap.add_argument("--variants", nargs="+", default=None, help="keep only these variant names (and the floor)")
    ap.add_argument("--memory", action="store_true",
                    help="CPU: RSS high-water mark per variant, each in its own subprocess")
    ap.add_argument("--profile", nargs="*", default=None,
                    help="torch.profiler top-10 (self CPU) of one step of these variants after timing")
    ap.add_argument("--inference", action="store_true",
                    help="time forward only (no_grad) instead of a training step (GPU target: lowered / base)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    device = common.setup_process(args.threads)
    args.threads = torch.get_num_threads()
    if args.layers is None:
        args.layers = 16 if device == "cuda" else 30
    if args.batch is None:
        args.batch = 4
    if args.seq is None:
        args.seq = 2048 if device == "cuda" else 256
    if args.child_memory:
        memory_child(args, device)
        return {}

    t_start = time.perf_counter()
    env = common.env_info(device)
    lowering = common.transform_supports_lower()
    notes = []
    if not lowering:
        notes.append("moa-fx lowered: skipped — transform() has no 'lower' keyword in this version")
    bench = Bench(args, device)
    names = variant_names(args, lowering)
    print(f"device {env['device_name']} | threads {args.threads} | shape {bench.shape.describe()}")
    print("variants: " + ", ".join(names))
    steps = {}
    for n in names:
        t0 = time.perf_counter()
        steps[n] = bench.build(n)
        print(f"built {n} in {time.perf_counter() - t0:.1f} s", flush=True)
    timings = common.interleaved(steps, device, args.warmup, args.steps)

    results = summarise(args, bench, timings)
    for n, fn in bench.activation_fns.items():
        if n in results["variants"]:
            results["variants"][n]["activation"] = fn()
    for n, info in bench.info.items():
        if n in results["variants"]:
            results["variants"][n].update(info)
    for n, note in bench.notes.items():
        if n in results["variants"]:
            results["variants"][n]["note"] = note

    if args.profile is not None:
        wanted = args.profile or [n for n in names if is_compiled(n) or n == "floor"]
        results["profiles"] = {}
        for n in wanted:
            if n in steps:
                print(f"profiling {n} …", flush=True)
                results["profiles"][n] = common.profile_top(steps[n])
                print(results["profiles"][n])

    if args.memory or device == "cuda":
        if device == "cuda":
            for n, t in timings.items():
                results["variants"][n]["peak_memory_bytes"] = t.peak_bytes
                results["variants"][n]["step_memory_bytes"] = t.step_bytes
        else:
            mem = memory_in_subprocesses(args, names)
            for n, m in mem.items():
                results["variants"][n]["memory"] = m
    else:
        notes.append("CPU peak memory: not measured in this run (pass --memory: one subprocess per variant)")

    results["env"] = env
    results["shape"] = bench.shape.describe()
    results["args"] = {k: v for k, v in vars(args).items() if k != "child_memory"}
    results["transform_s"] = bench.transform_s
    results["notes"] = notes
    results["runtime_s"] = time.perf_counter() - t_start
    report(results, names)
    common.write_json(args.json, results)
    return results


def summarise(args, bench: Bench, timings: dict[str, common.Timing]) -> dict[str, Any]:
    floor = timings["floor"].median
    floor_c = timings["floor.compiled"].median if "floor.compiled" in timings else None
    variants: dict[str, dict[str, Any]] = {}
    for n, t in timings.items():
        compiled = is_compiled(n)
        ref = floor_c if (compiled and floor_c) else floor
        variants[n] = {"median_s": t.median, "min_s": t.min, "first_s": t.first, "times_s": t.times,
                       "ratio_to_floor": t.median / floor, "overhead_s": t.median - floor,
                       "overhead_over_floor": (t.median - floor) / floor,
                       "ratio_to_compiled_floor": (t.median / floor_c) if (compiled and floor_c) else None,
                       "overhead_vs_own_floor_s": t.median - ref}
        if compiled:
            variants[n]["compile_s"] = (t.first or 0) - t.median
    # comparisons per method
    methods = {}
    for m in args.methods:
        row: dict[str, Any] = {}
        peft = variants.get(peft_name(m))
        peft_c = variants.get(peft_name(m) + ".compiled")
        loop = variants.get(f"{m}.loop")
        for kind in ("eager", "eager.unfused", "compiled", "lowered", "lowered.unfused", "lowered.compiled",
                     "lowered.compiled.flat"):
            v = variants.get(f"{m}.{kind}")
            if v is None:
                continue
            ov = v["overhead_vs_own_floor_s"]
            same_peft = peft_c if (is_compiled(kind) and peft_c) else peft
            row[kind] = {
                "ratio_to_floor": v["ratio_to_floor"],
                "ratio_to_compiled_floor": v["ratio_to_compiled_floor"],
                "overhead_over_peft_overhead": (ov / same_peft["overhead_vs_own_floor_s"]) if same_peft else None,
                "peft_compared": ("compiled" if same_peft is peft_c and peft_c else "eager") if same_peft else None,
                "overhead_over_loop_overhead": (ov / loop["overhead_s"]) if loop else None,
                "step_over_peft_step": (v["median_s"] / same_peft["median_s"]) if same_peft else None,
            }
            if is_compiled(kind) and "floor.compiled" in variants:
                fc = variants["floor.compiled"]["compile_s"]
                row[kind]["compile_s"] = v["compile_s"]
                row[kind]["compile_over_base_compile"] = v["compile_s"] / fc if fc > 0 else None
        methods[m] = row
    return {"variants": variants, "methods": methods}


def report(results: dict[str, Any], names: list[str]) -> None:
    v = results["variants"]
    rows = []
    for n in names:
        r = v[n]
        act = r.get("activation") or {}
        mem = r.get("memory") or {}
        mem_mb = mem.get("delta") / 2**20 if isinstance(mem.get("delta"), (int, float)) else None
        if r.get("step_memory_bytes") is not None:
            mem_mb = r["step_memory_bytes"] / 2**20
        rows.append([n, r["median_s"] * 1e3, r["min_s"] * 1e3, r["ratio_to_floor"], r["ratio_to_compiled_floor"],
                     r["overhead_s"] * 1e3, act.get("activation_rate"), mem_mb,
                     r.get("compile_s")])
    cols = ["variant", "median ms", "min ms", "/floor", "/floor.compiled", "overhead ms", "activation",
            "peak mem MB", "compile s"]
    shape = results["shape"]
    common.print_table(f"bench_step — {results['env']['device_name']}, {shape['layers']} layers, "
                       f"{shape['batch']}×{shape['seq']}, {shape['dtype']}, {results['env']['threads']} thread(s)",
                       cols, rows)
    mrows = []
    for m, kinds in results["methods"].items():
        for kind, c in kinds.items():
            mrows.append([f"{m}.{kind}", c["ratio_to_floor"], c["ratio_to_compiled_floor"],
                          c["overhead_over_peft_overhead"], c["peft_compared"], c["overhead_over_loop_overhead"],
                          c.get("compile_over_base_compile")])
    common.print_table("comparisons", ["variant", "step/floor", "step/floor.compiled", "ovh/PEFT ovh",
                                       "PEFT form", "ovh/loop ovh", "compile/base compile"], mrows)
    results["markdown"] = {"variants": common.markdown_table(cols, rows),
                           "comparisons": common.markdown_table(
                               ["variant", "step/floor", "step/floor.compiled", "ovh/PEFT ovh", "PEFT form",
                                "ovh/loop ovh", "compile/base compile"], mrows)}
    for note in results.get("notes", []):
        print("note:", note)


if __name__ == "__main__":
    main()
