"""LoRA experts at linear projections (METHODS.md, LoRA expert; HydraLoRA's shared A).

Spec: :class:`~moa_fx.spec.LoraExpert`. Sites: every projection (:class:`~moa_fx.sites.LinearSite`).
Emits, per expert, one ``call_module`` node ``Δ_e = s·B_e(A_e(dropout(x)))`` reading the
projection's input x (a :class:`LoraDelta`, or a :class:`SharedALoraDelta` head sharing one A),
an expert slot anchored at the projection's output; the combine is inserted by ``insert_routers``.
HydraLoRA's heads (``share_a``) with dropout read one dropped copy of x, ``x_d = dropout(x)``: a
``call_module`` node of the first head's ``input_dropout``, emitted once per site (METHODS.md: one
mask before the shared A), so each head is ``s·B_e(A(x_d))``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import shaped_like
from ..spec import LoraExpert
from .registry import ExpertKind, register

__all__ = ["LoraKind", "LoraDelta", "SharedALoraDelta", "DropoutSeeds"]


def _linear_weight(out_features: int, in_features: int, device, dtype) -> nn.Parameter:
    w = torch.empty(out_features, in_features, device=device, dtype=dtype)
    # nn.Linear's default: Kaiming-uniform with a = sqrt(5)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return nn.Parameter(w)


class DropoutSeeds(nn.Module):
    """The dropout seeds of the lowered sites with input dropout (``lower_sparse_dispatch``), one per
    site, drawn by one node at the start of the forward: in training fresh int64 seeds from torch's
    generator on x's device (``torch.manual_seed`` reproduces them; activation checkpointing's blocks
    read them as inputs, so a recomputation sees the same ones), in eval None (no dropout).

    One draw, not one per site: Inductor gives every random op of a graph its own offset into its seed
    buffer, written into the kernel's code, so a draw per site made every site's fused kernel distinct
    (one C++ or Triton compile per site and layer); with one draw the sites' kernels are the same code
    in every layer. The adapter root's child, so that ``train()``/``eval()`` switch it."""

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor | None:
        if not self.training:
            return None
        return torch.randint(0, 2 ** 62, (n,), device=x.device)


class LoraDelta(nn.Module):
    """``Δ = s·B(A(dropout(x)))``, A Kaiming-uniform, B = 0 (METHODS.md, LoRA expert)."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float = 0.0, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = _linear_weight(r, d_in, device, dtype)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


class SharedALoraDelta(nn.Module):
    """HydraLoRA head ``e``: ``s·B_e(A(x_d))`` with A shared by every head at the site.

    The shared A is owned by the site's first head; the other heads hold a reference to it, so
    it is one parameter (saved once, under the first head's name). So is the site's input dropout,
    ``input_dropout`` (``x_d = dropout(x)``, one mask for every head, METHODS.md): the graph calls it
    once and feeds ``x_d`` to every head, whose own ``dropout`` is the identity.
    """

    def __init__(self, shared: "SharedALoraDelta | None", d_in: int, d_out: int, r: int, alpha: float,
                 dropout: float = 0.0, *, device=None, dtype=None) -> None:
        super().__init__()
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        if shared is None:
            self.lora_A = _linear_weight(r, d_in, device, dtype)
        else:
            self._shared = [shared]  # a plain list: not registered twice as a submodule
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        self.dropout = nn.Identity()  # the heads read x_d, dropped once by the first head's input_dropout
        if shared is None:
            self.input_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def shared_A(self) -> torch.Tensor:
        return self.lora_A if "lora_A" in self._parameters else self._shared[0].lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.shared_A), self.lora_B) * self.scale


@register
class LoraKind(ExpertKind):
    spec = LoraExpert
    site_pool = "linear"

    def insert(self, emit, placement) -> None:
        rule, site = placement.rule, placement.site
        y, x = emit.node(site.node), emit.node(site.input)
        device, dtype = emit.weight_device_dtype(site.weight)
        shared = None
        anchor = y.next
        read = x  # what the experts read: x, or HydraLoRA's x dropped once
        for i, r in enumerate(rule.ranks):
            if rule.share_a:
                def make(r=r, shared=shared):
                    return SharedALoraDelta(shared, site.d_in, site.d_out, r, rule.alpha, rule.dropout,
                                            device=device, dtype=dtype)
            else:
                def make(r=r):
                    return LoraDelta(site.d_in, site.d_out, r, rule.alpha, rule.dropout, device=device, dtype=dtype)
            target = emit.install(i, make)
            if rule.share_a and shared is None:
                shared = emit.submodule(target)
                if rule.dropout > 0:
                    with emit.inserting_before(anchor):
                        read = emit.add("call_module", f"{target}.input_dropout", (x,), anchor=y,
                                        role=f"input dropout of {rule.name} (one mask, every head)",
                                        val=shaped_like(x))
            with emit.inserting_before(anchor):
                delta = emit.add("call_module", target, (read,), anchor=y, role=f"expert {rule.name}.{i}",
                                 val=shaped_like(y))
            emit.slot(delta, anchor=y, index=i, count=len(rule.ranks), layout="tokens", module=target, input=read,
                      site_input=x)
        once = ", x dropped once for every head" if rule.share_a and rule.dropout > 0 else ""
        emit.record(f"{len(rule.ranks)} x LoRA r={list(rule.ranks)} alpha={rule.alpha}{once}")

    def parameter_count(self, rule: LoraExpert, site) -> int:
        # A_e: (r, d_in), B_e: (d_out, r); with share_a one A for every head
        a = [r * site.d_in for r in rule.ranks]
        return (a[0] if rule.share_a else sum(a)) + sum(site.d_out * r for r in rule.ranks)
