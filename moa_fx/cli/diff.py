"""Compare two graphs: before and after a spec, two specs on one model, or two JSON dumps.

Nodes are matched by their stable id (module path + op + ordinal, see :mod:`moa_fx.graph_export`);
added nodes are grouped by the pass that made them and the site they serve (their provenance),
removed and changed nodes by module. ``--exit-code`` exits 1 when the graphs differ and 0 when
they are equal, like ``git diff --exit-code``.

examples:
  moa-fx diff tiny-llama --spec sparse_moa            # captured graph vs rewritten graph
  moa-fx diff tiny-llama --spec lora --spec adamole   # two specs on one model
  moa-fx diff a.json b.json --exit-code               # two `moa-fx dump --view json` files
"""

from __future__ import annotations

import argparse
import json
import pathlib

from ..passes import LOWER_CHOICES
from ..errors import MoaFxError
from ..graph_export import FORMAT, diff_graphs, export_graph
from .models import MODEL_HELP, build
from .render import render_diff

NAME = "diff"
HELP = "added/removed/changed nodes between two graphs (spec rewrite, two specs, or two JSON dumps)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="MODEL_OR_DUMP",
                   help=f"MODEL (with --spec) or two JSON dumps; MODEL is {MODEL_HELP}")
    p.add_argument("--spec", action="append", default=[], help="one spec: before vs after it; twice: A vs B")
    p.add_argument("--after", metavar="PASS", help="stop the rewrite after this pass")
    p.add_argument("--lower", choices=LOWER_CHOICES, default="auto",
                   help="lowering of LoRA mixtures in the rewritten graph (default: auto)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="keep one GEMM per reader of a shared input (skip the fuse_shared_input pass)")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when the graphs differ, 0 when equal")
    p.add_argument("--json", action="store_true", help="print the diff as JSON")
    p.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=None,
                   help="capture with dynamic batch/sequence (default: on, off for meta-device configs)")


def _load_dump(path: str) -> dict | None:
    """The export in ``path`` if it is a ``moa-fx dump --view json`` file, else None."""
    p = pathlib.Path(path)
    if p.suffix != ".json" or not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoaFxError(f"'{path}' is not valid JSON: {err}") from None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def diff_data(args: argparse.Namespace) -> tuple[dict, str, str]:
    """(diff, name of the before graph, name of the after graph)."""
    dumps = [_load_dump(x) for x in args.inputs]
    if len(args.inputs) == 2:
        if not all(dumps):
            bad = [x for x, d in zip(args.inputs, dumps) if d is None]
            raise MoaFxError(f"with two inputs both must be JSON dumps from `moa-fx dump --view json`; "
                             f"{bad[0]} is not")
        if args.spec:
            raise MoaFxError("--spec applies to a MODEL, not to two JSON dumps")
        return diff_graphs(dumps[0], dumps[1]), args.inputs[0], args.inputs[1]
    if len(args.inputs) != 1:
        raise MoaFxError(f"give one MODEL (with --spec) or two JSON dumps; got {len(args.inputs)} inputs")
    model = args.inputs[0]
    if dumps[0] is not None:
        raise MoaFxError(f"'{model}' is a graph dump; give a second dump to compare it with")
    if len(args.spec) == 1:
        built = build(model, dynamic=args.dynamic)
        before = export_graph(built.gm)
        # rewrite the same captured graph: two captures could differ in symbol names
        from ..passes import PassContext, pipeline, run_pipeline
        from ..sites import find_sites
        from ..spec import load_spec

        spec = load_spec(args.spec[0])
        run_pipeline(PassContext(built.gm, spec, find_sites(built.gm, spec)), pipeline(args.lower, args.fuse),
                     until=args.after)
        return diff_graphs(before, export_graph(built.gm)), model, f"{model} + {spec.name}"
    if len(args.spec) == 2:
        a = build(model, args.spec[0], until=args.after, dynamic=args.dynamic, lower=args.lower, fuse=args.fuse)
        b = build(model, args.spec[1], until=args.after, dynamic=args.dynamic, lower=args.lower, fuse=args.fuse)
        return (diff_graphs(export_graph(a.gm), export_graph(b.gm)), f"{model} + {a.spec.name}",
                f"{model} + {b.spec.name}")
    raise MoaFxError("diff MODEL needs --spec S (before vs after S) or --spec A --spec B (A vs B)")


def run(args: argparse.Namespace, console) -> int:
    diff, before, after = diff_data(args)
    if args.json:
        console.file.write(json.dumps({"before": before, "after": after, **diff}, indent=1, sort_keys=True) + "\n")
    else:
        render_diff(console, diff, before, after)
    return 1 if args.exit_code and not diff["equal"] else 0
