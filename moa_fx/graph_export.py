"""A stable, JSON-able picture of an FX graph, for ``moa-fx dump`` and ``moa-fx diff``.

Entry points: :func:`export_graph` (GraphModule → ``{"format": ..., "nodes": [...]}``),
:func:`diff_graphs` (two exports → added / removed / changed nodes), :func:`to_networkx` and
:func:`to_dot`.

Node ids never use FX node names (those change with every unrelated insertion). An id is
``<module path>::<op>#<ordinal>``: the module the node was traced in (``<root>`` for none), a short
op name (``aten.linear``, ``getitem``, the target of a ``call_module`` or ``get_attr``,
``input:input_ids``) and the node's ordinal among the nodes with the same path and op, in graph
order. Nodes that a pass created count their ordinals separately and carry the pass in the op
(``route[insert_routers]``), so inserting experts never renumbers the nodes of the original model::

    model.layers.0.self_attn.q_proj::aten.linear#0
    model.layers.0.self_attn.q_proj::moa.model.layers.0.self_attn.q_proj.lora.0[insert_experts]#0
"""

from __future__ import annotations

import fnmatch
from typing import Any, Iterable

import torch
import torch.fx as fx

from .graph import LOWERING_KEY, PROVENANCE_KEY, module_path

__all__ = ["FORMAT", "export_graph", "filter_nodes", "diff_graphs", "to_networkx", "to_dot", "op_name"]

FORMAT = "moa_fx.graph/1"
ROOT = "<root>"


def op_name(node: fx.Node) -> str:
    """A short, stable name of what ``node`` computes."""
    if node.op == "placeholder":
        return f"input:{node.target}"
    if node.op == "output":
        return "output"
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        packet = target.overloadpacket
        ns = target.namespace
        base = f"{ns}.{packet.__name__}"
        return base if target._overloadname == "default" else f"{base}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    return getattr(target, "__name__", str(target))


def _target_str(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__qualname__', getattr(t, '__name__', str(t)))}".lstrip(".")


def _val_info(node: fx.Node) -> tuple[list[str] | None, str | None]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [str(s) for s in val.shape], str(val.dtype).replace("torch.", "")
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return [f"tuple[{len(val)}]"], None
    return None, None


def _const(a: Any) -> Any:
    if isinstance(a, (int, float, bool, str)) or a is None:
        return a
    if isinstance(a, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return str(a)
    return str(a)


def export_graph(gm: fx.GraphModule, **info: Any) -> dict[str, Any]:
    """``{"format", **info, "nodes": [{"id", "op", "kind", "target", "module", "inputs", "args",
    "shape", "dtype", "provenance"}]}`` in graph order; ``info`` (model, spec, after) is copied in."""
    ids: dict[fx.Node, str] = {}
    counts: dict[tuple[str, str], int] = {}
    nodes = []
    for node in gm.graph.nodes:
        prov = node.meta.get(PROVENANCE_KEY) or []
        path = module_path(node) or ROOT
        op = op_name(node)
        if prov:
            op = f"{op}[{prov[0]['pass']}]"
        key = (path, op)
        ordinal = counts.get(key, 0)
        counts[key] = ordinal + 1
        ids[node] = f"{path}::{op}#{ordinal}"
        args: list[Any] = []

        def arg(a: Any) -> Any:
            return {"node": ids[a]} if isinstance(a, fx.Node) else _const(a)

        for a in node.args:
            args.append(fx.node.map_aggregate(a, arg) if isinstance(a, (list, tuple)) else arg(a))
        args_j = _jsonable(args)
        kwargs_j = {k: _jsonable(fx.node.map_aggregate(v, arg)) for k, v in node.kwargs.items()}
        shape, dtype = _val_info(node)
        nodes.append({
            "id": ids[node],
            "kind": node.op,
            "op": op_name(node),
            "target": _target_str(node),
            "module": "" if path == ROOT else path,
            "inputs": [ids[i] for i in node.all_input_nodes],
            "args": args_j,
            "kwargs": kwargs_j,
            "shape": shape,
            "dtype": dtype,
            "provenance": [dict(p) for p in prov],
            **({"lowering": dict(node.meta[LOWERING_KEY])} if LOWERING_KEY in node.meta else {}),
        })
    return {"format": FORMAT, **info, "nodes": nodes}


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    return _const(x)


def _matches_op(node: dict, name: str) -> bool:
    op = node["op"]
    return op == name or op.endswith("." + name) or op.split(".")[-1] == name or fnmatch.fnmatchcase(op, name)


def filter_nodes(nodes: Iterable[dict], module: str | None = None, op: str | None = None) -> list[dict]:
    """Nodes whose module path matches the glob ``module`` (or lies under it) and whose op matches ``op``."""
    out = []
    for n in nodes:
        if module is not None:
            path = n["module"]
            if not (fnmatch.fnmatchcase(path, module) or fnmatch.fnmatchcase(path, module + ".*")):
                continue
        if op is not None and not _matches_op(n, op):
            continue
        out.append(n)
    return out


_COMPARED = ("kind", "target", "inputs", "args", "kwargs", "shape", "dtype")


def diff_graphs(before: dict, after: dict) -> dict[str, Any]:
    """Nodes added, removed and changed between two exports (matched by id).

    ``changed`` lists, per node, the fields that differ (``inputs`` when a node was rewired to read
    an inserted combine, for example). ``equal`` is true when nothing differs.
    """
    a = {n["id"]: n for n in before["nodes"]}
    b = {n["id"]: n for n in after["nodes"]}
    added = [n for i, n in b.items() if i not in a]
    removed = [n for i, n in a.items() if i not in b]
    changed = []
    for i, n in b.items():
        if i in a:
            fields = {f: {"before": a[i].get(f), "after": n.get(f)} for f in _COMPARED if a[i].get(f) != n.get(f)}
            if fields:
                changed.append({"id": i, "module": n["module"], "op": n["op"], "kind": n["kind"], "fields": fields})
    return {
        "summary": {"added": len(added), "removed": len(removed), "changed": len(changed),
                    "before": len(a), "after": len(b)},
        "equal": not (added or removed or changed),
        "added": added,
        "removed": removed,
        "changed": changed,
    }


def to_networkx(export: dict):
    """A ``networkx.DiGraph``: one vertex per node id (attributes: op, module, shape), edges input → user."""
    import networkx as nx

    g = nx.DiGraph()
    for n in export["nodes"]:
        g.add_node(n["id"], op=n["op"], module=n["module"], shape=n["shape"],
                   created=bool(n["provenance"]))
    for n in export["nodes"]:
        for i in n["inputs"]:
            if i in g:
                g.add_edge(i, n["id"])
    return g


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph) -> str:
    """Graphviz DOT text of a graph from :func:`to_networkx` (created nodes filled)."""
    lines = ["digraph moa_fx {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=9];']
    for v, data in graph.nodes(data=True):
        shape = "×".join(data.get("shape") or []) if data.get("shape") else ""
        label = f"{data.get('op', v)}\\n{data.get('module') or ROOT}" + (f"\\n[{shape}]" if shape else "")
        style = ', style=filled, fillcolor="palegreen"' if data.get("created") else ""
        lines.append(f"  {_q(v)} [label={_q(label).replace(chr(92) * 2 + 'n', chr(92) + 'n')}{style}];")
    for u, v in graph.edges():
        lines.append(f"  {_q(u)} -> {_q(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
