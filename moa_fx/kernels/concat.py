"""``moa_fx::concat``: the per-step concatenation of a site's expert weights, opaque to Inductor.

A lowered site reads its experts' A (and B) as one matrix, ``cat([A_e.to(dtype)…])``, rebuilt every
step from the parameters (the parameters are the state; the matrix is derived). Traced as plain
``aten.cat``, Inductor fuses the cats of neighbouring sites into kernels whose grouping differs
from layer to layer, so each layer adds distinct kernels to the first compile (BENCHMARKS.md,
issue 20). As one custom op, every site's concatenation is the same extern call (``torch.cat``
itself) and adds no generated kernel; its backward is a split (views, plus a cast back when a
part's dtype differs), which Inductor lowers without a kernel of its own in fp32.

In plain eager (:func:`~moa_fx.kernels.launch.dispatch_free`) :func:`concat` is ``torch.cat``
directly: the same numbers, without the dispatcher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moa_fx.errors import KernelError
from moa_fx.kernels.launch import dispatch_free

__all__ = ["concat"]


def _cat(parts: list[Tensor], dim: int, dtype: torch.dtype) -> Tensor:
    return torch.cat([p.to(dtype) for p in parts], dim=dim)


@torch.library.custom_op("moa_fx::concat", mutates_args=())
def _concat_op(parts: list[Tensor], dim: int, dtype: torch.dtype) -> Tensor:
    return _cat(parts, dim, dtype)


@_concat_op.register_fake
def _concat_fake(parts: list[Tensor], dim: int, dtype: torch.dtype) -> Tensor:
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return parts[0].new_empty(shape, dtype=dtype)


def _setup(ctx, inputs, output) -> None:
    parts, dim, _ = inputs
    ctx.dim = dim
    ctx.sizes = [p.shape[dim] for p in parts]
    ctx.dtypes = [p.dtype for p in parts]


def _backward(ctx, grad: Tensor):
    pieces = torch.split(grad, ctx.sizes, dim=ctx.dim)
    return [g.to(dt) for g, dt in zip(pieces, ctx.dtypes)], None, None


_concat_op.register_autograd(_backward, setup_context=_setup)


def concat(parts: list[Tensor], dim: int, dtype: torch.dtype) -> Tensor:
    """``torch.cat([p.to(dtype) for p in parts], dim)``, one opaque op under tracing and compile."""
    if not parts:
        raise KernelError("moa_fx::concat needs at least one tensor; pass the weights of at least one expert.")
    if dispatch_free(*parts):
        return _cat(parts, dim, dtype)
    return _concat_op(list(parts), dim, dtype)
