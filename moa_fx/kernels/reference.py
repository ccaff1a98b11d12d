"""Pure-torch references for the fused LoRA-mixture ops.

Map:
- :func:`column_tables`: per rank column j, the expert e(j) that owns it and that expert's scale.
- :func:`expand_column_scale`: the (T, R) gate ``C[t, j] = weights[t, e(j)] * scales[e(j)]``.
- :func:`lora_mixture_reference`: the dense-masked math, vectorised; the CPU path of
  ``moa_fx::lora_mixture`` and the reference in tests.
- :func:`lora_expand_reference`: its second half, from a precomputed rank-space ``z = x·A_catᵀ``.
- :func:`grouped_lora_reference`: the same math computed only at active (token, expert) pairs,
  sorted by expert; the CPU path of ``moa_fx::grouped_lora``.

Both compute the rank-space intermediate in fp32 and add to ``y`` in fp32, then round once to
``y.dtype``. Shapes are 2-D: y (T, d_out), x (T, d_in), a_cat (R, d_in), b_cat (d_out, R),
weights (T, E), with R = sum(ranks) and E = len(ranks). The launchers in ``lora_mixture.py``
and ``grouped_lora.py`` validate shapes; these functions assume valid input.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "ColumnTables",
    "column_tables",
    "expand_column_scale",
    "lora_mixture_reference",
    "lora_expand_reference",
    "grouped_lora_reference",
    "active_pairs",
]


class ColumnTables(NamedTuple):
    """Small per-column and per-expert tables for one (ranks, scales, device)."""

    col_expert: Tensor  # (R,) int64: e(j), the expert owning rank column j
    col_scale: Tensor  # (R,) fp32: scales[e(j)]
    col_to_expert_scaled: Tensor  # (R, E) fp32: M[j, e] = scales[e] * 1[e(j) = e]
    rank_offset: Tensor  # (E + 1,) int64: first rank column of each expert, then R
    expert_scale: Tensor  # (E,) fp32: scales


_TABLES: dict[tuple, ColumnTables] = {}


def column_tables(ranks: Sequence[int], scales: Sequence[float], device: torch.device) -> ColumnTables:
    """Return (and cache) the column tables of ``ranks``/``scales`` on ``device``.

    Example: ranks [2, 3], scales [0.5, 2.0] give col_expert [0, 0, 1, 1, 1] and
    col_scale [0.5, 0.5, 2, 2, 2].
    """
    tracing = _under_tracing_mode()
    key = (tuple(ranks), tuple(scales), device)  # per call: one dict lookup, no tensor built
    tables = None if tracing else _TABLES.get(key)
    if tables is None:
        tables = _build_tables(tuple(int(r) for r in ranks), tuple(float(s) for s in scales), torch.device(device))
        if not tracing:
            _TABLES[key] = tables
    return tables


def _build_tables(ranks_l: tuple[int, ...], scales_l: tuple[float, ...], device: torch.device) -> ColumnTables:
    # Built outside inference mode so that autograd may save them in later training calls.
    # Built by factory ops from Python numbers, never torch.tensor(list): every size is static, so
    # tracing (torch.compile, export) sees no data-dependent size (repeat_interleave with a tensor
    # count would make one), and no tensor constant either (torch.tensor traces to a lifted constant,
    # which Inductor mishandles in a compile region's backward: "non-tensor input").
    with torch.inference_mode(False), torch.no_grad():
        def filled(values: Sequence[tuple[int, float | int]], dtype: torch.dtype) -> Tensor:
            return torch.cat([torch.full((n,), v, dtype=dtype, device=device) for n, v in values])

        num_experts = len(ranks_l)
        offsets = [0]
        for r in ranks_l:
            offsets.append(offsets[-1] + r)
        scale_t = filled([(1, s) for s in scales_l], torch.float32)
        col_expert = filled([(r, e) for e, r in enumerate(ranks_l)], torch.int64)
        col_scale = filled([(r, s) for r, s in zip(ranks_l, scales_l)], torch.float32)
        onehot = (col_expert[:, None] == torch.arange(num_experts, device=device)[None, :]).to(torch.float32)
        rank_offset = filled([(1, o) for o in offsets], torch.int64)
        return ColumnTables(col_expert, col_scale, onehot * scale_t, rank_offset, scale_t)


def _under_tracing_mode() -> bool:
    """Whether a dispatch mode (fake, functional, proxy: torch.compile tracing) or a tracing context
    (dynamo, AOTAutograd) is active.

    The cache holds real tensors; under tracing the tables are built fresh instead, so that no
    fake tensor leaks into the cache and no cached real tensor meets fake ones. Two C-level
    checks (~1 µs; ``torch._guards.detect_fake_mode`` answered the same in ~10 µs).
    """
    return bool(torch._C._len_torch_dispatch_stack()) or torch._guards.TracingContext.try_get() is not None


def expand_column_scale(weights: Tensor, ranks: Sequence[int], scales: Sequence[float]) -> Tensor:
    """The (T, R) fp32 gate of every rank column: ``C[t, j] = weights[t, e(j)] * scales[e(j)]``.

    Example: weights [[0.3, 0.0]], ranks [1, 2], scales [2.0, 1.0] give [[0.6, 0.0, 0.0]].
    """
    tables = column_tables(ranks, scales, weights.device)
    return weights.to(torch.float32).index_select(1, tables.col_expert) * tables.col_scale


def lora_mixture_reference(
    y: Tensor,
    x: Tensor,
    a_cat: Tensor,
    b_cat: Tensor,
    weights: Tensor,
    ranks: Sequence[int],
    scales: Sequence[float],
) -> Tensor:
    """``y + ((x @ a_cat.T) * C) @ b_cat.T`` with C from :func:`expand_column_scale`.

    Differentiable by plain autograd. Example::

        out = lora_mixture_reference(y, x, a_cat, b_cat, weights, [4, 8], [2.0, 1.0])
    """
    z = torch.mm(x.to(torch.float32), a_cat.to(torch.float32).t())
    return lora_expand_reference(y, z, b_cat, weights, ranks, scales)


def lora_expand_reference(
    y: Tensor,
    z: Tensor,
    b_cat: Tensor,
    weights: Tensor,
    ranks: Sequence[int],
    scales: Sequence[float],
) -> Tensor:
    """``y + (z * C) @ b_cat.T``: the second half of :func:`lora_mixture_reference`, for a rank-space
    ``z = x @ a_cat.T`` computed elsewhere (one GEMM shared by every LoRA reading x).

    Differentiable by plain autograd. Example::

        out = lora_expand_reference(y, x @ a_cat.T, b_cat, weights, [4, 8], [2.0, 1.0])
    """
    z = z.to(torch.float32) * expand_column_scale(weights, ranks, scales)
    out = torch.addmm(y.to(torch.float32), z, b_cat.to(torch.float32).t())
    return out.to(y.dtype)


def active_pairs(weights: Tensor) -> tuple[Tensor, Tensor, list[int]]:
    """The active (weight != 0) pairs sorted by expert: token ids, expert ids, per-expert counts.

    One host sync (the counts). Example: weights [[1, 0], [2, 3]] give tokens [0, 1, 1],
    experts [0, 0, 1] and counts [2, 1].
    """
    active = weights.t() != 0  # (E, T): expert-major, so nonzero() comes out sorted by expert
    pair_expert_token = torch.nonzero(active)
    experts, tokens = pair_expert_token[:, 0], pair_expert_token[:, 1]
    counts = torch.bincount(experts, minlength=weights.shape[1]).tolist()
    return tokens, experts, counts


def grouped_lora_reference(
    y: Tensor,
    x: Tensor,
    a_cat: Tensor,
    b_cat: Tensor,
    weights: Tensor,
    ranks: Sequence[int],
    scales: Sequence[float],
) -> Tensor:
    """The :func:`lora_mixture_reference` math evaluated only at active (token, expert) pairs.

    Pairs are sorted by expert; each expert's tokens are gathered once, run through its A then
    B, scaled by ``weights[t, e] * scales[e]`` and scatter-added into ``y``. Cost follows the
    number of active pairs. Not differentiable (it is the forward of ``moa_fx::grouped_lora``).
    """
    tokens, _, counts = active_pairs(weights)
    out = y.to(torch.float32).clone()
    x_sorted = x.index_select(0, tokens).to(torch.float32)
    a32, b32 = a_cat.to(torch.float32), b_cat.to(torch.float32)
    delta = torch.empty(tokens.numel(), y.shape[1], dtype=torch.float32, device=y.device)
    start = rank_start = 0
    for expert, (count, rank) in enumerate(zip(counts, ranks)):
        if count:
            rows = slice(start, start + count)
            cols = slice(rank_start, rank_start + rank)
            gate = weights[tokens[rows], expert].to(torch.float32) * float(scales[expert])
            z = torch.mm(x_sorted[rows], a32[cols].t()) * gate[:, None]
            torch.mm(z, b32[:, cols].t(), out=delta[rows])
        start += count
        rank_start += rank
    out.index_add_(0, tokens, delta)
    return out.to(y.dtype)
