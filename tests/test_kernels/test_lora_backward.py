"""The Triton backward (``moa_fx/kernels/lora_backward.py``) against the torch backward it replaces on CUDA.

Each Triton gradient (dX or dZ, dA_cat, dB_cat, dW) is computed by the launchers directly, under Triton's
CPU interpreter, and compared with the torch backward of the same op (``_lora_mixture_backward``,
``expand_backward``, the grouped op's torch loop) on random data: ranks that differ per expert, T not
a multiple of the token block, weights with zeros and non-zeros, fp32 and bf16, several shapes. The
torch backward itself is checked by finite differences (``torch.autograd.gradcheck``) in float64
against the op's math. One subprocess runs the three ops' backwards with TRITON_INTERPRET=1 set before
import. The whole-op comparisons against the oracles, Triton backward included, are in test_oracles.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from moa_fx.kernels.grouped_lora import _grouped_lora_backward_impl, sorted_pairs_on_device
from moa_fx.kernels.lora_mixture import _lora_mixture_backward, expand_backward, triton_available

from .test_lora_mixture import _run_python, needs_triton

if triton_available():
    from moa_fx.kernels.lora_backward import dense_backward, grouped_backward, weight_grad

# fp32: both sides sum ≤ 64 products per entry in different orders (~1e-6 at these magnitudes);
# a wrong column, expert or gate is O(0.1).
FP32_TOL = dict(rtol=1e-4, atol=1e-5)
# bf16: both backwards are judged against the float64 formula on the same bf16 inputs. The torch
# backward rounds dZ' and Z to bf16 (its GEMMs return bf16) and the kernels keep them fp32, so the
# kernels must be no worse than 2x the torch backward's error plus one bf16 ulp of the largest
# magnitude (the final rounding, which the torch path sometimes happens to get exactly).
BF16_FACTOR, BF16_ULP = 2.0, 2.0 ** -8
GRADS = ("d_x", "d_a_cat", "d_b_cat", "d_weights")


@dataclass(frozen=True)
class Shape:
    name: str
    num_tokens: int
    d_in: int
    d_out: int
    ranks: tuple[int, ...]


SHAPES = [
    Shape("odd_dims", 37, 40, 24, (2, 4, 8)),  # R_PAD 16, one partial token block
    Shape("wide_rank", 45, 24, 56, (4, 16, 40)),  # R_PAD 64
    Shape("two_blocks", 50, 64, 33, (16, 48, 8, 24)),  # R_PAD 128: 32-token blocks, the 2nd partial
    Shape("one_token", 1, 16, 16, (3, 5)),
]
SHAPE_IDS = [s.name for s in SHAPES]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def make_inputs(shape: Shape, dtype, seed=0):
    """(grad, x, a_cat, b_cat, weights) and scales; about half the weights are 0 (at least one not)."""
    gen = torch.Generator().manual_seed(seed)
    total_rank, num_experts = sum(shape.ranks), len(shape.ranks)
    grad = torch.randn(shape.num_tokens, shape.d_out, generator=gen)
    x = torch.randn(shape.num_tokens, shape.d_in, generator=gen)
    a_cat = torch.randn(total_rank, shape.d_in, generator=gen) * shape.d_in ** -0.5
    b_cat = torch.randn(shape.d_out, total_rank, generator=gen) * total_rank ** -0.5
    selected = torch.rand(shape.num_tokens, num_experts, generator=gen) < 0.5
    selected[0, 0] = True
    weights = (0.2 + 0.8 * torch.rand(shape.num_tokens, num_experts, generator=gen)) * selected
    scales = [0.5 + 0.25 * e for e in range(num_experts)]
    return [t.to(dtype) for t in (grad, x, a_cat, b_cat, weights)], scales


def torch_grads(op, grad, x, a_cat, b_cat, weights, ranks, scales, needs):
    """The torch backward of ``op`` ("mixture" | "grouped" | "expand"; expand takes z = x·A_catᵀ as x)."""
    if op == "mixture":
        return list(_lora_mixture_backward(grad, x, a_cat, b_cat, weights, ranks, scales, *needs))
    if op == "grouped":
        got = _grouped_lora_backward_impl(grad, x, a_cat, b_cat, weights, list(ranks), scales, list(needs))
        return [g if n else None for g, n in zip(got, needs)]
    z32 = x.to(torch.float32) if (needs[2] or needs[3]) else None
    dz, db, dw = expand_backward(grad, z32, b_cat, weights, ranks, scales, need_z=needs[0], need_b=needs[2],
                                 need_w=needs[3], dz_dtype=x.dtype)
    return [dz, None, db, dw]


def triton_grads(op, grad, x, a_cat, b_cat, weights, ranks, scales, needs, split=None):
    if op == "mixture":
        return list(dense_backward(grad, x, a_cat, b_cat, weights, ranks, scales, needs, split=split))
    if op == "grouped":
        return list(grouped_backward(grad, x, a_cat, b_cat, weights, ranks, scales, needs,
                                     *sorted_pairs_on_device(weights), split=split))
    return list(dense_backward(grad, x, None, b_cat, weights, ranks, scales, needs, split=split))


def op_inputs(op, inputs):
    """expand reads z = x·A_catᵀ (fp32, as the shared GEMM of the fusion pass may give) where the others read x."""
    grad, x, a_cat, b_cat, weights = inputs
    if op == "expand":
        return [grad, (x.float() @ a_cat.float().t()), a_cat, b_cat, weights]
    return inputs


OPS = ["mixture", "grouped", "expand"]
ALL = (True, True, True, True)


def needs_of(op, flags=ALL):
    return (flags[0], False, flags[2], flags[3]) if op == "expand" else flags


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("op", OPS)
def test_triton_backward_matches_torch_backward(op, shape, dtype):
    inputs, scales = make_inputs(shape, dtype)
    args = op_inputs(op, inputs)
    needs = needs_of(op)
    got = triton_grads(op, *args, shape.ranks, scales, needs)
    want = torch_grads(op, *args, shape.ranks, scales, needs)
    exact = torch_grads(op, *[t.double() for t in args], shape.ranks, scales, needs) if dtype != torch.float32 else None
    for name, g, w, need, like in zip(GRADS, got, want, needs, args[1:]):
        if not need:
            assert g is None and w is None, name
            continue
        assert (g.dtype, g.shape) == (like.dtype, like.shape), name
        assert w.abs().max() > 0, f"{name}: the torch gradient is all zero; the case tests nothing"
        if exact is None:
            torch.testing.assert_close(g, w, **FP32_TOL, msg=lambda m: f"{op}/{shape.name} {name}: {m}")
        else:
            o = exact[GRADS.index(name)]
            err, torch_err = ((t.double() - o).abs().max().item() for t in (g, w))
            bound = BF16_FACTOR * torch_err + BF16_ULP * max(1.0, o.abs().max().item())
            assert err <= bound, f"{op}/{shape.name} {name}: error {err:.3g} > {bound:.3g} (torch {torch_err:.3g})"


@needs_triton
@pytest.mark.parametrize("flags", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True), (True, False, True, True)],
                         ids=["x", "a", "b", "w", "x_b_w"])
@pytest.mark.parametrize("op", OPS)
def test_only_the_needed_gradients(op, flags):
    """Each subset of gradients (a frozen x, frozen experts, a frozen router) is computed alone and
    equals the full backward's."""
    shape = SHAPES[0]
    inputs, scales = make_inputs(shape, torch.float32)
    args = op_inputs(op, inputs)
    needs = needs_of(op, flags)
    got = triton_grads(op, *args, shape.ranks, scales, needs)
    full = torch_grads(op, *args, shape.ranks, scales, needs_of(op))
    for name, g, w, need in zip(GRADS, got, full, needs):
        if need:
            torch.testing.assert_close(g, w, **FP32_TOL, msg=lambda m: f"{op} {name}: {m}")
        else:
            assert g is None, name


