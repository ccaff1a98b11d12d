"""Parallel adapters beside module spans, e.g. each MLP (METHODS.md, parallel adapter).

Spec: :class:`~moa_fx.spec.ParallelAdapterExpert`. Sites: module boundaries
(:class:`~moa_fx.sites.SpanSite`). Emits one ``call_module`` node
``Δ = W_up·act(W_down·h + b_down) + b_up`` reading the span's input h, an expert slot anchored at
the span's output (added before the residual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import shaped_like
from ..spec import ParallelAdapterExpert
from .registry import ExpertKind, register

__all__ = ["ParallelAdapterKind", "ParallelAdapter"]


class ParallelAdapter(nn.Module):
    """``pa(h) = W_up·act(W_down·h + b_down) + b_up``; Xavier-uniform weights (gain), zero biases."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "silu", init_gain: float = 1e-4, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        for lin in (self.down, self.up):
            nn.init.xavier_uniform_(lin.weight, gain=init_gain)
            nn.init.zeros_(lin.bias)
        self.act = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}[activation]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(h)))


@register
class ParallelAdapterKind(ExpertKind):
    spec = ParallelAdapterExpert
    site_pool = "span"

    def insert(self, emit, placement) -> None:
        rule, site = placement.rule, placement.site
        out, h = emit.node(site.output), emit.node(site.input)
        device, dtype = emit.value_device_dtype(out)
        target = emit.install(0, lambda: ParallelAdapter(site.dim, rule.bottleneck, rule.activation, rule.init_gain,
                                                         device=device, dtype=dtype))
        with emit.inserting_before(out.next):
            delta = emit.add("call_module", target, (h,), anchor=out, role=f"expert {rule.name}", val=shaped_like(out))
        emit.slot(delta, anchor=out, index=0, count=1, layout="tokens", module=target, input=h)
        emit.record(f"bottleneck {rule.bottleneck}")

    def parameter_count(self, rule: ParallelAdapterExpert, site) -> int:
        # down: (b, d) + b; up: (d, b) + d
        return 2 * site.dim * rule.bottleneck + rule.bottleneck + site.dim
