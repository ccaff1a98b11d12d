"""Fine-tune and compare moa-fx methods on BIG-bench tasks (the "real use" evaluation).

Map:

- :data:`METHODS` / :func:`budget_spec` -- the compared methods, with the preset changes that put
  them at a comparable trainable-parameter budget (:data:`BUDGET_CHANGES` says what changed).
- :class:`EvalConfig` -- what a results file holds: methods, settings (one task, or a mixture written
  ``a+b+c``), seeds, the recipe (steps, batch, learning rate per method, clipping), the protocol
  (prompt budget, split scored, examples), the learning curve, device and threads. With ``sweep_lrs``
  every (method, setting, seed) runs at each of those learning rates (the recipe sweep, scored on the
  validation split); :func:`moa_fx.eval.report.best_lrs` picks each method's from it.
- :func:`run_evaluation` -- resumable: zero-shot scores per task, then one fine-tuning run per
  (method, setting, seed, lr) not yet in the results file, which is rewritten atomically after each
  job; a progress bar (or, without a terminal, a line per job with the time left). With ``isolate``
  every run is a fresh process, so its peak RSS (``resource.getrusage``) is its own; ``workers`` runs
  that many at once (each with ``threads`` threads), recorded as each finishes.
- :func:`synthetic_task_dicts`, :class:`CharTokenizer`, :func:`quick_config` -- the smoke version
  (tiny random LLaMA, synthetic BIG-bench-style task dicts): no assets, no network.
- Tables, significance and charts: :mod:`moa_fx.eval.report`.

Protocol (:mod:`moa_fx.eval.protocol`, the task survey's): prompts over ``max_prompt_tokens`` are
dropped, each task is split once (``split_seed``) into train / validation / test, and the first
``eval_examples`` of the scored split (``split``: ``"test"``, or ``"val"`` for a recipe sweep) are
scored by :func:`moa_fx.eval.tasks.predict` -- multiple choice by the summed log-likelihood of each
choice, a free-text task by exact match of the greedy answer's first line -- for the untouched base
model (zero-shot) and after fine-tuning on the training split with the loss on the answer tokens, by
the training loop of ``moa-fx train`` (:func:`moa_fx.train.fit`: AdamW, warmup + cosine, gradients
clipped to ``max_grad_norm``), the LM head applied only at the answer positions
(:class:`moa_fx.train.AnswerOnlyLoss`: the model's own loss, about a fifth less work per step).
Every ``curve_every`` steps the first ``curve_examples`` validation examples are scored (the learning
curve; never the test split). A mixture setting trains on a shuffled mix of equal shares of its tasks'
training splits and reports the macro mean of its tasks' accuracies. Every run stores which scored
examples it got right, for the paired bootstrap. Every ``save_every`` steps a run's state is saved
beside the results file (:mod:`moa_fx.eval.partial`), so a run cut off resumes at that step with the
result an uninterrupted run gets.
"""

from __future__ import annotations

import contextlib
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
from moa_fx.eval import protocol
from moa_fx.eval import tasks as T
from moa_fx.eval.experts import active_experts_per_layer
from moa_fx.eval.partial import load_partial, partial_path, save_partial
from moa_fx.fileio import atomic_write_json
from moa_fx.spec import LoraExpert, Spec, presets
from moa_fx.train import AnswerOnlyLoss, Schedule, StepReport, fit, make_optimizer

__all__ = [
    "METHODS",
    "VARIANTS",
    "BUDGET_CHANGES",
    "TASKS",
    "budget_spec",
    "EvalConfig",
    "quick_config",
    "parse_setting",
    "setting_kind",
    "run_key",
    "run_evaluation",
    "load_results",
    "synthetic_task_dicts",
    "CharTokenizer",
    "load_model",
    "task_loader",
]

