"""The import graph of moa_fx/, drawn and checked against LAYERS.

    python docs/import_graph.py            # Mermaid flowchart, one subgraph per layer, then the problems
    python docs/import_graph.py --dot      # the same graph as Graphviz DOT

An edge ``a --> b`` says module ``a`` imports module ``b``; it is dashed (deferred) when every such
import is inside a function. Imports under ``if TYPE_CHECKING:`` are left out: they name types for
annotations and never run (a kind's ``insert`` is typed by the pass's ``Emitter`` without depending on it). Imports are read with :mod:`ast` from the
source; nothing is imported. ``from p import x`` is an edge to ``p.x`` when that is a module, else
to ``p``. A package's ``__init__`` that Python runs before a submodule is not an edge (the graph holds
what a module names). ``moa_fx/__init__.py``, the public facade over every layer, is left out:
``from moa_fx import transform`` is an edge to the module the facade takes ``transform`` from.

The checks (:func:`problems`), each problem one line:
- ``cycle: a -> b -> a``: modules that import each other, directly or around a loop (a deferred
  import counts: it only hides the cycle from the interpreter);
- ``backward: a (layer) -> b (layer)``: a module imports one from a later layer in LAYERS;
- ``unlayered: m``: a module that no row of LAYERS names.

Exit status 1 when there is a problem. Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import pathlib
import sys
from typing import NamedTuple

# Layers in order: a module may import modules of its own layer and of earlier ones, never of a later
# one. Read top to bottom this is the compiler's flow, capture → spec → kinds → sites → passes → runtime
# → cli and eval, over two layers every layer uses: the foundation, and ops/kernels (what graph nodes
# call: routing, combines, the fused ops and the router modules; pure tensor code that imports no
# pass, so a pass can import the op it emits a call to). Expert kinds come after spec (each kind's spec
# class registers with the parser) and before sites (a kind names the site pool it is placed on). Patterns are fnmatch globs over dotted module names;
# the first row that matches a module places it. Within the last layer, the CLI reaches eval (the [eval] extra)
# only inside functions of cli.real_task, the default run of `moa-fx train` (tests/test_structure.py checks it).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("moa_fx.errors", "moa_fx.fileio", "moa_fx.graph")),
    ("ops/kernels", ("moa_fx.ops", "moa_fx.ops.*", "moa_fx.modules", "moa_fx.kernels", "moa_fx.kernels.*")),
    ("capture", ("moa_fx.capture",)),
    ("spec", ("moa_fx.spec", "moa_fx.spec.*")),
    ("kinds", ("moa_fx.kinds", "moa_fx.kinds.*")),
    ("sites", ("moa_fx.sites", "moa_fx.sites.*")),
    ("passes", ("moa_fx.passes", "moa_fx.passes.*")),
    ("runtime", ("moa_fx.runtime", "moa_fx.runtime.*", "moa_fx.derive", "moa_fx.region_schema", "moa_fx.inputs", "moa_fx.kv_cache",
                 "moa_fx.adapter_files", "moa_fx.peft_lora", "moa_fx.graph_export",
                 "moa_fx.train", "moa_fx.train.*", "moa_fx.data", "moa_fx.data.*")),
    ("cli and eval", ("moa_fx.cli", "moa_fx.cli.*", "moa_fx.eval", "moa_fx.eval.*")),
)

PACKAGE = "moa_fx"
FACADE = PACKAGE  # moa_fx/__init__.py: re-exports the public names of every layer


class Edge(NamedTuple):
    importer: str
    imported: str
    deferred: bool  # inside a function: not run when the importer loads


def module_names(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted name -> file, for every ``.py`` under ``root/moa_fx`` (a package is its ``__init__``)."""
    names = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from … import`` names (``from .x import y`` inside ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _facade_sources(root: pathlib.Path) -> dict[str, str]:
    """Name -> the module ``moa_fx/__init__.py`` imports it from (``transform`` -> ``moa_fx.runtime``)."""
    tree = ast.parse((root / PACKAGE / "__init__.py").read_text())
    return {alias.asname or alias.name: _absolute(FACADE, True, node)
            for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names}


def _targets(module: str, is_package: bool, node: ast.AST, known: set[str], facade: dict[str, str]) -> list[str]:
    """The modules of ``known`` that one import statement names (through the facade for its names)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        source = _absolute(module, is_package, node)
        names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known
                 else facade.get(alias.name, source) if source == FACADE else source
                 for alias in node.names]
    return [name for name in names if name in known]


def _imports(tree: ast.AST):
    """``(import node, deferred)`` for every import statement of a module that can run (the body of
    ``if TYPE_CHECKING:`` never does)."""
    def walk(node: ast.AST, deferred: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    yield from walk(ast.Module(body=[other], type_ignores=[]), deferred)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, deferred
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            yield from walk(child, inner)
    yield from walk(tree, False)


def import_edges(root: pathlib.Path) -> list[Edge]:
    """Every import of one moa_fx module by another (the facade left out), once per pair.

    A pair imported both at module level and inside a function is one module-level edge.
    """
    names = module_names(root)
    known = set(names) - {FACADE}
    facade = _facade_sources(root)
    edges: dict[tuple[str, str], bool] = {}
    for module in sorted(known):
        path = names[module]
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, deferred in _imports(tree):
            for target in _targets(module, path.name == "__init__.py", node, known, facade):
                if target != module:
                    edges[module, target] = edges.get((module, target), True) and deferred
    return [Edge(a, b, d) for (a, b), d in sorted(edges.items())]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the first row whose patterns match ``module``; None when none does."""
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns):
            return index
    return None


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of two or more modules (Tarjan's algorithm), each sorted."""
    graph: dict[str, list[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, []).append(e.imported)
        graph.setdefault(e.imported, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _loop(component: list[str], edges: list[Edge]) -> list[str]:
    """One import loop through the component's first module, as module names (first repeated last)."""
    inside = set(component)
    graph = {m: sorted(e.imported for e in edges if e.importer == m and e.imported in inside) for m in component}
    start = component[0]
    paths = [[start]]
    while paths:  # breadth first: the shortest loop back to start
        path = paths.pop(0)
        for nxt in graph[path[-1]]:
            if nxt == start:
                return path + [start]
            if nxt not in path:
                paths.append(path + [nxt])
    raise AssertionError(f"no loop through {start} in {component}")


def _short(module: str) -> str:
    return module.removeprefix(f"{PACKAGE}.")


def problems(root: pathlib.Path) -> list[str]:
    """Every cycle, backward edge and unlayered module of the import graph, one line each, sorted."""
    edges = import_edges(root)
    found = [f"cycle: {' -> '.join(map(_short, _loop(c, edges)))}" for c in cycles(edges)]
    for e in edges:
        a, b = layer_of(e.importer), layer_of(e.imported)
        if a is not None and b is not None and b > a:
            found.append(f"backward: {_short(e.importer)} ({LAYERS[a][0]}) -> {_short(e.imported)} ({LAYERS[b][0]})")
    modules = set(module_names(root)) - {FACADE}
    found += [f"unlayered: {_short(m)}" for m in sorted(modules) if layer_of(m) is None]
    return sorted(found)


def _layered(root: pathlib.Path) -> list[tuple[str, list[str]]]:
    """``(layer name, its modules)`` in LAYERS order, then ``("unlayered", …)`` when any."""
    modules = sorted(set(module_names(root)) - {FACADE})
    groups = [(name, [m for m in modules if layer_of(m) == i]) for i, (name, _) in enumerate(LAYERS)]
    rest = [m for m in modules if layer_of(m) is None]
    return [g for g in groups if g[1]] + ([("unlayered", rest)] if rest else [])


def _node_id(module: str) -> str:
    return "m_" + _short(module).replace(".", "_")  # prefixed: "graph" is a keyword in both formats


# how each output format writes the parts of the graph
_FORMATS = {
    "mermaid": {"head": ["flowchart TD"], "layer": '    subgraph L{i}["{name}"]', "node": '        {id}["{label}"]',
                "end": "    end", "edge": "    {a} {style} {b}", "solid": "-->", "deferred": "-.->", "tail": []},
    "dot": {"head": ["digraph moa_fx {", "    rankdir=TB; node [shape=box];"],
            "layer": '    subgraph cluster_{i} {{ label="{name}";', "node": '        {id} [label="{label}"];',
            "end": "    }", "edge": "    {a} -> {b}{style};", "solid": "", "deferred": " [style=dashed]",
            "tail": ["}"]},
}


def draw(root: pathlib.Path, fmt: str = "mermaid") -> str:
    """The graph as a Mermaid flowchart or Graphviz DOT: one group per layer, deferred imports dashed."""
    f = _FORMATS[fmt]
    lines = list(f["head"])
    for i, (name, modules) in enumerate(_layered(root)):
        lines.append(f["layer"].format(i=i, name=name))
        lines += [f["node"].format(id=_node_id(m), label=_short(m)) for m in modules]
        lines.append(f["end"])
    for e in import_edges(root):
        style = f["deferred"] if e.deferred else f["solid"]
        lines.append(f["edge"].format(a=_node_id(e.importer), b=_node_id(e.imported), style=style))
    return "\n".join(lines + f["tail"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz DOT instead of Mermaid")
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parents[1],
                        help="the repository root (default: the one holding this script)")
    args = parser.parse_args(argv)
    print(draw(args.root, "dot" if args.dot else "mermaid"))
    found = problems(args.root)
    print(f"\n{len(found)} problem(s)" + "".join(f"\n  {p}" for p in found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
