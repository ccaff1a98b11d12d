"""Fine-tune SmolLM2-135M on BIG-bench tasks with six moa-fx methods and report a comparison.

The methods (``lora``, ``mole_topk``, ``adamole``, ``hydralora``, ``soft_moa``, ``sparse_moa``) run at a
comparable trainable-parameter budget (``moa_fx.eval.evaluate.BUDGET_CHANGES``), on each task alone and
on the mixture of all of them, for several seeds. The report (``moa_fx.eval.report``) gives accuracy
mean ± std, Δ against zero-shot and against LoRA with a paired bootstrap over seeds and examples, the
papers' claims as supported or not, trainable parameters, step time, peak RSS and, for routed methods,
active experts per token by layer; PNG charts show accuracy against step and active experts per layer.

Resumable: OUT/results.json is rewritten atomically after each (method, setting, seed, lr) run, and a
run already in it is not repeated, so a stopped evaluation continues where it stopped (same settings).

    # 1. the recipe sweep, on the validation split: every method at three learning rates, one seed
    python examples/evaluate.py --out runs/sweep --sweep-lrs 5e-4,1e-3,2e-3 --seeds 0
    # 2. the evaluation at each method's best rate (runs/sweep/recipes.json), scored on the test split
    python examples/evaluate.py --out runs/eval --recipes runs/sweep/recipes.json
    python examples/evaluate.py --quick --out /tmp/eval-quick        # smoke version, ~1 minute, no assets
    python examples/evaluate.py --out runs/eval --report-only        # rewrite the report from results.json
    python examples/evaluate.py --out runs/all --combine runs/a,runs/b  # one report over several evaluations

``--tasks`` takes settings: a task name is trained and scored alone, ``a+b+c`` is a mixture. The real
assets are fetched into ~/.cache/moa-fx on first use (ASSETS.md). On a GPU (``--device auto``) runs use
bf16 autocast; ``--batch-size`` may then be raised.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys
import time

from moa_fx.errors import InputError
from moa_fx.eval import evaluate as ev
from moa_fx.eval import report
from moa_fx.fileio import atomic_write_json


def _list(text: str) -> list[str]:
    return [t for t in text.replace(" ", ",").split(",") if t]


def _lrs(text: str) -> dict[str, float]:
    """``method=lr,method=lr``, or a JSON file of {method: lr} (a sweep's recipes.json)."""
    path = pathlib.Path(text)
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise argparse.ArgumentTypeError(f"{path} is not a JSON object of method → lr ({err})") from None
        if not isinstance(data, dict) or not all(isinstance(v, (int, float)) for v in data.values()):
            raise argparse.ArgumentTypeError(f"{path} must hold a JSON object of method → lr")
        return {str(k): float(v) for k, v in data.items()}
    out = {}
    for item in _list(text):
        method, sep, value = item.partition("=")
        try:
            out[method] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: give method=lr pairs (lora=2e-3) or a recipes JSON file") from None
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r}: give method=lr pairs (lora=2e-3) or a recipes JSON file")
    return out


