"""Lower each LoRA site's experts × weights × combine subgraph to one fused op.

Matches: a ``mix`` combine node (left by ``insert_routers``) whose every Δ input is a LoRA expert
node (``LoraDelta`` / HydraLoRA head) reading the same input x, with no input dropout (per-expert
dropout needs one dropped copy of x per expert, which the fused ops do not take).
Emits: ``y' = lowered_lora_site(y, x, w, [A…], [B…], ranks, scales, cols, form)`` reading the
expert parameters through ``get_attr`` nodes, which calls ``moa_fx::lora_mixture`` (dense-masked)
or ``moa_fx::grouped_lora`` (active pairs only) — Triton on CUDA, the torch reference elsewhere —
and erases the Δ nodes and the combine. The chosen form and the reason are stored on the node
(``meta["moa_fx.lowering"]``) and in ``ctx.lowering`` for the CLI.
Records: one PassRecord per site, lowered or kept (with why).

The form comes from :func:`moa_fx.kernels.choose_form` at a nominal token count and the expected
activation rate of the router's selection (dense 1, top-k k/E, threshold 1/2), unless the caller
forces ``"dense"`` or ``"grouped"``.
"""

from __future__ import annotations

import torch

from .. import routing
from ..kernels import choose_form, grouped_lora, lora_mixture
from ..kinds.lora import LoraDelta, SharedALoraDelta
from ..sites import SitePlan
from ..spec import LoraExpert, Spec
from .base import PassContext, PassRecord, new_node

__all__ = ["lower_sparse_dispatch", "lowered_lora_site", "site_weights", "shared_a_target", "plan_lowering", "decide",
           "NOMINAL_TOKENS", "LOWERING_KEY"]

PASS = "lower_sparse_dispatch"
LOWERING_KEY = "moa_fx.lowering"
NOMINAL_TOKENS = 8192  # a training batch of 4 × 2048 tokens: the shape PERF.md measures


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


def site_weights(w: torch.Tensor | None, cols: list[int], like: torch.Tensor, num: int) -> torch.Tensor:
    """The (T, E) weights of a site's experts: the router columns ``cols`` of ``w``, or ones
    (no router) shaped by ``like``'s T rows."""
    if w is None:
        return like.new_ones(like.shape[0], num)
    w2 = w.reshape(-1, w.shape[-1])
    return w2 if cols == list(range(w2.shape[-1])) else w2[:, cols]


def _expected_rate(spec: Spec, num_experts: int) -> float:
    r = spec.router
    if r.kind == "none" or r.select == "dense":
        return 1.0
    if r.select == "topk":
        return min(1.0, r.top_k / num_experts)
    return 0.5


def decide(spec: Spec, ranks: list[int], dropout: float, dtype: torch.dtype, device: torch.device, d_in: int,
           d_out: int, form: str = "auto") -> tuple[str, str]:
    """(form, reason) for one LoRA site: "dense", "grouped", or "unlowered" with why."""
    if dropout > 0:
        return "unlowered", "per-expert input dropout (set dropout = 0 to lower)"
    rate = _expected_rate(spec, len(ranks))
    chosen = form
    if form == "auto":
        chosen = choose_form(ranks, NOMINAL_TOKENS, rate, dtype, device, d_in=d_in, d_out=d_out)
    reason = (f"{'forced' if form != 'auto' else 'cost model'}: E={len(ranks)}, ranks={list(ranks)}, expected "
              f"activation {rate:.2f} at {NOMINAL_TOKENS} tokens, {str(dtype).replace('torch.', '')}, {device.type}")
    return chosen, reason


def plan_lowering(gm, plan: SitePlan, spec: Spec, form: str = "auto") -> dict[str, dict[str, str]]:
    """What :func:`lower_sparse_dispatch` will do at every LoRA site of ``plan``, without rewriting
    (what ``moa-fx sites`` prints)."""
    out: dict[str, dict[str, str]] = {}
    for p in plan.placements:
        if not isinstance(p.rule, LoraExpert):
            continue
        weight = gm.get_parameter(p.site.weight)
        chosen, reason = decide(spec, list(p.rule.ranks), p.rule.dropout, weight.dtype, weight.device,
                                p.site.d_in, p.site.d_out, form)
        out[p.site.path] = {"form": chosen, "reason": reason}
    return out


