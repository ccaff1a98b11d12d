"""Spec parsing and validation: every bad field gets a named error; files equal the presets."""

from __future__ import annotations

import json
import pathlib

import pytest

from moa_fx.errors import SpecError
from moa_fx.spec import (LoraExpert, ParallelAdapterExpert, PromptExpert, RouterSpec, Spec, ThresholdSpec, load_spec,
                         presets, spec_from_dict, spec_reference, spec_to_dict, spec_to_toml)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_example_spec_files_equal_presets(name):
    from_file = load_spec(str(ROOT / "examples" / "specs" / f"{name}.toml"))
    assert spec_to_dict(from_file) == spec_to_dict(presets.get(name))
    assert load_spec(name) == presets.get(name)


def test_toml_json_dict_roundtrip(tmp_path):
    spec = presets.get("adamole")
    data = spec_to_dict(spec)
    (tmp_path / "s.json").write_text(json.dumps(data))
    (tmp_path / "s.toml").write_text(spec_to_toml(spec))
    assert load_spec(str(tmp_path / "s.json")) == spec
    assert load_spec(str(tmp_path / "s.toml")) == spec
    assert spec_from_dict(data) == spec


def test_heterogeneous_ranks_make_one_expert_per_rank():
    e = LoraExpert(at="*.q_proj", r=[4, 8, 16])
    assert e.ranks == (4, 8, 16)
    assert LoraExpert(at="*.q_proj", r=4, count=3).ranks == (4, 4, 4)


def test_layer_range_from_table():
    spec = spec_from_dict({"layers": {"from": 0, "to": 3}, "expert": [{"kind": "lora", "at": ["*.q_proj"]}]})
    assert spec.layers == (0, 1, 2, 3)


BAD = [
    ({"expert": [{"kind": "lorax", "at": "*.q_proj"}]}, "experts[0].kind = 'lorax' is not valid; choose one of 'lora'"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj", "r": -4}]}, "expert.lora.r = -4 is not valid; it must be a positive integer"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj", "r": "8"}]}, "experts[0] (lora).r = '8' has type str; expected"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj", "rank": 8}]}, "unknown field 'rank' (did you mean 'r'?)"),
    ({"expert": [{"kind": "lora", "at": []}]}, "expert.lora.at = () is not valid"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj", "dropout": 1.5}]}, "expert.lora.dropout = 1.5 is not valid; it must be in [0, 1)"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj", "dropout": 1e-15}]},
     "expert.lora.dropout = 1e-15 is not valid; a rate above 0 must be at least 1e-12"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj", "r": [4, 8], "share_a": True}]}, "a shared A needs every expert"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj", "count": 2}], "router": {"scope": "site", "select": "topk", "top_k": 3}},
     "router.top_k = 3 is not valid; expert 'lora' has only 2 experts per site; top_k must be <= 2"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj"}], "router": {"gate": "softplus"}},
     "router.gate = 'softplus' is not valid; choose one of 'softmax', 'sigmoid'"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj"}], "router": {"scope": "site", "select": "threshold",
                                                                 "threshold": {"max": 2.0}}},
     "router.threshold.max = 2.0 is not valid; it must be in (0, 1]"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj"}], "router": {"select": "topk"}},
     "router.select = 'topk' is not valid; without a router (scope = 'none') only 'dense' applies"),
    ({"expert": []}, "spec.experts is empty"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj"}, {"kind": "lora", "at": "*.v_proj"}]}, "expert names must be unique"),
    ({"expert": [{"kind": "lora", "at": "*.q_proj"}], "layers": {"from": 3, "to": 1}}, "a range needs integers 0 <= from <= to"),
    ({"expert": [{"kind": "prompt"}], "router": {"scope": "site"}}, "per-site routers gate LoRA experts only"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_spec_names_the_field(data, message):
    with pytest.raises(SpecError) as err:
        spec_from_dict(data)
    assert message in str(err.value)


def test_malformed_files(tmp_path):
    (tmp_path / "bad.toml").write_text("[router\nscope = 'site'")
    with pytest.raises(SpecError, match="is not valid TOML"):
        load_spec(str(tmp_path / "bad.toml"))
    (tmp_path / "bad.json").write_text("{\"expert\": [")
    with pytest.raises(SpecError, match="is not valid JSON"):
        load_spec(str(tmp_path / "bad.json"))
    with pytest.raises(SpecError, match="did you mean 'adamole'"):
        load_spec("adamol")


def test_reference_is_generated_from_field_help():
    ref = spec_reference()
    assert "| `top_k` | `2` | experts per token when select = 'topk' |" in ref
    assert "#### [[expert]] kind = 'parallel_adapter'" in ref


def test_specs_are_frozen():
    spec = Spec(experts=(LoraExpert(at="*.q_proj"),), router=RouterSpec())
    with pytest.raises(Exception):
        spec.name = "x"  # type: ignore[misc]


NON_DEFAULT = Spec(
    name="everything", description="every table with fields off their defaults", layers=(0, 2),
    experts=(LoraExpert(at=("*.q_proj",), r=(4, 8), alpha=16, dropout=0.1, exclude=("model.layers.1.*",),
                        optional=True, name="heads"),
             ParallelAdapterExpert(around=("*.mlp",), bottleneck=32, activation="gelu", init_gain=0.01, layers=(1,)),
             PromptExpert(at=("*.self_attn",), length=4, name="p")),
    router=RouterSpec(scope="model.layers.*", input="raw", form="swiglu", hidden_multiplier=2, bias=False,
                      gate="sigmoid", select="topk", top_k=3, renormalize=True, aux_loss_coef=0.01,
                      threshold=ThresholdSpec(learned=True, value=0.3, max=0.4, rule="moa")),
)


@pytest.mark.parametrize("spec", [*(presets.get(n) for n in sorted(presets.PRESETS)), NON_DEFAULT],
                         ids=[*sorted(presets.PRESETS), "non_default"])
def test_toml_roundtrip(tmp_path, spec):
    (tmp_path / "s.toml").write_text(spec_to_toml(spec, comment="a comment\nover two lines"))
    assert load_spec(str(tmp_path / "s.toml")) == spec


def test_toml_leaves_defaults_out():
    toml = spec_to_toml(Spec(experts=(LoraExpert(), PromptExpert())))
    assert toml == '[[expert]]\nkind = "lora"\n\n[[expert]]\nkind = "prompt"\n'
    written = dict(line.split(" = ", 1) for line in spec_to_toml(NON_DEFAULT).splitlines() if " = " in line)
    assert written["top_k"] == "3" and written["value"] == "0.3"  # off their defaults: written
    for default in ("share_a = ", "count = ", "optional = false", "exclude = []"):
        assert default not in spec_to_toml(NON_DEFAULT)


def test_allowed_values_come_from_the_literal():
    with pytest.raises(SpecError, match="expert.parallel_adapter.activation = 'tanh' is not valid; "
                                        "choose one of 'silu', 'relu', 'gelu'"):
        ParallelAdapterExpert(activation="tanh")
    with pytest.raises(SpecError, match="router.threshold.rule = 'x' is not valid; choose one of 'adamole', 'moa'"):
        ThresholdSpec(rule="x")
