"""Triton backward of the fused LoRA-mixture ops: dX (or dZ), dA_cat, dB_cat and the gates' gradient.

With G = dL/d out, Z = X·A_catᵀ, C the column gate (``C[t, j] = w[t, e(j)]·s_e(j)``) and Z' = Z ⊙ C:
  dZ' = G·B_cat;  dZ = dZ' ⊙ C;  dX = dZ·A_cat;  dA_cat = dZᵀ·X;  dB_cat = Gᵀ·Z';
  dW[t, e] = s_e · Σ_{j ∈ e} dZ'[t, j]·Z[t, j].
The torch form of the same equations (``lora_mixture.expand_backward``, the grouped op's loop) is the
CPU path and the reference these kernels are tested against.

Map, in the order of STYLE item 9:
1. Kernels, with the forwards' tiling (a block of tokens or pairs per program, the rank dimension
   padded to R_PAD in registers, fp32 accumulation, the same dot-precision constexprs):
   ``_dense_rank_bwd_kernel`` (lora_mixture, lora_expand): per token block, dZ' and Z in registers;
   writes the per-token gradients (dX, or lora_expand's dZ; dW) and the rank-space rows dZ and Z'
   that the weight gradients read. ``_grouped_rank_bwd_kernel``: the same at expert e's sorted
   active pairs. ``_weight_grad_kernel``: dA_cat and dB_cat, a reduction over tokens (or pairs).
2. Launchers: :func:`dense_backward` and :func:`grouped_backward`; :func:`weight_grad`.
3. The custom ops ``moa_fx::lora_mixture_backward`` and ``moa_fx::lora_expand_backward``
   (so that AOTAutograd sees one opaque node, as for the forwards); grouped_lora's backward op
   lives in ``grouped_lora.py`` and calls :func:`grouped_backward`.

Reductions. dX and dW are per token: each program owns its rows, no reduction. dA_cat and dB_cat
sum over tokens: ``_weight_grad_kernel`` splits the tokens into a fixed number of chunks, each
program writes the fp32 partial of one (d tile, chunk[, expert]), and a torch sum over the chunks
finishes, so results are deterministic and cost one (chunks, d, R) fp32 buffer. The grouped dX is
the one atomic: a token sums its ≤ E experts' rows by fp32 atomic adds (as the grouped forward
does), so its last bit may vary run to run on a GPU where a token fires several experts.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from moa_fx.kernels.launch import cdiv, dispatch_free, launch, next_power_of_2, tile_plan, tl, triton
from moa_fx.kernels.reference import column_tables

__all__ = ["dense_backward", "grouped_backward", "weight_grad"]

if triton is not None:

    @triton.jit
    def _gather_dot(m_ptr, rows, mask_rows, n_ptr, cols, mask_cols, K, stride_mt, stride_mk, stride_nk, stride_nc,
                    BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        """Σ_k M[rows, k]·N[k, cols] as a (BLOCK_T, R_PAD) fp32 tile; M is cast to N's dtype first
        (dZ' = G·B_cat with N = B_cat; Z = X·A_catᵀ with N[k, j] = A_cat[j, k])."""
        acc = tl.full((BLOCK_T, R_PAD), 0.0, dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            m_tile = tl.load(m_ptr + rows[:, None] * stride_mt + offs_k[None, :] * stride_mk,
                             mask=mask_rows[:, None] & mask_k[None, :], other=0.0).to(n_ptr.dtype.element_ty)
            n_tile = tl.load(n_ptr + offs_k[:, None] * stride_nk + cols[None, :] * stride_nc,
                             mask=mask_k[:, None] & mask_cols[None, :], other=0.0)
            if DOT_IN_FP32:
                m_tile = m_tile.to(tl.float32)
                n_tile = n_tile.to(tl.float32)
            acc = tl.dot(m_tile, n_tile, acc, input_precision=DOT_PRECISION)
        return acc

    @triton.jit
    def _dz_and_dx(dzp, gate, store_rows, rows, mask_rows, offs_r, cols, mask_r, dz_ptr, stride_dzt, stride_dzr,
                   a_ptr, dx_ptr, D_IN, stride_ar, stride_ak, stride_dxt, stride_dxk, BLOCK_K: tl.constexpr,
                   STORE_DZ: tl.constexpr, NEED_DX: tl.constexpr, ATOMIC: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
        """dZ = dZ' ⊙ gate, rounded once to dz's dtype, stored at ``store_rows`` (STORE_DZ); and
        dX[rows] (+)= dZ·A_cat[cols] tile by tile over d_in (NEED_DX; ATOMIC: fp32 adds)."""
        dz = (dzp * gate).to(dz_ptr.dtype.element_ty)
        if STORE_DZ:
            tl.store(dz_ptr + store_rows[:, None] * stride_dzt + offs_r[None, :] * stride_dzr, dz,
                     mask=mask_rows[:, None] & mask_r[None, :])
        if NEED_DX:
            if DOT_IN_FP32:
                dz = dz.to(tl.float32)
            for k0 in range(0, D_IN, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < D_IN
                a_tile = tl.load(a_ptr + cols[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                                 mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                if DOT_IN_FP32:
                    a_tile = a_tile.to(tl.float32)
                delta = tl.dot(dz, a_tile, input_precision=DOT_PRECISION)
                ptrs = dx_ptr + rows[:, None] * stride_dxt + offs_k[None, :] * stride_dxk
                mask = mask_rows[:, None] & mask_k[None, :]
                if ATOMIC:
                    tl.atomic_add(ptrs, delta, mask=mask)
                else:
                    tl.store(ptrs, delta.to(dx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dense_rank_bwd_kernel(
        g_ptr, x_ptr, a_ptr, b_ptr, w_ptr, col_expert_ptr, col_scale_ptr, dx_ptr, dz_ptr, zg_ptr, dw_ptr,
        T, D_IN, D_OUT, R, E,
        stride_gt, stride_gn, stride_xt, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
        stride_wt, stride_we, stride_dxt, stride_dxk, stride_dzt, stride_dzr, stride_zgt, stride_zgr,
        stride_dwt, stride_dwe,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, E_PAD: tl.constexpr,
        Z_FROM_X: tl.constexpr, NEED_DX: tl.constexpr, STORE_DZ: tl.constexpr, STORE_ZG: tl.constexpr,
        NEED_DW: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        """Z_FROM_X: x_ptr is X (lora_mixture; Z = X·A_catᵀ here, dX written); else x_ptr is Z itself
        (lora_expand; dz_ptr receives its gradient)."""
        offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_r = tl.arange(0, R_PAD)
        mask_t = offs_t < T
        mask_r = offs_r < R
        mask_tr = mask_t[:, None] & mask_r[None, :]
        # C[t, j] = w[t, e(j)] · s_e(j), as the torch backward's expand_column_scale
        col_expert = tl.load(col_expert_ptr + offs_r, mask=mask_r, other=0)
        col_scale = tl.load(col_scale_ptr + offs_r, mask=mask_r, other=0.0)
        gate = tl.load(w_ptr + offs_t[:, None] * stride_wt + col_expert[None, :] * stride_we, mask=mask_tr,
                       other=0.0).to(tl.float32) * col_scale[None, :]
        if NEED_DX or STORE_DZ or NEED_DW:  # dZ' = G·B_cat
            dzp = _gather_dot(g_ptr, offs_t, mask_t, b_ptr, offs_r, mask_r, D_OUT, stride_gt, stride_gn,
                              stride_bn, stride_br, BLOCK_T, R_PAD, BLOCK_K, DOT_PRECISION, DOT_IN_FP32)
        if STORE_ZG or NEED_DW:  # Z, recomputed (mixture) or loaded (expand)
            if Z_FROM_X:
                z = _gather_dot(x_ptr, offs_t, mask_t, a_ptr, offs_r, mask_r, D_IN, stride_xt, stride_xk,
                                stride_ak, stride_ar, BLOCK_T, R_PAD, BLOCK_K, DOT_PRECISION, DOT_IN_FP32)
            else:
                z = tl.load(x_ptr + offs_t[:, None] * stride_xt + offs_r[None, :] * stride_xk, mask=mask_tr,
                            other=0.0).to(tl.float32)
            if STORE_ZG:  # Z' rows for dB_cat = Gᵀ·Z'
                tl.store(zg_ptr + offs_t[:, None] * stride_zgt + offs_r[None, :] * stride_zgr,
                         (z * gate).to(zg_ptr.dtype.element_ty), mask=mask_tr)
            if NEED_DW:
                # dW[t, e] = Σ_j dZ'·Z · M[j, e], M[j, e] = s_e·1[e(j) = e]: a (BLOCK_T, R_PAD)·(R_PAD, E_PAD)
                # dot, in full fp32 whatever the operands' dtype (the torch path's fp32 matmul).
                offs_e = tl.arange(0, E_PAD)
                member = (col_expert[:, None] == offs_e[None, :]) & mask_r[:, None]
                dw = tl.dot(dzp * z, tl.where(member, col_scale[:, None], 0.0), input_precision="ieee")
                tl.store(dw_ptr + offs_t[:, None] * stride_dwt + offs_e[None, :] * stride_dwe,
                         dw.to(dw_ptr.dtype.element_ty), mask=mask_t[:, None] & (offs_e[None, :] < E))
        if NEED_DX or STORE_DZ:
            _dz_and_dx(dzp, gate, offs_t, offs_t, mask_t, offs_r, offs_r, mask_r, dz_ptr, stride_dzt, stride_dzr,
                       a_ptr, dx_ptr, D_IN, stride_ar, stride_ak, stride_dxt, stride_dxk, BLOCK_K, STORE_DZ, NEED_DX,
                       False, DOT_PRECISION, DOT_IN_FP32)

    @triton.jit
    def _grouped_rank_bwd_kernel(
        g_ptr, x_ptr, a_ptr, b_ptr, w_ptr, pair_token_ptr, pair_offset_ptr, rank_offset_ptr, scale_ptr,
        dx_ptr, dz_ptr, zg_ptr, dw_ptr,
        D_IN, D_OUT,
        stride_gt, stride_gn, stride_xt, stride_xk, stride_ar, stride_ak, stride_bn, stride_br,
        stride_wt, stride_we, stride_dxt, stride_dxk, stride_dzp, stride_dzr, stride_zgp, stride_zgr,
        stride_dwt, stride_dwe,
        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
        NEED_DX: tl.constexpr, STORE_DZ: tl.constexpr, STORE_ZG: tl.constexpr, NEED_DW: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        """Program (b, e): pairs [b·BLOCK_P, (b+1)·BLOCK_P) of expert e's run, as the grouped forward.
        dz_ptr/zg_ptr rows are pair positions; dx_ptr is an fp32 accumulator (atomic adds)."""
        expert = tl.program_id(1)
        first = tl.load(pair_offset_ptr + expert) + tl.program_id(0) * BLOCK_P
        end = tl.load(pair_offset_ptr + expert + 1)
        if first >= end:
            return
        offs_p = first + tl.arange(0, BLOCK_P)
        mask_p = offs_p < end
        tokens = tl.load(pair_token_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
        rank_start = tl.load(rank_offset_ptr + expert)
        rank = tl.load(rank_offset_ptr + expert + 1) - rank_start
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < rank
        mask_pr = mask_p[:, None] & mask_r[None, :]
        cols = rank_start + offs_r
        scale = tl.load(scale_ptr + expert)
        gate = (tl.load(w_ptr + tokens * stride_wt + expert * stride_we, mask=mask_p, other=0.0).to(tl.float32)
                * scale)[:, None]
        if NEED_DX or STORE_DZ or NEED_DW:
            dzp = _gather_dot(g_ptr, tokens, mask_p, b_ptr, cols, mask_r, D_OUT, stride_gt, stride_gn,
                              stride_bn, stride_br, BLOCK_P, R_PAD, BLOCK_K, DOT_PRECISION, DOT_IN_FP32)
        if STORE_ZG or NEED_DW:
            z = _gather_dot(x_ptr, tokens, mask_p, a_ptr, cols, mask_r, D_IN, stride_xt, stride_xk,
                            stride_ak, stride_ar, BLOCK_P, R_PAD, BLOCK_K, DOT_PRECISION, DOT_IN_FP32)
            if STORE_ZG:
                tl.store(zg_ptr + offs_p[:, None] * stride_zgp + offs_r[None, :] * stride_zgr,
                         (z * gate).to(zg_ptr.dtype.element_ty), mask=mask_pr)
            if NEED_DW:
                # dW[token(p), e] = s_e·Σ_j dZ'·Z: a dot with a column of s_e (row sums by dot, because
                # tl.sum is a @jit helper that the CPU interpreter runs only under TRITON_INTERPRET=1).
                # Every one of the 16 result columns holds the sum; column 0 is stored.
                offs_c = tl.arange(0, 16)
                dw = tl.dot(dzp * z, tl.where(mask_r[:, None] & (offs_c[None, :] >= 0), scale, 0.0),
                            input_precision="ieee")
                tl.store(dw_ptr + tokens[:, None] * stride_dwt + expert * stride_dwe + offs_c[None, :] * 0,
                         dw.to(dw_ptr.dtype.element_ty), mask=mask_p[:, None] & (offs_c[None, :] == 0))
        if NEED_DX or STORE_DZ:  # dZ rows by pair position, dX rows by token
            _dz_and_dx(dzp, gate, offs_p, tokens, mask_p, offs_r, cols, mask_r, dz_ptr, stride_dzp, stride_dzr,
                       a_ptr, dx_ptr, D_IN, stride_ar, stride_ak, stride_dxt, stride_dxk, BLOCK_K, STORE_DZ, NEED_DX,
                       True, DOT_PRECISION, DOT_IN_FP32)

    @triton.jit
    def _weight_grad_kernel(
        big_ptr, small_ptr, out_ptr, pair_token_ptr, pair_offset_ptr, rank_offset_ptr,
        ROWS, D, R, CHUNK,
        stride_bt, stride_bd, stride_st, stride_sr, stride_os, stride_od, stride_or,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, R_PAD: tl.constexpr, GROUPED: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        """out[s, d, c0 + c] = Σ_{rows p of chunk s} big[row(p), d]·small[p, c]: the fp32 partial of
        dA_cat (big = X, small = dZ) or dB_cat (big = G, small = Z') over chunk s = program_id(1).
        Dense: rows 0..ROWS-1, row(p) = p, c0 = 0, R columns. GROUPED: expert e = program_id(2) takes
        the pairs of its run, row(p) = the pair's token, c0 = e's first column, its rank columns."""
        offs_d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        split = tl.program_id(1)
        if GROUPED:
            expert = tl.program_id(2)
            start = tl.load(pair_offset_ptr + expert)
            end = tl.load(pair_offset_ptr + expert + 1)
            col0 = tl.load(rank_offset_ptr + expert)
            width = tl.load(rank_offset_ptr + expert + 1) - col0
        else:
            start = 0
            end = ROWS
            col0 = 0
            width = R
        lo = start + split * CHUNK
        hi = tl.where(lo + CHUNK < end, lo + CHUNK, end)
        offs_c = tl.arange(0, R_PAD)
        mask_c = offs_c < width
        acc = tl.full((BLOCK_D, R_PAD), 0.0, dtype=tl.float32)
        for p0 in range(lo, hi, BLOCK_T):
            rows = (p0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            mask_rows = rows < hi
            if GROUPED:
                big_rows = tl.load(pair_token_ptr + rows, mask=mask_rows, other=0).to(tl.int64)
            else:
                big_rows = rows
            big_t = tl.load(big_ptr + big_rows[None, :] * stride_bt + offs_d[:, None] * stride_bd,
                            mask=mask_d[:, None] & mask_rows[None, :], other=0.0).to(small_ptr.dtype.element_ty)
            small = tl.load(small_ptr + rows[:, None] * stride_st + offs_c[None, :] * stride_sr,
                            mask=mask_rows[:, None] & mask_c[None, :], other=0.0)
            if DOT_IN_FP32:
                big_t = big_t.to(tl.float32)
                small = small.to(tl.float32)
            acc = tl.dot(big_t, small, acc, input_precision=DOT_PRECISION)
        tl.store(out_ptr + split * stride_os + offs_d[:, None] * stride_od + (col0 + offs_c)[None, :] * stride_or,
                 acc, mask=mask_d[:, None] & mask_c[None, :])


# --- 2. Launchers -----------------------------------------------------------------------------------


def _split(rows: int, programs: int, device: torch.device) -> int:
    """Token chunks of the weight-gradient reduction: on CUDA enough (d tile, chunk) programs to fill
    the device, each chunk at least 512 rows; on CPU (the interpreter) one."""
    if device.type != "cuda" or rows <= 512:
        return 1
    return max(1, min(cdiv(rows, 512), cdiv(264, programs)))


def weight_grad(big: Tensor, small: Tensor, total_rank: int, out_dtype: torch.dtype, *, rank_major: bool,
                pairs: tuple | None = None, split: int | None = None) -> Tensor:
    """Σ over rows of big[row(p)]ᵀ·small[p]: dA_cat (R, d_in) when ``rank_major`` (big = X, small = dZ),
    dB_cat (d_out, R) otherwise (big = G, small = Z'). Dense: row(p) = p. ``pairs`` =
    (pair_token, pair_offset, rank_offset): small's rows are sorted pairs, each expert's run summed
    into its own columns. ``split`` overrides the number of token chunks (tests)."""
    rows, width = small.shape if pairs is None else (big.shape[0], small.shape[1])
    d = big.shape[1]
    plan = tile_plan(width)
    num_experts = 1 if pairs is None else pairs[1].numel() - 1
    d_blocks = cdiv(d, plan.block_t)
    split = split or _split(rows, d_blocks * num_experts, big.device)
    chunk = max(1, cdiv(rows, split))
    partial = torch.empty((split, total_rank, d) if rank_major else (split, d, total_rank), dtype=torch.float32,
                          device=big.device)
    stride_od, stride_or = (partial.stride(2), partial.stride(1)) if rank_major else partial.stride()[1:]
    pair_token, pair_offset, rank_offset = pairs if pairs is not None else (small, small, small)
    launch(_weight_grad_kernel, (d_blocks, split, num_experts), big.device, small.dtype,
           big, small, partial, pair_token, pair_offset, rank_offset, rows, d, total_rank, chunk,
           big.stride(0), big.stride(1), small.stride(0), small.stride(1), partial.stride(0), stride_od, stride_or,
           BLOCK_D=plan.block_t, BLOCK_T=plan.block_k, R_PAD=plan.r_pad, GROUPED=pairs is not None)
    return (partial[0] if split == 1 else partial.sum(0)).to(out_dtype)


def dense_backward(grad: Tensor, x: Tensor, a_cat: Tensor | None, b_cat: Tensor, weights: Tensor,
                   ranks: Sequence[int], scales: Sequence[float], needs: Sequence[bool], *, split: int | None = None):
    """lora_mixture's (dX, dA_cat, dB_cat, dW) by ``_dense_rank_bwd_kernel`` and ``weight_grad``; None
    where ``needs`` (four flags) is False. For lora_expand pass Z as ``x`` and ``a_cat=None``: then
    the first result is dZ (in Z's dtype) and the second is None."""
    need_x, need_a, need_b, need_w = needs
    z_given = a_cat is None
    num_tokens, d_out = grad.shape
    total_rank, dtype, device = b_cat.shape[1], b_cat.dtype, grad.device
    plan = tile_plan(total_rank)
    store_dz = need_a or (z_given and need_x)
    dz = torch.empty(num_tokens, total_rank, dtype=x.dtype, device=device) if store_dz else None
    zg = torch.empty(num_tokens, total_rank, dtype=dtype, device=device) if need_b else None
    dw = torch.empty(weights.shape, dtype=weights.dtype, device=device) if need_w else None
    dx = torch.empty(x.shape, dtype=x.dtype, device=device) if (need_x and not z_given) else None
    if num_tokens and (need_x or need_a or need_b or need_w):
        tables = column_tables(ranks, scales, device)
        outs = [t if t is not None else x for t in (dx, dz, zg, dw)]  # x: a stand-in its flag never reads
        a_or_x = x if z_given else a_cat
        launch(_dense_rank_bwd_kernel, (cdiv(num_tokens, plan.block_t),), device, dtype,
               grad, x, a_or_x, b_cat, weights, tables.col_expert, tables.col_scale, *outs,
               num_tokens, x.shape[1], d_out, total_rank, len(ranks),
               *grad.stride(), *x.stride(), *a_or_x.stride(), *b_cat.stride(), *weights.stride(),
               *(s for t in outs for s in t.stride()),
               BLOCK_T=plan.block_t, BLOCK_K=plan.block_k, R_PAD=plan.r_pad,
               E_PAD=max(16, next_power_of_2(len(ranks))), Z_FROM_X=not z_given, NEED_DX=dx is not None,
               STORE_DZ=store_dz, STORE_ZG=need_b, NEED_DW=need_w)
    if z_given:
        dx = dz
    da = weight_grad(x, dz, total_rank, dtype, rank_major=True, split=split) if need_a else None
    db = weight_grad(grad, zg, total_rank, dtype, rank_major=False, split=split) if need_b else None
    return dx, da, db, dw


def grouped_backward(grad: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                     ranks: Sequence[int], scales: Sequence[float], needs: Sequence[bool],
                     pair_token: Tensor, pair_offset: Tensor, *, split: int | None = None):
    """grouped_lora's (dX, dA_cat, dB_cat, dW) at the active pairs (``sorted_pairs_on_device``), by
    ``_grouped_rank_bwd_kernel`` and ``weight_grad``; dW is 0 at inactive pairs; None where not needed."""
    need_x, need_a, need_b, need_w = needs
    num_tokens, d_out = grad.shape
    num_experts, dtype, device = len(ranks), x.dtype, grad.device
    plan = tile_plan(max(ranks))
    pair_rows, width = num_tokens * num_experts, max(ranks)  # pair buffers: one row per possible pair
    dz = torch.empty(pair_rows, width, dtype=dtype, device=device) if need_a else None
    zg = torch.empty(pair_rows, width, dtype=dtype, device=device) if need_b else None
    dw = torch.zeros(weights.shape, dtype=weights.dtype, device=device) if need_w else None
    dx = torch.zeros(x.shape, dtype=torch.float32, device=device) if need_x else None  # atomics, then one rounding
    tables = column_tables(ranks, scales, device)
    if num_tokens and (need_x or need_a or need_b or need_w):
        outs = [t if t is not None else x for t in (dx, dz, zg, dw)]
        launch(_grouped_rank_bwd_kernel, (cdiv(num_tokens, plan.block_t), num_experts), device, dtype,
               grad, x, a_cat, b_cat, weights, pair_token, pair_offset, tables.rank_offset, tables.expert_scale,
               *outs, x.shape[1], d_out,
               *grad.stride(), *x.stride(), *a_cat.stride(), *b_cat.stride(), *weights.stride(),
               *(s for t in outs for s in t.stride()),
               BLOCK_P=plan.block_t, BLOCK_K=plan.block_k, R_PAD=plan.r_pad, NEED_DX=need_x, STORE_DZ=need_a,
               STORE_ZG=need_b, NEED_DW=need_w)
    pairs = (pair_token, pair_offset, tables.rank_offset)
    total_rank = a_cat.shape[0]
    da = weight_grad(x, dz, total_rank, dtype, rank_major=True, pairs=pairs, split=split) if need_a else None
    db = weight_grad(grad, zg, total_rank, dtype, rank_major=False, pairs=pairs, split=split) if need_b else None
    return (dx.to(dtype) if need_x else None), da, db, dw


# --- 3. Custom ops (what AOTAutograd traces on the Triton path) ----------------------------------------


def _filled(grads, like) -> tuple:
    """Custom-op outputs: a gradient not computed comes back as a fresh empty tensor (outputs may
    neither be None nor alias each other)."""
    return tuple(g if g is not None else t.new_empty(0) for g, t in zip(grads, like))


@torch.library.custom_op("moa_fx::lora_mixture_backward", mutates_args=())
def _lora_mixture_backward_op(grad: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                              ranks: list[int], scales: list[float],
                              needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _filled(dense_backward(grad, x, a_cat, b_cat, weights, ranks, scales, needs), (x, a_cat, b_cat, weights))


@_lora_mixture_backward_op.register_fake
def _(grad, x, a_cat, b_cat, weights, ranks, scales, needs):
    return tuple(torch.empty_like(t) if n else t.new_empty(0) for t, n in zip((x, a_cat, b_cat, weights), needs))


@torch.library.custom_op("moa_fx::lora_expand_backward", mutates_args=())
def _lora_expand_backward_op(grad: Tensor, z: Tensor, b_cat: Tensor, weights: Tensor, ranks: list[int],
                             scales: list[float], needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    dz, _, db, dw = dense_backward(grad, z, None, b_cat, weights, ranks, scales, (needs[0], False, *needs[1:]))
    return _filled((dz, db, dw), (z, b_cat, weights))


@_lora_expand_backward_op.register_fake
def _(grad, z, b_cat, weights, ranks, scales, needs):
    return tuple(torch.empty_like(t) if n else t.new_empty(0) for t, n in zip((z, b_cat, weights), needs))


def triton_mixture_backward(grad, x, a_cat, b_cat, weights, ranks, scales, needs) -> list:
    """lora_mixture's gradients (dX, dA_cat, dB_cat, dW) on the Triton path, None where not needed."""
    needs = [bool(n) for n in needs]
    if dispatch_free(grad, x, a_cat, b_cat, weights):
        return list(dense_backward(grad, x, a_cat, b_cat, weights, ranks, scales, needs))
    return [g if n else None for g, n in zip(_lora_mixture_backward_op(grad, x, a_cat, b_cat, weights, ranks, scales,
                                                                      needs), needs)]


def triton_expand_backward(grad, z, b_cat, weights, ranks, scales, needs) -> list:
    """lora_expand's gradients (dZ, dB_cat, dW) on the Triton path, None where not needed."""
    needs = [bool(n) for n in needs]
    if dispatch_free(grad, z, b_cat, weights):
        dz, _, db, dw = dense_backward(grad, z, None, b_cat, weights, ranks, scales, (needs[0], False, *needs[1:]))
        return [dz, db, dw]
    return [g if n else None for g, n in zip(_lora_expand_backward_op(grad, z, b_cat, weights, ranks, scales, needs),
                                             needs)]
