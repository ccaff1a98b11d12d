"""Capture: every family exports with dynamic batch/sequence and matches eager; meta-device capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moa_fx import capture, transform
from moa_fx.errors import CaptureError, InputError
from moa_fx.sites import linear_sites
from tiny import FAMILIES, TinyMLP, tiny_model, tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_eager_with_dynamic_shapes(family):
    model = tiny_model(family)
    cap = capture(model)
    assert linear_sites(cap.gm), "no projection found"
    for batch, seq in [(2, 10), (3, 7), (1, 5)]:
        ids = tokens(batch, seq)
        mask = torch.ones_like(ids)
        got = cap.gm(ids, mask)[0]
        want = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_linear_sites_carry_module_paths():
    cap = capture(tiny_model("llama"))
    paths = [s.path for s in linear_sites(cap.gm)]
    assert paths[:3] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj"]
    assert paths[-1] == "lm_head"
    gpt2 = {s.path: s for s in linear_sites(capture(tiny_model("gpt2")).gm)}
    assert gpt2["transformer.h.0.attn.c_attn"].op == "addmm"
    assert (gpt2["transformer.h.0.attn.c_attn"].d_in, gpt2["transformer.h.0.attn.c_attn"].d_out) == (64, 192)


def test_plain_module_captures_and_transforms():
    torch.manual_seed(0)
    mlp = TinyMLP().eval()
    x = torch.randn(3, 5, 8)
    with pytest.raises(CaptureError, match="pass example_inputs"):
        capture(mlp)
    moa = transform(mlp, {"expert": [{"kind": "lora", "at": ["up", "down"], "r": 2}]}, example_inputs=(x,))
    torch.testing.assert_close(moa(x), mlp(x))
    x2 = torch.randn(7, 2, 8)
    torch.testing.assert_close(moa(x2), mlp(x2))
    with pytest.raises(InputError, match="contains NaN or inf"):
        moa(torch.full((3, 5, 8), float("nan")))


def test_capture_failure_names_the_model_and_frame():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be exported
                return self.lin(x)
            return x

    with pytest.raises(CaptureError) as err:
        capture(Broken(), (torch.randn(2, 3, 4),))
    msg = str(err.value)
    assert "could not capture Broken" in msg and "test_capture.py" in msg and "Try:" in msg


@pytest.mark.slow  # 32 layers of an 8B config on meta: ~18 s
def test_llama3_8b_shape_on_meta_device():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    moa = transform(model, "sparse_moa")
    trainable, _ = moa.trainable_parameter_count()
    # METHODS.md's table: Sparse MoA on LLaMA-3.1-8B = 22,289,120 trainable parameters
    assert trainable == 22_289_120
    out = moa(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert out.logits.shape == (1, 4, 128256) and out.logits.device.type == "meta"
