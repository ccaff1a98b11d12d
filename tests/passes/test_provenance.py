"""Every node a pass creates carries its module stack, a fake value and who made it."""

from __future__ import annotations

import pytest

from moa_fx import transform
from moa_fx.graph import PROVENANCE_KEY
from moa_fx.passes import DEFAULT_PIPELINE
from moa_fx.spec.presets import PRESETS
from tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def assert_pass_metadata(moa) -> None:
    """The shared check of STYLE.md item 5: module stack, fake value and provenance on new nodes."""
    passes = {p.__name__ for p in DEFAULT_PIPELINE}
    made = [n for n in moa.graph_module.graph.nodes if PROVENANCE_KEY in n.meta]
    assert made, "no node records a pass"
    for node in made:
        record = node.meta[PROVENANCE_KEY][-1]
        assert record["pass"] in passes and "site" in record, (node.name, record)
        assert "nn_module_stack" in node.meta, node.name
        if node.op != "get_attr":
            assert node.meta.get("val") is not None, (node.name, record)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_new_node_has_metadata(llama, name):
    moa = transform(llama, name)
    assert_pass_metadata(moa)
    moa.graph_module.graph.lint()
    assert {r.pass_name for r in moa.records} >= {"insert_routers", "cleanup"}
