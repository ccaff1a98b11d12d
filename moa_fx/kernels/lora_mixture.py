"""Dense-masked LoRA mixture: ``out = y + ((x @ a_cat.T) * C) @ b_cat.T``, one fused op.

``C[t, j] = weights[t, e(j)] * scales[e(j)]`` gates rank column j by the weight of the expert
e(j) that owns it (see ``reference.expand_column_scale``). Entry point: :func:`lora_mixture`.

Map, in the order of STYLE item 9:
1. ``_lora_mixture_fwd_kernel`` (Triton): one program per block of tokens; Z = X·A_catᵀ stays
   in registers (fp32), is gated, then Z'·B_catᵀ is added to y tile by tile over d_out.
2. ``lora_mixture_forward``: the launcher (checks, grid, block sizes, CPU interpreter).
3. ``moa_fx::lora_mixture``: the torch.library custom op, its fake, and its autograd. The
   backward is torch matmuls (see ``_lora_mixture_backward``), traced by AOTAutograd.
4. The pure-torch reference lives in ``reference.py`` and is the CPU path.

Shared with ``grouped_lora.py`` and ``lora_expand.py``: the optional Triton import, backend choice
(:func:`resolve_backend`, :func:`runnable_kernel`), dot precision (:func:`dot_precision`,
:func:`dot_in_fp32`), :func:`next_power_of_2` and :func:`device_guard`; input checks
(:func:`check_inputs` for grouped_lora, :func:`check_2d_float` for lora_expand); every op's fake
(:func:`fake_like_y`) and ``setup_context`` (:func:`save_operands`); and, with
lora_expand only, the kernel helper ``_gate_expand_store`` and the backward :func:`expand_backward`.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from moa_fx.errors import KernelError
from moa_fx.kernels.reference import column_tables, expand_column_scale, lora_mixture_reference

try:  # Triton is optional: without it every device runs the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["lora_mixture", "lora_mixture_forward", "expand_backward", "resolve_backend", "BACKEND_ENV"]

BACKEND_ENV = "MOA_FX_KERNEL_BACKEND"
_BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


# --- 2. Launcher and shared helpers -----------------------------------------------------------


def triton_available() -> bool:
    """Whether Triton imported."""
    return triton is not None


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Map ``backend`` ("auto" | "triton" | "torch" | None) to the path that runs: "triton" or "torch".

    None reads the ``MOA_FX_KERNEL_BACKEND`` environment variable (default "auto"). "auto" runs
    Triton on CUDA when Triton is installed and torch elsewhere. "triton" on a CPU tensor runs
    the kernels in Triton's interpreter (slow; for tests). Under ``torch.compile`` this is
    decided once, at trace time.
    """
    chosen = os.environ.get(BACKEND_ENV, "auto") if backend is None else backend
    if chosen not in _BACKENDS:
        source = f"{BACKEND_ENV}={chosen!r}" if backend is None else f"backend={chosen!r}"
        raise KernelError(f"{source} is not supported; choose one of {', '.join(map(repr, _BACKENDS))}.")
    if chosen == "torch":
        return "torch"
    if chosen == "auto":
        return "triton" if (device.type == "cuda" and triton is not None) else "torch"
    if triton is None:
        raise KernelError("backend='triton' needs the triton package; install it or use backend='torch'.")
    if device.type not in ("cuda", "cpu"):
        raise KernelError(f"backend='triton' runs on cuda (or cpu via the interpreter), not {device.type}; "
                          "use backend='torch'.")
    return "triton"


_INTERPRETED: dict = {}


def runnable_kernel(kernel, device: torch.device):
    """``kernel`` itself on CUDA; on CPU, the same kernel under Triton's interpreter.

    Wrapping here (instead of relying on TRITON_INTERPRET=1 being set before this module
    was imported) lets tests run the CPU interpreter regardless of import order.
    """
    if device.type != "cpu":
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    wrapped = _INTERPRETED.get(kernel.fn)
    if wrapped is None:
        wrapped = _INTERPRETED[kernel.fn] = InterpretedFunction(_with_interpreted_helpers(kernel.fn))
    return wrapped


def _with_interpreted_helpers(fn):
    """A copy of ``fn`` whose globals name interpreted versions of the ``@triton.jit`` helpers it
    calls (the module's own globals keep the compiled ones for CUDA)."""
    import types

    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    scope = dict(fn.__globals__)
    for name, value in fn.__globals__.items():
        if isinstance(value, JITFunction):
            scope[name] = InterpretedFunction(value.fn)
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__qualname__, copy.__module__, copy.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
    return copy


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's TF32 switch so the op matches ``torch.mm`` on the same inputs;
    16-bit operands get Triton's default, which does not change their (exact) products."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def dot_in_fp32(device: torch.device) -> bool:
    """Triton's interpreter multiplies bf16 bit patterns as integers in ``tl.dot``, so on CPU the
    kernels upcast dot operands to fp32 first. A bf16·bf16 product is exact in fp32, so this
    matches the GPU's bf16 tensor-core dot up to summation order."""
    return device.type == "cpu"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def check_2d_float(op: str, named: dict[str, Tensor], example: str) -> None:
    """Raise KernelError naming the first of ``named`` (y first) that is not a 2-D float tensor on
    y's device; ``example`` names the tensor the flattening hint shows."""
    y = named["y"]
    for name, t in named.items():
        if t.dim() != 2:
            raise KernelError(f"{op}: {name} has shape {tuple(t.shape)}; it must be 2-D. "
                              f"Flatten leading dims first, e.g. {example}.reshape(-1, {example}.shape[-1]).")
        if t.dtype not in _FLOAT_DTYPES:
            raise KernelError(f"{op}: {name} has dtype {t.dtype}; use float32, bfloat16 or float16.")
        if t.device != y.device:
            raise KernelError(f"{op}: {name} is on {t.device} but y is on {y.device}; move all inputs to one device.")


