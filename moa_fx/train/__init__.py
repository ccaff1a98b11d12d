"""Training adapters: one loop, and the ``moa-fx train`` run around it.

- :mod:`.loop`: :func:`fit`, the loop every trainer here uses (``moa-fx train``, the evaluation in
  :mod:`moa_fx.eval.evaluate`): AdamW (:func:`make_optimizer`), warmup + cosine learning rate
  (:func:`lr_at` of a :class:`Schedule`), gradient clipping (max norm 1.0 by default), the model's
  own loss (answer tokens where the labels mask the prompt, plus the router's aux loss);
- :mod:`.run`: :class:`TrainConfig` → :func:`train` → :class:`TrainResult`: held-out evaluations,
  checkpoints and exact resume on top of :func:`fit`;
- :mod:`.checkpoint`: checkpoint files (never a pickle) and :func:`run_lock`, one run per directory.
"""

from .checkpoint import CHECKPOINT_DIR, LOCK_FILE, STATE_FILE, load_checkpoint, run_lock, save_checkpoint
from .loop import AnswerOnlyLoss, Schedule, StepReport, fit, lr_at, make_optimizer, trainable_parameters
from .run import Callbacks, TrainConfig, TrainResult, held_out_metrics, train

__all__ = ["TrainConfig", "TrainResult", "Callbacks", "train", "held_out_metrics", "Schedule", "StepReport", "fit", "AnswerOnlyLoss",
           "lr_at", "make_optimizer", "trainable_parameters", "save_checkpoint", "load_checkpoint",
           "CHECKPOINT_DIR", "STATE_FILE", "LOCK_FILE", "run_lock"]
