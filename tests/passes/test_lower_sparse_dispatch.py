"""The lowering pass changes no number beyond rounding, and records its choice per site."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moa_fx import load_spec, transform
from moa_fx.graph import LOWERING_KEY
from moa_fx.ops import expand_dropout_lora_site, expand_lora_site, lowered_lora_site
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


def test_dropout_sites_lower_to_the_dropout_row(llama):
    """AdaMoLE's experts (input dropout 0.05 each) lower by the dropout_lora row: every site is lowered,
    its reason names the dropout, and no site is kept for it any more."""
    moa = transform(llama, "adamole")
    assert moa.lowering and all(v["form"] == "dense" and v["reason"].startswith("input dropout [0.05]")
                                for v in moa.lowering.values())
    records = [r for r in moa.records if r.pass_name == "lower_sparse_dispatch"]
    assert len(records) == len(moa.lowering)
    assert all(r.outcome == "dense" and r.reason == "cost_model" and r.experts == 8 and r.added for r in records)
    targets = {n.target for n in moa.graph_module.graph.nodes}
    assert lowered_lora_site not in targets and expand_dropout_lora_site in targets


def test_auto_records_the_cost_model_choice(llama):
    moa = transform(llama, _no_dropout("mole_topk"), lower="auto")
    for info in moa.lowering.values():
        assert info["form"] in ("dense", "grouped") and info["reason"].startswith("cost model: E=8")
    records = [r for r in moa.records if r.pass_name == "lower_sparse_dispatch"]
    assert {r.site: r.outcome for r in records} == {site: info["form"] for site, info in moa.lowering.items()}
    assert all(r.reason == "cost_model" and r.experts == 8 for r in records)


def test_a_row_added_to_the_table_lowers_what_it_takes(llama, monkeypatch):
    """Adding a lowering is one row: here one that takes LoRA experts with input dropout (which the
    lora_mixture row leaves) and re-emits their plain combine, ahead of the existing rows."""
    import importlib

    from moa_fx import ops
    from moa_fx.passes.base import new_node

    lsd = importlib.import_module("moa_fx.passes.lower_sparse_dispatch")  # the package exports the pass by this name

    def emit(ctx, m, form):
        deltas = [ctx.node(s.delta) for s in m.slots]
        node = new_node(ctx, "call_function", ops.mix, (m.y, m.w, deltas, m.cols), anchor=m.y, pass_name=lsd.PASS,
                        site=m.site, role="combine (test row)", val=m.y.meta.get("val"))
        return lsd.Emitted(node, "replayed", "forced", "test row", [node.name])

    def dropped(ctx, m):
        return None if lsd._no_dropout(ctx, m) == "dropout" else "no_lora"

    row = lsd.Lowering("replay_dropout_lora", ops.mix, lsd._is_lora, (lsd._has_experts, dropped), emit)
    monkeypatch.setattr(lsd, "LOWERINGS", (row, *lsd.LOWERINGS))
    ref = transform(llama, "adamole", lower="off")  # dropout 0.05 per expert: the test row takes every site
    randomize_adapters(ref, std=0.1)
    moa = transform(llama, "adamole")
    moa.adapters.load_state_dict(ref.adapters.state_dict())
    assert moa.lowering and {v["form"] for v in moa.lowering.values()} == {"replayed"}
    assert {r.outcome for r in moa.records if r.pass_name == "lower_sparse_dispatch"} == {"replayed"}
    ref.eval()
    moa.eval()
    ids = tokens(2, 7)
    torch.testing.assert_close(moa(input_ids=ids).logits, ref(input_ids=ids).logits)