def _combine(dirs: list[str], out_given: str | None) -> int:
    """``--combine``: the report over several results folders, written in ``--out`` (never an evaluation's)."""
    out = pathlib.Path(out_given or ".")
    try:
        if out_given is None:
            raise InputError("--combine needs --out: the folder for the combined report (a new one)")
        if any(pathlib.Path(d).resolve() == out.resolve() for d in dirs) or (out / "results.json").exists():
            raise InputError(f"--out {out} holds an evaluation (it is one of the folders combined, or has a "
                             "results.json); give a folder of its own, so that no evaluation's report is overwritten")
        parts = []
        for d in dirs:
            path = pathlib.Path(d) / "results.json"
            try:
                parts.append((d, json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise InputError(f"{path} is not a readable evaluation results file ({err})") from None
            if not isinstance(parts[-1][1], dict) or "config" not in parts[-1][1] or "runs" not in parts[-1][1]:
                raise InputError(f"{path} is not an evaluation results file (no config and runs)")
        try:
            results = report.combine(parts)
        except (KeyError, TypeError, AttributeError) as err:  # a hand-edited or truncated file
            raise InputError(f"a results.json among {', '.join(dirs)} is malformed (missing or wrong field: {err}); "
                             "rewrite it with --report-only from its evaluation, or leave that folder out") from None
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "combined.json", results)
    paths = report.write_report(results, out)
    print(report.markdown_report(results).split("### Parameter budgets")[0])
    print(f"wrote {', '.join(str(p) for p in [out / 'combined.json', *paths.values()])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="folder of results.json (resumed), results.md, the charts (default runs/eval)")
    parser.add_argument("--methods", type=_list, default=None,
                        help=f"comma list from {','.join(ev.METHODS)} (the default) "
                             f"and the variants {','.join(ev.VARIANTS)}")
    parser.add_argument("--tasks", type=_list, default=None,
                        help="comma list of settings: a task name (alone) or a+b+c (mixture); default: "
                             "each of moa_fx.eval.evaluate.TASKS and their mixture")
    parser.add_argument("--seeds", type=_list, default=None, help="comma list of seeds (default 0,1,2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 200)")
    parser.add_argument("--mixture-budget", choices=("per_task", "same"), default=None,
                        help="per_task (default): a mixture of n tasks trains n × steps, each task's examples "
                             "as alone; same: every setting trains --steps")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="learning rate of methods without a recipe (2e-3)")
    parser.add_argument("--recipes", type=_lrs, default=None, metavar="FILE|m=lr,...",
                        help="per-method learning rates: a sweep's recipes.json or method=lr pairs")
    parser.add_argument("--sweep-lrs", type=_list, default=None,
                        help="run every (method, setting, seed) at each of these rates; scores the validation "
                             "split unless --split is given, and writes OUT/recipes.json")
    parser.add_argument("--split", choices=("test", "val"), default=None)
    parser.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (default 1.0; 0 = none)")
    parser.add_argument("--eval-examples", type=int, default=None, help="scored examples per task (default 200)")
    parser.add_argument("--curve-every", type=int, default=None, help="validation score every N steps (0: none)")
    parser.add_argument("--save-every", type=int, default=None,
                        help="save each run's state every N steps, so a run cut off resumes there (default 100; 0: never)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the cores really free)")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs at once, each a fresh process with --threads threads (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None)
    parser.add_argument("--no-isolate", action="store_true",
                        help="run everything in this process (peak RSS is then cumulative)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke version: tiny random model, synthetic tasks, no assets (~1 minute)")
    parser.add_argument("--log", default=None, help="also append progress lines to this file")
    parser.add_argument("--report-only", action="store_true", help="write the report from OUT/results.json")
    parser.add_argument("--combine", type=_list, default=None, metavar="DIR,DIR,...",
                        help="write one report in OUT over these evaluations' results.json (same run settings): "
                             "every run, the claims pooled over all their settings; OUT/combined.json holds them")
    args = parser.parse_args(argv)
    if args.combine is not None:
        return _combine(args.combine, args.out)
    args.out = args.out or "runs/eval"

    overrides = {}
    for key, value in (("methods", args.methods), ("settings", args.tasks), ("steps", args.steps),
                       ("batch_size", args.batch_size), ("lr", args.lr), ("lrs", args.recipes),
                       ("max_grad_norm", args.max_grad_norm), ("eval_examples", args.eval_examples),
                       ("curve_every", args.curve_every), ("threads", args.threads), ("device", args.device),
                       ("precision", args.precision), ("split", args.split),
                       ("mixture_budget", args.mixture_budget), ("workers", args.workers),
                       ("save_every", args.save_every)):
        if value is not None:
            overrides[key] = value
    if args.seeds is not None:
        overrides["seeds"] = [int(s) for s in args.seeds]
    if args.sweep_lrs is not None:
        overrides["sweep_lrs"] = [float(x) for x in args.sweep_lrs]
        overrides.setdefault("split", "val")
    if args.no_isolate:
        overrides["isolate"] = False
    out = pathlib.Path(args.out)
    try:
        cfg = ev.quick_config(**overrides) if args.quick else ev.EvalConfig(**overrides)
        if args.report_only:
            results = ev.load_results(out / "results.json", cfg)
            if results is None:
                raise InputError(f"{out / 'results.json'} does not exist; run the evaluation first")
        else:
            command = "python " + " ".join(shlex.quote(a) for a in
                                           [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            results = ev.run_evaluation(cfg, out / "results.json", log_path=args.log, command=command)
            print(f"evaluation: {time.perf_counter() - t0:.0f} s")
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    paths = report.write_report(results, out)
    if cfg.sweep_lrs:
        recipes = report.best_lrs(results)
        atomic_write_json(out / "recipes.json", recipes)
        print(f"best learning rates on the {cfg.split} split: {recipes} → {out / 'recipes.json'}")
    print()
    print(report.markdown_report(results).split("### Per-task accuracy")[0].split("### Parameter budgets")[0])
    report.terminal_chart(results)
    print(f"wrote {', '.join(str(p) for p in [out / 'results.json', *paths.values()])}")
    return 1 if results.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
