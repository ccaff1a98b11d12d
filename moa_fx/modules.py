"""The trainable modules the passes insert: experts, routers and thresholds.

Each module computes one thing named in ``METHODS.md`` and is called from one graph node.
Expert modules return their *unweighted* contribution Δ_e; the combine node weights and adds them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoraDelta", "SharedALoraDelta", "ParallelAdapter", "PromptDelta", "prompt_projection", "Router",
           "Threshold"]


def _linear_weight(out_features: int, in_features: int, device, dtype) -> nn.Parameter:
    w = torch.empty(out_features, in_features, device=device, dtype=dtype)
    # nn.Linear's default: Kaiming-uniform with a = sqrt(5)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    return nn.Parameter(w)


def _linear_bias(out_features: int, in_features: int, device, dtype) -> nn.Parameter:
    bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
    return nn.Parameter(torch.empty(out_features, device=device, dtype=dtype).uniform_(-bound, bound))


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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def shared_A(self) -> torch.Tensor:
        return self.lora_A if "lora_A" in self._parameters else self._shared[0].lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.shared_A), self.lora_B) * self.scale


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


def prompt_projection(prompt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offset: int,
                      width: int, transposed: bool = False) -> torch.Tensor:
    """``P·W[offset:offset+width]ᵀ (+ b)``: the prompts through the key (or value) rows of a frozen
    projection, (L, width); ``offset`` selects the block of a fused qkv weight, ``transposed`` reads
    a (d_in, d_out) weight (GPT-2's Conv1D). A graph target of the prompt expert."""
    if transposed:
        weight = weight.t()
    weight = weight[offset:offset + width]
    bias = bias[offset:offset + width] if bias is not None else None
    return F.linear(prompt.to(weight.dtype), weight, bias)


class PromptDelta(nn.Module):
    """Prompt-tuning expert inside attention (METHODS.md, Prompt-tuning expert).

    ``O_P = gate_h · softmax(q·k_Pᵀ/√hd) · v_P`` with the prompts' keys and values given as
    (L, kv_heads·hd). The graph computes them (:mod:`moa_fx.passes.insert_prompt_experts`):
    ``k_P = k_proj(P)``, ``v_P = v_proj(P)`` through the frozen projections (:func:`prompt_projection`,
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
