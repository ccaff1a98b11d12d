"""Grouped LoRA mixture: the ``lora_mixture`` math computed only at active (token, expert) pairs.

``out[t] = y[t] + Σ_{e: w[t,e] ≠ 0} w[t,e]·s_e · (x[t]·A_eᵀ)·B_eᵀ`` where A_e = a_cat[rows of e],
B_e = b_cat[:, columns of e]. Pairs are sorted by expert so each expert runs one A-then-B
product over a contiguous run of gathered tokens; cost follows the number of active pairs, not
T·E. Entry point: :func:`grouped_lora`.

Map, in the order of STYLE item 9:
1. ``_grouped_lora_fwd_kernel`` (Triton): program (b, e) takes pairs [b·BLOCK_P, (b+1)·BLOCK_P)
   of expert e's run, gathers their x rows, computes Z = X_e·A_eᵀ in fp32, gates each row by
   w·s_e, and atomically adds Z'·B_eᵀ into an fp32 copy of y.
2. ``grouped_lora_forward``: the launcher; builds the sorted pairs on the device with no host
   sync (a cumsum and a scatter), so the grid is the static (cdiv(T, BLOCK_P), E) and programs
   past an expert's run return at once.
3. ``moa_fx::grouped_lora`` (custom op + fake + autograd) and ``moa_fx::grouped_lora_backward``
   (its backward on the torch path, a per-expert loop with one host sync; an op of its own so that
   AOTAutograd does not trace its data-dependent shapes) and ``moa_fx::grouped_lora_backward_triton``
   (on the Triton path: the kernels of ``lora_backward.py``, no host sync). Eager calls skip the
   dispatcher as in ``lora_mixture``.
4. The torch forward is ``reference.grouped_lora_reference`` (the CPU path).

Gradient w.r.t. ``weights``: computed at active pairs (weight ≠ 0) and 0 elsewhere. The dense op
also gives the inactive entries their partial derivative s_e·Σ_j dZ'·Z; the two agree whenever
the caller builds weights as w = g·sel with a hard 0/1 mask sel (threshold or top-k routing),
because then dL/dg = dL/dw·sel and the inactive entries are multiplied by 0 anyway.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from moa_fx.kernels.lora_backward import grouped_backward
from moa_fx.kernels.lora_mixture import (
    cdiv,
    check_inputs,
    dispatch_free,
    eager_function,
    fake_like_y,
    launch,
    resolve_backend,
    save_operands,
    tile_plan,
    tl,
    triton,
)
from moa_fx.kernels.reference import active_pairs, column_tables, grouped_lora_reference

__all__ = ["grouped_lora", "grouped_lora_forward"]


# --- 1. Triton kernel -------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _grouped_lora_fwd_kernel(
        x_ptr, a_ptr, b_ptr, w_ptr, pair_token_ptr, pair_offset_ptr, rank_offset_ptr, scale_ptr, acc_ptr,
        D_IN, D_OUT,
        stride_xt, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
        stride_wt, stride_we, stride_acct, stride_accn,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
        R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        expert = tl.program_id(1)
        first = tl.load(pair_offset_ptr + expert) + tl.program_id(0) * BLOCK_P
        end = tl.load(pair_offset_ptr + expert + 1)
        if first >= end:  # expert e has fewer than (b+1)·BLOCK_P pairs
            return
        offs_p = first + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        tokens = tl.load(pair_token_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)  # T·d can pass 2^31
        rank_start = tl.load(rank_offset_ptr + expert)
        rank = tl.load(rank_offset_ptr + expert + 1) - rank_start
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < rank  # R_PAD fits the largest rank; smaller experts mask the rest
        cols = rank_start + offs_r

        # Z[p, j] = sum_k X[token(p), k] * A_e[j, k], in fp32
        z = tl.full((BLOCK_P, R_PAD), 0.0, dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D_IN
            x_tile = tl.load(
                x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                mask=mask_p[:, None] & mask_k[None, :], other=0.0,
            )
            a_tile_t = tl.load(
                a_ptr + cols[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=mask_r[None, :] & mask_k[:, None], other=0.0,
            )
            if DOT_IN_FP32:
                x_tile = x_tile.to(tl.float32)
                a_tile_t = a_tile_t.to(tl.float32)
            z = tl.dot(x_tile, a_tile_t, z, input_precision=DOT_PRECISION)

        # Z'[p, :] = Z[p, :] * weights[token(p), e] * scales[e]
        gate = tl.load(w_ptr + tokens * stride_wt + expert * stride_we, mask=mask_p, other=0.0).to(tl.float32)
        z = z * (gate * tl.load(scale_ptr + expert))[:, None]
        z = z.to(b_ptr.dtype.element_ty)
        if DOT_IN_FP32:
            z = z.to(tl.float32)

        # acc[token(p), n] += sum_j Z'[p, j] * B_e[n, j]; atomics because a token may sit in
        # several experts' runs.
        for n0 in range(0, D_OUT, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < D_OUT
            b_tile_t = tl.load(
                b_ptr + offs_n[None, :] * stride_bn + cols[:, None] * stride_br,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0,
            )
            if DOT_IN_FP32:
                b_tile_t = b_tile_t.to(tl.float32)
            delta = tl.dot(z, b_tile_t, input_precision=DOT_PRECISION)
            tl.atomic_add(
                acc_ptr + tokens[:, None] * stride_acct + offs_n[None, :] * stride_accn,
                delta, mask=mask_p[:, None] & mask_n[None, :],
            )


# --- 2. Launcher ------------------------------------------------------------------------------


def sorted_pairs_on_device(weights: Tensor) -> tuple[Tensor, Tensor]:
    """Token ids of active pairs sorted by expert (padded to T·E) and the (E+1,) run offsets.

    No host sync: pair q = e·T + t lands at position cumsum(active)[q] - 1; inactive pairs go to
    one spare slot at the end. Example: weights [[1, 0], [2, 3]] give tokens [0, 1, 1, …] and
    offsets [0, 2, 3].
    """
    num_tokens, num_experts = weights.shape
    active = (weights.t() != 0).reshape(-1)
    position = torch.cumsum(active, 0) - 1
    spare = num_tokens * num_experts
    dest = torch.where(active, position, torch.full_like(position, spare))
    token_ids = torch.arange(num_tokens, device=weights.device, dtype=torch.int32).repeat(num_experts)
    pair_token = torch.zeros(spare + 1, device=weights.device, dtype=torch.int32).scatter_(0, dest, token_ids)
    pair_offset = torch.zeros(num_experts + 1, device=weights.device, dtype=torch.int64)
    pair_offset[1:] = torch.cumsum(active.view(num_experts, num_tokens).sum(1), 0)
    return pair_token, pair_offset


def grouped_lora_forward(y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                         ranks: Sequence[int], scales: Sequence[float]) -> Tensor:
    """Run ``_grouped_lora_fwd_kernel``; inputs must pass ``check_inputs``.

    Accumulates in an fp32 copy of y (fp32 atomics work on every GPU), then rounds once.
    """
    num_tokens, d_out = y.shape
    d_in = x.shape[1]
    num_experts = len(ranks)
    acc = y.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if num_tokens == 0:
        return acc.to(y.dtype)
    tables = column_tables(ranks, scales, y.device)
    pair_token, pair_offset = sorted_pairs_on_device(weights)
    plan = tile_plan(max(ranks))
    grid = (cdiv(num_tokens, plan.block_t), num_experts)  # blocks on axis 0: it allows 2^31 - 1
    launch(_grouped_lora_fwd_kernel, grid, y.device, x.dtype,
           x, a_cat, b_cat, weights, pair_token, pair_offset, tables.rank_offset, tables.expert_scale, acc,
           d_in, d_out, *x.stride(), *a_cat.stride(), *b_cat.stride(), *weights.stride(), *acc.stride(),
           BLOCK_P=plan.block_t, BLOCK_K=plan.block_k, BLOCK_N=64, R_PAD=plan.r_pad)
    return acc.to(y.dtype)


# --- 3. Custom ops, fakes, autograd -----------------------------------------------------------


def _grouped_lora_impl(y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                       ranks: list[int], scales: list[float], backend: str) -> Tensor:
    if backend == "triton":
        return grouped_lora_forward(y, x, a_cat, b_cat, weights, ranks, scales)
    return grouped_lora_reference(y, x, a_cat, b_cat, weights, ranks, scales)


_grouped_lora_op = torch.library.custom_op("moa_fx::grouped_lora", mutates_args=())(_grouped_lora_impl)
_grouped_lora_op.register_fake(fake_like_y)


def _grouped_lora_backward_impl(grad: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                                ranks: list[int], scales: list[float],
                                needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, da_cat, db_cat, dweights) by a torch loop (the CPU path and the reference); an entry whose
    ``needs`` flag is False comes back empty.

    Per expert e with tokens I_e and gate g = w[I_e, e]·s_e:
    dZ' = G[I_e]·B_e;  dB_e = G[I_eᵀ]·(Z ⊙ g);  dZ = dZ' ⊙ g;  dX[I_e] += dZ·A_e;
    dA_e = dZᵀ·X[I_e];  dW[I_e, e] = s_e·Σ_j dZ'·Z  (0 at inactive pairs).
    """
    need_x, need_a, need_b, need_w = needs
    dtype = x.dtype
    tokens, experts, counts = active_pairs(weights)
    x_sorted = x.index_select(0, tokens)
    g_sorted = grad.to(dtype).index_select(0, tokens)
    dx_sorted = torch.empty_like(x_sorted, dtype=torch.float32) if need_x else None
    dw_pairs = torch.empty(tokens.numel(), dtype=torch.float32, device=x.device) if need_w else None
    da = torch.zeros_like(a_cat) if need_a else x.new_empty(0)
    db = torch.zeros_like(b_cat) if need_b else x.new_empty(0)
    start = rank_start = 0
    for expert, (count, rank) in enumerate(zip(counts, ranks)):
        rows = slice(start, start + count)
        cols = slice(rank_start, rank_start + rank)
        start += count
        rank_start += rank
        if count == 0:
            continue
        scale = float(scales[expert])
        gate = weights[tokens[rows], expert].to(torch.float32)[:, None] * scale
        x_e, g_e = x_sorted[rows], g_sorted[rows]
        dzp = torch.mm(g_e, b_cat[:, cols]).to(torch.float32)
        z = torch.mm(x_e, a_cat[cols].t()).to(torch.float32) if (need_b or need_w) else None
        if need_b:
            db[:, cols] = torch.mm(g_e.t(), (z * gate).to(dtype))
        if need_x or need_a:
            dz = (dzp * gate).to(dtype)
            if need_x:
                dx_sorted[rows] = torch.mm(dz, a_cat[cols])
            if need_a:
                da[cols] = torch.mm(dz.t(), x_e)
        if need_w:
            dw_pairs[rows] = (dzp * z).sum(1) * scale
    dx = x.new_empty(0)  # outputs may not alias each other, so one fresh empty per slot
    if need_x:
        # Sum a token's experts in fp32, round once.
        dx = torch.zeros_like(x, dtype=torch.float32).index_add_(0, tokens, dx_sorted).to(dtype)
    dw = x.new_empty(0)
    if need_w:
        dw = torch.zeros_like(weights).index_put_((tokens, experts), dw_pairs.to(weights.dtype))
    return dx, da, db, dw


