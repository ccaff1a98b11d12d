"""Expose router outputs, drop dead code, lint and recompile.

Matches: the router statistics and balance-loss nodes recorded by ``insert_routers``.
Emits: those nodes appended to the graph's output tuple after the model's own outputs (the
runtime reads them by the order stored in ``gm.meta[EXTRAS_KEY]``). Records: one PassRecord.
"""

from __future__ import annotations

from ..graph import EXTRAS_KEY, NUM_OUTPUTS_KEY
from .base import PassContext, PassRecord

__all__ = ["cleanup"]

PASS = "cleanup"


def cleanup(ctx: PassContext) -> None:
    """Append router outputs to the graph output, eliminate dead code, lint and recompile."""
    graph = ctx.gm.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    num_user = ctx.gm.meta[NUM_OUTPUTS_KEY]
    user_outputs = tuple(output.args[0][:num_user])
    extras = tuple(ctx.node(name) for _, name, _ in ctx.extra_outputs)
    output.args = (user_outputs + extras,)
    ctx.gm.meta[EXTRAS_KEY] = list(ctx.extra_outputs)
    graph.eliminate_dead_code()
    graph.lint()
    ctx.gm.recompile()
    ctx.records.append(PassRecord(PASS, "", [name for _, name, _ in ctx.extra_outputs],
                                  f"{len(extras)} router outputs exposed"))
