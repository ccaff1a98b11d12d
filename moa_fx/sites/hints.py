"""The message for a rule whose patterns match nothing: the nearest module paths, what a role
stands for, and why a fused expert weight is no projection."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

import torch.fx as fx

from ..errors import SiteMatchError
from ..spec import ExpertSpec
from .patterns import ROLES, match_rank
from .recognize import LinearSite

if TYPE_CHECKING:
    from .placement import SitePool

__all__ = ["no_match"]


def no_match(rule: ExpertSpec, site_pool: SitePool, all_paths: list[str], linears: list[LinearSite],
             patterns: list[str], gm: fx.GraphModule) -> SiteMatchError:
    """The error for ``patterns`` of ``rule`` that matched nothing in ``site_pool``, with the nearest
    module paths."""
    pool = [s.path for s in linears] if site_pool.projections else \
        [p for p in all_paths if p and not any(part.startswith("_") for part in p.split("."))]  # export's hooks
    # compare the last components first: '*.qproj' should find 'model.layers.0.self_attn.q_proj'
    tails = sorted({p.rsplit(".", 1)[-1] for p in pool})
    hints: list[str] = []
    for pat in patterns:
        stem = pat.rsplit(".", 1)[-1].strip("*?@")
        for t in difflib.get_close_matches(stem, tails, n=3, cutoff=0.5):
            hints.append(f"'*.{t}'")
    example = next((p for p in pool if hints and p.endswith(hints[0].strip("'*"))), pool[0] if pool else "")
    near = ", ".join(dict.fromkeys(hints)) or ", ".join(f"'{p}'" for p in difflib.get_close_matches(
        patterns[0], pool, n=3, cutoff=0.3))
    kind = site_pool.noun
    roles = [p for p in patterns if p.startswith("@")]
    why = "".join(f"; {r} stands for {', '.join(repr(g) for g in ROLES[r[1:]])} and this model has none of them"
                  for r in roles if r[1:] in ROLES)
    if site_pool.projections:  # Mixtral's experts: one (E, d_out, d_in) weight, no linear op per expert
        fused = [n for n, p in gm.named_parameters() if p.dim() == 3
                 and any(match_rank(pat, n) for pat in patterns)]
        if fused:
            why += (f"; '{fused[0]}' is a fused 3-D expert weight ({len(fused)} such), not a linear "
                    "projection LoRA can adapt")
    others = [p for p in rule.patterns if p not in patterns]
    partly = f" (its other patterns {others} did: the rule would adapt the model only in part)" if others else ""
    guess = f"did you mean {near}? (e.g. '{example}'; " if near else f"candidates include '{example}' ("
    fix = "remove the pattern or set optional = true" if others else "set optional = true to allow no match"
    return SiteMatchError(f"expert '{rule.name}': pattern {list(patterns)} matched no {kind}{partly}{why}; "
                          f"{guess}{len(pool)} candidates; {fix})")