METHODS = ("lora", "mole_topk", "adamole", "hydralora", "soft_moa", "sparse_moa")
# Variants a run can ask for by name (``--methods``), not in the default set: no paper's method.
# sparse_moa_tau: Sparse MoA with the τ-subtracting rule (w = (g − τ)·sel, METHODS.md's "welcome as an
# option"), so that its threshold gets a gradient; under the official rule τ stays at its init.
VARIANTS = ("sparse_moa_tau",)

# The tasks of the evaluation: those where the survey's LoRA pilot (EVALUATION.md, "Task survey") rose at
# least 15 points above zero-shot within 200 steps (hyperbaton +51.5, logical fallacies +33.5, multiemo +28,
# navigate +23.5, plural +95, past tense +94): four multiple choice, then two scored on generated text.
TASKS = ("hyperbaton", "logical_fallacy_detection", "multiemo/all_sentence_en", "navigate",
         "linguistic_mappings/plural_json", "linguistic_mappings/past_tense_json")

# What each method's spec changes from its preset (moa_fx/spec/presets.py) so that every method holds a
# comparable number of trainable parameters (SmolLM2-135M: LoRA r=16 ≈ 2.9M, soft MoA ≈ 3.1M, Sparse
# MoA ≈ 2.9M, top-k MoLE ≈ 3.3M, AdaMoLE ≈ 2.2M, HydraLoRA ≈ 2.3M; the exact counts are measured and reported).
BUDGET_CHANGES = {
    "lora": "r 8 → 16, α 8 → 16 (scale α/r = 1 kept)",
    "mole_topk": "8 → 4 experts per site, r 8 → 4, α 8 → 4 (scale 1 kept); top-2, biased softmax router, aux 1e-3",
    "adamole": "8 → 4 experts per site (so τ_max = 1/E = 0.25), r = 4, α = 16, dropout 0.05, aux 1e-3 as the preset",
    "hydralora": "shared A r 4 → 8, α 32 → 64 (scale 8 kept); 4 heads B, dense softmax router, dropout 0.05",
    "soft_moa": "preset unchanged (LoRA r 8 on q,k,v,o,down + parallel adapter 16 + prompt L 10, SwiGLU router)",
    "sparse_moa": "preset unchanged (LoRA r 8 on q,k,v,o,down + parallel adapter 16, learned τ, τ_max 0.5)",
    "sparse_moa_tau": "sparse_moa with router.threshold.rule = adamole (w = (g − τ)·sel: τ learns); a variant",
}


