"""Prompt experts find the attention op from the graph: SDPA or the eager softmax(q·kᵀ)·v pattern."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moa_fx import transform
from tiny import randomize_adapters, tiny_config, tokens


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GQA with RoPE; fused c_attn (Conv1D)
def test_eager_attention_equals_sdpa_with_random_prompts(family):
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa").eval()
    eager = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    a = transform(sdpa, "soft_moa")
    randomize_adapters(a)  # prompts and per-head gates non-zero
    b = transform(eager, "soft_moa")
    b.adapters.load_state_dict(a.adapters.state_dict())
    assert [s.site for s in b.slots if s.kind == "prompt"] == [s.site for s in a.slots if s.kind == "prompt"]
    ids = tokens()
    torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    base = sdpa(input_ids=ids).logits
    assert (a(input_ids=ids).logits - base).abs().max() > 1e-3  # the prompt experts really act
