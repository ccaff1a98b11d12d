"""A router's selection math, one op: gate, selection, renormalisation, balance loss and stats.

The equations (METHODS.md, routing) are the plain torch functions :func:`route`, :func:`balance_loss`
and :func:`router_stats`; :func:`routing` is their composition, the one call a rewritten graph makes
per router. It returns ``(w, stats, aux)``: the (…, E) weights, the stats vector and the balance loss.

Why an op. Under ``torch.compile`` that math is some 35 ATen nodes per router forward and 50 more in
backward (softmax, threshold, renormalisation, the means of the balance loss and their gradients).
AdaMoLE has a router at every projection, and Inductor's compile time grows with the nodes it is handed
(BENCHMARKS.md: about 18 ms per node on this CPU), so its first compile was 2.5× the base model's. As
``moa_fx::route`` the math is two nodes: the op, and ``moa_fx::route_backward`` in the backward graph.
The tensors are (T, E), a few kilobytes: Inductor's fusion of them bought nothing measurable.

Paths. Plain eager on real tensors (:func:`~moa_fx.kernels.launch.dispatch_free`) runs the composition
itself, with torch's autograd: the same kernels as before the op existed, bit for bit. Under
compile, export, fake tensors or any dispatch mode the custom op runs; its implementation is the same
composition, and its backward (:func:`route_backward`) is the closed-form gradient, recomputing the
(T, E) gate from the saved logits (nothing else is saved). The tests compare both halves with the
plain functions under autograd, for every gate, selection and rule. τ receives a gradient only under
AdaMoLE's rule (``w = (p − τ)·sel``); under MoA's rule it only selects, and, as in plain autograd, its
gradient is None. Double backward is not supported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moa_fx.kernels.launch import dispatch_free

__all__ = ["route", "balance_loss", "router_stats", "routing", "route_backward"]


def route(logits: Tensor, tau: Tensor | None, gate: str, select: str, top_k: int,
          threshold: float, rule: str, renormalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
        if _tau_learns(tau is not None, select, rule):
            w = a * sel
            q = a  # AdaMoLE's balance loss averages the unmasked a
        else:
            w = g * sel  # MoA's rule: τ only selects (it receives no gradient)
    if renormalize and select != "dense":
        total = w.sum(dim=-1, keepdim=True)
        w = w / torch.where(total == 0, torch.ones_like(total), total)  # a zero sum is replaced by 1
    return w, sel, q, g


def _tau_learns(has_tau: bool, select: str, rule: str) -> bool:
    return has_tau and select == "threshold" and rule == "adamole"


def balance_loss(sel: Tensor, q: Tensor) -> Tensor:
    """Switch-style load balance ``E · Σ_e f_e·P_e`` over every token (padding included)."""
    num_experts = sel.shape[-1]
    f = sel.reshape(-1, num_experts).float().mean(dim=0)
    p = q.reshape(-1, num_experts).float().mean(dim=0)
    return num_experts * (f * p).sum()


def router_stats(g: Tensor, sel: Tensor, tau: Tensor | None) -> Tensor:
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


def _compose(logits, tau, gate, select, top_k, threshold, rule, renormalize, aux):
    w, sel, q, g = route(logits, tau, gate, select, top_k, threshold, rule, renormalize)
    loss = balance_loss(sel, q) if aux else None
    return w, router_stats(g, sel, tau), loss


# --- the custom op, its fake and its backward -------------------------------------------------


@torch.library.custom_op("moa_fx::route", mutates_args=())
def _route_op(logits: Tensor, tau: Optional[Tensor], gate: str, select: str, top_k: int, threshold: float,
              rule: str, renormalize: bool, aux: bool) -> tuple[Tensor, Tensor, Tensor]:
    w, stats, loss = _compose(logits, tau, gate, select, top_k, threshold, rule, renormalize, aux)
    return w, stats, loss if loss is not None else stats.new_zeros(())


@_route_op.register_fake
def _route_fake(logits, tau, gate, select, top_k, threshold, rule, renormalize, aux):
    dtype = torch.float32 if gate == "softmax" else logits.dtype
    num_experts = logits.shape[-1]
    return (logits.new_empty(logits.shape, dtype=dtype), logits.new_empty((2 * num_experts + 1,), dtype=torch.float32),
            logits.new_empty((), dtype=torch.float32))


def route_backward(logits: Tensor, tau: Tensor | None, grad_w: Tensor, grad_aux: Tensor | None, gate: str,
                   select: str, top_k: int, threshold: float, rule: str, renormalize: bool,
                   need_tau: bool) -> tuple[Tensor, Tensor | None]:
    """The gradients of :func:`route`'s w (and, given ``grad_aux``, of :func:`balance_loss`) with
    respect to the logits and τ, in closed form (fp32, cast to the inputs' dtypes). The selection is
    recomputed from the logits; it is a constant of the backward, as in autograd (hard indicators).

    ``w = v / D``, ``D = Σ_e v_e`` (1 where that sum is 0): ``dv = dw/D − [Σv ≠ 0]·(Σ_e dw_e·v_e)/D²``;
    ``v = a·sel`` (AdaMoLE, ``a = g − τ``), ``g·sel`` or ``g`` (dense); the balance loss adds
    ``E·f_e / N`` to dq (q = a or g); softmax ``dl = g ⊙ (dg − Σ_e dg·g)``, sigmoid ``dl = dg ⊙ g(1 − g)``.
    """
    num_experts = logits.shape[-1]
    g = torch.softmax(logits.float(), dim=-1) if gate == "softmax" else torch.sigmoid(logits.float())
    g_out = g if gate == "softmax" else g.to(logits.dtype)  # the forward's g, in its dtype
    learns = _tau_learns(tau is not None, select, rule)
    if select == "dense":
        sel = torch.ones_like(g)
    elif select == "topk":
        sel = torch.zeros_like(g).scatter(-1, torch.topk(g_out, top_k, dim=-1).indices, 1.0)
    else:
        t = tau if tau is not None else torch.full_like(g_out[..., :1], threshold)
        a_out = g_out - t.to(g_out.dtype)
        sel = (a_out >= 0).to(torch.float32)
    a = (g - tau.float()) if learns else None
    dv = grad_w.float()
    if renormalize and select != "dense":
        v = (a if learns else g) * sel
        total = v.sum(dim=-1, keepdim=True)
        nonzero = total != 0
        denom = torch.where(nonzero, total, torch.ones_like(total))
        dv = dv / denom - nonzero * (dv * v).sum(dim=-1, keepdim=True) / denom ** 2
    dq = dv if select == "dense" else dv * sel  # the gradient of the quantity v multiplies by sel
    if grad_aux is not None:
        f = sel.reshape(-1, num_experts).mean(dim=0)
        dq = dq + grad_aux.float() * num_experts * f / sel.reshape(-1, num_experts).shape[0]
    dtau = -dq.sum(dim=-1, keepdim=True) if learns else None  # a = g − τ: dg = da, dτ = −Σ_e da
    dg = dq
    if gate == "softmax":
        dl = g * (dg - (dg * g).sum(dim=-1, keepdim=True))
    else:
        dl = dg * g * (1 - g)
    return dl.to(logits.dtype), (dtau.to(tau.dtype) if need_tau else None)


@torch.library.custom_op("moa_fx::route_backward", mutates_args=())
def _route_backward_op(logits: Tensor, tau: Optional[Tensor], grad_w: Tensor, grad_aux: Optional[Tensor], gate: str,
                       select: str, top_k: int, threshold: float, rule: str, renormalize: bool,
                       need_tau: bool) -> list[Tensor]:
    dl, dtau = route_backward(logits, tau, grad_w, grad_aux, gate, select, top_k, threshold, rule, renormalize,
                              need_tau)
    return [dl] if dtau is None else [dl, dtau]


@_route_backward_op.register_fake
def _route_backward_fake(logits, tau, grad_w, grad_aux, gate, select, top_k, threshold, rule, renormalize, need_tau):
    return [torch.empty_like(logits)] + ([torch.empty_like(tau)] if need_tau else [])


def _setup(ctx, inputs, output) -> None:
    logits, tau, *static = inputs
    ctx.static = static  # gate, select, top_k, threshold, rule, renormalize, aux
    ctx.has_tau = tau is not None
    ctx.save_for_backward(logits, tau)


def _backward(ctx, grad_w, _grad_stats, grad_aux):
    logits, tau = ctx.saved_tensors
    gate, select, top_k, threshold, rule, renormalize, aux = ctx.static
    need_tau = _tau_learns(ctx.has_tau, select, rule) and ctx.needs_input_grad[1]
    if not (ctx.needs_input_grad[0] or need_tau):
        return (None,) * 9
    got = _route_backward_op(logits, tau, grad_w, grad_aux if aux else None, gate, select, top_k, threshold,
                             rule, renormalize, need_tau)
    return (got[0], got[1] if need_tau else None) + (None,) * 7


_route_op.register_autograd(_backward, setup_context=_setup)


def routing(logits: Tensor, tau: Tensor | None, gate: str, select: str, top_k: int, threshold: float,
            rule: str, renormalize: bool, aux: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """One router's ``(w, stats, aux)``: :func:`route`'s weights, :func:`router_stats`'s vector and
    :func:`balance_loss` (None unless ``aux``). Plain eager runs the functions; compile, export and
    fake tensors see ``moa_fx::route`` (module docstring)."""
    if dispatch_free(logits, tau):
        return _compose(logits, tau, gate, select, top_k, threshold, rule, renormalize, aux)
    w, stats, loss = _route_op(logits, tau, gate, select, int(top_k), float(threshold), rule, bool(renormalize),
                               bool(aux))
    return w, stats, loss if aux else None
