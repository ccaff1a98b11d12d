"""Insert prompt-tuning experts at attention ops.

Matches: placements of ``kind = "prompt"`` rules at :class:`~moa_fx.sites.AttentionSite` s (the
``scaled_dot_product_attention`` node of an attention module).
Emits: ``get_attr`` nodes for the frozen k/v projection weights (and biases), and one
``call_module`` node computing ``O_P = gate_h · softmax(q·k_Pᵀ/√hd) · v_P`` from the query after
RoPE, as an :class:`ExpertSlot` anchored at the SDPA output (layout "heads": (B, H, S, hd)), so the
prompt output is added before ``o_proj`` and feeds o_proj's LoRA. Records: one PassRecord per site.
"""

from __future__ import annotations

from ..graph import shaped_like
from ..modules import PromptDelta
from ..spec import PromptExpert
from .base import ExpertSlot, PassContext, PassRecord, expert_id, new_node, router_key

__all__ = ["insert_prompt_experts"]

PASS = "insert_prompt_experts"


def insert_prompt_experts(ctx: PassContext) -> None:
    """Insert a prompt expert node beside every attention op a prompt rule matched."""
    for placement in ctx.plan.placements:
        rule = placement.rule
        if not isinstance(rule, PromptExpert):
            continue
        site = placement.site
        sdpa = ctx.node(site.node)
        q = ctx.node(site.query)
        val = sdpa.meta.get("val")
        target = ctx.install(f"{site.path}.{rule.name}.0", lambda: PromptDelta(
            rule.length, site.hidden, site.q_heads, site.kv_heads, site.head_dim, site.k_offset, site.v_offset,
            site.transposed, device=val.device if val is not None else None,
            dtype=val.dtype if val is not None else None))
        added = []
        with ctx.gm.graph.inserting_before(sdpa.next):
            weights = []
            for name in (site.k_weight, site.v_weight, site.k_bias, site.v_bias):
                if name is None:
                    weights.append(None)
                    continue
                node = new_node(ctx, "get_attr", name, (), anchor=sdpa, pass_name=PASS, site=site.path,
                                role="frozen k/v projection")
                weights.append(node)
                added.append(node.name)
            delta = new_node(ctx, "call_module", target, (q, *weights), anchor=sdpa, pass_name=PASS,
                             site=site.path, role=f"expert {rule.name}", val=shaped_like(sdpa))
        added.append(delta.name)
        ctx.slots.append(ExpertSlot(
            expert_id=expert_id(ctx, placement, 0, 1), anchor=sdpa.name, delta=delta.name,
            router_key=router_key(ctx, placement), layout="heads", site=site.path, rule=rule.name,
            kind="prompt", module=target, input=q.name))
        ctx.records.append(PassRecord(PASS, site.path, added, f"L={rule.length}, {site.q_heads} heads / "
                                                             f"{site.kv_heads} kv heads"))
