"""Train the adapters of a transformed model (torch.compile by default); works offline out of the box.

Defaults: model `small-llama` (built-in LLaMA, hidden 128, 4 layers, random frozen weights from a
fixed seed), spec `sparse_moa`, and data generated deterministically from the seed: a SYNTHETIC
mixture of four digit tasks (copy / reverse / sort / increment of 3-8 digits, loss on the answer
tokens only), so the router has tasks to tell apart. Each evaluation reports the held-out loss and
answer accuracy (every answer token right under greedy decoding).

One run at a time per OUT: a second run on the same directory fails while the first holds an
exclusive lock on OUT/.moa-fx-train.lock (the message names its pid and host); the lock goes with
the process that holds it, so a killed run leaves nothing to remove.

Each step clips the gradient norm to --max-grad-norm (1.0); the learning rate rises linearly over
the first 20 steps, then decays along a cosine to 10% of --lr at --steps (moa_fx.train.loop: the
loop the evaluation in moa_fx.eval uses too).

Writes OUT/checkpoint (adapters, optimizer state and RNG state in safetensors, step and loss
history in JSON; never a pickle) every --save-every steps and at the end, and OUT/adapter
(MoAModel.save_adapters) at the end. --resume continues from OUT/checkpoint along the same loss
curve as an uninterrupted run.

examples:
  moa-fx train --out runs/demo
  moa-fx train --out runs/demo --resume --steps 600
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
from .render import fmt_count, render_router_stats

NAME = "train"
HELP = "train a transformed model (default: offline synthetic digit tasks on a built-in model)"

DEFAULTS = TrainConfig(out="")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--out", required=True, help="output directory (checkpoint/ and adapter/ go here)")
    p.add_argument("--model", default=d.model, help=f"{MODEL_HELP} (default: {d.model})")
    p.add_argument("--spec", default=d.spec, help=f"preset name or spec file (default: {d.spec})")
    p.add_argument("--data", metavar="FILE.jsonl", help='{"prompt", "completion"} or {"text"} lines, tokenized with '
                   "the model directory's tokenizer (default: the synthetic digit tasks)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"sequences per step (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate; warmup then cosine (default: {d.lr})")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"clip the gradient norm to this before each step; 0 = no clipping (default: {d.max_grad_norm})")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision, help="bf16 = autocast (default: fp32)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile,
                   help="torch.compile the training forward/backward (default: on)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the adapter init and the data order")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help=f"steps between evaluations (default: {d.eval_every})")
    p.add_argument("--save-every", type=int, default=d.save_every, help=f"steps between checkpoints (default: {d.save_every})")
    p.add_argument("--eval-examples", type=int, default=d.eval_examples, help="held-out digit-task examples")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--stop-after", type=int, metavar="STEP", help="stop after STEP with a checkpoint, as if interrupted "
                   "(the schedule still follows --steps); for testing resume")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 for built-in models, which are too "
                   "small for intra-op parallelism to pay; torch's default otherwise)")


def _data(args: argparse.Namespace, model):
    if args.data is None:
        return None
    from ..data import JsonlData

    if args.model in TINY or not pathlib.Path(args.model).is_dir():
        raise MoaFxError("--data needs --model to be a Hugging Face model directory with a tokenizer")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as err:
        raise MoaFxError(f"cannot load a tokenizer from '{args.model}': {err}") from None
    return JsonlData(args.data, tok)


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
        line = f"step {step}: {self.last} · eval loss {metrics['eval_loss']:.4f}{acc}"
        (self.progress.console.print if self.live else self.console.print)(line)

    def stop(self) -> None:
        self.progress.stop()


def run(args: argparse.Namespace, console) -> int:
    cfg = TrainConfig(out=args.out, model=args.model, spec=args.spec, data=args.data, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, max_grad_norm=args.max_grad_norm, precision=args.precision, compile=args.compile,
                      seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
                      eval_examples=args.eval_examples, resume=args.resume, stop_after=args.stop_after)
    if args.threads is not None and args.threads < 1:
        raise SettingError(f"--threads = {args.threads} must be >= 1")
    model, how = load_model(args.model)
    if how == "meta":
        raise MoaFxError(f"'{args.model}' has no weights (a config is built on the meta device); train a built-in "
                         f"model ({', '.join(TINY)}) or a model directory with weights")
    data = _data(args, model)
    threads = args.threads or (1 if args.model in TINY else None)
    old_threads = torch.get_num_threads()
    display = _Display(console, cfg.steps)
    callbacks = Callbacks(on_start=display.start, on_step=display.step, on_eval=display.eval)
    t0 = time.perf_counter()
    try:
        if threads:
            torch.set_num_threads(threads)
        result = train(cfg, model, data, callbacks)
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
    console.print(f"adapter: {result.adapter_dir}\ncheckpoint: {result.checkpoint_dir}")
    return 0
