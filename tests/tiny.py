"""Tiny models shared by the tests: every family built from a transformers config, random weights.

- :func:`tiny_config`, :func:`tiny_model`: a two-layer model per family (``FAMILIES``), with HF's
  init, a chosen init std, or base weights re-drawn at unit scale (``init="unit"``, for the method
  tests: HF's N(0, 0.02) makes attention uniform and hides mistakes).
- :func:`tokens`, :func:`padded_tokens`: random input ids, and ids with a right-padded mask.
- :func:`randomize_adapters`: random values for every adapter parameter (an untrained LoRA proves nothing).
- :func:`built`: a session-wide cache of ``transform`` over unit-scale tiny models (the method tests).
- :class:`TinyMLP`: a plain ``nn.Module``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

# family -> (transformers config class, what it needs beyond TINY)
_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
}

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2", "mixtral")


def tiny_config(family: str, **overrides):
    """The tiny config of ``family``; ``overrides`` replace its fields (e.g. ``head_dim=32``)."""
    import transformers as tf

    if family == "gpt2":
        fields = dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0)
        return tf.GPT2Config(**{**fields, **overrides})
    name, extra = _CONFIGS[family]
    return getattr(tf, name)(**{**TINY, **extra, **overrides})


def tiny_model(family: str = "llama", seed: int = 0, init: float | Literal["unit"] | None = None, **overrides):
    """A random tiny model in eval mode.

    ``init``: None keeps HF's init; a float is its weight std (0.02 leaves logits too flat to fit a
    task); ``"unit"`` re-draws every base weight at unit scale (:func:`_unit_scale`).
    ``overrides``: config fields (:func:`tiny_config`).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    if init not in (None, "unit"):
        config.initializer_range = init
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if init == "unit":
        _unit_scale(model, seed)
    return model.eval()


def _unit_scale(model: nn.Module, seed: int) -> None:
    """Fan-in normal linears, N(0, 1) embeddings, norms 1 ± 0.1, anything else N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def tokens(batch: int = 2, seq: int = 10, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def padded_tokens(batch: int = 2, seq: int = 12, vocab: int = 128, seed: int = 1,
                  pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``: :func:`tokens`, with the last row right-padded by ``pad`` tokens."""
    ids = tokens(batch, seq, vocab, seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq - pad:] = 0
    return ids, mask


def _role_std(name: str, p: torch.Tensor) -> float:
    """The std of an adapter parameter by its role: LoRA deltas comparable to the base projection,
    router logits of order 1-2 (non-uniform gates), thresholds that vary per token."""
    fan_in = p.shape[1] if p.dim() == 2 else 0
    if name.endswith("lora_A"):
        return 1 / math.sqrt(fan_in)
    if name.endswith("lora_B"):
        return 0.5 / math.sqrt(fan_in)
    if ".router." in name or ".threshold." in name:
        if name.endswith("weight"):
            return 2.0 / math.sqrt(fan_in)
        if name.endswith("bias"):
            return 0.5
    if ".pa." in name and name.endswith("weight"):
        return 1 / math.sqrt(fan_in)
    if ".pa." in name and name.endswith("bias"):
        return 0.1
    if name.endswith("prompt.0.prompt") or name.endswith("head_gate"):
        return 1.0
    raise AssertionError(f"randomize_adapters does not know the role of parameter {name!r}")


def randomize_adapters(model, seed: int = 0, std: float | Literal["by_role"] = 0.2) -> None:
    """Random values for every adapter/router/threshold parameter of ``model`` (an untrained LoRA proves nothing).

    ``std``: one N(0, std²) for all; ``"by_role"``: a std per parameter chosen by its name
    (:func:`_role_std`), so every term is visible in the logits; an unknown name fails loudly.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.adapters.named_parameters():
            scale = _role_std(name, p) if std == "by_role" else std
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# --------------------------------------------------------------------------------------------------
# Transformed unit-scale models, one per spec for the whole session (the method tests)
# --------------------------------------------------------------------------------------------------

_BASES: dict = {}
_BUILT: dict = {}


@dataclass
class Built:
    hf: object  # the base model (its weights are shared with moa, frozen)
    moa: object  # the MoAModel
    init_state: dict  # the adapters' state right after transform (for init-equivalence tests)

    @property
    def params(self) -> dict:
        return dict(self.moa.adapters.named_parameters())

    @property
    def expert_ids(self) -> dict:
        return {k: list(v.expert_ids) for k, v in self.moa.routers.items()}


def base_model(family: str):
    """One unit-scale tiny base model per family for the whole session (transform shares, never edits, it).

    Qwen3 gets head_dim = 32 ≠ hidden/heads = 16, so head_dim is never inferred from the hidden size.
    """
    if family not in _BASES:
        _BASES[family] = tiny_model(family, init="unit", **({"head_dim": 32} if family == "qwen3" else {}))
    return _BASES[family]


def built(family: str, key: str, spec_fn, lower: str = "auto") -> Built:
    """``transform(base_model(family), spec_fn(), fuse=False, lower=lower)``, cached under ``(family, key, lower)``.

    Tests randomise the adapters in place before use; :attr:`Built.init_state` keeps the inits.
    Without the shared-input fusion: it only reorders sums (one GEMM over stacked weights), but the
    gradients here carry ~1000× cancellation, so a reordered fp32 sum can land past the method
    tests' bound (a multiple of the fp32 reference's own error) on single elements. The fused graph
    is checked against the unfused one instead: every preset in fp32, and to 1e-10 in float64
    (tests/passes/test_fuse_shared_input.py), so these equations hold for it too.
    """
    if (family, key, lower) not in _BUILT:
        from moa_fx import transform

        hf = base_model(family)
        moa = transform(hf, spec_fn(), fuse=False, lower=lower)
        init = {k: v.detach().clone() for k, v in moa.adapters.state_dict().items()}
        _BUILT[family, key, lower] = Built(hf, moa, init)
    return _BUILT[family, key, lower]


class TinyMLP(nn.Module):
    """A plain nn.Module (no transformers): 8 → 16 → relu → 4, projections named ``up`` and ``down``."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def slow_except(values, default_run):
    """Parameters for ``pytest.mark.parametrize``: the ``default_run`` ones plain, every other one marked
    ``slow`` (run by ``-m slow``), so the default run keeps one case of each kind and CI stays in budget."""
    import pytest

    unknown = set(default_run) - set(values)
    assert not unknown, f"slow_except: {sorted(map(str, unknown))} not among the values"
    return [v if v in default_run else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
            for v in values]
