"""Resolve the MODEL argument of every subcommand to an ``nn.Module``.

A MODEL is one of:

- a built-in tiny architecture (:data:`TINY`): ``tiny-llama``, ``tiny-qwen3``, ``tiny-qwen2``,
  ``tiny-mistral``, ``tiny-gemma``, ``tiny-phi3``, ``tiny-gpt2`` (hidden 64, 2 layers), plus
  ``small-llama`` (hidden 128, 4 layers: the default model of ``moa-fx train``). Weights are random,
  drawn from a fixed seed, so two loads give the same model;
- a ``config.json`` file: the architecture is built on the meta device (no weights, seconds even
  for an 8B model), good for ``dump``, ``sites`` and ``diff`` but not for ``train``;
- a local Hugging Face model directory (``config.json`` plus weights), loaded on the CPU.

>>> model, how = load_model("tiny-llama")   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import torch
from torch import nn

from ..errors import MoaFxError

__all__ = ["TINY", "Built", "build", "load_model", "tiny_config", "MODEL_HELP"]

MODEL_SEED = 0

# (config class name in transformers, its fields); shared fields are added by tiny_config.
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("LlamaConfig", {}),
    "tiny-qwen3": ("Qwen3Config", {"head_dim": 16}),
    "tiny-qwen2": ("Qwen2Config", {}),
    "tiny-mistral": ("MistralConfig", {"sliding_window": None}),
    "tiny-gemma": ("GemmaConfig", {"head_dim": 16}),
    "tiny-phi3": ("Phi3Config", {"pad_token_id": 0}),
    "tiny-gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    # initializer_range 0.2: with HF's 0.02 a frozen random base gives logits too flat for adapters
    # to fit any task (the loss floors near ln(vocab)); a wider init leaves them room to learn
    "small-llama": ("LlamaConfig", {"vocab_size": 32, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                                    "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.2}),
}

MODEL_HELP = ("a built-in architecture (" + ", ".join(TINY) + "; random weights from a fixed seed), "
              "a config.json (built on the meta device: no weights), or a local Hugging Face model directory")


def tiny_config(name: str, vocab_size: int = 256):
    """The transformers config of built-in architecture ``name``."""
    import transformers

    cls_name, fields = TINY[name]
    if cls_name == "GPT2Config":
        base = {"vocab_size": vocab_size}
    else:
        base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": vocab_size, "max_position_embeddings": 256,
                "tie_word_embeddings": False}
    # token ids inside the small vocabulary (the library defaults point past it)
    base.update(bos_token_id=1, eos_token_id=2)
    cfg = getattr(transformers, cls_name)(**{**base, **fields})
    cfg._attn_implementation = "sdpa"
    return cfg


def load_model(ref: str, *, vocab_size: int = 256) -> tuple[nn.Module, str]:
    """Build or load the model named by ``ref``; return it and how it was made ("tiny", "meta", "weights")."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if ref in TINY:
        cfg = tiny_config(ref, vocab_size)
        with _seeded(MODEL_SEED):
            model = AutoModelForCausalLM.from_config(cfg)
        return model.eval(), "tiny"
    path = pathlib.Path(ref)
    if not path.exists():
        import difflib

        close = difflib.get_close_matches(ref, list(TINY), n=2)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise MoaFxError(f"model '{ref}' is not a built-in architecture, a config.json or a model directory; {hint}"
                         f"built-ins: {', '.join(TINY)}")
    if path.is_file():
        if path.suffix != ".json":
            raise MoaFxError(f"model file '{ref}' must be a config.json (or give a model directory)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MoaFxError(f"'{ref}' is not valid JSON: {err}") from None
        cfg = _config_from_dict(data, ref)
        with torch.device("meta"):
            model = _sdpa_or_eager(lambda attn: AutoModelForCausalLM.from_config(cfg, attn_implementation=attn))
        return model.eval(), "meta"
    if not (path / "config.json").exists():
        raise MoaFxError(f"model directory '{ref}' has no config.json; point at a Hugging Face model directory")
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not has_weights:
        cfg = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            model = _sdpa_or_eager(lambda attn: AutoModelForCausalLM.from_config(cfg, attn_implementation=attn))
        return model.eval(), "meta"
    try:
        model = _sdpa_or_eager(lambda attn: AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation=attn))
    except (OSError, ValueError) as err:
        raise MoaFxError(f"cannot load the model in '{ref}': {err}") from None
    return model.eval(), "weights"


def _config_from_dict(data: dict, where: str):
    from transformers import AutoConfig

    model_type = data.get("model_type")
    if not model_type:
        raise MoaFxError(f"'{where}' has no 'model_type'; it is not a Hugging Face config.json")
    fields = {k: v for k, v in data.items() if k != "model_type"}
    try:
        cfg = AutoConfig.for_model(model_type, **fields)
    except (KeyError, ValueError) as err:
        raise MoaFxError(f"'{where}': transformers does not know model_type '{model_type}' ({err})") from None
    return cfg


def _sdpa_or_eager(make):
    """``make("sdpa")``, or ``make("eager")`` for architectures without SDPA attention (BLOOM)."""
    try:
        return make("sdpa")
    except ValueError as err:
        if "scaled_dot_product_attention" not in str(err):
            raise
        return make("eager")


class _seeded:
    """Fork the global torch RNG, seed it, and restore it on exit (loading a model leaves no trace)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._state = torch.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self._state)


def describe_model(model: nn.Module, how: str) -> str:
    n = sum(p.numel() for p in model.parameters())
    where = {"tiny": "random weights, seed 0", "meta": "meta device, no weights", "weights": "loaded weights"}[how]
    return f"{type(model).__name__} ({n / 1e6:,.1f}M parameters, {where})"


@dataclasses.dataclass
class Built:
    """A captured (and possibly rewritten) graph and where it came from."""

    gm: Any
    model: nn.Module
    how: str
    spec: Any = None
    plan: Any = None
    records: list = dataclasses.field(default_factory=list)


def build(ref: str, spec: Any = None, *, until: str | None = None, dynamic: bool | None = None,
          model: tuple[nn.Module, str] | None = None, lower: str = "auto", fuse: bool = True) -> Built:
    """Load ``ref``, capture it, and (with a spec) run the rewrite pipeline, up to pass ``until``.

    ``dynamic=None`` captures meta-device models with static example shapes (batch 2, sequence 8):
    for a 32-layer model most of the capture time is symbolic-shape reasoning, which inspection
    does not need; models with weights are captured with dynamic shapes as :func:`moa_fx.transform` does.
    """
    from ..capture import capture
    from ..passes import PassContext, pipeline, run_pipeline
    from ..sites import find_sites
    from ..spec import load_spec

    module, how = model if model is not None else load_model(ref)
    if dynamic is None:
        dynamic = how != "meta"
    captured = capture(module, dynamic=dynamic)
    built = Built(gm=captured.gm, model=module, how=how)
    if spec is not None:
        built.spec = load_spec(spec)
        built.plan = find_sites(captured.gm, built.spec)
        ctx = run_pipeline(PassContext(captured.gm, built.spec, built.plan), pipeline(lower, fuse), until=until)
        built.records = ctx.records
    elif until is not None:
        raise MoaFxError("--after needs --spec: passes run only when there is a spec to apply")
    return built


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
