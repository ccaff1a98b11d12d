"""The batch every training and evaluation step feeds the model, and the checks it passes first.

:class:`Batch` (input ids, attention mask, labels with :data:`IGNORE_INDEX` outside the answer);
:func:`check_batch` names a bad id, label or shape before the model sees it; :func:`batch_generator`
gives the generator a step's batch is drawn from, so the batch of a step depends on ``(seed, step)``
alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import InputError

__all__ = ["Batch", "IGNORE_INDEX", "batch_generator", "check_batch"]

# Labels hold this where no loss is taken (prompt and padding; PyTorch cross-entropy's default).
IGNORE_INDEX = -100


@dataclasses.dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S) int64
    attention_mask: torch.Tensor  # (B, S) int64, 0 on padding
    labels: torch.Tensor  # (B, S) int64, IGNORE_INDEX outside the answer


def check_batch(batch: Any, vocab_size: int, max_positions: int | None, batch_size: int | None = None) -> Batch:
    """The boundary between data (the digit tasks, a JSONL file, or any object with ``batch()``) and the
    model: every tensor a training or evaluation step feeds it is checked here, so a bad id or label
    is named instead of surfacing as an index error inside an embedding or the loss."""
    if not isinstance(batch, Batch):
        raise InputError(f"the data gave a {type(batch).__name__}, not a moa_fx.data.Batch(input_ids, attention_mask, "
                         "labels)")
    ids, mask, labels = batch.input_ids, batch.attention_mask, batch.labels
    for name, t in (("input_ids", ids), ("attention_mask", mask), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32) or t.dim() != 2:
            got = f"dtype {t.dtype}, shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"batch {name} must be an integer tensor of shape (batch, sequence); got {got}")
        if t.shape != ids.shape:
            raise InputError(f"batch {name} has shape {tuple(t.shape)} but input_ids have {tuple(ids.shape)}")
    rows, length = ids.shape
    if rows == 0 or (batch_size is not None and rows != batch_size):
        raise InputError(f"the data gave a batch of {rows} sequences; --batch-size asks for {batch_size}")
    if length < 2:
        raise InputError(f"the data gave sequences of {length} token(s); a language-model step needs at least 2")
    if max_positions is not None and length > max_positions:
        raise InputError(f"the data gave sequences of {length} tokens but the model has {max_positions} positions; "
                         "shorten the examples (JsonlData max_length)")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise InputError(f"batch input_ids hold ids in [{int(ids.min())}, {int(ids.max())}] but the model's vocabulary "
                         f"has {vocab_size} entries; use the model's own tokenizer")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError("batch attention_mask must hold only 0 (padding) and 1")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise InputError(f"batch labels hold {int(labels[bad][0])}; labels must be token ids in [0, {vocab_size}) or "
                         f"{IGNORE_INDEX} (ignored)")
    if not bool((labels != IGNORE_INDEX).any()):
        raise InputError(f"every label of the batch is {IGNORE_INDEX}: nothing to learn from (check the completions)")
    return batch


def batch_generator(seed: int, stream: int) -> torch.Generator:
    """The generator of batch ``stream`` (a training step, or an eval stream far from any step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % (2 ** 63))
