"""Evaluation protocol on BIG-bench tasks (ASSETS.md, section 3): multiple choice and generated answers.

Map:

- :class:`TaskExample` -- one multiple-choice prompt, its choices and the index of the right one;
  :class:`GenerationExample` -- one free-text prompt and its acceptable answers (``Example`` is either).
- :func:`examples_from_task_dict` / :func:`load_task` -- build examples from a
  BIG-bench ``task.json`` (a dict, or a task name fetched by
  :func:`moa_fx.eval.assets.bigbench_task`): ``target_scores`` makes a multiple-choice
  example, a ``target`` alone a generation example.
- :func:`split` / :func:`split_task` -- seeded train/test hold-out, grouped
  where examples share a source sentence (:func:`winowhy_group`);
  :func:`train_val_test` -- the same, twice, for a validation split kept apart from the test split;
  :func:`drop_long_prompts` -- keep the examples whose prompt fits a token budget.
- :func:`encode_for_training` -- token tensors with the loss on answer tokens only
  (:func:`answer_tokens` -- one example's prompt and answer ids).
- :func:`predict` / :func:`accuracy` -- zero-shot or fine-tuned evaluation: multiple choice by
  summed log-likelihood of each choice (:func:`score_choices`), generation by exact match of the
  greedy answer (:func:`generate_answers`, :func:`is_correct`); :func:`chance` is the accuracy of
  guessing.
- :func:`mixture` -- a shuffled multi-task training set from the training splits.

Prompt and answer text meet at one space: a prompt ending in ``"A: "`` is
stored as ``"...A:"`` with choices (or targets) ``" plausible"``, so the tokenizer sees the
usual word token. Training and scoring both tokenize the prompt and the answer
separately and concatenate the ids, so they see exactly the same tokens; generation
starts right after the prompt's tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from moa_fx.data import IGNORE_INDEX
from moa_fx.errors import AssetError, InputError

__all__ = [
    "TaskExample",
    "GenerationExample",
    "Example",
    "CHOSEN_TASKS",
    "GROUP_KEYS",
    "examples_from_task_dict",
    "load_task",
    "split",
    "split_task",
    "train_val_test",
    "drop_long_prompts",
    "winowhy_group",
    "answer_tokens",
    "ANSWER_END",
    "encode_for_training",
    "score_choices",
    "generate_answers",
    "predict",
    "is_correct",
    "accuracy",
    "chance",
    "first_choice_share",
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
ANSWER_END = "\n"  # a generated answer is read up to its first line break
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

    @property
    def answer_text(self) -> str:
        """The text trained on: the right choice."""
        return self.choices[self.answer]


@dataclass(frozen=True)
class GenerationExample:
    """One question answered in free text, scored by exact match (:func:`is_correct`).

    ``targets`` are the acceptable answers (BIG-bench's ``target``, a string or a list), each
    starting with the space moved from the prompt, as choices do; training puts the loss on
    ``targets[0]``. ``task`` names the source task.
    """

    prompt: str
    targets: tuple[str, ...]
    task: str = ""

    @property
    def answer_text(self) -> str:
        """The text trained on: the first target, then :data:`ANSWER_END`, so that a fine-tuned
        model learns to end its answer where :func:`generate_answers` stops reading."""
        return self.targets[0] + ANSWER_END


Example = TaskExample | GenerationExample


# --------------------------------------------------------------------------
# Building examples


def examples_from_task_dict(task: Mapping, *, name: str = "") -> list[Example]:
    """Examples of a BIG-bench JSON task, with the prompt format BIG-bench uses.

    Prompt = ``task_prefix`` + ``example_input_prefix`` + input
    [+ ``choice_prefix`` before each choice, if ``append_choices_to_input``]
    + ``example_output_prefix``. An example with ``target_scores`` is multiple choice
    (:class:`TaskExample`): the right choice is the one with the highest score, and an
    example whose top score is shared is rejected. An example with a ``target`` only (a
    string, or a list of acceptable strings) is scored on generated text
    (:class:`GenerationExample`).

    Example::

        >>> task = {"examples": [{"input": "2+2?", "target_scores": {"4": 1, "5": 0}}]}
        >>> example = examples_from_task_dict(task)[0]
        >>> example.prompt, example.choices, example.answer
        ('\\nQ: 2+2?\\n  choice: 4\\n  choice: 5\\nA:', [' 4', ' 5'], 0)
        >>> examples_from_task_dict({"examples": [{"input": "2+2?", "target": ["4", "four"]}]})[0]
        GenerationExample(prompt='\\nQ: 2+2?\\nA:', targets=(' 4', ' four'), task='')
    """
    label = f"task {name!r}" if name else "task dict"
    if not isinstance(task.get("examples"), list) or not task["examples"]:
        raise AssetError(f"{label} has no 'examples' list")
    task_prefix = task.get("task_prefix", "")
    input_prefix = task.get("example_input_prefix", _DEFAULT_INPUT_PREFIX)
    output_prefix = task.get("example_output_prefix", _DEFAULT_OUTPUT_PREFIX)
    choice_prefix = task.get("choice_prefix", _DEFAULT_CHOICE_PREFIX)
    append_choices = task.get("append_choices_to_input", True)

    examples: list[Example] = []
    for index, raw in enumerate(task["examples"]):
        if "target_scores" not in raw and "target" in raw:
            prompt = task_prefix + input_prefix + raw["input"] + output_prefix
            space = " " if prompt.endswith(" ") else ""
            targets = _targets(raw["target"], f"{label}, example {index}")
            examples.append(GenerationExample(prompt=prompt[: len(prompt) - len(space)],
                                              targets=tuple(space + t for t in targets), task=name))
            continue
        scores = raw.get("target_scores")
        if not isinstance(scores, Mapping) or len(scores) < 2:
            raise AssetError(
                f"{label}, example {index}: needs 'target_scores' with at least two choices "
                "(multiple choice) or a 'target' (generated answer)"
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


def _targets(target: object, where: str) -> list[str]:
    """BIG-bench's ``target``: one string or a non-empty list of strings, none of them blank."""
    targets = [target] if isinstance(target, str) else target
    if (not isinstance(targets, list) or not targets
            or not all(isinstance(t, str) and t.strip() for t in targets)):
        raise AssetError(f"{where}: 'target' = {target!r} must be a non-blank string or a non-empty list of them")
    return targets


def load_task(name: str, *, max_examples: int | None = None) -> list[Example]:
    """Examples of BIG-bench task ``name`` (fetched on first use), in file order.

    ``max_examples`` keeps the first N; use :func:`split` for a random subset.
    """
    from moa_fx.eval.assets import bigbench_task

    examples = examples_from_task_dict(bigbench_task(name), name=name)
    return examples if max_examples is None else examples[:max_examples]


# --------------------------------------------------------------------------
# Splits


def winowhy_group(example: Example) -> str:
    """The Winograd sentence an example explains: its text before ``" The '"``.

    winowhy repeats each sentence with up to 19 different explanations, so a
    split by example would leak the sentence into the test set.
    """
    head, found, _ = example.prompt.partition(" The '")
    return head if found else example.prompt


# Tasks whose examples must be split by group rather than one by one.
GROUP_KEYS: dict[str, Callable[[Example], Hashable]] = {"winowhy": winowhy_group}


def split(
    examples: Sequence[Example],
    *,
    seed: int,
    test_fraction: float = 0.2,
    min_test: int = 150,
    group_key: Callable[[Example], Hashable] | None = None,
) -> tuple[list[Example], list[Example]]:
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

    groups: dict[Hashable, list[Example]] = {}
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
    loader: Callable[[str], Sequence[Example]] | None = None,
) -> tuple[list[Example], list[Example]]:
    """:func:`split` of task ``name``'s examples, each tagged with ``name``, grouped
    where :data:`GROUP_KEYS` says so; returns ``(train, test)``.

    ``loader`` maps a task name to its examples (default :func:`load_task`).
    """
    examples = [_tagged(example, name) for example in (loader or load_task)(name)]
    return split(examples, seed=seed, group_key=GROUP_KEYS.get(name))