def budget_spec(method: str) -> Spec:
    """The spec used for ``method`` in this evaluation (its preset, resized per :data:`BUDGET_CHANGES`)."""
    if method == "sparse_moa_tau":
        spec = presets.get("sparse_moa")
        threshold = dataclasses.replace(spec.router.threshold, rule="adamole")
        return dataclasses.replace(spec, router=dataclasses.replace(spec.router, threshold=threshold), name=method)
    spec = presets.get(method)
    if method == "lora":
        spec = dataclasses.replace(spec, experts=(LoraExpert(at=presets.QKVOD, r=16, alpha=16),))
    elif method == "mole_topk":
        spec = dataclasses.replace(spec, experts=(LoraExpert(at=presets.QKVOD, r=4, alpha=4, count=4),))
    elif method == "adamole":
        (expert,) = spec.experts
        spec = dataclasses.replace(spec, experts=(dataclasses.replace(expert, count=4),))
        assert spec.router.threshold.max is None  # τ_max follows E: 1/4
    elif method == "hydralora":
        (expert,) = spec.experts
        spec = dataclasses.replace(spec, experts=(dataclasses.replace(expert, r=2 * expert.r, alpha=2 * expert.alpha),))
    return dataclasses.replace(spec, name=method)


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalConfig:
    """One results file. ``settings`` entries are a task name (trained and scored alone) or ``a+b+c``
    (trained on the mixture, scored on each of its tasks). A run's learning rate is ``lrs[method]``
    (a recipe, e.g. from a sweep) or ``lr``; with ``sweep_lrs`` each run is repeated at each of them.
    The defaults are the full evaluation of EVALUATION.md (hours on a CPU; minutes on a GPU)."""

    methods: tuple[str, ...] = METHODS
    settings: tuple[str, ...] = TASKS + ("+".join(TASKS),)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    lrs: dict[str, float] = dataclasses.field(default_factory=dict)
    sweep_lrs: tuple[float, ...] = ()
    warmup: int | None = None  # default: 10% of a run's steps
    # "per_task": a mixture of n tasks trains n × steps, so each task gets the examples it gets alone (the
    # same budget per task); "same": every setting trains `steps` (each of n tasks then sees 1/n of them)
    mixture_budget: str = "per_task"
    max_grad_norm: float = 1.0  # 0: no clipping
    max_prompt_tokens: int = 96  # longer prompts are dropped (and counted), as in the survey
    eval_examples: int = 200
    split: str = "test"  # the split scored: "test", or "val" for a recipe sweep
    curve_every: int = 50  # score the validation subset every this many steps (0: no learning curve)
    curve_examples: int = 64
    threads: int = 2  # the cores really free: on a shared CPU one thread is often faster (ASSETS.md, section 1)
    workers: int = 1  # jobs run at once, each a fresh process with `threads` threads (> 1 needs isolate)
    split_seed: int = 0
    isolate: bool = True
    active_examples: int = 48  # held-out examples (prompt + right answer, no padding) for the routing stats
    model: str = "smollm2"  # "smollm2" (the real asset) or "tiny" (random tiny LLaMA, quick version)
    data: str = "bigbench"  # "bigbench" (the real asset) or "synthetic" (quick version)
    device: str = "auto"  # "auto": CUDA when available, else CPU
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    save_every: int = 100  # save a run's state every this many steps, to resume a cut-off run there (0: never)

    # the fields a run's result depends on besides its (method, setting, seed, lr): a results file holds one
    RUN_FIELDS = ("steps", "batch_size", "warmup", "mixture_budget", "max_grad_norm", "max_prompt_tokens",
                  "eval_examples", "split", "curve_every", "curve_examples", "split_seed", "active_examples", "model",
                  "data")

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.settings = tuple(self.settings)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.sweep_lrs = tuple(float(x) for x in self.sweep_lrs)
        self.lrs = {str(k): float(v) for k, v in dict(self.lrs).items()}
        for m in (*self.methods, *self.lrs):
            if m not in METHODS + VARIANTS:
                raise InputError(f"unknown method {m!r}; choose from {', '.join(METHODS + VARIANTS)}")
        if not self.methods or not self.settings or not self.seeds:
            raise InputError("give at least one method, one task setting and one seed")
        for name in ("steps", "batch_size", "max_prompt_tokens", "eval_examples", "curve_examples", "threads",
                     "workers"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} = {getattr(self, name)} must be >= 1")
        if self.workers > 1 and not self.isolate:
            raise InputError(f"workers = {self.workers} runs each job in its own process; it needs isolate "
                             "(drop --no-isolate, or give --workers 1)")
        if self.curve_every < 0 or self.save_every < 0:
            raise InputError(f"curve_every = {self.curve_every} and save_every = {self.save_every} must be >= 0 "
                             "(0: no learning curve; never save a run's state)")
        if not all(x > 0 for x in (self.lr, *self.lrs.values(), *self.sweep_lrs)):
            raise InputError("every learning rate must be > 0")
        if not self.max_grad_norm >= 0:
            raise InputError(f"max_grad_norm = {self.max_grad_norm} must be >= 0 (0: no clipping)")
        if self.mixture_budget not in ("per_task", "same"):
            raise InputError(f"mixture_budget = {self.mixture_budget!r} must be 'per_task' (a mixture of n tasks "
                             "trains n × steps) or 'same' (every setting trains steps)")
        if self.warmup is not None and self.warmup < 0:
            raise InputError(f"warmup = {self.warmup} must be >= 0 (or unset: 10% of a run's steps)")
        if self.split not in ("test", "val"):
            raise InputError(f"split = {self.split!r} must be 'test' or 'val' (a recipe sweep)")
        if self.model not in ("smollm2", "tiny") or self.data not in ("bigbench", "synthetic"):
            raise InputError("model must be 'smollm2' or 'tiny', data 'bigbench' or 'synthetic'")
        if self.device not in ("auto", "cpu", "cuda") or self.precision not in ("auto", "fp32", "bf16"):
            raise InputError("device must be 'auto', 'cpu' or 'cuda'; precision 'auto', 'fp32' or 'bf16'")
        for setting in self.settings:
            parse_setting(setting)

    def run_steps(self, setting: str) -> int:
        """The training steps of a run on ``setting``: ``steps``, times the number of tasks of a mixture
        under ``mixture_budget = "per_task"``."""
        return self.steps * (len(parse_setting(setting)) if self.mixture_budget == "per_task" else 1)

    def run_warmup(self, steps: int) -> int:
        return self.warmup if self.warmup is not None else max(1, steps // 10)

    def run_lrs(self, method: str) -> tuple[float, ...]:
        """The learning rates ``method`` runs at."""
        return self.sweep_lrs or (self.lrs.get(method, self.lr),)

    def jobs(self) -> list[dict[str, Any]]:
        """Every run, seed-major (after the first pass every method has a result, so a run stopped
        early still compares every method)."""
        return [{"method": m, "setting": s, "seed": seed, "lr": lr}
                for seed in self.seeds for s in self.settings for m in self.methods for lr in self.run_lrs(m)]

    def task_names(self) -> list[str]:
        return sorted({n for s in self.settings for n in parse_setting(s)})


def quick_config(**overrides: Any) -> EvalConfig:
    """The smoke version: tiny random LLaMA, three synthetic tasks and a mixture, every method, ~1 minute."""
    base = dict(settings=("parity", "parity+compare+successor"), seeds=(0, 1), steps=6, batch_size=8, lr=5e-3,
                warmup=1, max_prompt_tokens=128, eval_examples=24, curve_every=3, curve_examples=12, threads=1,
                isolate=False, active_examples=16, model="tiny", data="synthetic", device="cpu")
    base.update(overrides)
    return EvalConfig(**base)


def parse_setting(setting: str) -> list[str]:
    names = [n.strip() for n in setting.split("+") if n.strip()]
    if not names:
        raise InputError(f"empty task setting {setting!r}")
    return names


def setting_kind(setting: str) -> str:
    return "mixture" if len(parse_setting(setting)) > 1 else "single"


def run_key(run: dict[str, Any]) -> tuple[str, str, int, float]:
    """What identifies a run in a results file."""
    return run["method"], run["setting"], int(run["seed"]), float(run["lr"])


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


# --------------------------------------------------------------------------------------------------
# data, device
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Task:
    """One task as a run sees it: training split, scored examples, learning-curve examples."""

    train: list[T.Example]
    scored: list[T.Example]
    curve: list[T.Example]
    info: dict[str, Any]


def _tasks(cfg: EvalConfig, tokenizer, names: Sequence[str]) -> dict[str, _Task]:
    load = task_loader(cfg.data)
    out = {}
    for name in names:
        data = protocol.task_data(name, load(name), tokenizer, max_prompt_tokens=cfg.max_prompt_tokens,
                                  max_examples=cfg.eval_examples, split_seed=cfg.split_seed)
        scored = data.test if cfg.split == "test" else data.val[: cfg.eval_examples]
        out[name] = _Task(train=data.train, scored=scored, curve=data.val[: cfg.curve_examples], info=data.info)
    return out


def _max_len(cfg: EvalConfig, tasks: dict[str, _Task]) -> int:
    # room for every kept prompt and the longest answer: nothing is cut
    return cfg.max_prompt_tokens + max(t.info["answer_tokens_max"] for t in tasks.values())


def _device(cfg: EvalConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device = 'cuda' but torch.cuda.is_available() is False; use device 'auto' or 'cpu'")
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def _autocast(cfg: EvalConfig, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


# sequences per scoring forward: on CPU 16 already keeps the GEMMs efficient; a GPU wants more rows
SCORE_BATCH = {"cpu": 16, "cuda": 64}


def _score(model, tokenizer, examples: Sequence[T.Example], max_len: int, autocast) -> tuple[float, list[int], Any]:
    device = next(model.parameters()).device.type
    with autocast():
        predictions = T.predict(model, tokenizer, examples, batch_size=SCORE_BATCH.get(device, 16), max_len=max_len)
    correct = [int(T.is_correct(p, e)) for p, e in zip(predictions, examples)]
    return sum(correct) / len(correct), correct, predictions


# --------------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------------


def _training_stream(cfg: EvalConfig, tasks: dict[str, _Task], names: Sequence[str], seed: int,
                     steps: int) -> list[T.Example]:
    """``steps × batch_size`` training examples in order: one task's training split reshuffled per
    epoch, or a mixture of equal shares of each task's training split."""
    need = steps * cfg.batch_size
    rng = random.Random(seed)
    if len(names) == 1:
        pool = list(tasks[names[0]].train)
    else:
        per_task = min(math.ceil(need / len(names)), min(len(tasks[n].train) for n in names))
        pool = [e for n in names for e in rng.sample(tasks[n].train, per_task)]
    stream: list[T.Example] = []
    while len(stream) < need:
        epoch = list(pool)
        rng.shuffle(epoch)
        stream.extend(epoch)
    return stream[:need]


def _train_and_score(cfg: EvalConfig, base, tokenizer, job: dict[str, Any], tasks: dict[str, _Task],
                     device: torch.device, log: Callable[[str], None], partial: str | None = None) -> dict[str, Any]:
    from moa_fx import transform

    method, setting, seed, lr = job["method"], job["setting"], job["seed"], job["lr"]
    names = parse_setting(setting)
    max_len = _max_len(cfg, {n: tasks[n] for n in names})
    steps = cfg.run_steps(setting)
    curve_every = cfg.curve_every * (steps // cfg.steps)  # a mixture's curve has a single task's points
    stream = _training_stream(cfg, tasks, names, seed, steps)
    autocast = _autocast(cfg, device)
    loadavg = os.getloadavg()  # step times compare only on an equally loaded machine
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    moa = transform(base, budget_spec(method))
    transform_s = time.perf_counter() - t0
    trainable, total = moa.trainable_parameter_count()
    optimizer = make_optimizer(moa, lr)
    moa.train()
    schedule = Schedule(steps=steps, lr=lr, warmup=cfg.run_warmup(steps), max_grad_norm=cfg.max_grad_norm)
    key = {**job, **{f: getattr(cfg, f) for f in cfg.RUN_FIELDS}}
    path = pathlib.Path(partial) if partial else None
    start, done = load_partial(path, key, moa.adapters, optimizer, log) if path else (0, {})
    curve: list[dict[str, Any]] = done.get("curve", [])
    active_pool = [e for n in names for e in tasks[n].scored[: max(1, cfg.active_examples // len(names))]]
    active_start = done.get("active_start")
    if start == 0:  # the routers before training: where the experts per token, gates and τ start from
        with torch.random.fork_rng(devices=[]):  # the training draws the same numbers as without it
            active_start = active_experts_per_layer(moa, tokenizer, active_pool, max_len)

    def batch_at(step: int) -> Batch:
        rows = stream[(step - 1) * cfg.batch_size: step * cfg.batch_size]
        return Batch(**{k: v.to(device) for k, v in T.encode_for_training(tokenizer, rows, max_len).items()})

    def on_step(report: StepReport) -> None:
        if report.step == 1 or report.step % max(1, steps // 5) == 0 or report.step == steps:
            log(f"  {method} {setting} seed {seed} lr {lr:g}: step {report.step}/{steps} loss {report.loss:.4f} "
                f"({report.seconds:.2f} s/step)")
        if curve_every and (report.step % curve_every == 0 or report.step == steps):
            point = {n: _score(moa, tokenizer, tasks[n].curve, max_len, autocast)[0] for n in names if tasks[n].curve}
            curve.append({"step": report.step, "accuracy": point,
                          "mean": sum(point.values()) / len(point) if point else None})

    t_train = time.perf_counter()
    losses, step_times = done.get("losses", []), done.get("step_times", [])
    every = cfg.save_every if path else steps
    for first in range(start, steps, every or steps):  # in pieces of save_every steps, the state saved after each
        stop = min(steps, first + (every or steps))
        reports = fit(AnswerOnlyLoss(moa), optimizer, schedule, batch_at, start=first, stop=stop, autocast=autocast,
                      on_step=on_step)
        losses, step_times = losses + [r.loss for r in reports], step_times + [r.seconds for r in reports]
        if path and every and stop < steps:
            save_partial(path, key, stop, moa.adapters, optimizer,
                         {"losses": losses, "step_times": step_times, "curve": curve, "active_start": active_start,
                          "train_s": done.get("train_s", 0.0) + time.perf_counter() - t_train})
    train_s = done.get("train_s", 0.0) + time.perf_counter() - t_train
    t_eval = time.perf_counter()
    accuracy, correct, first_choice = {}, {}, {}
    for name in names:
        accuracy[name], correct[name], predictions = _score(moa, tokenizer, tasks[name].scored, max_len, autocast)
        share = T.first_choice_share(predictions, tasks[name].scored)  # 0 or 1: one label for everything
        if share is not None:  # a free-text task has no listed choices
            first_choice[name] = share
    eval_s = time.perf_counter() - t_eval
    active = active_experts_per_layer(moa, tokenizer, active_pool, max_len)
    timed = step_times[1:] or step_times  # the first step pays one-off allocation costs
    return {
        **job, "kind": setting_kind(setting), "steps": steps, "accuracy": accuracy, "correct": correct,
        "mean_accuracy": sum(accuracy.values()) / len(accuracy), "curve": curve, "first_choice_share": first_choice,
        "trainable": trainable, "total": total,
        "step_time_median_s": statistics.median(timed), "step_time_mean_s": sum(timed) / len(timed),
        "transform_s": transform_s, "train_s": train_s, "eval_s": eval_s,
        "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "losses": [round(x, 5) for x in losses], "active": active, "active_start": active_start, "peak_rss_mb": _peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None,
        "device": str(device), "loadavg_at_start": loadavg, "versions": library_versions(),
    }


def _peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


def _zero_shot(cfg: EvalConfig, base, tokenizer, tasks: dict[str, _Task], device: torch.device) -> dict[str, Any]:
    out = {}
    autocast = _autocast(cfg, device)
    for name, task in tasks.items():
        t = time.perf_counter()
        max_len = _max_len(cfg, {name: task})
        # the base model's own forward (multiple choice) and generate (generated answers)
        accuracy, correct, _ = _score(base, tokenizer, task.scored, max_len, autocast)
        curve = _score(base, tokenizer, task.curve, max_len, autocast)[0] if cfg.curve_every and task.curve else None
        out[name] = {"accuracy": accuracy, "correct": correct, "curve_accuracy": curve,
                     "chance": T.chance(task.scored), "scored": len(task.scored), "data": task.info,
                     "eval_s": time.perf_counter() - t}
    return out


def _job(cfg_dict: dict, job: dict) -> dict[str, Any]:
    """One unit of work: the zero-shot scores of ``job["tasks"]``, or one run; in its own process
    when ``isolate`` is set, so ``peak_rss_mb`` covers this job alone."""
    cfg = EvalConfig(**cfg_dict)
    torch.set_num_threads(cfg.threads)
    log = _printer(job.pop("log", None), echo=job.pop("echo", True))
    device = _device(cfg)
    base, tokenizer = load_model(cfg.model)
    base.to(device)
    for p in base.parameters():
        p.requires_grad_(False)
    if job["kind"] == "zero_shot":
        return _zero_shot(cfg, base, tokenizer, _tasks(cfg, tokenizer, job["tasks"]), device)
    run = {k: job[k] for k in ("method", "setting", "seed", "lr")}
    out = _train_and_score(cfg, base, tokenizer, run, _tasks(cfg, tokenizer, parse_setting(job["setting"])),
                           device, log, job.get("partial"))
    out["isolated"] = cfg.isolate
    return out


def _printer(path: str | None, *, echo: bool = True) -> Callable[[str], None]:
    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        if echo:
            print(line, flush=True)
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    return log


# --------------------------------------------------------------------------------------------------
# the whole evaluation, resumable
# --------------------------------------------------------------------------------------------------


def load_results(path: pathlib.Path, cfg: EvalConfig) -> dict[str, Any] | None:
    """The results file at ``path`` if it exists and was made under ``cfg``'s run fields; refuses one
    that is not a results file, or one whose runs would not be comparable with ``cfg``'s."""
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is not a readable evaluation results file ({err}); give another --out") from None
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list) or "config" not in results:
        raise InputError(f"{path} is not an evaluation results file (no config and runs); give another --out")
    old = results["config"]
    differ = [f for f in EvalConfig.RUN_FIELDS if old.get(f) != getattr(cfg, f)]
    if differ:
        fields = ", ".join(f"{f} {old.get(f)!r} → {getattr(cfg, f)!r}" for f in differ)
        raise InputError(f"{path} holds runs made with other settings ({fields}); its runs would not be comparable: "
                         "give another --out, or the same settings to continue it")
    return results


def run_evaluation(cfg: EvalConfig, out: str | os.PathLike, *, log_path: str | None = None,
                   command: str | None = None, progress: bool | None = None) -> dict[str, Any]:
    """Zero-shot scores, then every run of ``cfg.jobs()`` not already in the results file ``out``
    (which is read first, and rewritten atomically after each job); returns the results dict.

    A failed job is logged and recorded in ``failures`` (the others go on) and is tried again by the
    next call. ``progress``: a rich progress bar (default: when stdout is a terminal); otherwise one
    line per job with the time left.
    """
    out = pathlib.Path(out)
    results = load_results(out, cfg) or {"runs": [], "zero_shot": {}}
    results.update(config=dataclasses.asdict(cfg), command=command, machine=_machine(cfg), failures=[])
    results.setdefault("started", time.strftime("%Y-%m-%d %H:%M:%S"))
    done = {run_key(r) for r in results["runs"]}
    missing_tasks = [n for n in cfg.task_names() if n not in results["zero_shot"]]
    jobs = ([{"kind": "zero_shot", "tasks": missing_tasks}] if missing_tasks else [])
    jobs += [{"kind": "train", **j} for j in cfg.jobs() if run_key(j) not in done]
    progress = sys.stdout.isatty() if progress is None else progress
    log = _printer(log_path)
    log(f"evaluation → {out}: {len(cfg.methods)} methods x {len(cfg.settings)} settings x {len(cfg.seeds)} seeds"
        f"{f' x {len(cfg.sweep_lrs)} lrs' if cfg.sweep_lrs else ''}, {cfg.steps} steps of {cfg.batch_size}"
        f"{' (a mixture of n tasks: n × that)' if cfg.mixture_budget == 'per_task' else ''}; "
        f"{len(done)} runs already there, {len(jobs)} jobs to do")
    cfg_dict = dataclasses.asdict(cfg)
    bar = _Progress(len(jobs), log, live=progress)

    def record(job: dict, result: dict | None, err: BaseException | None) -> None:
        if err is not None:  # one failing job must not lose the others' results
            log(f"FAILED {_describe(job)}: {type(err).__name__}: {err}")
            results["failures"].append({**job, "error": f"{type(err).__name__}: {err}"})
            bar.advance(f"FAILED {_describe(job)}")
            return
        if job["kind"] == "zero_shot":
            results["zero_shot"].update(result)
            summary = ", ".join(f"{n} {r['accuracy']:.3f}" for n, r in result.items())
        else:
            results["runs"].append(result)
            summary = (f"accuracy {result['mean_accuracy']:.3f}, {result['trainable']:,} trainable, "
                       f"{result['step_time_median_s']:.2f} s/step")
        results["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        atomic_write_json(out, results)
        if job["kind"] != "zero_shot":  # recorded: its saved state is no longer needed
            partial_path(out, job).unlink(missing_ok=True)
        bar.advance(f"{_describe(job)}: {summary}")

    def payload(job: dict) -> dict:
        state = {"partial": str(partial_path(out, job))} if job["kind"] != "zero_shot" else {}
        return {**job, **state, "log": log_path, "echo": not progress}

    with bar:
        if cfg.workers > 1:
            _run_parallel(cfg, cfg_dict, jobs, payload, record, bar)
        else:
            submit = _isolated if cfg.isolate else _job
            for job in jobs:
                bar.start(_describe(job))
                try:
                    result = submit(cfg_dict, payload(job))
                except Exception as err:
                    record(job, None, err)
                    continue
                record(job, result, None)
    return results


def _run_parallel(cfg: EvalConfig, cfg_dict: dict, jobs: list[dict], payload: Callable[[dict], dict],
                  record: Callable[[dict, dict | None, BaseException | None], None], bar: "_Progress") -> None:
    """``cfg.workers`` jobs at a time, each in a fresh process (one job per process, as ``isolate``),
    recorded as each finishes."""
    import concurrent.futures
    import multiprocessing

    bar.start(f"{len(jobs)} jobs, {cfg.workers} at a time")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=cfg.workers, max_tasks_per_child=1,
                                                  mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_job, cfg_dict, payload(job)): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            try:
                result = future.result()
            except Exception as err:
                record(futures[future], None, err)
                continue
            record(futures[future], result, None)
    finally:  # on an interrupt, the queued jobs are dropped instead of waited for (the file has every finished one)
        pool.shutdown(wait=True, cancel_futures=True)


def _isolated(cfg_dict: dict, job: dict) -> dict[str, Any]:
    import concurrent.futures
    import multiprocessing

    # a fresh process per job: its peak RSS is its own, and nothing leaks between methods
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_job, cfg_dict, job).result()


def _describe(job: dict) -> str:
    if job["kind"] == "zero_shot":
        return f"zero-shot ({len(job['tasks'])} tasks)"
    return f"{job['method']} · {job['setting']} · seed {job['seed']} · lr {job['lr']:g}"


class _Progress:
    """A rich progress bar over the jobs, or (``live`` False) a log line per job with the time left."""

    def __init__(self, total: int, log: Callable[[str], None], *, live: bool) -> None:
        self.total, self.log, self.live, self.done, self.t0 = total, log, live, 0, time.perf_counter()
        self.bar = None
        if live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.progress import TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn())
            self.task = self.bar.add_task("evaluation", total=total)

    def __enter__(self) -> "_Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def start(self, what: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=what)

    def advance(self, message: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.console.print(message)
            self.bar.advance(self.task)
            return
        elapsed = time.perf_counter() - self.t0
        left = elapsed / self.done * (self.total - self.done)
        self.log(f"[{self.done}/{self.total}] {message} · {elapsed / 60:.1f} min, about {left / 60:.0f} min left")


def library_versions() -> dict[str, str]:
    """The libraries a run's numbers depend on, recorded per run: a folder resumed under newer ones says so."""
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def _machine(cfg: EvalConfig) -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    device = _device(cfg)
    return {"platform": platform.platform(), "python": platform.python_version(), **library_versions(),
            "cpu_count": os.cpu_count(), "threads": cfg.threads,
            "workers": cfg.workers,
            "processor": platform.processor() or platform.machine(), "loadavg_at_start": load,
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
