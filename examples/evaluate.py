"""Fine-tune SmolLM2-135M on BIG-bench tasks with five moa-fx methods and report a comparison table.

The methods (``lora``, ``mole_topk``, ``adamole``, ``soft_moa``, ``sparse_moa``) run at a comparable
trainable-parameter budget (see ``moa_fx.eval.evaluate.BUDGET_CHANGES``), on one task alone and on a
mixture of tasks, for several seeds. The report gives accuracy mean ± std next to chance and the
zero-shot base model, trainable parameters, step time, peak RSS and, for the routed methods, the mean
active experts per token; a chart shows the active experts per layer for adamole and sparse_moa.

    python examples/evaluate.py --out runs/eval                      # the full report (real assets)
    python examples/evaluate.py --quick --out /tmp/eval-quick         # smoke version, ~1 minute
    python examples/evaluate.py --methods lora,sparse_moa --tasks strategyqa --seeds 0 --steps 20

``--tasks`` takes settings: a task name is trained and scored alone, ``a+b+c`` is a mixture.
The real assets are fetched into ~/.cache/moa-fx on first use (ASSETS.md).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

from moa_fx.eval import evaluate as ev


def _list(text: str) -> list[str]:
    return [t for t in text.replace(" ", ",").split(",") if t]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", type=_list, default=None, help=f"comma list from {','.join(ev.METHODS)}")
    parser.add_argument("--tasks", type=_list, default=None,
                        help="comma list of settings: a task name (alone) or a+b+c (mixture)")
    parser.add_argument("--seeds", type=_list, default=None, help="comma list of seeds")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (default 1.0; 0 = none)")
    parser.add_argument("--max-len", type=int, default=None, help="tokens per sequence (prompt cut on the left)")
    parser.add_argument("--eval-examples", type=int, default=None, help="held-out examples scored per task")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the cores really free)")
    parser.add_argument("--no-isolate", action="store_true",
                        help="run everything in this process (peak RSS is then cumulative)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke version: tiny random model, synthetic tasks, no assets (~1 minute)")
    parser.add_argument("--out", default="eval-out", help="folder for results.json, results.md and the chart")
    parser.add_argument("--log", default=None, help="also append progress lines to this file")
    parser.add_argument("--report-from", default=None,
                        help="write the report from a results JSON (e.g. <out>/results.partial.json) instead of running")
    args = parser.parse_args(argv)

    overrides = {}
    for key, value in (("methods", args.methods), ("settings", args.tasks), ("steps", args.steps),
                       ("batch_size", args.batch_size), ("lr", args.lr), ("max_grad_norm", args.max_grad_norm),
                       ("max_len", args.max_len),
                       ("eval_examples", args.eval_examples), ("threads", args.threads)):
        if value is not None:
            overrides[key] = value
    if args.seeds is not None:
        overrides["seeds"] = [int(s) for s in args.seeds]
    if args.no_isolate:
        overrides["isolate"] = False
    cfg = ev.quick_config(**overrides) if args.quick else ev.EvalConfig(**overrides)

    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_from:
        # rebuild the report from a results file, e.g. the partial file of a run that was stopped
        results = json.loads(pathlib.Path(args.report_from).read_text(encoding="utf-8"))
        results.pop("summary", None)
    else:
        results = ev.run_evaluation(cfg, log_path=args.log, partial_path=out / "results.partial.json",
                                    command=command)
    paths = ev.write_report(results, args.out)
    print()
    print(ev.markdown_report(results).split("### Parameter budgets")[0])
    ev.terminal_chart(results)
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.0f} s")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
