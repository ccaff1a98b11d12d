"""Insert LoRA expert branches at linear sites.

Matches: placements of ``kind = "lora"`` rules at :class:`~moa_fx.sites.LinearSite` s.
Emits: per expert, one ``call_module`` node ``Δ_e = s·B_e(A_e(dropout(x)))`` reading the
projection's input x (a :class:`~moa_fx.modules.LoraDelta`, or a HydraLoRA head sharing one A),
registered as an :class:`ExpertSlot` anchored at the projection's output; the combine is
inserted by ``insert_routers``. Records: one PassRecord per site.
"""

from __future__ import annotations

from ..graph import shaped_like
from ..modules import LoraDelta, SharedALoraDelta
from ..spec import LoraExpert
from .base import ExpertSlot, PassContext, PassRecord, expert_id, new_node, router_key, weight_device_dtype

__all__ = ["insert_lora_experts"]

PASS = "insert_lora_experts"


def insert_lora_experts(ctx: PassContext) -> None:
    """Insert one Δ node per LoRA expert at every linear site a lora rule matched."""
    for placement in ctx.plan.placements:
        rule = placement.rule
        if not isinstance(rule, LoraExpert):
            continue
        site = placement.site
        y = ctx.node(site.node)
        x = ctx.node(site.input)
        device, dtype = weight_device_dtype(ctx, site.weight)
        record = PassRecord(PASS, site.path, note=f"{len(rule.ranks)} x LoRA r={list(rule.ranks)} alpha={rule.alpha}")
        shared = None
        anchor = y.next
        for i, r in enumerate(rule.ranks):
            if rule.share_a:
                def make(r=r, shared=shared):
                    return SharedALoraDelta(shared, site.d_in, site.d_out, r, rule.alpha, rule.dropout,
                                            device=device, dtype=dtype)
            else:
                def make(r=r):
                    return LoraDelta(site.d_in, site.d_out, r, rule.alpha, rule.dropout, device=device, dtype=dtype)
            target = ctx.install(f"{site.path}.{rule.name}.{i}", make)
            if rule.share_a and shared is None:
                shared = ctx.gm.get_submodule(target)
            with ctx.gm.graph.inserting_before(anchor):
                delta = new_node(ctx, "call_module", target, (x,), anchor=y, pass_name=PASS, site=site.path,
                                 role=f"expert {rule.name}.{i}", val=shaped_like(y))
            record.added.append(delta.name)
            ctx.slots.append(ExpertSlot(
                expert_id=expert_id(ctx, placement, i, len(rule.ranks)), anchor=y.name, delta=delta.name,
                router_key=router_key(ctx, placement), layout="tokens", site=site.path, rule=rule.name,
                kind="lora", module=target, input=x.name))
        ctx.records.append(record)
