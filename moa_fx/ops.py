"""Every function a rewritten graph calls through ``call_function`` (the passes only insert the nodes).

All are pure tensor functions. The routing and combine functions keep static shapes (dense-masked
dispatch: unselected experts get weight 0), so a transformed model compiles with ``fullgraph=True``;
the fused LoRA functions hand data-dependent work to the custom ops of :mod:`moa_fx.kernels`.
Equations: METHODS.md.

Routing (``insert_routers``):
- :func:`route`: logits (and τ) → ``(w, sel, q, g)``: weights, selection, balance quantity, gate.
- :func:`balance_loss`: ``E · Σ_e f_e · P_e`` with ``f_e = mean_t sel`` and ``P_e = mean_t q``.
- :func:`router_stats`: one vector per router: ``[act_rate(E), gate_mean(E), tau_mean]``.
- :func:`mix` / :func:`mix_heads`: ``y + Σ_i w[:, col_i]·Δ_i`` for token-major and head-major anchors.

Fused LoRA sites (``lower_sparse_dispatch``): :func:`lowered_lora_site` (``moa_fx::lora_mixture`` or
``moa_fx::grouped_lora``), :func:`dropout_lora_site` (``moa_fx::dropout_lora``: experts with input
dropout; :func:`seed_at` its seed) and :func:`site_weights`, the router columns they read.

Shared-input GEMMs (``fuse_shared_input``): :func:`shared_input_projection` (one GEMM, then a split),
and each reader rebuilt on its piece: :func:`expand_lora_site` (``moa_fx::lora_expand``),
:func:`expand_dropout_lora_site` (``moa_fx::dropout_lora`` given z),
:func:`lora_from_projection`, :func:`router_from_projection`, :func:`threshold_from_projection`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import dropout_lora, grouped_lora, lora_expand, lora_mixture

__all__ = ["prompt_projection", "route", "balance_loss", "router_stats", "mix", "mix_heads", "lowered_lora_site", "site_weights",
           "dropout_lora_site", "seed_at", "shared_input_projection", "expand_lora_site", "expand_dropout_lora_site", "lora_from_projection", "router_from_projection",
           "threshold_from_projection"]


# --- routing ----------------------------------------------------------------------------------------


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


# --- fused LoRA sites -------------------------------------------------------------------------------


def lowered_lora_site(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, a_list: list[torch.Tensor],
                      b_list: list[torch.Tensor], ranks: list[int], scales: list[float], cols: list[int],
                      form: str) -> torch.Tensor:
    """``y + Σ_e w[…, col_e]·s_e·B_e(A_e x)`` through one fused op over the flattened tokens."""
    out_shape = y.shape
    dtype = y.dtype
    y2 = y.reshape(-1, y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    weights = site_weights(w, cols, x2, len(ranks))
    a_cat = torch.cat([a.to(dtype) for a in a_list], dim=0)
    b_cat = torch.cat([b.to(dtype) for b in b_list], dim=1)
    op = grouped_lora if form == "grouped" else lora_mixture
    return op(y2, x2, a_cat, b_cat, weights.to(dtype), ranks, scales).reshape(out_shape)


def seed_at(seeds: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """Site ``index``'s dropout seed from the forward's :class:`~moa_fx.kinds.lora.DropoutSeeds` (None in eval).
    A copy, not a view: a compile region (one decoder block) takes several sites' seeds, and the inputs
    of a region must not alias each other."""
    return None if seeds is None else seeds[index].clone()


def dropout_lora_site(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, a_list: list[torch.Tensor],
                      b_list: list[torch.Tensor], ranks: list[int], scales: list[float], cols: list[int], form: str,
                      ps: list[float], seed: torch.Tensor | None) -> torch.Tensor:
    """``y + Σ_e w[…, col_e]·s_e·B_e(A_e(dropout_e(x)))``, an independent mask per expert drawn from
    ``seed`` (the site's, :func:`seed_at`: None in eval, then this is :func:`lowered_lora_site` in
    ``form``); the router that made w read the undropped x (METHODS.md)."""
    if seed is None:
        return lowered_lora_site(y, x, w, a_list, b_list, ranks, scales, cols, form)
    return _dropout_site(y, None, x, w, a_list, b_list, ranks, scales, cols, ps, seed)


def _dropout_site(y, z, x, w, a_list, b_list, ranks, scales, cols, ps, seed):
    dtype = y.dtype
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    z2 = None if z is None else z.reshape(-1, z.shape[-1])
    weights = site_weights(w, cols, x2, len(ranks))
    a_cat = torch.cat([a.to(dtype) for a in a_list], dim=0)
    b_cat = torch.cat([b.to(dtype) for b in b_list], dim=1)
    out = dropout_lora(y.reshape(-1, y.shape[-1]), x2, a_cat, b_cat, weights.to(dtype), seed, ranks, scales, ps, z=z2)
    return out.reshape(y.shape)


def site_weights(w: torch.Tensor | None, cols: list[int], like: torch.Tensor, num: int) -> torch.Tensor:
    """The (T, E) weights of a site's experts: the router columns ``cols`` of ``w``, or ones
    (no router) shaped by ``like``'s T rows."""
    if w is None:
        return like.new_ones(like.shape[0], num)
    w2 = w.reshape(-1, w.shape[-1])
    if cols == list(range(w2.shape[-1])):
        return w2
    if cols and cols == list(range(cols[0], cols[0] + len(cols))):  # a copy, as an index gives
        return w2[:, cols[0]:cols[0] + len(cols)].contiguous()
    return torch.stack([w2[:, c] for c in cols], dim=1)  # not w2[:, cols]: a list index traces to a tensor constant


