"""Insert routers, thresholds, selection and the weighted combine of every expert slot.

Matches: the :class:`ExpertSlot` s left by the expert-insertion passes, grouped by router key
(a site path for per-projection routers, a block path for block routers, '' for no router).
Emits, per router: ``logits = router(h)`` (``call_module``), ``τ = threshold(h)`` when the
threshold is learned, ``w, sel, q, g = route(logits, τ, …)`` (``call_function`` + getitems),
``stats = router_stats(g, sel, τ)`` and, with an aux coefficient, ``aux = balance_loss(sel, q)``.
Per anchor: ``y' = mix(y, w, [Δ…], [columns…])`` (``mix_heads`` for attention outputs), and every
later use of y reads y'. Columns are looked up by expert id, never by position in a list; their order
(:func:`column_order`) is METHODS.md's gate order, [up, gate] included. The called functions are in
:mod:`moa_fx.ops`. Left in the context: each router's nodes (``ctx.routers``) and each anchor's
combine node (``ctx.combines``).
Records: one PassRecord per router and one per anchor (``experts``: the columns / the experts added).
"""

from __future__ import annotations

import operator

import torch

from .. import ops
from ..graph import shaped_like
from ..modules import Router, Threshold
from ..sites import match_rank
from .base import PassContext, PassRecord, RouterInfo, new_node, weight_columns

__all__ = ["insert_routers"]

PASS = "insert_routers"


def _router_input(ctx: PassContext, key: str, slots) -> str:
    if ctx.spec.router.kind == "site":  # the undropped x (METHODS.md), not a dropped copy the experts read
        return slots[0].site_input or slots[0].input
    scope = ctx.plan.blocks[key]
    return scope.normed if ctx.spec.router.input == "normed" and scope.normed else scope.input


def column_order(slots, order: dict[str, int]) -> list[str]:
    """The router's expert ids, one per output column, in METHODS.md's gate order: Q, K, V, [prompt],
    O, [up, gate], down, PA.

    That is the graph order of the anchors, except that an up projection's experts come right before
    those of the gate projection beside it (same parent module): the graph computes ``act(gate(h))``
    before ``up(h)``. A fused ``gate_up_proj`` is one site and keeps its place. The order decides
    which router row gates which expert, so it is also the order of every per-expert list in
    ``MoAModel.router_stats()`` (each labelled by its id in ``"experts"``)."""
    ranked = sorted(slots, key=lambda s: order[s.anchor])
    by_site: dict[str, list[str]] = {}
    for s in ranked:
        by_site.setdefault(s.site, [])
        if s.expert_id not in by_site[s.site]:
            by_site[s.site].append(s.expert_id)
    sites = list(by_site)
    for gate in [p for p in sites if _only_role(p, "gate")]:
        parent = gate.rsplit(".", 1)[0]
        up = next((p for p in sites if _only_role(p, "up") and p.rsplit(".", 1)[0] == parent), None)
        if up is not None and sites.index(up) > sites.index(gate):
            sites.remove(up)
            sites.insert(sites.index(gate), up)
    return list(dict.fromkeys(i for p in sites for i in by_site[p]))


def _only_role(path: str, role: str) -> bool:
    other = "up" if role == "gate" else "gate"
    return bool(match_rank("@" + role, path)) and not match_rank("@" + other, path)


def _insert_router(ctx: PassContext, key: str, slots) -> RouterInfo:
    spec = ctx.spec.router
    order = {n.name: i for i, n in enumerate(ctx.gm.graph.nodes)}
    ids = column_order(slots, order)
    h = ctx.node(_router_input(ctx, key, slots))
    val = h.meta.get("val")
    device = val.device if val is not None else None
    dtype = val.dtype if val is not None else None
    dim = int(val.shape[-1])
    num = len(ids)
    added = []
    with ctx.gm.graph.inserting_before(h.next):
        def make(op, target, args, role, val):
            node = new_node(ctx, op, target, args, anchor=h, pass_name=PASS, site=key, role=role, val=val)
            added.append(node.name)
            return node

        router = ctx.install(f"{key}.router", lambda: Router(
            dim, num, spec.form, spec.has_bias, spec.hidden_multiplier, device=device, dtype=dtype))
        logits = make("call_module", router, (h,), "router logits", shaped_like(h, num))
        tau = None
        learned = spec.select == "threshold" and spec.threshold.learned
        if learned:
            tau_max = spec.threshold.max if spec.threshold.max is not None else 1.0 / num
            tau = make("call_module", ctx.install(f"{key}.threshold", lambda: Threshold(
                dim, tau_max, device=device, dtype=dtype)), (h,), "threshold", shaped_like(h, 1))
        routed = make("call_function", ops.route,
                      (logits, tau, spec.gate, spec.select, spec.top_k, float(spec.threshold.value),
                       spec.threshold.rule, spec.renormalizes), "selection", None)
        w, sel, q, g = (make("call_function", operator.getitem, (routed, i), name, None)
                        for i, name in enumerate(("weights", "selected", "balance q", "gates")))
        stats = make("call_function", ops.router_stats, (g, sel, tau), "router stats",
                     shaped_like(logits, shape=(2 * num + 1,), dtype=torch.float32))
        aux = make("call_function", ops.balance_loss, (sel, q), "balance loss",
                   shaped_like(logits, shape=(), dtype=torch.float32)) if spec.aux_loss_coef > 0 else None
    ctx.records.append(PassRecord(PASS, key, added, f"{spec.form} router over {num} experts, {spec.gate} gate, "
                                                    f"{spec.select} selection", experts=num))
    info = RouterInfo(key=key, expert_ids=ids, logits=logits.name, tau=tau.name if tau is not None else None,
                      weights=w.name, stats=stats.name, aux=aux.name if aux is not None else None)
    ctx.extra_outputs.append(("stats", stats.name, key))
    if aux is not None:
        ctx.extra_outputs.append(("aux", aux.name, key))
    return info


def insert_routers(ctx: PassContext) -> None:
    """Insert one router per key and one combine per anchor."""
    by_router: dict[str, list] = {}
    for slot in ctx.slots:
        by_router.setdefault(slot.router_key, []).append(slot)
    for key, slots in by_router.items():
        if key:
            ctx.routers[key] = _insert_router(ctx, key, slots)
    order = {n: i for i, n in enumerate(ctx.gm.graph.nodes)}
    by_anchor: dict[str, list] = {}
    for slot in ctx.slots:
        by_anchor.setdefault(slot.anchor, []).append(slot)
    for anchor_name, slots in by_anchor.items():
        y = ctx.node(anchor_name)
        deltas = [ctx.node(s.delta) for s in slots]
        weights, cols = weight_columns(ctx, slots)
        w = ctx.node(weights) if weights else None
        fn = ops.mix_heads if slots[0].layout == "heads" else ops.mix
        last = max(deltas, key=order.__getitem__)
        with ctx.gm.graph.inserting_after(last):
            mixed = new_node(ctx, "call_function", fn, (y, w, deltas, cols), anchor=y, pass_name=PASS,
                             site=slots[0].site, role="combine", val=shaped_like(y))
        y.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not mixed)
        ctx.combines[anchor_name] = mixed.name
        ctx.records.append(PassRecord(PASS, slots[0].site, [mixed.name],
                                      "combine " + ", ".join(s.expert_id for s in slots), experts=len(slots)))
