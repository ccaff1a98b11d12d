"""Show a model's captured FX graph, or the graph after a spec's rewrite (or after one pass).

Views: tree (module tree, repeated blocks collapsed, op counts), table (one row per node),
code (the GraphModule's Python), json (stable node ids, inputs by id, provenance), dot (Graphviz).

examples:
  moa-fx dump tiny-llama
  moa-fx dump examples/configs/llama3-8b.json --view tree
  moa-fx dump tiny-llama --spec sparse_moa --view table --module 'model.layers.0.*'
  moa-fx dump tiny-llama --spec adamole --after insert_experts --view json --output g.json
  moa-fx dump tiny-gpt2 --view table --op linear
  moa-fx dump tiny-llama --view dot --output g.svg     (needs Graphviz's `dot` on PATH)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess

from ..passes import LOWER_CHOICES
from ..errors import MoaFxError
from ..graph_export import export_graph, filter_nodes, to_dot, to_networkx
from .models import MODEL_HELP, build, describe_model
from .render import render_table, render_tree

NAME = "dump"
HELP = "print the captured graph, or the graph after a spec's rewrite"
VIEWS = ("tree", "table", "code", "json", "dot")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--spec", help="a preset name or a .toml/.json spec; without it, the graph as captured")
    p.add_argument("--after", metavar="PASS", help="stop after this pass (see moa_fx.passes.DEFAULT_PIPELINE)")
    p.add_argument("--lower", choices=LOWER_CHOICES, default="auto",
                   help="lowering of LoRA mixtures in the rewritten graph (default: auto)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="keep one GEMM per reader of a shared input (skip the fuse_shared_input pass)")
    p.add_argument("--view", choices=VIEWS, default="tree", help="what to print (default: tree)")
    p.add_argument("--module", metavar="GLOB", help="only nodes traced in modules matching GLOB (or under them)")
    p.add_argument("--op", metavar="NAME", help="only nodes of this op (linear, aten.linear, route, ...)")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout (.svg/.png/.pdf: render DOT)")
    p.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=None,
                   help="capture with dynamic batch/sequence (default: on, off for meta-device configs)")


def dump_data(args: argparse.Namespace) -> tuple[dict, object]:
    """The export of the requested graph (filtered) and the GraphModule."""
    built = build(args.model, args.spec, until=args.after, dynamic=args.dynamic, lower=args.lower, fuse=args.fuse)
    info = {"model": args.model, "spec": built.spec.name if built.spec else None, "after": args.after,
            "description": describe_model(built.model, built.how)}
    export = export_graph(built.gm, **info)
    if args.module or args.op:
        export["nodes"] = filter_nodes(export["nodes"], args.module, args.op)
        export["filter"] = {"module": args.module, "op": args.op}
    if built.records:
        export["records"] = [r.to_dict() | {"added": len(r.added)} for r in built.records]
    return export, built.gm


def run(args: argparse.Namespace, console) -> int:
    export, gm = dump_data(args)
    if not export["nodes"]:
        raise MoaFxError(f"no node matches --module {args.module!r} --op {args.op!r}; try "
                         "--view tree to see the module paths")
    title = f"{args.model}" + (f" + {export['spec']}" if export["spec"] else "") + \
        (f" (after {args.after})" if args.after else "")
    if args.view == "json":
        return _emit(args, console, json.dumps(export, indent=1, sort_keys=True) + "\n")
    if args.view == "code":
        return _emit(args, console, gm.code)
    if args.view == "dot":
        dot = to_dot(to_networkx(export))
        if args.output and pathlib.Path(args.output).suffix.lower() in (".svg", ".png", ".pdf"):
            return _render_dot(dot, pathlib.Path(args.output), console)
        return _emit(args, console, dot)
    if args.output:
        raise MoaFxError(f"--output writes the json, code or dot views; got --view {args.view}")
    console.print(export["description"])
    if args.view == "tree":
        render_tree(console, export["nodes"], title)
    else:
        render_table(console, export["nodes"], title)
    return 0


def _emit(args: argparse.Namespace, console, text: str) -> int:
    if args.output:
        pathlib.Path(args.output).write_text(text)
        console.print(f"wrote {args.output}")
    else:
        console.file.write(text)
    return 0


def _render_dot(dot: str, out: pathlib.Path, console) -> int:
    exe = shutil.which("dot")
    if exe is None:
        raise MoaFxError(f"cannot write {out}: Graphviz's `dot` is not installed; install graphviz, or write "
                         f"DOT text with --output {out.with_suffix('.dot')} and render it elsewhere")
    proc = subprocess.run([exe, f"-T{out.suffix[1:].lower()}", "-o", str(out)], input=dot, text=True,
                          capture_output=True)
    if proc.returncode != 0:
        raise MoaFxError(f"dot failed on the graph: {proc.stderr.strip()[:300]}")
    console.print(f"wrote {out}")
    return 0
