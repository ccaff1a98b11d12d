"""Gate, selection, combine and router-statistics functions called from graph nodes.

All are pure tensor functions with static shapes (dense-masked dispatch: unselected experts get
weight 0), so a transformed model compiles with ``fullgraph=True``. Equations: METHODS.md.

- :func:`route`: logits (and τ) → ``(weights, selected, balance_q)``.
- :func:`balance_loss`: ``E · Σ_e f_e · P_e`` with ``f_e = mean_t sel`` and ``P_e = mean_t q``.
- :func:`router_stats`: one vector per router: ``[act_rate(E), gate_mean(E), tau_mean]``.
- :func:`mix` / :func:`mix_heads`: ``y + Σ_i w[:, col_i]·Δ_i`` for token-major and head-major anchors.
"""

from __future__ import annotations

import torch

__all__ = ["route", "balance_loss", "router_stats", "mix", "mix_heads"]


def route(logits: torch.Tensor, tau: torch.Tensor | None, gate: str, select: str, top_k: int,
          threshold: float, rule: str, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn router logits into per-token expert weights.

    Returns ``(w, sel, q, g)``: weights (zero where unselected), the hard 0/1 selection, the
    quantity averaged in the balance loss (``a = p − τ`` for a learned AdaMoLE threshold, else the
    gate ``g``), and the gate itself. ``tau`` is the learned threshold (…, 1) or ``None``.
    """
    if gate == "softmax":
        g = torch.softmax(logits.float(), dim=-1)  # softmax in fp32 (METHODS.md)
    else:
        g = torch.sigmoid(logits)  # MoA: sigmoid in the activation dtype
    q = g
    if select == "dense":
        sel = torch.ones_like(g)
        w = g
    elif select == "topk":
        idx = torch.topk(g, top_k, dim=-1).indices
        sel = torch.zeros_like(g).scatter(-1, idx, 1.0)
        w = g * sel
    else:
        t = tau if tau is not None else torch.full_like(g[..., :1], threshold)
        a = g - t.to(g.dtype)
        sel = (a >= 0).to(g.dtype)  # hard indicator, no gradient
        if tau is not None and rule == "adamole":
            w = a * sel
            q = a  # AdaMoLE's balance loss averages the unmasked a
        else:
            w = g * sel  # MoA's rule: τ only selects (it receives no gradient)
    if renormalize and select != "dense":
        total = w.sum(dim=-1, keepdim=True)
        w = w / torch.where(total == 0, torch.ones_like(total), total)  # a zero sum is replaced by 1
    return w, sel, q, g


def balance_loss(sel: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Switch-style load balance ``E · Σ_e f_e·P_e`` over every token (padding included)."""
    num_experts = sel.shape[-1]
    f = sel.reshape(-1, num_experts).float().mean(dim=0)
    p = q.reshape(-1, num_experts).float().mean(dim=0)
    return num_experts * (f * p).sum()


def router_stats(g: torch.Tensor, sel: torch.Tensor, tau: torch.Tensor | None) -> torch.Tensor:
    """``[activation rate per expert (E), gate mean per expert (E), mean τ (1, NaN without τ)]``."""
    num_experts = sel.shape[-1]
    with torch.no_grad():
        rate = sel.detach().reshape(-1, num_experts).float().mean(dim=0)
        gmean = g.detach().reshape(-1, num_experts).float().mean(dim=0)
        if tau is None:
            t = torch.full((1,), float("nan"), device=g.device)
        else:
            t = tau.detach().float().mean().reshape(1)
    return torch.cat([rate, gmean, t])


def _column(w: torch.Tensor, col: int, like: torch.Tensor) -> torch.Tensor:
    c = w[..., col:col + 1].to(like.dtype)
    if c.dim() != like.dim():  # router on (B, S, d), site on flattened (B·S, d) (GPT-2's addmm)
        c = c.reshape(*like.shape[:-1], 1)
    return c


def mix(y: torch.Tensor, w: torch.Tensor | None, deltas: list[torch.Tensor], cols: list[int]) -> torch.Tensor:
    """``y + Σ_i w[..., cols_i]·Δ_i`` (``w`` None: every expert weight 1)."""
    out = y
    for delta, col in zip(deltas, cols):
        out = out + (delta if w is None else _column(w, col, delta) * delta)
    return out


def mix_heads(y: torch.Tensor, w: torch.Tensor | None, deltas: list[torch.Tensor], cols: list[int]) -> torch.Tensor:
    """Like :func:`mix` for an attention output shaped (B, H, S, hd) and token weights (B, S, E)."""
    out = y
    for delta, col in zip(deltas, cols):
        if w is None:
            out = out + delta
        else:
            c = w[..., col].to(delta.dtype).reshape(delta.shape[0], 1, delta.shape[2], 1)
            out = out + c * delta
    return out
