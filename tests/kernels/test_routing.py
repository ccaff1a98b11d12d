"""moa_fx::route (moa_fx/kernels/routing.py): a router's selection math as one op.

The op (forced: the custom op is called, as under compile) is compared with the plain functions
``route``, ``balance_loss`` and ``router_stats`` under torch autograd (the path plain eager takes, and
the equations of METHODS.md): the weights, the stats, the balance loss, and the gradients of the logits
and τ, for every gate, selection and rule the presets use, fp32 and bf16, on random data with some
tokens whose selection is empty (the renormalisation's zero-sum case).
"""

from __future__ import annotations

import pytest
import torch

from moa_fx.kernels.routing import _route_op, balance_loss, route, router_stats, routing

# (gate, select, top_k, threshold, rule, renormalize, learned τ, aux)
CONFIGS = {
    "adamole": ("softmax", "threshold", 0, 0.0, "adamole", True, True, True),
    "adamole_no_renorm": ("softmax", "threshold", 0, 0.0, "adamole", False, True, False),
    "mole_topk": ("softmax", "topk", 2, 0.0, "moa", True, False, True),
    "soft_dense": ("softmax", "dense", 0, 0.0, "moa", False, False, False),
    "sparse_moa_fixed": ("sigmoid", "threshold", 0, 0.5, "moa", False, False, False),
    "sparse_moa_learned": ("sigmoid", "threshold", 0, 0.0, "moa", True, True, True),
    "sigmoid_topk": ("sigmoid", "topk", 3, 0.0, "moa", False, False, True),
}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _inputs(config, dtype, tokens=(3, 17), experts=6, seed=0):
    gate, select, *_rest, learned, _aux = config
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*tokens, experts, generator=gen) * 2).to(dtype).requires_grad_()
    tau = None
    if learned:
        # τ around 1/E: some tokens select several experts, some none (softmax: p − τ < 0 everywhere)
        scale = 1.0 / experts if gate == "softmax" else 0.6
        tau = (scale * (0.5 + torch.rand(*tokens, 1, generator=gen) * 1.5)).to(dtype)
        tau[0, :4] = 1.5  # above every gate: nothing selected at those tokens
        tau.requires_grad_()
    return logits, tau


def _plain(config, logits, tau):
    gate, select, top_k, threshold, rule, renorm, _learned, aux = config
    w, sel, q, g = route(logits, tau, gate, select, top_k, threshold, rule, renorm)
    return w, router_stats(g, sel, tau), (balance_loss(sel, q) if aux else None)


def _op(config, logits, tau):
    gate, select, top_k, threshold, rule, renorm, _learned, aux = config
    w, stats, loss = _route_op(logits, tau, gate, select, top_k, threshold, rule, renorm, aux)
    return w, stats, (loss if aux else None)


def _grads(fn, config, logits, tau, probe_w, probe_aux):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (logits, tau)]
    w, stats, loss = fn(config, *leaves)
    total = (w.float() * probe_w).sum() + (loss * probe_aux if loss is not None else 0)
    total.backward()
    return (w, stats, loss), [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_route_op_equals_the_plain_functions_forward_and_backward(name, dtype):
    config = CONFIGS[name]
    logits, tau = _inputs(config, dtype)
    gen = torch.Generator().manual_seed(1)
    probe_w = torch.randn(logits.shape, generator=gen)
    probe_aux = 0.7
    (w0, s0, l0), (dl0, dt0) = _grads(_plain, config, logits, tau, probe_w, probe_aux)
    (w1, s1, l1), (dl1, dt1) = _grads(_op, config, logits, tau, probe_w, probe_aux)
    assert w1.dtype == w0.dtype and w1.shape == w0.shape
    assert torch.equal(w1, w0) and torch.equal(s1.nan_to_num(-1), s0.nan_to_num(-1))  # the same functions
    if l0 is not None:
        assert torch.equal(l1, l0)
    assert dl0 is not None and dl0.abs().sum() > 0, "the probe must reach the logits"
    if dtype == torch.float32:
        torch.testing.assert_close(dl1, dl0, rtol=1e-5, atol=1e-6)
        if dt0 is None:
            assert dt1 is None, "τ only selects under this rule: no gradient, as in plain autograd"
        else:
            assert dt0.abs().sum() > 0
            torch.testing.assert_close(dt1, dt0, rtol=1e-5, atol=1e-6)
        return
    # bf16: the op's backward is fp32 math, autograd's runs in bf16. Against the fp32 gradients of the
    # same (bf16-valued) inputs, the op's error is at most autograd's (and the selections agree)
    up = [t.detach().float() if t is not None else None for t in (logits, tau)]
    assert torch.equal(route(*up, *config[:6])[1], route(logits, tau, *config[:6])[1])
    _, (dl_ref, dt_ref) = _grads(_plain, config, *up, probe_w, probe_aux)
    for got, plain, ref in ((dl1, dl0, dl_ref), (dt1, dt0, dt_ref)):
        if ref is None:
            assert got is None and plain is None
            continue
        err_op = (got.float() - ref).abs().max()
        err_plain = (plain.float() - ref).abs().max()
        assert err_op <= err_plain + 1e-3 * ref.abs().max(), (err_op, err_plain)


def test_the_renormalisation_zero_sum_case_is_exercised():
    """The inputs above hold tokens with nothing selected, where the renormalisation divides by 1."""
    config = CONFIGS["adamole"]
    logits, tau = _inputs(config, torch.float32)
    w, sel, _q, _g = route(logits, tau, *config[:6])
    assert (sel.sum(-1) == 0).any() and (sel.sum(-1) > 1).any()
    assert torch.equal(w[sel.sum(-1) == 0], torch.zeros_like(w[sel.sum(-1) == 0]))


def test_plain_eager_runs_the_functions_and_compile_sees_one_op():
    """Eager on real tensors: no custom op (bit for bit the plain functions); under make_fx (as under
    compile and export) the graph holds moa_fx::route and its backward moa_fx::route_backward."""
    from torch.fx.experimental.proxy_tensor import make_fx

    config = CONFIGS["adamole"]
    logits, tau = _inputs(config, torch.float32)
    w, stats, loss = routing(logits, tau, *config[:6], config[7])
    assert w.grad_fn is not None and "route" not in type(w.grad_fn).__name__.lower()

    def step(lg, t):
        w, _stats, aux = routing(lg, t, *config[:6], config[7])
        return torch.autograd.grad((w.sum() + aux,), (lg, t))

    graph = make_fx(step)(logits.detach().requires_grad_(), tau.detach().requires_grad_())
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert {"moa_fx.route.default", "moa_fx.route_backward.default"} <= targets
    assert "aten._softmax.default" not in targets


@pytest.mark.parametrize("name", ["adamole", "sparse_moa_learned", "mole_topk", "sparse_moa_fixed"])
def test_route_op_passes_opcheck(name):
    config = CONFIGS[name]
    logits, tau = _inputs(config, torch.float32)
    gate, select, top_k, threshold, rule, renorm, _learned, aux = config
    # without τ the stats end in NaN (no mean τ), which opcheck's output comparison takes as a mismatch
    tests = ("test_schema", "test_faketensor") + (("test_aot_dispatch_dynamic",) if tau is not None else ())
    torch.library.opcheck(_route_op, (logits, tau, gate, select, top_k, threshold, rule, renorm, aux), test_utils=tests)
