"""The held-out protocol shared by the task survey and the evaluation: one task's examples without
over-long prompts, split into train / validation / test (:func:`task_data`).

Prompts longer than ``max_prompt_tokens`` are dropped (and counted) before splitting; the test split is
:func:`moa_fx.eval.tasks.split`'s with ``split_seed`` (grouped where :data:`moa_fx.eval.tasks.GROUP_KEYS`
says), and its first ``max_examples`` are the scored examples; a validation split is cut from the rest
and never trained on, so a recipe can be chosen on it without looking at the test split.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

from moa_fx.errors import InputError
from moa_fx.eval import tasks as T

__all__ = ["TaskData", "task_data", "kind_of_examples"]


@dataclasses.dataclass(frozen=True)
class TaskData:
    """One task under the held-out protocol: ``test`` holds the scored examples only."""

    name: str
    train: list[T.Example]
    val: list[T.Example]
    test: list[T.Example]
    info: dict[str, Any]


def kind_of_examples(examples: Sequence[T.Example]) -> str:
    kinds = {type(e) for e in examples}
    if kinds == {T.TaskExample}:
        return "multiple_choice"
    return "generation" if kinds == {T.GenerationExample} else "mixed"


def task_data(name: str, examples: Sequence[T.Example], tokenizer, *, max_prompt_tokens: int = 96,
              max_examples: int = 200, split_seed: int = 0) -> TaskData:
    """Drop prompts over ``max_prompt_tokens``, then train / val / test with ``split_seed``.

    The test split holds ``max(min(max_examples, n // 4), 20% of n)`` examples (the first
    ``max_examples`` are scored), the validation split 10% of the rest (at least
    ``min(100, rest // 5)``). ``info`` describes the task: sizes, dropped prompts, prompt and answer
    lengths, chance, and the accuracy of a constant answer learnt from the training split (the most
    common answer text, or for multiple choice the most common answer position if that scores higher).
    """
    examples = [e if e.task == name else dataclasses.replace(e, task=name) for e in examples]
    kept, dropped = T.drop_long_prompts(tokenizer, examples, max_prompt_tokens)
    if len(kept) < 20:
        raise InputError(f"task {name!r}: {len(kept)} of {len(examples)} examples have prompts of at most "
                         f"{max_prompt_tokens} tokens; too few to split into train, validation and test; raise max_prompt_tokens or choose another task")
    group_key = T.GROUP_KEYS.get(name)
    rest_n = len(kept) - min(max_examples, len(kept) // 4)
    train, val, test = T.train_val_test(kept, seed=split_seed, min_test=min(max_examples, len(kept) // 4),
                                        min_val=min(100, rest_n // 5), group_key=group_key)
    scored = test[: max_examples]
    prompt_lengths = [len(tokenizer(e.prompt, add_special_tokens=True)["input_ids"]) for e in kept]
    answer_lengths = [len(tokenizer(e.answer_text, add_special_tokens=False)["input_ids"]) for e in kept]
    info = {
        "kind": kind_of_examples(kept), "examples": len(examples), "dropped_long_prompts": dropped,
        "train": len(train), "val": len(val), "test": len(test), "scored": len(scored),
        "prompt_tokens_median": statistics.median(prompt_lengths), "prompt_tokens_max": max(prompt_lengths),
        "answer_tokens_max": max(answer_lengths), "chance": T.chance(scored),
        "majority": _majority(train, scored),
    }
    return TaskData(name=name, train=train, val=val, test=scored, info=info)


def _majority(train: Sequence[T.Example], test: Sequence[T.Example]) -> float:
    """Test accuracy of a constant answer learnt from the training split: its most common answer text
    (a label prior, or one string for every free-text question) or, for multiple choice, its most
    common answer position, whichever scores higher."""
    text = collections.Counter(e.answer_text.strip() for e in train).most_common(1)[0][0]
    scores = [sum(e.answer_text.strip() == text if isinstance(e, T.TaskExample) else T.is_correct(text, e)
                  for e in test)]
    positions = collections.Counter(e.answer for e in train if isinstance(e, T.TaskExample))
    if positions:
        index = positions.most_common(1)[0][0]
        scores.append(sum(isinstance(e, T.TaskExample) and e.answer == index for e in test))
    return max(scores) / len(test)
