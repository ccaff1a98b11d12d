"""Survey BIG-bench tasks on SmolLM2-135M: zero-shot held-out accuracy and, with --pilot, held-out
accuracy after a LoRA pilot fine-tune (issue #18's recipe: r 8, α 16 on q,k,v,o,down; 200 steps × 8;
AdamW lr 2e-3, warmup + cosine; loss on the answer tokens; clipping 1.0).

Multiple-choice tasks are scored by summed choice log-likelihood, free-text tasks (BIG-bench ``target``)
by exact match of the greedy answer's first line. Prompts over 96 tokens are dropped (and counted);
the validation split is kept out of training and out of scoring. Resumable: the results file is
rewritten atomically after each task's measurement, and what it already holds is not measured again,
so a stopped survey continues where it stopped. A Markdown table is written next to it (.md).

    python examples/survey_tasks.py --out examples/results/survey.json           # zero-shot, every candidate
    python examples/survey_tasks.py --pilot --tasks hyperbaton,navigate --out examples/results/survey.json
    python examples/survey_tasks.py --quick --pilot --out /tmp/survey-quick.json  # tiny model, synthetic tasks
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from moa_fx.eval import survey


def _list(text: str) -> list[str]:
    return [t for t in text.replace(" ", ",").split(",") if t]


class RichReporter(survey.Reporter):
    """Progress bars for the tasks and for a pilot's steps; log lines printed above them (and to --log)."""

    def __init__(self, progress, total: int, log_path: str | None) -> None:
        self.progress, self.log_path = progress, log_path
        self.tasks = progress.add_task("survey", total=total)
        self.steps = progress.add_task("pilot steps", total=1, visible=False)

    def log(self, message: str) -> None:
        import time

        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        self.progress.console.print(line, markup=False, highlight=False)
        if self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    def stage(self, task: str, stage: str, steps: int) -> None:
        self.progress.update(self.tasks, description=f"{task} · {stage}")
        self.progress.update(self.steps, total=max(steps, 1), completed=0, visible=steps > 0)

    def step(self, report) -> None:
        self.progress.update(self.steps, completed=report.step, description=f"step loss {report.loss:.3f}")
        if not self.progress.console.is_terminal and report.step % 25 == 0:  # no live bar in a log file
            self.log(f"  step {report.step}: loss {report.loss:.4f} ({report.seconds:.2f} s)")

    def done(self, task: str, stage: str) -> None:
        self.progress.advance(self.tasks)
        self.progress.update(self.steps, visible=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--out", default="examples/results/survey.json", help="results JSON (resumed if it exists)")
    parser.add_argument("--tasks", type=_list, default=None,
                        help="comma list of BIG-bench tasks (task or task/subtask), in the order to run; "
                             "default: the candidates (moa_fx.eval.survey.CANDIDATES)")
    parser.add_argument("--pilot", action="store_true", help="also fine-tune the LoRA pilot and score it")
    parser.add_argument("--steps", type=int, default=200, help="pilot training steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0, help="the pilot's initialisation and data order")
    parser.add_argument("--max-examples", type=int, default=200, help="held-out examples scored per task")
    parser.add_argument("--max-prompt-tokens", type=int, default=96, help="longer prompts are dropped")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the cores really free)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny random model and synthetic tasks (parity, compare, successor): no assets")
    parser.add_argument("--log", default=None, help="also append the log lines to this file")
    args = parser.parse_args(argv)

    options = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   max_examples=args.max_examples, max_prompt_tokens=args.max_prompt_tokens, threads=args.threads)
    if args.quick:
        options.update(model="tiny", data="synthetic", tasks=survey.QUICK_TASKS)
    if args.tasks:
        options["tasks"] = args.tasks
    cfg = survey.SurveyConfig(**options)

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    out = pathlib.Path(args.out)
    stages = len(cfg.tasks) * (2 if args.pilot else 1)
    columns = (TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns) as progress:
        reporter = RichReporter(progress, stages, args.log)
        reporter.log(f"survey of {len(cfg.tasks)} tasks{' with pilots (' + cfg.recipe() + ')' if args.pilot else ''} "
                     f"-> {out}")
        results = survey.run_survey(cfg, out, pilots=args.pilot, reporter=reporter)
    print(survey.survey_table(results))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    failed = [n for n in cfg.tasks if results["tasks"].get(n, {}).get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
