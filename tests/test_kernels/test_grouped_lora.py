"""moa_fx::grouped_lora against the dense reference and the loop oracle (from test_lora_mixture).

The grouped op's weight gradient is defined only at active pairs (0 elsewhere), so the oracles'
weight gradients are masked to the active pairs before comparing; a separate test checks that
this equals the dense op's gradient when weights are built as w = g·sel.
"""

from __future__ import annotations

import pytest
import torch

from moa_fx.errors import KernelError
from moa_fx.kernels import grouped_lora, grouped_lora_reference, lora_mixture, lora_mixture_reference
from moa_fx.kernels.grouped_lora import sorted_pairs_on_device
from moa_fx.kernels.reference import active_pairs

from .test_lora_mixture import (
    CASE_IDS,
    CASES,
    FP32_TOL,
    compile_and_check,
    make_inputs,
    needs_triton,
)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_grouped_reference_equals_dense_reference(case):
    inputs, scales = make_inputs(case, torch.float32)
    torch.testing.assert_close(grouped_lora_reference(*inputs, case.ranks, scales),
                               lora_mixture_reference(*inputs, case.ranks, scales), **FP32_TOL)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_gate_gradient_equals_dense_under_hard_selection(backend):
    """With w = g·sel (sel a hard 0/1 mask), dL/dg from the grouped op equals the dense op's,
    although dL/dw differs at unselected pairs (dense: defined; grouped: 0)."""
    case = CASES[1]
    (y, x, a_cat, b_cat, weights), scales = make_inputs(case, torch.float32)
    selected = (weights != 0).to(torch.float32)
    gates = torch.rand(weights.shape, generator=torch.Generator().manual_seed(3)) + 0.1
    grads = {}
    for op in (lora_mixture, grouped_lora):
        g = gates.clone().requires_grad_()
        w = (g * selected).requires_grad_()
        w.retain_grad()
        out = op(y, x, a_cat, b_cat, w, case.ranks, scales, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[op.__name__] = (g.grad, w.grad)
    dense_g, dense_w = grads["lora_mixture"]
    grouped_g, grouped_w = grads["grouped_lora"]
    torch.testing.assert_close(grouped_g, dense_g, **FP32_TOL)
    inactive = selected == 0
    assert bool((grouped_w[inactive] == 0).all())
    assert bool((dense_w[inactive] != 0).any())  # the dense op does define them
    torch.testing.assert_close(grouped_w[~inactive], dense_w[~inactive], **FP32_TOL)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_device_pair_sort_matches_host_pair_sort(case):
    inputs, _ = make_inputs(case, torch.float32)
    weights = inputs[4]
    tokens, _, counts = active_pairs(weights)
    pair_token, pair_offset = sorted_pairs_on_device(weights)
    assert pair_offset.tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()]
    assert pair_token[: tokens.numel()].tolist() == tokens.tolist()


def test_errors_name_the_tensor():
    case = CASES[1]
    (y, x, a_cat, b_cat, weights), scales = make_inputs(case, torch.float32)
    with pytest.raises(KernelError, match=r"grouped_lora: b_cat has shape \(40, 91\), expected \(40, 92\)"):
        grouped_lora(y, x, a_cat, b_cat[:, :91], weights, case.ranks, scales)


def test_compile_fullgraph_one_node_no_recompile():
    compile_and_check(grouped_lora, torch.ops.moa_fx.grouped_lora.default)
