"""LoRA experts with input dropout (AdaMoLE) lower to moa_fx::dropout_lora and join the shared GEMM.

What the lowered graph must compute in training: the unlowered graph's function with each expert's
``nn.Dropout`` replaced by the op's mask (``explicit_masks`` of the seed the site drew), i.e. METHODS.md's
``s·B_e(A_e(dropout_e(x)))`` with the router reading the undropped x. In eval: no dropout at all.
"""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from moa_fx import load_spec, transform
from moa_fx.kernels.dropout_mask import explicit_masks
from moa_fx.graph import site_of
from moa_fx.kinds.lora import DropoutSeeds, LoraDelta
from moa_fx.ops import dropout_lora_site, expand_dropout_lora_site, lowered_lora_site, seed_at
from moa_fx.passes.lowering_form import plan_lowering
from tiny import randomize_adapters, tiny_model, tokens

P = 0.3  # larger than AdaMoLE's 0.05 so that a wrong mask moves the output well past rounding


def _adamole(p: float = P):
    spec = load_spec("adamole")
    return dataclasses.replace(spec, experts=tuple(dataclasses.replace(e, dropout=p) for e in spec.experts))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


class ExplicitDropout(nn.Module):
    """Expert ``index``'s mask from the op's mask function and the seed its site drew."""

    def __init__(self, seeds: dict, site: str, index: int, ps: list[float]) -> None:
        super().__init__()
        self.seeds, self.site, self.index, self.ps = seeds, site, index, ps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        mask = explicit_masks(self.seeds[self.site], self.ps, flat.shape[0], flat.shape[1])[self.index]
        return (flat * mask / (1 - self.ps[self.index])).reshape(x.shape)


def _record_seeds(moa) -> dict:
    """<site>.<rule> -> the seed its site drew: entry i of the forward's one draw, for the site whose
    ``seed_at`` reads index i."""
    index = {n.args[1]: site_of(n) for n in moa.graph_module.graph.nodes if n.target is seed_at}
    seeds = {}
    draws = [m for m in moa.adapters.modules() if isinstance(m, DropoutSeeds)]
    assert len(draws) == 1  # one draw for every site

    def record(module, args, out):
        if out is not None:  # None in eval
            seeds.update({f"{site}.lora": out[i] for i, site in index.items()})

    draws[0].register_forward_hook(record)
    return seeds


def _explicit_reference(llama, lowered, seeds: dict):
    ref = transform(llama, _adamole(), lower="off")
    ref.adapters.load_state_dict(lowered.adapters.state_dict())
    for name, module in list(ref.adapters.named_modules()):
        if isinstance(module, LoraDelta):
            site, index = name.rsplit(".", 1)
            module.dropout = ExplicitDropout(seeds, site, int(index), [P] * 8)
    return ref


def _under_one_seed(seed: int, first, second, ids):
    """Both models' outputs (with the loss) from the same torch.manual_seed: the same dropout draws."""
    outs = []
    for model in (first, second):
        torch.manual_seed(seed)
        outs.append(model(input_ids=ids, labels=ids))
    return outs


