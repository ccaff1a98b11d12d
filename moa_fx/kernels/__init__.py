"""Fused LoRA-mixture ops: ``torch.library`` custom ops with fakes and autograd.

- :func:`lora_mixture` (``moa_fx::lora_mixture``): dense-masked form, every rank column for
  every token, gated per token and expert. ``lora_mixture.py``.
- :func:`lora_expand` (``moa_fx::lora_expand``): the mixture's second half, from a rank-space
  ``z = x·A_catᵀ`` computed by one GEMM shared with the other readers of x. ``lora_expand.py``.
- :func:`dropout_lora` (``moa_fx::dropout_lora``): the mixture with an independent input-dropout
  mask per expert, generated inside the op (and again in backward). ``dropout_lora.py``, its mask
  ``dropout_mask.py``.
- :func:`grouped_lora` (``moa_fx::grouped_lora``): same result, computed only at active
  (token, expert) pairs sorted by expert. ``grouped_lora.py``.
- :func:`choose_form`: which of the two a site should use. ``cost.py``.
- Pure-torch references and the column-gate helper: ``reference.py``.
- The Triton backward of all three (dX or dZ, dA_cat, dB_cat, d weights): ``lora_backward.py``;
  what every launcher and custom op shares (backend, checks, launch prologue): ``launch.py``.

CUDA runs Triton kernels, forward and backward; CPU runs the references. Force a path with ``backend=`` or the
``MOA_FX_KERNEL_BACKEND`` environment variable ("auto" | "triton" | "torch"); "triton" on CPU
tensors runs the kernels in Triton's interpreter (tests only: slow).
"""

from moa_fx.kernels.cost import choose_form
from moa_fx.kernels.dropout_lora import dropout_lora, dropout_lora_reference
from moa_fx.kernels.grouped_lora import grouped_lora
from moa_fx.kernels.lora_expand import lora_expand
from moa_fx.kernels.lora_mixture import BACKEND_ENV, lora_mixture, resolve_backend
from moa_fx.kernels.reference import (expand_column_scale, grouped_lora_reference, lora_expand_reference,
                                     lora_mixture_reference)

__all__ = [
    "lora_mixture",
    "lora_expand",
    "grouped_lora",
    "dropout_lora",
    "dropout_lora_reference",
    "choose_form",
    "lora_mixture_reference",
    "lora_expand_reference",
    "grouped_lora_reference",
    "expand_column_scale",
    "resolve_backend",
    "BACKEND_ENV",
]
