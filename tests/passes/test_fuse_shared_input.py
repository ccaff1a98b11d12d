"""The shared-input fusion pass changes no number beyond rounding, and fuses what it should."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moa_fx import load_spec, transform
from moa_fx.spec import presets
from moa_fx.graph import FUSION_KEY
from moa_fx.ops import expand_lora_site, lowered_lora_site, shared_input_projection
from tiny import randomize_adapters, slow_except, tiny_model, tokens


def _grads(moa, loss):
    params = [p for p in moa.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def _close(got: torch.Tensor, want: torch.Tensor, what: str, floor: float = 0.0) -> None:
    # fp32: one GEMM over the stacked weights sums in another order than separate GEMMs;
    # differences are rounding-sized relative to the tensor's largest entry, or, for a gradient that
    # is a sum with heavy cancellation (a threshold's bias: 1.5e-5 from terms 1e3 times larger), to
    # the sizes of the terms, bounded by ``floor`` (a fraction of the model's largest gradient)
    scale = float(want.detach().abs().max()) or 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=max(1e-5 * scale, floor), msg=lambda m: f"{what}: {m}")


def _fused_nodes(moa):
    return [n for n in moa.graph_module.graph.nodes if n.target is shared_input_projection]


def _fused_parts(moa) -> list[list[str]]:
    """Per fused GEMM, its readers' kinds in graph order ('lowered_lora', 'lora', 'router', 'threshold')."""
    return [r.parts for r in moa.records if r.pass_name == "fuse_shared_input" and r.outcome == "fused"]


def _kept_reasons(moa) -> set[str]:
    """The reason codes of every reader the fusion pass kept apart."""
    return {code for r in moa.records if r.pass_name == "fuse_shared_input" for code in r.kept.values()}


def _check_equal(model, spec, lower="auto", autocast=False):
    ref = transform(model, spec, lower=lower, fuse=False)
    randomize_adapters(ref, std=0.1)
    fused = transform(model, spec, lower=lower, fuse=True)
    fused.adapters.load_state_dict(ref.adapters.state_dict())
    # eval mode: dropout off, so both graphs see the same inputs (the fusion does not touch dropout)
    ref.eval()
    fused.eval()
    ids = tokens(3, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want = ref(input_ids=ids, labels=ids)
        got = fused(input_ids=ids, labels=ids)
    if autocast:  # the same dtypes node for node, and bf16 rounding apart at most
        assert got.logits.dtype == want.logits.dtype
        torch.testing.assert_close(got.logits.float(), want.logits.float(), rtol=0.05, atol=0.05)
        return fused
    _close(got.logits, want.logits, "logits")
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    wants = _grads(ref, want.loss)
    floor = 1e-7 * max(float(g.abs().max()) for g in wants)
    for name, a, b in zip(names, _grads(fused, got.loss), wants):
        _close(a, b, f"d {name}", floor)
    return fused


@pytest.mark.parametrize("name", slow_except(list(presets.PRESETS), ("sparse_moa", "adamole", "hydralora", "soft_moa",
                                                                     "parallel_adapter")))
def test_fused_equals_unfused_every_preset(llama, name):
    fused = _check_equal(llama, name)
    # prompt experts read q and parallel adapters the block input, each alone and with no router:
    # nothing to fuse there; every other preset has two or more readers of one input
    if name not in ("prompt_tuning", "parallel_adapter"):
        assert _fused_nodes(fused), f"{name}: nothing was fused"


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
@pytest.mark.parametrize("name", ["sparse_moa", "adamole"])
def test_fused_equals_unfused_other_families(family, name):
    fused = _check_equal(tiny_model(family), name)
    parts = _fused_parts(fused)
    if name == "adamole":  # per-projection router and threshold (τ learns under AdaMoLE's rule)
        assert any("router" in p for p in parts) and any("threshold" in p for p in parts)
    elif family == "qwen3":  # q, k, v's LoRA A (one expert each) join the block router's GEMM
        groups = [(r.parts, r.experts) for r in fused.records if r.outcome == "fused"]
        assert (["router", "lowered_lora", "lowered_lora", "lowered_lora"], 3) in groups
    else:  # GPT-2: c_attn's LoRA reads a flattened view of ln_1's output, the router ln_1's output
        assert not parts


def _no_dropout(name: str):
    spec = load_spec(name)
    return dataclasses.replace(spec, experts=tuple(dataclasses.replace(e, dropout=0.0) if hasattr(e, "dropout") else e
                                                   for e in spec.experts))


@pytest.mark.parametrize("lower", ["off", "dense"])
def test_hydralora_shared_a_fuses(llama, lower):
    """HydraLoRA heads share one A (owned by the first head): unlowered heads read it by owner."""
    fused = _check_equal(llama, _no_dropout("hydralora"), lower=lower)
    assert any({"lora", "lowered_lora"} & set(p) for p in _fused_parts(fused))


def test_unlowered_experts_fuse_too(llama):
    fused = _check_equal(llama, "sparse_moa", lower="off")
    assert any(p[i:i + 3] == ["lora"] * 3 for p in _fused_parts(fused) for i in range(len(p)))


@pytest.mark.parametrize("name", ["sparse_moa", "mole_topk"])
def test_bf16_autocast_keeps_dtypes(llama, name):
    """Under bf16 autocast the fused router and threshold give what the modules give (bf16)."""
    _check_equal(llama, name, autocast=True)


def test_sparse_moa_block_is_one_gemm(llama):
    """q, k, v's LoRA A (r 8 each) and the block's SwiGLU router (W₁ and W₃: 2 × 4·E = 48 rows, E = 6)
    read the attention norm's output: one GEMM of 48+8+8+8 columns per layer. The threshold (MoA's
    rule: no gradient) keeps its own GEMM, so its .grad stays None."""
    moa = transform(llama, "sparse_moa", lower="dense")
    nodes = _fused_nodes(moa)
    assert len(nodes) == llama.config.num_hidden_layers
    for node in nodes:
        assert node.args[2] == [48, 8, 8, 8]  # graph order: router, q, k, v
        readers = node.meta[FUSION_KEY]["readers"]
        assert len(readers) == 4
    expands = [n for n in moa.graph_module.graph.nodes if n.target is expand_lora_site]
    lowered = [n for n in moa.graph_module.graph.nodes if n.target is lowered_lora_site]
    assert len(expands) == 3 * len(nodes)  # q, k, v
    assert len(lowered) == 2 * len(nodes)  # o and down read their own inputs: nothing to share
    # the modules are still there (state dicts unchanged); the graph reads their weights
    assert not [n for n in moa.graph_module.graph.nodes if n.op == "call_module" and "router" in n.target]
    moa.train()
    ids = tokens(2, 5)
    moa(input_ids=ids, labels=ids).loss.backward()
    taus = [p for n, p in moa.named_parameters() if ".threshold." in n]
    assert taus and all(p.grad is None for p in taus)
    assert all(p.grad is not None for n, p in moa.named_parameters() if ".router." in n)


def test_fusion_is_exact_in_float64():
    """In float64 the fused graph equals the unfused one to ~1e-12 relative (it only reorders sums);
    a wrong or missing term would show here far above rounding. Unlowered (the fused kernels are
    fp32/bf16/fp16 only)."""
    for name in ("hydralora", "adamole", "mole_threshold", "soft_moa"):
        model = tiny_model("llama").double()
        spec = _no_dropout(name)
        ref = transform(model, spec, lower="off", fuse=False)
        randomize_adapters(ref, std=0.3)
        fused = transform(model, spec, lower="off")
        fused.adapters.load_state_dict(ref.adapters.state_dict())
        assert _fused_nodes(fused), name
        ids = tokens(3, 9)
        want, got = ref(input_ids=ids, labels=ids), fused(input_ids=ids, labels=ids)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-12, atol=1e-12)
        for a, b in zip(_grads(fused, got.loss), _grads(ref, want.loss)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * max(float(b.abs().max()), 1.0))


