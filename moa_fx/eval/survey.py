"""Survey candidate BIG-bench tasks: how the base model does zero-shot, and how far a LoRA pilot
fine-tune takes it (issue #18: choose tasks where learning shows).

Map:

- :data:`CANDIDATES` -- the tasks surveyed by default: multiple choice, then scored on generated text.
- :class:`SurveyConfig` -- the held-out protocol (prompt budget, split seed, examples scored) and the
  pilot recipe (steps, batch, learning rate, seed).
- :func:`pilot_spec` -- the pilot's adapter: LoRA r 8, α 16 on q, k, v, o, down (the harness's ``lora``
  budget spec at rank 8).
- :func:`task_data` -- one task's examples without over-long prompts, split into train / validation /
  test (:func:`moa_fx.eval.tasks.train_val_test`).
- :func:`zero_shot`, :func:`pilot` -- the two measurements of one task.
- :func:`run_survey` -- every task, resumable: the results file is rewritten atomically after each
  measurement, and a measurement already in it is not repeated. Entry point:
  ``examples/survey_tasks.py``.
- :func:`survey_table` -- the Markdown table of a results dict.

Protocol: prompts longer than ``max_prompt_tokens`` are dropped (and counted) before splitting; the
test split is :func:`moa_fx.eval.tasks.split`'s with ``split_seed`` (grouped where
:data:`moa_fx.eval.tasks.GROUP_KEYS` says), and its first ``max_examples`` are scored by
:func:`moa_fx.eval.tasks.predict` (multiple choice by choice likelihood, generation by exact match of
the greedy answer's first line); a validation split is cut from the rest and never trained on, so a
later recipe sweep can use it. The pilot trains on the training split only, with the loss on the
answer tokens, by :func:`moa_fx.train.fit` (AdamW, warmup + cosine, clipping).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import pathlib
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from moa_fx.data import Batch
from moa_fx.errors import InputError
from moa_fx.eval import evaluate as ev
from moa_fx.eval import protocol
from moa_fx.eval import tasks as T
from moa_fx.eval.protocol import TaskData
from moa_fx.fileio import atomic_write_json
from moa_fx.train import Schedule, StepReport, fit, make_optimizer

if TYPE_CHECKING:
    from moa_fx.spec import Spec

__all__ = [
    "CANDIDATES",
    "SurveyConfig",
    "TaskData",
    "pilot_spec",
    "task_data",
    "zero_shot",
    "pilot",
    "Reporter",
    "load_results",
    "run_survey",
    "survey_table",
]

# From a scan of the sdist for many examples and short inputs (names as under benchmark_tasks/).
CANDIDATES = (
    "hyperbaton",
    "multiemo/all_sentence_en",
    "unit_conversion/unit_identification",
    "fact_checker/fever",
    "goal_step_wikihow/step_ordering",
    "logical_fallacy_detection",
    "movie_dialog_same_or_different",
    "navigate",
    "sports_understanding",
    "winowhy",
    # scored on generated text
    "linguistic_mappings/plural_json",
    "linguistic_mappings/past_tense_json",
    "unnatural_in_context_learning/unnatural_addition_2_digit",
    "modified_arithmetic/three_digit_addition_control",
    "object_counting",
    "simp_turing_concept/witness_set",
)

QUICK_TASKS = ("parity", "compare", "successor")  # ev.synthetic_task_dicts


@dataclasses.dataclass
class SurveyConfig:
    """What one survey measures. ``protocol`` fields fix the data (a results file holds one protocol);
    the pilot fields name a recipe, and a file may hold pilots of several recipes."""

    tasks: tuple[str, ...] = CANDIDATES
    max_examples: int = 200  # held-out examples scored per task
    max_prompt_tokens: int = 96  # longer prompts are dropped, and counted
    split_seed: int = 0
    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int | None = None  # default: 10% of the steps
    max_grad_norm: float = 1.0
    seed: int = 0  # the pilot's initialisation and data order
    threads: int = 2
    model: str = "smollm2"  # "smollm2" (the real asset) or "tiny" (random tiny LLaMA, quick version)
    data: str = "bigbench"  # "bigbench" (the real asset) or "synthetic" (quick version)

    PROTOCOL = ("max_examples", "max_prompt_tokens", "split_seed", "model", "data")

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        if self.warmup is None:
            self.warmup = max(1, self.steps // 10)
        if not self.tasks:
            raise InputError("give at least one task")
        for name in ("max_examples", "max_prompt_tokens", "steps", "batch_size", "threads"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} = {getattr(self, name)} must be >= 1")
        if not self.lr > 0 or not self.max_grad_norm >= 0:
            raise InputError(f"lr = {self.lr} must be > 0 and max_grad_norm = {self.max_grad_norm} >= 0")
        if self.model not in ("smollm2", "tiny") or self.data not in ("bigbench", "synthetic"):
            raise InputError("model must be 'smollm2' or 'tiny', data 'bigbench' or 'synthetic'")

    def protocol(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.PROTOCOL}

    def recipe(self) -> str:
        """The key of this configuration's pilot in the results file."""
        return (f"lora r8 a16 qkvod, {self.steps} steps x {self.batch_size}, lr {self.lr:g}, "
                f"warmup {self.warmup}, clip {self.max_grad_norm:g}, seed {self.seed}")


