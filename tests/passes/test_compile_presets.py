"""Every preset's rewritten graph (lowered and fused, the default pipeline) compiles with
``fullgraph=True`` and matches eager, forward and gradients.

Dynamo with the ``eager`` backend: it traces the whole graph (fullgraph=True raises on a graph break
or a data-dependent shape) without AOTAutograd and Inductor's C++ build, which tests/test_runtime.py
exercises (custom-op backwards included) on two specs.
"""

from __future__ import annotations

import pytest
import torch

from moa_fx import transform
from moa_fx.spec import presets
from tiny import randomize_adapters, slow_except, tokens


# the default run compiles one preset of each kind of graph (no router, per-site top-k and threshold with
# the fused dropout op, shared A, block router with prompt and adapter, threshold MoA); the rest are `slow`
DEFAULT_RUN = ("lora", "adamole", "hydralora", "soft_moa", "sparse_moa")


@pytest.mark.parametrize("name", slow_except(list(presets.PRESETS), DEFAULT_RUN))
def test_preset_compiles_fullgraph_and_matches_eager(llama, name):
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    moa = transform(llama, name)
    randomize_adapters(moa, std=0.1)
    moa.eval()  # dropout off: eager and compiled see the same inputs
    compiled = torch.compile(moa, backend="eager", fullgraph=True, dynamic=True)
    params = [p for p in moa.parameters() if p.requires_grad]
    for seed, (batch, seq) in enumerate([(2, 7), (3, 5)]):  # another shape: no recompile (dynamic)
        ids = tokens(batch, seq, seed=seed)
        want = moa(input_ids=ids, labels=ids)
        got = compiled(input_ids=ids, labels=ids)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(got.loss, params, allow_unused=True, materialize_grads=True)
        want_grads = torch.autograd.grad(want.loss, params, allow_unused=True, materialize_grads=True)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
