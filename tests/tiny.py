"""Tiny models shared by the tests: every family built from a transformers config, random weights."""

from __future__ import annotations

import torch
from torch import nn

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**TINY)
    if family == "qwen2":
        return tf.Qwen2Config(**TINY)
    if family == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=16)
    if family == "mistral":
        return tf.MistralConfig(**TINY)
    if family == "mixtral":
        return tf.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2)
    if family == "gemma":
        return tf.GemmaConfig(**TINY, head_dim=16)
    if family == "phi3":
        return tf.Phi3Config(**TINY, pad_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                             bos_token_id=0, eos_token_id=0)
    raise KeyError(family)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2", "mixtral")


def tiny_model(family: str = "llama", seed: int = 0, init: float | None = None):
    """A random tiny model; ``init`` overrides the weight std (0.02 leaves logits too flat to fit a task)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family)
    if init is not None:
        config.initializer_range = init
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def tokens(batch: int = 2, seq: int = 10, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def randomize_adapters(model, seed: int = 0, std: float = 0.2) -> None:
    """Give every adapter/router/threshold parameter random values (an untrained LoRA proves nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


class TinyMLP(nn.Module):
    """A plain nn.Module (no transformers): 8 → 16 → relu → 4, projections named ``up`` and ``down``."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))