def pilot_spec() -> Spec:
    """LoRA r 8, α 16 on q, k, v, o, down: the harness's ``lora`` budget spec at rank 8 (issue #18's
    measured recipe)."""
    spec = ev.budget_spec("lora")
    (expert,) = spec.experts
    return dataclasses.replace(spec, name="survey_lora", experts=(dataclasses.replace(expert, r=8, alpha=16),))


# --------------------------------------------------------------------------------------------------
# one task's data
# --------------------------------------------------------------------------------------------------


def task_data(name: str, examples: Sequence[T.Example], tokenizer, cfg: SurveyConfig) -> TaskData:
    """:func:`moa_fx.eval.protocol.task_data` under ``cfg``'s protocol."""
    return protocol.task_data(name, examples, tokenizer, max_prompt_tokens=cfg.max_prompt_tokens,
                              max_examples=cfg.max_examples, split_seed=cfg.split_seed)


# --------------------------------------------------------------------------------------------------
# the two measurements
# --------------------------------------------------------------------------------------------------


def _scores(predictions, examples) -> dict[str, Any]:
    """Accuracy, the first-choice share (multiple choice) and, for generated answers, the share that
    start with a target (a diagnosis only: right answer, but the line went on)."""
    generated = [(p, e) for p, e in zip(predictions, examples) if isinstance(e, T.GenerationExample)]
    prefix = None
    if generated:
        prefix = sum(any(p.startswith(t.strip()) for t in e.targets) for p, e in generated) / len(generated)
    return {"accuracy": T.accuracy(predictions, examples),
            "first_choice_share": T.first_choice_share(predictions, examples), "prefix_match": prefix,
            "_predictions": predictions}


def zero_shot(base, tokenizer, data: TaskData) -> dict[str, Any]:
    """Held-out accuracy of the untouched base model (its own forward, or its own ``generate``)."""
    t = time.perf_counter()
    predictions = T.predict(base, tokenizer, data.test, batch_size=16)
    return {**_scores(predictions, data.test), "seconds": time.perf_counter() - t}


def pilot(base, tokenizer, data: TaskData, cfg: SurveyConfig,
          on_step: Callable[[StepReport], None] = lambda report: None) -> dict[str, Any]:
    """Fine-tune :func:`pilot_spec` on ``data.train`` (``cfg.steps`` × ``cfg.batch_size``, epochs
    reshuffled with ``cfg.seed``, loss on the answer tokens) and score ``data.test`` after."""
    from moa_fx import transform

    loadavg = os.getloadavg()  # step times are comparable only on an equally loaded machine
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    moa = transform(base, pilot_spec())
    transform_s = time.perf_counter() - t0
    trainable, _ = moa.trainable_parameter_count()
    rng = random.Random(cfg.seed)
    need = cfg.steps * cfg.batch_size
    stream: list[T.Example] = []
    while len(stream) < need:
        epoch = list(data.train)
        rng.shuffle(epoch)
        stream.extend(epoch)
    # room for every kept prompt and the longest answer: nothing is cut
    max_len = cfg.max_prompt_tokens + data.info["answer_tokens_max"]

    def batch_at(step: int) -> Batch:
        rows = stream[(step - 1) * cfg.batch_size: step * cfg.batch_size]
        return Batch(**T.encode_for_training(tokenizer, rows, max_len))

    schedule = Schedule(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, max_grad_norm=cfg.max_grad_norm)
    moa.train()
    t_train = time.perf_counter()
    reports = fit(moa, make_optimizer(moa, cfg.lr), schedule, batch_at, on_step=on_step)
    train_s = time.perf_counter() - t_train
    t_eval = time.perf_counter()
    predictions = T.predict(moa, tokenizer, data.test, batch_size=16)
    eval_s = time.perf_counter() - t_eval
    del moa
    gc.collect()
    losses = [r.loss for r in reports]
    timed = [r.seconds for r in reports][1:] or [reports[0].seconds]
    return {
        **_scores(predictions, data.test), "trainable": trainable, "loss_first": losses[0], "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "losses": [round(x, 4) for x in losses], "step_time_median_s": statistics.median(timed),
        "transform_s": transform_s, "train_s": train_s, "eval_s": eval_s, "threads": torch.get_num_threads(),
        "loadavg_at_start": loadavg,
    }


