"""Shared pieces of the moa-fx benchmarks (PERF.md): shapes, environment, timing, routing
calibration, memory and reporting.

Map:
- environment: :func:`setup_process` (threads, cold compile caches), :func:`env_info` (device,
  versions, load average);
- shapes: :func:`smollm_config` (CPU, SmolLM2-135M shape), :func:`llama1b_config` (GPU, 1B-class),
  :func:`default_shape`, :func:`build_base` (random init, no download), :func:`share_copy` (a copy
  of a model that shares its parameters, for PEFT and the loop baseline);
- steps: :func:`floor_step`, :func:`train_step`, :func:`make_moa` (``transform`` with the
  ``lower`` keyword when the library has it);
- timing: :func:`interleaved` (variants interleaved, warm-up, median/min), :func:`sync`;
- routing: :func:`calibrate` sets router biases / thresholds so that a chosen fraction of
  (token, expert) pairs fires, :func:`moa_routers` finds a MoAModel's routers;
- memory: :func:`cuda_peak` / :func:`rss_now` / :func:`rss_peak`;
- reporting: :func:`print_table`, :func:`write_json`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# Cold compiles: the first-compile figure must not reuse another process's cache. Set before
# torch._inductor is imported (torch.compile imports it lazily).
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import torch  # noqa: E402

VOCAB_CPU = 49152


# ------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------

def setup_process(threads: int | None) -> str:
    """Fix the thread count (CPU) and point inductor at a fresh cache directory. Returns the device."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if threads is None:
        threads = 1 if device == "cpu" else torch.get_num_threads()
    torch.set_num_threads(threads)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="moa_bench_inductor_")
    return device


def fresh_compile_cache() -> None:
    """A new, empty inductor cache directory (so each compile is measured cold)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="moa_bench_inductor_")


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def env_info(device: str) -> dict[str, Any]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    import moa_fx

    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": triton_version,
        "peft": peft_version,
        "moa_fx": getattr(moa_fx, "__version__", None),
        "moa_fx_path": os.path.dirname(moa_fx.__file__),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "argv": sys.argv,
    }
    return info


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------

def smollm_config(layers: int = 30):
    """SmolLM2-135M's shape (PERF.md CPU): hidden 576, intermediate 1536, 9 heads, 3 KV heads."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, vocab_size=VOCAB_CPU,
                       max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)


def llama1b_config(layers: int = 16):
    """The 1B-class LLaMA shape (PERF.md GPU): hidden 2048, intermediate 8192, 32 heads, 8 KV heads."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)


@dataclass
class Shape:
    config: Any
    dtype: torch.dtype
    batch: int
    seq: int
    name: str

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"name": self.name, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
                "layers": c.num_hidden_layers, "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
                "vocab": c.vocab_size, "batch": self.batch, "seq": self.seq, "tokens": self.batch * self.seq,
                "dtype": str(self.dtype).replace("torch.", "")}


def default_shape(device: str, layers: int | None, batch: int | None, seq: int | None) -> Shape:
    if device == "cuda":
        cfg = llama1b_config(layers or 16)
        return Shape(cfg, torch.bfloat16, batch or 4, seq or 2048, "llama-1b-class")
    cfg = smollm_config(layers or 30)
    return Shape(cfg, torch.float32, batch or 4, seq or 256, "smollm2-135m")


def build_base(shape: Shape, device: str, seed: int = 0):
    """A randomly initialised causal LM of ``shape`` (no download), frozen, in train mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = copy.deepcopy(shape.config)
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(shape.dtype)
    model.requires_grad_(False)
    model.train()
    return model


def share_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are the originals (no extra memory)."""
    memo = {id(p): p for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def make_inputs(shape: Shape, device: str, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.config.vocab_size, (shape.batch, shape.seq), generator=g).to(device)


# ------------------------------------------------------------------------------------------------
# steps
# ------------------------------------------------------------------------------------------------

def floor_step(model, ids: torch.Tensor) -> Callable[[], None]:
    """PERF.md floor: forward with labels and a backward that reaches the input embeddings, no
    weight gradients (every base parameter is frozen), no optimizer.

    The embedding output is made a leaf that requires grad and fed as ``inputs_embeds`` (the same
    as a forward hook doing ``out.requires_grad_()``, but free of graph breaks under compile).
    """
    embed = model.get_input_embeddings()

    def run(fwd=model):
        emb = embed(ids).detach().requires_grad_()
        out = fwd(inputs_embeds=emb, labels=ids)
        out.loss.backward()

    return run


def train_step(model, ids: torch.Tensor, params: Iterable[torch.nn.Parameter], lr: float = 1e-5
               ) -> Callable[[], None]:
    """PERF.md step: forward with labels + backward + AdamW step + zero_grad."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def run():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def transform_supports_lower() -> bool:
    import inspect

    from moa_fx import transform

    return "lower" in inspect.signature(transform).parameters


