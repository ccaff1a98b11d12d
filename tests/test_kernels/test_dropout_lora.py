"""moa_fx::dropout_lora and its counter-based mask (moa_fx/kernels/dropout_mask.py).

The op is compared, output and every gradient (y, x, a_cat, b_cat, weights; and z when the
shared GEMM's z is given), with ``dropout_lora_reference``: the masks materialised by
``explicit_masks`` and the plain equations by autograd. The mask itself is checked for its keep rate
(binomial bounds), its independence across experts, seeds and neighbouring positions, and for being
the same in forward and backward without being stored. Shapes and tolerances: test_lora_mixture.py's.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from moa_fx.errors import KernelError
from moa_fx.kernels import dropout_lora, dropout_lora_reference, lora_expand, lora_mixture
from moa_fx.kernels import native
from moa_fx.kernels.dropout_lora import _dropout_lora_op, site_drops
from moa_fx.kernels.dropout_mask import MASK32, drop_positions, explicit_masks, mix32, row_drops, stream_keys
from moa_fx.kernels.reference import lora_mixture_reference

from .test_lora_mixture import CASES, FP32_TOL, assert_bf16_within_naive, assert_close_all, make_inputs, needs_triton

dropout_lora_module = importlib.import_module("moa_fx.kernels.dropout_lora")  # the package exports the function
Z_SIGMAS = 5.0  # binomial bounds: |observed − expected| < 5σ (a false alarm about once in 1.7 million runs)
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture(params=["native", "torch"])
def correction_path(request, monkeypatch):
    """The CPU correction under test: the C loop (dropout_cpu.c) or the torch index arithmetic."""
    if request.param == "torch":
        monkeypatch.setattr(dropout_lora_module, "_native_library", lambda: None)
    elif dropout_lora_module._native_library() is None:
        pytest.skip("no C compiler here: the native loop cannot be built (the torch path is tested)")
    return request.param


def _ps(num_experts: int) -> list[float]:
    return [(0.05, 0.3, 0.5, 0.1)[e % 4] for e in range(num_experts)]  # distinct, so a wrong expert's mask shows


def _seed(value: int = 987654321987) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64)


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


def _naive_bf16(y, x, a_cat, b_cat, weights, seed, ranks, scales, ps):
    """The equations with every step in bf16 (masks applied in bf16): the error yardstick."""
    masks = explicit_masks(seed, ps, x.shape[0], x.shape[1]).to(x.dtype)
    out, start = y, 0
    for e, (rank, p) in enumerate(zip(ranks, ps)):
        cols = slice(start, start + rank)
        start += rank
        z = (x * masks[e] / (1 - p)) @ a_cat[cols].t()
        out = out + (z * (weights[:, e:e + 1] * scales[e])) @ b_cat[:, cols].t()
    return out


# --- the op against the explicit-mask reference ------------------------------------------------


@pytest.mark.parametrize("given_z", [False, True], ids=["x_in", "z_given"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES[1:], ids=lambda c: c.name)
def test_op_matches_explicit_masks_forward_and_every_gradient(case, dtype, given_z, correction_path):
    inputs, scales = make_inputs(case, dtype)
    ranks, ps, seed = list(case.ranks), _ps(len(case.ranks)), _seed()
    grad_out = torch.randn(case.num_tokens, case.d_out, generator=torch.Generator().manual_seed(1))

    def op(y, x, a, b, w):
        z = x @ a.t() if given_z else None  # the shared GEMM's piece: its gradient reaches x and a_cat
        return dropout_lora(y, x, a, b, w, seed, ranks, scales, ps, z=z, backend="torch")

    def reference(y, x, a, b, w):
        return dropout_lora_reference(y, x, a, b, w, seed, ranks, scales, ps)

    got = _grads(op, inputs, grad_out)
    oracle = _grads(reference, [t.to(torch.float64) for t in inputs], grad_out.double())
    active = inputs[4] != 0
    oracle[-1] = oracle[-1] * active  # d/dweights only where an expert fires (see dropout_lora)
    assert torch.count_nonzero(got[-1][~active]) == 0
    for g, like in zip(got, [inputs[0], *inputs]):
        assert (g.dtype, g.shape) == (like.dtype, like.shape)
    if dtype == torch.float32:
        assert_close_all(got, oracle, FP32_TOL, f"{case.name} vs explicit masks")
    else:
        naive = _grads(lambda *t: _naive_bf16(*t, seed, ranks, scales, ps), inputs, grad_out)
        naive[-1] = naive[-1] * active
        assert_bf16_within_naive(got, oracle, naive, case.name)


def test_gradient_of_the_given_z_is_the_dense_part():
    case = CASES[1]
    (y, x, a_cat, b_cat, w), scales = make_inputs(case, torch.float32)
    ranks, ps, seed = list(case.ranks), _ps(4), _seed(5)
    z = (x @ a_cat.t()).requires_grad_()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (dz,) = torch.autograd.grad(dropout_lora(y, x, a_cat, b_cat, w, seed, ranks, scales, ps, z=z), (z,), g)
    # out is linear in z with slope C/(1 − p) then B: dz = (g·B_cat) ⊙ C / (1 − p) column by column
    keep = torch.tensor([1 / (1 - p) for p, r in zip(ps, ranks) for _ in range(r)])
    gate = torch.cat([w[:, e:e + 1].expand(-1, r) * scales[e] for e, r in enumerate(ranks)], dim=1)
    torch.testing.assert_close(dz, (g @ b_cat) * gate * keep, **FP32_TOL)
    assert dz.abs().max() > 0


@pytest.mark.parametrize("given_z", [False, True], ids=["x_in", "z_given"])
def test_p_zero_is_the_op_without_dropout_exactly(given_z):
    case = CASES[1]
    inputs, scales = make_inputs(case, torch.float32)
    ranks, zeros = list(case.ranks), [0.0] * len(case.ranks)
    g = torch.randn(case.num_tokens, case.d_out, generator=torch.Generator().manual_seed(2))

    def with_dropout(y, x, a, b, w):
        return dropout_lora(y, x, a, b, w, _seed(), ranks, scales, zeros, z=(x @ a.t()) if given_z else None)

    def without(y, x, a, b, w):
        return lora_expand(y, x @ a.t(), b, w, ranks, scales) if given_z else lora_mixture(y, x, a, b, w, ranks, scales)

    for got, want in zip(_grads(with_dropout, inputs, g), _grads(without, inputs, g)):
        assert torch.equal(got, want)
    # the op's own path with no drops (not only the wrapper's shortcut) is the reference bit for bit
    y, x, a_cat, b_cat, w = inputs
    inner = _dropout_lora_op(y, None, x, a_cat, b_cat, w, _seed(), ranks, scales, zeros, "torch")[0]
    assert torch.equal(inner, lora_mixture_reference(y, x, a_cat, b_cat, w, ranks, scales))


def test_backward_regenerates_the_mask_instead_of_saving_it(correction_path):
    """Autograd keeps the op's inputs and the (T, R) z_drop only (x, not E dropped copies, and no mask),
    and the backward's regenerated masks are the forward's: the gradients match the explicit-mask reference."""
    case = CASES[3]  # every expert fires
    inputs, scales = make_inputs(case, torch.float32)
    leaves = [t.clone().requires_grad_() for t in inputs]
    ranks, ps = list(case.ranks), _ps(len(case.ranks))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = dropout_lora(*leaves, _seed(), ranks, scales, ps)
    # x, a_cat, b_cat, weights, seed and z_drop: nothing of x's size beyond x itself
    z_drop = case.num_tokens * sum(ranks)
    assert sum(t.numel() for t in saved) <= sum(t.numel() for t in inputs[1:]) + 1 + z_drop
    assert sum(t.numel() == inputs[1].numel() for t in saved) == 1
    got = torch.autograd.grad(out.sum(), leaves)
    want_leaves = [t.clone().requires_grad_() for t in inputs]
    want = torch.autograd.grad(dropout_lora_reference(*want_leaves, _seed(), ranks, scales, ps).sum(), want_leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **FP32_TOL)


def test_masks_are_drawn_only_where_an_expert_fires():
    case = CASES[2]  # expert 2 gets no token
    (_, x, _, _, w), _ = make_inputs(case, torch.float32)
    drops = site_drops(_seed(), [0.5] * 4, w, x.shape[1])
    assert drops[2].flat.numel() == 0 and drops[0].flat.numel() > 0
    for e, d in enumerate(drops):
        assert (w[d.token, e] != 0).all()
        assert torch.equal(d.flat, d.token * x.shape[1] + d.feature) and (d.feature < x.shape[1]).all()


def test_native_and_torch_corrections_agree_at_a_larger_size(monkeypatch):
    """The C loop's drops are the torch streams' (same count, same sums), at a size where a wrong gap
    table bucket or position carry would show: 300 tokens × 96 features, eight experts, rates to 0.7."""
    if dropout_lora_module._native_library() is None:
        pytest.skip("no C compiler here")
    g = torch.Generator().manual_seed(11)
    x, a = torch.randn(300, 96, generator=g), torch.randn(16, 96, generator=g)
    w = torch.rand(300, 8, generator=g)
    w = w * (w > 0.3)
    ps, ranks, u = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.05], [2] * 8, torch.randn(300, 16, generator=g)

    def corrections():
        corr = dropout_lora_module._Corrections(_seed(3), ps, w, x, ranks)
        dx, da = torch.randn(300, 96, generator=torch.Generator().manual_seed(1)), torch.zeros(16, 96)
        corr.backward(u, a, dx, da)
        return corr.forward(a), dx, da

    native_out = corrections()
    monkeypatch.setattr(dropout_lora_module, "_native_library", lambda: None)
    for got, want in zip(native_out, corrections()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert want.abs().max() > 0


def test_native_build_failure_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("MOA_FX_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-moa-fx")
    monkeypatch.setattr(native, "_LOADED", {})
    with pytest.warns(RuntimeWarning, match="no C compiler 'no-such-compiler-moa-fx'.*set \\$CC"):
        assert native.library("dropout_cpu") is None
    assert not any(tmp_path.rglob("*.so"))
    monkeypatch.setenv("CC", "false")  # a compiler that runs and fails: its temporary file must go
    monkeypatch.setattr(native, "_LOADED", {})
    with pytest.warns(RuntimeWarning, match="'false -O3.*' failed on dropout_cpu.c"):
        assert native.library("dropout_cpu") is None
    assert (tmp_path / "native").is_dir() and not any(p.is_file() for p in tmp_path.rglob("*"))
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    monkeypatch.setattr(native, "_LOADED", {})
    assert native.library("dropout_cpu") is None  # turned off: no build, no warning


# --- the mask ------------------------------------------------------------------------------------


def _mix32_uint32(h: int) -> int:
    """mix32 in Python's exact integers, wrapping every product at 32 bits as uint32 does."""
    h ^= h >> 16
    h = (h * 0x7FEB352D) & MASK32
    h ^= h >> 15
    h = (h * 0x68E31DA5) & MASK32
    return h ^ (h >> 16)


