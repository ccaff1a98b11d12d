"""Prompt-tuning experts at attention ops (METHODS.md, Prompt-tuning expert).

Spec: :class:`~moa_fx.spec.PromptExpert`. Sites: the attention op of an attention module
(:class:`~moa_fx.sites.AttentionSite`: the ``scaled_dot_product_attention`` node, or the eager
``softmax(q·kᵀ)·v`` pattern). Emits, after the attention op: ``get_attr`` nodes for the prompts and
the frozen k/v projection weights (and biases); ``k_P = prompt_projection(P, W_k, b_k)`` and the
same for v; a replay of the nodes of every position-free module the model's keys (values) pass
through on their way to attention (the site's ``k_ops`` / ``v_ops``: Qwen3's ``k_norm``; never
RoPE), laid out as the model's keys were where the module read them; and one ``call_module`` node
computing ``O_P = gate_h · softmax(q·k_Pᵀ/√hd) · v_P`` from the query after RoPE, an expert slot
anchored at the attention output (layout "heads": (B, H, S, hd)), so the prompt output is added
before ``o_proj`` and feeds o_proj's LoRA.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch import nn

from ..ops import prompt_projection
from ..graph import shaped_like
from ..spec import PromptExpert
from .registry import ExpertKind, register

if TYPE_CHECKING:
    from ..sites import AttentionSite, PromptOp

__all__ = ["PromptKind", "PromptDelta"]

aten = torch.ops.aten


class PromptDelta(nn.Module):
    """Prompt-tuning expert inside attention (METHODS.md, Prompt-tuning expert).

    ``O_P = gate_h · softmax(q·k_Pᵀ/√hd) · v_P`` with the prompts' keys and values given as
    (L, kv_heads·hd). The graph computes them (:meth:`PromptKind.insert`):
    ``k_P = k_proj(P)``, ``v_P = v_proj(P)`` through the frozen projections (:func:`moa_fx.ops.prompt_projection`,
    at ``k_offset`` / ``v_offset`` of a fused weight), then through every module the model's own
    keys (values) pass on their way to attention that reads nothing but them (Qwen3's ``k_norm``,
    as the official MoA Qwen3 code does); no RoPE on k_P. GQA by repeating the kv heads, softmax
    over the L prompts only, in fp32. Returns O_P shaped like the SDPA output.
    """

    def __init__(self, length: int, hidden: int, q_heads: int, kv_heads: int, head_dim: int,
                 k_offset: int, v_offset: int, transposed: bool = False, *, device=None, dtype=None) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(length, hidden, device=device, dtype=dtype))  # nn.Embedding's N(0, 1)
        self.head_gate = nn.Parameter(torch.zeros(q_heads, device=device, dtype=dtype))
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        # where the key and value rows sit in the frozen projection (the graph's prompt_projection slices there)
        self.k_offset, self.v_offset = k_offset, v_offset
        self.transposed = transposed

    def _heads(self, kv: torch.Tensor) -> torch.Tensor:
        kv = kv.view(-1, self.kv_heads, self.head_dim).transpose(0, 1)  # (kv_heads, L, hd)
        return kv.repeat_interleave(self.q_heads // self.kv_heads, dim=0)  # (H, L, hd)

    def forward(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        k_p, v_p = self._heads(keys), self._heads(values)
        scores = torch.matmul(q.float(), k_p.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = scores.softmax(dim=-1)  # (B, H, S, L): over the prompts only, no mask
        out = torch.matmul(probs, v_p.float())  # (B, H, S, hd)
        return (out * self.head_gate.float().view(1, -1, 1, 1)).to(q.dtype)

    def extra_repr(self) -> str:
        return f"L={self.prompt.shape[0]}, heads={self.q_heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}"


@register
class PromptKind(ExpertKind):
    spec = PromptExpert
    site_pool = "attention"

    def insert(self, emit, placement) -> None:
        rule, site = placement.rule, placement.site
        sdpa, q = emit.node(site.node), emit.node(site.query)
        device, dtype = emit.value_device_dtype(sdpa)
        target = emit.install(0, lambda: PromptDelta(
            rule.length, site.hidden, site.q_heads, site.kv_heads, site.head_dim, site.k_offset, site.v_offset,
            site.transposed, device=device, dtype=dtype))

        def make(op: str, fn, args: tuple, role: str, kwargs: dict | None = None) -> fx.Node:
            return emit.add(op, fn, args, kwargs=kwargs, anchor=sdpa, role=role)

        with emit.inserting_before(sdpa.next):
            prompt = make("get_attr", f"{target}.prompt", (), "prompts")
            sides = []
            for what, weight, bias, offset, ops in (("key", site.k_weight, site.k_bias, site.k_offset, site.k_ops),
                                                    ("value", site.v_weight, site.v_bias, site.v_offset, site.v_ops)):
                w = make("get_attr", weight, (), f"frozen {what} projection")
                b = make("get_attr", bias, (), f"frozen {what} projection") if bias is not None else None
                x = make("call_function", prompt_projection,
                         (prompt, w, b, offset, site.kv_heads * site.head_dim, site.transposed), f"prompt {what}s")
                for op in ops:
                    x = _replay(op, x, rule.length, site, make, emit)
                sides.append(x)
            delta = emit.add("call_module", target, (q, *sides), anchor=sdpa, role=f"expert {rule.name}",
                             val=shaped_like(sdpa))
        emit.slot(delta, anchor=sdpa, index=0, count=1, layout="heads", module=target, input=q)
        through = [op.path.rsplit(".", 1)[-1] for op in (*site.k_ops, *site.v_ops)]
        emit.record(f"L={rule.length}, {site.q_heads} heads / {site.kv_heads} kv heads"
                    + (f", keys/values through {', '.join(through)}" if through else ""))

    def parameter_count(self, rule: PromptExpert, site) -> int:
        # the prompts P: (L, hidden); the per-head gate: (q_heads,)
        return rule.length * site.hidden + site.q_heads


def _replay(op: PromptOp, x: fx.Node, length: int, site: AttentionSite, make, emit) -> fx.Node:
    """The prompts' keys ``x`` (L, kv_heads·hd) through a copy of ``op``'s nodes: shaped as the model's
    keys were where ``op`` read them, with one batch row and L positions; back to (L, kv_heads·hd)."""
    role = f"prompt through {op.path.rsplit('.', 1)[-1]}"
    x = make("call_function", aten.reshape.default, (x, [1, length, *op.shape]), role)
    if op.heads_first:  # (1, kv_heads, L, hd)
        x = make("call_function", aten.transpose.int, (x, 1, 2), role)
    env = {emit.node(op.input): x}
    for name in op.nodes:
        node = emit.node(name)
        args = fx.node.map_arg(node.args, lambda a: env.get(a, a))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env.get(a, a))
        env[node] = make("call_function", node.target, args, role, kwargs=kwargs)
    out = env[emit.node(op.output)]
    if op.heads_first:
        out = make("call_function", aten.transpose.int, (out, 1, 2), role)
    return make("call_function", aten.reshape.default, (out, [length, site.kv_heads * site.head_dim]), role)
