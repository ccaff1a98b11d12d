"""Fine-tune and compare moa-fx methods on BIG-bench tasks (the "real use" evaluation).

Map:

- :data:`METHODS` / :func:`budget_spec` -- the compared methods, with the preset changes that put
  them at a comparable trainable-parameter budget (:data:`BUDGET_CHANGES` says what changed).
- :class:`EvalConfig` -- what a report runs: methods, settings (one task, or a mixture written
  ``a+b+c``), seeds, steps, batch, learning rate, gradient clipping, lengths, eval size, threads.
- :func:`run_evaluation` -- zero-shot scores, then one fine-tuning run per (method, setting, seed);
  returns a JSON-able dict. With ``isolate`` every (method, setting, seed) runs in a fresh process so its
  peak RSS (``resource.getrusage``) is its own.
- :func:`summarize`, :func:`markdown_report`, :func:`terminal_chart`, :func:`write_report` -- the
  table (accuracy mean ± std vs chance and zero-shot, trainable parameters, step time, peak RSS,
  active experts per token), the per-layer chart of active experts, the JSON and Markdown files.
- :func:`synthetic_task_dicts`, :class:`CharTokenizer`, :func:`quick_config` -- the smoke version
  (tiny random LLaMA, synthetic BIG-bench-style task dicts): no assets, no network.

Protocol (ASSETS.md, section 3): each task's examples are split once (``split_seed``) into train and
a held-out test set; the first ``eval_examples`` of the test set are scored
(:func:`moa_fx.eval.tasks.predict`) -- multiple choice by the summed log-likelihood of each choice,
a free-text task by exact match of the greedy answer from ``generate`` (the base model's own for
zero-shot, the MoAModel's after training) -- for the untouched base model (zero-shot) and after
fine-tuning with the loss on the answer tokens only, by the training loop of
``moa-fx train`` (:func:`moa_fx.train.fit`: AdamW, warmup + cosine, gradients clipped to
``max_grad_norm``). A mixture setting trains on a shuffled mix of its tasks' training splits
(:func:`moa_fx.eval.tasks.mixture`) and reports the macro mean of its tasks' accuracies (each task's
own is in the JSON and a second table).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from moa_fx.data import Batch
from moa_fx.errors import InputError
from moa_fx.eval import tasks as T
from moa_fx.fileio import atomic_write_json
from moa_fx.spec import LoraExpert, Spec, presets
from moa_fx.train import Schedule, StepReport, fit, make_optimizer

__all__ = [
    "METHODS",
    "BUDGET_CHANGES",
    "budget_spec",
    "EvalConfig",
    "quick_config",
    "parse_setting",
    "run_evaluation",
    "summarize",
    "markdown_report",
    "terminal_chart",
    "write_report",
    "synthetic_task_dicts",
    "CharTokenizer",
    "load_model",
    "task_loader",
    "TABLE_COLUMNS",
]

METHODS = ("lora", "mole_topk", "adamole", "soft_moa", "sparse_moa")

# What each method's spec changes from its preset (moa_fx/spec/presets.py) so that every method holds a
# comparable number of trainable parameters (SmolLM2-135M: LoRA r=16 ≈ 2.9M, soft MoA ≈ 3.1M, Sparse
# MoA ≈ 2.9M, top-k MoLE ≈ 3.3M, AdaMoLE ≈ 2.2M; the exact counts are measured and reported).
BUDGET_CHANGES = {
    "lora": "r 8 → 16, α 8 → 16 (scale α/r = 1 kept)",
    "mole_topk": "8 → 4 experts per site, r 8 → 4, α 8 → 4 (scale 1 kept); top-2, biased softmax router, aux 1e-3",
    "adamole": "8 → 4 experts per site (so τ_max = 1/E = 0.25), r = 4, α = 16, dropout 0.05, aux 1e-3 as the preset",
    "soft_moa": "preset unchanged (LoRA r 8 on q,k,v,o,down + parallel adapter 16 + prompt L 10, SwiGLU router)",
    "sparse_moa": "preset unchanged (LoRA r 8 on q,k,v,o,down + parallel adapter 16, learned τ, τ_max 0.5)",
}


def budget_spec(method: str) -> Spec:
    """The spec used for ``method`` in this evaluation (its preset, resized per :data:`BUDGET_CHANGES`)."""
    spec = presets.get(method)
    if method == "lora":
        spec = dataclasses.replace(spec, experts=(LoraExpert(at=presets.QKVOD, r=16, alpha=16),))
    elif method == "mole_topk":
        spec = dataclasses.replace(spec, experts=(LoraExpert(at=presets.QKVOD, r=4, alpha=4, count=4),))
    elif method == "adamole":
        (expert,) = spec.experts
        spec = dataclasses.replace(spec, experts=(dataclasses.replace(expert, count=4),))
        assert spec.router.threshold.max is None  # τ_max follows E: 1/4
    return dataclasses.replace(spec, name=method)


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalConfig:
    """One report (the defaults are the configuration of EVALUATION.md: 66 minutes on a free 2-core
    CPU, within the 90-minute budget). ``settings`` entries are a task name (trained and scored alone) or ``a+b+c``
    (trained on the mixture, scored on each of its tasks)."""

    methods: tuple[str, ...] = METHODS
    settings: tuple[str, ...] = ("sports_understanding", "sports_understanding+strategyqa")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 40
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int | None = None  # default: 10% of the steps
    max_grad_norm: float = 1.0  # 0: no clipping
    max_len: int = 64
    eval_examples: int = 150
    threads: int = 2  # the cores really free: on a shared CPU one thread is often faster (ASSETS.md, section 1)
    split_seed: int = 0
    isolate: bool = True
    active_examples: int = 48  # held-out examples (prompt + right answer, no padding) for the routing stats
    model: str = "smollm2"  # "smollm2" (the real asset) or "tiny" (random tiny LLaMA, quick version)
    data: str = "bigbench"  # "bigbench" (the real asset) or "synthetic" (quick version)

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.settings = tuple(self.settings)
        self.seeds = tuple(int(s) for s in self.seeds)
        if self.warmup is None:
            self.warmup = max(1, self.steps // 10)
        for m in self.methods:
            if m not in METHODS:
                raise InputError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if not self.methods or not self.settings or not self.seeds:
            raise InputError("give at least one method, one task setting and one seed")
        for name in ("steps", "batch_size", "max_len", "eval_examples", "threads"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} = {getattr(self, name)} must be >= 1")
        if not self.max_grad_norm >= 0:
            raise InputError(f"max_grad_norm = {self.max_grad_norm} must be >= 0 (0: no clipping)")
        if self.model not in ("smollm2", "tiny") or self.data not in ("bigbench", "synthetic"):
            raise InputError("model must be 'smollm2' or 'tiny', data 'bigbench' or 'synthetic'")


def quick_config(**overrides: Any) -> EvalConfig:
    """The smoke version: tiny random LLaMA, two synthetic tasks, every method, ~1 minute."""
    base = dict(settings=("parity", "parity+compare"), seeds=(0, 1), steps=6, batch_size=8, lr=5e-3, warmup=1,
                max_len=32, eval_examples=24, threads=1, isolate=False, active_examples=16, model="tiny",
                data="synthetic")
    base.update(overrides)
    return EvalConfig(**base)


def parse_setting(setting: str) -> list[str]:
    names = [n.strip() for n in setting.split("+") if n.strip()]
    if not names:
        raise InputError(f"empty task setting {setting!r}")
    return names


def setting_kind(setting: str) -> str:
    return "mixture" if len(parse_setting(setting)) > 1 else "single"


# --------------------------------------------------------------------------------------------------
# the smoke version's model, tokenizer and tasks
# --------------------------------------------------------------------------------------------------


class CharTokenizer:
    """A byte-level tokenizer for the tiny model: id = 3 + (byte mod (vocab − 3)); 1 BOS, 2 PAD/EOS.
    ``decode`` inverts it for ASCII text (ids 0–2 are special)."""

    def __init__(self, vocab_size: int = 128) -> None:
        self.vocab_size = vocab_size
        self.bos_token_id, self.eos_token_id, self.pad_token_id = 1, 2, 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + b % (self.vocab_size - 3) for b in text.encode("utf-8")]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        out = []
        for i in ids:
            if i >= 3:
                out.append(chr(i - 3))
            elif not skip_special_tokens:
                out.append(("<unk>", "<bos>", "<eos>")[i])
        return "".join(out)


def synthetic_task_dicts(n: int = 240, seed: int = 0) -> dict[str, dict]:
    """BIG-bench-style task dicts with distinct formats (so a mixture has something to route): two
    multiple-choice tasks (``parity``, ``compare``) and one scored on generated text (``successor``:
    the digit after a given one, with a ``target`` list)."""
    rng = random.Random(seed)
    parity, compare = [], []
    for _ in range(n):
        digits = [rng.randrange(10) for _ in range(4)]
        even = sum(digits) % 2 == 0
        parity.append({"input": " ".join(map(str, digits)), "target_scores": {"even": int(even), "odd": int(not even)}})
        a, b = rng.sample(range(10), 2)
        compare.append({"input": f"{a} or {b}, which is larger?", "target_scores": {"left": int(a > b), "right": int(b > a)}})
    # its own generator, so that parity and compare stay what they were before it was added
    rng = random.Random(seed + 1)
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    successor = []
    for _ in range(n):
        a = rng.randrange(9)
        successor.append({"input": f"after {a} comes", "target": [str(a + 1), words[a + 1]]})
    return {
        "parity": {"task_prefix": "Is the sum even?", "examples": parity, "append_choices_to_input": False},
        "compare": {"examples": compare, "example_input_prefix": "\nQuestion: ", "example_output_prefix": "\nAnswer: "},
        "successor": {"examples": successor},
    }


def _tiny_model(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1, pad_token_id=2, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def load_model(model: str = "smollm2"):
    """``(model, tokenizer)``: ``"smollm2"`` the real asset (float32, eval mode; fetched on first use),
    ``"tiny"`` the smoke version's random tiny LLaMA with :class:`CharTokenizer`."""
    if model == "tiny":
        return _tiny_model(), CharTokenizer(128)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moa_fx.eval.assets import smollm2_path

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tokenizer