def train_val_test(
    examples: Sequence[Example],
    *,
    seed: int,
    test_fraction: float = 0.2,
    min_test: int = 150,
    val_fraction: float = 0.1,
    min_val: int = 0,
    group_key: Callable[[Example], Hashable] | None = None,
) -> tuple[list[Example], list[Example], list[Example]]:
    """Three disjoint splits, ``(train, val, test)``: :func:`split` with ``seed`` holds out the test
    set (the same test set :func:`split` gives with these arguments), then :func:`split` with
    ``seed + 1`` holds out the validation set from the rest, so a recipe can be chosen on ``val``
    without ever looking at ``test``. ``group_key`` keeps each group on one side of both cuts.
    """
    rest, test = split(examples, seed=seed, test_fraction=test_fraction, min_test=min_test, group_key=group_key)
    train, val = split(rest, seed=seed + 1, test_fraction=val_fraction, min_test=min_val, group_key=group_key)
    return train, val, test


def drop_long_prompts(tokenizer, examples: Sequence[Example], max_tokens: int) -> tuple[list[Example], int]:
    """The examples whose prompt is at most ``max_tokens`` tokens (with the tokenizer's special
    tokens, as training and scoring see it), in order, and how many were dropped."""
    kept = [e for e in examples if len(tokenizer(e.prompt, add_special_tokens=True)["input_ids"]) <= max_tokens]
    return kept, len(examples) - len(kept)


