"""Block routers order their columns as METHODS.md's gate order: Q, K, V, [prompt], O, [up, gate], down, PA.

The graph computes act(gate(h)) before up(h), so graph order alone would put gate first; MoA's code
and METHODS.md put up first. The column order is also the order of every per-expert list that
``router_stats()`` reports.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moa_fx import transform
from moa_fx.spec.presets import get as preset
from tiny import tiny_model, tokens

# METHODS.md, MoA shared structure: "gate order: Q, K, V, [prompt], O, [up, gate], down, PA"
METHODS_ORDER = ["self_attn.q_proj:lora", "self_attn.k_proj:lora", "self_attn.v_proj:lora", "self_attn:prompt",
                 "self_attn.o_proj:lora", "mlp.up_proj:lora", "mlp.gate_proj:lora", "mlp.down_proj:lora", "mlp:pa"]


def soft_moa_with(at: tuple[str, ...], r=8):
    spec = preset("soft_moa")
    lora = dataclasses.replace(spec.experts[0], at=at, r=r)
    return dataclasses.replace(spec, experts=(lora, *spec.experts[1:]))


@pytest.mark.parametrize("at", [("@q", "@k", "@v", "@o", "@gate", "@up", "@down"),
                                ("@down", "@up", "@gate", "@o", "@v", "@k", "@q")])  # the spec's order is no input
def test_block_router_columns_follow_methods_order(at):
    model = tiny_model("llama")
    moa = transform(model, soft_moa_with(at))
    layers = model.config.num_hidden_layers
    assert {k: list(v.expert_ids) for k, v in moa.routers.items()} == \
        {f"model.layers.{i}": METHODS_ORDER for i in range(layers)}
    moa(input_ids=tokens())
    stats = moa.router_stats()
    assert all(s["experts"] == METHODS_ORDER and len(s["gate_mean"]) == len(METHODS_ORDER) for s in stats.values())


def test_several_experts_per_projection_keep_up_before_gate():
    moa = transform(tiny_model("llama"), soft_moa_with(("@q", "@gate", "@up", "@down"), r=(4, 8)))
    ids = list(moa.routers["model.layers.0"].expert_ids)
    assert ids == ["self_attn.q_proj:lora.0", "self_attn.q_proj:lora.1", "self_attn:prompt",
                   "mlp.up_proj:lora.0", "mlp.up_proj:lora.1", "mlp.gate_proj:lora.0", "mlp.gate_proj:lora.1",
                   "mlp.down_proj:lora.0", "mlp.down_proj:lora.1", "mlp:pa"]


def test_fused_gate_up_keeps_its_place():
    """Phi-3's gate_up_proj serves both roles: one site, one expert, between o and down."""
    moa = transform(tiny_model("phi3"), soft_moa_with(("@q", "@o", "@gate", "@up", "@down")))
    ids = list(moa.routers["model.layers.0"].expert_ids)
    assert ids == ["self_attn.qkv_proj:lora", "self_attn:prompt", "self_attn.o_proj:lora", "mlp.gate_up_proj:lora",
                   "mlp.down_proj:lora", "mlp:pa"]


def test_columns_gate_their_own_expert():
    """The up column gates up_proj's LoRA: forcing that column's gate to zero removes exactly that expert."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    moa = transform(model, soft_moa_with(("@gate", "@up")), fuse=False)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in moa.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ids = tokens()
    full = moa(input_ids=ids).logits
    layer = moa.adapters.get_submodule("model.layers.0")
    col = list(moa.routers["model.layers.0"].expert_ids).index("mlp.up_proj:lora")
    with torch.no_grad():
        layer.router.w2.bias[col] = -1e4  # sigmoid(−1e4) = 0: the up expert is off in layer 0
        no_up_gate = moa(input_ids=ids).logits
        layer.router.w2.bias[col] = 0.0
        layer.get_submodule("mlp.up_proj.lora.0").lora_B.zero_()  # the up expert removed instead
        no_up = moa(input_ids=ids).logits
    assert float((full - no_up).abs().max()) > 1e-3
    torch.testing.assert_close(no_up_gate, no_up, rtol=1e-5, atol=1e-6)
