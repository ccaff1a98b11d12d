"""Insert prompt-tuning experts at attention ops.

Matches: placements of ``kind = "prompt"`` rules at :class:`~moa_fx.sites.AttentionSite` s (the
``scaled_dot_product_attention`` node of an attention module).
Emits, after the attention op: ``get_attr`` nodes for the prompts and the frozen k/v projection
weights (and biases); ``k_P = prompt_projection(P, W_k, b_k)`` and the same for v; a replay of the
nodes of every position-free module the model's keys (values) pass through on their way to
attention (the site's ``k_ops`` / ``v_ops``: Qwen3's ``k_norm``; never RoPE), laid out as the
model's keys were where the module read them; and one ``call_module`` node computing
``O_P = gate_h · softmax(q·k_Pᵀ/√hd) · v_P`` from the query after RoPE, as an :class:`ExpertSlot`
anchored at the SDPA output (layout "heads": (B, H, S, hd)), so the prompt output is added before
``o_proj`` and feeds o_proj's LoRA. Records: one PassRecord per site.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..graph import shaped_like
from ..modules import PromptDelta, prompt_projection
from ..sites import AttentionSite, PromptOp
from ..spec import PromptExpert
from .base import ExpertSlot, PassContext, PassRecord, expert_id, new_node, router_key

__all__ = ["insert_prompt_experts"]

PASS = "insert_prompt_experts"

aten = torch.ops.aten


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
        added: list[str] = []

        def make(op: str, fn, args: tuple, role: str, kwargs: dict | None = None) -> fx.Node:
            node = new_node(ctx, op, fn, args, kwargs=kwargs, anchor=sdpa, pass_name=PASS, site=site.path, role=role)
            added.append(node.name)
            return node

        with ctx.gm.graph.inserting_before(sdpa.next):
            prompt = make("get_attr", f"{target}.prompt", (), "prompts")
            sides = []
            for what, weight, bias, offset, ops in (("key", site.k_weight, site.k_bias, site.k_offset, site.k_ops),
                                                    ("value", site.v_weight, site.v_bias, site.v_offset, site.v_ops)):
                w = make("get_attr", weight, (), f"frozen {what} projection")
                b = make("get_attr", bias, (), f"frozen {what} projection") if bias is not None else None
                x = make("call_function", prompt_projection,
                         (prompt, w, b, offset, site.kv_heads * site.head_dim, site.transposed), f"prompt {what}s")
                for op in ops:
                    x = _replay(op, x, rule.length, site, make, ctx)
                sides.append(x)
            delta = new_node(ctx, "call_module", target, (q, *sides), anchor=sdpa, pass_name=PASS,
                             site=site.path, role=f"expert {rule.name}", val=shaped_like(sdpa))
        added.append(delta.name)
        ctx.slots.append(ExpertSlot(
            expert_id=expert_id(ctx, placement, 0, 1), anchor=sdpa.name, delta=delta.name,
            router_key=router_key(ctx, placement), layout="heads", site=site.path, rule=rule.name,
            kind="prompt", module=target, input=q.name))
        through = [op.path.rsplit(".", 1)[-1] for op in (*site.k_ops, *site.v_ops)]
        ctx.records.append(PassRecord(PASS, site.path, added, f"L={rule.length}, {site.q_heads} heads / "
                                                             f"{site.kv_heads} kv heads" +
                                      (f", keys/values through {', '.join(through)}" if through else "")))


def _replay(op: PromptOp, x: fx.Node, length: int, site: AttentionSite, make, ctx: PassContext) -> fx.Node:
    """The prompts' keys ``x`` (L, kv_heads·hd) through a copy of ``op``'s nodes: shaped as the model's
    keys were where ``op`` read them, with one batch row and L positions; back to (L, kv_heads·hd)."""
    role = f"prompt through {op.path.rsplit('.', 1)[-1]}"
    if op.heads_first:  # (1, kv_heads, L, hd)
        x = make("call_function", aten.reshape.default, (x, [1, length, *op.shape]), role)
        x = make("call_function", aten.transpose.int, (x, 1, 2), role)
    else:  # (1, L, *shape)
        x = make("call_function", aten.reshape.default, (x, [1, length, *op.shape]), role)
    env = {ctx.node(op.input): x}
    for name in op.nodes:
        node = ctx.node(name)
        args = fx.node.map_arg(node.args, lambda a: env.get(a, a))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env.get(a, a))
        env[node] = make("call_function", node.target, args, role, kwargs=kwargs)
    out = env[ctx.node(op.output)]
    if op.heads_first:
        out = make("call_function", aten.transpose.int, (out, 1, 2), role)
    return make("call_function", aten.reshape.default, (out, [length, site.kv_heads * site.head_dim]), role)
