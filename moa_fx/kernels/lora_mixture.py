"""Dense-masked LoRA mixture: ``out = y + ((x @ a_cat.T) * C) @ b_cat.T``, one fused op.

``C[t, j] = weights[t, e(j)] * scales[e(j)]`` gates rank column j by the weight of the expert
e(j) that owns it (see ``reference.expand_column_scale``). Entry point: :func:`lora_mixture`.

Map, in the order of STYLE item 9:
1. ``_lora_mixture_fwd_kernel`` (Triton): one program per block of tokens; Z = X·A_catᵀ stays
   in registers (fp32), is gated, then Z'·B_catᵀ is added to y tile by tile over d_out.
2. ``lora_mixture_forward``: the launcher (grid, tile plan, CPU interpreter; ``launch.py``).
3. ``moa_fx::lora_mixture``: the torch.library custom op, its fake, and its autograd. The
   backward follows the forward's backend: Triton kernels (``lora_backward.py``, their own custom
   op) or torch matmuls (``_lora_mixture_backward``, traced by AOTAutograd). Eager calls on real
   tensors skip the dispatcher (``launch.dispatch_free``): same functions, less per-call time.
4. The pure-torch reference lives in ``reference.py`` and is the CPU path.

Shared with ``grouped_lora.py`` and ``lora_expand.py``: the helpers of ``launch.py`` (backend
choice, precision, input checks, the launch prologue, fake and ``setup_context``), re-exported
here; and, with lora_expand only, the kernel helper ``_gate_expand_store`` and the torch backward
:func:`expand_backward`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from moa_fx.kernels.launch import (BACKEND_ENV, cdiv, check_2d_float, check_inputs, device_guard, dispatch_free,
                                   dot_in_fp32, dot_precision, eager_function, fake_like_y, launch, next_power_of_2,
                                   resolve_backend, runnable_kernel, save_operands, tile_plan, tl, triton,
                                   triton_available)
from moa_fx.kernels.lora_backward import triton_mixture_backward
from moa_fx.kernels.reference import column_tables, expand_column_scale, lora_mixture_reference

# Re-exported: grouped_lora.py, lora_expand.py and other kernel modules import these from here.
__all__ = ["lora_mixture", "lora_mixture_forward", "expand_backward", "resolve_backend", "BACKEND_ENV",
           "cdiv", "check_2d_float", "check_inputs", "device_guard", "dispatch_free", "dot_in_fp32", "dot_precision",
           "eager_function", "fake_like_y", "launch", "next_power_of_2", "runnable_kernel", "save_operands",
           "tile_plan", "triton_available", "column_tables"]


# --- 1. Triton kernel -------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _lora_mixture_fwd_kernel(
        y_ptr, x_ptr, a_ptr, b_ptr, w_ptr, col_expert_ptr, col_scale_ptr, out_ptr,
        T, D_IN, D_OUT, R,
        stride_yt, stride_yn, stride_xt, stride_xk, stride_ar, stride_ak,
        stride_bn, stride_br, stride_wt, stride_we, stride_ot, stride_on,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
        R_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        # int64 token offsets: T·d_out can pass 2^31 at long sequences and wide layers
        offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_r = tl.arange(0, R_PAD)
        mask_t = offs_t < T
        mask_r = offs_r < R  # columns R..R_PAD-1 are padding: A rows and B columns load as 0

        # Z[t, j] = sum_k X[t, k] * A_cat[j, k], accumulated in fp32
        z = tl.full((BLOCK_T, R_PAD), 0.0, dtype=tl.float32)
        for k0 in range(0, D_IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < D_IN
            x_tile = tl.load(
                x_ptr + offs_t[:, None] * stride_xt + offs_k[None, :] * stride_xk,
                mask=mask_t[:, None] & mask_k[None, :], other=0.0,
            )
            a_tile_t = tl.load(  # A_cat[j, k] read as (k, j)
                a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                mask=mask_r[None, :] & mask_k[:, None], other=0.0,
            )
            if DOT_IN_FP32:
                x_tile = x_tile.to(tl.float32)
                a_tile_t = a_tile_t.to(tl.float32)
            z = tl.dot(x_tile, a_tile_t, z, input_precision=DOT_PRECISION)

        _gate_expand_store(z, offs_t, mask_t, offs_r, mask_r, y_ptr, b_ptr, w_ptr, col_expert_ptr, col_scale_ptr,
                           out_ptr, D_OUT, stride_yt, stride_yn, stride_bn, stride_br, stride_wt, stride_we,
                           stride_ot, stride_on, BLOCK_N, DOT_PRECISION, DOT_IN_FP32)

    @triton.jit
    def _gate_expand_store(
        z, offs_t, mask_t, offs_r, mask_r, y_ptr, b_ptr, w_ptr, col_expert_ptr, col_scale_ptr, out_ptr, D_OUT,
        stride_yt, stride_yn, stride_bn, stride_br, stride_wt, stride_we, stride_ot, stride_on,
        BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        """The second half of both dense kernels: gate the fp32 rank-space tile Z (BLOCK_T, R_PAD)
        and write y + Z'·B_catᵀ tile by tile over d_out."""
        # Z'[t, j] = Z[t, j] * weights[t, e(j)] * scales[e(j)]
        col_expert = tl.load(col_expert_ptr + offs_r, mask=mask_r, other=0)
        col_scale = tl.load(col_scale_ptr + offs_r, mask=mask_r, other=0.0)
        gate = tl.load(
            w_ptr + offs_t[:, None] * stride_wt + col_expert[None, :] * stride_we,
            mask=mask_t[:, None] & mask_r[None, :], other=0.0,
        ).to(tl.float32)
        z = z * gate * col_scale[None, :]
        # The second GEMM takes Z' in the input dtype (tensor cores for bf16/fp16) and
        # accumulates in fp32 on top of y, so y + ΔY is rounded once.
        z = z.to(b_ptr.dtype.element_ty)
        if DOT_IN_FP32:
            z = z.to(tl.float32)

        # out[t, n] = y[t, n] + sum_j Z'[t, j] * B_cat[n, j]
        for n0 in range(0, D_OUT, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < D_OUT
            mask_tn = mask_t[:, None] & mask_n[None, :]
            b_tile_t = tl.load(  # B_cat[n, j] read as (j, n)
                b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=mask_r[:, None] & mask_n[None, :], other=0.0,
            )
            acc = tl.load(
                y_ptr + offs_t[:, None] * stride_yt + offs_n[None, :] * stride_yn,
                mask=mask_tn, other=0.0,
            ).to(tl.float32)
            if DOT_IN_FP32:
                b_tile_t = b_tile_t.to(tl.float32)
            acc = tl.dot(z, b_tile_t, acc, input_precision=DOT_PRECISION)
            tl.store(
                out_ptr + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on,
                acc.to(out_ptr.dtype.element_ty), mask=mask_tn,
            )


# --- 2. Launcher -----------------------------------------------------------------------------


def lora_mixture_forward(y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                         ranks: Sequence[int], scales: Sequence[float]) -> Tensor:
    """Run ``_lora_mixture_fwd_kernel`` into a fresh output; inputs must pass :func:`check_inputs`."""
    num_tokens, d_out = y.shape
    total_rank = a_cat.shape[0]
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    tables = column_tables(ranks, scales, y.device)
    plan = tile_plan(total_rank)  # Z (BLOCK_T x R_PAD fp32) lives in registers: fewer tokens as R grows
    launch(_lora_mixture_fwd_kernel, (cdiv(num_tokens, plan.block_t),), y.device, x.dtype,
           y, x, a_cat, b_cat, weights, tables.col_expert, tables.col_scale, out,
           num_tokens, x.shape[1], d_out, total_rank,
           *y.stride(), *x.stride(), *a_cat.stride(), *b_cat.stride(), *weights.stride(), *out.stride(),
           BLOCK_T=plan.block_t, BLOCK_K=plan.block_k, BLOCK_N=64, R_PAD=plan.r_pad)
    return out


# --- 3. Custom op, fake, autograd -------------------------------------------------------------


def _lora_mixture_impl(y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                       ranks: list[int], scales: list[float], backend: str) -> Tensor:
    if backend == "triton":
        return lora_mixture_forward(y, x, a_cat, b_cat, weights, ranks, scales)
    return lora_mixture_reference(y, x, a_cat, b_cat, weights, ranks, scales)


_lora_mixture_op = torch.library.custom_op("moa_fx::lora_mixture", mutates_args=())(_lora_mixture_impl)
_lora_mixture_op.register_fake(fake_like_y)


def _lora_mixture_backward_autograd(ctx, grad):
    x, a_cat, b_cat, weights = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if ctx.backend == "triton":
        dx, da, db, dw = triton_mixture_backward(grad, x, a_cat, b_cat, weights, ctx.ranks, ctx.scales, needs[1:5])
    else:
        dx, da, db, dw = _lora_mixture_backward(grad, x, a_cat, b_cat, weights, ctx.ranks, ctx.scales,
                                                needs[1], needs[2], needs[3], needs[4])
    dy = grad if needs[0] else None
    return dy, dx, da, db, dw, None, None, None


def _lora_mixture_backward(grad, x, a_cat, b_cat, weights, ranks, scales,
                           need_x: bool, need_a: bool, need_b: bool, need_w: bool):
    """Gradients of out = y + Z'·B_catᵀ, Z' = (X·A_catᵀ) ⊙ C, in torch matmuls: the CPU path
    (traced by AOTAutograd under torch.compile) and the reference of the Triton backward.

    The expand half (dZ, dB_cat, dW) is :func:`expand_backward`; then dX = dZ·A_cat and
    dA_cat = dZᵀ·X. Z is recomputed (one T·d_in·R GEMM) rather than saved.
    """
    z = torch.mm(x, a_cat.t()).to(torch.float32) if (need_b or need_w) else None
    dz, db, dw = expand_backward(grad, z, b_cat, weights, ranks, scales, need_z=need_x or need_a,
                                 need_b=need_b, need_w=need_w)
    dx = torch.mm(dz, a_cat) if need_x else None
    da = torch.mm(dz.t(), x) if need_a else None
    return dx, da, db, dw


def expand_backward(grad, z, b_cat, weights, ranks, scales, *, need_z: bool, need_b: bool, need_w: bool,
                    dz_dtype: torch.dtype | None = None):
    """Gradients of out = y + Z'·B_catᵀ, Z' = Z ⊙ C, for a given fp32 Z (None when neither
    dB_cat nor dW is needed):

    dZ' = G·B_cat;  dB_cat = Gᵀ·Z';  dZ = dZ' ⊙ C;
    dW[t, e] = scales[e] · Σ_{j ∈ e} dZ'[t, j]·Z[t, j]   (a (T, R)·(R, E) matmul).
    Rank-space tensors are fp32; the big GEMMs are in B_cat's dtype, like a torch LoRA backward, and
    dZ is rounded once, to ``dz_dtype`` (default B_cat's dtype).
    """
    dtype = b_cat.dtype
    col_gate = expand_column_scale(weights, ranks, scales)
    dz = db = dw = None
    dzp = torch.mm(grad.to(dtype), b_cat).to(torch.float32) if (need_z or need_w) else None
    if need_b:
        db = torch.mm(grad.to(dtype).t(), (z * col_gate).to(dtype))
    if need_z:
        dz = (dzp * col_gate).to(dz_dtype or dtype)
    if need_w:
        tables = column_tables(ranks, scales, grad.device)
        dw = torch.mm(dzp * z, tables.col_to_expert_scaled).to(weights.dtype)
    return dz, db, dw


_lora_mixture_op.register_autograd(_lora_mixture_backward_autograd, setup_context=save_operands)
_LoraMixtureEager = eager_function("LoraMixtureEager", _lora_mixture_impl, save_operands,
                                   _lora_mixture_backward_autograd)


def lora_mixture(y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                 ranks: Sequence[int], scales: Sequence[float], *, backend: Optional[str] = None) -> Tensor:
    """``y + ((x @ a_cat.T) * C) @ b_cat.T`` with ``C[t, j] = weights[t, e(j)] * scales[e(j)]``.

    y (T, d_out), x (T, d_in), a_cat (R, d_in) = the experts' A stacked by rows,
    b_cat (d_out, R) = their B stacked by columns, weights (T, E) (0 where an expert is not
    selected), ranks and scales one per expert, R = sum(ranks). Returns a new tensor; grads
    flow to y, x, a_cat, b_cat and weights. fp32, bf16 or fp16; the rank-space product is fp32.
    ``backend``: see :func:`resolve_backend`. Example::

        out = lora_mixture(y, x, a_cat, b_cat, weights, ranks=[4, 8], scales=[2.0, 1.0])
    """
    check_inputs("lora_mixture", y, x, a_cat, b_cat, weights, ranks, scales)
    args = (y, x, a_cat, b_cat, weights, [int(r) for r in ranks], [float(s) for s in scales],
            resolve_backend(backend, y.device))
    return _LoraMixtureEager.apply(*args) if dispatch_free(*args[:5]) else _lora_mixture_op(*args)
