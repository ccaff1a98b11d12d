"""Lower each LoRA site's experts × weights × combine subgraph to one fused op, by a table of rows.

Matches: every combine ``insert_routers`` left (``ctx.combines``), seen through the
:class:`~moa_fx.passes.base.ExpertSlot` s it adds (``ctx.slots``) and the router columns that
weight them (``ctx.routers``). :data:`LOWERINGS` is the table: one :class:`Lowering` row per
fused op, tried in order on each combine whose function is the row's ``combine``. A row ``takes``
some of the combine's experts (the others stay in a plain combine after the fused node),
``requires`` checks on them (each returns a code of :data:`REASONS` when it fails) and ``emit`` s
the fused node. The first row whose checks hold rewrites the combine; when none does, the site is
kept with the last row's reason (rows go from the most specialised to the most general).

The rows, in order:
- ``dropout_lora``: the LoRA experts of a ``mix``, reading one input x, at least one with input
  dropout, each with its own A (HydraLoRA's heads share A and read x dropped once, by a node of
  their own: the ``lora_mixture`` row, reading that x). Emits ``seed = seed_at(seeds, i)``, site
  i's entry of the forward's one ``seeds`` draw (:class:`~moa_fx.kinds.lora.DropoutSeeds`, after the
  graph's inputs: fresh seeds per call in training, None in eval, switched by ``train()``/``eval()``)
  and ``y' = dropout_lora_site(y, x, w, [A…], [B…], ranks, scales, cols,
  form, ps, seed)``, which calls ``moa_fx::dropout_lora`` (an independent mask per expert, made in the
  op) in training and ``lowered_lora_site`` in ``form`` in eval.
- ``lora_mixture``: the same experts with no input dropout. Emits
  ``y' = lowered_lora_site(y, x, w, [A…], [B…], ranks, scales, cols, form)``, which calls
  ``moa_fx::lora_mixture`` (dense-masked) or ``moa_fx::grouped_lora`` (active pairs only).
Both read the expert parameters through ``get_attr`` nodes, run Triton on CUDA and the torch
reference elsewhere, and erase the lowered Δ nodes and the combine. The chosen form and the
reason are stored on the node (``meta[LOWERING_KEY]``) and in ``ctx.lowering`` for the CLI.
Records: one PassRecord per site, lowered or kept (``outcome``: the form; ``reason``: a code).

The form comes from :func:`~moa_fx.passes.lowering_form.decide` (the cost model, or forced).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx

from .. import ops
from ..graph import ADAPTER_ROOT, LOWERING_KEY, add_submodule, refresh_value
from ..kinds.lora import DropoutSeeds
from .base import ExpertSlot, PassContext, PassRecord, lora_weight_targets, new_node, weight_columns
from .lowering_form import FORM_REASONS, decide, dropout_reason

__all__ = ["lower_sparse_dispatch", "Lowering", "Match", "Emitted", "LOWERINGS", "REASONS"]

PASS = "lower_sparse_dispatch"

REASONS = {  # reason code -> its words in ctx.lowering and the records' notes
    "no_lora": "no LoRA experts",
    "inputs_differ": "experts read different inputs",
    "dropout": "per-expert input dropout (set dropout = 0 to lower)",
    "no_dropout": "no input dropout (the lora_mixture row applies)",
    **FORM_REASONS,
}


@dataclass
class Match:
    """The experts of one combine that a row takes, and what a fused node needs around them."""

    combine: fx.Node
    site: str
    y: fx.Node  # the anchor: the value the experts are added to
    w: fx.Node | None  # the router weights (None: no router)
    slots: list[ExpertSlot]  # the experts the row takes, in the combine's order
    cols: list[int]  # their columns in w
    rest: list[ExpertSlot]  # the combine's other experts
    rest_cols: list[int]


@dataclass
class Emitted:
    """What a row's ``emit`` inserted: the node that replaces the taken experts' share of the combine."""

    node: fx.Node
    form: str
    code: str  # a key of REASONS
    reason: str
    added: list[str]


@dataclass(frozen=True)
class Lowering:
    """One row of :data:`LOWERINGS`: which combine it rewrites, which experts it takes, when it
    applies, and what it emits (``emit(ctx, match, form)`` runs at the combine's place in the graph)."""

    name: str
    combine: Callable  # the ops function of the combine nodes it matches
    takes: Callable[[ExpertSlot], bool]
    requires: tuple[Callable[[PassContext, Match], str | None], ...]
    emit: Callable[[PassContext, Match, str], Emitted]


# --- the lora_mixture row ----------------------------------------------------------------------------


def _is_lora(slot: ExpertSlot) -> bool:
    return slot.kind == "lora"


def _has_experts(ctx: PassContext, m: Match) -> str | None:
    return None if m.slots else "no_lora"


def _one_input(ctx: PassContext, m: Match) -> str | None:
    return None if len({s.input for s in m.slots}) == 1 else "inputs_differ"


def _no_dropout(ctx: PassContext, m: Match) -> str | None:
    dropped = any(not isinstance(ctx.gm.get_submodule(s.module).dropout, torch.nn.Identity) for s in m.slots)
    return "dropout" if dropped else None


def _dropout_ps(ctx: PassContext, m: Match) -> list[float]:
    return [float(getattr(ctx.gm.get_submodule(s.module).dropout, "p", 0.0)) for s in m.slots]


def _has_dropout(ctx: PassContext, m: Match) -> str | None:
    return None if any(_dropout_ps(ctx, m)) else "no_dropout"


def _lora_site_args(ctx: PassContext, m: Match, form: str):
    """The fused node's leading arguments ``(y, x, w, [A…], [B…], ranks, scales, cols, form)``, the
    get_attr nodes added, and the decision of :func:`decide`."""
    modules = [ctx.gm.get_submodule(s.module) for s in m.slots]
    ranks = [mod.r for mod in modules]
    scales = [float(mod.scale) for mod in modules]
    targets = [lora_weight_targets(ctx, s) for s in m.slots]
    a0, b0 = (ctx.gm.get_parameter(t) for t in targets[0])
    val = m.y.meta.get("val")
    dtype = val.dtype if val is not None else torch.float32
    device = val.device if val is not None else torch.device("cpu")
    decision = decide(ctx.spec, ranks, dtype, device, a0.shape[1], b0.shape[0], form)
    params = [new_node(ctx, "get_attr", t, (), anchor=m.y, pass_name=PASS, site=m.site, role="expert weight")
              for pair in targets for t in pair]
    x = ctx.node(m.slots[0].input)
    args = (m.y, x, m.w, params[0::2], params[1::2], ranks, scales, list(m.cols), decision[0])
    return args, [p.name for p in params], decision


def _emit_lora_mixture(ctx: PassContext, m: Match, form: str) -> Emitted:
    args, added, (chosen, code, reason) = _lora_site_args(ctx, m, form)
    node = new_node(ctx, "call_function", ops.lowered_lora_site, args, anchor=m.y, pass_name=PASS, site=m.site,
                    role=f"fused {chosen} LoRA mixture", val=m.y.meta.get("val"))
    return Emitted(node, chosen, code, reason, added + [node.name])


def _emit_dropout_lora(ctx: PassContext, m: Match, form: str) -> Emitted:
    args, added, (chosen, code, reason) = _lora_site_args(ctx, m, form)
    ps = _dropout_ps(ctx, m)
    seeds = _seeds_node(ctx)
    index = seeds.args[1]
    seeds.args = (seeds.args[0], index + 1)
    refresh_value(ctx.gm, seeds)
    seed = new_node(ctx, "call_function", ops.seed_at, (seeds, index), anchor=m.y, pass_name=PASS, site=m.site,
                    role="dropout seed")
    node = new_node(ctx, "call_function", ops.dropout_lora_site, (*args, ps, seed), anchor=m.y, pass_name=PASS,
                    site=m.site, role="fused dropout LoRA mixture", val=m.y.meta.get("val"))
    return Emitted(node, chosen, code, dropout_reason(ps, reason), added + [seed.name, node.name])


def _seeds_node(ctx: PassContext) -> fx.Node:
    """The forward's one draw of every site's dropout seed (:class:`~moa_fx.kinds.lora.DropoutSeeds`),
    after the graph's inputs; made by the first site that needs it, each site adding one seed."""
    graph = ctx.gm.graph
    target = f"{ADAPTER_ROOT}.dropout_seeds"
    found = next((n for n in graph.nodes if n.op == "call_module" and n.target == target), None)
    if found is not None:
        return found
    # not ctx.install: no adapter (nothing saved or trained), and graphs that do not lower (the cached
    # graph on CPU) lack it; one module shared by every derived graph that does
    if not isinstance(getattr(ctx.adapters, "dropout_seeds", None), DropoutSeeds):
        add_submodule(ctx.gm, target, DropoutSeeds())
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(inputs[-1]):
        node = new_node(ctx, "call_module", target, (inputs[0], 0), anchor=None, pass_name=PASS, site="",
                        role="dropout seeds (one per site)")
    node.meta["nn_module_stack"] = {}  # the model's root: in no decoder block (checkpointing leaves it outside)
    return node


LOWERINGS: tuple[Lowering, ...] = (
    Lowering("dropout_lora", ops.mix, _is_lora, (_has_experts, _one_input, _has_dropout), _emit_dropout_lora),
    Lowering("lora_mixture", ops.mix, _is_lora, (_has_experts, _one_input, _no_dropout), _emit_lora_mixture),
)


# --- the driver ---------------------------------------------------------------------------------------


def lower_sparse_dispatch(ctx: PassContext, form: str = "auto") -> None:
    """Rewrite every combine a row of :data:`LOWERINGS` applies to (``form``: auto, dense, grouped)."""
    by_anchor: dict[str, list[ExpertSlot]] = {}
    for slot in ctx.slots:
        by_anchor.setdefault(slot.anchor, []).append(slot)
    order = {n.name: i for i, n in enumerate(ctx.gm.graph.nodes)}
    for anchor, name in sorted(ctx.combines.items(), key=lambda item: order[item[1]]):
        combine = ctx.node(name)
        rows = [row for row in LOWERINGS if row.combine is combine.target]
        why, taken = None, 0
        for row in rows:
            match = _match(ctx, combine, by_anchor[anchor], row.takes)
            why = next((code for check in row.requires if (code := check(ctx, match)) is not None), None)
            if why is None:
                _rewrite(ctx, match, row, form)
                break
            taken = len(match.slots)
        if why is not None:
            site = by_anchor[anchor][0].site
            ctx.lowering[site] = {"form": "unlowered", "reason": REASONS[why]}
            ctx.records.append(PassRecord(PASS, site, [], f"kept: {REASONS[why]}", outcome="unlowered", reason=why,
                                          experts=taken))


def _match(ctx: PassContext, combine: fx.Node, slots: list[ExpertSlot], takes: Callable[[ExpertSlot], bool]) -> Match:
    weights, cols = weight_columns(ctx, slots)
    taken = [(s, c) for s, c in zip(slots, cols) if takes(s)]
    rest = [(s, c) for s, c in zip(slots, cols) if not takes(s)]
    return Match(combine=combine, site=slots[0].site, y=ctx.node(slots[0].anchor),
                 w=ctx.node(weights) if weights else None, slots=[s for s, _ in taken], cols=[c for _, c in taken],
                 rest=[s for s, _ in rest], rest_cols=[c for _, c in rest])


def _rewrite(ctx: PassContext, m: Match, row: Lowering, form: str) -> None:
    graph = ctx.gm.graph
    deltas = [ctx.node(s.delta) for s in m.slots]
    with graph.inserting_before(m.combine):
        out = row.emit(ctx, m, form)
    out.node.meta[LOWERING_KEY] = {"form": out.form, "reason": out.reason}
    added, result = list(out.added), out.node
    if m.rest:
        # experts the row does not take (a parallel adapter whose span ends at down_proj) stay in a
        # plain combine after the fused node
        with graph.inserting_after(out.node):
            result = new_node(ctx, "call_function", ops.mix, (out.node, m.w, [ctx.node(s.delta) for s in m.rest],
                                                               m.rest_cols),
                              anchor=m.y, pass_name=PASS, site=m.site, role="combine (other experts)",
                              val=m.y.meta.get("val"))
        added.append(result.name)
    m.combine.replace_all_uses_with(result)
    graph.erase_node(m.combine)
    for d in deltas:
        if not d.users:
            graph.erase_node(d)
    ctx.lowering[m.site] = {"form": out.form, "reason": out.reason}
    ctx.records.append(PassRecord(PASS, m.site, added, f"{out.form}: {out.reason}", outcome=out.form, reason=out.code,
                                  experts=len(m.slots)))
