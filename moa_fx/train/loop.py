"""The one training loop: AdamW on the trainable parameters, warmup + cosine learning rate, gradient
clipping, the model's own loss.

Used by ``moa-fx train`` (:func:`moa_fx.train.train`, which adds evaluations and checkpoints through
``on_step``) and by the evaluation (:mod:`moa_fx.eval.evaluate`).

The loss of a step is ``forward(input_ids=…, attention_mask=…, labels=…).loss``. For a
:class:`~moa_fx.MoAModel` in training mode that is the base model's loss over the labels that are not
:data:`~moa_fx.data.IGNORE_INDEX` (the answer tokens, where the data mask the prompt) plus
``router.aux_loss_coef`` × the routers' balance loss. :class:`AnswerOnlyLoss` is the same loss with the LM
head applied only at the labelled positions (the evaluation's forward: about a fifth less work per step when
only short answers are labelled).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX, Batch
from ..errors import InputError, MoaFxError

__all__ = ["Schedule", "StepReport", "lr_at", "trainable_parameters", "make_optimizer", "fit", "AnswerOnlyLoss"]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The optimisation settings of a run: ``steps`` (the schedule's length), peak ``lr`` after ``warmup``
    steps, and the gradient norm clipped to (``max_grad_norm``; 0 means no clipping)."""

    steps: int
    lr: float
    warmup: int
    max_grad_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one optimizer step did: its loss, the non-padding tokens it saw, and the seconds of
    forward + backward + clipping + optimizer step."""

    step: int
    loss: float
    tokens: int
    seconds: float


def lr_at(schedule: Schedule, step: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 10% of ``lr`` at ``steps`` (steps count from 1)."""
    if step <= schedule.warmup:
        return schedule.lr * step / max(schedule.warmup, 1)
    progress = min(1.0, (step - schedule.warmup) / max(schedule.steps - schedule.warmup, 1))
    return schedule.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter that requires a gradient, in ``named_parameters`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW over :func:`trainable_parameters` (one parameter group)."""
    return torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=lr, weight_decay=weight_decay)


class AnswerOnlyLoss:
    """A forward for :func:`fit` whose ``.loss`` is a :class:`~moa_fx.MoAModel`'s own causal-LM loss, with
    the LM head computed only where the (shifted) labels are not :data:`~moa_fx.data.IGNORE_INDEX`.

    The model's forward computes the logits of every position and then ignores the prompt's; with a
    49k-token vocabulary that is about a fifth of a step's work on a 135M model. Here the adapted backbone
    (``model.base_model``, the last hidden state) runs, and the head reads only the answer positions: the
    same mean cross-entropy (up to rounding), plus ``router.aux_loss_coef`` × the balance loss in training,
    as the model's own loss. It returns no logits.

    Refused (use the model itself) for an LM head that carries an adapter, a config that changes the
    logits after the head (``final_logit_softcapping``, ``logit_scale``), or a ``loss_type`` other than
    transformers' causal-LM one.
    """

    def __init__(self, model: nn.Module) -> None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or not hasattr(model, "base_model") or not hasattr(model, "placements"):
            raise InputError(f"AnswerOnlyLoss needs a transformed causal LM (a MoAModel with an LM head), not "
                             f"{type(model).__name__}; pass the model itself to fit")
        head_path = next(name for name, m in model.model.named_modules() if m is head)
        adapted = [p.site.path for p in model.placements
                   if p.site.path == head_path or head_path.startswith(p.site.path + ".")]
        config = model.config
        changed = [k for k in ("final_logit_softcapping", "logit_scale") if getattr(config, k, None) not in (None, 1.0)]
        loss_type = getattr(model, "loss_type", None)
        if adapted:
            raise InputError(f"the LM head {head_path!r} carries an adapter; AnswerOnlyLoss applies the bare head, "
                             "so pass the model itself to fit")
        if changed:
            raise InputError(f"the config sets {', '.join(changed)}, which changes the logits after the LM head; "
                             "pass the model itself to fit")
        if loss_type not in (None, "ForCausalLM"):
            raise InputError(f"loss_type = {loss_type!r} is not the causal-LM cross-entropy AnswerOnlyLoss "
                             "computes; pass the model itself to fit")
        self.model, self.head = model, head

    def __call__(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor) -> types.SimpleNamespace:
        model = self.model
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        logits = self.head(hidden[:, :-1][keep])
        loss = F.cross_entropy(logits.float(), target[keep])
        coef = model.spec.router.aux_loss_coef
        if model.training and model.aux_loss is not None and coef > 0:
            loss = loss + coef * model.aux_loss
        return types.SimpleNamespace(loss=loss)


def fit(forward: Callable[..., object], optimizer: torch.optim.Optimizer, schedule: Schedule,
        batch_at: Callable[[int], Batch], *, start: int = 0, stop: int | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        on_step: Callable[[StepReport], None] = lambda report: None) -> list[StepReport]:
    """Run steps ``start + 1 … stop`` (default ``schedule.steps``) and return one report per step.

    Each step: ``batch_at(step)``; the learning rate :func:`lr_at`; the loss under ``autocast()``
    (refused if not finite); backward; the gradients of the optimizer's parameters clipped to
    ``schedule.max_grad_norm``; the optimizer step; ``on_step(report)``. ``forward`` is the model,
    or its ``torch.compile``-d form.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    stop = schedule.steps if stop is None else stop
    reports = []
    for step in range(start + 1, stop + 1):
        batch = batch_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(schedule, step)
        t = time.perf_counter()
        with autocast():
            loss = forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        if not torch.isfinite(loss):
            raise MoaFxError(f"the loss became {float(loss)} at step {step}; lower the learning rate or train in fp32")
        loss.backward()
        if schedule.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, schedule.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t
        report = StepReport(step=step, loss=float(loss.detach()), tokens=int(batch.attention_mask.sum()),
                            seconds=seconds)
        reports.append(report)
        on_step(report)
    return reports
