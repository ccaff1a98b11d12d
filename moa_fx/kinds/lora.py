"""LoRA experts at linear projections (METHODS.md, LoRA expert; HydraLoRA's shared A).

Spec: :class:`~moa_fx.spec.LoraExpert`. Sites: every projection (:class:`~moa_fx.sites.LinearSite`).
Emits, per expert, one ``call_module`` node ``Δ_e = s·B_e(A_e(dropout(x)))`` reading the
projection's input x (a :class:`LoraDelta`, or a :class:`SharedALoraDelta` head sharing one A),
an expert slot anchored at the projection's output; the combine is inserted by ``insert_routers``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import shaped_like
from ..spec import LoraExpert
from .registry import ExpertKind, register

__all__ = ["LoraKind", "LoraDelta", "SharedALoraDelta", "DropoutSeed"]


def _linear_weight(out_features: int, in_features: int, device, dtype) -> nn.Parameter:
    w = torch.empty(out_features, in_features, device=device, dtype=dtype)
    # nn.Linear's default: Kaiming-uniform with a = sqrt(5)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return nn.Parameter(w)


class DropoutSeed(nn.Module):
    """The dropout seed of a lowered site (``lower_sparse_dispatch``): in training a fresh int64 seed
    from torch's generator on x's device (``torch.manual_seed`` reproduces it and activation
    checkpointing's RNG replay draws it again), in eval None (no dropout). A child of every
    :class:`LoraDelta` with dropout, beside its ``nn.Dropout``, so that ``train()``/``eval()`` switch
    both alike (a HydraLoRA head has none: its sites are not lowered with dropout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.training:
            return None
        return torch.randint(0, 2 ** 62, (), device=x.device)


def _dropout(module: nn.Module, p: float, seed: bool) -> None:
    module.dropout = nn.Dropout(p) if p > 0 else nn.Identity()
    if p > 0 and seed:
        module.seed = DropoutSeed()


class LoraDelta(nn.Module):
    """``Δ = s·B(A(dropout(x)))``, A Kaiming-uniform, B = 0 (METHODS.md, LoRA expert)."""

    def __init__(self, d_in: int, d_out: int, r: int, alpha: float, dropout: float = 0.0, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = _linear_weight(r, d_in, device, dtype)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, device=device, dtype=dtype))
        _dropout(self, dropout, seed=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


class SharedALoraDelta(nn.Module):
    """HydraLoRA head ``e``: ``s·B_e(A(dropout(x)))`` with A shared by every head at the site.

    The shared A is owned by the site's first head; the other heads hold a reference to it, so
    it is one parameter (saved once, under the first head's name).
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
        _dropout(self, dropout, seed=False)

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
            with emit.inserting_before(anchor):
                delta = emit.add("call_module", target, (x,), anchor=y, role=f"expert {rule.name}.{i}",
                                 val=shaped_like(y))
            emit.slot(delta, anchor=y, index=i, count=len(rule.ranks), layout="tokens", module=target, input=x)
        emit.record(f"{len(rule.ranks)} x LoRA r={list(rule.ranks)} alpha={rule.alpha}")

    def parameter_count(self, rule: LoraExpert, site) -> int:
        # A_e: (r, d_in), B_e: (d_out, r); with share_a one A for every head
        a = [r * site.d_in for r in rule.ranks]
        return (a[0] if rule.share_a else sum(a)) + sum(site.d_out * r for r in rule.ranks)