def test_mix32_in_int64_equals_uint32_arithmetic():
    values = [0, 1, 2, 12345, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 2, 2 ** 32 - 1]
    values += torch.randint(0, 2 ** 32, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    got = mix32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [_mix32_uint32(v) for v in values]
    assert all(0 <= v <= MASK32 for v in got)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_keep_rate_within_five_sigma(p):
    n = 200_000
    kept = explicit_masks(_seed(11), [p], n // 100, 100).sum().item()
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < Z_SIGMAS * sigma, (kept / n, 1 - p)


def test_masks_are_independent_across_experts_seeds_and_neighbours():
    """Two experts (or two seeds) both drop a position with probability p², and a drop tells nothing
    about the next position: every count is within 5σ of its binomial expectation."""
    p, tokens, d = 0.3, 500, 64
    n = tokens * d
    drop = 1 - explicit_masks(_seed(3), [p, p, p], tokens, d).reshape(3, -1)
    other_seed = 1 - explicit_masks(_seed(4), [p], tokens, d).reshape(-1)

    def within(count, prob, trials):
        assert abs(count - prob * trials) < Z_SIGMAS * math.sqrt(trials * prob * (1 - prob)), (count / trials, prob)

    within((drop[0] * drop[1]).sum().item(), p * p, n)
    within((drop[1] * drop[2]).sum().item(), p * p, n)
    within((drop[0] * other_seed).sum().item(), p * p, n)
    within((drop[0, 1:] * drop[0, :-1]).sum().item(), p * p, n - 1)
    within((drop[0, d:] * drop[0, :-d]).sum().item(), p * p, n - d)  # the same feature, next token
    assert not torch.equal(drop[0], drop[1]) and not torch.equal(drop[0], other_seed)


def test_same_seed_same_mask_and_a_token_mask_does_not_depend_on_the_token_count():
    key = stream_keys(_seed(8), 2)[1]
    short, long = drop_positions(key, 0.2, 1000), drop_positions(key, 0.2, 5000)
    assert torch.equal(short, long[long < 1000])
    assert torch.equal(long, drop_positions(stream_keys(_seed(8), 2)[1], 0.2, 5000))
    assert (torch.diff(long) > 0).all() and long.min() >= 0 and long.max() < 5000


def test_experts_without_dropout_beside_experts_with_it(correction_path):
    """p = 0 for two of four experts: those take the plain x, the others their masks (explicit reference)."""
    case = CASES[3]
    inputs, scales = make_inputs(case, torch.float32)
    ranks, ps = list(case.ranks), [0.0, 0.3, 0.0, 0.5][:len(case.ranks)]
    g = torch.randn(case.num_tokens, case.d_out, generator=torch.Generator().manual_seed(4))
    got = _grads(lambda *t: dropout_lora(*t, _seed(), ranks, scales, ps), inputs, g)
    want = _grads(lambda *t: dropout_lora_reference(*t, _seed(), ranks, scales, ps), inputs, g)
    want[-1] = want[-1] * (inputs[4] != 0)
    assert_close_all(got, want, FP32_TOL, "mixed rates vs explicit masks")


def test_a_rate_too_small_for_the_positions_is_refused():
    from moa_fx.errors import SpecError
    from moa_fx.spec import LoraExpert

    # the spec refuses what the op would: the same smallest rate in both places
    assert LoraExpert(at=("@q",), r=4, alpha=8, dropout=dropout_lora_module.MIN_RATE).dropout > 0
    with pytest.raises(SpecError, match="at least 1e-12"):
        LoraExpert(at=("@q",), r=4, alpha=8, dropout=dropout_lora_module.MIN_RATE / 10)
    (y, x, a_cat, b_cat, w), scales = make_inputs(CASES[1], torch.float32)
    with pytest.raises(KernelError, match=r"rate in \(0, 1e-12\); use 0"):
        dropout_lora(y, x, a_cat, b_cat, w, _seed(), list(CASES[1].ranks), scales, [1e-19] * len(CASES[1].ranks))


def test_row_drops_refuses_a_stream_that_would_never_end():
    key = stream_keys(_seed(9), 1)
    for log_keep in (0.0, float("nan")):  # p = 0 never passes n; NaN compares false
        with pytest.raises(KernelError, match="log_keep < 0"):
            row_drops(key, torch.tensor([log_keep], dtype=torch.float64), 100)
    with pytest.raises(KernelError, match="chunk = 0 must be >= 1"):
        row_drops(key, torch.tensor([math.log1p(-0.1)], dtype=torch.float64), 100, chunk=0)


def test_a_stream_longer_than_one_chunk_is_extended_without_changing_it():
    key = stream_keys(_seed(9), 1)[0]
    assert torch.equal(drop_positions(key, 0.1, 4000, chunk=7), drop_positions(key, 0.1, 4000))


# --- Triton, compile, errors ---------------------------------------------------------------------


@needs_triton
def test_triton_path_draws_the_same_mask_as_torch():
    """backend="triton" (the interpreter on CPU, tiny sizes) runs lora_expand's kernel on the same
    dropped z; forward and gradients equal the torch path's."""
    case = CASES[1]
    inputs, scales = make_inputs(case, torch.float32)
    ranks, ps = list(case.ranks), _ps(4)
    g = torch.randn(case.num_tokens, case.d_out, generator=torch.Generator().manual_seed(6))
    runs = [_grads(lambda *t, b=b: dropout_lora(*t, _seed(), ranks, scales, ps, backend=b), inputs, g)
            for b in ("triton", "torch")]
    assert_close_all(runs[0], runs[1], FP32_TOL, "triton vs torch")


def test_compiles_fullgraph_as_one_node_and_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    case = CASES[1]
    inputs, scales = make_inputs(case, torch.float32)
    ranks, ps, counter = list(case.ranks), _ps(4), CompileCounterWithBackend("aot_eager")

    def step(y, x, a, b, w, seed):
        return torch.tanh(dropout_lora(y, x, a, b, w, seed, ranks, scales, ps))

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for value in (1, 2):
        got = _grads(lambda *t: compiled(*t, _seed(value)), inputs, torch.ones(case.num_tokens, case.d_out))
        want = _grads(lambda *t: step(*t, _seed(value)), inputs, torch.ones(case.num_tokens, case.d_out))
        assert_close_all(got, want, FP32_TOL, f"compiled, seed {value}")
    assert counter.frame_count == 1
    targets = [n.target for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.moa_fx.dropout_lora.default) == 1


def test_errors_name_the_problem_and_the_fix():
    case = CASES[1]
    (y, x, a, b, w), scales = make_inputs(case, torch.float32)
    ranks = list(case.ranks)
    with pytest.raises(KernelError, match=r"ps = \[0.1, 1.0, 0.1, 0.1\] must hold one dropout probability in \[0, 1\)"):
        dropout_lora(y, x, a, b, w, _seed(), ranks, scales, [0.1, 1.0, 0.1, 0.1])
    with pytest.raises(KernelError, match="one dropout probability .* per expert"):
        dropout_lora(y, x, a, b, w, _seed(), ranks, scales, [0.1])
    with pytest.raises(KernelError, match=r"seed must be one int64 value .* torch.randint\(0, 2\*\*62, \(\)\)"):
        dropout_lora(y, x, a, b, w, torch.tensor(1.0), ranks, scales, _ps(4))
    with pytest.raises(KernelError, match="z must be x @ a_cat.T"):
        dropout_lora(y, x, a, b, w, _seed(), ranks, scales, _ps(4), z=x)