def mixture(
    task_names: Sequence[str],
    per_task: int,
    seed: int,
    *,
    split_seed: int = 0,
    loader: Callable[[str], Sequence[Example]] | None = None,
) -> list[Example]:
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


def _tagged(example: Example, name: str) -> Example:
    return example if example.task == name else dataclasses.replace(example, task=name)


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


def answer_tokens(tokenizer, example: Example, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the right answer (``example.answer_text``: the right choice, or
    a generation example's first target), the prompt cut from the left so that both fit in
    ``max_len`` (training and the routing statistics read exactly these tokens)."""
    prompt_ids, choice_ids = _token_pair(tokenizer, example.prompt, example.answer_text)
    return _fit(prompt_ids, choice_ids, max_len), choice_ids


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise InputError(
            "tokenizer.pad_token_id is None; set tokenizer.pad_token (e.g. to tokenizer.eos_token)"
        )
    return tokenizer.pad_token_id


def encode_for_training(
    tokenizer, examples: Sequence[Example], max_len: int
) -> dict[str, torch.Tensor]:
    """Right-padded token tensors for fine-tuning on the right answers (multiple choice: the right
    choice; generation: the first target, so prompt + " " + target with the loss on the target).

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
    with _eval_mode(model):
        for start in range(0, len(sequences), batch_size):
            batch = sequences[start : start + batch_size]
            sums = _choice_log_likelihoods(model, batch, pad, device)
            for (e, c, _, _), value in zip(batch, sums):
                scores[e][c] = value
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


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """A module in eval mode for the block, its training mode restored after (any callable passes)."""
    was_training = getattr(model, "training", None)
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _device_of(model) -> torch.device:
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


# Extra new tokens beyond the longest target's: room for a tokenization that differs from the
# target's own (digits split otherwise) and for the newline that ends the answer.
EXTRA_NEW_TOKENS = 2


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    examples: Sequence[GenerationExample],
    *,
    batch_size: int = 16,
    max_len: int | None = None,
    extra_tokens: int = EXTRA_NEW_TOKENS,
) -> list[str]:
    """Each example's greedy answer: the first line of the generated text, stripped.

    The rule: ``model.generate`` decodes greedily from the prompt's tokens (left-padded in
    batches, with an attention mask) for at most ``max_new_tokens`` = the longest target's token
    count over ``examples`` (its leading space included) + ``extra_tokens``, and a row stops early
    once its new text holds a newline (or at EOS). The answer is the new text (special tokens
    dropped) up to its first ``"\\n"``, stripped of surrounding whitespace; :func:`is_correct`
    compares it with each target, stripped.

    ``model`` is a transformers causal LM or a :class:`~moa_fx.MoAModel` (its ``generate`` is
    transformers' own over the transformed graph); it is put in eval mode for the call and
    restored after. ``max_len`` cuts prompts from the left so that prompt + new tokens fit.
    """
    if not examples:
        return []
    pad = _pad_id(tokenizer)
    budget = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for e in examples for t in e.targets)
    budget += extra_tokens
    prompts = []
    for e, example in enumerate(examples):
        ids = list(tokenizer(example.prompt, add_special_tokens=True)["input_ids"])
        if max_len is not None:
            if budget >= max_len:
                raise InputError(f"{budget} new tokens leave no room for the prompt at max_len = {max_len}; "
                                 "raise max_len")
            ids = ids[-(max_len - budget):]
        if not ids:
            raise InputError(f"example {e} has an empty prompt, so generation has no context")
        prompts.append(ids)
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    answers = [""] * len(examples)
    device = _device_of(model)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(rows):  # left padding: every row's new tokens start at ``width``
                input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                attention_mask[row, width - len(prompts[i]):] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=budget,
                do_sample=False, num_beams=1, pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([_NewlineStop(tokenizer, width)]),
            )
            for row, i in enumerate(rows):
                text = tokenizer.decode(out[row, width:].tolist(), skip_special_tokens=True)
                answers[i] = text.split("\n", 1)[0].strip()
    return answers


