"""Every preset on every transformers decoder family we claim: capture, transform, one training step,
save and load (identical logits); where a preset cannot apply, the error that says why.

One capture per family is shared by its presets: ``transform`` is called as users call it, with
``moa_fx.runtime.capture`` patched to hand out a deep copy of that capture (torch.export is ~2 s a
model, the rest of a transform well under one). :data:`EXPECTED_ERRORS` is the README's
family × preset table of what does not work and why; :func:`family_table` prints the table.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import moa_fx.runtime
from moa_fx import transform
from moa_fx.capture import capture
from moa_fx.errors import SiteMatchError
from moa_fx.spec.presets import PRESETS
from moa_fx.runtime import MoAModel
from tiny import TINY, randomize_adapters, slow_except, tiny_config, tokens

# hidden 64, 2 layers, 4 heads (2 kv heads), vocabulary 128; special tokens inside the vocabulary
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)


def family_config(family: str):
    import transformers as tf

    if family in ("llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "phi3", "gpt2"):
        return tiny_config(family)
    if family == "gemma2":
        return tf.Gemma2Config(**TINY, head_dim=16)
    if family == "gemma3":
        return tf.Gemma3TextConfig(**TINY, head_dim=16)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**SMALL, intermediate_size=128, max_position_embeddings=256)
    if family == "opt":
        return tf.OPTConfig(**SMALL, ffn_dim=128, max_position_embeddings=256, word_embed_proj_dim=64)
    if family == "falcon":  # falcon-7b layout: parallel attention, multi-query, fused qkv
        return tf.FalconConfig(**SMALL, new_decoder_architecture=False, multi_query=True)
    if family == "phi":  # phi-2: separate q/k/v, partial RoPE, parallel MLP
        return tf.PhiConfig(**SMALL, intermediate_size=128, max_position_embeddings=256)
    if family == "gptj":  # attn.{q,k,v,out}_proj, mlp.fc_in / fc_out, parallel attention and MLP
        return tf.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8,
                             bos_token_id=1, eos_token_id=2)
    if family == "bloom":  # fused per-head qkv, ALiBi, an MLP that takes the residual as a second input
        return tf.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2,
                              pad_token_id=0)
    classes = {"stablelm": tf.StableLmConfig, "granite": tf.GraniteConfig, "olmo": tf.OlmoConfig,
               "olmo2": tf.Olmo2Config, "cohere": tf.CohereConfig, "starcoder2": tf.Starcoder2Config}
    return classes[family](**TINY, bos_token_id=1, eos_token_id=2, pad_token_id=0)


# Architectures without an SDPA implementation in transformers run eager attention (softmax(q·kᵀ)·v by hand).
EAGER = {"gemma2", "bloom"}

FAMILY_LIST = ("llama", "qwen2", "qwen3", "mistral", "mixtral", "gemma", "gemma2", "gemma3", "phi3", "phi", "gpt2",
               "gpt_neox", "opt", "falcon", "gptj", "bloom", "stablelm", "granite", "olmo", "olmo2", "cohere", "starcoder2")

PROMPT_PRESETS = ("soft_moa", "prompt_tuning", "unipeft")
MLP_PRESETS = ("soft_moa", "sparse_moa", "parallel_adapter", "unipeft")
BLOCK_PRESETS = ("soft_moa", "sparse_moa")

# (family, preset) -> (error class, message fragment, reason for the README)
EXPECTED_ERRORS: dict[tuple[str, str], tuple[type, str, str]] = {}
for _p in PROMPT_PRESETS:
    EXPECTED_ERRORS["gpt_neox", _p] = (SiteMatchError, "head-split fused qkv",
                                       "prompt expert: fused qkv is interleaved per head")
    EXPECTED_ERRORS["bloom", _p] = (SiteMatchError, "indexed out of a fused qkv",
                                    "prompt expert: k/v are indexed out of the per-head fused qkv")
    EXPECTED_ERRORS["falcon", _p] = (SiteMatchError, "indexed out of a fused qkv",
                                     "prompt expert: multi-query k/v are indexed out of the fused qkv")
for _p in MLP_PRESETS:
    EXPECTED_ERRORS["opt", _p] = (SiteMatchError, "@mlp stands for",
                                  "@mlp: OPT has no MLP module (fc1/fc2 sit in the decoder layer)")
# every pattern of a rule must match: Mixtral's experts are fused 3-D weights, so '@down' finds no projection
for _p in ("lora", "mole_topk", "hydralora", "moe_lora_soft", "soft_moa", "sparse_moa", "unipeft"):
    EXPECTED_ERRORS["mixtral", _p] = (SiteMatchError, r"pattern \['@down'\] matched no linear projection .* fused 3-D",
                                      "@down: the experts are fused 3-D weights, no projection to adapt")

# choices a preset makes on a family without failing (``moa-fx sites`` prints them)
NOTES = {
    ("olmo2", "soft_moa/sparse_moa"): "no input norm on the block (OLMo2 norms after attention and MLP): the block "
                                      "router reads the raw block input",
    ("bloom", "@mlp"): "the MLP takes the hidden states and the residual: the adapter reads the input of dense_h_to_4h",
}




def build(family: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    attn = "eager" if family in EAGER else "sdpa"
    return AutoModelForCausalLM.from_config(family_config(family), attn_implementation=attn).eval()


@contextlib.contextmanager
def shared_capture(captured):
    """``transform`` as users call it, minus the repeated torch.export: each call gets a fresh copy."""

    def fake_capture(model, example_inputs=None, **options):
        clone = copy.copy(captured)
        clone.gm = copy.deepcopy(captured.gm)
        return clone

    # the module that calls torch.export on transform's behalf
    caller = moa_fx.derive if hasattr(moa_fx, "derive") and hasattr(moa_fx.derive, "capture") else moa_fx.runtime
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(caller, "capture", fake_capture)
        yield


def check_preset(model, preset: str, tmp_path) -> None:
    torch.manual_seed(0)
    moa = transform(model, preset)
    params = [p for p in moa.parameters() if p.requires_grad]
    assert params and all(not p.requires_grad for p in model.parameters())
    ids = tokens(2, 9)
    with torch.no_grad():  # equals the base model at initialisation (B = 0, gate_h = 0, PA ~ 0)
        torch.testing.assert_close(moa.eval()(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    moa.train()
    out = moa(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params), "no adapter got a gradient"
    opt = torch.optim.AdamW(params, lr=1e-2)
    opt.step()
    moa.eval()
    with torch.no_grad():
        want = moa(input_ids=ids).logits
    moa.save_adapters(tmp_path / preset)
    randomize_adapters(moa, seed=7)
    with torch.no_grad():
        assert not torch.equal(moa(input_ids=ids).logits, want)
    moa.load_adapters(tmp_path / preset)
    with torch.no_grad():
        assert torch.equal(moa(input_ids=ids).logits, want)


# the default run: the Llama layout, q/k-norm, eager attention with soft-capping, GPT-2's Conv1D, ALiBi with
# fused qkv, fused qkv + gate_up (CI budget); the other families are `slow`
DEFAULT_FAMILIES = ("llama", "qwen3", "gemma2", "gpt2", "bloom", "phi3")


@pytest.mark.parametrize("family", slow_except(FAMILY_LIST, DEFAULT_FAMILIES))
def test_every_preset_on_family(family, tmp_path):
    model = build(family)
    captured = capture(model)
    ids = tokens(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(captured.gm(ids, torch.ones_like(ids))[0], model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    with shared_capture(captured):
        for preset in PRESETS:
            expected = EXPECTED_ERRORS.get((family, preset))
            if expected is None:
                check_preset(model, preset, tmp_path)
            else:
                cls, fragment, _ = expected
                with pytest.raises(cls, match=fragment):
                    transform(model, preset)
        # a fresh transform from the saved directory alone gives the same logits
        preset = next(p for p in ("sparse_moa", "adamole") if (family, p) not in EXPECTED_ERRORS)
        ref = transform(model, preset)
        randomize_adapters(ref, seed=3)
        ref.save_adapters(tmp_path / "fresh")
        again = MoAModel.from_adapters(model, tmp_path / "fresh")
        ref.eval(), again.eval()
        with torch.no_grad():
            assert torch.equal(again(input_ids=ids).logits, ref(input_ids=ids).logits)


def family_table() -> str:
    """The README table: family × preset, 'works' or the reason."""
    head = "| family | " + " | ".join(PRESETS) + " |"
    rows = [head, "|" + "---|" * (len(PRESETS) + 1)]
    for fam in FAMILY_LIST:
        cells = [EXPECTED_ERRORS[fam, p][2] if (fam, p) in EXPECTED_ERRORS else "works" for p in PRESETS]
        rows.append(f"| {fam}{' (eager)' if fam in EAGER else ''} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(family_table())
