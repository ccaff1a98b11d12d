"""Training data for ``moa-fx train``: the embedded synthetic task mixture and JSONL files.

- :mod:`.batch`: :class:`Batch`, what every step feeds the model, and :func:`check_batch`, which
  every batch passes first;
- :mod:`.digits`: :class:`DigitTasks`, the default, generated on the fly (no file, no download):
  copy / reverse / sort / increment of digit sequences, answer tokens only in the loss;
- :mod:`.jsonl`: :class:`JsonlData`, ``{"prompt", "completion"}`` or ``{"text"}`` lines, tokenized
  with a Hugging Face tokenizer.

Both data sources give a batch for any step from ``(seed, step)`` alone, so a resumed run sees
exactly the batches an uninterrupted run would.
"""

from .batch import IGNORE_INDEX, Batch, batch_generator, check_batch
from .digits import DigitTasks
from .jsonl import JsonlData

__all__ = ["Batch", "IGNORE_INDEX", "DigitTasks", "JsonlData", "batch_generator", "check_batch"]
