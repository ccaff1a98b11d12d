"""Every preset equals the base model at initialisation, and the inits are METHODS.md's.

METHODS.md, Initial-equivalence property: B = 0, gate_h = 0 and PA weights ~1e-4 make every preset
the base model at init (exactly for LoRA and prompt, to ~1e-8 relative for PA).
"""

from __future__ import annotations

import math

import pytest
import torch

from moa_fx.spec.presets import PRESETS
from moa_fx.spec.presets import get as preset

from tiny import built, padded_tokens

from .reference import assert_close


def _init(name: str):
    b = built("llama", name, lambda: preset(name))
    b.moa.adapters.load_state_dict(b.init_state)  # other tests randomise the shared models in place
    return b


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_equals_base_at_init(name):
    b = _init(name)
    ids, mask = padded_tokens(seed=9)
    with torch.no_grad():
        base = b.hf(input_ids=ids, attention_mask=mask).logits
        for mode in ("train", "eval"):  # dropout on a zero B is still zero
            getattr(b.moa, mode)()
            # 1e-5 relative: exact for LoRA and prompt, ~1e-8 for the parallel adapter
            assert_close(b.moa(input_ids=ids, attention_mask=mask).logits, base, f"{name} ({mode}) at init")


def _bound(fan_in: int) -> float:
    return 1 / math.sqrt(fan_in)  # nn.Linear's Kaiming-uniform(a = √5) bound, for weights and biases


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_inits_follow_methods(name):
    b = _init(name)
    params = dict(b.moa.adapters.named_parameters())
    assert params, "a preset with no trainable adapter parameters"
    assert all(p.requires_grad for p in params.values())
    assert not any(p.requires_grad for p in b.moa.parameters() if all(p is not q for q in params.values()))
    for n, p in params.items():
        p = p.detach()
        if n.endswith("lora_A"):
            assert float(p.abs().max()) <= _bound(p.shape[1]) and float(p.std()) > 0.3 * _bound(p.shape[1]), n
        elif n.endswith("lora_B"):
            assert bool((p == 0).all()), n
        elif n.endswith("head_gate"):
            assert bool((p == 0).all()), n
        elif n.endswith("prompt.0.prompt"):  # nn.Embedding: N(0, 1)
            assert 0.8 < float(p.std()) < 1.2 and abs(float(p.mean())) < 0.2, n
        elif ".pa." in n and n.endswith("weight"):  # Xavier-uniform, gain 1e-4
            assert float(p.abs().max()) <= 1e-4 * math.sqrt(6 / sum(p.shape)) and float(p.abs().max()) > 0, n
        elif ".pa." in n and n.endswith("bias"):
            assert bool((p == 0).all()), n
        elif ".router.w" in n and n.endswith("bias"):  # SwiGLU router: biases 0
            assert bool((p == 0).all()), n
        elif ".router.w" in n:
            assert float(p.abs().max()) <= _bound(p.shape[1]), n
        elif ".router.proj." in n or ".threshold.proj." in n:  # nn.Linear default, bias too
            fan_in = params[n.rsplit(".", 1)[0] + ".weight"].shape[1]
            assert float(p.abs().max()) <= _bound(fan_in) and float(p.abs().max()) > 0, n
        else:
            raise AssertionError(f"no METHODS.md init known for {n}")
