"""Small helpers over captured FX graphs shared by site finding, passes and the CLI.

- The metadata keys moa-fx writes (``*_KEY``): every ``node.meta`` / ``gm.meta`` entry of ours is
  named here and nowhere else.
- :func:`module_path`: the module a node was traced in, from ``meta["nn_module_stack"]``.
- :func:`layer_index`: the block index in a module path (first numeric component).
- :func:`annotate`: give a node a pass created the anchor's module stack, a fake ``meta["val"]``
  and a provenance record (``meta[PROVENANCE_KEY]``), so ``dump``/``diff`` can say who made it;
  :func:`site_of` reads the site back.
- :func:`add_submodule`: put a module at a dotted path under the GraphModule, creating parents.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import torch
import torch.fx as fx
from torch import nn

__all__ = [
    "PROVENANCE_KEY",
    "LOWERING_KEY",
    "FUSION_KEY",
    "CACHE_KEY",
    "NUM_OUTPUTS_KEY",
    "EXTRAS_KEY",
    "site_of",
    "refresh_value",
    "module_path",
    "layer_index",
    "annotate",
    "add_submodule",
    "all_module_paths",
    "fake_value",
    "shaped_like",
]

# node.meta keys
PROVENANCE_KEY = "moa_fx.provenance"  # [{"pass", "site", "role"}]: which passes made the node, for which site
LOWERING_KEY = "moa_fx.lowering"  # {"form", "reason"} on a fused LoRA site (lower_sparse_dispatch)
FUSION_KEY = "moa_fx.fusion"  # {"readers", "sizes"} on a shared-input GEMM (fuse_shared_input)
CACHE_KEY = "moa_fx.cache"  # ("key" | "value", layer) on a cached capture's past inputs and new entries
# gm.meta keys
NUM_OUTPUTS_KEY = "moa_fx.num_outputs"  # how many of the graph's outputs are the model's own (capture)
EXTRAS_KEY = "moa_fx.extras"  # [(kind, node name, router key)]: the router outputs after the user's (cleanup)
_FAKE_MODE_KEY = "_moa_fx_fake_mode"  # the fake mode of the graph's values, found once (fake_value)
ADAPTER_ROOT = "moa"

_NUMERIC = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module the node was traced in ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_path(path)


def module_paths(node: fx.Node) -> list[str]:
    """Every enclosing module path, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [_clean_path(v[0]) for v in stack.values()]


@functools.lru_cache(maxsize=65536)  # a pure function of the string; called for every node by many passes
def _clean_path(path: str) -> str:
    # strict export writes "L['self'].model.layers.0"; non-strict writes "model.layers.0".
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return path.strip(".")


def layer_index(path: str) -> int | None:
    """The first integer component of a module path: ``model.layers.3.mlp`` → 3."""
    m = _NUMERIC.search(path)
    return int(m.group(1)) if m else None


def router_statistics(stats: dict[str, torch.Tensor], routers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``MoAModel.router_stats``: each router's statistics vector (activation rates, gate means, the
    threshold's mean) read into a dict, with the router's expert ids and layer."""
    out: dict[str, dict[str, Any]] = {}
    for key, vec in stats.items():
        ids = list(routers[key].expert_ids)
        values = vec.detach().float().cpu().tolist()
        e = len(ids)
        rate, gate, tau = values[:e], values[e:2 * e], values[2 * e]
        out[key] = {"experts": ids, "activation_rate": rate, "gate_mean": gate, "mean_active": float(sum(rate)),
                    "threshold_mean": None if math.isnan(tau) else tau, "layer": layer_index(key)}
    return out


def all_module_paths(gm: fx.GraphModule) -> list[str]:
    """Module paths that own at least one node, in graph order, without repeats."""
    seen: dict[str, None] = {}
    for node in gm.graph.nodes:
        for p in module_paths(node):
            if p:
                seen.setdefault(p, None)
    return list(seen)


def add_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Install ``module`` at dotted ``target`` (creating ``nn.Module`` containers on the way)."""
    *parents, leaf = target.split(".")
    owner: nn.Module = gm
    for part in parents:
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    owner.add_module(leaf, module)


def _fake_mode(gm: fx.GraphModule):
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals[:8]) if vals else None


def fake_value(gm: fx.GraphModule, node: fx.Node) -> Any:
    """Run ``node`` on the fake values of its inputs and return the fake output (or None)."""
    mode = gm.meta.get(_FAKE_MODE_KEY)
    if mode is None:
        mode = _fake_mode(gm)
        gm.meta[_FAKE_MODE_KEY] = mode
    if mode is None:
        return None

    def val(a: Any) -> Any:
        if isinstance(a, fx.Node):
            if a.op == "get_attr":
                t = _get_attr(gm, a.target)
                return mode.from_tensor(t) if isinstance(t, torch.Tensor) else t
            return a.meta.get("val")
        return a

    args = fx.node.map_aggregate(node.args, val)
    kwargs = fx.node.map_aggregate(node.kwargs, val)
    prev = mode.allow_non_fake_inputs
    mode.allow_non_fake_inputs = True
    try:
        with mode:
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_module":
                return gm.get_submodule(node.target)(*args, **kwargs)
            if node.op == "get_attr":
                return mode.from_tensor(_get_attr(gm, node.target))
    finally:
        mode.allow_non_fake_inputs = prev
    return None


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def shaped_like(node: fx.Node, last: int | None = None, shape: tuple | None = None, dtype=None) -> Any:
    """A fake value shaped like ``node``'s (optionally with another last dim, shape or dtype)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    if shape is None:
        shape = tuple(val.shape) if last is None else (*val.shape[:-1], last)
    return val.new_empty(shape, dtype=dtype or val.dtype)


def site_of(node: fx.Node) -> str:
    """The site the last pass that made or rebuilt ``node`` recorded (the node's name if no pass did)."""
    return node.meta.get(PROVENANCE_KEY, [{}])[-1].get("site", node.name)


def refresh_value(gm: fx.GraphModule, node: fx.Node) -> None:
    """Recompute ``node``'s fake value after its arguments changed (best effort, as in :func:`annotate`)."""
    try:
        node.meta["val"] = fake_value(gm, node)
    except Exception:  # noqa: BLE001
        node.meta.pop("val", None)


def annotate(gm: fx.GraphModule, node: fx.Node, anchor: fx.Node | None, pass_name: str, site: str,
             role: str = "", val: Any = None) -> fx.Node:
    """Give a new node the anchor's module stack and stack trace, a fake value and provenance.

    ``val`` is the node's fake output when the pass knows it (cheap); otherwise the node is run on
    the fake values of its inputs."""
    if anchor is not None:
        for key in ("nn_module_stack", "stack_trace"):
            if key in anchor.meta:
                node.meta[key] = anchor.meta[key]
    record = {"pass": pass_name, "site": site}
    if role:
        record["role"] = role
    node.meta.setdefault(PROVENANCE_KEY, []).append(record)
    if val is not None:
        node.meta["val"] = val
        return node
    refresh_value(gm, node)  # metadata is best effort; the runtime check is the lint + run
    return node
