"""transformers' DynamicCache in and out of a cached graph, whose inputs are ids, mask, positions, past
keys…, past values… and whose outputs are logits, new keys…, new values… (:mod:`moa_fx.derive`).

- :func:`past_keys_values`: a cache's keys and values as the graph's flat inputs (empty for a fresh
  cache), refused when another model filled it or its layers, batch, dtype or device differ;
- :func:`cached_mask_positions`: the mask over past and new tokens, and the new tokens' positions;
- :func:`store`: the graph's new keys and values written into the cache, tagged with their owner.

A cache carries the tag of the model that filled it: keys and values computed with other adapters
(or by the base model) are refused rather than silently mixed.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import InputError

__all__ = ["past_keys_values", "cached_mask_positions", "store"]

OWNER = "_moa_fx_owner"  # the cache attribute holding its owner's tag


def past_keys_values(cache: Any, layout: list[tuple[int, int]], batch: int, device: torch.device, dtype: torch.dtype,
                     owner: str) -> tuple[tuple[list, list], Any]:
    """The past keys and values to feed the cached graph (``layout``: (kv heads, head dim) per layer),
    checked against the model whose caches carry the ``owner`` tag; empty ones for a fresh cache."""
    if cache is not None:
        from transformers import DynamicCache

        if not isinstance(cache, DynamicCache) or type(cache).__name__ != "DynamicCache":
            raise InputError(f"a {type(cache).__name__} was given as the cache; a transformed model uses "
                             "transformers' DynamicCache (pass DynamicCache() or let generate make one)")
    fresh = cache is None or cache.get_seq_length() == 0 and not any(
        getattr(layer, "keys", None) is not None and layer.keys.numel() for layer in getattr(cache, "layers", []))
    if fresh:
        empty = [torch.zeros(batch, h, 0, d, dtype=dtype, device=device) for h, d in layout]
        return (empty, [torch.zeros_like(t) for t in empty]), cache
    if getattr(cache, OWNER, None) != owner:
        raise InputError("this cache was filled by another model (or another spec, or the base model itself): "
                         "its keys and values do not belong to this model's adapters; start from an empty "
                         "DynamicCache() or pass none")
    if len(cache.layers) != len(layout):
        raise InputError(f"the cache has {len(cache.layers)} layers but this model has {len(layout)}")
    keys, values = [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    length = keys[0].shape[2]
    for i, ((h, d), k, v) in enumerate(zip(layout, keys, values)):
        want = (batch, h, length, d)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise InputError(f"cache layer {i} holds keys of shape {tuple(k.shape)}, but this call needs {want} "
                             "(batch, kv heads, past length, head dim): the cache comes from another batch or model")
        if k.dtype != dtype or k.device != device:
            raise InputError(f"cache layer {i} is {k.dtype} on {k.device} but the model is {dtype} on {device}; "
                             "start a new cache after moving the model")
    return (keys, values), cache


def cached_mask_positions(ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None,
                          past: tuple[list, list]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask over past and new tokens (all ones when None) and the new tokens' positions."""
    batch, seq = ids.shape
    length = past[0][0].shape[2] if past[0] else 0
    if mask is None:
        mask = torch.ones(batch, length + seq, dtype=torch.long, device=ids.device)
    if tuple(mask.shape) != (batch, length + seq):
        raise InputError(f"attention_mask has shape {tuple(mask.shape)}; with {length} cached tokens it must "
                         f"cover past and new tokens: ({batch}, {length + seq})")
    if pos is None:
        pos = torch.arange(length, length + seq, device=ids.device).expand(batch, seq)
    elif pos.shape[0] != batch:
        pos = pos.expand(batch, seq)
    return mask, pos.contiguous()


def store(cache: Any, keys: list, values: list, owner: str) -> Any:
    """Write the graph's new keys and values into ``cache`` (a new DynamicCache when None), tagged ``owner``."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if cache is None:
        cache = DynamicCache()
    while len(cache.layers) < len(keys):
        cache.layers.append(DynamicLayer())
    for i, (layer, k, v) in enumerate(zip(cache.layers, keys, values)):
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        if getattr(layer, "is_sliding", False):
            if k.shape[-2] >= layer.sliding_window:
                raise InputError(f"cache layer {i} is a sliding-window layer (window {layer.sliding_window}) and "
                                 f"the sequence has reached {k.shape[-2]} tokens: a transformed model keeps full "
                                 "caches only; generate at most window - 1 tokens in total")
            layer.cumulative_length = k.shape[-2]
        layer.keys, layer.values = k, v
    setattr(cache, OWNER, owner)
    return cache