def task_loader(data: str = "bigbench") -> Callable[[str], list[T.Example]]:
    """Task name → examples: ``"bigbench"`` reads the sdist (:func:`moa_fx.eval.tasks.load_task`),
    ``"synthetic"`` the smoke version's :func:`synthetic_task_dicts`."""
    if data == "synthetic":
        dicts = synthetic_task_dicts()

        def load(name: str) -> list[T.Example]:
            if name not in dicts:
                raise InputError(f"synthetic tasks are {sorted(dicts)}, not {name!r}")
            return T.examples_from_task_dict(dicts[name], name=name)

        return load
    return T.load_task


def _splits(cfg: EvalConfig, load, names: Sequence[str]) -> dict[str, tuple[list, list]]:
    out = {}
    for name in names:
        train, test = T.split_task(name, seed=cfg.split_seed, loader=load)
        out[name] = (train, test[: cfg.eval_examples])
    return out


# --------------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------------


def _training_stream(cfg: EvalConfig, load, names: Sequence[str], splits, seed: int) -> list[T.TaskExample]:
    """``steps × batch_size`` training examples in order: one task's training split reshuffled per
    epoch, or a mixture of equal shares of each task's training split."""
    need = cfg.steps * cfg.batch_size
    if len(names) == 1:
        pool = list(splits[names[0]][0])
    else:
        per_task = min(math.ceil(need / len(names)), min(len(splits[n][0]) for n in names))
        pool = T.mixture(names, per_task, seed, split_seed=cfg.split_seed, loader=load)
    rng = random.Random(seed)
    stream: list[T.TaskExample] = []
    while len(stream) < need:
        epoch = list(pool)
        rng.shuffle(epoch)
        stream.extend(epoch)
    return stream[:need]


