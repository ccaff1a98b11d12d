"""The causal-attention rewrite (moa_fx.derive.causal_attention): a call without an attention mask
runs SDPA with ``is_causal=True`` instead of the causal mask the capture materialised, and computes
the same as a call with an all-ones mask; masks that are not provably the lower triangle stay."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from moa_fx import transform
from moa_fx.derive import causal_attention
from tiny import padded_tokens, randomize_adapters, tiny_model, tokens

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def _sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is SDPA]


def _toy(compare: str, offset: int | None = None) -> fx.GraphModule:
    """SDPA over (q, k, v) with a mask ``kv_idx <compare> q_idx`` (+ ``offset`` subtracted from q_idx)
    built from input_ids' length, the way transformers builds one under tracing."""
    g = fx.Graph()
    ids, mask = g.placeholder("input_ids"), g.placeholder("attention_mask")
    q, k, v = (g.placeholder(n) for n in "qkv")
    ids.meta["val"] = torch.zeros(2, 5, dtype=torch.long)
    mask.meta["val"] = torch.ones(2, 5, dtype=torch.long)
    seq = g.call_function(aten.sym_size.int, (ids, 1))
    r = g.call_function(aten.arange.default, (seq,))
    rq = g.call_function(aten.unsqueeze.default, (r, 1))
    if offset is not None:
        rq = g.call_function(aten.sub.Tensor, (rq, offset))
    rk = g.call_function(aten.unsqueeze.default, (r, 0))
    m = g.call_function(getattr(aten, compare).Tensor, (rk, rq))
    m = g.call_function(aten.unsqueeze.default, (g.call_function(aten.unsqueeze.default, (m, 0)), 0))
    g.output((g.call_function(SDPA, (q, k, v), {"attn_mask": m}),))
    return fx.GraphModule(torch.nn.Module(), g)


def test_a_lower_triangle_mask_becomes_is_causal_with_the_same_result():
    gm = _toy("le")
    new = causal_attention(gm)
    assert new is not gm
    (node,) = _sdpa_nodes(new)
    assert node.kwargs["is_causal"] is True and node.kwargs["attn_mask"] is None
    assert not any(n.target is aten.le.Tensor for n in new.graph.nodes), "the mask nodes are dead code"
    torch.manual_seed(0)
    ids = torch.zeros(3, 11, dtype=torch.long)
    q, k, v = (torch.randn(3, 2, 11, 8) for _ in range(3))
    torch.testing.assert_close(new(ids, torch.ones_like(ids), q, k, v)[0], gm(ids, torch.ones_like(ids), q, k, v)[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("compare, offset", [("ge", None), ("lt", None), ("le", 2)],
                         ids=["upper triangle", "strict lower triangle", "sliding (a subtraction)"])
def test_a_mask_that_is_not_the_causal_one_stays(compare, offset):
    gm = _toy(compare, offset)
    assert causal_attention(gm) is gm


def test_a_graph_without_the_mask_input_is_returned_as_is():
    gm = _toy("le")
    assert causal_attention(gm, mask_input="padding_mask") is gm


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_call_without_a_mask_runs_the_rewritten_graph_and_trains_the_same(family):
    moa = transform(tiny_model(family), "sparse_moa")
    randomize_adapters(moa)
    moa.train()
    ids = tokens(2, 9)
    params = [p for p in moa.parameters() if p.requires_grad]

    def loss_and_grads(**kw):
        loss = moa(input_ids=ids, labels=ids, **kw).loss
        return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

    loss_a, grads_a = loss_and_grads()
    loss_b, grads_b = loss_and_grads(attention_mask=torch.ones_like(ids))
    hows = [how for key, how, _ in moa.derivations if key.endswith("/causal")]
    assert len(hows) == 1 and hows[0].endswith(": causal_attention")
    causal = moa.derived(causal=True).gm
    assert all(n.kwargs.get("is_causal") is True for n in _sdpa_nodes(causal)) and _sdpa_nodes(causal)
    assert all(n.kwargs.get("is_causal") is not True for n in _sdpa_nodes(moa.derived().gm))
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        assert (ga is None) == (gb is None)
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


def test_a_padded_mask_still_reads_the_mask():
    moa = transform(tiny_model("llama"), "sparse_moa")
    randomize_adapters(moa)
    moa.eval()
    ids, mask = padded_tokens(2, 9)
    padded = moa(input_ids=ids, attention_mask=mask).logits
    unmasked = moa(input_ids=ids).logits
    pads = ~mask.bool()  # right padding changes only the padded positions (they no longer see the pads)
    torch.testing.assert_close(padded[~pads], unmasked[~pads], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(padded[pads], unmasked[pads], atol=1e-4), "the mask must be read"


def test_a_sliding_window_model_keeps_its_mask():
    moa = transform(tiny_model("mistral", sliding_window=4), "sparse_moa")
    moa.eval()
    assert moa.derived(causal=True).gm is moa.derived().gm


def test_a_compiled_call_without_a_mask_has_no_graph_break():
    """The causal graph is derived with the forward graph, so a compiled forward never derives one
    (``_derive`` is ``torch.compiler.disable``d: deriving inside a compiled call breaks the graph)."""
    moa = transform(tiny_model("llama"), "sparse_moa")
    moa.train()
    assert any(key.endswith("/causal") for key, _, _ in moa.derivations)
    torch._dynamo.reset()
    compiled = torch.compile(moa, backend="eager", fullgraph=True)  # fullgraph: a break raises
    ids = tokens(2, 9)
    loss = compiled(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, moa(input_ids=ids, labels=ids).loss, rtol=1e-6, atol=1e-6)