class _NewlineStop(StoppingCriteria):
    """Stops each row of a batch once its new tokens decode to text holding a newline."""

    def __init__(self, tokenizer, start: int) -> None:
        self.tokenizer, self.start = tokenizer, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = ["\n" in self.tokenizer.decode(row[self.start :].tolist(), skip_special_tokens=True)
                for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


Prediction = int | str


def predict(
    model, tokenizer, examples: Sequence[Example], *, batch_size: int = 16, max_len: int | None = None
) -> list[Prediction]:
    """One prediction per example: the chosen index (:func:`score_choices`) for a multiple-choice
    example, the generated answer (:func:`generate_answers`) for a generation example. Examples of
    both kinds may be mixed; each kind is scored in one call, in order."""
    predictions: list[Prediction | None] = [None] * len(examples)
    for kind, score in ((TaskExample, score_choices), (GenerationExample, generate_answers)):
        indices = [i for i, e in enumerate(examples) if isinstance(e, kind)]
        if indices:
            found = score(model, tokenizer, [examples[i] for i in indices], batch_size=batch_size, max_len=max_len)
            for i, value in zip(indices, found):
                predictions[i] = value
    return predictions  # type: ignore[return-value]


def is_correct(prediction: Prediction, example: Example) -> bool:
    """Multiple choice: the prediction is the right index. Generation: the prediction (a generated
    answer's first line) equals one of the targets, both stripped of surrounding whitespace."""
    if isinstance(example, GenerationExample):
        return isinstance(prediction, str) and prediction.strip() in {t.strip() for t in example.targets}
    return prediction == example.answer


def accuracy(predictions: Sequence[Prediction], examples: Sequence[Example]) -> float:
    """Fraction of ``predictions`` that are right (:func:`is_correct`)."""
    if len(predictions) != len(examples) or not examples:
        raise InputError(
            f"accuracy needs one prediction per example and at least one example; "
            f"got {len(predictions)} predictions for {len(examples)} examples"
        )
    return sum(is_correct(p, e) for p, e in zip(predictions, examples)) / len(examples)


def chance(examples: Sequence[Example]) -> float:
    """Expected accuracy of a uniform guess: 1 / choices for multiple choice, 0 for a generated
    answer (exact match of free text)."""
    if not examples:
        raise InputError("chance needs at least one example")
    return sum(1 / len(e.choices) if isinstance(e, TaskExample) else 0.0 for e in examples) / len(examples)


def first_choice_share(predictions: Sequence[Prediction], examples: Sequence[Example]) -> float | None:
    """Share of the multiple-choice predictions that pick the first listed choice (0 or 1: one label
    for everything); None when no example is multiple choice."""
    chosen = [p for p, e in zip(predictions, examples) if isinstance(e, TaskExample)]
    return sum(p == 0 for p in chosen) / len(chosen) if chosen else None
