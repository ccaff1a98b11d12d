"""What every pass shares: the context it reads and writes, and the record of what it did.

A pass is a function ``pass_fn(ctx: PassContext) -> None`` with a ``__doc__`` saying what it
matches and what it emits. It mutates ``ctx.gm.graph``, appends :class:`PassRecord` entries and
reads what earlier passes left in ``ctx`` (``slots``: the expert contributions waiting for a
combine; ``routers``: each router's nodes; ``combines``: the combine node at each anchor).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from ..graph import ADAPTER_ROOT, add_submodule, annotate
from ..sites import SitePlan
from ..spec import Spec

__all__ = ["PassContext", "PassRecord", "ExpertSlot", "RouterInfo", "new_node", "lora_weight_targets",
           "weight_columns"]


@dataclass
class PassRecord:
    """One change a pass made (or chose not to make): at which site, which nodes it added, what it
    decided and why as fields that tests and tools read, and a note for people.

    ``outcome`` and ``reason`` are short codes: ``lower_sparse_dispatch`` writes the site's form
    ("dense", "grouped", "unlowered") and a code of its ``REASONS``; ``fuse_shared_input`` writes
    "fused" or "kept", the kind of each reader in ``parts`` and, in ``kept``, the readers left apart
    with a code of its ``REASONS``.
    """

    pass_name: str
    site: str
    added: list[str] = field(default_factory=list)
    note: str = ""  # for people; what it says is in the fields below
    outcome: str = ""
    reason: str = ""
    experts: int = 0  # how many experts the change concerns (a site's LoRA experts, a router's columns)
    parts: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # node name -> reason code

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class ExpertSlot:
    """An expert's unweighted contribution Δ waiting to be weighted and added at its anchor."""

    expert_id: str  # the name the router addresses it by
    anchor: str  # node whose value Δ is added to (projection output, span output, SDPA output)
    delta: str  # node computing Δ
    router_key: str  # which router gates it: a site path, a block path, or "" (no router)
    layout: str  # "tokens" (…, d) or "heads" (B, H, S, hd)
    site: str  # module path of the site
    rule: str  # the expert rule's name
    kind: str  # lora | parallel_adapter | prompt
    module: str  # target of the expert module under the GraphModule
    input: str  # node the expert reads
    site_input: str = ""  # the site's input before any expert's input dropout (a site router reads it); "": input


@dataclass
class RouterInfo:
    """A router's nodes and the expert ids in column order."""

    key: str
    expert_ids: list[str]
    logits: str  # node: the router logits (fuse_shared_input points it at the node it rebuilds them as)
    tau: str | None  # node: the learned threshold τ (None without one; fuse_shared_input likewise)
    weights: str  # node: (…, E) weights
    stats: str  # node: router_stats vector
    aux: str | None  # node: balance loss scalar (None when the spec has no aux loss)


@dataclass
class PassContext:
    gm: fx.GraphModule
    spec: Spec
    plan: SitePlan
    records: list[PassRecord] = field(default_factory=list)
    slots: list[ExpertSlot] = field(default_factory=list)
    routers: dict[str, RouterInfo] = field(default_factory=dict)
    extra_outputs: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, node name, router key)
    combines: dict[str, str] = field(default_factory=dict)  # anchor -> its combine node (insert_routers)
    lowering: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> chosen form and reason

    # the adapter modules every graph derived from one model shares: install() reuses a module
    # already there and adds new ones to it; installed lists the targets this run asked for
    adapters: Any = None
    installed: list[str] = field(default_factory=list)

    _names: dict[str, fx.Node] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.adapters is None:
            self.adapters = nn.Module()
        if getattr(self.gm, ADAPTER_ROOT, None) is not self.adapters:
            self.gm.add_module(ADAPTER_ROOT, self.adapters)

    def node(self, name: str) -> fx.Node:
        """The graph node called ``name`` (nodes are looked up by name: passes store names, not nodes)."""
        found = self._names.get(name)
        if found is None or found.graph is not self.gm.graph or found.name != name:
            self._names = {n.name: n for n in self.gm.graph.nodes}
            found = self._names.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def install(self, target: str, make: Callable[[], nn.Module]) -> str:
        """The call target of the adapter module at ``target``: the shared one if it exists (another
        derived graph made it), else ``make()`` put under the adapter root."""
        full = f"{ADAPTER_ROOT}.{target}"
        self.installed.append(target)
        try:
            existing = self.adapters.get_submodule(target)
        except AttributeError:
            existing = None
        if existing is None or type(existing) is nn.Module:
            add_submodule(self.gm, full, make())
        return full


def new_node(ctx: PassContext, op: str, target: Any, args: tuple, *, anchor: fx.Node | None, pass_name: str,
             site: str, role: str, kwargs: dict | None = None, val: Any = None) -> fx.Node:
    """Create a node at the graph's current insertion point with metadata and provenance."""
    graph = ctx.gm.graph
    if op == "call_module":
        node = graph.call_module(target, args, kwargs)
    elif op == "get_attr":
        node = graph.get_attr(target)
    else:
        node = graph.call_function(target, args, kwargs)
    return annotate(ctx.gm, node, anchor, pass_name, site, role, val)


def lora_weight_targets(ctx: PassContext, slot: ExpertSlot) -> tuple[str, str]:
    """The ``get_attr`` targets of a LoRA slot's A and B. A HydraLoRA head reads the shared A from
    the head that owns it (the slot at the same site whose module is that owner)."""
    module = ctx.gm.get_submodule(slot.module)
    b = f"{slot.module}.lora_B"
    if "lora_A" in module._parameters:
        return f"{slot.module}.lora_A", b
    owner = module._shared[0]
    for s in ctx.slots:
        if s.site == slot.site and ctx.gm.get_submodule(s.module) is owner:
            return f"{s.module}.lora_A", b
    raise KeyError(f"the shared LoRA A of {slot.module} has no owner among the slots at {slot.site}")


def weight_columns(ctx: PassContext, slots: list[ExpertSlot]) -> tuple[str | None, list[int]]:
    """The weights node of the router gating ``slots`` (one router key) and each slot's column in it,
    looked up by expert id; ``(None, [0, 1, …])`` when no router gates them."""
    key = slots[0].router_key
    if not key:
        return None, list(range(len(slots)))
    info = ctx.routers[key]
    return info.weights, [info.expert_ids.index(s.expert_id) for s in slots]


def router_key(ctx: PassContext, placement) -> str:
    """Which router gates this placement's experts: '' (none), the site path, or the block path."""
    kind = ctx.spec.router.kind
    if kind == "none":
        return ""
    if kind == "site":
        return placement.site.path
    return placement.block


def expert_id(ctx: PassContext, placement, index: int, count: int) -> str:
    """The name a router addresses an expert by: ``lora.2`` per site, ``self_attn.q_proj:lora`` per block."""
    name = placement.rule.name if count == 1 and ctx.spec.router.kind == "block" else f"{placement.rule.name}.{index}"
    if ctx.spec.router.kind == "block":
        rel = placement.site.path[len(placement.block) + 1:] if placement.site.path != placement.block else ""
        return f"{rel}:{name}" if rel else name
    return name


def weight_device_dtype(ctx: PassContext, param_name: str):
    t = ctx.gm.get_parameter(param_name) if param_name in dict(ctx.gm.named_parameters()) else \
        ctx.gm.get_buffer(param_name)
    dtype = t.dtype if t.is_floating_point() else None
    return t.device, dtype