def lower_sparse_dispatch(ctx: PassContext, form: str = "auto") -> None:
    """Replace every lowerable LoRA combine with one fused-op node (``form``: auto, dense, grouped)."""
    graph = ctx.gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not routing.mix:
            continue
        y, w, all_deltas, all_cols = node.args
        site = node.meta.get("moa_fx.provenance", [{}])[-1].get("site", node.name)
        # the LoRA experts are lowered; other experts at the same anchor (a parallel adapter whose
        # span ends at down_proj) stay in a plain combine after the fused op
        lora = [(d, c) for d, c in zip(all_deltas, all_cols) if d.op == "call_module"
                and isinstance(ctx.gm.get_submodule(d.target), (LoraDelta, SharedALoraDelta))]
        rest = [(d, c) for d, c in zip(all_deltas, all_cols) if (d, c) not in lora]
        deltas, cols = [d for d, _ in lora], [c for _, c in lora]
        modules = [ctx.gm.get_submodule(d.target) for d in deltas]
        why = None
        if not deltas:
            why = "no LoRA experts"
        elif len({d.args[0] for d in deltas}) != 1:
            why = "experts read different inputs"
        elif any(not isinstance(m.dropout, torch.nn.Identity) for m in modules):
            why = "per-expert input dropout (set dropout = 0 to lower)"
        if why:
            ctx.lowering[site] = {"form": "unlowered", "reason": why}
            ctx.records.append(PassRecord(PASS, site, [], f"kept: {why}"))
            continue
        x = deltas[0].args[0]
        ranks = [m.r for m in modules]
        scales = [float(m.scale) for m in modules]
        val = y.meta.get("val")
        dtype = val.dtype if val is not None else torch.float32
        device = val.device if val is not None else torch.device("cpu")
        chosen, reason = decide(ctx.spec, ranks, 0.0, dtype, device, modules[0].lora_A.shape[1],
                                modules[0].lora_B.shape[0], form)
        added = []
        with graph.inserting_before(node):
            params = []
            for d, m in zip(deltas, modules):
                a_name = "lora_A" if "lora_A" in m._parameters else None
                a_target = f"{d.target}.{a_name}" if a_name else shared_a_target(ctx, m)
                for target in (a_target, f"{d.target}.lora_B"):
                    p = new_node(ctx, "get_attr", target, (), anchor=y, pass_name=PASS, site=site, role="expert weight")
                    params.append(p)
                    added.append(p.name)
            a_nodes, b_nodes = params[0::2], params[1::2]
            lowered = new_node(ctx, "call_function", lowered_lora_site,
                               (y, x, w, a_nodes, b_nodes, ranks, scales, list(cols), chosen), anchor=y,
                               pass_name=PASS, site=site, role=f"fused {chosen} LoRA mixture", val=y.meta.get("val"))
        lowered.meta[LOWERING_KEY] = {"form": chosen, "reason": reason}
        added.append(lowered.name)
        result = lowered
        if rest:
            with graph.inserting_after(lowered):
                result = new_node(ctx, "call_function", routing.mix,
                                  (lowered, w, [d for d, _ in rest], [c for _, c in rest]), anchor=y,
                                  pass_name=PASS, site=site, role="combine (other experts)", val=y.meta.get("val"))
            added.append(result.name)
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        for d in deltas:
            if not d.users:
                graph.erase_node(d)
        ctx.lowering[site] = {"form": chosen, "reason": reason}
        ctx.records.append(PassRecord(PASS, site, added, f"{chosen}: {reason}"))


def shared_a_target(ctx: PassContext, module: SharedALoraDelta) -> str:
    """The ``get_attr`` target of a HydraLoRA head's shared A (owned by the site's first head)."""
    owner = module._shared[0]
    for name, m in ctx.gm.named_modules():
        if m is owner:
            return f"{name}.lora_A"
    raise KeyError("shared LoRA A owner is not installed in the graph module")
