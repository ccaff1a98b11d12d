"""Soft and Sparse MoA equal the METHODS.md block equations, forward and backward.

One router per decoder block reads h = input_layernorm(x) (SwiGLU, hidden 4E, sigmoid gates) and
gates LoRA on q, k, v (input h), o (attention output plus prompt output), down (act(gate)·up),
the parallel adapter beside the MLP and (Soft MoA) the prompt expert after RoPE. Router columns
are mapped to experts by ``model.routers[key].expert_ids``, never by position. Every weight is
random, prompt and per-head prompt gate included.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moa_fx.spec.presets import get as preset

from tiny import built, padded_tokens, randomize_adapters

from .reference import BlockMethod, assert_far, assert_matches, loss_weight, run_reference

LORA_IDS = {"self_attn.q_proj:lora", "self_attn.k_proj:lora", "self_attn.v_proj:lora", "self_attn.o_proj:lora",
            "mlp.down_proj:lora"}
SOFT_IDS = LORA_IDS | {"mlp:pa", "self_attn:prompt"}
SPARSE_IDS = LORA_IDS | {"mlp:pa"}


def _with_router(spec, **changes):
    return dataclasses.replace(spec, router=dataclasses.replace(spec.router, **changes))


def _with_threshold(spec, **changes):
    return _with_router(spec, threshold=dataclasses.replace(spec.router.threshold, **changes))


def _with_lora_at(spec, at):
    return dataclasses.replace(spec, experts=(dataclasses.replace(spec.experts[0], at=at), *spec.experts[1:]))


CASES = {
    "soft_moa": (lambda: preset("soft_moa"), BlockMethod("soft"), SOFT_IDS),
    "sparse_moa": (lambda: preset("sparse_moa"), BlockMethod("sparse", rule="moa", tau_max=0.5), SPARSE_IDS),
    # the τ-subtracting option: w = (g − τ)·sel, no renormalisation for sigmoid gates; τ learns
    "sparse_moa_adamole_rule": (lambda: _with_threshold(preset("sparse_moa"), rule="adamole"),
                                BlockMethod("sparse", rule="adamole", tau_max=0.5), SPARSE_IDS),
    # the constant-threshold option: τ = 0.5
    "sparse_moa_const": (lambda: _with_threshold(preset("sparse_moa"), learned=False, value=0.5),
                         BlockMethod("sparse", learned_threshold=False, tau_max=0.5), SPARSE_IDS),
    # native swi_x = 0 (linear router with bias) reading the raw block input
    "soft_moa_linear_raw": (lambda: _with_router(preset("soft_moa"), form="linear", bias=True, input="raw"),
                            BlockMethod("soft", router_form="linear", router_input="raw"), SOFT_IDS),
    # the optional up/gate LoRA (METHODS.md: "optional up/gate LoRA add to those projections' outputs")
    "soft_moa_up_gate": (lambda: _with_lora_at(preset("soft_moa"), ("@q", "@k", "@v", "@o", "@up", "@gate", "@down")),
                         BlockMethod("soft"), SOFT_IDS | {"mlp.up_proj:lora", "mlp.gate_proj:lora"}),
}

RUNS = [("llama", n) for n in CASES] + [("qwen3", "soft_moa"), ("qwen3", "sparse_moa")]


def _setup(family, name, seed=21):
    spec_fn, method, ids_expected = CASES[name]
    b = built(family, name, spec_fn)
    params = b.params
    randomize_adapters(b.moa, seed=seed, std="by_role")
    return b, params, method, ids_expected


def _run(b, params, method, seed=2):
    ids, mask = padded_tokens(seed=seed)
    weight = loss_weight(ids.shape + (b.hf.config.vocab_size,), seed=seed + 1)
    ref = run_reference(b.hf, params, ids, mask, weight, block=method, expert_ids=b.expert_ids)
    b.moa.train()  # MoA has no dropout: train and eval compute the same thing
    out = b.moa(input_ids=ids, attention_mask=mask)
    return ids, mask, weight, ref, out


@pytest.mark.parametrize("family,name", RUNS)
def test_moa_equals_reference(family, name):
    b, params, method, ids_expected = _setup(family, name)
    ids, mask, weight, ref, out = _run(b, params, method)
    with torch.no_grad():
        base = b.hf(input_ids=ids, attention_mask=mask).logits.double()
    assert_far(base, ref.logits, "the adapters barely move the logits: the comparison would prove nothing")
    assert_matches(out.logits, ref.logits32, ref.logits, f"{family}/{name} logits")

    layers = b.hf.config.num_hidden_layers
    blocks = {f"model.layers.{i}" for i in range(layers)}
    assert set(b.expert_ids) == blocks
    for key in blocks:
        assert set(b.expert_ids[key]) == ids_expected and len(b.expert_ids[key]) == len(ids_expected)
        assert ref.ref32.used_ids[key] == ids_expected, "every router column gates one expert the equations use"
    assert set(params) == ref.ref32.used, f"parameters the equations do not read: {set(params) - ref.ref32.used}"

    if method.select == "sparse":
        for key in blocks:
            sel = ref.trace[key]["sel"]
            assert 0 < float(sel.mean()) < 1, f"{key}: selection should be mixed, got rate {float(sel.mean())}"

    names = sorted(params)
    got = torch.autograd.grad((out.logits * weight).sum(), [params[n] for n in names], allow_unused=True)
    for n, g in zip(names, got):
        assert_matches(g, ref.grads32[n], ref.grads[n], f"{family}/{name} grad {n}", floor=ref.grad_floor())
    thresholds = [n for n in names if ".threshold." in n]
    if name in ("sparse_moa",):
        # METHODS.md, Sparse MoA: τ only selects, so W_t, b_t get no gradient at all
        assert thresholds and all(g is None for n, g in zip(names, got) if n in thresholds)
    if name == "sparse_moa_adamole_rule":
        assert thresholds and all(g is not None and float(g.abs().max()) > 0
                                  for n, g in zip(names, got) if n in thresholds)
    assert out.aux_loss is None or float(out.aux_loss) == 0, "MoA has no balance loss"


def test_sparse_moa_threshold_grad_stays_none():
    """After loss.backward() the official rule leaves .grad None on W_t and b_t (AdamW skips them)."""
    b, params, method, _ = _setup("llama", "sparse_moa", seed=22)
    for p in params.values():
        p.grad = None
    ids, mask = padded_tokens(seed=4)
    b.moa.train()
    b.moa(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    thresholds = {n: p for n, p in params.items() if ".threshold." in n}
    assert len(thresholds) == 2 * b.hf.config.num_hidden_layers
    assert all(p.requires_grad and p.grad is None for p in thresholds.values())
    assert all(p.grad is not None for n, p in params.items() if ".router." in n)
    for p in params.values():
        p.grad = None


def test_sparse_moa_unselected_experts_contribute_nothing():
    """Build router weights so known (token, expert) pairs fall below τ, then check that the model
    equals the *soft* reference with exactly those pairs removed, and differs from it without removal."""
    b, params, _, _ = _setup("llama", "sparse_moa", seed=23)
    with torch.no_grad():
        for i in range(b.hf.config.num_hidden_layers):
            key = f"model.layers.{i}"
            cols = {e: c for c, e in enumerate(b.expert_ids[key])}
            params[f"{key}.threshold.proj.weight"].zero_()
            params[f"{key}.threshold.proj.bias"].fill_(50.0)  # τ = 0.5·sigmoid(50) = 0.5 exactly
            w2, b2 = params[f"{key}.router.w2.weight"], params[f"{key}.router.w2.bias"]
            mixed = cols["mlp.down_proj:lora"]
            keep = w2[mixed].clone()
            w2.zero_()  # logits = b2: each expert's side of τ is set by its bias ...
            b2.copy_(torch.tensor([1.0 if e == "self_attn.q_proj:lora" else -0.3 if e == "mlp:pa" else 0.6
                                   for e in b.expert_ids[key]]))
            w2[mixed] = keep  # ... except down's LoRA, whose random logit changes sign per token
            b2[mixed] = 0.0
    blocks = [f"model.layers.{i}" for i in range(b.hf.config.num_hidden_layers)]
    sparse = BlockMethod("sparse", rule="moa", tau_max=0.5)
    ids, mask, weight, ref, out = _run(b, params, sparse, seed=6)
    assert_matches(out.logits, ref.logits32, ref.logits, "sparse logits")

    drop = {}
    for key in blocks:
        cols = {e: c for c, e in enumerate(b.expert_ids[key])}
        tr = ref.trace[key]
        sel, g = tr["sel"].bool(), tr["g"]
        # the construction held: q always in, PA always out (with a gate ≈ 0.43, not ≈ 0), down mixed
        assert bool(sel[..., cols["self_attn.q_proj:lora"]].all())
        assert not bool(sel[..., cols["mlp:pa"]].any()) and float(g[..., cols["mlp:pa"]].min()) > 0.3
        down = sel[..., cols["mlp.down_proj:lora"]]
        assert bool(down.any()) and not bool(down.all())
        for e, c in cols.items():
            if not bool(sel[..., c].all()):
                drop[key, e] = ~sel[..., c]
    names = sorted(params)
    got = torch.autograd.grad((out.logits * weight).sum(), [params[n] for n in names], allow_unused=True)

    removed = run_reference(b.hf, params, ids, mask, weight, block=BlockMethod("soft", drop=drop),
                            expert_ids=b.expert_ids)
    kept = run_reference(b.hf, params, ids, mask, weight, block=BlockMethod("soft"), expert_ids=b.expert_ids)
    assert_matches(out.logits, removed.logits32, removed.logits, "sparse vs soft with the unselected pairs removed")
    for n, g in zip(names, got):
        if ".threshold." not in n:
            assert_matches(g, removed.grads32[n], removed.grads[n], f"grad {n} vs removed", floor=removed.grad_floor())
    assert_far(out.logits, kept.logits, "the unselected pairs would have changed the logits: the check is not vacuous")


def test_moa_parameter_counts_follow_methods():
    """Per-layer counts from METHODS.md's formulas, at the tiny sizes (d 64, d_ff 128, r 8, PA 16, L 10)."""
    d, dff, r, heads, kv = 64, 128, 8, 4, 2
    for family, name, num in [("llama", "soft_moa", 7), ("llama", "sparse_moa", 6), ("qwen3", "soft_moa", 7)]:
        b = built(family, name, CASES[name][0])
        hd = b.hf.config.head_dim if family == "qwen3" else d // heads
        q, kvw = heads * hd, kv * hd
        lora = r * ((d + q) + (d + kvw) * 2 + (q + d) + (dff + d))
        pa = (d * 16 + 16) + (16 * d + d)
        router = 2 * (d * 4 * num + 4 * num) + (4 * num * num + num)
        extra = 10 * d + heads if name == "soft_moa" else d + 1  # prompt + head gates, or the threshold
        per_layer = {}
        for n, p in b.params.items():
            key = ".".join(n.split(".")[:3])
            per_layer[key] = per_layer.get(key, 0) + p.numel()
        assert set(per_layer.values()) == {lora + pa + router + extra}, (name, per_layer)
