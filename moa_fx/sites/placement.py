"""Placing a spec's expert rules at the sites of a graph: :func:`find_sites`.

Each rule's kind (:mod:`moa_fx.kinds`) names its site pool (:data:`SITE_POOLS`: projections,
module spans or attention ops); the rule's patterns (:mod:`moa_fx.sites.patterns`), ``exclude`` and
``layers`` pick sites from that pool; a :class:`SitePlan` holds the resulting :class:`Placement` s
in graph order and, for block routers, the blocks' :class:`~moa_fx.sites.BlockScope` s.

Precedence. When rules of the same expert kind match one site, the most specific pattern wins:
an exact path beats a glob or role, which beats a regex; two matches of equal rank are a conflict
(:class:`~moa_fx.errors.SiteMatchError`). Example::

    rule "all"   at = ["*.q_proj"]                          r = 8
    rule "first" at = ["model.layers.0.self_attn.q_proj"]   r = 16
    model.layers.0.self_attn.q_proj → "first" (exact path);  model.layers.1.self_attn.q_proj → "all"
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx

from ..errors import SiteMatchError, SpecError
from ..graph import all_module_paths, layer_index
from ..kinds import kind_of
from ..spec import ExpertSpec, Spec
from .hints import no_match
from .patterns import match_rank
from .recognize import BlockScope, LinearSite, attention_problem, attention_site, block_scope, linear_sites, span_site

__all__ = ["Placement", "SitePlan", "SitePool", "SITE_POOLS", "find_sites"]


@dataclass(frozen=True)
class Placement:
    """One expert rule placed at one site."""

    rule: ExpertSpec
    site: Any  # LinearSite | SpanSite | AttentionSite
    pattern: str  # the pattern that matched
    block: str | None  # the block scope path the site belongs to (block routers), else None


@dataclass
class SitePlan:
    """What the spec matched: the placements in graph order and the routers' scopes."""

    placements: list[Placement]
    blocks: dict[str, BlockScope] = field(default_factory=dict)
    matches: dict[str, list[str]] = field(default_factory=dict)  # rule name -> matched paths
    notes: dict[str, list[str]] = field(default_factory=dict)  # a choice made for the user -> the paths it concerns

    def by_rule(self, name: str) -> list[Placement]:
        return [p for p in self.placements if p.rule.name == name]


def _excluded(rule: ExpertSpec, path: str) -> bool:
    return any(match_rank(p, path) for p in rule.exclude)


def _layer_ok(rule: ExpertSpec, spec: Spec, path: str) -> bool:
    allowed = rule.layers if rule.layers is not None else spec.layers
    if allowed is None:
        return True
    idx = layer_index(path)
    return idx is not None and idx in allowed


@dataclass(frozen=True)
class SitePool:
    """Where a kind's sites come from (an expert kind names its pool by key, ``site_pool``).

    ``sites(gm, rule, linears)`` gives (path, site) pairs in graph order; for a pool of modules, the
    site is None where a matched module holds no site of this pool, and ``unfit(gm, path, linears)``
    says why.
    """

    noun: str  # what the pool's sites are called in messages
    sites: Callable[[fx.GraphModule, ExpertSpec, list[LinearSite]], list[tuple[str, Any]]]
    unfit: Callable[[fx.GraphModule, str, list[LinearSite]], str] | None = None
    projections: bool = False  # its sites are the graph's projections (the no-match hints look among those)


def _projection_sites(gm: fx.GraphModule, rule: ExpertSpec, linears: list[LinearSite]) -> list[tuple[str, Any]]:
    return [(s.path, s) for s in linears]


def _module_sites(find: Callable[[fx.GraphModule, str, list[LinearSite]], Any]):
    """A pool's ``sites``: every module the rule's patterns match, with ``find``'s site there."""

    def sites(gm: fx.GraphModule, rule: ExpertSpec, linears: list[LinearSite]) -> list[tuple[str, Any]]:
        return [(p, find(gm, p, linears)) for p in all_module_paths(gm)
                if any(match_rank(pat, p) for pat in rule.patterns)]

    return sites


def _no_span(gm: fx.GraphModule, path: str, linears: list[LinearSite]) -> str:
    return "has no single input and output tensor of the same shape"


def _no_attention(gm: fx.GraphModule, path: str, linears: list[LinearSite]) -> str:
    return "cannot take a prompt expert: " + (attention_problem(gm, path, linears) or "")


SITE_POOLS: dict[str, SitePool] = {
    "linear": SitePool("linear projection", _projection_sites, projections=True),
    "span": SitePool("module", _module_sites(lambda gm, path, linears: span_site(gm, path)), _no_span),
    "attention": SitePool("module", _module_sites(attention_site), _no_attention),
}


