"""The lowering pass changes no number beyond rounding, and records its choice per site."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moa_fx import load_spec, transform
from moa_fx.graph import LOWERING_KEY
from moa_fx.ops import expand_lora_site, lowered_lora_site
from tiny import randomize_adapters, tiny_model, tokens

# presets with LoRA mixtures (the others have nothing to lower)
LOWERABLE = ("lora", "mole_topk", "adamole", "hydralora", "soft_moa", "sparse_moa")


def _no_dropout(name: str):
    spec = load_spec(name)
    experts = tuple(dataclasses.replace(e, dropout=0.0) if hasattr(e, "dropout") else e for e in spec.experts)
    return dataclasses.replace(spec, experts=experts)


def _grads(moa, loss):
    params = [p for p in moa.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("name", LOWERABLE)
def test_lowered_equals_unlowered(llama, name):
    torch.set_num_threads(1)
    spec = _no_dropout(name)
    ref = transform(llama, spec, lower="off")
    randomize_adapters(ref, std=0.1)
    ids = tokens(3, 9)
    want = ref(input_ids=ids, labels=ids)
    want_grads = _grads(ref, want.loss)
    for form in ("dense", "grouped"):
        low = transform(llama, spec, lower=form)
        low.adapters.load_state_dict(ref.adapters.state_dict())
        got = low(input_ids=ids, labels=ids)
        # fp32: the fused ops sum over concatenated ranks in another order than per-expert adds, so
        # differences are rounding-sized relative to the tensor's largest entry (1e-5 of it)
        _close(got.logits, want.logits)
        for a, b in zip(_grads(low, got.loss), want_grads):
            _close(a, b)
        # dense sites whose input is shared are then split by fuse_shared_input into the shared
        # GEMM + expand_lora_site, which keeps the lowering record
        fused = [n for n in low.graph_module.graph.nodes if n.target in (lowered_lora_site, expand_lora_site)]
        lora_sites = {s.site for s in low.slots if s.kind == "lora"}
        assert len(fused) == len(lora_sites)
        assert all(n.meta[LOWERING_KEY]["form"] == form for n in fused)
        assert {k for k, v in low.lowering.items() if v["form"] == form} == lora_sites


def test_dropout_sites_are_kept_with_a_reason(llama):
    moa = transform(llama, "adamole")  # dropout 0.05 per expert
    reasons = {v["reason"] for v in moa.lowering.values()}
    assert reasons == {"per-expert input dropout (set dropout = 0 to lower)"}
    records = [r for r in moa.records if r.pass_name == "lower_sparse_dispatch"]
    assert len(records) == len(moa.lowering)
    assert all(r.outcome == "unlowered" and r.reason == "dropout" and r.experts > 0 and not r.added for r in records)
    assert not [n for n in moa.graph_module.graph.nodes if n.target is lowered_lora_site]


def test_auto_records_the_cost_model_choice(llama):
    moa = transform(llama, _no_dropout("mole_topk"), lower="auto")
    for info in moa.lowering.values():
        assert info["form"] in ("dense", "grouped") and info["reason"].startswith("cost model: E=8")
    records = [r for r in moa.records if r.pass_name == "lower_sparse_dispatch"]
    assert {r.site: r.outcome for r in records} == {site: info["form"] for site, info in moa.lowering.items()}
    assert all(r.reason == "cost_model" and r.experts == 8 for r in records)