@needs_triton
@pytest.mark.parametrize("op", ["mixture", "grouped"])
def test_split_token_reduction_is_deterministic_and_equal(op):
    """dA_cat and dB_cat summed in 3 token chunks (the two-stage reduction CUDA uses at large T) equal
    one chunk to rounding, and a rerun is bitwise identical (no atomics)."""
    shape = SHAPES[2]
    inputs, scales = make_inputs(shape, torch.float32)
    one = triton_grads(op, *inputs, shape.ranks, scales, ALL, split=1)
    three = triton_grads(op, *inputs, shape.ranks, scales, ALL, split=3)
    again = triton_grads(op, *inputs, shape.ranks, scales, ALL, split=3)
    for name, g1, g3, g3b in zip(GRADS[1:3], one[1:3], three[1:3], again[1:3]):
        torch.testing.assert_close(g3, g1, **FP32_TOL, msg=lambda m: f"{name}: {m}")
        assert torch.equal(g3, g3b), name


@needs_triton
def test_weight_grad_example():
    """weight_grad is Σ_t big[t]ᵀ·small[t]: dA_cat = dZᵀ·X, dB_cat = Gᵀ·Z', in either layout."""
    gen = torch.Generator().manual_seed(4)
    big, small = torch.randn(70, 20, generator=gen), torch.randn(70, 6, generator=gen)
    torch.testing.assert_close(weight_grad(big, small, 6, torch.float32, rank_major=True), small.t() @ big, **FP32_TOL)
    torch.testing.assert_close(weight_grad(big, small, 6, torch.float32, rank_major=False, split=2), big.t() @ small,
                               **FP32_TOL)


