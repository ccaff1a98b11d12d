"""Generation with a KV cache: the cached graph equals the full forward at every step.

Adapters are randomised (an untrained LoRA with B = 0 proves nothing). The reference for the
cache is the transformed model's own no-cache forward over the whole sequence (the train/eval
graph), and for plain LoRA also PEFT's ``generate`` with the same weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moa_fx import transform
from moa_fx.errors import InputError
from moa_fx.spec.presets import PRESETS
from tiny import TinyMLP, randomize_adapters, slow_except, tiny_model, tokens

ALL_PRESETS = sorted(PRESETS)


def _greedy_no_cache(moa, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The reference: re-run the full (no-cache) forward on the whole sequence for every new token."""
    seq, logits = ids, []
    with torch.no_grad():
        for _ in range(steps):
            last = moa(input_ids=seq).logits[:, -1].float()
            logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq, logits


def _randomized(family: str, preset: str, seed: int = 0):
    moa = transform(tiny_model(family, init=0.2), preset).eval()
    randomize_adapters(moa, seed=seed, std=0.2)
    return moa


# the default run: no router, per-site threshold with dropout, block router, prompt experts, parallel adapters
@pytest.mark.parametrize("preset", slow_except(ALL_PRESETS, ("lora", "adamole", "sparse_moa", "prompt_tuning",
                                                            "parallel_adapter")))
def test_greedy_generate_with_cache_equals_no_cache_loop(preset):
    moa = _randomized("llama", preset)
    ids = tokens(2, 6, seed=3)
    want, want_logits = _greedy_no_cache(moa, ids, 5)
    out = moa.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                       output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    assert torch.equal(out.sequences, want), preset
    for step, (got, ref) in enumerate(zip(out.logits, want_logits)):
        torch.testing.assert_close(got.float(), ref, rtol=1e-4, atol=1e-4, msg=f"{preset} step {step}")
    # the adapters matter: the base model alone generates something else or other logits
    with torch.no_grad():
        base_logits = moa.model(input_ids=ids).logits[:, -1]
    assert float((base_logits - want_logits[0]).abs().max()) > 1e-2


@pytest.mark.parametrize("family,preset", slow_except(
    [("gpt2", "lora"), ("gpt2", "soft_moa"), ("qwen3", "sparse_moa"), ("qwen3", "adamole"), ("mistral", "hydralora"),
     ("gemma", "prompt_tuning"), ("phi3", "mole_topk")], [("gpt2", "soft_moa"), ("qwen3", "adamole"),
                                                          ("gemma", "prompt_tuning")]))
def test_greedy_generate_other_families(family, preset):
    moa = _randomized(family, preset, seed=1)
    ids = tokens(2, 5, seed=4)
    want, _ = _greedy_no_cache(moa, ids, 4)
    out = moa.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                       pad_token_id=0)
    assert torch.equal(out, want), (family, preset)


@pytest.mark.parametrize("preset", slow_except(["soft_moa", "prompt_tuning", "sparse_moa", "adamole"],
                                               ["prompt_tuning", "sparse_moa"]))
def test_cached_steps_equal_full_forward_at_every_step(preset):
    """Prompt experts (position-free keys/values) and block routers (each new token routed) under
    the cache: logits and router statistics of each one-token step equal the full forward's last
    position."""
    from transformers import DynamicCache

    moa = _randomized("llama", preset, seed=2)
    ids = tokens(2, 9, seed=6)
    cache = DynamicCache()
    with torch.no_grad():
        out = moa(input_ids=ids[:, :4], cache=cache, use_cache=True)
        assert out.cache is cache and cache.get_seq_length() == 4
        for t in range(4, 9):
            step = moa(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True)
            full = moa(input_ids=ids[:, :t + 1])
            torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], rtol=1e-4, atol=1e-5)
            assert cache.get_seq_length() == t + 1
    assert any(key.startswith("cached") and how == "capture" for key, how, _ in moa.derivations)


def test_cache_is_like_the_base_models():
    from transformers import DynamicCache

    base = tiny_model("llama")
    moa = transform(copy.deepcopy(base), "lora").eval()
    ids = tokens(2, 7)
    with torch.no_grad():
        ref = base(input_ids=ids, use_cache=True)
        out = moa(input_ids=ids, use_cache=True)
        past = moa(input_ids=ids, past_key_values=DynamicCache(), use_cache=True).cache
    assert isinstance(out.cache, DynamicCache) and isinstance(past, DynamicCache)
    assert len(out.cache.layers) == len(ref.cache.layers)
    for mine, theirs in zip(out.cache.layers, ref.cache.layers):
        assert mine.keys.shape == theirs.keys.shape and mine.values.shape == theirs.values.shape
        # B = 0 at init: the adapted keys are the base model's
        torch.testing.assert_close(mine.keys, theirs.keys)
    torch.testing.assert_close(out.logits, ref.logits)
    # no cache unless asked for, as the Trainer expects
    assert moa(input_ids=ids).cache is None


