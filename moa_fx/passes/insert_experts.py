"""Insert every expert rule's nodes at its placements.

Matches: the :class:`~moa_fx.sites.Placement` s of the site plan. Emits: what each placement's kind
(:mod:`moa_fx.kinds`) inserts: per expert, a Δ node computing its unweighted contribution,
registered as an :class:`ExpertSlot` at its anchor (a projection output, a span output, an
attention output); the combine is inserted by ``insert_routers``. Records: one PassRecord per
placement. Kinds insert in registration order (lora, parallel_adapter, prompt), each over its
placements in graph order: the order of the expert slots, which decides the routers' column order
where experts share an anchor (down_proj's LoRA before the adapter of the MLP that ends there).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ..kinds import KINDS
from ..sites import Placement
from .base import ExpertSlot, PassContext, PassRecord, expert_id, new_node, router_key, weight_device_dtype

__all__ = ["insert_experts", "Emitter"]

PASS = "insert_experts"


def insert_experts(ctx: PassContext) -> None:
    """Insert the expert nodes of every placement, kind by kind."""
    for kind in KINDS.values():
        for placement in ctx.plan.placements:
            if placement.rule.kind == kind.key:
                kind.insert(Emitter(ctx, placement), placement)


class Emitter:
    """What a kind's ``insert`` sees of the pass context at one placement: the graph's nodes by
    name, its adapter modules (named ``<site>.<rule name>.<index>``), new nodes (with provenance
    naming this pass and the site), expert slots and the placement's PassRecord."""

    def __init__(self, ctx: PassContext, placement: Placement) -> None:
        self.ctx, self.placement = ctx, placement
        self.added: list[str] = []

    def node(self, name: str) -> fx.Node:
        return self.ctx.node(name)

    def inserting_before(self, node: fx.Node) -> contextlib.AbstractContextManager:
        return self.ctx.gm.graph.inserting_before(node)

    def weight_device_dtype(self, param_name: str):
        """The device and (floating) dtype of a parameter or buffer of the model."""
        return weight_device_dtype(self.ctx, param_name)

    @staticmethod
    def value_device_dtype(node: fx.Node):
        """The device and dtype of ``node``'s value (None, None when it has no recorded value)."""
        val = node.meta.get("val")
        return (val.device, val.dtype) if val is not None else (None, None)

    def install(self, index: int, make: Callable[[], nn.Module]) -> str:
        """The call target of the placement's expert module ``index`` (``make()`` unless shared)."""
        p = self.placement
        return self.ctx.install(f"{p.site.path}.{p.rule.name}.{index}", make)

    def submodule(self, target: str) -> nn.Module:
        return self.ctx.gm.get_submodule(target)

    def add(self, op: str, target: Any, args: tuple, *, anchor: fx.Node, role: str, kwargs: dict | None = None,
            val: Any = None) -> fx.Node:
        """A new node at the current insertion point, with metadata copied from ``anchor``."""
        node = new_node(self.ctx, op, target, args, kwargs=kwargs, anchor=anchor, pass_name=PASS,
                        site=self.placement.site.path, role=role, val=val)
        self.added.append(node.name)
        return node

    def slot(self, delta: fx.Node, *, anchor: fx.Node, index: int, count: int, layout: str, module: str,
             input: fx.Node, site_input: fx.Node | None = None) -> None:
        """Register expert ``index`` of ``count`` at this site: ``delta`` (reading ``input``) is added to
        ``anchor``'s value (layout "tokens": (…, d); "heads": (B, H, S, hd)) once the router has weighted
        it; ``site_input``: the site's undropped input when ``input`` is a dropped copy of it."""
        p = self.placement
        self.ctx.slots.append(ExpertSlot(
            expert_id=expert_id(self.ctx, p, index, count), anchor=anchor.name, delta=delta.name,
            router_key=router_key(self.ctx, p), layout=layout, site=p.site.path, rule=p.rule.name,
            kind=p.rule.kind, module=module, input=input.name,
            site_input=site_input.name if site_input is not None else ""))

    def record(self, note: str) -> None:
        """The PassRecord of this placement: the nodes added so far and ``note``."""
        self.ctx.records.append(PassRecord(PASS, self.placement.site.path, self.added, note))
