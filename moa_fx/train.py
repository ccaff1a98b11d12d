"""The training loop behind ``moa-fx train``: a transformed model, AdamW, checkpoints, resume.

Map: :class:`TrainConfig` (what defines a run) → :func:`train` (the loop; reports through
:class:`Callbacks`) → :class:`TrainResult`. Checkpoints: :func:`save_checkpoint` /
:func:`load_checkpoint`. One run per output directory: :func:`run_lock`. Every batch the data gives
passes :func:`moa_fx.data.check_batch` before it reaches the model; every setting is checked by
:class:`TrainConfig` (:class:`~moa_fx.errors.SettingError`).

Determinism: the batch of step ``s`` is drawn from a generator seeded by ``(seed, s)``, the learning
rate is a function of the step, and the checkpoint stores the torch RNG state, so a run resumed
from step k reaches bit-for-bit the loss curve of an uninterrupted run (on the same machine).

Checkpoint layout (``<out>/checkpoint/``), never a pickle:

- ``tensors-<step>.safetensors``: adapter weights (``adapter.<name>``), optimizer state tensors
  (``optim.<param name>.<key>``) and the RNG state (``rng.torch``);
- ``trainer_state.json``: step, config, loss history, evaluations, optimizer hyperparameters and
  the name of its tensors file. Both are written to a temporary file in the same directory and
  renamed into place; the JSON goes last, so a crash leaves the previous complete checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import socket
import time
from typing import Any, Callable

import torch
from torch import nn

from .data import Batch, DigitTasks, batch_generator, check_batch
from .errors import CheckpointError, MoaFxError, RunLockedError, SettingError
from .fileio import atomic_write
from .runtime import MoAModel, transform
from .spec import load_spec, spec_to_dict

__all__ = ["TrainConfig", "TrainResult", "Callbacks", "train", "save_checkpoint", "load_checkpoint",
           "CHECKPOINT_DIR", "STATE_FILE", "LOCK_FILE", "run_lock"]

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.json"
EVAL_STREAM = 10 ** 12  # eval batches come from streams no training step reaches
# fields that define the run: a resumed run must agree on them
RUN_FIELDS = ("model", "spec", "data", "seed", "batch_size", "lr", "warmup", "precision", "weight_decay")


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
    precision: str = "fp32"
    compile: bool = True
    seed: int = 0
    eval_every: int = 100
    save_every: int = 100
    eval_examples: int = 256
    log_every: int = 10
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as if interrupted

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


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 10% at ``steps``."""
    if step <= cfg.warmup:
        return cfg.lr * step / max(cfg.warmup, 1)
    progress = min(1.0, (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _run_identity(cfg: TrainConfig) -> dict[str, Any]:
    ident = {k: getattr(cfg, k) for k in RUN_FIELDS}
    ident["spec"] = spec_to_dict(load_spec(cfg.spec))
    return ident


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------


def _trainable(model: MoAModel) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(directory: pathlib.Path, model: MoAModel, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> pathlib.Path:
    """Write the tensors file, then ``trainer_state.json`` naming it; drop older tensors files."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    names = {id(p): n for n, p in _trainable(model)}
    tensors: dict[str, torch.Tensor] = {f"adapter.{k}": v.detach().contiguous().cpu()
                                        for k, v in model.adapter_state_dict().items()}
    scalars: dict[str, dict[str, Any]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{names[id(p)]}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(names[id(p)], {})[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    step = state["step"]
    tensor_file = f"tensors-{step:08d}.safetensors"
    atomic_write(directory / tensor_file, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    full = {**state, "tensors": tensor_file, "param_names": [n for n, _ in _trainable(model)],
            "optimizer": {"param_groups": hyper, "scalars": scalars}, "format": 1}
    text = json.dumps(full, indent=1, sort_keys=True)
    atomic_write(directory / STATE_FILE, lambda p: p.write_text(text))
    for old in directory.glob("tensors-*.safetensors"):
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    return directory


def load_checkpoint(directory: pathlib.Path, model: MoAModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore adapters, optimizer state and RNG state; return the saved trainer state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state_path = directory / STATE_FILE
    if not state_path.exists():
        raise CheckpointError(f"no checkpoint in '{directory}' ({STATE_FILE} is missing); run without --resume "
                              "to start a new run")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{state_path}' is damaged ({err}); delete the checkpoint directory to restart") from None
    tensor_path = directory / str(state.get("tensors", ""))
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"'{tensor_path}' is missing or damaged ({err}); the checkpoint cannot be resumed")
    own = model.adapter_state_dict()
    adapters = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
    if set(adapters) != set(own):
        raise CheckpointError(f"the checkpoint's adapters do not fit this model and spec "
                              f"({len(set(own) ^ set(adapters))} tensors differ)")
    model.adapters.load_state_dict(adapters, strict=True)
    params = dict(_trainable(model))
    if state["param_names"] != list(params):
        raise CheckpointError("the checkpoint's trainable parameters differ from this model's")
    opt_state: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(state["param_names"]):
        entry = {k[len(f"optim.{name}."):]: v for k, v in tensors.items() if k.startswith(f"optim.{name}.")}
        entry.update(state["optimizer"]["scalars"].get(name, {}))
        if entry:
            opt_state[i] = entry
    groups, start = [], 0
    for g, hyper in zip(optimizer.param_groups, state["optimizer"]["param_groups"]):
        groups.append({**hyper, "params": list(range(start, start + len(g["params"])))})
        start += len(g["params"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    return state


def _clean_temporaries(directory: pathlib.Path) -> None:
    """Remove temporaries a killed save left behind (the last complete checkpoint is untouched)."""
    if not directory.is_dir():
        return
    for tmp in directory.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    try:
        current = json.loads((directory / STATE_FILE).read_text()).get("tensors")
    except (OSError, json.JSONDecodeError):
        return
    for old in directory.glob("tensors-*.safetensors"):
        if old.name != current:
            old.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# the output directory's lock
# --------------------------------------------------------------------------------------------------


LOCK_FILE = ".moa-fx-train.lock"


@contextlib.contextmanager
def run_lock(out: pathlib.Path):
    """Hold an exclusive ``fcntl.flock`` on ``<out>/.moa-fx-train.lock`` for the run: of two runs on one
    directory exactly one proceeds, and the kernel releases the lock when its process dies, so a
    killed run leaves nothing to clean up (its ``--resume`` simply takes the lock)."""
    import fcntl

    path = out / LOCK_FILE
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    except OSError as err:
        raise MoaFxError(f"cannot create the lock file '{path}': {err.strerror}; choose a writable --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _locked(path) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        yield path
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)  # closing releases the lock


def _locked(path: pathlib.Path) -> RunLockedError:
    """The error for a lock another live process holds."""
    try:
        owner = json.loads(path.read_text())
        who = f" (pid {int(owner['pid'])} on {owner['host']})"
    except (OSError, ValueError, KeyError, TypeError):  # being written right now, or damaged
        who = ""
    return RunLockedError(f"'{path.parent}' is in use by another moa-fx train run{who}; wait for it to finish or "
                          "choose another --out")


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------


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
def evaluate(model: MoAModel, batches: list[Batch], cfg: TrainConfig, digit_task: bool) -> dict[str, Any]:
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
        mask = target != -100
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


def train(cfg: TrainConfig, model: nn.Module, data: Any = None, callbacks: Callbacks | None = None) -> TrainResult:
    """Train the adapters of ``transform(model, cfg.spec)`` on ``data`` (default: the digit tasks).

    ``model`` is the base model (its weights are frozen and shared). Writes ``<out>/checkpoint`` every
    ``save_every`` steps and at the end, and ``<out>/adapter`` at the end.
    """
    out = pathlib.Path(cfg.out)
    try:  # fail before training, not after the last step
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MoaFxError(f"cannot create output directory '{out}': {err.strerror}; choose a writable --out") from None
    with run_lock(out):
        return _train(cfg, model, data, callbacks or Callbacks(), out)


def _train(cfg: TrainConfig, model: nn.Module, data: Any, cb: Callbacks, out: pathlib.Path) -> TrainResult:
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
    params = [p for _, p in _trainable(moa)]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, losses, evals = 0, [], []
    if cfg.resume:
        _clean_temporaries(ckpt_dir)
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
    t0 = time.perf_counter()
    last_log, tokens_since = t0, 0
    stats: dict = {}
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_dir, moa, optimizer, {"step": step, "run": _run_identity(cfg), "losses": losses,
                                                   "evals": evals, "config": dataclasses.asdict(cfg)})
        cb.on_save(step, ckpt_dir)

    step = start
    for step in range(start + 1, stop + 1):
        batch = check_batch(data.batch(cfg.batch_size, batch_generator(cfg.seed, step)), vocab, positions,
                            cfg.batch_size)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        with _autocast(cfg):
            outputs = step_fn(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        loss = outputs.loss
        if not torch.isfinite(loss):
            raise MoaFxError(f"the loss became {float(loss)} at step {step}; lower --lr or use --precision fp32")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens_since += int(batch.attention_mask.sum())
        if step % cfg.log_every == 0 or step % cfg.eval_every == 0 or step == stop:
            now = time.perf_counter()
            cb.on_step(step, losses[-1], tokens_since / max(now - last_log, 1e-9), _active_per_token(moa))
            last_log, tokens_since = now, 0
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics = {"step": step, **evaluate(moa, eval_batches, cfg, digit_task)}
            stats = moa.router_stats()
            evals.append(metrics)
            cb.on_eval(step, metrics)
        if step % cfg.save_every == 0 or step == stop:
            checkpoint(step)
    if not stats:
        evaluate(moa, eval_batches[:1], cfg, digit_task)
        stats = moa.router_stats()
    adapter_dir = moa.save_adapters(out / "adapter") if step >= cfg.steps else out / "adapter"
    return TrainResult(steps=step, losses=losses, evals=evals, router_stats=stats, adapter_dir=adapter_dir,
                       checkpoint_dir=ckpt_dir, seconds=time.perf_counter() - t0, stopped_early=step < cfg.steps)
