"""Site finding across naming schemes: roles match every family's projections, every pattern of a rule
must match, multi-input spans and blocks without an input norm get a stated choice.

Each family is the tiny model of ``test_families`` (built from its transformers config, no download),
captured once.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from moa_fx.capture import capture
from moa_fx.errors import SiteMatchError, SpecError
from moa_fx.spec.presets import get
from moa_fx.sites import ROLES, find_sites, match_rank
from moa_fx.spec import load_spec
from test_families import build  # the tiny config of each family, eager where it must be

@functools.lru_cache(maxsize=None)
def graph(family: str):
    torch.set_num_threads(1)
    return capture(build(family)).gm


# layer 0's projection behind each role, per family
EXPECTED_ROLES = {
    "gptj": {"q": "attn.q_proj", "o": "attn.out_proj", "up": "mlp.fc_in", "down": "mlp.fc_out"},
    "gpt_neox": {"q": "attention.query_key_value", "o": "attention.dense", "up": "mlp.dense_h_to_4h",
                 "down": "mlp.dense_4h_to_h"},
    "bloom": {"q": "self_attention.query_key_value", "o": "self_attention.dense", "up": "mlp.dense_h_to_4h",
              "down": "mlp.dense_4h_to_h"},
    "falcon": {"q": "self_attention.query_key_value", "o": "self_attention.dense", "up": "mlp.dense_h_to_4h",
               "down": "mlp.dense_4h_to_h"},
    "opt": {"q": "self_attn.q_proj", "o": "self_attn.out_proj", "up": "fc1", "down": "fc2"},
    "phi": {"q": "self_attn.q_proj", "o": "self_attn.dense", "up": "mlp.fc1", "down": "mlp.fc2"},
}


@pytest.mark.parametrize("family", sorted(EXPECTED_ROLES))
def test_roles_cover_the_family(family):
    gm = graph(family)
    for role, tail in EXPECTED_ROLES[family].items():
        plan = find_sites(gm, load_spec({"expert": [{"kind": "lora", "at": [f"@{role}"]}]}))
        paths = [p.site.path for p in plan.placements]
        assert any(p.endswith(".0." + tail) for p in paths), (role, paths)
        assert len(paths) == 2, (role, paths)  # one per layer: nothing else answers to the role


def test_lora_preset_on_gptj_adapts_fc_out_as_down():
    plan = find_sites(graph("gptj"), get("lora"))
    tails = sorted({p.site.path.split(".", 3)[-1] for p in plan.placements})
    assert tails == ["attn.k_proj", "attn.out_proj", "attn.q_proj", "attn.v_proj", "mlp.fc_out"]


def test_an_unmatched_pattern_fails_the_rule_even_when_another_matches():
    spec = {"expert": [{"kind": "lora", "at": ["*.q_proj", "*.fc_outt"]}]}
    with pytest.raises(SiteMatchError) as info:
        find_sites(graph("gptj"), load_spec(spec))
    msg = str(info.value)
    assert "pattern ['*.fc_outt'] matched no linear projection (its other patterns ['*.q_proj'] did" in msg
    assert "did you mean '*.fc_out'" in msg and "remove the pattern or set optional = true" in msg
    spec["expert"][0]["optional"] = True  # optional: the patterns that match are placed, the others skipped
    plan = find_sites(graph("gptj"), load_spec(spec))
    assert [p.site.path for p in plan.placements] == ["transformer.h.0.attn.q_proj", "transformer.h.1.attn.q_proj"]


def test_an_unmatched_role_fails_the_rule():
    # OPT has no MLP module: '@mlp' in a rule with a matching pattern still fails
    spec = {"expert": [{"kind": "parallel_adapter", "around": ["@attn", "@mlp"]}]}
    with pytest.raises(SiteMatchError, match=r"pattern \['@mlp'\] matched no module \(its other patterns \['@attn'\] "
                                             r"did.*@mlp stands for '\*\.mlp'"):
        find_sites(graph("opt"), load_spec(spec))


def test_bloom_mlp_reads_the_input_of_its_first_projection():
    gm = graph("bloom")
    plan = find_sites(gm, get("parallel_adapter"))
    nodes = {n.name: n for n in gm.graph.nodes}
    for p in plan.placements:
        h = nodes[p.site.input]
        first = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default
                     and p.site.path + ".dense_h_to_4h" in str(n.meta.get("nn_module_stack", "")))
        assert first.args[0] is h  # the post-attention norm's output, not the residual
    (note, paths), = plan.notes.items()
    assert "takes 2 tensors; reading the one that feeds its first projection (dense_h_to_4h)" in note
    assert paths == ["transformer.h.0.mlp", "transformer.h.1.mlp"]


def test_olmo2_block_router_reads_the_raw_input():
    plan = find_sites(graph("olmo2"), get("sparse_moa"))
    assert all(b.normed is None for b in plan.blocks.values())
    (note, paths), = plan.notes.items()
    assert "no normalisation module on its input; the router reads the raw block input" in note
    assert paths == ["model.layers.0", "model.layers.1"]


@pytest.mark.parametrize("pattern", ["re:(.*)*x", "re:(a|ab)*c", "re:(x+x+)+y"])
def test_backtracking_regex_is_refused_before_matching(pattern):
    t0 = time.perf_counter()
    with pytest.raises(SpecError, match="not valid; this regular expression"):
        match_rank(pattern, "transformer.h.0.mlp.dense_4h_to_h" + "a" * 60)
    assert time.perf_counter() - t0 < 1.0


def test_role_table_names_only_globs():
    assert all(g.startswith("*.") for globs in ROLES.values() for g in globs)