def test_one_token_input():
    moa = _randomized("llama", "sparse_moa", seed=4)
    ids = tokens(2, 5, seed=8)
    with torch.no_grad():
        one = moa(input_ids=ids[:, :1]).logits
        two = moa(input_ids=ids[:, :2]).logits
    torch.testing.assert_close(one[:, 0], two[:, 0], rtol=1e-4, atol=1e-5)


def test_left_padded_batch_equals_rows_alone():
    moa = _randomized("llama", "soft_moa", seed=5)
    long, short = tokens(1, 7, seed=10), tokens(1, 4, seed=11)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    both = moa.generate(input_ids=ids, attention_mask=mask, **kw)
    alone_long = moa.generate(input_ids=long, attention_mask=torch.ones_like(long), **kw)
    alone_short = moa.generate(input_ids=short, attention_mask=torch.ones_like(short), **kw)
    assert torch.equal(both[0], alone_long[0])
    assert torch.equal(both[1, 3:], alone_short[0])


def test_seeded_sampling_equals_no_cache_sampling():
    moa = _randomized("llama", "mole_topk", seed=6)
    ids = tokens(2, 5, seed=12)
    torch.manual_seed(123)
    out = moa.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=True,
                       top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)
    # the same draws without a cache: softmax of the full forward's last logits, multinomial
    torch.manual_seed(123)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            probs = torch.softmax(moa(input_ids=seq).logits[:, -1].float(), dim=-1)
            seq = torch.cat([seq, torch.multinomial(probs, num_samples=1)], dim=1)
    assert torch.equal(out, seq)


def test_generation_options_eos_and_return_sequences():
    moa = _randomized("llama", "lora", seed=7)
    ids = tokens(1, 5, seed=13)
    greedy = moa.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = int(greedy[0, 6])  # the second generated token
    stopped = moa.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert stopped.shape[1] == 7 and int(stopped[0, -1]) == eos
    many = moa.generate(input_ids=ids, max_new_tokens=3, do_sample=True, num_return_sequences=3, pad_token_id=0)
    assert many.shape == (3, 8)
    beams = moa.generate(input_ids=ids, max_new_tokens=3, num_beams=3, do_sample=False, pad_token_id=0)
    assert beams.shape[0] == 1 and beams.shape[1] <= 8


def test_lora_generate_equals_peft():
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", init=0.2)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=8, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    moa = transform(base, "lora").eval()
    randomize_adapters(moa, seed=8, std=0.2)
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, p in moa.adapters.named_parameters():
            site, _, leaf = name.rpartition(".lora.0.")
            peft_params[f"base_model.model.{site}.{leaf}.default.weight"].copy_(p)
    peft_model.eval()
    ids = tokens(2, 6, seed=14)
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, output_logits=True,
              return_dict_in_generate=True, pad_token_id=0)
    mine = moa.generate(input_ids=ids, **kw)
    theirs = peft_model.generate(input_ids=ids, **kw)
    assert torch.equal(mine.sequences, theirs.sequences)
    for a, b in zip(mine.logits, theirs.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_caches_and_generate_on_a_plain_module():
    from transformers import DynamicCache

    moa = _randomized("llama", "lora")
    other = _randomized("llama", "lora", seed=9)
    ids = tokens(2, 5)
    with torch.no_grad():
        cache = other(input_ids=ids, use_cache=True).cache
        with pytest.raises(InputError, match="filled by another model"):
            moa(input_ids=ids[:, :1], cache=cache, use_cache=True)
        base_cache = moa.model(input_ids=ids, use_cache=True).cache
        with pytest.raises(InputError, match="filled by another model"):
            moa(input_ids=ids[:, :1], cache=base_cache, use_cache=True)
        mine = moa(input_ids=ids, use_cache=True).cache
        with pytest.raises(InputError, match="attention_mask has shape"):
            moa(input_ids=ids[:, :1], cache=mine, attention_mask=torch.ones(2, 1), use_cache=True)
        with pytest.raises(InputError, match="cache layer 0 holds keys"):
            moa(input_ids=ids[:1, :1], cache=mine, use_cache=True)
        with pytest.raises(InputError, match="one argument"):
            moa(input_ids=ids, cache=DynamicCache(), past_key_values=DynamicCache())
    plain = transform(TinyMLP(), {"expert": [{"kind": "lora", "at": ["up"], "r": 2}]},
                      example_inputs=(torch.randn(3, 5, 8),))
    with pytest.raises(InputError, match="not a causal LM"):
        plain.generate(torch.randn(3, 5, 8))
