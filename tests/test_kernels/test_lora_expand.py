"""moa_fx::lora_expand (the mixture's second half, from a precomputed z = x·A_catᵀ).

Composed with the rank-space GEMM it must equal the whole mixture, so the shared case table,
oracles and tolerances of test_lora_mixture.py apply unchanged: every case compares the output
and the five gradients (y, x, a_cat through z, b_cat, weights) with the loop oracle and the
reference. A direct test checks the gradient for z itself.
"""

from __future__ import annotations

import pytest
import torch

from moa_fx.errors import KernelError
from moa_fx.kernels import lora_expand, lora_expand_reference

from .test_lora_mixture import (
    CASES,
    FP32_TOL,
    compile_and_check,
    make_inputs,
    needs_triton,
)


def expand_after_gemm(y, x, a_cat, b_cat, weights, ranks, scales, backend=None):
    """The mixture computed the way the fusion pass does: one GEMM for z, then lora_expand."""
    return lora_expand(y, x @ a_cat.t(), b_cat, weights, ranks, scales, backend=backend)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gradient_of_z_matches_reference(backend):
    case = CASES[1]
    (y, x, a_cat, b_cat, weights), scales = make_inputs(case, torch.float32)
    z = (x @ a_cat.t()).requires_grad_()
    w = weights.clone().requires_grad_()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(lora_expand(y, z, b_cat, w, case.ranks, scales, backend=backend), (z, w), g)
    want = torch.autograd.grad(lora_expand_reference(y, z, b_cat, w, case.ranks, scales), (z, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **FP32_TOL)
    assert got[0].abs().max() > 0  # a live gradient, not an all-zero match


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_slice_of_a_shared_gemm_and_fp32_z_with_bf16_weights(backend):
    """What the fusion pass passes: z is a column slice of a wider GEMM output (row stride = the
    total width, not R); and an fp32 z may meet bf16 y and b_cat."""
    case = CASES[1]
    (y, x, a_cat, b_cat, weights), scales = make_inputs(case, torch.float32)
    other = torch.randn(7, x.shape[1], generator=torch.Generator().manual_seed(5))
    wide = x @ torch.cat([other, a_cat]).t()  # (T, 7 + R)
    z = wide.split([7, a_cat.shape[0]], dim=-1)[1]
    assert not z.is_contiguous()
    want = lora_expand_reference(y, z.contiguous(), b_cat, weights, case.ranks, scales)
    torch.testing.assert_close(lora_expand(y, z, b_cat, weights, case.ranks, scales, backend=backend), want,
                               **FP32_TOL)
    got16 = lora_expand(y.bfloat16(), z, b_cat.bfloat16(), weights, case.ranks, scales, backend=backend)
    want16 = lora_expand_reference(y.bfloat16(), z, b_cat.bfloat16(), weights, case.ranks, scales)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), want16.float(), rtol=2e-2, atol=2e-2)


def test_errors_name_the_tensor_and_the_fix():
    case = CASES[1]
    (y, x, a_cat, b_cat, weights), scales = make_inputs(case, torch.float32)
    z = x @ a_cat.t()
    with pytest.raises(KernelError, match=r"z has shape \(37, 91\), expected \(37, 92\)"):
        lora_expand(y, z[:, :91], b_cat, weights, case.ranks, scales)
    with pytest.raises(KernelError, match="z has shape .* must be 2-D. Flatten"):
        lora_expand(y, z[None], b_cat, weights, case.ranks, scales)
    with pytest.raises(KernelError, match="b_cat has dtype torch.bfloat16 but y has torch.float32"):
        lora_expand(y, z, b_cat.bfloat16(), weights, case.ranks, scales)
    with pytest.raises(KernelError, match="one positive rank and one scale per expert"):
        lora_expand(y, z, b_cat, weights, case.ranks, scales[:-1])


def test_compiles_as_one_node_without_recompiles():
    compile_and_check(expand_after_gemm, torch.ops.moa_fx.lora_expand.default)
