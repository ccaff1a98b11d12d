"""Fuse the skinny GEMMs that read one tensor into one GEMM followed by splits.

Matches: every node x read by two or more *readers*, each a small projection of x:
- a dense lowered LoRA site (``lowered_lora_site``, form "dense"): its ``x·A_catᵀ``;
- an unlowered LoRA expert without input dropout (``LoraDelta`` / HydraLoRA head): its ``x·Aᵀ``;
- a router (``Router``): ``W x`` (linear) or ``W₁x`` and ``W₃x`` (SwiGLU);
- a learned threshold (``Threshold``): ``W_t x``.
In a LLaMA block with ``sparse_moa``, q, k and v's LoRA experts and the block router all read the
attention norm's output: four GEMMs become one. With ``adamole`` the q, k and v
routers and thresholds (six GEMMs) become one; its experts keep their own dropped inputs.
Emits: ``z = shared_input_projection(x, [W…], sizes)`` (one ``torch.cat`` of the stacked weights,
one GEMM, one split) after x, a ``getitem`` per reader, and each reader rebuilt on its piece:
``expand_lora_site`` (``moa_fx::lora_expand``: the lowered mixture's second half),
``lora_from_projection``, ``router_from_projection``, ``threshold_from_projection``. Weights stay
the same parameters (read through ``get_attr``), so state dicts and gradients are unchanged; the
results equal the unfused graph's up to rounding: the GEMM's summation order, and in bf16 the
rank-space ``z`` is rounded to bf16 before gating (the unfused mixture kernel keeps it in fp32).
Kept apart (recorded with the reason): the grouped LoRA form (it computes A only at active pairs),
experts with input dropout (each reads its own dropped copy of x), a threshold under MoA's rule (it
gets no gradient, so its ``.grad`` must stay None, not become zeros), and weights whose dtype
differs from x's. Records: one PassRecord per fused group.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..kernels import lora_expand
from ..kinds.lora import LoraDelta, SharedALoraDelta
from ..modules import Router, Threshold
from .base import PassContext, PassRecord, new_node
from .lower_sparse_dispatch import LOWERING_KEY, lowered_lora_site, shared_a_target, site_weights

__all__ = ["fuse_shared_input", "shared_input_projection", "expand_lora_site", "FUSION_KEY"]

PASS = "fuse_shared_input"
FUSION_KEY = "moa_fx.fusion"


# --- the functions the rewritten graph calls ------------------------------------------------------


def shared_input_projection(x: torch.Tensor, weights: list[torch.Tensor], sizes: list[int]) -> tuple:
    """``split(x · cat(weights)ᵀ, sizes)``: every reader's projection of x from one GEMM."""
    return tuple(torch.split(F.linear(x, torch.cat(weights, dim=0)), sizes, dim=-1))


def expand_lora_site(y: torch.Tensor, z: torch.Tensor, w: torch.Tensor | None, b_list: list[torch.Tensor],
                     ranks: list[int], scales: list[float], cols: list[int]) -> torch.Tensor:
    """``y + Σ_e w[…, col_e]·s_e·B_e z_e`` for the site's rank-space ``z = x·A_catᵀ`` (the second half
    of :func:`~moa_fx.passes.lower_sparse_dispatch.lowered_lora_site`)."""
    dtype = y.dtype
    y2 = y.reshape(-1, y.shape[-1])
    z2 = z.reshape(-1, z.shape[-1])
    weights = site_weights(w, cols, z2, len(ranks))
    b_cat = torch.cat([b.to(dtype) for b in b_list], dim=1)
    return lora_expand(y2, z2, b_cat, weights.to(dtype), ranks, scales).reshape(y.shape)