@torch.no_grad()
def active_experts_per_layer(moa, tokenizer, examples: Sequence[T.TaskExample], max_len: int) -> dict[str, Any]:
    """Mean active experts per token, per layer, on held-out prompts + right answers.

    Sequences of equal length are batched together, so no padding token enters the statistics
    (the router statistics count every position). Within a layer the routers are averaged (AdaMoLE
    and top-k have one per projection, MoA one per block); ``experts`` is E per router.
    """
    if not examples:
        return {}
    groups: dict[int, list[list[int]]] = {}
    for example in examples:
        prompt, choice = T.answer_tokens(tokenizer, example, max_len)
        ids = prompt + choice
        groups.setdefault(len(ids), []).append(ids)
    was_training = moa.training
    moa.eval()
    sums: dict[int, float] = {}
    tokens = 0
    experts: set[int] = set()
    try:
        for length, rows in sorted(groups.items()):
            if length < 2:
                continue
            ids = torch.tensor(rows, dtype=torch.long)
            moa(input_ids=ids, attention_mask=torch.ones_like(ids))
            stats = moa.router_stats()
            if not stats:
                return {}
            by_layer: dict[int, list[float]] = {}
            for info in stats.values():
                by_layer.setdefault(-1 if info["layer"] is None else info["layer"], []).append(info["mean_active"])
                experts.add(len(info["experts"]))
            n = ids.numel()
            tokens += n
            for layer, values in by_layer.items():
                sums[layer] = sums.get(layer, 0.0) + n * sum(values) / len(values)
    finally:
        moa.train(was_training)
    per_layer = {str(layer): sums[layer] / tokens for layer in sorted(sums)}
    return {
        "per_layer": per_layer,
        "mean": sum(per_layer.values()) / len(per_layer),
        "experts": max(experts) if experts else None,
        "tokens": tokens,
    }


