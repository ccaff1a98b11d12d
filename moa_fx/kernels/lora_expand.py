"""LoRA expand: ``out = y + (z * C) @ b_cat.T`` from a rank-space ``z`` computed elsewhere.

This is the second half of ``moa_fx::lora_mixture``. The shared-input fusion pass
(``moa_fx/passes/fuse_shared_input.py``) computes ``z = x·A_catᵀ`` for every LoRA site reading one x
(with the router and threshold) in one GEMM, and each site then needs only this op.
``C[t, j] = weights[t, e(j)] * scales[e(j)]`` as in ``lora_mixture``.

Map, in the order of STYLE item 9:
1. ``_lora_expand_fwd_kernel`` (Triton): one program per block of tokens loads Z (fp32) and runs
   the gate-and-expand helper it shares with the mixture kernel.
2. ``lora_expand_forward``: the launcher.
3. ``moa_fx::lora_expand``: the custom op, its fake, its autograd (the forward's backend: the
   Triton backward of ``lora_backward.py`` or torch matmuls, ``lora_mixture.expand_backward``);
   eager calls skip the dispatcher as in ``lora_mixture``.
4. The pure-torch reference, ``reference.lora_expand_reference``, is the CPU path.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from moa_fx.errors import KernelError
from moa_fx.kernels.lora_backward import triton_expand_backward
from moa_fx.kernels.lora_mixture import (cdiv, check_2d_float, dispatch_free, eager_function, expand_backward,
                                         fake_like_y, launch, resolve_backend, save_operands, tile_plan, triton)
from moa_fx.kernels.reference import column_tables, lora_expand_reference

__all__ = ["lora_expand", "lora_expand_forward"]


# --- 1. Triton kernel -------------------------------------------------------------------------

if triton is not None:
    import triton.language as tl

    from moa_fx.kernels.lora_mixture import _gate_expand_store

    @triton.jit
    def _lora_expand_fwd_kernel(
        y_ptr, z_ptr, b_ptr, w_ptr, col_expert_ptr, col_scale_ptr, out_ptr,
        T, D_OUT, R,
        stride_yt, stride_yn, stride_zt, stride_zr, stride_bn, stride_br, stride_wt, stride_we,
        stride_ot, stride_on,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_r = tl.arange(0, R_PAD)
        mask_t = offs_t < T
        mask_r = offs_r < R
        z = tl.load(
            z_ptr + offs_t[:, None] * stride_zt + offs_r[None, :] * stride_zr,
            mask=mask_t[:, None] & mask_r[None, :], other=0.0,
        ).to(tl.float32)
        _gate_expand_store(z, offs_t, mask_t, offs_r, mask_r, y_ptr, b_ptr, w_ptr, col_expert_ptr, col_scale_ptr,
                           out_ptr, D_OUT, stride_yt, stride_yn, stride_bn, stride_br, stride_wt, stride_we,
                           stride_ot, stride_on, BLOCK_N, DOT_PRECISION, DOT_IN_FP32)


# --- 2. Launcher ------------------------------------------------------------------------------


def check_expand_inputs(y: Tensor, z: Tensor, b_cat: Tensor, weights: Tensor, ranks: Sequence[int],
                        scales: Sequence[float]) -> None:
    """Raise KernelError naming the first input whose shape, dtype or device does not fit."""
    named = {"y": y, "z": z, "b_cat": b_cat, "weights": weights}
    check_2d_float("lora_expand", named, "z")
    if b_cat.dtype != y.dtype:
        raise KernelError(f"lora_expand: b_cat has dtype {b_cat.dtype} but y has {y.dtype}; cast b_cat to y's "
                          "dtype (z and weights may be fp32).")
    if len(ranks) == 0 or len(ranks) != len(scales) or any(int(r) <= 0 for r in ranks):
        raise KernelError(f"lora_expand: ranks {list(ranks)} and scales {list(scales)} must be one positive rank "
                          "and one scale per expert (at least one expert).")
    num_tokens, d_out = y.shape
    total_rank = sum(int(r) for r in ranks)
    expected = {"z": (num_tokens, total_rank), "b_cat": (d_out, total_rank), "weights": (num_tokens, len(ranks))}
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise KernelError(f"lora_expand: {name} has shape {tuple(named[name].shape)}, expected {shape} "
                              f"(T={num_tokens} and d_out={d_out} from y, R=sum(ranks)={total_rank}, "
                              f"E=len(ranks)={len(ranks)}).")


def lora_expand_forward(y: Tensor, z: Tensor, b_cat: Tensor, weights: Tensor, ranks: Sequence[int],
                        scales: Sequence[float]) -> Tensor:
    """Run ``_lora_expand_fwd_kernel`` into a fresh output; inputs must pass :func:`check_expand_inputs`."""
    num_tokens, d_out = y.shape
    total_rank = z.shape[1]
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    tables = column_tables(ranks, scales, y.device)
    plan = tile_plan(total_rank)
    launch(_lora_expand_fwd_kernel, (cdiv(num_tokens, plan.block_t),), y.device, b_cat.dtype,
           y, z, b_cat, weights, tables.col_expert, tables.col_scale, out,
           num_tokens, d_out, total_rank,
           *y.stride(), *z.stride(), *b_cat.stride(), *weights.stride(), *out.stride(),
           BLOCK_T=plan.block_t, BLOCK_N=64, R_PAD=plan.r_pad)
    return out


# --- 3. Custom op, fake, autograd -------------------------------------------------------------


def _lora_expand_impl(y: Tensor, z: Tensor, b_cat: Tensor, weights: Tensor, ranks: list[int], scales: list[float],
                      backend: str) -> Tensor:
    if backend == "triton":
        return lora_expand_forward(y, z, b_cat, weights, ranks, scales)
    return lora_expand_reference(y, z, b_cat, weights, ranks, scales)


_lora_expand_op = torch.library.custom_op("moa_fx::lora_expand", mutates_args=())(_lora_expand_impl)
_lora_expand_op.register_fake(fake_like_y)


def _backward(ctx, grad):
    z, b_cat, weights = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if ctx.backend == "triton":
        dz, db, dw = triton_expand_backward(grad, z, b_cat, weights, ctx.ranks, ctx.scales, needs[1:4])
    else:
        z32 = z.to(torch.float32) if (needs[2] or needs[3]) else None
        dz, db, dw = expand_backward(grad, z32, b_cat, weights, ctx.ranks, ctx.scales, need_z=needs[1],
                                     need_b=needs[2], need_w=needs[3], dz_dtype=z.dtype)
    return (grad if needs[0] else None), dz, db, dw, None, None, None


_lora_expand_op.register_autograd(_backward, setup_context=save_operands)
_LoraExpandEager = eager_function("LoraExpandEager", _lora_expand_impl, save_operands, _backward)


def lora_expand(y: Tensor, z: Tensor, b_cat: Tensor, weights: Tensor, ranks: Sequence[int],
                scales: Sequence[float], *, backend: Optional[str] = None) -> Tensor:
    """``y + (z * C) @ b_cat.T`` with ``C[t, j] = weights[t, e(j)] * scales[e(j)]``.

    y (T, d_out), z (T, R) the rank-space product x·A_catᵀ, b_cat (d_out, R), weights (T, E),
    one rank and one scale per expert, R = sum(ranks). Grads flow to y, z, b_cat and weights.
    ``backend``: see :func:`moa_fx.kernels.resolve_backend`. Example::

        out = lora_expand(y, x @ a_cat.T, b_cat, weights, ranks=[4, 8], scales=[2.0, 1.0])
    """
    check_expand_inputs(y, z, b_cat, weights, ranks, scales)
    args = (y, z, b_cat, weights, [int(r) for r in ranks], [float(s) for s in scales],
            resolve_backend(backend, y.device))
    return _LoraExpandEager.apply(*args) if dispatch_free(*args[:4]) else _lora_expand_op(*args)
