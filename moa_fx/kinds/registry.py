"""The expert-kind registry: what each ``kind = "<key>"`` of a spec is, where it goes, how it is built.

An expert kind is a subclass of :class:`ExpertKind` registered with :func:`register`; it declares

- ``spec``: its spec class (a frozen dataclass derived from :class:`~moa_fx.spec.ExpertSpec`;
  registering the kind registers the class, so the spec parser finds it by its ``kind`` key);
- ``site_pool``: the sites it attaches to, by name: ``"linear"`` (projections,
  :class:`~moa_fx.sites.LinearSite`), ``"span"`` (module boundaries, :class:`~moa_fx.sites.SpanSite`)
  or ``"attention"`` (attention ops, :class:`~moa_fx.sites.AttentionSite`);
  :func:`moa_fx.sites.find_sites` finds and checks the sites of each pool;
- :meth:`ExpertKind.insert`: the nodes it adds at one placement, through an
  :class:`~moa_fx.passes.insert_experts.Emitter` (the only thing of the pass context it sees);
- :meth:`ExpertKind.parameter_count`: the trainable parameters it adds at one site (what
  ``moa-fx sites`` reports without building the modules).

What the spec layer needs to know of a kind (the experts one rule places per site, whether a
per-site router may gate it) is on its spec class. ``docs/ARCHITECTURE.md`` ("Adding an expert
kind") walks through a whole new kind.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar

from ..spec import ExpertSpec, register_expert_spec

if TYPE_CHECKING:
    from ..passes.insert_experts import Emitter
    from ..sites import Placement

__all__ = ["ExpertKind", "KINDS", "register", "kind_of"]


class ExpertKind(abc.ABC):
    """One expert kind (see the module docstring for what each attribute means)."""

    spec: ClassVar[type[ExpertSpec]]
    site_pool: ClassVar[str]

    @property
    def key(self) -> str:
        """The spec's ``kind`` string for this kind."""
        return self.spec.__dataclass_fields__["kind"].default

    @abc.abstractmethod
    def insert(self, emit: Emitter, placement: Placement) -> None:
        """Add this kind's expert node(s) at ``placement``: modules via ``emit.install``, nodes via
        ``emit.add``, one ``emit.slot`` per expert, and one ``emit.record``."""

    @abc.abstractmethod
    def parameter_count(self, rule: Any, site: Any) -> int:
        """The trainable parameters ``rule`` adds at ``site``."""


KINDS: dict[str, ExpertKind] = {}


def register(cls: type[ExpertKind]) -> type[ExpertKind]:
    """Class decorator: make ``cls`` the kind its spec class's ``kind`` key names."""
    kind = cls()
    taken = KINDS.get(kind.key)
    if taken is not None and type(taken) is not cls:
        raise ValueError(f"expert kind '{kind.key}' is already registered as {type(taken).__qualname__}")
    register_expert_spec(cls.spec)
    KINDS[kind.key] = kind
    return cls


def kind_of(rule: ExpertSpec) -> ExpertKind:
    """The registered kind of an expert rule."""
    return KINDS[rule.kind]