def make_moa(model, spec, lower: str | None, fuse: bool = True, regions: bool = True):
    """``transform(model, spec, lower=..., fuse=...)``; ``lower=None`` asks for the unlowered graph;
    ``regions=False``: ``compile_regions=False`` (one flat graph, as before the library had it).

    Returns (moa, note). Raises TypeError (from ``transform``) when ``lower`` is asked for but the
    library does not have the keyword yet.
    """
    import inspect

    from moa_fx import transform

    kwargs = {"fuse": fuse} if "fuse" in inspect.signature(transform).parameters else {}
    note = "" if kwargs else "; no fusion pass in this version"
    if not regions:
        kwargs["compile_regions"] = False
        note += "; compile_regions=False"
    if not fuse:
        note += "; fuse=False"
    if lower is None:
        if transform_supports_lower():
            return transform(model, spec, lower="off", **kwargs), "lower='off'" + note
        return transform(model, spec), "no lowering pass in this version"
    return transform(model, spec, lower=lower, **kwargs), f"lower={lower!r}" + note


def calibrated_moa(model, spec, lower: str | None, ids, rate: float | None, fuse: bool = True,
                   regions: bool = True):
    """:func:`make_moa` in train mode, its learned thresholds calibrated (:func:`calibrate`) so that
    about ``rate`` of the (token, expert) pairs fire on ``ids`` (``rate=None``: as initialised).

    Returns (moa, note, transform seconds: the transform alone, not the calibration).
    The calibration hooks run the router modules, which a fused graph reads only through their
    weights; so a fused model is calibrated through an unfused twin whose router and threshold
    weights are then loaded.
    """
    t0 = time.perf_counter()
    moa, note = make_moa(model, spec, lower, fuse, regions)
    seconds = time.perf_counter() - t0
    moa.train()
    if rate is not None and moa_routers(moa):
        twin = moa
        if fuse:
            twin, _ = make_moa(model, spec, lower, fuse=False)
            twin.train()
        with torch.no_grad():
            calibrate(moa_routers(twin), lambda: twin(input_ids=ids), rate)
        if twin is not moa:
            moa.adapters.load_state_dict(twin.adapters.state_dict())
    return moa, note, seconds


def lowering_summary(moa) -> dict[str, Any]:
    """How many LoRA sites the lowering pass lowered, to which form (from ``moa.lowering``)."""
    info = getattr(moa, "lowering", None) or {}
    forms: dict[str, int] = {}
    for entry in info.values():
        form = entry.get("form") if isinstance(entry, dict) else str(entry)
        forms[str(form)] = forms.get(str(form), 0) + 1
    reasons = sorted({str(e.get("reason")) for e in info.values() if isinstance(e, dict) and e.get("reason")})
    return {"sites": len(info), "forms": forms, "reasons": reasons[:5]}


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------

def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    name: str
    times: list[float] = field(default_factory=list)
    first: float | None = None  # the very first call (compile included for compiled variants)
    peak_bytes: int | None = None  # CUDA: max allocated during its steps
    step_bytes: int | None = None  # CUDA: max allocated during a step minus allocated before it

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def min(self) -> float:
        return min(self.times) if self.times else float("nan")


def interleaved(steps: dict[str, Callable[[], None]], device: str, warmup: int, iters: int,
                log: Callable[[str], None] = print) -> dict[str, Timing]:
    """Run every variant ``warmup`` times, then ``iters`` rounds of one step of each, in a rotating
    order (so no variant always follows the same one). Returns per-variant timings (seconds)."""
    names = list(steps)
    out = {n: Timing(n) for n in names}
    for w in range(warmup):
        for n in names:
            t0 = time.perf_counter()
            steps[n]()
            sync(device)
            dt = time.perf_counter() - t0
            if w == 0:
                out[n].first = dt
            log(f"  warm-up {w + 1}/{warmup} {n}: {dt:.3f} s")
    for i in range(iters):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            if device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            steps[n]()
            sync(device)
            dt = time.perf_counter() - t0
            out[n].times.append(dt)
            if device == "cuda":
                peak = torch.cuda.max_memory_allocated()
                out[n].peak_bytes = max(out[n].peak_bytes or 0, peak)
                out[n].step_bytes = max(out[n].step_bytes or 0, peak - base)
        log(f"  round {i + 1}/{iters}: " + ", ".join(f"{n} {out[n].times[-1]:.3f}" for n in names))
    return out


# ------------------------------------------------------------------------------------------------
# routing calibration: make a chosen fraction of (token, expert) pairs fire
# ------------------------------------------------------------------------------------------------

@dataclass
class RouterHandle:
    """One router to calibrate: ``module`` returns the logits (…, E); ``threshold`` is the
    ``nn.Linear(d, 1)`` inside τ = τ_max·sigmoid(W_t h + b_t); ``logit_bias`` the router's output
    bias (sigmoid gates) or None; ``gate`` is "sigmoid" (MoA) or "softmax" (AdaMoLE)."""

    module: torch.nn.Module
    threshold: torch.nn.Linear
    tau_max: float
    gate: str
    logit_bias: torch.nn.Parameter | None = None
    weight: torch.nn.Parameter | None = None  # router weight, scaled by ``spread`` (softmax)


