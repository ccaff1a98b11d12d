"""The run behind ``moa-fx train``: a transformed model trained by :func:`~moa_fx.train.loop.fit`,
with held-out evaluations, checkpoints and resume.

Map: :class:`TrainConfig` (what defines a run) → :func:`train` (reports through :class:`Callbacks`)
→ :class:`TrainResult`. Every batch the data gives passes :func:`moa_fx.data.check_batch` before it
reaches the model; every setting is checked by :class:`TrainConfig`
(:class:`~moa_fx.errors.SettingError`). Checkpoints and the directory lock: :mod:`.checkpoint`.

Held-out scoring beyond the loss comes from the caller: ``score(model) -> dict`` (for example a
task's accuracy, computed by the CLI with :mod:`moa_fx.eval`, which this package never imports) is
called on the untouched base model before the first step and on the trained model at the last; its
numbers join the evaluations of step 0 and of the last step.

Determinism: the batch of step ``s`` is drawn from a generator seeded by ``(seed, s)``, the learning
rate is a function of the step, and the checkpoint stores the torch RNG state, so a run resumed
from step k reaches bit-for-bit the loss curve of an uninterrupted run (on the same machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import time
from typing import Any, Callable

import torch
from torch import nn

from ..data import IGNORE_INDEX, Batch, DigitTasks, batch_generator, check_batch
from ..errors import CheckpointError, MoaFxError, SettingError
from ..runtime import MoAModel, transform
from ..spec import load_spec, spec_to_dict
from .checkpoint import CHECKPOINT_DIR, STATE_FILE, clean_temporaries, load_checkpoint, run_lock, save_checkpoint
from .loop import Schedule, StepReport, fit, make_optimizer

__all__ = ["TrainConfig", "TrainResult", "Callbacks", "train", "held_out_metrics"]

EVAL_STREAM = 10 ** 12  # eval batches come from streams no training step reaches
# fields that define the run: a resumed run must agree on them
RUN_FIELDS = ("model", "spec", "data", "seed", "batch_size", "lr", "warmup", "precision", "weight_decay",
              "max_grad_norm")


@dataclasses.dataclass
class TrainConfig:
    """One training run. ``spec`` is a preset name or a spec file; ``data`` None means the digit tasks."""

    out: str
    model: str = "small-llama"
    spec: str = "sparse_moa"
    data: str | None = None
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-2
    warmup: int = 20
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = "fp32"
    compile: bool = True
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100
    eval_examples: int = 256
    log_every: int = 10
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as if interrupted

    @property
    def schedule(self) -> Schedule:
        return Schedule(steps=self.steps, lr=self.lr, warmup=self.warmup, max_grad_norm=self.max_grad_norm)

    def __post_init__(self) -> None:
        for name, (kind, low) in _LIMITS.items():
            value = getattr(self, name)
            if value is None and name == "stop_after":
                continue
            flag = f"--{name.replace('_', '-')}"
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise SettingError(f"{flag} = {value!r} must be an integer >= {low}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
                raise SettingError(f"{flag} = {value!r} must be a finite number")
            if value < low or (name == "lr" and value <= 0):
                raise SettingError(f"{flag} = {value} must be {'> 0' if name == 'lr' else f'>= {low}'}")
        if self.precision not in ("fp32", "bf16"):
            raise SettingError(f"--precision {self.precision!r} is not supported; choose fp32 or bf16 (autocast)")


# the numeric settings of a run: (type, smallest allowed value); lr must also be > 0
_LIMITS: dict[str, tuple[type, float]] = {
    "steps": (int, 1), "batch_size": (int, 1), "eval_every": (int, 1), "save_every": (int, 1),
    "eval_examples": (int, 1), "log_every": (int, 1), "warmup": (int, 0), "seed": (int, 0),
    "stop_after": (int, 1), "lr": (float, 0.0), "weight_decay": (float, 0.0),
    "max_grad_norm": (float, 0.0),
}


@dataclasses.dataclass
class Callbacks:
    """Hooks the CLI renders from; each gets plain numbers."""

    on_start: Callable[[dict], None] = lambda info: None
    on_step: Callable[[int, float, float, float | None], None] = lambda step, loss, tok_s, active: None
    on_eval: Callable[[int, dict], None] = lambda step, metrics: None
    on_save: Callable[[int, pathlib.Path], None] = lambda step, path: None


@dataclasses.dataclass
class TrainResult:
    steps: int
    losses: list[float]  # training loss of every step from 1
    evals: list[dict]
    router_stats: dict
    adapter_dir: pathlib.Path
    checkpoint_dir: pathlib.Path
    seconds: float
    stopped_early: bool


def _run_identity(cfg: TrainConfig) -> dict[str, Any]:
    ident = {k: getattr(cfg, k) for k in RUN_FIELDS}
    ident["spec"] = spec_to_dict(load_spec(cfg.spec))
    return ident


def _autocast(cfg: TrainConfig):
    if cfg.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _active_per_token(model: MoAModel) -> float | None:
    stats = model.router_stats()
    if not stats:
        return None
    return sum(s["mean_active"] for s in stats.values()) / len(stats)


@torch.no_grad()
def held_out_metrics(model: MoAModel, batches: list[Batch], cfg: TrainConfig, digit_task: bool) -> dict[str, Any]:
    """Held-out loss (mean over answer tokens) and, for the digit tasks, answer accuracy: the share of
    examples whose every answer token is the argmax under teacher forcing (= greedy decoding is right)."""
    was_training = model.training
    model.eval()
    total_loss = tokens = correct = examples = 0.0
    for b in batches:
        with _autocast(cfg):
            out = model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        logits = out.logits.float()[:, :-1]
        target = b.labels[:, 1:]
        mask = target != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.clamp(min=0).reshape(-1),
                                                reduction="none").view_as(target)
        total_loss += float((nll * mask).sum())
        tokens += float(mask.sum())
        hit = (logits.argmax(-1) == target) | ~mask
        correct += float(hit.all(dim=1).sum())
        examples += b.input_ids.shape[0]
    model.train(was_training)
    metrics = {"eval_loss": total_loss / max(tokens, 1)}
    if digit_task:
        metrics["accuracy"] = correct / max(examples, 1)
    return metrics


Score = Callable[[nn.Module], dict]


def train(cfg: TrainConfig, model: nn.Module, data: Any = None, callbacks: Callbacks | None = None,
          score: Score | None = None) -> TrainResult:
    """Train the adapters of ``transform(model, cfg.spec)`` on ``data`` (default: the digit tasks).

    ``model`` is the base model (its weights are frozen and shared). Writes ``<out>/checkpoint`` every
    ``save_every`` steps and at the end, and ``<out>/adapter`` at the end. With ``score``, the
    evaluations also hold ``score(model)`` at step 0 (the untouched base model; a resumed run keeps the
    one its checkpoint holds) and ``score(trained model)`` at step ``cfg.steps``.
    """
    out = pathlib.Path(cfg.out)
    try:  # fail before training, not after the last step
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MoaFxError(f"cannot create output directory '{out}': {err.strerror}; choose a writable --out") from None
    with run_lock(out):
        return _train(cfg, model, data, callbacks or Callbacks(), out, score)


def _train(cfg: TrainConfig, model: nn.Module, data: Any, cb: Callbacks, out: pathlib.Path,
           score: Score | None) -> TrainResult:
    ckpt_dir = out / CHECKPOINT_DIR
    if ckpt_dir.joinpath(STATE_FILE).exists() and not cfg.resume:
        raise CheckpointError(f"'{out}' already holds a checkpoint; pass --resume to continue it, or choose "
                              "another --out")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise MoaFxError("the model has no weights (meta device); train needs a built-in model or a model "
                         "directory with weights")
    vocab = int(model.config.vocab_size)
    if data is None:
        data = DigitTasks(vocab)
    digit_task = isinstance(data, DigitTasks)
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    torch.manual_seed(cfg.seed)
    moa = transform(model, cfg.spec)
    moa.train()
    optimizer = make_optimizer(moa, cfg.lr, cfg.weight_decay)
    start, losses, evals = 0, [], []
    if cfg.resume:
        clean_temporaries(ckpt_dir)
        state = load_checkpoint(ckpt_dir, moa, optimizer)
        saved, now = state["run"], _run_identity(cfg)
        for key in RUN_FIELDS:
            if saved.get(key) != now[key]:
                raise CheckpointError(f"--resume: the checkpoint was made with {key} = {saved.get(key)!r}, this run "
                                      f"has {now[key]!r}; use the same settings or another --out")
        start, losses, evals = state["step"], list(state["losses"]), list(state["evals"])
        if start >= cfg.steps:
            raise CheckpointError(f"the checkpoint is at step {start}, not before --steps {cfg.steps}; "
                                  "raise --steps to train further")
    step_fn = torch.compile(moa) if cfg.compile else moa
    if digit_task:
        eval_batches = [data.batch(min(64, cfg.eval_examples - i), batch_generator(cfg.seed, EVAL_STREAM + i))
                        for i in range(0, cfg.eval_examples, 64)]
    else:
        eval_batches = data.eval_batches(64)
    eval_batches = [check_batch(b, vocab, positions) for b in eval_batches]  # before the first step
    trainable, total = moa.trainable_parameter_count()
    cb.on_start({"start": start, "steps": cfg.steps, "trainable": trainable, "total": total,
                 "data": data.describe(), "spec": moa.spec.name, "model": cfg.model})
    if score is not None and start == 0:
        # score the base model itself, untouched; the loss is the MoAModel's before its first step
        metrics = {"step": 0, **held_out_metrics(moa, eval_batches, cfg, digit_task), **score(model)}
        evals.append(metrics)
        cb.on_eval(0, metrics)
    t0 = time.perf_counter()
    last_log, tokens_since = t0, 0
    stats: dict = {}
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)

    def batch_at(step: int) -> Batch:
        return check_batch(data.batch(cfg.batch_size, batch_generator(cfg.seed, step)), vocab, positions,
                           cfg.batch_size)

    def after_step(report: StepReport) -> None:
        nonlocal last_log, tokens_since, stats
        step = report.step
        losses.append(report.loss)
        tokens_since += report.tokens
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == stop:
            now = time.perf_counter()
            cb.on_step(step, report.loss, tokens_since / max(now - last_log, 1e-9), _active_per_token(moa))
            last_log, tokens_since = now, 0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics = {"step": step, **held_out_metrics(moa, eval_batches, cfg, digit_task)}
            if score is not None and step == cfg.steps:
                metrics.update(score(moa))
            stats = moa.router_stats()
            evals.append(metrics)
            cb.on_eval(step, metrics)
        if step % cfg.save_every == 0 or step == stop:
            save_checkpoint(ckpt_dir, moa, optimizer, {"step": step, "run": _run_identity(cfg), "losses": losses,
                                                       "evals": evals, "config": dataclasses.asdict(cfg)})
            cb.on_save(step, ckpt_dir)

    fit(step_fn, optimizer, cfg.schedule, batch_at, start=start, stop=stop, autocast=lambda: _autocast(cfg),
        on_step=after_step)
    step = max(start, stop)
    if not stats:
        held_out_metrics(moa, eval_batches[:1], cfg, digit_task)
        stats = moa.router_stats()
    adapter_dir = moa.save_adapters(out / "adapter") if step >= cfg.steps else out / "adapter"
    return TrainResult(steps=step, losses=losses, evals=evals, router_stats=stats, adapter_dir=adapter_dir,
                       checkpoint_dir=ckpt_dir, seconds=time.perf_counter() - t0, stopped_early=step < cfg.steps)
