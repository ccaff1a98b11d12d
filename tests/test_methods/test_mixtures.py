"""Per-projection mixtures equal the METHODS.md equations, forward and backward.

``adamole``, ``mole_topk``, ``mole_threshold``, ``hydralora``, ``moe_lora_soft`` (and single-expert
``lora``) against :class:`~tests.methods.reference.Reference`, with every adapter, router and
threshold weight random. The presets carry dropout 0.05; the equivalence runs in ``eval()`` (dropout
off), and one test checks that ``train()`` does apply it. Selection corner cases are built, not
hoped for: a threshold bias of −30 makes every expert fire, a zero router with τ = (1/E)·sigmoid(50) = 1/E
(exactly, in fp32 and float64) makes every ``a`` exactly 0 (a zero sum, Δy = 0), and thresholds above 1/E leave tokens with no expert at all;
each test checks that its cases were actually hit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from moa_fx.spec.presets import get as preset

from tiny import built, padded_tokens, randomize_adapters

from .reference import Reference, SiteMethod, assert_far, assert_matches, loss_weight, run_reference

QKVOD = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"}
QKVO = QKVOD - {"mlp.down_proj"}


def with_threshold(spec, **changes):
    router = spec.router
    return dataclasses.replace(spec, router=dataclasses.replace(
        router, threshold=dataclasses.replace(router.threshold, **changes)))


@dataclass(frozen=True)
class Case:
    spec: Callable
    method: SiteMethod
    sites: set
    experts: int  # per site
    aux: bool  # METHODS.md gives this method a balance loss
    prepare: Callable | None = None  # edits the random weights to build selection corner cases
    check: Callable | None = None  # asserts on the reference trace that the corner cases were hit
    # "off": the equations are checked on the unlowered graph, the lowered one against it elsewhere
    lower: str = "auto"


def _layer0(params, site, leaf):
    return params[f"model.layers.0.{site}.{leaf}"]


def _adamole_corners(params):
    with torch.no_grad():
        # q_proj: τ = τ_max·sigmoid(−30) ≈ 0, so every expert fires for every token
        _layer0(params, "self_attn.q_proj", "threshold.proj.bias").fill_(-30.0)
        # k_proj: p = softmax(0) = 1/E and τ = (1/E)·sigmoid(50) = 1/E exactly: a = 0, sel = 1 for all,
        # Σ a·sel = 0 is replaced by 1, so Δy = 0 (METHODS.md, AdaMoLE)
        _layer0(params, "self_attn.k_proj", "router.proj.weight").zero_()
        _layer0(params, "self_attn.k_proj", "threshold.proj.weight").zero_()
        _layer0(params, "self_attn.k_proj", "threshold.proj.bias").fill_(50.0)
        # v_proj: a steep threshold, so τ spans (0, 1/E) across tokens: from one expert to all of them
        _layer0(params, "self_attn.v_proj", "threshold.proj.weight").mul_(20.0)


def _adamole_check(ref, num=8):
    t = ref.trace
    q, k, v = (t[f"model.layers.0.self_attn.{s}_proj"] for s in "qkv")
    assert bool((q["sel"] == 1).all()), "q_proj: every expert should fire"
    assert bool((k["sel"] == 1).all()) and bool((k["w"] == 0).all()), "k_proj: a = 0 everywhere (zero sum)"
    counts = torch.cat([s["sel"].sum(-1).flatten() for s in t.values()])
    # with τ_max = 1/E the arg-max expert always fires (METHODS.md): never zero experts
    assert int(counts.min()) >= 1 and bool((counts == 1).any())
    active = v["sel"].sum(-1)
    assert bool((active == num).any()) and len(active.unique()) >= 3, active


def _adamole_high_tau_check(ref):
    counts = torch.cat([v["sel"].sum(-1).flatten() for v in ref.trace.values()])
    assert bool((counts == 0).any()), "τ_max = 0.5 should leave some tokens with no expert"
    assert bool((counts > 1).any())


def _topk_check(ref):
    for v in ref.trace.values():
        assert bool((v["sel"].sum(-1) == 2).all())


def _threshold_check(low: int, high: int):
    """Every token has between ``low`` and ``high`` experts, and both ends occur."""
    def check(ref):
        counts = torch.cat([v["sel"].sum(-1).flatten() for v in ref.trace.values()])
        assert int(counts.min()) == low and int(counts.max()) == high, (int(counts.min()), int(counts.max()))
    return check


CASES = {
    "lora": Case(lambda: preset("lora"), SiteMethod("lora", alpha=8), QKVOD, 1, aux=False),
    "mole_topk": Case(lambda: preset("mole_topk"), SiteMethod("topk", alpha=8, top_k=2, router_bias=True),
                      QKVOD, 8, aux=True, check=_topk_check),
    # constant threshold c = 0.25 with E = 4: max p ≥ 1/4, so 1..4 experts per token
    "mole_threshold": Case(lambda: preset("mole_threshold"),
                           SiteMethod("threshold", alpha=16, threshold=0.25), QKVO, 4, aux=True,
                           check=_threshold_check(1, 3)),
    # c = 0.5: tokens with no expert (zero sum → Δy = 0) next to tokens with one
    "mole_threshold_c050": Case(lambda: with_threshold(preset("mole_threshold"), value=0.5),
                                SiteMethod("threshold", alpha=16, threshold=0.5), QKVO, 4, aux=True,
                                check=_threshold_check(0, 1)),
    # c = 0: every expert fires, the renormalised weights are p
    "mole_threshold_c0": Case(lambda: with_threshold(preset("mole_threshold"), value=0.0),
                              SiteMethod("threshold", alpha=16, threshold=0.0), QKVO, 4, aux=True,
                              check=_threshold_check(4, 4)),
    # unlowered: the lowered heads (one GEMM over A stacked 4 times) reorder sums whose gradients carry
    # ~1000x cancellation here, landing past the fp32 bound on single router-gradient elements (the
    # lowered and unlowered graphs are equally far from float64: tests/passes/test_dropout_lowering.py
    # checks them against each other)
    "hydralora": Case(lambda: preset("hydralora"), SiteMethod("hydra", alpha=32), QKVOD, 4, aux=False, lower="off"),
    "moe_lora_soft": Case(lambda: preset("moe_lora_soft"), SiteMethod("dense", alpha=8), QKVOD, 8, aux=False),
    "adamole": Case(lambda: preset("adamole"), SiteMethod("adamole", alpha=16, tau_max=1 / 8),
                    QKVO, 8, aux=True, prepare=_adamole_corners, check=_adamole_check),
    "adamole_tau050": Case(lambda: with_threshold(preset("adamole"), max=0.5),
                           SiteMethod("adamole", alpha=16, tau_max=0.5), QKVO, 8, aux=True,
                           check=_adamole_high_tau_check),
}

RUNS = [("llama", name) for name in CASES] + [("qwen3", "adamole"), ("qwen3", "hydralora")]


def _reached(name: str, case: Case, trace: dict) -> bool:
    """Whether the equations give parameter ``name`` a non-zero gradient through the logits.

    An expert's weights: iff some token gives it a non-zero weight. A renormalising router (top-k,
    threshold, AdaMoLE): iff some token has two or more selected experts (one selected expert gets
    weight p/p = 1, a constant) or a zero-sum token with selected experts (AdaMoLE's a = 0: w = a).
    A dense router always.
    """
    if ".lora." in name and case.method.kind in ("lora", "hydra"):
        return True
    site = name.split(".lora.")[0] if ".lora." in name else name.rsplit(".", 3)[0]
    tr = trace[site]
    if ".lora." in name:
        e = int(name.split(".lora.")[1].split(".")[0])
        return bool((tr["w"][..., e] != 0).any())
    if case.method.kind in ("dense", "hydra"):
        return True
    active = tr["sel"].sum(-1)
    return bool((active >= 2).any() or ((tr["w"].sum(-1) == 0) & (active > 0)).any())


def _randomized(family, name):
    case = CASES[name]
    b = built(family, name, case.spec, lower=case.lower)
    params = b.params
    randomize_adapters(b.moa, seed=11, std="by_role")
    if case.prepare:
        case.prepare(params)
    return b, params


@pytest.mark.parametrize("family,name", RUNS)
def test_mixture_equals_reference(family, name):
    case = CASES[name]
    b, params = _randomized(family, name)
    hf, moa = b.hf, b.moa
    moa.eval()  # the presets' dropout off; the balance loss is still returned
    ids, mask = padded_tokens(seed=2)
    weight = loss_weight(ids.shape + (hf.config.vocab_size,), seed=4)
    ref = run_reference(hf, params, ids, mask, weight, site=case.method, expert_ids=b.expert_ids)
    out = moa(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        base = hf(input_ids=ids, attention_mask=mask).logits.double()
    assert_far(base, ref.logits, "the adapters barely move the logits: the comparison would prove nothing")
    assert_matches(out.logits, ref.logits32, ref.logits, f"{family}/{name} logits")

    # structure: exactly the expected sites and experts, and every parameter is one the equations read
    layers = hf.config.num_hidden_layers
    sites = {f"model.layers.{i}.{s}" for i in range(layers) for s in case.sites}
    assert {n.split(".lora.")[0] for n in params if ".lora." in n} == sites
    assert all(ref.ref32._num_experts(s) == case.experts for s in sites)
    assert set(params) == ref.ref32.used, f"parameters the equations do not read: {set(params) - ref.ref32.used}"
    if case.method.kind != "lora":
        assert set(moa.routers) == sites
        assert {k: set(v) for k, v in b.expert_ids.items()} == {s: {f"lora.{e}" for e in range(case.experts)}
                                                                for s in sites}
    if case.check:
        case.check(ref)

    names = sorted(params)
    loss = (out.logits * weight).sum()
    got = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True, retain_graph=case.aux)
    for n, g in zip(names, got):
        assert_matches(g, ref.grads32[n], ref.grads[n], f"{family}/{name} grad {n}", floor=ref.grad_floor())
        want = ref.grads[n]
        if name == "adamole" and any(f"layers.0.self_attn.{s}_proj.threshold" in n for s in "qk"):
            continue  # sigmoid(±30/50) saturates by construction: its gradient is ~1e-13, neither 0 nor not
        reached = _reached(n, case, ref.trace)
        # "non-zero": above float64 cancellation noise (1e-10 of the largest gradient)
        assert (want is not None and float(want.abs().max()) > 1e-10 * ref.grad_floor() / 1.2e-7) == reached, n

    if case.aux:
        assert out.aux_loss is not None, "METHODS.md gives this method a balance loss"
        assert_matches(out.aux_loss, ref.aux32, ref.aux, f"{family}/{name} aux loss")
        got = torch.autograd.grad(out.aux_loss, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, got):
            assert_matches(g, ref.aux_grads32[n], ref.aux_grads[n], f"{family}/{name} aux grad {n}",
                           floor=ref.grad_floor(aux=True))
        # the trainer adds coef·aux to the language-model loss in training
        assert case.spec().router.aux_loss_coef == pytest.approx(1e-3)
    else:
        assert out.aux_loss is None or float(out.aux_loss) == 0


def test_train_applies_dropout():
    """The presets' dropout (0.05) is active in train() and off in eval()."""
    b, params = _randomized("llama", "adamole")
    ids, mask = padded_tokens(seed=3)
    ref = Reference(b.hf, params, site=CASES["adamole"].method, expert_ids=b.expert_ids)
    with torch.no_grad():
        want = ref(ids, mask)
        b.moa.train()
        torch.manual_seed(0)
        dropped = b.moa(input_ids=ids, attention_mask=mask).logits
        b.moa.eval()
        kept = b.moa(input_ids=ids, attention_mask=mask).logits
    scale = float(want.abs().max())
    assert float((kept - want).abs().max()) < 1e-4 * scale
    assert_far(dropped, want, "dropout is not applied in training")


def test_presets_match_methods():
    """Preset hyper-parameters are the ones METHODS.md reports."""
    a = preset("adamole")
    (e,) = a.experts
    assert (e.r, e.alpha, e.count, e.dropout) == (4, 16, 8, 0.05)
    assert a.router.threshold.learned and a.router.threshold.rule == "adamole"
    assert a.router.threshold.max in (None, 1 / 8) and not a.router.has_bias and a.router.aux_loss_coef == 1e-3
    t = preset("mole_topk")
    (e,) = t.experts
    assert (e.r, e.alpha, e.count, t.router.top_k, t.router.has_bias, t.router.aux_loss_coef) == (8, 8, 8, 2, True, 1e-3)
    h = preset("hydralora")
    (e,) = h.experts
    assert (e.r, e.alpha, e.count, e.dropout, e.share_a, h.router.has_bias) == (4, 32, 4, 0.05, True, False)
    s = preset("moe_lora_soft")
    (e,) = s.experts
    assert (e.r, e.alpha, e.count, s.router.has_bias, s.router.aux_loss_coef, s.router.select) == (8, 8, 8, False, 0, "dense")


@pytest.mark.parametrize("name", ["adamole", "hydralora"])
def test_router_reads_undropped_input(name):
    """METHODS.md: dropout is on the expert input only; the router (and AdaMoLE's threshold) read the
    undropped x. Layer 0's q/k/v input does not depend on any adapter, so with dropout active
    (train) the layer-0 gate means and τ means must equal the dropout-free equations' exactly."""
    b, params = _randomized("llama", name)
    case = CASES[name]
    ids, mask = padded_tokens(seed=8)
    ref = Reference(b.hf, params, site=case.method, expert_ids=b.expert_ids)
    with torch.no_grad():
        ref(ids, mask)
        b.moa.train()
        torch.manual_seed(1)
        b.moa(input_ids=ids, attention_mask=mask)
        stats = b.moa.router_stats()
    b.moa.eval()
    for proj in "qkv":
        site = f"model.layers.0.self_attn.{proj}_proj"
        s, tr = stats[site], ref.trace[site]
        cols = [s["experts"].index(f"lora.{e}") for e in range(case.experts)]
        gate_mean = torch.tensor(s["gate_mean"])[cols]
        torch.testing.assert_close(gate_mean, tr["p"].reshape(-1, case.experts).mean(0), rtol=1e-5, atol=1e-6)
        if tr["tau"] is not None:
            assert s["threshold_mean"] == pytest.approx(float(tr["tau"].mean()), rel=1e-5)