def moa_routers(moa) -> list[RouterHandle]:
    """The routers of a MoAModel that select with a learned threshold."""
    from moa_fx.modules import Router, Threshold

    mods = dict(moa.adapters.named_modules())
    handles = []
    for name, mod in mods.items():
        if not isinstance(mod, Router) or not name.endswith("router"):
            continue
        thr = mods.get(name[: -len("router")] + "threshold")
        if not isinstance(thr, Threshold):
            continue
        if mod.form == "linear":
            handles.append(RouterHandle(mod, thr.proj, thr.tau_max, "softmax", mod.proj.bias, mod.proj.weight))
        else:
            handles.append(RouterHandle(mod, thr.proj, thr.tau_max, "sigmoid", mod.w2.bias, None))
    return handles


@torch.no_grad()
def calibrate(handles: list[RouterHandle], forward: Callable[[], Any], rate: float, spread: float = 3.0) -> None:
    """Set thresholds (and sigmoid routers' output biases) so that about ``rate`` of the
    (token, expert) pairs of every router fire on the benchmark batch.

    - sigmoid gates (Sparse MoA, g ≥ τ): τ is pinned at τ_max = 0.5 (W_t = 0, b_t = 20), so an
      expert fires where its logit ≥ 0; each expert's output bias is shifted by the (1 − rate)
      quantile of its logits on this batch.
    - softmax gates (AdaMoLE, p ≥ τ): the router weights are scaled by ``spread`` (a peakier,
      random router), W_t = 0 and b_t is set so that τ = the (1 − rate) quantile of p.
    Adapters start as identity (LoRA B = 0, adapters at 1e-4 gain), so one forward sees the hidden
    states every later step sees, up to the optimizer's small updates.
    """
    for h in handles:
        if h.gate == "softmax" and h.weight is not None and spread != 1.0:
            h.weight.mul_(spread)
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = [h.module.register_forward_hook(
        lambda mod, inp, out, i=i: captured.setdefault(i, []).append(out.detach().float()))
        for i, h in enumerate(handles)]
    try:
        forward()
    finally:
        for hk in hooks:
            hk.remove()
    for i, h in enumerate(handles):
        if i not in captured:
            raise RuntimeError(f"router {i} did not run during calibration")
        logits = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[i]])
        h.threshold.weight.zero_()
        if h.gate == "sigmoid":
            h.threshold.bias.fill_(20.0)  # τ = τ_max
            if h.logit_bias is None:
                raise RuntimeError("a sigmoid router needs an output bias to calibrate")
            target = math.log(h.tau_max / (1 - h.tau_max)) if h.tau_max < 1 else 0.0
            if rate >= 1.0:
                q = logits.min(dim=0).values - 1.0
            else:
                q = torch.quantile(logits, 1.0 - rate, dim=0)
            h.logit_bias.sub_((q - target).to(h.logit_bias.dtype))
        else:
            p = torch.softmax(logits, dim=-1).flatten()
            if rate >= 1.0:
                h.threshold.bias.fill_(-30.0)
                continue
            if p.numel() > 4_000_000:
                p = p[torch.randperm(p.numel(), device=p.device)[:4_000_000]]
            c = float(torch.quantile(p, 1.0 - rate))
            u = min(max(c / h.tau_max, 1e-6), 1 - 1e-6)
            h.threshold.bias.fill_(math.log(u / (1 - u)))


def moa_activation(moa) -> dict[str, float] | None:
    """Mean over routers of the fraction of (token, expert) pairs firing and of experts per token."""
    stats = moa.router_stats()
    if not stats:
        return None
    rates = [sum(s["activation_rate"]) / len(s["activation_rate"]) for s in stats.values()]
    active = [s["mean_active"] for s in stats.values()]
    return {"activation_rate": sum(rates) / len(rates), "mean_active": sum(active) / len(active),
            "routers": len(stats), "min_rate": min(rates), "max_rate": max(rates)}


# ------------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------------

def rss_now() -> int:
    """Resident set size of this process in bytes (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def rss_peak() -> int:
    """High-water mark of the resident set size of this process in bytes.

    Linux: ``VmHWM`` of /proc/self/status, which belongs to this process's own address space.
    ``getrusage``'s ``ru_maxrss`` is only the fallback: after fork + exec it still carries the
    parent's peak, so every benchmark subprocess would report at least the parent's RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_rss_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux: ``5`` into /proc/self/clear_refs), so that
    :func:`rss_peak` covers only what runs after. False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------

def fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        if math.isnan(x):
            return "—"
        return format(x, spec)
    return str(x)


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A rich table when rich is installed, else plain aligned text."""
    cells = [[fmt(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="left" if c == columns[0] else "right")
        for row in cells:
            table.add_row(*row)
        Console(width=200).print(table)
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
        print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    payload.setdefault("env", {})["load_average_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")


def profile_top(fn: Callable[[], None], rows: int = 10, steps: int = 1) -> str:
    """``torch.profiler`` key_averages of ``steps`` calls of ``fn``, sorted by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
