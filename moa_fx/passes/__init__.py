"""The rewrite pipeline: a list of passes read top to bottom.

Each pass takes a :class:`~moa_fx.passes.base.PassContext`, changes the graph, and records what it
did; :func:`run_pipeline` lints the graph after each and names the failing pass and the passes
before it when something breaks.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import MoaFxError, PassError
from .base import PassContext, PassRecord
from .cleanup import cleanup
from .fuse_shared_input import fuse_shared_input
from .insert_experts import insert_experts
from .insert_routers import insert_routers
from .lower_sparse_dispatch import lower_sparse_dispatch

__all__ = ["DEFAULT_PIPELINE", "PASSES", "LOWER_CHOICES", "pipeline", "run_pipeline", "PassContext", "PassRecord"]

Pass = Callable[[PassContext], None]

DEFAULT_PIPELINE: tuple[Pass, ...] = (
    insert_experts,  # needs: a SitePlan; leaves ExpertSlots (Δ nodes) at projection, span and attention outputs
    insert_routers,  # needs: every ExpertSlot; adds routers, selection and one combine per anchor
    lower_sparse_dispatch,  # needs: ctx.combines and slots; its LOWERINGS rows fuse LoRA Δ nodes + combine
    fuse_shared_input,  # needs: lowered sites, ctx.slots and ctx.routers; one GEMM per input read by several
    cleanup,  # needs: router outputs recorded; exposes them as graph outputs, DCE, lint, recompile
)

PASSES: dict[str, Pass] = {p.__name__: p for p in DEFAULT_PIPELINE}
LOWER_CHOICES = ("auto", "dense", "grouped", "off")


def pipeline(lower: str = "auto", fuse: bool = True) -> tuple[Pass, ...]:
    """The default pipeline with the lowering form fixed (``"off"`` leaves the dense-masked graph)
    and the shared-input fusion on or off."""
    if lower not in LOWER_CHOICES:
        raise PassError(f"lower = {lower!r} is not valid; choose one of {', '.join(map(repr, LOWER_CHOICES))}")
    passes = tuple(p for p in DEFAULT_PIPELINE if (fuse or p is not fuse_shared_input)
                   and (lower != "off" or p is not lower_sparse_dispatch))
    if lower in ("off", "auto"):
        return passes

    def lower_sparse_dispatch_forced(ctx: PassContext) -> None:
        lower_sparse_dispatch(ctx, form=lower)

    lower_sparse_dispatch_forced.__name__ = "lower_sparse_dispatch"
    return tuple(lower_sparse_dispatch_forced if p is lower_sparse_dispatch else p for p in passes)


def run_pipeline(ctx: PassContext, passes: Sequence[Pass] = DEFAULT_PIPELINE, *, until: str | None = None) -> PassContext:
    """Run ``passes`` in order (stopping after the pass named ``until``), linting after each."""
    if until is not None and until not in {p.__name__ for p in passes}:
        raise PassError(f"no pass named '{until}'; passes: {', '.join(p.__name__ for p in passes)}")
    done: list[str] = []
    for p in passes:
        try:
            p(ctx)
            ctx.gm.graph.lint()
        except MoaFxError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the pass history
            raise PassError(f"{p.__name__} failed after [{', '.join(done)}]: {type(err).__name__}: {err}") from err
        done.append(p.__name__)
        if p.__name__ == until:
            break
    ctx.gm.recompile()
    return ctx
