"""A new expert kind registered from this file alone (the worked example of docs/ARCHITECTURE.md,
"Adding an expert kind"): a learned shift (a bias) ``Δ = s·b`` added to every matched projection's output.

The kind is its spec class (a frozen dataclass with ``kind = "shift"``), its nn.Module, and its
registry entry (site pool, insertion, parameter count). The tests check that the spec parser finds
it by its key, that the transformed model equals the base model with ``s·b`` added to those
projections' outputs by plain forward hooks, and that ``moa-fx sites`` counts its parameters as the
transform makes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch
from torch import nn

from moa_fx import transform
from moa_fx.graph import shaped_like
from moa_fx.kinds import KINDS, ExpertKind, register
from moa_fx.spec import EXPERT_KINDS, ExpertSpec, load_spec
from moa_fx.spec.types import check_number, check_rule, help_text
from tiny import tiny_model, tokens


# ---- the file you would add as moa_fx/kinds/shift.py ---------------------------------------------

@dataclass(frozen=True)
class ShiftExpert(ExpertSpec):
    """A learned bias at linear projections: ``Δ = scale·b``, b starting at 0."""

    kind: Literal["shift"] = field(default="shift", metadata=help_text("expert kind"))
    at: tuple[str, ...] = field(default=("@v",), metadata=help_text("module-path globs of the projections"))
    scale: float = field(default=1.0, metadata=help_text("the factor s of Δ = s·b"))
    layers: tuple[int, ...] | None = field(default=None, metadata=help_text("only these layer indices"))
    exclude: tuple[str, ...] = field(default=(), metadata=help_text("globs of module paths to leave out"))
    optional: bool = field(default=False, metadata=help_text("allow patterns to match nothing"))
    name: str = field(default="shift", metadata=help_text("expert name"))

    def __post_init__(self) -> None:
        check_rule(self)
        check_number("expert.shift.scale", self.scale, "(0, inf)")


class ShiftDelta(nn.Module):
    """``Δ = s·b`` for every token of the projection's input x (b: (d_out,), zeros)."""

    def __init__(self, d_out: int, scale: float, *, device=None, dtype=None) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scale * self.shift).expand(*x.shape[:-1], -1)


class ShiftKind(ExpertKind):  # in moa_fx/kinds/shift.py: decorated with @register
    spec = ShiftExpert
    site_pool = "linear"

    def insert(self, emit, placement) -> None:
        rule, site = placement.rule, placement.site
        y, x = emit.node(site.node), emit.node(site.input)
        device, dtype = emit.weight_device_dtype(site.weight)
        target = emit.install(0, lambda: ShiftDelta(site.d_out, rule.scale, device=device, dtype=dtype))
        with emit.inserting_before(y.next):
            delta = emit.add("call_module", target, (x,), anchor=y, role=f"expert {rule.name}", val=shaped_like(y))
        emit.slot(delta, anchor=y, index=0, count=1, layout="tokens", module=target, input=x)
        emit.record(f"shift, scale {rule.scale}")

    def parameter_count(self, rule: ShiftExpert, site) -> int:
        return site.d_out

# ---- end of the kind's file -----------------------------------------------------------------------


@pytest.fixture
def shift_kind():
    """Register the kind for one test and remove it after (a package kind registers at import)."""
    register(ShiftKind)
    yield KINDS["shift"]
    del KINDS["shift"], EXPERT_KINDS["shift"]


def test_the_parser_finds_the_kind_by_its_key(shift_kind, tmp_path):
    (tmp_path / "shift.toml").write_text('[[expert]]\nkind = "shift"\nat = ["*.k_proj", "*.v_proj"]\nscale = 0.5\n')
    spec = load_spec(str(tmp_path / "shift.toml"))
    assert spec.experts == (ShiftExpert(at=("*.k_proj", "*.v_proj"), scale=0.5),)


def test_shift_kind_equals_hooks_adding_the_shift(shift_kind):
    base = tiny_model("llama")
    spec = load_spec({"expert": [{"kind": "shift", "at": ["*.k_proj", "*.v_proj"], "scale": 0.5}]})
    moa = transform(base, spec)
    assert sorted({s.kind for s in moa.slots}) == ["shift"]
    g = torch.Generator().manual_seed(0)
    biases = {}
    with torch.no_grad():
        for name, p in moa.adapters.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
            biases[name.removesuffix(".shift.0.shift")] = p.clone()
    assert sorted(biases) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "v_proj")]
    ids = tokens()
    got = moa(input_ids=ids).logits

    def add(b):
        return lambda module, args, out: out + 0.5 * b

    hooks = [base.get_submodule(path).register_forward_hook(add(b)) for path, b in biases.items()]
    try:
        want = base(input_ids=ids).logits
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base(input_ids=ids).logits).abs().max() > 1e-2  # the biases really act


def test_sites_counts_the_parameters_the_transform_makes(shift_kind, tmp_path):
    from moa_fx.cli.models import load_model
    from moa_fx.cli.sites import sites_report

    (tmp_path / "shift.toml").write_text('[[expert]]\nkind = "shift"\nat = ["*.v_proj", "*.o_proj"]\n')
    report = sites_report("tiny-llama", str(tmp_path / "shift.toml"))
    trainable, _ = transform(load_model("tiny-llama")[0], str(tmp_path / "shift.toml")).trainable_parameter_count()
    assert report["ok"] and report["trainable"] == trainable == 2 * (32 + 64)  # v_proj: 2 kv heads × 16; o_proj: 64
