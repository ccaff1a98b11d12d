"""moa_fx::lora_mixture against the vectorised reference and a per-token, per-expert loop.

Every case compares the output and all five gradients (one autograd.grad over a tuple) on
random, non-zero data. CPU runs the torch path and the Triton kernel under Triton's
interpreter; CUDA cases skip without a GPU. The case table and the oracles are shared with
test_grouped_lora.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from moa_fx.errors import KernelError
from moa_fx.kernels import (
    BACKEND_ENV,
    choose_form,
    expand_column_scale,
    lora_mixture,
    lora_mixture_reference,
    resolve_backend,
)
from moa_fx.kernels.lora_mixture import triton_available

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# fp32: the op sums ≤ 100 products per rank column and per output in another order than the
# fp64 oracle; such errors are ~1e-6 at these magnitudes (|out| ≲ 5), so 1e-4 leaves margin
# without hiding a wrong column or expert (those are O(0.1)).
FP32_TOL = dict(rtol=1e-4, atol=1e-4)
# bf16: judged against the fp64 oracle on the same bf16-rounded inputs, relative to the error
# of the same formula evaluated naively in bf16 (STYLE item 10): error ≤ 2·naive error + one
# bf16 ulp at the output's largest magnitude. The op keeps rank-space products in fp32 and so is
# usually more accurate than naive (measured: ≤ 2.1x naive on these cases); the ulp term covers
# the final rounding to bf16, which alone costs up to half an ulp where naive happens to be exact.
BF16_ERROR_FACTOR = 2.0
BF16_ERROR_FLOOR = 2.0 ** -8


@dataclass(frozen=True)
class Case:
    name: str
    num_tokens: int
    d_in: int
    d_out: int
    ranks: tuple[int, ...]
    pattern: str  # "mixed" | "idle_expert" | "all_fire" | "none_fire"


CASES = [
    Case("one_token", 1, 72, 40, (4, 8, 16, 64), "mixed"),
    Case("odd_dims_mixed_ranks", 37, 72, 40, (4, 8, 16, 64), "mixed"),
    Case("expert_without_tokens", 19, 72, 40, (4, 8, 16, 64), "idle_expert"),
    Case("all_experts_fire", 23, 40, 72, (8, 8, 8), "all_fire"),
    Case("single_expert_half_firing", 16, 32, 48, (8,), "mixed"),
    Case("no_pair_fires", 5, 24, 24, (4, 16), "none_fire"),
]
CASE_IDS = [c.name for c in CASES]


def make_inputs(case: Case, dtype: torch.dtype, device="cpu", seed=0):
    """Random (y, x, a_cat, b_cat, weights) and scales; weights are 0 where an expert is off."""
    gen = torch.Generator().manual_seed(seed)
    total_rank, num_experts = sum(case.ranks), len(case.ranks)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    y = randn(case.num_tokens, case.d_out)
    x = randn(case.num_tokens, case.d_in)
    a_cat = randn(total_rank, case.d_in, scale=case.d_in ** -0.5)
    b_cat = randn(case.d_out, total_rank, scale=total_rank ** -0.5)
    gates = 0.2 + 0.8 * torch.rand(case.num_tokens, num_experts, generator=gen)
    selected = torch.rand(case.num_tokens, num_experts, generator=gen) < 0.5
    if case.pattern == "mixed":
        selected[0, 0] = True  # at least one pair fires, even for one token
    elif case.pattern == "idle_expert":
        selected[:, 0] = True
        selected[:, 2] = False
    elif case.pattern == "all_fire":
        selected[:] = True
    elif case.pattern == "none_fire":
        selected[:] = False
    weights = (gates * selected).to(dtype=dtype, device=device)
    scales = [0.5 + 0.25 * e for e in range(num_experts)]  # distinct, so a wrong expert shows
    return (y, x, a_cat, b_cat, weights), scales


def dumb_loop(y, x, a_cat, b_cat, weights, ranks, scales):
    """out[t] = y[t] + Σ_e w[t, e]·s_e·B_e·(A_e·x[t]), one token and one expert at a time."""
    rows = []
    for t in range(y.shape[0]):
        acc = y[t]
        start = 0
        for e, rank in enumerate(ranks):
            a_e, b_e = a_cat[start:start + rank], b_cat[:, start:start + rank]
            acc = acc + weights[t, e] * scales[e] * (b_e @ (a_e @ x[t]))
            start += rank
        rows.append(acc)
    return torch.stack(rows)


def naive_bf16(y, x, a_cat, b_cat, weights, ranks, scales):
    """The reference formula with every step in the inputs' low precision: the error yardstick."""
    gate = expand_column_scale(weights, ranks, scales).to(y.dtype)
    return y + ((x @ a_cat.t()) * gate) @ b_cat.t()


