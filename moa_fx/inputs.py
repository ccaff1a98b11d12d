"""What a call to a transformed model may pass, checked and named before any graph runs.

- :func:`lm_inputs`: a causal LM's call (``input_ids`` or ``inputs_embeds``, ``attention_mask``,
  ``position_ids``, the cache, ``use_cache``, ``logits_to_keep``, …) as one dict; an argument of the
  wrong type, shape or range, or one a transformed model does not take, is refused by name.
- :func:`plain_inputs`: a plain module's positional and keyword inputs in captured order, checked
  against the captured placeholders (dtype, rank, static sizes, finite values).
- :func:`learned_positions`: how many positions a learned position table embeds (lm_inputs' limit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .derive import Derived

__all__ = ["lm_inputs", "plain_inputs", "learned_positions"]

# padding-free batches (TRL's collator) carry flash-attention varlen hints that sdpa/eager attention ignore
_VARLEN_ARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
# forward arguments a transformed causal LM takes (beyond input_ids, attention_mask, labels)
_LM_ARGS = ("inputs_embeds", "position_ids", "past_key_values", "cache", "use_cache", "return_dict", "logits_to_keep",
            "num_items_in_batch", "output_attentions", "output_hidden_states", "cache_position")


def lm_inputs(args: tuple, kwargs: dict, *, config: Any, input_embeddings: Callable[[], nn.Module],
              max_positions: int | None, model_class: str) -> dict[str, Any]:
    """A causal LM call's arguments by name, each checked (``kwargs`` is edited in place); ``max_positions``
    is :func:`learned_positions`' limit, ``input_embeddings`` returns the embedding table (its width
    checks ``inputs_embeds``)."""
    names = ("input_ids", "attention_mask")
    if len(args) > 2:
        raise InputError("pass at most input_ids and attention_mask positionally")
    for name, value in zip(names, args):
        if name in kwargs:
            raise InputError(f"{name} was given both positionally and by keyword")
        kwargs[name] = value
    varlen = sorted(k for k in _VARLEN_ARGS if k in kwargs)
    if varlen:
        impl = getattr(config, "_attn_implementation", None) or "sdpa"
        if "flash" in str(impl):
            raise InputError(f"{varlen} are flash-attention varlen inputs; a transformed model runs "
                             f"{impl} attention only as the base model captured it (sdpa or eager)")
        for k in varlen:  # the base model's sdpa/eager attention ignores them too
            kwargs.pop(k)
    unknown = sorted(set(kwargs) - set(names) - set(_LM_ARGS))
    if unknown:
        raise InputError(f"unsupported input(s) {unknown}; a transformed causal LM takes input_ids, "
                         f"attention_mask, labels and {', '.join(_LM_ARGS)}")
    if kwargs.get("output_attentions"):
        raise InputError("output_attentions=True is not supported by a transformed model (its attention runs "
                         "fused, as SDPA); run the base model for attention weights")
    if kwargs.get("past_key_values") is not None and kwargs.get("cache") is not None:
        raise InputError("past_key_values and cache were both given; they are one argument (transformers 5 "
                         "calls it cache)")
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if embeds is not None:
        if ids is not None:
            raise InputError("give input_ids or inputs_embeds, not both")
        width = input_embeddings().weight.shape[1]
        if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point() or embeds.dim() != 3 \
                or embeds.shape[-1] != width or embeds.shape[1] < 1:
            raise InputError(f"inputs_embeds must be a float tensor of shape (batch, sequence, {width}); got "
                             f"{getattr(embeds, 'dtype', type(embeds).__name__)} {tuple(getattr(embeds, 'shape', ()))}")
        ids = None
    elif not isinstance(ids, torch.Tensor):
        raise InputError("input_ids is required: a LongTensor of shape (batch, sequence)")
    if ids is not None and (ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2):
        raise InputError(f"input_ids must be an integer tensor of shape (batch, sequence); got dtype "
                         f"{ids.dtype} and shape {tuple(ids.shape)}")
    if ids is not None and ids.dtype != torch.int64:
        ids = ids.long()
    if ids is not None and ids.shape[1] < 1:
        raise InputError("input_ids hold no tokens (sequence length 0)")
    if ids is not None and not torch.compiler.is_compiling() and ids.device.type != "meta" and ids.numel():
        vocab = int(config.vocab_size)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise InputError(f"input_ids hold ids in [{lo}, {hi}] but the vocabulary has {vocab} entries")
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dtype == torch.bool:
        mask = mask.long()
    keep = kwargs.get("logits_to_keep", 0)
    if keep is None:
        keep = 0
    if not isinstance(keep, (int, torch.Tensor)) or isinstance(keep, bool) or (isinstance(keep, int) and keep < 0):
        raise InputError(f"logits_to_keep = {keep!r} is not valid; give an int >= 0 (0 keeps every position) "
                         "or a tensor of positions")
    pos = kwargs.get("position_ids")
    seq = (ids if ids is not None else embeds).shape[1]
    cached = kwargs.get("cache", kwargs.get("past_key_values"))
    total = seq + (cached.get_seq_length() if hasattr(cached, "get_seq_length") else 0)
    if max_positions is not None and total > max_positions and pos is None:
        raise InputError(f"{total} positions but {model_class} has learned position embeddings for "
                         f"{max_positions}; shorten the input (or the generation) to at most "
                         f"{max_positions} tokens")
    if pos is not None and (not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[-1] != seq):
        raise InputError(f"position_ids must be a (batch, sequence) tensor matching the {seq} input tokens; "
                         f"got {getattr(pos, 'shape', type(pos).__name__)}")
    return {"input_ids": ids, "inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos,
            "output_hidden_states": kwargs.get("output_hidden_states"),
            "cache": kwargs.get("cache", kwargs.get("past_key_values")), "use_cache": kwargs.get("use_cache"),
            "return_dict": kwargs.get("return_dict"), "logits_to_keep": keep,
            "num_items_in_batch": kwargs.get("num_items_in_batch")}


def plain_inputs(derived: "Derived", args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """A plain module's inputs in captured order, checked against the graph's placeholders."""
    names = derived.captured.input_names
    flat = list(args) + [kwargs.pop(n) for n in names[len(args):] if n in kwargs]
    if kwargs:
        raise InputError(f"unexpected input(s) {sorted(kwargs)}; this model takes {list(names)}")
    if len(flat) != len(names):
        raise InputError(f"expected {len(names)} inputs {list(names)}, got {len(flat)}")
    placeholders = {n.name: n.meta.get("val") for n in derived.gm.graph.nodes if n.op == "placeholder"}
    for name, t in zip(names, flat):
        want = placeholders.get(name)
        if isinstance(want, torch.Tensor) and isinstance(t, torch.Tensor):
            _check_like(name, t, want)
    for name, t in zip(names, flat):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.compiler.is_compiling() \
                and t.device.type != "meta" and not torch.isfinite(t).all():
            raise InputError(f"input '{name}' contains NaN or inf; clean the data before the model sees it")
    return flat


def _check_like(name: str, t: torch.Tensor, want: torch.Tensor) -> None:
    """Refuse an input whose dtype, rank or static size differs from what the graph was captured with."""
    autocast = torch.is_autocast_enabled() and t.is_floating_point() and want.is_floating_point()
    if t.dtype != want.dtype and not autocast:
        raise InputError(f"input '{name}' has dtype {t.dtype}, but the model was captured with {want.dtype}; "
                         f"convert it with .to({want.dtype})")
    if t.dim() != want.dim() or any(isinstance(w, int) and w != s for w, s in zip(want.shape, t.shape)):
        shape = tuple(d if isinstance(d, int) else "dynamic" for d in want.shape)
        raise InputError(f"input '{name}' has shape {tuple(t.shape)}, but the model was captured with {shape}")


def learned_positions(model: nn.Module, config: Any) -> int | None:
    """The number of positions a model with a learned position table (GPT-2's wpe, OPT's) can embed;
    None for rotary or other positions that extend past the config's maximum."""
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings in (limit, limit + 2) and \
                module is not getattr(model, "get_input_embeddings", lambda: None)():
            return limit
    return None
