"""Fuse the skinny GEMMs that read one tensor into one GEMM followed by splits.

Matches: every node x read by two or more *readers*, each a small projection of x:
- a dense lowered LoRA site (a ``lowered_lora_site`` or ``dropout_lora_site`` node, form "dense"): its
  ``x·A_catᵀ`` (with input dropout too: ``(x ⊙ m_e)·A_eᵀ = x·A_eᵀ − (x ⊙ (1 − m_e))·A_eᵀ``, and
  ``expand_dropout_lora_site`` subtracts the dropped entries from its piece of the GEMM);
- an unlowered LoRA expert without input dropout (a LoRA slot of ``ctx.slots`` whose Δ node is
  still in the graph, ``lower="off"``): its ``x·Aᵀ``;
- a router (``ctx.routers``' logits node): ``W x`` (linear) or ``W₁x`` and ``W₃x`` (SwiGLU);
- a learned threshold (``ctx.routers``' τ node): ``W_t x``.
In a LLaMA block with ``sparse_moa``, q, k and v's LoRA experts and the block router all read the
attention norm's output: four GEMMs become one. With ``adamole`` (lowered) the q, k and v sites'
24 experts, routers and thresholds become one GEMM.
Emits: ``z = shared_input_projection(x, [W…], sizes)`` (one ``torch.cat`` of the stacked weights,
one GEMM, one split) after x, a ``getitem`` per reader, and each reader rebuilt on its piece:
``expand_lora_site`` (``moa_fx::lora_expand``: the lowered mixture's second half),
``expand_dropout_lora_site`` (``moa_fx::dropout_lora`` given z),
``lora_from_projection``, ``router_from_projection``, ``threshold_from_projection``. Weights stay
the same parameters (read through ``get_attr``), so state dicts and gradients are unchanged; the
results equal the unfused graph's up to rounding: the GEMM's summation order, and in bf16 the
rank-space ``z`` is rounded to bf16 before gating (the unfused mixture kernel keeps it in fp32).
Kept apart (recorded with the reason): the grouped LoRA form (it computes A only at active pairs),
unlowered experts with input dropout (each reads its own dropped copy of x through its nn.Dropout), a threshold under MoA's rule (it
gets no gradient, so its ``.grad`` must stay None, not become zeros), and weights whose dtype
differs from x's. Records: one PassRecord per input with a fused group or a reader kept apart
(``outcome`` "fused" or "kept"; ``parts``: each fused reader's kind, one of "lowered_lora", "lora",
"router", "threshold"; ``experts``: the LoRA experts whose A joined the GEMM; ``kept``: node ->
code of :data:`REASONS`). The functions the rewritten graph calls are in :mod:`moa_fx.ops`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.fx as fx

from .. import ops
from ..graph import FUSION_KEY, LOWERING_KEY, site_of
from .base import ExpertSlot, PassContext, PassRecord, RouterInfo, lora_weight_targets, new_node

__all__ = ["fuse_shared_input", "REASONS"]

PASS = "fuse_shared_input"

REASONS = {  # reason code -> its words in the records' notes
    "grouped_form": "grouped LoRA form computes A only at active pairs",
    "dropout": "LoRA expert with input dropout reads its own dropped copy of x",
    "moa_threshold": "threshold under MoA's rule gets no gradient; fused, its weights would get zeros",
    "dtype": "weight dtype differs from x's {dtype}",
    "no_dtype": "x has no recorded dtype",
}


# --- readers: what each kind of node projects, and how it is rebuilt on its piece ----------------


@dataclass
class Reader:
    node: fx.Node
    x: fx.Node  # the input it projects
    weights: list[str]  # parameter targets stacked by rows, in this order
    width: int  # columns of x·cat(weights)ᵀ this reader takes
    rebuild: Callable[[PassContext, fx.Node, fx.Node], fx.Node]  # (ctx, old node, piece) -> new node
    kind: str  # lowered_lora | lora | router | threshold
    what: str  # for the note
    experts: int = 0  # LoRA experts whose A it reads


@dataclass
class Kept:
    node: fx.Node
    x: fx.Node
    code: str  # a key of REASONS


def _param(ctx: PassContext, target: str, anchor: fx.Node, site: str) -> fx.Node:
    return new_node(ctx, "get_attr", target, (), anchor=anchor, pass_name=PASS, site=site, role="weight")


def _lowered_sites(ctx: PassContext, names: dict[str, fx.Node]) -> Iterator[Reader | Kept]:
    for node in names.values():
        if node.op != "call_function" or node.target not in (ops.lowered_lora_site, ops.dropout_lora_site):
            continue
        _, x, _, a_nodes, _, ranks, _, _, form = node.args[:9]
        if form != "dense":
            yield Kept(node, x, "grouped_form")
            continue

        def rebuild(ctx, old, piece):
            y, x, w, a_nodes, b_nodes, ranks, scales, cols, _ = old.args[:9]  # read now: earlier rewrites may move them
            if old.target is ops.dropout_lora_site:  # the dropped entries are subtracted from the piece: exact
                target, args = ops.expand_dropout_lora_site, (y, piece, x, w, a_nodes, b_nodes, ranks, scales, cols,
                                                              *old.args[9:])
            else:
                target, args = ops.expand_lora_site, (y, piece, w, b_nodes, ranks, scales, cols)
            new = new_node(ctx, "call_function", target, args, anchor=y, pass_name=PASS, site=site_of(old),
                           role="fused dense LoRA expand", val=old.meta.get("val"))
            new.meta[LOWERING_KEY] = old.meta.get(LOWERING_KEY)
            return new

        yield Reader(node, x, [a.target for a in a_nodes], sum(ranks), rebuild, "lowered_lora",
                     f"LoRA A x{len(ranks)}", len(ranks))


def _lora_experts(ctx: PassContext, names: dict[str, fx.Node]) -> Iterator[Reader | Kept]:
    for slot in ctx.slots:
        node = names.get(slot.delta)
        if slot.kind != "lora" or node is None or node.op != "call_module" or node.target != slot.module:
            continue  # not LoRA, or lowered into a fused site
        yield _lora_expert(ctx, slot, node)


def _lora_expert(ctx: PassContext, slot: ExpertSlot, node: fx.Node) -> Reader | Kept:
    module = ctx.gm.get_submodule(slot.module)
    x = node.args[0]
    if not isinstance(module.dropout, torch.nn.Identity):
        return Kept(node, x, "dropout")
    a_target, b_target = lora_weight_targets(ctx, slot)

    def rebuild(ctx, old, piece):
        b = _param(ctx, b_target, old, site_of(old))
        return new_node(ctx, "call_function", ops.lora_from_projection, (piece, b, float(module.scale)), anchor=old,
                        pass_name=PASS, site=site_of(old), role="LoRA expert (fused A)", val=old.meta.get("val"))

    return Reader(node, x, [a_target], module.r, rebuild, "lora", "LoRA A", 1)


def _routers(ctx: PassContext, names: dict[str, fx.Node]) -> Iterator[Reader | Kept]:
    for info in ctx.routers.values():
        yield _router(ctx, info, names[info.logits])
        if info.tau is not None:
            yield _threshold(ctx, info, names[info.tau])


def _router(ctx: PassContext, info: RouterInfo, node: fx.Node) -> Reader:
    module = ctx.gm.get_submodule(node.target)
    t = node.target

    def rebuilt(new: fx.Node) -> fx.Node:
        info.logits = new.name
        return new

    if module.form == "linear":
        has_bias = module.proj.bias is not None

        def rebuild(ctx, old, piece):
            bias = _param(ctx, f"{t}.proj.bias", old, site_of(old)) if has_bias else None
            return rebuilt(new_node(ctx, "call_function", ops.router_from_projection, (piece, bias), anchor=old,
                                    pass_name=PASS, site=site_of(old), role="router logits (fused)",
                                    val=old.meta.get("val")))

        return Reader(node, node.args[0], [f"{t}.proj.weight"], module.proj.out_features, rebuild, "router", "router")

    def rebuild(ctx, old, piece):
        names = ("w2.weight", "w1.bias", "w3.bias", "w2.bias")
        args = [_param(ctx, f"{t}.{name}", old, site_of(old)) for name in names]
        return rebuilt(new_node(ctx, "call_function", ops.router_from_projection, (piece, None, *args), anchor=old,
                                pass_name=PASS, site=site_of(old), role="SwiGLU router logits (fused)",
                                val=old.meta.get("val")))

    return Reader(node, node.args[0], [f"{t}.w1.weight", f"{t}.w3.weight"], 2 * module.w1.out_features, rebuild,
                  "router", "router")


def _threshold(ctx: PassContext, info: RouterInfo, node: fx.Node) -> Reader | Kept:
    module = ctx.gm.get_submodule(node.target)
    t = node.target
    if ctx.spec.router.threshold.rule != "adamole":
        # MoA's rule: τ only selects, so W_t and b_t get no gradient (.grad stays None and AdamW
        # skips them). Inside a shared GEMM they would get zero gradients instead, which
        # AdamW's weight decay acts on: a different training run. So τ keeps its own GEMM.
        return Kept(node, node.args[0], "moa_threshold")

    def rebuild(ctx, old, piece):
        bias = _param(ctx, f"{t}.proj.bias", old, site_of(old))
        new = new_node(ctx, "call_function", ops.threshold_from_projection, (piece, bias, float(module.tau_max)),
                       anchor=old, pass_name=PASS, site=site_of(old), role="threshold (fused)", val=old.meta.get("val"))
        info.tau = new.name
        return new

    return Reader(node, node.args[0], [f"{t}.proj.weight"], 1, rebuild, "threshold", "threshold")


READERS = (_lowered_sites, _lora_experts, _routers)  # each: (ctx, nodes by name) -> Readers and Kept


# --- the pass --------------------------------------------------------------------------------------


def fuse_shared_input(ctx: PassContext) -> None:
    """Give every tensor read by two or more small projections one GEMM and a split."""
    names = {n.name: n for n in ctx.gm.graph.nodes}
    order = {n: i for i, n in enumerate(names.values())}
    found = sorted((f for source in READERS for f in source(ctx, names)), key=lambda f: order[f.node])
    groups: dict[fx.Node, list[Reader]] = {}
    kept: dict[fx.Node, list[Kept]] = {}
    for f in found:
        (groups if isinstance(f, Reader) else kept).setdefault(f.x, []).append(f)
    for x in dict.fromkeys([*groups, *kept]):
        readers = groups.get(x, [])
        dtype = getattr(x.meta.get("val"), "dtype", None)
        odd = [r for r in readers if dtype is None or any(ctx.gm.get_parameter(t).dtype != dtype for t in r.weights)]
        readers = [r for r in readers if r not in odd]
        left = {r.node.name: "dtype" if dtype is not None else "no_dtype" for r in odd}
        left.update((k.node.name, k.code) for k in kept.get(x, []))
        notes = [f"{name}: {REASONS[code].format(dtype=dtype)}" for name, code in left.items()]
        site = site_of(readers[0].node) if readers else x.name
        if len(readers) < 2:
            if left:
                ctx.records.append(PassRecord(PASS, site, [], "kept: " + "; ".join(notes), outcome="kept", kept=left))
            continue
        _fuse(ctx, x, readers, notes, left)


def _fuse(ctx: PassContext, x: fx.Node, readers: list[Reader], notes: list[str], left: dict[str, str]) -> None:
    graph = ctx.gm.graph
    site = site_of(readers[0].node)
    sizes = [r.width for r in readers]
    added = []
    anchor = x.next
    while anchor.op == "placeholder":  # x is a graph input: start after the last input
        anchor = anchor.next
    with graph.inserting_before(anchor):
        weights = [_param(ctx, t, x, site) for r in readers for t in r.weights]
        fused = new_node(ctx, "call_function", ops.shared_input_projection, (x, weights, sizes),
                         anchor=readers[0].node, pass_name=PASS, site=site, role="shared-input GEMM",
                         val=tuple(_shaped(x, n) for n in sizes))
        pieces = [new_node(ctx, "call_function", operator.getitem, (fused, i), anchor=readers[0].node, pass_name=PASS,
                           site=site, role=f"piece for {r.what}", val=_shaped(x, r.width))
                  for i, r in enumerate(readers)]
    fused.meta[FUSION_KEY] = {"readers": [r.node.name for r in readers], "sizes": sizes}
    added += [n.name for n in (*weights, fused, *pieces)]
    for reader, piece in zip(readers, pieces):
        old = reader.node
        with graph.inserting_before(old):
            new = reader.rebuild(ctx, old, piece)
        old.replace_all_uses_with(new)
        graph.erase_node(old)
        added.append(new.name)
    note = (f"one GEMM of {sum(sizes)} columns for {len(readers)} readers of {x.name} ("
            + ", ".join(r.what for r in readers) + ")")
    if notes:
        note += "; kept: " + "; ".join(notes)
    ctx.records.append(PassRecord(PASS, site, added, note, outcome="fused", experts=sum(r.experts for r in readers),
                                  parts=[r.kind for r in readers], kept=left))


def _shaped(x: fx.Node, last: int):
    val = x.meta.get("val")
    return val.new_empty((*val.shape[:-1], last)) if isinstance(val, torch.Tensor) else None
