"""Single-expert LoRA in moa-fx equals PEFT's LoRA: logits and the gradient of every A and B.

Both get the same random A and B (an untrained LoRA with B = 0 proves nothing); PEFT edits its
model in place, so it gets a deep copy of the base model.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moa_fx import LoraExpert, RouterSpec, Spec, transform

from tiny import base_model, padded_tokens, randomize_adapters

from .reference import assert_close, assert_far, loss_and_grads, loss_weight

peft = pytest.importorskip("peft")

SPECS = {
    # the preset: r = 8, α = 8 on q, k, v, o, down (METHODS.md, MoA's LoRA baseline)
    "lora": ("lora", ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], 8, 8.0),
    # a glob spec with s = α/r = 4, so a wrong scale cannot hide behind s = 1
    "qv_r4_a16": (Spec(experts=(LoraExpert(at=("*.q_proj", "*.v_proj"), r=4, alpha=16),),
                       router=RouterSpec(scope="none")), ["q_proj", "v_proj"], 4, 16.0),
}


@pytest.fixture(scope="module")
def pairs():
    cache = {}

    def get(family: str, which: str):
        if (family, which) not in cache:
            spec, targets, r, alpha = SPECS[which]
            base = base_model(family)
            peft_model = peft.get_peft_model(
                copy.deepcopy(base),
                peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets))
            moa = transform(base, spec)
            cache[family, which] = (moa, peft_model)
        return cache[family, which]

    return get


def _peft_name(moa_name: str) -> str:
    # model.layers.0.self_attn.q_proj.lora.0.lora_A -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
    site, _, leaf = moa_name.rpartition(".lora.0.")
    return f"base_model.model.{site}.{leaf}.default.weight"


@pytest.mark.parametrize("which", list(SPECS))
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lora_equals_peft(pairs, family, which):
    moa, peft_model = pairs(family, which)
    moa_params = dict(moa.adapters.named_parameters())
    peft_params = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert {_peft_name(n) for n in moa_params} == set(peft_params), "the two put LoRA on different projections"

    randomize_adapters(moa, seed=3, std="by_role")
    with torch.no_grad():
        for name, p in moa_params.items():
            peft_params[_peft_name(name)].copy_(p)
    assert all(float(p.detach().abs().max()) > 0 for n, p in moa_params.items() if n.endswith("lora_B"))

    ids, mask = padded_tokens(seed=5)
    names = sorted(moa_params)
    out = moa(input_ids=ids, attention_mask=mask).logits
    ref = peft_model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids, attention_mask=mask).logits
    assert_far(plain, ref, "the adapters barely move the logits: the comparison would prove nothing")
    assert_close(out, ref, f"{family}/{which} logits")

    weight = loss_weight(out.shape, seed=7)
    g_moa = loss_and_grads(out, weight, [moa_params[n] for n in names])
    g_peft = loss_and_grads(ref, weight, [peft_params[_peft_name(n)] for n in names])
    for name, a, b in zip(names, g_moa, g_peft):
        assert b is not None and float(b.abs().max()) > 0, name
        assert_close(a, b, f"{family}/{which} grad {name}")
