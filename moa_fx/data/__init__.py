"""Training data for ``moa-fx train``: the embedded synthetic task mixture and JSONL files.

- :class:`DigitTasks`: the default, generated on the fly (no file, no download): copy / reverse /
  sort / increment of digit sequences, answer tokens only in the loss.
- :class:`JsonlData`: ``{"prompt", "completion"}`` or ``{"text"}`` lines, tokenized with a Hugging
  Face tokenizer.

Both give a batch for any step from ``(seed, step)`` alone, so a resumed run sees exactly the
batches an uninterrupted run would.
"""

from .synthetic import Batch, DigitTasks, JsonlData, batch_generator, check_batch

__all__ = ["Batch", "DigitTasks", "JsonlData", "batch_generator", "check_batch"]