# --------------------------------------------------------------------------------------------------
# the survey
# --------------------------------------------------------------------------------------------------


class Reporter:
    """What :func:`run_survey` tells its caller (the script draws progress bars from it)."""

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def stage(self, task: str, stage: str, steps: int) -> None:
        """A measurement starts; ``steps`` is 0 for a zero-shot scoring."""

    def step(self, report: StepReport) -> None:
        """A pilot's training step is done."""

    def done(self, task: str, stage: str) -> None:
        """A measurement is done (or was found in the results file)."""


def load_results(path: pathlib.Path, cfg: SurveyConfig) -> dict[str, Any]:
    """The results file at ``path`` if it exists (its protocol must be ``cfg``'s), else an empty one."""
    if path.exists():
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"{path} is not a survey results file ({err}); pass another --out") from None
        if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
            raise InputError(f"{path} is not a survey results file (no 'tasks' table); pass another --out")
        if results.get("protocol") != cfg.protocol():
            raise InputError(f"{path} holds a survey with protocol {results.get('protocol')}, not "
                             f"{cfg.protocol()}; pass another --out or the same settings")
        return results
    return {"protocol": cfg.protocol(), "tasks": {}}


def run_survey(cfg: SurveyConfig, out: str | pathlib.Path, *, pilots: bool = False,
               reporter: Reporter | None = None, loader: Callable[[str], Sequence[T.Example]] | None = None,
               model_and_tokenizer: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """Zero-shot (and, with ``pilots``, the pilot of ``cfg.recipe()``) for every task in ``cfg.tasks``,
    in order, skipping measurements already in ``out``; ``out`` is rewritten atomically after each
    one, and ``out`` with suffix ``.md`` gets :func:`survey_table`. A task that fails is recorded
    under ``"error"`` and retried on the next run. Returns the results dict."""
    reporter = reporter or Reporter()
    out = pathlib.Path(out)
    torch.set_num_threads(cfg.threads)
    results = load_results(out, cfg)
    loader = loader or ev.task_loader(cfg.data)
    base, tokenizer = model_and_tokenizer or (None, None)
    recipe = cfg.recipe()

    def save() -> None:
        results["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, results)
        out.with_suffix(".md").write_text(survey_table(results), encoding="utf-8")

    for name in cfg.tasks:
        entry = results["tasks"].setdefault(name, {})
        wanted = ["zero_shot"] + (["pilot"] if pilots else [])
        missing = [s for s in wanted if not (entry.get("zero_shot") if s == "zero_shot"
                                              else entry.get("pilots", {}).get(recipe))]
        for stage in wanted:
            if stage not in missing:
                reporter.done(name, stage)
        if not missing:
            continue
        try:
            if base is None:
                reporter.log(f"loading the {cfg.model} model")
                base, tokenizer = ev.load_model(cfg.model)
                for p in base.parameters():
                    p.requires_grad_(False)
            data = task_data(name, loader(name), tokenizer, cfg)
            entry.pop("error", None)
            entry["data"] = data.info
            for stage in missing:
                reporter.stage(name, stage, cfg.steps if stage == "pilot" else 0)
                if stage == "zero_shot":
                    result = zero_shot(base, tokenizer, data)
                    entry["zero_shot"] = result
                else:
                    result = pilot(base, tokenizer, data, cfg, on_step=reporter.step)
                    entry.setdefault("pilots", {})[recipe] = result
                _log_samples(reporter, name, stage, data, result.pop("_predictions"))
                reporter.log(f"{name}: {stage} accuracy {result['accuracy']:.3f} (chance {data.info['chance']:.2f}, "
                             f"majority {data.info['majority']:.2f}, {data.info['scored']} examples, "
                             f"{data.info['dropped_long_prompts']} long prompts dropped)")
                save()
                reporter.done(name, stage)
        except Exception as err:  # one task that fails must not stop the survey
            entry["error"] = f"{type(err).__name__}: {err}"
            reporter.log(f"{name}: FAILED {entry['error']}")
            save()
            for stage in missing:
                reporter.done(name, stage)
    save()
    return results


def _log_samples(reporter: Reporter, name: str, stage: str, data: TaskData, predictions) -> None:
    """A few generated answers against their targets, in the log only (the data are never committed)."""
    pairs = [(p, e.targets) for p, e in zip(predictions, data.test) if isinstance(e, T.GenerationExample)][:4]
    if pairs:
        reporter.log(f"{name}: {stage} answers " + "; ".join(f"{p!r} vs {[t.strip() for t in ts][:2]}"
                                                             for p, ts in pairs))


def _share(result: dict[str, Any]) -> str:
    for key in ("first_choice_share", "prefix_match"):
        if result.get(key) is not None:
            return f"{result[key]:.2f}"
    return "—"


def survey_table(results: dict[str, Any]) -> str:
    """Markdown: one row per task (kind, examples, dropped prompts, scored, chance, majority answer,
    zero-shot), then one row per task and pilot recipe (accuracy after, Δ, losses, step time)."""
    proto = results["protocol"]
    out = ["## Task survey", "",
           f"Held-out: the first ≤ {proto['max_examples']} examples of each task's test split (split seed "
           f"{proto['split_seed']}), prompts ≤ {proto['max_prompt_tokens']} tokens (longer ones dropped before "
           "splitting). Multiple choice scored by summed choice log-likelihood; generation by exact match of the "
           "greedy answer's first line, stripped (chance 0). Majority: a constant answer learnt from the training "
           "split (its most common answer text, or most common choice position if that scores higher).", "",
           "First-choice share: multiple-choice predictions that pick the first listed choice. Prefix: generated "
           "answers that start with a target (right answer, but the line went on).", "",
           "| task | kind | examples | dropped (long) | scored | chance | majority | zero-shot | first-choice share "
           "/ prefix |", "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["tasks"].items():
        if "data" not in entry:
            out.append(f"| {name} | — | — | — | — | — | — | error: {entry.get('error', 'not run')} | — |")
            continue
        d, z = entry["data"], entry.get("zero_shot") or {}
        out.append(f"| {name} | {d['kind']} | {d['examples']} | {d['dropped_long_prompts']} | {d['scored']} | "
                   f"{d['chance']:.2f} | {d['majority']:.2f} | " + (f"{z['accuracy']:.3f}" if z else "—")
                   + f" | {_share(z)} |")
    pilot_rows = [(name, recipe, p, entry) for name, entry in results["tasks"].items()
                  for recipe, p in entry.get("pilots", {}).items()]
    if pilot_rows:
        out += ["", "| task | pilot recipe | zero-shot | after pilot | Δ | first-choice share / prefix | "
                "loss first → last 10 | step (s) |", "|---|---|---|---|---|---|---|---|"]
        for name, recipe, p, entry in pilot_rows:
            z = (entry.get("zero_shot") or {}).get("accuracy")
            delta = "—" if z is None else f"{p['accuracy'] - z:+.3f}"
            out.append(f"| {name} | {recipe} | {'—' if z is None else f'{z:.3f}'} | {p['accuracy']:.3f} | {delta} | "
                       f"{_share(p)} | {p['loss_first']:.2f} → {p['loss_last10']:.2f} | "
                       f"{p['step_time_median_s']:.2f} |")
    errors = [(n, e["error"]) for n, e in results["tasks"].items() if e.get("error") and "data" in e]
    if errors:
        out += ["", "Errors:", ""] + [f"- {n}: {err}" for n, err in errors]
    return "\n".join(out) + "\n"