def _train_and_score(cfg: EvalConfig, base, tokenizer, load, method: str, setting: str, seed: int,
                     splits, log: Callable[[str], None]) -> dict[str, Any]:
    from moa_fx import transform

    names = parse_setting(setting)
    stream = _training_stream(cfg, load, names, splits, seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    moa = transform(base, budget_spec(method))
    transform_s = time.perf_counter() - t0
    trainable, total = moa.trainable_parameter_count()
    optimizer = make_optimizer(moa, cfg.lr)
    moa.train()
    schedule = Schedule(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, max_grad_norm=cfg.max_grad_norm)

    def batch_at(step: int) -> Batch:
        rows = stream[(step - 1) * cfg.batch_size: step * cfg.batch_size]
        return Batch(**T.encode_for_training(tokenizer, rows, cfg.max_len))

    def log_step(report: StepReport) -> None:
        if report.step == 1 or report.step % max(1, cfg.steps // 5) == 0 or report.step == cfg.steps:
            log(f"  {method} {setting} seed {seed}: step {report.step}/{cfg.steps} loss {report.loss:.4f} "
                f"({report.seconds:.2f} s/step)")

    t_train = time.perf_counter()
    reports = fit(moa, optimizer, schedule, batch_at, on_step=log_step)
    train_s = time.perf_counter() - t_train
    losses, step_times = [r.loss for r in reports], [r.seconds for r in reports]
    t_eval = time.perf_counter()
    accuracy, first_choice = {}, {}
    for name in names:
        test = splits[name][1]
        predictions = T.predict(moa, tokenizer, test, batch_size=16, max_len=cfg.max_len)
        accuracy[name] = T.accuracy(predictions, test)
        share = T.first_choice_share(predictions, test)  # 0 or 1: one label for everything
        if share is not None:  # a free-text task has no listed choices
            first_choice[name] = share
    eval_s = time.perf_counter() - t_eval
    active_pool = [e for name in names for e in splits[name][1][: max(1, cfg.active_examples // len(names))]]
    active = active_experts_per_layer(moa, tokenizer, active_pool, cfg.max_len)
    timed = step_times[1:] or step_times  # the first step pays one-off allocation costs
    return {
        "method": method, "setting": setting, "kind": setting_kind(setting), "seed": seed,
        "accuracy": accuracy, "mean_accuracy": sum(accuracy.values()) / len(accuracy),
        "first_choice_share": first_choice,
        "trainable": trainable, "total": total,
        "step_time_median_s": statistics.median(timed), "step_time_mean_s": sum(timed) / len(timed),
        "transform_s": transform_s, "train_s": train_s, "eval_s": eval_s,
        "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]), "losses": losses,
        "active": active, "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def _zero_shot(cfg: EvalConfig, base, tokenizer, splits) -> dict[str, Any]:
    t = time.perf_counter()
    accuracy, chance = {}, {}
    for name, (_, test) in splits.items():
        # the base model's own forward (multiple choice) and generate (generated answers)
        predictions = T.predict(base, tokenizer, test, batch_size=16, max_len=cfg.max_len)
        accuracy[name] = T.accuracy(predictions, test)
        chance[name] = T.chance(test)
    return {"accuracy": accuracy, "chance": chance, "eval_s": time.perf_counter() - t,
            "test_sizes": {name: len(test) for name, (_, test) in splits.items()},
            "train_sizes": {name: len(train) for name, (train, _) in splits.items()},
            "peak_rss_mb": _peak_rss_mb()}


def _job(cfg_dict: dict, job: dict) -> dict[str, Any]:
    """One unit of work (zero-shot, or one method on one setting with one seed); runs in its own
    process when ``isolate`` is set, so ``peak_rss_mb`` covers this job alone."""
    cfg = EvalConfig(**cfg_dict)
    torch.set_num_threads(cfg.threads)
    log = _printer(job.get("log"))
    load = task_loader(cfg.data)
    names = sorted({n for s in cfg.settings for n in parse_setting(s)})
    splits = _splits(cfg, load, names)
    t = time.perf_counter()
    base, tokenizer = load_model(cfg.model)
    for p in base.parameters():
        p.requires_grad_(False)
    load_s = time.perf_counter() - t
    rss_loaded = _peak_rss_mb()
    if job["kind"] == "zero_shot":
        out = _zero_shot(cfg, base, tokenizer, splits)
        out.update(load_s=load_s, rss_after_load_mb=rss_loaded)
        log(f"zero-shot: {out['accuracy']} ({out['eval_s']:.0f} s)")
        return out
    runs = []
    for seed in [job["seed"]] if "seed" in job else cfg.seeds:
        run = _train_and_score(cfg, base, tokenizer, load, job["method"], job["setting"], seed, splits, log)
        run["rss_after_load_mb"] = rss_loaded
        run["isolated"] = cfg.isolate
        log(f"{job['method']} {job['setting']} seed {seed}: accuracy {run['accuracy']} "
            f"trainable {run['trainable']:,} median step {run['step_time_median_s']:.2f} s "
            f"train {run['train_s']:.0f} s eval {run['eval_s']:.0f} s peak RSS {run['peak_rss_mb']:.0f} MB")
        runs.append(run)
    return {"runs": runs}


def _printer(path: str | None) -> Callable[[str], None]:
    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    return log


# --------------------------------------------------------------------------------------------------
# the whole report
# --------------------------------------------------------------------------------------------------


def run_evaluation(cfg: EvalConfig, *, log_path: str | None = None, partial_path: str | pathlib.Path | None = None,
                   command: str | None = None) -> dict[str, Any]:
    """Zero-shot, then every (method, setting) with every seed; returns the JSON-able results.

    ``partial_path``: the results so far are rewritten there after each job (a long run can be
    inspected, and a crash loses at most one job).
    """
    log = _printer(log_path)
    cfg_dict = dataclasses.asdict(cfg)
    # seed-major order: after the first pass every method has a result, so a run cut short still
    # compares every method (the partial file is rewritten after each job)
    jobs = [{"kind": "zero_shot"}] + [{"kind": "train", "method": m, "setting": s, "seed": seed}
                                      for seed in cfg.seeds for s in cfg.settings for m in cfg.methods]
    results: dict[str, Any] = {
        "config": cfg_dict, "command": command, "budget_changes": {m: BUDGET_CHANGES[m] for m in cfg.methods},
        "machine": _machine(cfg), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": [], "failures": [],
    }
    t0 = time.perf_counter()
    log(f"evaluation: {len(cfg.methods)} methods x {len(cfg.settings)} settings x {len(cfg.seeds)} seeds, "
        f"{cfg.steps} steps of batch {cfg.batch_size}, isolate={cfg.isolate}")
    if cfg.isolate:
        import concurrent.futures
        import multiprocessing

        def submit(job: dict) -> dict:
            # a fresh process per job: its peak RSS is its own, and nothing leaks between methods
            with concurrent.futures.ProcessPoolExecutor(max_workers=1,
                                                        mp_context=multiprocessing.get_context("spawn")) as pool:
                return pool.submit(_job, cfg_dict, {**job, "log": log_path}).result()
    else:
        def submit(job: dict) -> dict:
            return _job(cfg_dict, {**job, "log": log_path})
    for job in jobs:
        try:
            out = submit(job)
        except Exception as err:  # one failing method must not lose the others' results
            if not cfg.isolate and job["kind"] == "zero_shot":
                raise
            log(f"FAILED {job}: {type(err).__name__}: {err}")
            results["failures"].append({**job, "error": f"{type(err).__name__}: {err}"})
            continue
        if job["kind"] == "zero_shot":
            results["zero_shot"] = out
        else:
            results["runs"].extend(out["runs"])
        results["wall_s"] = time.perf_counter() - t0
        if partial_path is not None:
            atomic_write_json(pathlib.Path(partial_path), results)
    results["wall_s"] = time.perf_counter() - t0
    results["summary"] = summarize(results)
    log(f"evaluation done in {results['wall_s'] / 60:.1f} min")
    return results


def _machine(cfg: EvalConfig) -> dict[str, Any]:
    import transformers

    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count(), "threads": cfg.threads,
            "processor": platform.processor() or platform.machine(), "loadavg_at_start": load}


# --------------------------------------------------------------------------------------------------
# tables and charts
# --------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("setting", "method", "accuracy (mean ± std)", "Δ vs zero-shot", "chance", "zero-shot",
                 "trainable params", "step time (s)", "peak RSS (MB)", "active experts / token")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (setting, method) aggregated over seeds, plus a zero-shot row per setting."""
    cfg = results["config"]
    zero = results.get("zero_shot", {})
    rows = []
    for setting in cfg["settings"]:
        names = parse_setting(setting)
        zs = [zero["accuracy"][n] for n in names] if zero else []
        chance = sum(zero["chance"][n] for n in names) / len(names) if zero else None
        zero_acc = sum(zs) / len(zs) if zs else None
        rows.append({"setting": setting, "method": "zero-shot (base model)", "seeds": 0, "accuracy_mean": zero_acc,
                     "accuracy_std": None, "per_task": {n: (zero["accuracy"][n], None) for n in names} if zero else {},
                     "chance": chance, "zero_shot": zero_acc, "trainable": 0, "step_time_s": None,
                     "peak_rss_mb": zero.get("peak_rss_mb"), "active_mean": None, "experts": None,
                     "active_per_layer": None})
        for method in cfg["methods"]:
            runs = [r for r in results["runs"] if r["method"] == method and r["setting"] == setting]
            if not runs:
                continue
            mean, std = _mean_std([r["mean_accuracy"] for r in runs])
            per_task = {n: _mean_std([r["accuracy"][n] for r in runs]) for n in names}
            active = [r["active"] for r in runs if r.get("active")]
            per_layer = None
            if active:
                layers = active[0]["per_layer"].keys()
                per_layer = {k: sum(a["per_layer"][k] for a in active) / len(active) for k in layers}
            rows.append({
                "setting": setting, "method": method, "seeds": len(runs), "accuracy_mean": mean, "accuracy_std": std,
                "per_task": per_task, "chance": chance, "zero_shot": zero_acc,
                "trainable": runs[0]["trainable"],
                "step_time_s": sum(r["step_time_median_s"] for r in runs) / len(runs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "active_mean": sum(a["mean"] for a in active) / len(active) if active else None,
                "experts": active[0]["experts"] if active else None,
                "active_per_layer": per_layer,
                "loss_first": sum(r["loss_first"] for r in runs) / len(runs),
                "loss_last10": sum(r["loss_last10"] for r in runs) / len(runs),
            })
    return rows


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def _table_cells(row: dict[str, Any]) -> list[str]:
    acc = _fmt(row["accuracy_mean"])
    if row["accuracy_std"] is not None:
        acc += f" ± {row['accuracy_std']:.3f} (n={row['seeds']})"
    delta = None
    if row["method"] != "zero-shot (base model)" and row["zero_shot"] is not None and row["accuracy_mean"] is not None:
        delta = row["accuracy_mean"] - row["zero_shot"]
    active = "—"
    if row["active_mean"] is not None:
        active = f"{row['active_mean']:.2f} of {row['experts']}"
    return [row["setting"], row["method"], acc, "—" if delta is None else f"{delta:+.3f}", _fmt(row["chance"], ".2f"),
            _fmt(row["zero_shot"]), f"{row['trainable']:,}" if row["trainable"] else "0",
            _fmt(row["step_time_s"], ".2f"), _fmt(row["peak_rss_mb"], ".0f"), active]


def markdown_report(results: dict[str, Any]) -> str:
    """The Markdown tables: the main table, per-task accuracies of mixture settings, budgets, setup."""
    rows = results.get("summary") or summarize(results)
    cfg = results["config"]
    out = ["## Results", "",
           "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    out += ["| " + " | ".join(_table_cells(row)) + " |" for row in rows]
    out += ["",
            f"Accuracy: held-out, multiple choice by choice likelihood, free-text tasks by exact match of the "
            f"greedy answer's first line (chance 0), mean ± sample std over seeds {list(cfg['seeds'])}; a mixture's "
            "accuracy is the mean of its tasks'. Step time: median wall time of one training step "
            "(forward + backward + AdamW), averaged over seeds. Peak RSS: `resource.getrusage` maximum resident "
            "set of the process that ran the run (max over seeds)"
            + (" (one fresh process per method, setting and seed; the loaded base model included)" if cfg["isolate"] else
               " (one process for everything: cumulative, not per method)")
            + ". Active experts / token: mean over layers (and over a layer's routers) of the experts selected "
            "per token, on held-out prompts + answers without padding, out of E per router.", ""]
    mixtures = [s for s in cfg["settings"] if len(parse_setting(s)) > 1]
    for setting in mixtures:
        names = parse_setting(setting)
        out += [f"### Per-task accuracy, mixture `{setting}`", "",
                "| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for row in rows:
            if row["setting"] != setting:
                continue
            cells = []
            for n in names:
                mean, std = row["per_task"].get(n, (None, None))
                cells.append(_fmt(mean) + ("" if std is None else f" ± {std:.3f}"))
            out.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        zero = results.get("zero_shot")
        if zero:
            out.append("| chance | " + " | ".join(f"{zero['chance'][n]:.2f}" for n in names) + " |")
        out.append("")
    out += ["### Parameter budgets", "", "| method | trainable params | change from the preset |", "|---|---|---|"]
    seen = set()
    for row in rows:
        if row["method"] in cfg["methods"] and row["method"] not in seen:
            seen.add(row["method"])
            out.append(f"| {row['method']} | {row['trainable']:,} | {BUDGET_CHANGES[row['method']]} |")
    out.append("")
    chart = terminal_chart(results, width=30, plain=True)
    if chart:
        out += ["### Active experts per token, per layer", "", "```", chart.rstrip(), "```", ""]
    zero = results.get("zero_shot")
    if zero:
        out += ["### Data", "", "| task | train examples | test examples scored | chance | zero-shot |",
                "|---|---|---|---|---|"]
        for n in zero["accuracy"]:
            out.append(f"| {n} | {zero['train_sizes'][n]} | {zero['test_sizes'][n]} | {zero['chance'][n]:.2f} | "
                       f"{zero['accuracy'][n]:.3f} |")
        out.append("")
    runs = [r for r in results.get("runs", []) if r.get("first_choice_share")]
    if runs:
        # a run that answers (almost) everything with one label has learned the label prior only
        out += ["### Which label each run picks", "",
                "Share of held-out predictions that pick the first listed choice (0 or 1: one label for "
                "everything), and the training loss on the answer tokens (first step → mean of the last 10).",
                "", "| method | setting | seed | first-choice share | training loss |", "|---|---|---|---|---|"]
        for r in runs:
            share = ", ".join(f"{k}: {v:.2f}" for k, v in r["first_choice_share"].items())
            out.append(f"| {r['method']} | {r['setting']} | {r['seed']} | {share} | "
                       f"{r['loss_first']:.2f} → {r['loss_last10']:.2f} |")
        out.append("")
    if results.get("failures"):
        out += ["### Failures", ""] + [f"- {f}" for f in results["failures"]] + [""]
    out += ["### Setup", "", "```json", json.dumps({k: v for k, v in cfg.items()}, indent=1), "```", ""]
    return "\n".join(out)


CHART_METHODS = ("adamole", "sparse_moa")


def _chart_series(results: dict[str, Any]) -> list[tuple[str, int, dict[str, float]]]:
    rows = results.get("summary") or summarize(results)
    series = []
    for row in rows:
        if row["method"] in CHART_METHODS and row.get("active_per_layer"):
            series.append((f"{row['method']} · {row['setting']}", row["experts"], row["active_per_layer"]))
    return series


def terminal_chart(results: dict[str, Any], *, width: int = 40, plain: bool = False) -> str:
    """Horizontal bars of the mean active experts per token, per layer, for adamole and sparse_moa
    (one block per method and setting). ``plain`` gives text only; otherwise it is rendered with
    rich (a dependency already) and returned as plain text too."""
    lines = []
    for title, experts, per_layer in _chart_series(results):
        lines.append(f"{title}: active experts per token per layer (bar full = all {experts})")
        for layer, value in per_layer.items():
            filled = value / experts * width if experts else 0
            full = int(filled)
            bar = "█" * full + ("▌" if filled - full >= 0.5 else "")
            lines.append(f"  layer {int(layer):>2} │{bar:<{width}}│ {value:.2f}")
        lines.append("")
    text = "\n".join(lines)
    if text and not plain:
        from rich.console import Console

        Console().print(text, highlight=False, markup=False)
    return text


def _png_chart(results: dict[str, Any], path: pathlib.Path) -> pathlib.Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    series = _chart_series(results)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    for title, experts, per_layer in series:
        layers = [int(k) for k in per_layer]
        ax.plot(layers, [v / experts for v in per_layer.values()], marker="o", label=f"{title} (E={experts})")
    ax.set_xlabel("layer")
    ax.set_ylabel("active experts per token / E")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out: str | os.PathLike) -> dict[str, pathlib.Path]:
    """``results.json``, ``results.md``, ``active_experts.txt`` and, if matplotlib is installed,
    ``active_experts.png`` in ``out``."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if "summary" not in results:
        results["summary"] = summarize(results)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    atomic_write_json(paths["json"], results)
    paths["markdown"].write_text(markdown_report(results), encoding="utf-8")
    chart = terminal_chart(results, plain=True)
    if chart:
        paths["chart"] = out / "active_experts.txt"
        paths["chart"].write_text(chart, encoding="utf-8")
    png = _png_chart(results, out / "active_experts.png")
    if png:
        paths["png"] = png
    return paths