def _grouped_lora_backward_triton_impl(grad: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                                       ranks: list[int], scales: list[float],
                                       needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same by the kernels of ``lora_backward.py`` over the device-sorted pairs (no host sync)."""
    grads = grouped_backward(grad, x, a_cat, b_cat, weights, ranks, scales, needs, *sorted_pairs_on_device(weights))
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _grouped_lora_backward_fake(grad, x, a_cat, b_cat, weights, ranks, scales, needs):
    return tuple(torch.empty_like(t) if need else x.new_empty(0) for t, need in zip((x, a_cat, b_cat, weights), needs))


_grouped_lora_backward_op = torch.library.custom_op("moa_fx::grouped_lora_backward", mutates_args=())(
    _grouped_lora_backward_impl)
_grouped_lora_backward_triton_op = torch.library.custom_op("moa_fx::grouped_lora_backward_triton", mutates_args=())(
    _grouped_lora_backward_triton_impl)
_grouped_lora_backward_op.register_fake(_grouped_lora_backward_fake)
_grouped_lora_backward_triton_op.register_fake(_grouped_lora_backward_fake)
# Per backend: (the eager function, its custom op: what AOTAutograd traces instead of data-dependent shapes)
_GROUPED_BACKWARDS = {"torch": (_grouped_lora_backward_impl, _grouped_lora_backward_op),
                      "triton": (_grouped_lora_backward_triton_impl, _grouped_lora_backward_triton_op)}


def _grouped_lora_backward_autograd(ctx, grad):
    x, a_cat, b_cat, weights = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[1:5]]
    grads = [None, None, None, None]
    if any(needs):
        impl, op = _GROUPED_BACKWARDS[ctx.backend]
        computed = (impl if dispatch_free(grad, x, a_cat, b_cat, weights) else op)(grad, x, a_cat, b_cat, weights, ctx.ranks, ctx.scales, needs)
        grads = [g if need else None for g, need in zip(computed, needs)]
    dy = grad if ctx.needs_input_grad[0] else None
    return (dy, *grads, None, None, None)


_grouped_lora_op.register_autograd(_grouped_lora_backward_autograd, setup_context=save_operands)
_GroupedLoraEager = eager_function("GroupedLoraEager", _grouped_lora_impl, save_operands,
                                   _grouped_lora_backward_autograd)


def grouped_lora(y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                 ranks: Sequence[int], scales: Sequence[float], *, backend: Optional[str] = None) -> Tensor:
    """Same contract and result as ``lora_mixture``, computed only where ``weights != 0``.

    Worth it when few (token, expert) pairs are active (see ``cost.choose_form``). The gradient
    w.r.t. ``weights`` is 0 at inactive entries (see the module docstring). ``backend``: as in
    ``lora_mixture.resolve_backend``. Example::

        out = grouped_lora(y, x, a_cat, b_cat, weights, ranks=[4, 8], scales=[2.0, 1.0])
    """
    check_inputs("grouped_lora", y, x, a_cat, b_cat, weights, ranks, scales)
    args = (y, x, a_cat, b_cat, weights, [int(r) for r in ranks], [float(s) for s in scales],
            resolve_backend(backend, y.device))
    return _GroupedLoraEager.apply(*args) if dispatch_free(*args[:5]) else _grouped_lora_op(*args)