# --- the torch backward by finite differences, float64 ------------------------------------------------


def _math64(y, x, a_cat, b_cat, weights, ranks, scales):
    """out = y + ((x·A_catᵀ) ⊙ C)·B_catᵀ written directly in float64 (the op's forward math)."""
    col_gate = torch.cat([weights[:, e:e + 1] * s * torch.ones(1, r, dtype=weights.dtype)
                          for e, (r, s) in enumerate(zip(ranks, scales))], dim=1)
    return y + ((x @ a_cat.t()) * col_gate) @ b_cat.t()


class _TorchBackward(torch.autograd.Function):
    """The float64 math forward with one of the ops' torch backwards as its gradient."""

    @staticmethod
    def forward(ctx, op, y, x, a_cat, b_cat, weights, ranks, scales):
        ctx.save_for_backward(x, a_cat, b_cat, weights)
        ctx.op, ctx.ranks, ctx.scales = op, ranks, scales
        return _math64(y, x, a_cat, b_cat, weights, ranks, scales)

    @staticmethod
    def backward(ctx, grad):
        x, a_cat, b_cat, weights = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[2:6])
        if ctx.op == "expand":  # through z = x·A_catᵀ, as the fusion pass composes it
            z = x @ a_cat.t()
            dz, _, db, dw = torch_grads("expand", grad, z, a_cat, b_cat, weights, ctx.ranks, ctx.scales, ALL)
            dx, da = dz @ a_cat, dz.t() @ x
        else:
            dx, da, db, dw = torch_grads(ctx.op, grad, x, a_cat, b_cat, weights, ctx.ranks, ctx.scales, needs)
        return None, grad, dx, da, db, dw, None, None


@pytest.mark.parametrize("op", OPS)
def test_torch_backward_gradcheck_float64(op):
    """Finite differences of the float64 math against the torch backward (which keeps its rank-space
    products in fp32: hence rtol 1e-4, not float64's 1e-7). All weights are non-zero, so the grouped
    op's weight gradient (0 at inactive pairs by contract) is the dense one here."""
    shape = Shape("gradcheck", 9, 7, 5, (2, 3))
    inputs, scales = make_inputs(shape, torch.float64, seed=2)
    grad, x, a_cat, b_cat, weights = inputs
    weights = 0.2 + weights.abs()  # no zero: every pair fires
    y = torch.randn(grad.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    leaves = [t.clone().requires_grad_() for t in (y, x, a_cat, b_cat, weights)]
    assert torch.autograd.gradcheck(lambda *t: _TorchBackward.apply(op, *t, shape.ranks, scales), leaves,
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


@needs_triton
def test_backward_with_triton_interpret_env_set_before_import():
    """With TRITON_INTERPRET=1 set before import (every @triton.jit an interpreted function, helpers
    included) the three ops' Triton gradients equal the torch path's."""
    code = (
        "import torch\n"
        "from moa_fx.kernels import lora_mixture, grouped_lora, lora_expand\n"
        "g = torch.Generator().manual_seed(0)\n"
        "y, x = torch.randn(21, 24, generator=g), torch.randn(21, 20, generator=g)\n"
        "w = torch.rand(21, 2, generator=g) * (torch.rand(21, 2, generator=g) < 0.6)\n"
        "a, b = torch.randn(12, 20, generator=g) / 4, torch.randn(24, 12, generator=g) / 4\n"
        "expand = lambda y, x, a, b, w, r, s, backend: lora_expand(y, x @ a.t(), b, w, r, s, backend=backend)\n"
        "for op in (lora_mixture, grouped_lora, expand):\n"
        "    grads = []\n"
        "    for backend in ('torch', 'triton'):\n"
        "        leaves = [t.clone().requires_grad_() for t in (y, x, a, b, w)]\n"
        "        out = op(*leaves, [4, 8], [1.0, 0.5], backend=backend)\n"
        "        grads.append(torch.autograd.grad(out, leaves, torch.cos(out.detach())))\n"
        "    for got, want in zip(*grads):\n"
        "        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)\n"
    )
    _run_python(code, {"TRITON_INTERPRET": "1"})
