"""Prompt experts' keys pass through the model's key normalisation (k_norm), never through RoPE.

METHODS.md, Prompt-tuning expert: ``k_P = k_proj(P)``, no RoPE; the official MoA Qwen3 code also
applies the attention's ``k_norm`` (``prompt_k = self.k_norm(self.k_proj(prompt).view(...))``), as
the model does to its own keys. The reference here is plain torch on the HF modules' weights, run
inside the HF model through a registered attention function that adds the gated prompt output to
the attention output (the query it gets is the model's own, after RoPE). Every prompt, per-head gate
and k_norm weight is random.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from moa_fx import transform
from moa_fx.sites import find_sites
from moa_fx.spec.presets import get as preset
from tiny import TINY, tiny_config, tokens

REF = "moa_fx_prompt_reference"


def family_config(family: str):
    import transformers as tf

    if family == "qwen3":
        return tiny_config("qwen3")  # k_norm per head, before the transpose
    if family == "olmo2":  # k_norm over all kv heads at once, before the head split
        return tf.Olmo2Config(**TINY, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gemma3":  # k_norm per head after the transpose; RMSNorm scales by (1 + w)
        return tf.Gemma3TextConfig(**TINY, head_dim=16)
    if family == "cohere":  # LayerNorm per head with a (kv_heads, head_dim) weight (Command R+)
        return tf.CohereConfig(**TINY, use_qk_norm=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raise KeyError(family)


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def prompt_keys(family: str, attn, prompt: torch.Tensor) -> torch.Tensor:
    """k_P (kv_heads, L, hd): the key projection and key normalisation of the model, no RoPE."""
    length, kv_heads, hd = prompt.shape[0], attn.config.num_key_value_heads, attn.head_dim
    k = F.linear(prompt, attn.k_proj.weight, attn.k_proj.bias)
    if family == "qwen3":
        k = rms(k.view(length, kv_heads, hd), attn.k_norm.weight, attn.k_norm.variance_epsilon)
    elif family == "olmo2":
        k = attn.k_norm(k).view(length, kv_heads, hd)  # the HF module itself: its own formula
    else:  # gemma3, cohere: per head
        k = attn.k_norm(k.view(length, kv_heads, hd))
    return k.transpose(0, 1)


def prompt_output(family: str, attn, q: torch.Tensor, prompt: torch.Tensor, head_gate: torch.Tensor,
                  with_norm: bool = True) -> torch.Tensor:
    """``gate_h · softmax(q·k_Pᵀ/√hd) · v_P`` per head, (B, H, S, hd); v_P = v_proj(P), GQA by repetition."""
    length, kv_heads, hd = prompt.shape[0], attn.config.num_key_value_heads, attn.head_dim
    rep = q.shape[1] // kv_heads
    if with_norm:
        k = prompt_keys(family, attn, prompt)
    else:
        k = F.linear(prompt, attn.k_proj.weight, attn.k_proj.bias).view(length, kv_heads, hd).transpose(0, 1)
    v = F.linear(prompt, attn.v_proj.weight, attn.v_proj.bias).view(length, kv_heads, hd).transpose(0, 1)
    k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
    probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) / math.sqrt(hd), dim=-1)
    return head_gate.view(1, -1, 1, 1) * (probs @ v.float())


def reference_model(family: str, model, params: dict[str, torch.Tensor], with_norm: bool = True):
    """A copy of ``model`` whose attention adds the gated prompt output (gate 1: prompt_tuning has no router)."""
    # a copy of the config: set_attn_implementation below writes to it
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="sdpa").eval()
    ref.load_state_dict(model.state_dict())

    def attention(module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        path = f"model.layers.{module.layer_idx}.self_attn.prompt.0"
        delta = prompt_output(family, module, query, params[f"{path}.prompt"], params[f"{path}.head_gate"],
                              with_norm)
        return out + delta.transpose(1, 2).to(out.dtype), weights  # out is (B, S, H, hd)

    AttentionInterface.register(REF, attention)
    ref.set_attn_implementation(REF)
    return ref


@pytest.mark.parametrize("family", ["qwen3", "olmo2", "gemma3", "cohere"])
def test_prompt_keys_pass_through_k_norm(family):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(family), attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("k_norm.weight"):  # not the init's ones: the norm's weight must be applied
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.0 if family == "gemma3" else 1.0))
    moa = transform(model, "prompt_tuning")
    params = dict(moa.adapters.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if name.endswith(".prompt") else 0.5))
    assert len(params) == 2 * model.config.num_hidden_layers

    ids = tokens(seed=3)
    weight = torch.randn(ids.shape + (model.config.vocab_size,), generator=g)
    names = sorted(params)
    ref_logits = reference_model(family, model, params)(input_ids=ids).logits
    out = moa(input_ids=ids).logits
    torch.testing.assert_close(out, ref_logits, rtol=1e-5, atol=1e-5)
    base = model(input_ids=ids).logits
    assert float((out - base).abs().max()) > 1e-2, "the prompt experts act"
    # keys without k_norm (the earlier behaviour) give other logits: the check can tell them apart
    unnormed = reference_model(family, model, params, with_norm=False)(input_ids=ids).logits
    assert float((unnormed - ref_logits).abs().max()) > 1e-2

    got = torch.autograd.grad((out * weight).sum(), [params[n] for n in names])
    want = torch.autograd.grad((ref_logits * weight).sum(), [params[n] for n in names])
    for n, a, b in zip(names, got, want):
        assert float(b.abs().max()) > 0, n
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"grad {n}: {m}")


def test_sites_say_the_prompt_keys_pass_through_k_norm():
    from moa_fx.capture import capture

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("qwen3"), attn_implementation="sdpa").eval()
    plan = find_sites(capture(model).gm, preset("prompt_tuning"))
    site = plan.placements[0].site
    assert [op.path for op in site.k_ops] == ["model.layers.0.self_attn.k_norm"] and site.v_ops == ()
    assert site.k_ops[0].shape == (2, 16) and not site.k_ops[0].heads_first
    (note, paths), = plan.notes.items()
    assert "keys pass through k_norm" in note and "values" not in note
    assert set(paths) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}


def test_llama_prompt_keys_pass_through_nothing():
    from moa_fx.capture import capture

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa").eval()
    plan = find_sites(capture(model).gm, preset("prompt_tuning"))
    assert all(p.site.k_ops == () and p.site.v_ops == () and p.site.note == "" for p in plan.placements)
    assert plan.notes == {}