# --- shared-input GEMMs -----------------------------------------------------------------------------


def shared_input_projection(x: torch.Tensor, weights: list[torch.Tensor], sizes: list[int]) -> tuple:
    """``split(x · cat(weights)ᵀ, sizes)``: every reader's projection of x from one GEMM."""
    return tuple(torch.split(F.linear(x, torch.cat(weights, dim=0)), sizes, dim=-1))


def expand_lora_site(y: torch.Tensor, z: torch.Tensor, w: torch.Tensor | None, b_list: list[torch.Tensor],
                     ranks: list[int], scales: list[float], cols: list[int]) -> torch.Tensor:
    """``y + Σ_e w[…, col_e]·s_e·B_e z_e`` for the site's rank-space ``z = x·A_catᵀ`` (the second half
    of :func:`lowered_lora_site`)."""
    dtype = y.dtype
    y2 = y.reshape(-1, y.shape[-1])
    z2 = z.reshape(-1, z.shape[-1])
    weights = site_weights(w, cols, z2, len(ranks))
    b_cat = torch.cat([b.to(dtype) for b in b_list], dim=1)
    return lora_expand(y2, z2, b_cat, weights.to(dtype), ranks, scales).reshape(y.shape)


def expand_dropout_lora_site(y: torch.Tensor, z: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None,
                             a_list: list[torch.Tensor], b_list: list[torch.Tensor], ranks: list[int],
                             scales: list[float], cols: list[int], ps: list[float],
                             seed: torch.Tensor | None) -> torch.Tensor:
    """:func:`dropout_lora_site` for the site's ``z = x·A_catᵀ`` from the shared GEMM: the dropped
    entries are subtracted from z (``(x ⊙ m)·Aᵀ = x·Aᵀ − (x ⊙ (1 − m))·Aᵀ``), so it is exact; in eval
    (seed None) it is :func:`expand_lora_site`."""
    if seed is None:
        return expand_lora_site(y, z, w, b_list, ranks, scales, cols)
    return _dropout_site(y, z, x, w, a_list, b_list, ranks, scales, cols, ps, seed)


def lora_from_projection(z: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """An unlowered LoRA expert's ``s·B z`` for its ``z = x·Aᵀ``."""
    return F.linear(z, b) * scale


def router_from_projection(z: torch.Tensor, bias: torch.Tensor | None, w2: torch.Tensor | None = None,
                           b1: torch.Tensor | None = None, b3: torch.Tensor | None = None,
                           b2: torch.Tensor | None = None) -> torch.Tensor:
    """Router logits from ``z``: linear ``z + b``, or SwiGLU ``W₂(silu(z₁ + b₁) ⊙ (z₃ + b₃)) + b₂``
    with ``z = [W₁x | W₃x]``."""
    # biases in z's dtype, as nn.Linear under autocast adds them (bf16 z, fp32 bias -> bf16)
    if w2 is None:
        return z if bias is None else z + bias.to(z.dtype)
    z1, z3 = z.chunk(2, dim=-1)
    return F.linear(F.silu(z1 + b1.to(z.dtype)) * (z3 + b3.to(z.dtype)), w2, b2)


def threshold_from_projection(z: torch.Tensor, bias: torch.Tensor, tau_max: float) -> torch.Tensor:
    """``τ = τ_max·sigmoid(z + b)`` for ``z = W_t x``."""
    return tau_max * torch.sigmoid(z + bias.to(z.dtype))


# --- prompt experts ---------------------------------------------------------------------------------


def prompt_projection(prompt: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offset: int,
                      width: int, transposed: bool = False) -> torch.Tensor:
    """``P·W[offset:offset+width]ᵀ (+ b)``: the prompts through the key (or value) rows of a frozen
    projection, (L, width); ``offset`` selects the block of a fused qkv weight, ``transposed`` reads
    a (d_in, d_out) weight (GPT-2's Conv1D)."""
    if transposed:
        weight = weight.t()
    weight = weight[offset:offset + width]
    bias = bias[offset:offset + width] if bias is not None else None
    return F.linear(prompt.to(weight.dtype), weight, bias)