def lora_from_projection(z: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """An unlowered LoRA expert's ``s·B z`` for its ``z = x·Aᵀ``."""
    return F.linear(z, b) * scale


def router_from_projection(z: torch.Tensor, bias: torch.Tensor | None, w2: torch.Tensor | None = None,
                           b1: torch.Tensor | None = None, b3: torch.Tensor | None = None,
                           b2: torch.Tensor | None = None) -> torch.Tensor:
    """Router logits from ``z``: linear ``z + b``, or SwiGLU ``W₂(silu(z₁ + b₁) ⊙ (z₃ + b₃)) + b₂``
    with ``z = [W₁x | W₃x]``."""
    # biases in z's dtype, as nn.Linear under autocast adds them (bf16 z, fp32 bias -> bf16)
    if w2 is None:
        return z if bias is None else z + bias.to(z.dtype)
    z1, z3 = z.chunk(2, dim=-1)
    return F.linear(F.silu(z1 + b1.to(z.dtype)) * (z3 + b3.to(z.dtype)), w2, b2)


def threshold_from_projection(z: torch.Tensor, bias: torch.Tensor, tau_max: float) -> torch.Tensor:
    """``τ = τ_max·sigmoid(z + b)`` for ``z = W_t x``."""
    return tau_max * torch.sigmoid(z + bias.to(z.dtype))


# --- readers: what each kind of node projects, and how it is rebuilt on its piece ----------------


@dataclass
class Reader:
    node: fx.Node
    weights: list[str]  # parameter targets stacked by rows, in this order
    width: int  # columns of x·cat(weights)ᵀ this reader takes
    rebuild: Callable[[PassContext, fx.Node, fx.Node], fx.Node]  # (ctx, old node, piece) -> new node
    what: str


def _param(ctx: PassContext, target: str, anchor: fx.Node, site: str) -> fx.Node:
    return new_node(ctx, "get_attr", target, (), anchor=anchor, pass_name=PASS, site=site, role="weight")


def _site(node: fx.Node) -> str:
    return node.meta.get("moa_fx.provenance", [{}])[-1].get("site", node.name)


def _lowered_site(ctx: PassContext, node: fx.Node) -> Reader | str | None:
    if node.op != "call_function" or node.target is not lowered_lora_site:
        return None
    _, _, _, a_nodes, _, ranks, _, _, form = node.args
    if form != "dense":
        return "grouped LoRA form computes A only at active pairs"

    def rebuild(ctx, old, piece):
        y, _, w, _, b_nodes, ranks, scales, cols, _ = old.args  # read now: earlier rewrites may have moved them
        new = new_node(ctx, "call_function", expand_lora_site, (y, piece, w, b_nodes, ranks, scales, cols),
                       anchor=y, pass_name=PASS, site=_site(old), role="fused dense LoRA expand",
                       val=old.meta.get("val"))
        new.meta[LOWERING_KEY] = old.meta.get(LOWERING_KEY)
        return new

    return Reader(node, [a.target for a in a_nodes], sum(ranks), rebuild, f"LoRA A x{len(ranks)}")


def _module_reader(ctx: PassContext, node: fx.Node) -> Reader | str | None:
    if node.op != "call_module":
        return None
    module = ctx.gm.get_submodule(node.target)
    t = node.target
    if isinstance(module, (LoraDelta, SharedALoraDelta)):
        if not isinstance(module.dropout, torch.nn.Identity):
            return "LoRA expert with input dropout reads its own dropped copy of x"
        a_target = f"{t}.lora_A" if "lora_A" in module._parameters else shared_a_target(ctx, module)

        def rebuild(ctx, old, piece):
            b = _param(ctx, f"{t}.lora_B", old, _site(old))
            return new_node(ctx, "call_function", lora_from_projection, (piece, b, float(module.scale)), anchor=old,
                            pass_name=PASS, site=_site(old), role="LoRA expert (fused A)", val=old.meta.get("val"))

        return Reader(node, [a_target], module.r, rebuild, "LoRA A")
    if isinstance(module, Router):
        if module.form == "linear":
            has_bias = module.proj.bias is not None

            def rebuild(ctx, old, piece):
                bias = _param(ctx, f"{t}.proj.bias", old, _site(old)) if has_bias else None
                return new_node(ctx, "call_function", router_from_projection, (piece, bias), anchor=old,
                                pass_name=PASS, site=_site(old), role="router logits (fused)", val=old.meta.get("val"))

            return Reader(node, [f"{t}.proj.weight"], module.proj.out_features, rebuild, "router")

        def rebuild(ctx, old, piece):
            names = ("w2.weight", "w1.bias", "w3.bias", "w2.bias")
            args = [_param(ctx, f"{t}.{name}", old, _site(old)) for name in names]
            return new_node(ctx, "call_function", router_from_projection, (piece, None, *args), anchor=old,
                            pass_name=PASS, site=_site(old), role="SwiGLU router logits (fused)",
                            val=old.meta.get("val"))

        return Reader(node, [f"{t}.w1.weight", f"{t}.w3.weight"], 2 * module.w1.out_features, rebuild, "router")
    if isinstance(module, Threshold):
        if ctx.spec.router.threshold.rule != "adamole":
            # MoA's rule: τ only selects, so W_t and b_t get no gradient (.grad stays None and AdamW
            # skips them). Inside a shared GEMM they would get zero gradients instead, which
            # AdamW's weight decay acts on: a different training run. So τ keeps its own GEMM.
            return "threshold under MoA's rule gets no gradient; fused, its weights would get zeros"

        def rebuild(ctx, old, piece):
            bias = _param(ctx, f"{t}.proj.bias", old, _site(old))
            return new_node(ctx, "call_function", threshold_from_projection, (piece, bias, float(module.tau_max)),
                            anchor=old, pass_name=PASS, site=_site(old), role="threshold (fused)",
                            val=old.meta.get("val"))

        return Reader(node, [f"{t}.proj.weight"], 1, rebuild, "threshold")
    return None


READERS = (_lowered_site, _module_reader)  # each: node -> Reader, a reason it cannot fuse, or None


def _input_of(node: fx.Node) -> fx.Node | None:
    if node.op == "call_function" and node.target is lowered_lora_site:
        return node.args[1]
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


# --- the pass --------------------------------------------------------------------------------------


def fuse_shared_input(ctx: PassContext) -> None:
    """Give every tensor read by two or more small projections one GEMM and a split."""
    graph = ctx.gm.graph
    groups: dict[fx.Node, list[Reader]] = {}
    kept: dict[fx.Node, list[str]] = {}
    for node in list(graph.nodes):
        for match in READERS:
            found = match(ctx, node)
            if found is None:
                continue
            x = _input_of(node)
            if isinstance(found, str):
                kept.setdefault(x, []).append(f"{node.name}: {found}")
            else:
                groups.setdefault(x, []).append(found)
            break
    for x in dict.fromkeys([*groups, *kept]):
        readers = groups.get(x, [])
        dtype = getattr(x.meta.get("val"), "dtype", None)
        odd = [r for r in readers if dtype is None or any(ctx.gm.get_parameter(t).dtype != dtype for t in r.weights)]
        readers = [r for r in readers if r not in odd]
        notes = [f"{r.node.name}: weight dtype differs from x's {dtype}" if dtype is not None else
                 f"{r.node.name}: x has no recorded dtype" for r in odd] + kept.get(x, [])
        site = _site(readers[0].node) if readers else x.name
        if len(readers) < 2:
            if notes:
                ctx.records.append(PassRecord(PASS, site, [], "kept: " + "; ".join(notes)))
            continue
        _fuse(ctx, x, readers, notes)


def _fuse(ctx: PassContext, x: fx.Node, readers: list[Reader], notes: list[str]) -> None:
    graph = ctx.gm.graph
    site = _site(readers[0].node)
    sizes = [r.width for r in readers]
    added = []
    anchor = x.next
    while anchor.op == "placeholder":  # x is a graph input: start after the last input
        anchor = anchor.next
    with graph.inserting_before(anchor):
        weights = [_param(ctx, t, x, site) for r in readers for t in r.weights]
        fused = new_node(ctx, "call_function", shared_input_projection, (x, weights, sizes), anchor=readers[0].node,
                         pass_name=PASS, site=site, role="shared-input GEMM",
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
    ctx.records.append(PassRecord(PASS, site, added, note))


def _shaped(x: fx.Node, last: int):
    val = x.meta.get("val")
    return val.new_empty((*val.shape[:-1], last)) if isinstance(val, torch.Tensor) else None