def _pool(rule: ExpertSpec) -> SitePool:
    name = kind_of(rule).site_pool
    if name not in SITE_POOLS:
        raise SiteMatchError(f"expert kind '{rule.kind}' names site pool '{name}'; pools: {', '.join(SITE_POOLS)}")
    return SITE_POOLS[name]


def find_sites(gm: fx.GraphModule, spec: Spec) -> SitePlan:
    """Match every expert rule of ``spec`` against ``gm``; raise if a required rule matches nothing."""
    linears = linear_sites(gm)
    all_paths = all_module_paths(gm)
    claims: dict[tuple[str, str], list[tuple[int, ExpertSpec, str]]] = {}
    matched: dict[str, list[str]] = {r.name: [] for r in spec.experts}
    sites: dict[tuple[str, str], Any] = {}
    notes: dict[str, list[str]] = {}
    for rule in spec.experts:
        pool = _pool(rule)
        hit: set[str] = set()
        for path, site in pool.sites(gm, rule, linears):
            ranks = [(match_rank(p, path), p) for p in rule.patterns]
            rank, pat = max(ranks)
            if rank == 0:
                continue
            hit.update(p for r, p in ranks if r)
            if _excluded(rule, path) or not _layer_ok(rule, spec, path):
                continue
            if site is None:
                what = pool.unfit(gm, path, linears)
                raise SiteMatchError(f"expert '{rule.name}': module '{path}' matched '{pat}' but {what}; "
                                     f"point the pattern at another module or add it to exclude")
            key = (rule.kind, site.node if hasattr(site, "node") else site.output)
            sites[key] = site
            claims.setdefault(key, []).append((rank, rule, pat))
            if getattr(site, "note", ""):
                notes.setdefault(f"expert '{rule.name}': {site.note}", []).append(path)
        # every pattern must match: a rule whose '@down' finds nothing while '@q' does would adapt
        # the model only partly, and silently
        missing = [p for p in rule.patterns if p not in hit]
        if missing and not rule.optional:
            raise no_match(rule, pool, all_paths, linears, missing, gm)
    placements = []
    for key, entries in claims.items():
        entries.sort(key=lambda e: -e[0])
        if len(entries) > 1 and entries[0][0] == entries[1][0]:
            a, b = entries[0], entries[1]
            raise SiteMatchError(
                f"experts '{a[1].name}' ('{a[2]}') and '{b[1].name}' ('{b[2]}') both claim "
                f"{sites[key].path} with equal precedence; make one pattern more specific (an exact path wins "
                "over a glob) or add the path to one rule's exclude")
        rank, rule, pat = entries[0]
        placements.append(Placement(rule=rule, site=sites[key], pattern=pat, block=None))
        matched[rule.name].append(sites[key].path)
    for rule in spec.experts:
        if not matched[rule.name] and not rule.optional:
            raise SiteMatchError(f"expert '{rule.name}' matched only modules that its layers/exclude settings or a "
                                 "more specific rule removed; widen 'layers' or set optional = true")
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    placements.sort(key=lambda p: order[getattr(p.site, "node", None) or p.site.output])
    blocks: dict[str, BlockScope] = {}
    router = spec.router
    if router.kind == "block":
        placed = []
        for p in placements:
            bpath = _block_of(router.scope, p.site.path)
            if bpath is None:
                raise SiteMatchError(f"router.scope '{router.scope}' matches no block around {p.site.path}; "
                                     "use a glob such as 'model.layers.*' (or '@blocks' to detect the blocks)")
            if bpath not in blocks:
                scope = block_scope(gm, bpath)
                if scope is None:
                    raise SiteMatchError(f"block '{bpath}' has no single input tensor to route on; "
                                         "choose a router.scope whose modules are whole decoder blocks")
                if router.input == "normed" and scope.normed is None:
                    # OLMo2 normalises after attention and MLP: no input norm to read
                    notes.setdefault("router: the block has no normalisation module on its input; the router "
                                     "reads the raw block input (router.input = 'raw')", []).append(bpath)
                blocks[bpath] = scope
            placed.append(dataclasses.replace(p, block=bpath))
        placements = placed
        if router.select == "topk":  # the spec alone cannot know how many experts a block holds
            per_block: dict[str, int] = {}
            for p in placements:
                per_block[p.block] = per_block.get(p.block, 0) + p.rule.expert_count
            fewest = min(per_block, key=per_block.get)
            if router.top_k > per_block[fewest]:
                raise SpecError(f"router.top_k = {router.top_k} is not valid for this model; block '{fewest}' holds "
                                f"only {per_block[fewest]} experts, so top_k must be <= {per_block[fewest]}")
    return SitePlan(placements=placements, blocks=blocks, matches=matched, notes=notes)


def _block_of(scope: str, path: str) -> str | None:
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if scope == "@blocks":
            if parts[i - 1].isdigit():
                return prefix
        elif match_rank(scope, prefix):
            return prefix
    return None
