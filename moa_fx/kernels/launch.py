"""What every fused op's launcher and custom op share: backend choice, the Triton import, input checks,
the launch prologue, and the eager fast path past the ``torch.library`` dispatcher.

Map:
- Backend: :func:`triton_available`, :func:`resolve_backend` ("auto" | "triton" | "torch"),
  :func:`runnable_kernel` (the CPU interpreter), :func:`device_guard`.
- Precision: :func:`dot_precision`, :func:`dot_in_fp32`; :func:`next_power_of_2`, :func:`cdiv`.
- Checks: :func:`check_2d_float`, :func:`check_inputs` (both raise KernelError naming the tensor).
- Launch: :func:`tile_plan` (R_PAD and the token/k block sizes every kernel derives from the rank
  width), :func:`launch` (interpreter wrap, device guard, the two precision constexprs).
- Custom-op plumbing: :func:`fake_like_y`, :func:`save_operands` (``setup_context``),
  :func:`dispatch_free` and :func:`eager_function` (eager calls skip the dispatcher; see there).

``lora_mixture.py`` re-exports these names (other modules import them from there).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from moa_fx.errors import KernelError

try:  # Triton is optional: without it every device runs the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = ["triton_available", "resolve_backend", "runnable_kernel", "device_guard", "dot_precision", "dot_in_fp32",
           "next_power_of_2", "cdiv", "check_2d_float", "check_inputs", "tile_plan", "launch", "fake_like_y",
           "save_operands", "dispatch_free", "eager_function", "BACKEND_ENV"]

BACKEND_ENV = "MOA_FX_KERNEL_BACKEND"
_BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- backend, precision, checks -----------------------------------------------------------------


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


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ on host ints (``triton.cdiv`` is a JIT function: ~4 µs a call)."""
    return -(-a // b)


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


def device_guard(device: torch.device):
    """Make ``device`` current for the launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --- the launch prologue --------------------------------------------------------------------------


class TilePlan(NamedTuple):
    r_pad: int  # rank columns held in registers: the width rounded up to a power of 2, at least 16
    block_t: int  # tokens (or pairs) per program: fewer as R_PAD grows, to keep (BLOCK_T, R_PAD) fp32 in registers
    block_k: int  # d_in (or d_out) tile of the loops over the wide dimension


@functools.lru_cache(maxsize=None)
def tile_plan(width: int) -> TilePlan:
    """Register tiling for rank width ``width`` (R for the dense kernels, the largest rank for the
    grouped ones). Example: ``tile_plan(24) == TilePlan(32, 64, 64)``."""
    r_pad = max(16, next_power_of_2(width))
    return TilePlan(r_pad, 64 if r_pad <= 64 else (32 if r_pad <= 128 else 16), 64 if r_pad <= 128 else 32)


def launch(kernel, grid: tuple, device: torch.device, dot_dtype: torch.dtype, *args, **constexprs) -> None:
    """Launch ``kernel[grid](*args, **constexprs)`` on ``device`` (CPU: under the interpreter), adding
    the DOT_PRECISION and DOT_IN_FP32 constexprs every kernel here takes (for operands of ``dot_dtype``)."""
    with device_guard(device):
        runnable_kernel(kernel, device)[grid](*args, **constexprs, DOT_PRECISION=dot_precision(dot_dtype),
                                              DOT_IN_FP32=dot_in_fp32(device))


# --- custom-op plumbing -------------------------------------------------------------------------------


def fake_like_y(y: Tensor, *rest) -> Tensor:
    """The fake of every fused op here: a fresh contiguous tensor shaped like ``y``, the output."""
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def save_operands(ctx, inputs, output):
    """``setup_context`` of the fused ops: save every tensor operand after ``y`` (y's gradient is
    the output's), the static ranks and scales, and the backend (the backward runs the forward's
    path). Inputs are ``(y, *tensors, ranks, scales, backend)``."""
    *tensors, ranks, scales, backend = inputs[1:]
    ctx.save_for_backward(*tensors)
    ctx.ranks, ctx.scales, ctx.backend = ranks, scales, backend


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def dispatch_free(*tensors) -> bool:
    """Whether this call may skip the ``torch.library`` dispatcher: plain eager on real tensors.

    False under ``torch.compile`` (dynamo or a TracingContext), any dispatch or torch-function mode
    (fake tensors, make_fx, export, compiled autograd, ``with torch.device``) and functorch
    transforms, and when one of ``tensors`` is on the meta device or a tensor subclass (DTensor,
    FakeTensor): those must see the custom op (and its fake). Each check is one C call, about 0.1 µs.
    """
    if any(type(t) not in _PLAIN or t.is_meta for t in tensors if t is not None):
        return False
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._len_torch_function_stack() or torch._C._functorch.peek_interpreter_stack() is not None
                or torch._guards.TracingContext.try_get() is not None)


def eager_function(name: str, impl: Callable, setup_context: Callable, backward: Callable):
    """An autograd.Function running ``impl`` with the custom op's ``setup_context`` and ``backward``.

    The fused ops call its ``apply`` when :func:`dispatch_free`: the same functions as the custom op,
    so the same numbers, without the dispatcher's Python layers (schema defaults, redispatch, the
    dynamo-disable wrapper). Old-style (``forward(ctx, ...)``, no ``setup_context`` staticmethod),
    because ``Function.apply`` of a new-style one binds an ``inspect.signature`` on every call.
    """

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})
