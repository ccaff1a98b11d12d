"""Insert parallel adapters beside module spans (e.g. each MLP).

Matches: placements of ``kind = "parallel_adapter"`` rules at :class:`~moa_fx.sites.SpanSite` s.
Emits: one ``call_module`` node ``Δ = W_up·act(W_down·h + b_down) + b_up`` reading the span's
input h, as an :class:`ExpertSlot` anchored at the span's output (added before the residual).
Records: one PassRecord per span.
"""

from __future__ import annotations

from ..graph import shaped_like
from ..modules import ParallelAdapter
from ..spec import ParallelAdapterExpert
from .base import ExpertSlot, PassContext, PassRecord, expert_id, new_node, router_key

__all__ = ["insert_parallel_adapters"]

PASS = "insert_parallel_adapters"


def insert_parallel_adapters(ctx: PassContext) -> None:
    """Insert a bottleneck adapter node beside every span a parallel_adapter rule matched."""
    for placement in ctx.plan.placements:
        rule = placement.rule
        if not isinstance(rule, ParallelAdapterExpert):
            continue
        site = placement.site
        out = ctx.node(site.output)
        h = ctx.node(site.input)
        val = out.meta.get("val")
        device = val.device if val is not None else None
        dtype = val.dtype if val is not None else None
        target = ctx.install(f"{site.path}.{rule.name}.0", lambda: ParallelAdapter(
            site.dim, rule.bottleneck, rule.activation, rule.init_gain, device=device, dtype=dtype))
        with ctx.gm.graph.inserting_before(out.next):
            delta = new_node(ctx, "call_module", target, (h,), anchor=out, pass_name=PASS, site=site.path,
                             role=f"expert {rule.name}", val=shaped_like(out))
        ctx.slots.append(ExpertSlot(
            expert_id=expert_id(ctx, placement, 0, 1), anchor=out.name, delta=delta.name,
            router_key=router_key(ctx, placement), layout="tokens", site=site.path, rule=rule.name,
            kind="parallel_adapter", module=target, input=h.name))
        ctx.records.append(PassRecord(PASS, site.path, [delta.name], f"bottleneck {rule.bottleneck}"))
