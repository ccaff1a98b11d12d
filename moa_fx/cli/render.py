"""Everything the CLI prints goes through here: one console factory and one renderer per view.

:func:`make_console` gives a colourless, 120-column console when stdout is not a terminal, when
``MOA_FX_PLAIN=1`` or with ``--plain`` (what the tests read); otherwise rich's defaults.
Renderers take plain data (dicts from :mod:`moa_fx.graph_export`, the sites report, router
statistics) and never compute anything that the JSON output would not also contain.
"""

from __future__ import annotations

import collections
import os
import re
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

__all__ = ["make_console", "compress_paths", "compress_ints", "render_tree", "render_table", "render_sites",
           "render_diff", "render_router_stats", "fmt_count", "short_op"]

PLAIN_WIDTH = 120


def make_console(plain: bool = False, file=None) -> Console:
    file = file if file is not None else sys.stdout
    isatty = getattr(file, "isatty", lambda: False)()
    if plain or os.environ.get("MOA_FX_PLAIN") or os.environ.get("NO_COLOR") is not None or not isatty:
        return Console(file=file, width=PLAIN_WIDTH, color_system=None, force_terminal=False, highlight=False,
                       emoji=False)
    return Console(file=file, highlight=False)


def fmt_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}K"
    return str(n)


def compress_ints(values: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` → ``0..2,5,7..8``."""
    vals = sorted(set(values))
    parts, i = [], 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        parts.append(str(vals[i]) if i == j else f"{vals[i]}..{vals[j]}")
        i = j + 1
    return ",".join(parts)


_NUM = re.compile(r"(?<=\.)(\d+)(?=\.|$)")


def compress_paths(paths: Iterable[str]) -> list[str]:
    """Paths that differ only in their first index become one: ``model.layers.{0..31}.mlp ×32``."""
    groups: dict[str, list[int]] = collections.OrderedDict()
    singles = []
    for p in paths:
        m = _NUM.search(p)
        if not m:
            singles.append(p)
            continue
        key = p[:m.start()] + "{}" + p[m.end():]
        groups.setdefault(key, []).append(int(m.group(1)))
    out = list(dict.fromkeys(singles))
    for key, idx in groups.items():
        if len(idx) == 1:
            out.append(key.replace("{}", str(idx[0])))
        else:
            out.append(key.replace("{}", "{" + compress_ints(idx) + "}") + f" ×{len(set(idx))}")
    return out


# --------------------------------------------------------------------------------------------------
# dump: tree and table
# --------------------------------------------------------------------------------------------------


def short_op(n: dict) -> str:
    """``aten.mul.Tensor`` → ``mul``; an inserted module → ``module``; ``route`` stays ``route``."""
    if n["kind"] == "call_module":
        return "module"
    parts = n["op"].split(".")
    return parts[1] if len(parts) > 1 and parts[0] in ("aten", "prims", "moa_fx") else parts[-1]


def _module_tree(nodes: list[dict]) -> tuple[dict, dict, dict]:
    children: dict[str, list[str]] = collections.defaultdict(list)
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    created: dict[str, int] = collections.Counter()
    for n in nodes:
        if n["kind"] not in ("call_function", "call_module"):
            continue
        path = n["module"]
        parts = path.split(".") if path else []
        for i in range(len(parts)):
            parent, child = ".".join(parts[:i]), ".".join(parts[:i + 1])
            if child not in children[parent]:
                children[parent].append(child)
        own[path][short_op(n)] += 1
        if n["provenance"]:
            created[path] += 1
    return children, own, created


def render_tree(console: Console, nodes: list[dict], title: str) -> None:
    """Module tree, inclusive op counts, runs of identical numbered blocks collapsed (``{0..31} ×32``)."""
    children, own, created = _module_tree(nodes)
    total: dict[str, collections.Counter] = {}
    made: dict[str, int] = {}
    sig: dict[str, Any] = {}

    def visit(path: str) -> None:
        c = collections.Counter(own.get(path, {}))
        k = created.get(path, 0)
        for ch in children.get(path, []):
            visit(ch)
            c.update(total[ch])
            k += made[ch]
        total[path], made[path] = c, k
        sig[path] = (tuple(sorted(own.get(path, {}).items())),
                     tuple((ch.rsplit(".", 1)[-1], sig[ch]) for ch in children.get(path, [])), created.get(path, 0))

    visit("")

    def label(path: str, name: str, repeat: str = "") -> str:
        c = total[path]
        ops = ", ".join(f"{op} {cnt}" for op, cnt in c.most_common(4))
        extra = f", +{made[path]} inserted" if made[path] else ""
        return f"[bold]{name}[/bold]{repeat}  {sum(c.values())} ops{extra}  [dim]({ops})[/dim]"

    def add(tree: Tree, path: str) -> None:
        kids = children.get(path, [])
        i = 0
        while i < len(kids):
            ch = kids[i]
            name = ch.rsplit(".", 1)[-1]
            j = i
            if name.isdigit():
                while j + 1 < len(kids) and kids[j + 1].rsplit(".", 1)[-1].isdigit() and sig[kids[j + 1]] == sig[ch]:
                    j += 1
            if j > i:
                first, last = name, kids[j].rsplit(".", 1)[-1]
                branch = tree.add(label(ch, "{" + f"{first}..{last}" + "}", f" ×{j - i + 1}") + "  [dim](each)[/dim]")
            else:
                branch = tree.add(label(ch, name))
            add(branch, ch)
            i = j + 1

    root = Tree(label("", title))
    add(root, "")
    console.print(root)


def render_table(console: Console, nodes: list[dict], title: str = "") -> None:
    table = Table(title=title or None, show_lines=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("id", overflow="fold", ratio=4)
    table.add_column("op", overflow="fold", ratio=2)
    table.add_column("shape", overflow="fold", ratio=1)
    table.add_column("inputs", overflow="fold", ratio=3)
    table.add_column("made by", overflow="fold", ratio=1)
    for n in nodes:
        shape = "×".join(n["shape"]) if n["shape"] else ""
        prov = n["provenance"][0]["pass"] if n["provenance"] else ""
        style = "green" if prov else None
        table.add_row(n["id"], n["op"] if n["kind"] == "call_function" else n["kind"], shape, ", ".join(n["inputs"]), prov, style=style)
    console.print(table)
    console.print(f"{len(nodes)} nodes")


# --------------------------------------------------------------------------------------------------
# sites
# --------------------------------------------------------------------------------------------------


def render_sites(console: Console, report: dict) -> None:
    console.print(f"[bold]model[/bold] {report['model']}   [bold]spec[/bold] {report['spec']}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col, kw in (("rule", {}), ("kind", {}), ("patterns", {"overflow": "fold"}), ("sites", {"justify": "right"}),
                    ("matched", {"overflow": "fold"}), ("params", {"justify": "right"})):
        table.add_column(col, **kw)
    for r in report["rules"]:
        if r["status"] == "matched":
            table.add_row(r["name"], r["kind"], " ".join(r["patterns"]), str(r["sites"]), "\n".join(r["matched"]),
                          fmt_count(r["parameters"]))
        else:
            table.add_row(r["name"], r["kind"], " ".join(r["patterns"]), "0",
                          f"[red]{r['status']}[/red]", "-")
    console.print(table)
    routers = report["routers"]
    if routers["count"]:
        console.print(f"routers: {routers['count']} × {routers['form']} ({routers['scope']}), "
                      f"{compress_ints([e for e in routers['experts_per_router']]) } experts each, "
                      f"{fmt_count(routers['parameters'])} params"
                      + (f" (incl. {fmt_count(routers['threshold_parameters'])} threshold)"
                         if routers["threshold_parameters"] else ""))
    else:
        console.print("routers: none (every expert has weight 1)")
    by_kind = ", ".join(f"{k} {fmt_count(v)}" for k, v in report["parameters_by_kind"].items())
    console.print(f"adds {report['trainable']:,} trainable parameters ({by_kind}) to {report['base']:,} base "
                  f"parameters: [bold]{report['trainable_percent']:.4f}%[/bold] trainable", soft_wrap=True)
    for r in report["rules"]:
        if r["status"] != "matched":
            console.print(f"[red]{r['status']}[/red] {r['name']}: {r['message']}", soft_wrap=True)
    for note in report.get("notes", []):
        console.print(f"note: {note['note']} — {', '.join(note['paths'])}", soft_wrap=True)


# --------------------------------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------------------------------


def render_diff(console: Console, diff: dict, before: str, after: str) -> None:
    s = diff["summary"]
    console.print(f"--- {before} ({s['before']} nodes)\n+++ {after} ({s['after']} nodes)")
    if diff["equal"]:
        console.print("graphs are equal")
        return
    if diff["added"]:
        console.print(f"[green]added {len(diff['added'])} nodes[/green], by pass and site:")
        tree = Tree("added")
        by_pass: dict[str, dict[str, list[dict]]] = collections.OrderedDict()
        for n in diff["added"]:
            p = n["provenance"][0] if n["provenance"] else {"pass": "(no provenance)", "site": n["module"]}
            by_pass.setdefault(p["pass"], collections.OrderedDict()).setdefault(p.get("site") or "<graph>", []).append(n)
        for pname, sites_ in by_pass.items():
            count = sum(len(v) for v in sites_.values())
            branch = tree.add(f"[green]+ {pname}[/green]  {count} nodes at {len(sites_)} sites")
            for line in _grouped_sites(sites_):
                branch.add(f"[green]+[/green] {line}")
        console.print(tree)
    if diff["removed"]:
        console.print(f"[red]removed {len(diff['removed'])} nodes[/red]:")
        for line in _by_module(diff["removed"]):
            console.print(f"[red]- {line}[/red]")
    if diff["changed"]:
        console.print(f"[yellow]changed {len(diff['changed'])} nodes[/yellow]:")
        for line in _by_module(diff["changed"], changed=True):
            console.print(f"[yellow]~ {line}[/yellow]")
    console.print(f"summary: [green]+{s['added']}[/green] [red]-{s['removed']}[/red] "
                  f"[yellow]~{s['changed']}[/yellow]")


def _ops(nodes: list[dict]) -> str:
    c = collections.Counter(_role(n) for n in nodes)
    return ", ".join(f"{op} ×{k}" if k > 1 else op for op, k in c.most_common())


def _role(n: dict) -> str:
    # an inserted module is named by its kind: moa.<site>.lora.0 → lora, moa.<block>.router → router
    if n["op"].startswith("moa."):
        return next(p for p in reversed(n["op"].split(".")) if not p.isdigit())
    return short_op(n)


def _grouped_sites(sites_: dict[str, list[dict]]) -> list[str]:
    # sites with the same ops that differ only in their layer index collapse into one line
    keyed: dict[tuple[str, str], list[str]] = collections.OrderedDict()
    for site, nodes in sites_.items():
        keyed.setdefault((_ops(nodes), str(len(nodes))), []).append(site)
    lines = []
    for (ops, count), paths in keyed.items():
        for p in compress_paths(paths):
            lines.append(f"{p}: {count} nodes ({ops})")
    return lines


def _by_module(nodes: list[dict], changed: bool = False) -> list[str]:
    groups: dict[str, list[dict]] = collections.OrderedDict()
    for n in nodes:
        groups.setdefault(n["module"] or "<root>", []).append(n)
    keyed: dict[str, list[str]] = collections.OrderedDict()
    for mod, ns in groups.items():
        what = _ops(ns)
        if changed:
            fields = sorted({f for n in ns for f in n["fields"]})
            what += f" (rewired: {', '.join(fields)})"
        keyed.setdefault(what, []).append(mod)
    return [f"{p}: {what}" for what, mods in keyed.items() for p in compress_paths(mods)]


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


def render_router_stats(console: Console, stats: dict[str, dict]) -> None:
    if not stats:
        console.print("no routers (every expert has weight 1)")
        return
    table = Table(title="router statistics (last evaluation batch)", box=None, pad_edge=False, header_style="bold")
    for col in ("router", "experts", "active/token", "threshold", "activation rate per expert"):
        table.add_column(col, overflow="fold")
    for key, s in stats.items():
        tau = "-" if s["threshold_mean"] is None else f"{s['threshold_mean']:.3f}"
        rates = " ".join(f"{e.split(':')[0].split('.')[-1]}:{r:.2f}" for e, r in zip(s["experts"], s["activation_rate"]))
        table.add_row(key, str(len(s["experts"])), f"{s['mean_active']:.2f}", tau, rates)
    console.print(table)
