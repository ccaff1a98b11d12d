"""A memo for the schema torch derives for each compile-region call, so that a compiled training step
traces each region's body once per input metadata instead of once per call.

Why: in training, every ``invoke_subgraph`` call (a ``torch.compiler.nested_compile_region`` call, one
per decoder block here) asks its operator for a schema, to refuse regions that mutate their inputs
(``HigherOrderOperator.py_autograd_impl`` in torch 2.13). Deriving it re-traces the region's whole
body with fake tensors (``InvokeSubgraphHOP.gen_schema`` → ``materialize_as_graph``), at every call
and in each of AOTAutograd's passes: 12 re-traces for 6 blocks, about 5 s of a 6-layer AdaMoLE first
compile (``benchmarks/count_kernels.py``), growing with depth. torch already caches the same schema
for its functionalization (per compile); this caches it for the autograd check too.

The memo returns what torch computes: the schema is a function of the region's graph and of its
operands' kinds and metadata, which make up the key; the first call of every key runs torch's own
derivation, so a region that mutates an input is refused as before. Operands whose metadata is not
concrete (symbolic sizes) are not memoized. Entries live as long as the region's graph module and its
graph object, and are keyed by the graph's nodes (name, op, target), so a pass that edits the graph
meets a new entry. What torch's derivation reads besides the graph and the operands (the tracer's
decompositions, dispatch state) is the same at every call of one compile, which is where the calls
repeat.

:func:`install` puts the memo on torch's ``invoke_subgraph`` operator (an instance attribute: its class
is untouched); it is called the first time a moa-fx compile region is traced, idempotent, and a no-op
where torch has no such operator or method.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

_MARK = "_moa_fx_schema_memo"


def _operand_key(operand: Any) -> Any:
    """What of an operand the schema can depend on, or None where that is not concrete."""
    if isinstance(operand, torch.Tensor):
        sizes = (*operand.shape, *operand.stride())
        if not all(type(s) is int for s in sizes):
            return None
        return (type(operand), tuple(operand.shape), operand.stride(), operand.dtype, operand.device,
                operand.requires_grad)
    if type(operand) is int or operand is None:
        return (type(operand), operand)
    return None


def schema_key(identifier: Any, operands: tuple[Any, ...]) -> tuple | None:
    """The memo's key for one call: the identifier and every operand's key (None: not memoizable)."""
    keys = tuple(_operand_key(o) for o in operands)
    if any(k is None for k, o in zip(keys, operands) if o is not None):
        return None
    return (identifier, keys)


def graph_fingerprint(graph: torch.fx.Graph) -> tuple:
    """Each node's name, op and target, in order: what changes when a pass edits the graph."""
    return tuple((n.name, n.op, n.target if isinstance(n.target, str) else id(n.target)) for n in graph.nodes)


def memoized(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original(subgraph, identifier, *operands)``, computed once per (subgraph, its graph object,
    that graph's :func:`graph_fingerprint`, :func:`schema_key`); subgraph and graph weakly held, so an
    entry dies with them and a new object never meets an old entry."""
    memo: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def gen_schema(subgraph: Any, identifier: Any, *operands: Any, **kwargs: Any) -> Any:
        key = schema_key(identifier, operands)
        graph = getattr(subgraph, "graph", None)
        if key is None or kwargs or not isinstance(graph, torch.fx.Graph):
            return original(subgraph, identifier, *operands, **kwargs)
        try:
            per_graph = memo.setdefault(subgraph, weakref.WeakKeyDictionary()).setdefault(graph, {})
        except TypeError:  # not weakly referenceable
            return original(subgraph, identifier, *operands)
        key = (graph_fingerprint(graph), key)
        if key not in per_graph:
            per_graph[key] = original(subgraph, identifier, *operands)
        return per_graph[key]

    setattr(gen_schema, _MARK, True)
    gen_schema.cache = memo  # type: ignore[attr-defined]  (for tests: the entries)
    return gen_schema


def install() -> bool:
    """Put the memo on torch's ``invoke_subgraph`` (once). True if it is there after the call."""
    try:
        from torch._higher_order_ops.invoke_subgraph import invoke_subgraph
    except ImportError:
        return False
    current = getattr(invoke_subgraph, "gen_schema", None)
    if current is None:
        return False
    if getattr(current, _MARK, False):
        return True
    invoke_subgraph.gen_schema = memoized(current)
    return True
