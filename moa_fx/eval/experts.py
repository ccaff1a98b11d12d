"""What a routed model's routers do on held-out text: active experts, gates and thresholds per layer.

:func:`active_experts_per_layer` runs the model over prompts + right answers and reads
:meth:`moa_fx.MoAModel.router_stats` after each forward. The evaluation calls it before training and
after, so a report can say where the experts per token, the gates and a learned threshold τ moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from moa_fx.eval import tasks as T


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@torch.no_grad()
def active_experts_per_layer(moa, tokenizer, examples: Sequence[T.Example], max_len: int) -> dict[str, Any]:
    """Per layer, token-weighted means on held-out prompts + right answers (``{}`` without routers).

    ``per_layer``: experts selected per token; ``gate_per_layer``: the router's gate g averaged over
    its experts; ``threshold_per_layer`` (only where a router has one, as Sparse MoA and AdaMoLE do):
    the mean τ, the value a gate must pass to select its expert. Sequences of equal length are batched
    together, so no padding token enters the statistics (the router statistics count every position).
    Within a layer the routers are averaged (AdaMoLE and top-k have one per projection, MoA one per
    block); ``experts`` is E per router.
    """
    if not examples:
        return {}
    groups: dict[int, list[list[int]]] = {}
    for example in examples:
        prompt, choice = T.answer_tokens(tokenizer, example, max_len)
        groups.setdefault(len(prompt) + len(choice), []).append(prompt + choice)
    device = next(moa.parameters()).device
    was_training = moa.training
    moa.eval()
    sums: dict[str, dict[int, float]] = {"per_layer": {}, "gate_per_layer": {}, "threshold_per_layer": {}}
    weights: dict[str, dict[int, int]] = {key: {} for key in sums}
    tokens = 0
    experts: set[int] = set()
    try:
        for length, rows in sorted(groups.items()):
            if length < 2:
                continue
            ids = torch.tensor(rows, dtype=torch.long, device=device)
            moa(input_ids=ids, attention_mask=torch.ones_like(ids))
            stats = moa.router_stats()
            if not stats:
                return {}
            by_layer: dict[str, dict[int, list[float]]] = {key: {} for key in sums}
            for info in stats.values():
                layer = -1 if info["layer"] is None else info["layer"]
                by_layer["per_layer"].setdefault(layer, []).append(info["mean_active"])
                by_layer["gate_per_layer"].setdefault(layer, []).append(_mean(info["gate_mean"]))
                if info["threshold_mean"] is not None:
                    by_layer["threshold_per_layer"].setdefault(layer, []).append(info["threshold_mean"])
                experts.add(len(info["experts"]))
            n = ids.numel()
            tokens += n
            for key, layers in by_layer.items():
                for layer, values in layers.items():
                    sums[key][layer] = sums[key].get(layer, 0.0) + n * _mean(values)
                    weights[key][layer] = weights[key].get(layer, 0) + n
    finally:
        moa.train(was_training)
    out: dict[str, Any] = {}
    for key, layers in sums.items():
        if layers:
            out[key] = {str(layer): layers[layer] / weights[key][layer] for layer in sorted(layers)}
    out.update(mean=_mean(list(out["per_layer"].values())), experts=max(experts) if experts else None, tokens=tokens)
    out["gate_mean"] = _mean(list(out["gate_per_layer"].values()))
    if "threshold_per_layer" in out:
        out["threshold_mean"] = _mean(list(out["threshold_per_layer"].values()))
    return out