def _grads(moa, loss):
    params = [p for p in moa.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def test_adamole_lowers_and_sites_reports_the_same_decision(llama):
    moa = transform(llama, "adamole")
    records = [r for r in moa.records if r.pass_name == "lower_sparse_dispatch"]
    assert len(records) == 8 and all(r.outcome == "dense" and r.experts == 8 for r in records)
    plan = SimpleNamespace(placements=moa.placements)  # what moa-fx sites finds on the captured base
    assert plan_lowering(moa.graph_module, plan, moa.spec) == moa.lowering
    assert all("moa_fx::dropout_lora in training" in v["reason"] for v in moa.lowering.values())
    targets = [n.target for n in moa.graph_module.graph.nodes]
    assert lowered_lora_site not in targets
    # q, k, v read one x: their experts joined the shared GEMM with routers and thresholds; o alone
    assert targets.count(expand_dropout_lora_site) == 8 and dropout_lora_site not in targets
    fused = [r for r in moa.records if r.pass_name == "fuse_shared_input"]
    assert sorted(r.experts for r in fused) == [8, 8, 24, 24] and not any(r.kept for r in fused)


def _within_rounding(got, ref64, what):
    """got is within 1e-5 of the fp64 oracle's largest entry (fp32 rounding: ~1e-6 of it here; a wrong
    mask moves the output by more than 1e-2 of it, checked below)."""
    err = (got.double() - ref64).abs().max().item()
    scale = max(1e-3, ref64.abs().max().item())
    assert err <= 1e-5 * scale, f"{what}: {err:.3g} > 1e-5 x {scale:.3g}"


@pytest.mark.parametrize("fuse", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["fused", "unfused"])
def test_train_mode_equals_the_unlowered_model_with_the_ops_masks(llama, fuse):
    torch.set_num_threads(1)
    moa = transform(llama, _adamole(), fuse=fuse)
    randomize_adapters(moa, std=0.1)
    seeds = _record_seeds(moa)
    ids = tokens(2, 9)
    moa.train()
    torch.manual_seed(0)
    got = moa(input_ids=ids, labels=ids)
    assert len(seeds) == 8 and len({int(s) for s in seeds.values()}) == 8  # a seed per site
    ref64 = _explicit_reference(copy.deepcopy(llama), moa, seeds).train().to(torch.float64)
    oracle = ref64(input_ids=ids, labels=ids)
    _within_rounding(got.logits, oracle.logits, "logits")
    for a, c in zip(_grads(moa, got.loss), _grads(ref64, oracle.loss)):
        _within_rounding(a, c, "gradient")
    # and the masks matter: the model without dropout computes something else
    moa.eval()
    assert (moa(input_ids=ids).logits - got.logits).abs().max() > 1e-2 * oracle.logits.abs().max()


def test_eval_has_no_dropout_and_train_draws_reproducibly(llama):
    moa = transform(llama, _adamole())
    ref = transform(llama, _adamole(), lower="off")
    randomize_adapters(ref, std=0.1)
    moa.adapters.load_state_dict(ref.adapters.state_dict())
    ids = tokens(2, 9)
    moa.eval(), ref.eval()
    torch.testing.assert_close(moa(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    moa.train()
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(moa(input_ids=ids).logits)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_without_dropout_the_lora_mixture_row_lowers_and_train_equals_unlowered(llama):
    moa = transform(llama, _adamole(0.0))
    ref = transform(llama, _adamole(0.0), lower="off")
    randomize_adapters(ref, std=0.1)
    moa.adapters.load_state_dict(ref.adapters.state_dict())
    assert not any(isinstance(m, DropoutSeeds) for m in moa.adapters.modules())
    assert not any(n.target in (dropout_lora_site, expand_dropout_lora_site) for n in moa.graph_module.graph.nodes)
    ids = tokens(2, 9)
    moa.train(), ref.train()
    got, want = moa(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(moa, got.loss), _grads(ref, want.loss)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))


def test_unlowered_experts_with_dropout_stay_out_of_the_shared_gemm(llama):
    moa = transform(llama, "adamole", lower="off")
    kept = [code for r in moa.records if r.pass_name == "fuse_shared_input" for code in r.kept.values()]
    assert kept and set(kept) == {"dropout"}


def _hydralora(p: float = P):
    spec = load_spec("hydralora")
    return dataclasses.replace(spec, experts=tuple(dataclasses.replace(e, dropout=p) for e in spec.experts))


@pytest.mark.parametrize("lower", ["off", "auto"])
def test_hydralora_heads_read_x_dropped_once(llama, lower):
    """METHODS.md: ``Σ_e g_e · s·B_e(A(dropout(x)))``, one mask before the shared A. With a uniform router
    (g_e = 1/E) the gradient of head e's B is ``g_e·s·Σ_t δ_t·A(x_d)_tᵀ``, the same for every head when
    they read one dropped x, and different heads' masks would make them differ."""
    moa = transform(llama, _hydralora(), lower=lower)
    randomize_adapters(moa, std=0.1)
    with torch.no_grad():
        for name, param in moa.adapters.named_parameters():
            if name.endswith("router.proj.weight"):
                param.zero_()
    moa.train()
    ids = tokens(2, 9)
    grads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        moa.zero_grad(set_to_none=True)
        moa(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in moa.adapters.named_parameters() if n.endswith("lora_B")})
    sites = {n.rsplit(".lora.", 1)[0] for n in grads[0]}
    assert len(sites) == 2 * 5  # q, k, v, o, down in 2 layers
    for site in sites:
        heads = [grads[0][f"{site}.lora.{e}.lora_B"] for e in range(4)]
        assert float(heads[0].abs().max()) > 0
        for head in heads[1:]:
            torch.testing.assert_close(head, heads[0], rtol=1e-5, atol=1e-7)
    # the dropout is on: another draw gives other gradients
    assert not torch.allclose(grads[0][f"{site}.lora.0.lora_B"], grads[1][f"{site}.lora.0.lora_B"])
    assert not any(isinstance(m, DropoutSeeds) for m in moa.adapters.modules())


def test_hydralora_with_dropout_lowers_to_the_unlowered_function(llama):
    """The lowered heads read the same dropped x (the same node, the same draw under one seed): loss and
    gradients in training equal the unlowered graph's; moa-fx sites' plan says what the pass did."""
    moa, ref = (transform(llama, _hydralora(), lower=lower) for lower in ("auto", "off"))
    randomize_adapters(ref, std=0.1)
    moa.adapters.load_state_dict(ref.adapters.state_dict())
    assert moa.lowering and all(v["form"] != "unlowered" for v in moa.lowering.values())
    assert plan_lowering(moa.graph_module, SimpleNamespace(placements=moa.placements), moa.spec) == moa.lowering
    ids = tokens(2, 9)
    moa.train(), ref.train()
    got, want = _under_one_seed(1, moa, ref, ids)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(moa, got.loss), _grads(ref, want.loss)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(b.abs().max())))
    torch.manual_seed(2)  # another draw moves the loss: the dropout is on
    assert not torch.allclose(moa(input_ids=ids, labels=ids).loss, got.loss)


@pytest.mark.slow  # an Inductor-free but whole-model aot_eager compile in train mode: ~20 s
def test_train_mode_compiles_fullgraph_and_draws_the_eager_masks(llama):
    """torch.compile (AOTAutograd, so the op's backward is traced) of the lowered AdaMoLE in train mode:
    one graph, no break at the seed or the op, and under one torch.manual_seed the eager model's masks."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    moa = transform(llama, _adamole())
    randomize_adapters(moa, std=0.1)
    moa.train()
    compiled = torch.compile(moa, backend="aot_eager", fullgraph=True, dynamic=True)
    params = [p for p in moa.parameters() if p.requires_grad]
    ids = tokens(2, 7)
    want, got = _under_one_seed(3, moa, compiled, ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(moa, got.loss), _grads(moa, want.loss)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
