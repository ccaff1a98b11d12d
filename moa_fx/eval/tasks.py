"""Multiple-choice evaluation protocol on BIG-bench tasks (ASSETS.md, section 3).

Map:

- :class:`TaskExample` -- one prompt, its choices and the index of the right one.
- :func:`examples_from_task_dict` / :func:`load_task` -- build examples from a
  BIG-bench ``task.json`` (a dict, or a task name fetched by
  :func:`moa_fx.eval.assets.bigbench_task`).
- :func:`split` / :func:`split_task` -- seeded train/test hold-out, grouped
  where examples share a source sentence (:func:`winowhy_group`).
- :func:`encode_for_training` -- token tensors with the loss on answer tokens only
  (:func:`answer_tokens` -- one example's prompt and answer ids).
- :func:`score_choices` / :func:`accuracy` -- zero-shot or fine-tuned evaluation
  by summed log-likelihood of each choice.
- :func:`mixture` -- a shuffled multi-task training set from the training splits.

Prompt and choice text meet at one space: a prompt ending in ``"A: "`` is
stored as ``"...A:"`` with choices ``" plausible"``, so the tokenizer sees the
usual word token. Training and scoring both tokenize the prompt and the choice
separately and concatenate the ids, so they see exactly the same tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

import torch

from moa_fx.data import IGNORE_INDEX
from moa_fx.errors import AssetError, InputError

__all__ = [
    "TaskExample",
    "CHOSEN_TASKS",
    "GROUP_KEYS",
    "examples_from_task_dict",
    "load_task",
    "split",
    "split_task",
    "winowhy_group",
    "answer_tokens",
    "encode_for_training",
    "score_choices",
    "accuracy",
    "mixture",
]

# The six single-answer tasks of ASSETS.md, section 2.
CHOSEN_TASKS = (
    "sports_understanding",
    "navigate",
    "strategyqa",
    "winowhy",
    "goal_step_wikihow/step_inference",
    "tracking_shuffled_objects/three_objects",
)

# BIG-bench defaults for fields a task.json may omit.
_DEFAULT_INPUT_PREFIX = "\nQ: "
_DEFAULT_OUTPUT_PREFIX = "\nA: "
_DEFAULT_CHOICE_PREFIX = "\n  choice: "

@dataclass(frozen=True)
class TaskExample:
    """One multiple-choice question.

    ``prompt + choices[i]`` is the full text for choice ``i``; ``answer`` is
    the index of the right choice; ``task`` names the source task (empty when
    built from an anonymous dict).
    """

    prompt: str
    choices: list[str]
    answer: int
    task: str = ""


# --------------------------------------------------------------------------
# Building examples


def examples_from_task_dict(task: Mapping, *, name: str = "") -> list[TaskExample]:
    """Examples of a BIG-bench JSON task, with the prompt format BIG-bench uses.

    Prompt = ``task_prefix`` + ``example_input_prefix`` + input
    [+ ``choice_prefix`` before each choice, if ``append_choices_to_input``]
    + ``example_output_prefix``. The right choice is the one with the highest
    ``target_scores`` value; an example whose top score is shared is rejected.

    Example::

        >>> task = {"examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0}}]}
        >>> example = examples_from_task_dict(task)[0]
        >>> example.prompt, example.choices, example.answer
        ('\\nQ: 2+2?\\n  choice: 4\\n  choice: 5\\nA:', [' 4', ' 5'], 0)
    """
    label = f"task {name!r}" if name else "task dict"
    if not isinstance(task.get("examples"), list) or not task["examples"]:
        raise AssetError(f"{label} has no 'examples' list")
    task_prefix = task.get("task_prefix", "")
    input_prefix = task.get("example_input_prefix", _DEFAULT_INPUT_PREFIX)
    output_prefix = task.get("example_output_prefix", _DEFAULT_OUTPUT_PREFIX)
    choice_prefix = task.get("choice_prefix", _DEFAULT_CHOICE_PREFIX)
    append_choices = task.get("append_choices_to_input", True)

    examples = []
    for index, raw in enumerate(task["examples"]):
        scores = raw.get("target_scores")
        if not isinstance(scores, Mapping) or len(scores) < 2:
            raise AssetError(
                f"{label}, example {index}: needs 'target_scores' with at least two choices; "
                "free-text tasks are not supported"
            )
        choices = list(scores)
        best = max(scores.values())
        winners = [i for i, choice in enumerate(choices) if scores[choice] == best]
        if len(winners) != 1:
            raise AssetError(
                f"{label}, example {index}: {len(winners)} choices share the top score {best}; "
                "only single-answer tasks are supported"
            )
        body = raw["input"]
        if append_choices:
            body += "".join(choice_prefix + choice for choice in choices)
        prompt = task_prefix + input_prefix + body + output_prefix
        # The prompt's trailing space moves onto every choice (module docstring).
        space = " " if prompt.endswith(" ") else ""
        examples.append(
            TaskExample(
                prompt=prompt[: len(prompt) - len(space)],
                choices=[space + choice for choice in choices],
                answer=winners[0],
                task=name,
            )
        )
    return examples


def load_task(name: str, *, max_examples: int | None = None) -> list[TaskExample]:
    """Examples of BIG-bench task ``name`` (fetched on first use), in file order.

    ``max_examples`` keeps the first N; use :func:`split` for a random subset.
    """
    from moa_fx.eval.assets import bigbench_task

    examples = examples_from_task_dict(bigbench_task(name), name=name)
    return examples if max_examples is None else examples[:max_examples]


# --------------------------------------------------------------------------
# Splits


def winowhy_group(example: TaskExample) -> str:
    """The Winograd sentence an example explains: its text before ``" The '"``.

    winowhy repeats each sentence with up to 19 different explanations, so a
    split by example would leak the sentence into the test set.
    """
    head, found, _ = example.prompt.partition(" The '")
    return head if found else example.prompt


# Tasks whose examples must be split by group rather than one by one.
GROUP_KEYS: dict[str, Callable[[TaskExample], Hashable]] = {"winowhy": winowhy_group}


def split(
    examples: Sequence[TaskExample],
    *,
    seed: int,
    test_fraction: float = 0.2,
    min_test: int = 150,
    group_key: Callable[[TaskExample], Hashable] | None = None,
) -> tuple[list[TaskExample], list[TaskExample]]:
    """Shuffle with ``seed`` and hold out a test set; returns ``(train, test)``.

    The test set gets ``max(min_test, round(test_fraction * n))`` examples. With
    ``group_key``, whole groups move together (shuffled by group), so the test
    set may overshoot the target by up to one group and no group is on both sides.
    """
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"test_fraction = {test_fraction} must lie strictly between 0 and 1")
    n = len(examples)
    wanted = max(min_test, round(test_fraction * n))
    if wanted >= n:
        raise InputError(
            f"a test set of {wanted} examples leaves no training data out of {n}; "
            "lower min_test or test_fraction"
        )
    rng = random.Random(seed)
    if group_key is None:
        order = list(examples)
        rng.shuffle(order)
        return order[wanted:], order[:wanted]

    groups: dict[Hashable, list[TaskExample]] = {}
    for example in examples:
        groups.setdefault(group_key(example), []).append(example)
    keys = list(groups)
    rng.shuffle(keys)
    train, test = [], []
    for key in keys:
        (test if len(test) < wanted else train).extend(groups[key])
    if not train:
        raise InputError(
            f"{len(keys)} groups of {n} examples: holding out {wanted} examples takes every "
            "group; lower min_test or test_fraction"
        )
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def split_task(
    name: str,
    *,
    seed: int,
    loader: Callable[[str], Sequence[TaskExample]] | None = None,
) -> tuple[list[TaskExample], list[TaskExample]]:
    """:func:`split` of task ``name``'s examples, each tagged with ``name``, grouped
    where :data:`GROUP_KEYS` says so; returns ``(train, test)``.

    ``loader`` maps a task name to its examples (default :func:`load_task`).
    """
    examples = [_tagged(example, name) for example in (loader or load_task)(name)]
    return split(examples, seed=seed, group_key=GROUP_KEYS.get(name))


def mixture(
    task_names: Sequence[str],
    per_task: int,
    seed: int,
    *,
    split_seed: int = 0,
    loader: Callable[[str], Sequence[TaskExample]] | None = None,
) -> list[TaskExample]:
    """A shuffled multi-task training set: ``per_task`` examples from each task's
    training split (``split_seed``, grouped per :data:`GROUP_KEYS`), each tagged
    with its task name.

    ``loader`` maps a task name to its examples (default :func:`load_task`);
    the test split is never drawn from, so evaluating on ``split_task(name,
    seed=split_seed)[1]`` stays clean.
    """
    rng = random.Random(seed)
    mixed = []
    for name in task_names:
        train, _ = split_task(name, seed=split_seed, loader=loader)
        if per_task > len(train):
            raise InputError(
                f"per_task = {per_task} but task {name!r} has {len(train)} training examples; "
                f"choose per_task <= {len(train)}"
            )
        mixed.extend(rng.sample(train, per_task))
    rng.shuffle(mixed)
    return mixed


def _tagged(example: TaskExample, name: str) -> TaskExample:
    if example.task == name:
        return example
    return TaskExample(example.prompt, example.choices, example.answer, task=name)


# --------------------------------------------------------------------------
# Tokens


def _token_pair(tokenizer, prompt: str, choice: str) -> tuple[list[int], list[int]]:
    # The prompt gets the tokenizer's usual special tokens (a BOS where it adds
    # one); the choice is a continuation and gets none.
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
    if not choice_ids:
        raise InputError(f"choice {choice!r} encodes to no tokens")
    return list(prompt_ids), list(choice_ids)


def _fit(prompt_ids: list[int], choice_ids: list[int], max_len: int) -> list[int]:
    """Drop prompt tokens from the left so prompt + choice fit in ``max_len``."""
    if len(choice_ids) >= max_len:
        raise InputError(
            f"a choice of {len(choice_ids)} tokens leaves no room for its prompt at "
            f"max_len = {max_len}; raise max_len"
        )
    keep = max_len - len(choice_ids)
    return prompt_ids[-keep:]


def answer_tokens(tokenizer, example: TaskExample, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the right answer, the prompt cut from the left so that both
    fit in ``max_len`` (training and the routing statistics read exactly these tokens)."""
    prompt_ids, choice_ids = _token_pair(tokenizer, example.prompt, example.choices[example.answer])
    return _fit(prompt_ids, choice_ids, max_len), choice_ids


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise InputError(
            "tokenizer.pad_token_id is None; set tokenizer.pad_token (e.g. to tokenizer.eos_token)"
        )
    return tokenizer.pad_token_id


def encode_for_training(
    tokenizer, examples: Sequence[TaskExample], max_len: int
) -> dict[str, torch.Tensor]:
    """Right-padded token tensors for fine-tuning on the right answers.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each of shape
    ``(len(examples), L)`` with ``L`` the longest sequence, at most ``max_len``.
    ``labels`` equals ``input_ids`` on the answer tokens and is -100 on prompt
    and padding positions, so a causal LM's shifted loss covers only the
    answer. Over-long prompts lose tokens from the left; the answer is kept.
    """
    if not examples:
        raise InputError("encode_for_training got no examples")
    pad = _pad_id(tokenizer)
    rows = []
    for example in examples:
        prompt_ids, choice_ids = answer_tokens(tokenizer, example, max_len)
        rows.append((prompt_ids + choice_ids, [IGNORE_INDEX] * len(prompt_ids) + choice_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, row_labels) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(row_labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_choices(
    model,
    tokenizer,
    examples: Sequence[TaskExample],
    *,
    batch_size: int = 16,
    max_len: int | None = None,
) -> list[int]:
    """Predicted choice index per example: the choice whose tokens have the
    highest summed log-likelihood given the prompt (ties go to the lower index).

    ``model`` is any callable taking ``input_ids`` and ``attention_mask``
    (right-padded) and returning an object with ``.logits`` of shape
    ``(batch, seq, vocab)``; a module is put in eval mode for the call and
    restored after. Sequences are batched by length to limit padding.
    """
    pad = _pad_id(tokenizer)
    sequences = []  # (example index, choice index, token ids, number of choice tokens)
    for e, example in enumerate(examples):
        for c, choice in enumerate(example.choices):
            prompt_ids, choice_ids = _token_pair(tokenizer, example.prompt, choice)
            if max_len is not None:
                prompt_ids = _fit(prompt_ids, choice_ids, max_len)
            if not prompt_ids:
                raise InputError(
                    f"example {e} has an empty prompt, so its first choice token has no context"
                )
            sequences.append((e, c, prompt_ids + choice_ids, len(choice_ids)))
    sequences.sort(key=lambda item: len(item[2]))

    scores = [[float("-inf")] * len(example.choices) for example in examples]
    device = _device_of(model)
    was_training = getattr(model, "training", None)
    if was_training:
        model.eval()
    try:
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            sums = _choice_log_likelihoods(model, batch, pad, device)
            for (e, c, _, _), value in zip(batch, sums):
                scores[e][c] = value
    finally:
        if was_training:
            model.train()
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


def _choice_log_likelihoods(model, batch, pad: int, device) -> list[float]:
    width = max(len(ids) for _, _, ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    # target[b, t] is True where token t is a choice token, predicted from position t - 1.
    target = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (_, _, ids, n_choice) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        target[row, len(ids) - n_choice : len(ids)] = True
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    rows, cols = target.nonzero(as_tuple=True)
    # Normalise only the rows that predict a choice token, in fp32 because the
    # sum of many log-probabilities is compared across choices.
    log_probs = torch.log_softmax(logits[rows.to(device), (cols - 1).to(device)].float(), dim=-1)
    token_log_probs = log_probs.gather(1, input_ids[rows, cols].to(device).unsqueeze(1)).squeeze(1)
    sums = torch.zeros(len(batch), dtype=torch.float64)
    sums.index_add_(0, rows, token_log_probs.double().cpu())
    return sums.tolist()


def _device_of(model) -> torch.device:
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


def accuracy(predictions: Sequence[int], examples: Sequence[TaskExample]) -> float:
    """Fraction of ``predictions`` equal to the examples' right answers."""
    if len(predictions) != len(examples) or not examples:
        raise InputError(
            f"accuracy needs one prediction per example and at least one example; "
            f"got {len(predictions)} predictions for {len(examples)} examples"
        )
    return sum(p == e.answer for p, e in zip(predictions, examples)) / len(examples)