def value_and_grads(fn, inputs, grad_out, ranks, scales, dtype=None):
    """fn's output and the gradients of <output, grad_out> w.r.t. all five inputs."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves, list(ranks), scales)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return [out.detach(), *grads]


GRAD_NAMES = ["out", "d_y", "d_x", "d_a_cat", "d_b_cat", "d_weights"]


def assert_close_all(got, want, tol, what):
    for name, g, w in zip(GRAD_NAMES, got, want):
        torch.testing.assert_close(g.to(torch.float64), w.to(torch.float64), **tol, msg=lambda m: f"{what} {name}: {m}")


def assert_bf16_within_naive(got, oracle, naive, what):
    for name, g, o, n in zip(GRAD_NAMES, got, oracle, naive):
        g, o, n = (t.to(torch.float64) for t in (g, o, n))
        err, naive_err = (g - o).abs().max().item(), (n - o).abs().max().item()
        bound = BF16_ERROR_FACTOR * naive_err + BF16_ERROR_FLOOR * max(1.0, o.abs().max().item())
        assert err <= bound, f"{what} {name}: error {err:.3g} > {bound:.3g} (naive bf16 error {naive_err:.3g})"


def check_op(op, case: Case, dtype, backend, device="cpu", mask_weight_grad=False):
    """Compare op (run through `backend`) with the reference and the loop oracle."""
    inputs, scales = make_inputs(case, dtype, device)
    grad_out = torch.randn(case.num_tokens, case.d_out, generator=torch.Generator().manual_seed(1)).to(device)

    def run_op(*args):
        return op(*args, backend=backend)

    got = value_and_grads(run_op, inputs, grad_out, case.ranks, scales)
    oracle = value_and_grads(dumb_loop, inputs, grad_out, case.ranks, scales, dtype=torch.float64)
    reference = value_and_grads(lora_mixture_reference, inputs, grad_out, case.ranks, scales)
    if mask_weight_grad:  # grouped form: d/dweights only at active pairs (see grouped_lora.py)
        active = inputs[4] != 0
        oracle[-1] = oracle[-1] * active
        reference[-1] = reference[-1] * active
    for name, g, like in zip(GRAD_NAMES, got, [inputs[0], *inputs]):
        assert (g.dtype, g.shape, g.device) == (like.dtype, like.shape, like.device), name
    if dtype == torch.float32:
        assert_close_all(got, oracle, FP32_TOL, f"{case.name}/{backend} vs loop oracle")
        assert_close_all(got, reference, FP32_TOL, f"{case.name}/{backend} vs reference")
        assert_close_all(reference, oracle, FP32_TOL, f"{case.name} reference vs loop oracle")
    else:
        naive = value_and_grads(naive_bf16, inputs, grad_out, case.ranks, scales)
        if mask_weight_grad:
            naive[-1] = naive[-1] * (inputs[4] != 0)
        assert_bf16_within_naive(got, oracle, naive, f"{case.name}/{backend}")
        assert_bf16_within_naive(reference, oracle, naive, f"{case.name} reference")


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def test_noncontiguous_inputs_and_fp16():
    case = CASES[1]
    (y, x, a_cat, b_cat, weights), scales = make_inputs(case, torch.float16)
    x_strided = torch.stack([x, -x], dim=2).reshape(x.shape[0], -1)[:, ::2]  # x, column stride 2
    assert x_strided.stride(1) == 2 and torch.equal(x_strided, x)
    b_t = b_cat.t().contiguous().t()  # transposed layout
    want = lora_mixture_reference(y, x, a_cat, b_cat, weights, case.ranks, scales)
    for backend in ("torch", "triton") if triton_available() else ("torch",):
        got = lora_mixture(y, x_strided, a_cat, b_t, weights, case.ranks, scales, backend=backend)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # fp16: 11-bit mantissa


def test_frozen_inputs_get_no_grad():
    """Only the inputs that require grad get one (e.g. x from a frozen layer does not)."""
    case = CASES[1]
    (y, x, a_cat, b_cat, weights), scales = make_inputs(case, torch.float32)
    a_cat.requires_grad_()
    weights.requires_grad_()
    out = lora_mixture(y, x, a_cat, b_cat, weights, case.ranks, scales, backend="torch")
    d_a, d_w = torch.autograd.grad(out.sum(), (a_cat, weights))
    want = torch.autograd.grad(lora_mixture_reference(y, x, a_cat, b_cat, weights, case.ranks, scales).sum(),
                               (a_cat, weights))
    torch.testing.assert_close(d_a, want[0], **FP32_TOL)
    torch.testing.assert_close(d_w, want[1], **FP32_TOL)


def test_expand_column_scale_example():
    weights = torch.tensor([[0.3, 0.0]])
    got = expand_column_scale(weights, [1, 2], [2.0, 1.0])
    torch.testing.assert_close(got, torch.tensor([[0.6, 0.0, 0.0]]))


def test_errors_name_the_tensor_and_the_fix():
    case = CASES[1]
    (y, x, a_cat, b_cat, weights), scales = make_inputs(case, torch.float32)
    with pytest.raises(KernelError, match=r"a_cat has shape \(92, 71\), expected \(92, 72\)"):
        lora_mixture(y, x, a_cat[:, :71], b_cat, weights, case.ranks, scales)
    with pytest.raises(KernelError, match="weights has shape .* E=len\\(ranks\\)=4"):
        lora_mixture(y, x, a_cat, b_cat, weights[:, :3], case.ranks, scales)
    with pytest.raises(KernelError, match="x has shape .* must be 2-D. Flatten"):
        lora_mixture(y, x[None], a_cat, b_cat, weights, case.ranks, scales)
    with pytest.raises(KernelError, match="x has dtype torch.bfloat16 but y has torch.float32"):
        lora_mixture(y, x.bfloat16(), a_cat, b_cat, weights, case.ranks, scales)
    with pytest.raises(KernelError, match="one rank and one scale per expert"):
        lora_mixture(y, x, a_cat, b_cat, weights, case.ranks, scales[:-1])
    with pytest.raises(KernelError, match="backend='cuda' is not supported; choose one of"):
        lora_mixture(y, x, a_cat, b_cat, weights, case.ranks, scales, backend="cuda")


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(KernelError, match=f"{BACKEND_ENV}='fast' is not supported"):
        resolve_backend(None, torch.device("cpu"))
    monkeypatch.delenv(BACKEND_ENV)
    assert resolve_backend(None, torch.device("cpu")) == "torch"  # auto: CPU runs torch


def test_choose_form_docstring_examples_and_errors():
    assert choose_form([8] * 4, 8192, 0.1, torch.bfloat16, "cuda") == "dense"
    assert choose_form([64] * 8, 1024, 0.25, torch.float32, "cpu") == "grouped"
    assert choose_form([8] * 4, 1024, 1.0, torch.float32, "cpu") == "dense"  # all fire: no saving
    with pytest.raises(KernelError, match="activation_rate=1.5 must lie in"):
        choose_form([8], 16, 1.5, torch.float32, "cpu")


def _run_python(code: str, env_extra: dict) -> None:
    env = {**os.environ, **env_extra, "PYTHONPATH": REPO_ROOT}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch\n"
        "from moa_fx.errors import KernelError\n"
        "from moa_fx.kernels import lora_mixture, grouped_lora\n"
        "y, x, w = torch.randn(3, 4), torch.randn(3, 5), torch.rand(3, 2)\n"
        "a, b = torch.randn(6, 5), torch.randn(4, 6)\n"
        "lora_mixture(y, x, a, b, w, [2, 4], [1.0, 0.5]); grouped_lora(y, x, a, b, w, [2, 4], [1.0, 0.5])\n"
        "try:\n"
        "    lora_mixture(y, x, a, b, w, [2, 4], [1.0, 0.5], backend='triton')\n"
        "except KernelError as e:\n"
        "    assert 'needs the triton package' in str(e)\n"
        "else:\n"
        "    raise AssertionError('expected KernelError')\n"
    )
    _run_python(code, {})


@needs_triton
def test_triton_interpret_env_set_before_import():
    """TRITON_INTERPRET=1 before import (kernels become interpreted functions) also works."""
    code = (
        "import torch\n"
        "from moa_fx.kernels import lora_mixture, grouped_lora, lora_mixture_reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "y, x, w = torch.randn(5, 24, generator=g), torch.randn(5, 20, generator=g), torch.rand(5, 2, generator=g)\n"
        "a, b = torch.randn(12, 20, generator=g), torch.randn(24, 12, generator=g)\n"
        "want = lora_mixture_reference(y, x, a, b, w, [4, 8], [1.0, 0.5])\n"
        "for op in (lora_mixture, grouped_lora):\n"
        "    torch.testing.assert_close(op(y, x, a, b, w, [4, 8], [1.0, 0.5], backend='triton'), want)\n"
    )
    _run_python(code, {"TRITON_INTERPRET": "1"})


# --- torch.compile ---------------------------------------------------------------------------


def compile_and_check(op, op_overload, backend="aot_eager"):
    """fullgraph compile of a tiny function around `op`: one graph with the op as one node,
    eager-equal output and grads, and no recompile when a different set of experts fires."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    case = CASES[2]
    ranks, counter = list(case.ranks), CompileCounterWithBackend(backend)

    def step(y, x, a_cat, b_cat, weights, scales):
        return torch.tanh(op(y, x, a_cat, b_cat, weights, ranks, scales)) * 2.0

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for seed, pattern in enumerate(("mixed", "all_fire", "idle_expert")):
        inputs, scales = make_inputs(Case("c", 19, 72, 40, case.ranks, pattern), torch.float32, seed=seed)
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = compiled(*leaves, scales)
        grads = torch.autograd.grad(out.sum(), leaves)
        want_leaves = [t.clone().requires_grad_() for t in inputs]
        want = step(*want_leaves, scales)
        want_grads = torch.autograd.grad(want.sum(), want_leaves)
        torch.testing.assert_close(out, want, **FP32_TOL)
        for name, g, w in zip(GRAD_NAMES[1:], grads, want_grads):
            torch.testing.assert_close(g, w, **FP32_TOL, msg=lambda m: f"{name}: {m}")
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    (graph,) = counter.graphs
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert targets.count(op_overload) == 1, targets


def test_compile_fullgraph_one_node_no_recompile():
    compile_and_check(lora_mixture, torch.ops.moa_fx.lora_mixture.default)


def test_compile_inductor_both_ops_match_eager():
    """Inductor (CPU) keeps both ops as fallback nodes and traces their fakes and backwards;
    one small graph because each inductor compile costs ~10 s of C++ build on CPU."""
    from moa_fx.kernels import grouped_lora

    torch._dynamo.reset()
    case = Case("tiny", 5, 20, 24, (4, 8), "mixed")
    inputs, scales = make_inputs(case, torch.float32)

    def step(y, x, a_cat, b_cat, weights):
        mid = lora_mixture(y, x, a_cat, b_cat, weights, case.ranks, scales)
        return grouped_lora(mid, x, a_cat, b_cat, weights, case.ranks, scales).sigmoid()

    compiled = torch.compile(step, fullgraph=True)
    got = value_and_grads(lambda *a: compiled(*a[:5]), inputs, torch.ones(5, 24), case.ranks, scales)
    want = value_and_grads(lambda *a: step(*a[:5]), inputs, torch.ones(5, 24), case.ranks, scales)
    assert_close_all(got, want, FP32_TOL, "inductor vs eager")