def check_inputs(op: str, y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                 ranks: Sequence[int], scales: Sequence[float]) -> None:
    """Raise KernelError naming the first tensor whose shape, dtype or device does not fit."""
    named = {"y": y, "x": x, "a_cat": a_cat, "b_cat": b_cat, "weights": weights}
    check_2d_float(op, named, "x")
    for name in ("x", "a_cat", "b_cat"):
        if named[name].dtype != y.dtype:
            raise KernelError(f"{op}: {name} has dtype {named[name].dtype} but y has {y.dtype}; "
                              "cast x, a_cat and b_cat to y's dtype (weights may stay fp32).")
    if len(ranks) == 0 or len(ranks) != len(scales):
        raise KernelError(f"{op}: got {len(ranks)} ranks and {len(scales)} scales; pass one rank and one "
                          "scale per expert (at least one expert).")
    if any(int(r) <= 0 for r in ranks):
        raise KernelError(f"{op}: ranks {list(ranks)} must all be positive.")
    num_tokens, d_out = y.shape
    d_in = x.shape[1]
    total_rank = sum(int(r) for r in ranks)
    expected = {
        "x": (num_tokens, d_in),
        "a_cat": (total_rank, d_in),
        "b_cat": (d_out, total_rank),
        "weights": (num_tokens, len(ranks)),
    }
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise KernelError(
                f"{op}: {name} has shape {tuple(named[name].shape)}, expected {shape} "
                f"(T={num_tokens} from y, d_in={d_in} from x, d_out={d_out} from y, "
                f"R=sum(ranks)={total_rank}, E=len(ranks)={len(ranks)})."
            )


def lora_mixture_forward(y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                         ranks: Sequence[int], scales: Sequence[float]) -> Tensor:
    """Run ``_lora_mixture_fwd_kernel`` into a fresh output; inputs must pass :func:`check_inputs`."""
    num_tokens, d_out = y.shape
    d_in = x.shape[1]
    total_rank = a_cat.shape[0]
    tables = column_tables(ranks, scales, y.device)
    out = torch.empty_like(y, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    r_pad = max(16, next_power_of_2(total_rank))
    # Z (BLOCK_T x R_PAD fp32) lives in registers: fewer tokens per program as R grows.
    block_t = 64 if r_pad <= 64 else (32 if r_pad <= 128 else 16)
    block_k = 64 if r_pad <= 128 else 32
    block_n = 64
    grid = (triton.cdiv(num_tokens, block_t),)
    kernel = runnable_kernel(_lora_mixture_fwd_kernel, y.device)
    with device_guard(y.device):
        kernel[grid](
            y, x, a_cat, b_cat, weights, tables.col_expert, tables.col_scale, out,
            num_tokens, d_in, d_out, total_rank,
            y.stride(0), y.stride(1), x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1),
            b_cat.stride(0), b_cat.stride(1), weights.stride(0), weights.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_N=block_n, R_PAD=r_pad,
            DOT_PRECISION=dot_precision(x.dtype), DOT_IN_FP32=dot_in_fp32(y.device),
        )
    return out


def device_guard(device: torch.device):
    """Make ``device`` current for the launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --- 3. Custom op, fake, autograd -------------------------------------------------------------


@torch.library.custom_op("moa_fx::lora_mixture", mutates_args=())
def _lora_mixture_op(y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                     ranks: list[int], scales: list[float], backend: str) -> Tensor:
    if backend == "triton":
        return lora_mixture_forward(y, x, a_cat, b_cat, weights, ranks, scales)
    return lora_mixture_reference(y, x, a_cat, b_cat, weights, ranks, scales)


def fake_like_y(y: Tensor, *rest) -> Tensor:
    """The fake of every fused op here: a fresh contiguous tensor shaped like ``y``, the output."""
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def save_operands(ctx, inputs, output):
    """``setup_context`` of the fused ops: save every tensor operand after ``y`` (y's gradient is
    the output's) and the static ranks and scales. Inputs are ``(y, *tensors, ranks, scales, backend)``."""
    *tensors, ranks, scales, _backend = inputs[1:]
    ctx.save_for_backward(*tensors)
    ctx.ranks, ctx.scales = ranks, scales


_lora_mixture_op.register_fake(fake_like_y)


def _lora_mixture_backward_autograd(ctx, grad):
    x, a_cat, b_cat, weights = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, da, db, dw = _lora_mixture_backward(grad, x, a_cat, b_cat, weights, ctx.ranks, ctx.scales,
                                            needs[1], needs[2], needs[3], needs[4])
    dy = grad if needs[0] else None
    return dy, dx, da, db, dw, None, None, None


def _lora_mixture_backward(grad, x, a_cat, b_cat, weights, ranks, scales,
                           need_x: bool, need_a: bool, need_b: bool, need_w: bool):
    """Gradients of out = y + Z'·B_catᵀ, Z' = (X·A_catᵀ) ⊙ C, in torch matmuls.

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
    chosen = resolve_backend(backend, y.device)
    return _lora_mixture_op(y, x, a_cat, b_cat, weights, [int(r) for r in ranks],
                            [float(s) for s in scales], chosen)
