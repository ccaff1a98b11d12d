"""The default data of ``moa-fx train``: a synthetic digit-task mixture, generated from the seed.

Each example is ``BOS TASK d1 … dn SEP a1 … an EOS`` with n in [3, 8] digits and one of four tasks,
chosen uniformly:

- ``COPY``: a = d;  ``REVERSE``: a = reversed d;  ``SORT``: a = sorted d;
  ``INCREMENT``: a_i = (d_i + 1) mod 10.

The loss covers the answer tokens and EOS only. The task token is what a router can route on:
the four tasks need different computations over the same digits.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .batch import IGNORE_INDEX, Batch

__all__ = ["DigitTasks"]


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
