"""The form of each lowered LoRA site, decided before any rewrite: the fused op's layout ("dense":
every (token, expert) pair, masked; "grouped": active pairs only) and the reason, which the lowering
pass stores on its nodes and ``moa-fx sites`` prints (:func:`plan_lowering`, without rewriting).

The form comes from :func:`moa_fx.kernels.choose_form` at a nominal token count and the expected
activation rate of the router's selection (dense 1, top-k k/E, threshold 1/2), unless the caller
forces ``"dense"`` or ``"grouped"``.
"""

from __future__ import annotations

import torch

from ..kernels import choose_form
from ..sites import SitePlan
from ..spec import LoraExpert, Spec

__all__ = ["decide", "plan_lowering", "dropout_reason", "NOMINAL_TOKENS", "FORM_REASONS"]

NOMINAL_TOKENS = 8192  # a training batch of 4 × 2048 tokens: the shape PERF.md measures
FORM_REASONS = {"cost_model": "cost model", "forced": "forced"}  # reason code -> its words (part of REASONS)


def _expected_rate(spec: Spec, num_experts: int) -> float:
    r = spec.router
    if r.kind == "none" or r.select == "dense":
        return 1.0
    if r.select == "topk":
        return min(1.0, r.top_k / num_experts)
    return 0.5


def decide(spec: Spec, ranks: list[int], dtype: torch.dtype, device: torch.device, d_in: int, d_out: int,
           form: str = "auto") -> tuple[str, str, str]:
    """(form, reason code, reason) for one lowerable LoRA site: "dense" or "grouped", chosen by the
    cost model (``form="auto"``) or forced."""
    rate = _expected_rate(spec, len(ranks))
    chosen, code = form, "forced"
    if form == "auto":
        chosen = choose_form(ranks, NOMINAL_TOKENS, rate, dtype, device, d_in=d_in, d_out=d_out)
        code = "cost_model"
    reason = (f"{FORM_REASONS[code]}: E={len(ranks)}, ranks={list(ranks)}, expected activation {rate:.2f} at "
              f"{NOMINAL_TOKENS} tokens, {str(dtype).replace('torch.', '')}, {device.type}")
    return chosen, code, reason


def plan_lowering(gm, plan: SitePlan, spec: Spec, form: str = "auto") -> dict[str, dict[str, str]]:
    """What :func:`lower_sparse_dispatch` will do at every LoRA site of ``plan``, without rewriting
    (what ``moa-fx sites`` prints)."""
    out: dict[str, dict[str, str]] = {}
    for p in plan.placements:
        if not isinstance(p.rule, LoraExpert):
            continue
        weight = gm.get_parameter(p.site.weight)
        chosen, _, reason = decide(spec, list(p.rule.ranks), weight.dtype, weight.device, p.site.d_in,
                                   p.site.d_out, form)
        if p.rule.dropout > 0 and not p.rule.share_a:  # HydraLoRA's heads read x already dropped: no dropout here
            reason = dropout_reason([float(p.rule.dropout)] * len(p.rule.ranks), reason)
        out[p.site.path] = {"form": chosen, "reason": reason}
    return out


def dropout_reason(ps: list[float], reason: str) -> str:
    """The lowering note of a site with input dropout: training runs ``dropout_lora``, eval the form."""
    return f"input dropout {sorted(set(ps))}: moa_fx::dropout_lora in training; in eval {reason}"