def test_adamole_fuses_its_experts_routers_and_thresholds(llama):
    """Lowered, AdaMoLE's experts join the shared GEMM despite their input dropout (the dropped entries
    are subtracted from the GEMM's piece: tests/passes/test_dropout_lowering.py); unlowered, each
    expert reads its own dropped copy of x through its nn.Dropout and stays apart."""
    (expert,) = presets.get("adamole").experts
    num_experts = len(expert.ranks)
    nodes = _fused_nodes(moa := transform(llama, "adamole"))
    assert nodes
    for node in nodes:  # τ (1 column), E router logits and the site's A_cat (E·r rows) per site
        assert set(node.args[2]) == {1, num_experts, sum(expert.ranks)}
    assert "dropout" not in _kept_reasons(moa)
    unlowered = transform(llama, "adamole", lower="off")
    for node in _fused_nodes(unlowered):
        assert set(node.args[2]) == {1, num_experts}
    assert "dropout" in _kept_reasons(unlowered)


# compile hygiene of fused graphs: tests/test_runtime.py compiles the default (fused) pipeline
# with fullgraph=True, lowered and unlowered, and counts graphs and breaks


def test_grouped_sites_are_kept_with_a_reason(llama):
    moa = transform(llama, "mole_topk", lower="grouped")
    assert "grouped_form" in _kept_reasons(moa)  # the grouped form computes A only at active pairs
    assert not [n for n in moa.graph_module.graph.nodes if n.target is expand_lora_site]


def test_rebuilt_router_and_threshold_equal_their_modules_under_autocast():
    """Each rebuilt reader against the module it replaces, on random weights, fp32 and bf16 autocast:
    same values and the same dtype (nn.Linear adds its fp32 bias in the autocast dtype)."""
    from moa_fx.modules import Router, Threshold
    from moa_fx.ops import router_from_projection, threshold_from_projection

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)
    linear, swiglu, tau = Router(16, 6, "linear", bias=True), Router(16, 6, "swiglu"), Threshold(16, 0.5)
    with torch.no_grad():
        for p in (*linear.parameters(), *swiglu.parameters(), *tau.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            pairs = [
                (linear(x),
                 router_from_projection(torch.nn.functional.linear(x, linear.proj.weight), linear.proj.bias)),
                (swiglu(x), router_from_projection(
                    torch.nn.functional.linear(x, torch.cat([swiglu.w1.weight, swiglu.w3.weight])), None,
                    swiglu.w2.weight, swiglu.w1.bias, swiglu.w3.bias, swiglu.w2.bias)),
                (tau(x), threshold_from_projection(torch.nn.functional.linear(x, tau.proj.weight), tau.proj.bias, 0.5)),
            ]
        for want, got in pairs:
            assert got.dtype == want.dtype
            tol = dict(rtol=2e-2, atol=2e-2) if enabled else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.float(), want.float(), **tol)
