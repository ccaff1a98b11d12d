"""The expert-kind registry: the built-in kinds, their order, and refusals."""

from __future__ import annotations

import pytest

from moa_fx.kinds import KINDS, kind_of, register
from moa_fx.kinds.lora import LoraKind
from moa_fx.sites import SITE_POOLS
from moa_fx.spec import EXPERT_KINDS, LoraExpert, ParallelAdapterExpert, PromptExpert


def test_built_in_kinds_in_insertion_order():
    assert list(KINDS)[:3] == ["lora", "parallel_adapter", "prompt"]
    for key, kind in KINDS.items():
        assert kind.key == key and EXPERT_KINDS[key] is kind.spec and kind.site_pool in SITE_POOLS
    assert [kind_of(r).site_pool for r in (LoraExpert(), ParallelAdapterExpert(), PromptExpert())] == \
        ["linear", "span", "attention"]


def test_spec_level_facts_live_on_the_spec_class():
    assert LoraExpert(r=[4, 8]).expert_count == 2 and LoraExpert(count=3).expert_count == 3
    assert ParallelAdapterExpert().expert_count == PromptExpert().expert_count == 1
    assert LoraExpert.routable_per_site and not PromptExpert.routable_per_site
    assert ParallelAdapterExpert(around="*.mlp").patterns == ("*.mlp",)


def test_a_taken_key_is_refused():
    class Other(LoraKind):
        pass

    with pytest.raises(ValueError, match="expert kind 'lora' is already registered as LoraKind"):
        register(Other)
    assert KINDS["lora"].spec is LoraExpert
