"""The trainable routing modules ``insert_routers`` adds: routers and learned thresholds.

Each module computes one thing named in ``METHODS.md`` and is called from one graph node. The
expert modules live with their kinds (:mod:`moa_fx.kinds`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Router", "Threshold"]


class Router(nn.Module):
    """Router logits: linear ``W x (+b)`` or SwiGLU ``W₂(silu(W₁h + b₁) ⊙ (W₃h + b₃)) + b₂``.

    The linear router uses ``nn.Linear``'s default init (the bias, when on, too); the SwiGLU router's
    weights use the default init and its biases start at 0 (METHODS.md, MoA shared structure).
    """

    def __init__(self, dim: int, num_experts: int, form: str = "linear", bias: bool = False,
                 hidden_multiplier: int = 4, *, device=None, dtype=None) -> None:
        super().__init__()
        self.form = form
        if form == "linear":
            self.proj = nn.Linear(dim, num_experts, bias=bias, device=device, dtype=dtype)
        else:
            hidden = num_experts * hidden_multiplier
            self.w1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
            self.w3 = nn.Linear(dim, hidden, device=device, dtype=dtype)
            self.w2 = nn.Linear(hidden, num_experts, device=device, dtype=dtype)
            for lin in (self.w1, self.w2, self.w3):
                nn.init.zeros_(lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.form == "linear":
            return self.proj(h)
        return self.w2(F.silu(self.w1(h)) * self.w3(h))


class Threshold(nn.Module):
    """Learned per-token threshold ``τ = τ_max·sigmoid(W_t h + b_t)`` (W_t: d→1, default init)."""

    def __init__(self, dim: int, tau_max: float, *, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 1, device=device, dtype=dtype)
        self.tau_max = tau_max

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.tau_max * torch.sigmoid(self.proj(h))
