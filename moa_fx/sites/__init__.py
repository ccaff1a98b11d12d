"""Where experts attach: a pure function from (graph, spec) to a list of placements.

- :mod:`moa_fx.sites.recognize`: the site kinds (:class:`LinearSite`, :class:`SpanSite`,
  :class:`AttentionSite`, :class:`BlockScope`) and the functions that find them in a graph.
- :mod:`moa_fx.sites.patterns`: module-path globs, regexes and roles (:data:`ROLES`), and
  :func:`match_rank`, their precedence.
- :mod:`moa_fx.sites.placement`: :func:`find_sites` applies the spec's rules and returns a
  :class:`SitePlan` (what ``moa-fx sites`` prints and the insertion pass reads; nothing mutates
  the graph); its docstring gives the precedence order with an example.
- :mod:`moa_fx.sites.hints`: the message for a pattern that matches nothing.
"""

from .patterns import ROLES, match_rank
from .placement import SITE_POOLS, Placement, SitePlan, SitePool, find_sites
from .recognize import (AttentionSite, BlockScope, LinearSite, PromptOp, SpanSite, attention_problem, attention_site,
                        block_scope, linear_sites, span_site)

__all__ = [
    "LinearSite",
    "SpanSite",
    "AttentionSite",
    "PromptOp",
    "BlockScope",
    "Placement",
    "SitePlan",
    "SitePool",
    "SITE_POOLS",
    "ROLES",
    "find_sites",
    "linear_sites",
    "span_site",
    "attention_site",
    "attention_problem",
    "block_scope",
    "match_rank",
]
