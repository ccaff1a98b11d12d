"""Deterministic batches: the synthetic digit-task mixture and tokenized JSONL files.

The default task (synthetic, generated from the seed; stated as such in the CLI help): each
example is ``BOS TASK d1 … dn SEP a1 … an EOS`` with n in [3, 8] digits and one of four tasks,
chosen uniformly:

- ``COPY``: a = d;  ``REVERSE``: a = reversed d;  ``SORT``: a = sorted d;
  ``INCREMENT``: a_i = (d_i + 1) mod 10.

The loss covers the answer tokens and EOS only. The task token is what a router can route on:
the four tasks need different computations over the same digits.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import torch

from ..errors import InputError

__all__ = ["Batch", "DigitTasks", "JsonlData", "batch_generator", "check_batch", "IGNORE_INDEX"]

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


class DigitTasks:
    """The embedded default data: copy / reverse / sort / increment of 3–8 digits."""

    PAD, BOS, EOS, SEP = 0, 1, 2, 3
    TASKS = ("copy", "reverse", "sort", "increment")
    TASK0 = 4  # task tokens 4..7
    DIGIT0 = 10  # digits 0..9 are tokens 10..19
    MIN_LEN, MAX_LEN = 3, 8
    SEQ_LEN = 2 + MAX_LEN + 1 + MAX_LEN + 1
    VOCAB = 20
    name = "digit-tasks"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < self.VOCAB:
            raise InputError(f"the default digit tasks need a vocabulary of at least {self.VOCAB} tokens; "
                             f"this model has {vocab_size}")

    def describe(self) -> str:
        return ("synthetic digit tasks (copy / reverse / sort / increment of 3-8 digits, generated from the seed; "
                "loss on answer tokens)")

    @staticmethod
    def answer(task: str, digits: list[int]) -> list[int]:
        if task == "copy":
            return list(digits)
        if task == "reverse":
            return digits[::-1]
        if task == "sort":
            return sorted(digits)
        return [(d + 1) % 10 for d in digits]

    def batch(self, batch_size: int, gen: torch.Generator) -> Batch:
        ids = torch.full((batch_size, self.SEQ_LEN), self.PAD, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        tasks = torch.randint(0, len(self.TASKS), (batch_size,), generator=gen).tolist()
        lengths = torch.randint(self.MIN_LEN, self.MAX_LEN + 1, (batch_size,), generator=gen).tolist()
        digits = torch.randint(0, 10, (batch_size, self.MAX_LEN), generator=gen).tolist()
        for i, (t, n) in enumerate(zip(tasks, lengths)):
            d = digits[i][:n]
            a = self.answer(self.TASKS[t], d)
            seq = [self.BOS, self.TASK0 + t, *(self.DIGIT0 + x for x in d), self.SEP,
                   *(self.DIGIT0 + x for x in a), self.EOS]
            ids[i, :len(seq)] = torch.tensor(seq)
            start = 2 + n + 1
            labels[i, start:len(seq)] = ids[i, start:len(seq)]
        return Batch(ids, (ids != self.PAD).long(), labels)


class JsonlData:
    """Lines of ``{"prompt": ..., "completion": ...}`` (loss on the completion) or ``{"text": ...}``."""

    def __init__(self, path: str | pathlib.Path, tokenizer, max_length: int = 256) -> None:
        self.path = pathlib.Path(path)
        self.name = str(path)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise InputError(f"JsonlData max_length = {max_length!r} must be an integer >= 2")
        if not self.path.is_file():
            raise InputError(f"--data '{path}' does not exist; give a .jsonl file with one JSON object per line")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = 0 if pad is None else int(pad)
        eos = tokenizer.eos_token_id
        rows: list[tuple[list[int], list[int]]] = []
        for lineno, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno} is not valid JSON ({err.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
                p = tokenizer(obj["prompt"], add_special_tokens=True)["input_ids"]
                c = tokenizer(obj["completion"], add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
                p, c = [], tokenizer(obj["text"], add_special_tokens=True)["input_ids"]
            else:
                raise InputError(f"{path}:{lineno}: each line needs string fields 'prompt' and 'completion', "
                                 "or 'text'")
            ids = (p + c)[:max_length]
            mask_from = min(len(p), len(ids))
            if len(ids) - mask_from < 1 or len(ids) < 2:
                continue
            rows.append((ids, [IGNORE_INDEX] * mask_from + ids[mask_from:]))
        if len(rows) < 2:
            raise InputError(f"--data '{path}' has fewer than 2 usable examples")
        # a fixed 10% (at least 1) held out for evaluation, chosen by a fixed permutation
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        n_eval = max(1, len(rows) // 10)
        self.eval_rows = [rows[i] for i in order[:n_eval]]
        self.train_rows = [rows[i] for i in order[n_eval:]]
        self.seq_len = max(len(r[0]) for r in rows)

    def describe(self) -> str:
        return f"{self.path} ({len(self.train_rows)} train / {len(self.eval_rows)} held-out examples)"

    def _stack(self, rows) -> Batch:
        ids = torch.full((len(rows), self.seq_len), self.pad, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        return Batch(ids, mask, labels)

    def batch(self, batch_size: int, gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self.train_rows), (batch_size,), generator=gen).tolist()
        return self._stack([self.train_rows[i] for i in idx])

    def eval_batches(self, batch_size: int) -> list[Batch]:
        return [self._stack(self.eval_rows[i:i + batch_size]) for i in range(0, len(self.eval_rows), batch_size)]
