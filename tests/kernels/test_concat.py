"""moa_fx::concat: a site's expert weights as one matrix, opaque to Inductor.

It must be ``torch.cat([p.to(dtype)…], dim)`` exactly, forward and backward (each part's gradient
in its own dtype), through every way it runs: plain eager (no dispatcher), the custom op (what
tracing and compile see; ``torch.library.opcheck`` checks its fake and autograd), and a
fullgraph compile, in which it stays one node.
"""

from __future__ import annotations

import pytest
import torch

from moa_fx.errors import KernelError
from moa_fx.kernels import concat

SHAPES = [  # (dim, the parts' shapes)
    (0, [(4, 6), (2, 6), (8, 6)]),  # A_e stacked by rank: (r_e, d_in)
    (1, [(6, 4), (6, 2)]),  # B_e side by side: (d_out, r_e)
    (0, [(3, 5)]),  # one expert
    (-1, [(2, 3, 1), (2, 3, 4)]),
]


def _parts(shapes, dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dt).requires_grad_() for s, dt in zip(shapes, dtypes)]


def _grads(fn, parts, dtype, seed=1):
    out = fn(parts)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return out.detach(), torch.autograd.grad(out, parts, g)


def _want(parts, dim, dtype):
    return torch.cat([p.to(dtype) for p in parts], dim=dim)


@pytest.mark.parametrize("mixed", [False, True], ids=["same-dtype", "mixed-dtypes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dim,shapes", SHAPES)
def test_equals_torch_cat_forward_and_backward(dim, shapes, dtype, mixed):
    dtypes = [torch.bfloat16 if mixed and i % 2 else torch.float32 for i in range(len(shapes))]
    want_out, want_grads = _grads(lambda p: _want(p, dim, dtype), _parts(shapes, dtypes), dtype)
    runs = {"eager": lambda p: concat(p, dim, dtype),
            "custom op": lambda p: torch.ops.moa_fx.concat(p, dim, dtype)}
    for name, fn in runs.items():
        out, grads = _grads(fn, _parts(shapes, dtypes), dtype)
        assert out.dtype == dtype and torch.equal(out, want_out), name
        for got, want, dt in zip(grads, want_grads, dtypes):
            assert got.dtype == dt and torch.equal(got, want), name


def test_opcheck():
    parts = _parts([(4, 6), (2, 6)], [torch.float32, torch.bfloat16])
    torch.library.opcheck(torch.ops.moa_fx.concat, (parts, 0, torch.float32))


def test_compiles_fullgraph_as_one_node_and_matches_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    parts = _parts([(4, 6), (2, 6)], [torch.float32, torch.float32])
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))

    def step(ps):
        return x @ concat(ps, 0, torch.float32).t()

    want_out, want_grads = _grads(step, parts, torch.float32)
    out, grads = _grads(torch.compile(step, backend=counter, fullgraph=True), parts, torch.float32)
    assert counter.frame_count == 1 and torch.equal(out, want_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))
    graph = counter.graphs[0]
    called = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
    assert any("moa_fx.concat" in c for c in called), called
    assert not any(c.endswith("cat") and "moa_fx" not in c for c in called), called


def test_refuses_no_parts():
    with pytest.raises(KernelError, match="at least one tensor"):
        concat([], 0, torch.float32)
