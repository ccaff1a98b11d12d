"""Graphs derived from a transformed model's state, one per :class:`GraphKey`, cached.

The state of a :class:`~moa_fx.runtime.MoAModel` is the frozen base model, the spec and the
adapter modules (experts, routers, thresholds: the only trainable parameters). Every graph it
runs is *derived* from that state and can be thrown away and derived again:

============================  ===================================================================
key                           derived how
============================  ===================================================================
forward, train                capture (train mode: the base model's dropout is in the graph) +
                              ``find_sites`` + the pass pipeline, installing the shared adapters
forward, eval                 :func:`strip_dropout` of the train graph (a rewrite; the same graph
                              object when the capture has no dropout)
forward, checkpointing        :func:`checkpoint_blocks` of the forward graph (a rewrite: each
                              decoder block becomes a submodule called through
                              ``torch.utils.checkpoint``)
cached (KV cache in and out)  a capture with the cache as graph inputs and outputs
                              (:func:`moa_fx.capture.capture` with ``cache=True``) + the same
                              passes; serves prefill (S ≥ 2) and one-token decode steps (S = 1)
cached, last logits           :func:`keep_last_logits` of the cached graph (a rewrite: the LM head
                              reads the last position only, as ``logits_to_keep=1`` does)
forward, causal               :func:`causal_attention` of the forward graph, for calls without an
                              attention mask (a rewrite: SDPA ``is_causal=True`` instead of the
                              causal mask materialised from the all-ones mask input)
forward, regions              :func:`compile_regions` of any forward graph but the checkpointing
                              one: what a forward call runs (the others are for inspection); each
                              decoder block one shared submodule called as a nested compile region
============================  ===================================================================

Moving the model to another device or dtype drops every graph: the next one is captured for the
new device and dtype (a graph holds device and dtype literals, and an fp32 capture cannot tell a
``.to(float32)`` that must stay from one that must follow the model's dtype).

Every derived graph installs the *same* adapter module objects (``PassContext.adapters``): what one
graph trains, another generates with. A derivation that would need an adapter the state does not
have (or leave one unused) is refused and leaves the state and the other graphs as they were.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
from torch import nn

from .capture import Captured, capture
from .errors import MoaFxError, PassError
from .ops import seed_at
from .graph import CACHE_KEY, EXTRAS_KEY, PROVENANCE_KEY, module_paths
from . import region_schema
from .passes import PassContext, pipeline, run_pipeline
from .sites import find_sites
from .spec import Spec

__all__ = ["GraphKey", "Derived", "DeriveOptions", "derive_by_capture", "strip_dropout", "checkpoint_blocks",
           "keep_last_logits", "keep_hidden", "causal_attention", "compile_regions", "has_dropout", "has_mode_ops",
           "PURPOSES"]

PURPOSES = ("forward", "cached")
aten = torch.ops.aten

_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default}
_SDPA = aten.scaled_dot_product_attention.default


class GraphKey(NamedTuple):
    """What a derived graph is for (a tuple, so a compiled forward can look it up)."""

    purpose: str = "forward"  # "forward" (no cache) | "cached" (KV cache in and out)
    dropout: bool = False  # the base model's own dropout is active (its modules are in train mode)
    checkpointing: bool = False  # each decoder block recomputed in backward
    last_logits: bool = False  # logits of the last position only (``logits_to_keep=1``)
    embeds: bool = False  # takes inputs_embeds instead of input_ids (a capture of its own)
    hidden: bool = False  # also returns every layer's hidden states (a capture with output_hidden_states)
    backbone: bool = False  # returns the LM head's input (the last hidden state) instead of the logits
    packed: bool = False  # input_ids and position_ids, no mask: rows packed from several sequences (a capture)
    causal: bool = False  # called without an attention mask: SDPA is_causal instead of the mask (a rewrite)
    regions: bool = False  # decoder blocks called as shared compile regions (a rewrite: compile_regions)

    def __str__(self) -> str:
        parts = [self.purpose, "train" if self.dropout else "eval"]
        parts += ["checkpointing"] * self.checkpointing + ["last logits"] * self.last_logits
        parts += ["inputs_embeds"] * self.embeds + ["hidden states"] * self.hidden + ["backbone"] * self.backbone
        parts += ["packed"] * self.packed + ["causal"] * self.causal + ["regions"] * self.regions
        return "/".join(parts)


@dataclass
class DeriveOptions:
    """How ``transform`` was called: every derivation repeats it."""

    example_inputs: Any = None
    dynamic: bool = True
    lower: str = "auto"
    fuse: bool = True
    until: str | None = None
    compile_regions: bool = True


@dataclass
class Derived:
    """One derived graph and what the passes recorded while making it."""

    key: GraphKey
    gm: fx.GraphModule
    captured: Captured
    records: list = field(default_factory=list)
    slots: list = field(default_factory=list)
    routers: dict = field(default_factory=dict)
    lowering: dict = field(default_factory=dict)
    placements: list = field(default_factory=list)
    how: str = "capture"
    seconds: float = 0.0

    @property
    def extras(self) -> list[tuple[str, str, str]]:
        """(kind, node name, router key) of each router output after the user outputs."""
        return list(self.gm.meta.get(EXTRAS_KEY, []))

    @property
    def num_outputs(self) -> int:
        return self.captured.num_outputs

    def replace_graph(self, gm: fx.GraphModule, key: GraphKey, how: str, seconds: float) -> "Derived":
        return dataclasses.replace(self, gm=gm, key=key, how=how, seconds=seconds)


# --------------------------------------------------------------------------------------------------
# derivation by capture
# --------------------------------------------------------------------------------------------------

def derive_by_capture(model: nn.Module, spec: Spec, adapters: nn.Module, options: DeriveOptions,
                      key: GraphKey, *, example_inputs: Any = None, train: bool = True) -> Derived:
    """Capture ``model`` for ``key`` and run the pass pipeline, installing ``adapters``' modules.

    The first derivation fills ``adapters``; later ones must use exactly the modules it holds. On
    failure, modules this call added are removed again. The global RNG is left as it was."""
    start = time.perf_counter()
    before = _leaf_names(adapters)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    # the first derivation initialises the adapters from the global RNG (as PEFT does); later ones
    # create nothing and must not move the RNG (a generate derived mid-sampling draws the same tokens)
    rng = torch.random.fork_rng(devices=devices) if before else contextlib.nullcontext()
    try:
        with rng, _config_flag(model, "output_hidden_states", True if key.hidden else None):
            if key.embeds:
                example_inputs = _embeds_inputs(model)
            elif key.packed:
                example_inputs = _packed_inputs(model)
            captured = capture(model, example_inputs, dynamic=options.dynamic, train=train,
                               cache=key.purpose == "cached")
            plan = find_sites(captured.gm, spec)
            ctx = PassContext(captured.gm, spec, plan, adapters=adapters)
            run_pipeline(ctx, pipeline(options.lower, options.fuse), until=options.until)
        if before:
            used = set(ctx.installed)
            if used != before:
                missing, extra = sorted(before - used), sorted(used - before)
                raise PassError(f"the {key} graph does not use the same adapters as the model's first graph "
                                f"(unused: {missing[:3]}, new: {extra[:3]}); this architecture's {key.purpose} "
                                "capture differs from its training capture")
    except BaseException:
        for name in sorted(_leaf_names(adapters) - before, reverse=True):
            _remove_module(adapters, name)
        raise
    return Derived(key=key, gm=captured.gm, captured=captured, records=ctx.records, slots=ctx.slots,
                   routers=ctx.routers, lowering=ctx.lowering, placements=list(ctx.plan.placements),
                   how="capture", seconds=time.perf_counter() - start)


@contextlib.contextmanager
def _config_flag(model: nn.Module, name: str, value: Any):
    """Set ``model.config.<name>`` for a capture (None: leave it), restoring it after."""
    config = getattr(model, "config", None)
    if value is None or config is None:
        yield
        return
    old = getattr(config, name, None)
    setattr(config, name, value)
    try:
        yield
    finally:
        setattr(config, name, old)


def _embeds_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Example ``inputs_embeds`` (2 × 8 × hidden, the embedding's dtype and device) and mask."""
    weight = model.get_input_embeddings().weight
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 8, weight.shape[1], generator=g).to(device=weight.device, dtype=weight.dtype)
    return {"inputs_embeds": embeds, "attention_mask": torch.ones(2, 8, dtype=torch.long, device=weight.device)}


def _packed_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Example ``input_ids`` and ``position_ids`` of two packed sequences per row (no mask: transformers
    then builds a block-diagonal causal mask from where the positions restart)."""
    from .capture import default_lm_inputs

    ids = default_lm_inputs(model)["input_ids"]
    pos = torch.cat([torch.arange(3), torch.arange(ids.shape[1] - 3)]).to(ids.device).expand(ids.shape).contiguous()
    return {"input_ids": ids, "position_ids": pos}


def _leaf_names(root: nn.Module) -> set[str]:
    """Paths of the installed adapter modules: non-container modules whose parent is a container and
    that hold state (a stateless helper, the lowering's dropout seeds, is in the graphs that lower only)."""
    containers = {name for name, m in root.named_modules() if type(m) is nn.Module}
    return {name for name, m in root.named_modules()
            if name and type(m) is not nn.Module and name.rpartition(".")[0] in containers
            and (any(True for _ in m.parameters()) or any(True for _ in m.buffers()))}


def _remove_module(root: nn.Module, name: str) -> None:
    *parents, leaf = name.split(".")
    owner = root
    for part in parents:
        owner = getattr(owner, part)
    delattr(owner, leaf)


# --------------------------------------------------------------------------------------------------
# derivation by rewrite
# --------------------------------------------------------------------------------------------------

def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph, sharing every parameter and submodule."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    graph._codegen = gm.graph._codegen
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    return new


def _is_base_node(node: fx.Node) -> bool:
    return node.op == "call_function" and PROVENANCE_KEY not in node.meta


def has_dropout(gm: fx.GraphModule) -> bool:
    """Whether the base model's own dropout is in the graph (SDPA with dropout_p > 0 included)."""
    for node in gm.graph.nodes:
        if not _is_base_node(node):
            continue
        if node.target in _DROPOUTS or (node.target is _SDPA and _sdpa_dropout(node) not in (0, 0.0)):
            return True
    return False


def has_mode_ops(gm: fx.GraphModule) -> bool:
    """Ops other than dropout whose train-mode form differs (batch norm): eval needs its own capture."""
    return any(n.op == "call_function" and "batch_norm" in str(n.target) for n in gm.graph.nodes)


def _sdpa_dropout(node: fx.Node) -> Any:
    if "dropout_p" in node.kwargs:
        return node.kwargs["dropout_p"]
    return node.args[4] if len(node.args) > 4 else 0.0


def strip_dropout(gm: fx.GraphModule) -> fx.GraphModule:
    """The eval graph of a train-mode capture: the base model's dropout becomes the identity.

    Matches: base-model (no provenance) ``aten.dropout``-family nodes and SDPA nodes with
    ``dropout_p > 0``. Emits: uses of the dropout's input, SDPA with ``dropout_p = 0``. Adapter
    dropout lives in adapter modules and follows their own train/eval mode."""
    new = copy_graph_module(gm)
    graph = new.graph
    for node in list(graph.nodes):
        if not _is_base_node(node):
            continue
        if node.target in _DROPOUTS:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        elif node.target is _SDPA and _sdpa_dropout(node) not in (0, 0.0):
            if "dropout_p" in node.kwargs:
                node.update_kwarg("dropout_p", 0.0)
            else:
                node.update_arg(4, 0.0)
    graph.lint()
    new.recompile()
    return new


def keep_last_logits(gm: fx.GraphModule, head_path: str) -> fx.GraphModule:
    """Logits of the last position only: the LM head (module ``head_path``) reads ``x[:, -1:]``.

    What follows the head (soft-capping, casts) is elementwise, so slicing its input equals slicing
    its output, without the other positions' vocabulary-wide GEMM."""
    new = copy_graph_module(gm)
    head = _lm_head(new, head_path)
    x = head.args[0]
    with new.graph.inserting_before(head):
        last = new.graph.call_function(aten.slice.Tensor, (x, 1, -1, 9223372036854775807))
        last.meta = {k: v for k, v in x.meta.items() if k != "val"}
        val = x.meta.get("val")
        if isinstance(val, torch.Tensor):
            last.meta["val"] = val[:, -1:]
    head.update_arg(0, last)
    new.graph.lint()
    new.recompile()
    return new


def keep_hidden(gm: fx.GraphModule, head_path: str) -> fx.GraphModule:
    """The backbone: the graph's first output (the logits) becomes the LM head's input, the last
    hidden state after the final norm, and the head (with what follows it) is removed as dead code."""
    new = copy_graph_module(gm)
    head = _lm_head(new, head_path)
    output = next(n for n in reversed(new.graph.nodes) if n.op == "output")
    outs = list(output.args[0])
    outs[0] = head.args[0]
    output.args = (tuple(outs),)
    new.graph.eliminate_dead_code()
    new.graph.lint()
    new.recompile()
    return new


# ops a plain causal mask is built from (transformers' sdpa_mask under tracing): index arithmetic
# and comparisons, no subtraction or division (a sliding window or chunked mask needs those)
_MASK_OPS = {aten.sym_size.int, aten.arange.default, aten.arange.start, aten.arange.start_step, aten.slice.Tensor,
             aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default, aten.le.Tensor,
             aten.lt.Tensor, aten.ge.Tensor, aten.gt.Tensor, aten.to.device, aten.to.dtype, aten.to.dtype_layout,
             aten._to_copy.default, aten.new_ones.default, aten.__and__.Tensor, aten.bitwise_and.Tensor,
             aten.logical_and.default, aten.index.Tensor, aten.where.self, aten.where.ScalarOther,
             aten.scalar_tensor.default, aten.full.default, aten.add.Tensor}
# the sizes the rewrite checks a mask at: the mask must equal tril at each (batch, sequence)
_MASK_CHECKS = ((1, 3), (2, 7), (3, 16))


def causal_attention(gm: fx.GraphModule, mask_input: str = "attention_mask") -> fx.GraphModule:
    """The graph a call without an attention mask runs: SDPA says ``is_causal=True`` instead of reading
    the causal mask the capture materialised from the (then all-ones) ``mask_input``, as transformers
    itself does eagerly when no mask is given. On CPU the materialised mask costs ~10% of SDPA's
    forward and a kernel per step that builds it (benchmarks/results/PROFILE_sparse_moa_compiled.md).

    Matches: base-model SDPA nodes without dropout whose ``attn_mask`` is computed only from the graph
    inputs through :data:`_MASK_OPS` (``add`` of a literal 0 only), and which evaluate to the lower
    triangle at every size in :data:`_MASK_CHECKS` when ``mask_input`` is all ones. Emits: the same
    SDPA with ``attn_mask=None, is_causal=True``; the mask nodes become dead code and are removed.
    Returns ``gm`` itself when nothing matches."""
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    if mask_input not in placeholders:
        return gm
    targets = [n for n in gm.graph.nodes if _is_base_node(n) and n.target is _SDPA and _sdpa_dropout(n) in (0, 0.0)
               and not _sdpa_flag(n, 5, "is_causal") and _causal_mask(_sdpa_mask(n), placeholders, mask_input)]
    if not targets:
        return gm
    new = copy_graph_module(gm)
    names = {n.name for n in targets}
    for node in new.graph.nodes:
        if node.op == "call_function" and node.name in names:
            args, kwargs = list(node.args[:3]), dict(node.kwargs)
            kwargs.update(attn_mask=None, dropout_p=0.0, is_causal=True)
            for i, name in ((6, "scale"), (7, "enable_gqa")):
                if len(node.args) > i:
                    kwargs[name] = node.args[i]
            node.args, node.kwargs = tuple(args), kwargs
    new.graph.eliminate_dead_code()
    new.graph.lint()
    new.recompile()
    return new


def _sdpa_mask(node: fx.Node) -> Any:
    return node.kwargs["attn_mask"] if "attn_mask" in node.kwargs else (node.args[3] if len(node.args) > 3 else None)


def _sdpa_flag(node: fx.Node, index: int, name: str) -> Any:
    return node.kwargs[name] if name in node.kwargs else (node.args[index] if len(node.args) > index else False)


def _causal_mask(mask: Any, placeholders: dict[str, fx.Node], mask_input: str) -> bool:
    """Whether ``mask`` is built from the inputs by index arithmetic only and is the lower triangle
    (bool: True below the diagonal; float: 0 there, ≤ -1e4 above) whenever ``mask_input`` is all ones."""
    if not isinstance(mask, fx.Node):
        return False
    nodes: list[fx.Node] = []
    stack = [mask]
    while stack:
        n = stack.pop()
        if n in nodes:
            continue
        if n.op == "placeholder":
            nodes.append(n)
            continue
        if n.op != "call_function" or n.target not in _MASK_OPS:
            return False
        if n.target is aten.add.Tensor and not any(a == 0 and not isinstance(a, bool) for a in n.args[1:]):
            return False
        nodes.append(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = sorted((n for n in nodes if n.op == "placeholder"), key=order.get)
    for n in sorted(nodes, key=order.get):
        env[n] = sub.placeholder(n.name) if n.op == "placeholder" else sub.node_copy(n, lambda a: env[a])
    sub.output(env[mask])
    fn = fx.GraphModule(torch.nn.Module(), sub)
    for batch, seq in _MASK_CHECKS:
        feed = [_example_input(p, batch, seq, ones=p.name == mask_input) for p in inputs]
        if any(f is None for f in feed):
            return False
        try:
            with torch.no_grad():
                value = fn(*feed)
        except Exception:  # an input this check cannot fake: leave the mask alone
            return False
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[-2:]) != (seq, seq) \
                or value.device.type == "meta":  # meta: no values (derived again once materialised)
            return False
        value = value.cpu()
        tril = torch.ones(seq, seq, dtype=torch.bool).tril().expand_as(value)
        if value.dtype == torch.bool:
            ok = torch.equal(value, tril)
        else:
            ok = bool((value[tril] == 0).all()) and bool((value[~tril] <= -1e4).all())
        if not ok:
            return False
    return True


def _example_input(node: fx.Node, batch: int, seq: int, ones: bool) -> torch.Tensor | None:
    """A (batch, seq, …) tensor like placeholder ``node``'s value: ones for the mask, zeros otherwise."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    rest = [int(d) for d in val.shape[2:]]
    return (torch.ones if ones else torch.zeros)(batch, seq, *rest, dtype=val.dtype)


def _lm_head(gm: fx.GraphModule, head_path: str) -> fx.Node:
    heads = [n for n in gm.graph.nodes if n.op == "call_function" and head_path in module_paths(n)
             and n.target in (aten.linear.default, aten.matmul.default, aten.mm.default)]
    if len(heads) != 1:
        raise PassError(f"cannot find the LM head '{head_path}' in the graph ({len(heads)} candidates)")
    return heads[0]


def _block_partitions(graph: fx.Graph, blocks: list[str], *, hoist_state: bool = False) -> list[dict]:
    """The nodes of each decoder block: those traced inside its module path (inserted experts and
    routers carry their anchor's module stack), plus helper nodes whose every user is in the block.
    ``hoist_state`` leaves out nodes that depend on no graph input (a site's dropout seed, work on
    parameters only): they can differ between blocks by constants, and outside they are the same work."""
    from_inputs: set[fx.Node] = set()
    for n in graph.nodes:  # a site's seed is an input's entry at a constant index: state, too
        if n.op == "placeholder" or n.target is not seed_at and any(a in from_inputs for a in n.all_input_nodes):
            from_inputs.add(n)
    paths = {n: set(module_paths(n)) for n in graph.nodes if n.op in ("call_function", "call_module")}
    partitions = []
    for path in blocks:
        part: dict[fx.Node, None] = {n: None for n, at in paths.items()
                                     if path in at and (not hoist_state or n in from_inputs)}
        if not part:
            continue
        grew = True
        while grew:  # untagged helpers (sym sizes, getitems) used only inside the block join it
            grew = False
            for n in graph.nodes:
                if n in part or n.op not in ("call_function", "call_module") or not n.users \
                        or (hoist_state and n not in from_inputs):
                    continue
                if all(u in part for u in n.users) and any(a in part for a in n.all_input_nodes):
                    part[n] = None
                    grew = True
        partitions.append(part)
    if not partitions:
        raise MoaFxError("no decoder blocks found to checkpoint; gradient checkpointing needs repeated blocks "
                         "(model.layers.N or similar)")
    return partitions


def _wrap_block_calls(fused: fx.GraphModule, wrapper: Callable, kwargs: dict) -> None:
    """Each ``call_module`` of a fused block becomes ``wrapper(block, *inputs, **kwargs)``."""
    for node in list(fused.graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith("moa_fx_block_"):
            continue
        with fused.graph.inserting_before(node):
            sub = fused.graph.get_attr(node.target)
            call = fused.graph.call_function(wrapper, (sub, *node.args), dict(kwargs))
            call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        fused.graph.erase_node(node)
    fused.graph.lint()
    fused.recompile()


def checkpoint_blocks(gm: fx.GraphModule, blocks: list[str], *, offload: bool = False,
                      **checkpoint_kwargs: Any) -> fx.GraphModule:
    """Activation checkpointing: each decoder block's nodes become one submodule called through
    ``torch.utils.checkpoint.checkpoint`` (non-reentrant by default, RNG state preserved, so dropout
    recomputes the same mask): backward recomputes the block instead of keeping its activations.

    Matches: the nodes of each block in ``blocks`` (:func:`_block_partitions`). Emits: one
    ``checkpoint(block_i, *inputs)`` call per block and ``getitem`` s of its outputs."""
    from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

    new = copy_graph_module(gm)
    fused = fuse_by_partitions(new, _block_partitions(new.graph, blocks), prefix="moa_fx_block_",
                               always_return_tuple=True)
    _wrap_block_calls(fused, _checkpoint, {**checkpoint_kwargs, "offload": offload})
    fused.meta.update(gm.meta)
    return fused


def compile_regions(gm: fx.GraphModule, blocks: list[str]) -> fx.GraphModule:
    """Decoder blocks as compile regions: each block's nodes become a submodule (its parameters are
    its inputs), blocks of the same structure share one submodule, and every call goes through
    :func:`_region`, a ``torch.compiler.nested_compile_region``. Eager runs the same ops in the same
    order; ``torch.compile`` traces and compiles a block once and reuses it for every block whose
    inputs have the same metadata, so compile time no longer grows with depth.

    Matches: the nodes of each block (:func:`_block_partitions`, work that depends on no input left
    outside). Emits: one ``_region(block, *inputs)`` call per block and ``getitem`` s of its outputs."""
    from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

    new = copy_graph_module(gm)
    partitions = _block_partitions(new.graph, blocks, hoist_state=True)
    for part in partitions:  # a module the block calls (a threshold, a prompt expert) becomes an input
        for node in [n for n in part if n.op == "call_module"]:
            with new.graph.inserting_before(node):
                module = new.graph.get_attr(node.target)
            node.op, node.target, node.args = "call_function", _call_module, (module, *node.args)
    fused = fuse_by_partitions(new, partitions, prefix="moa_fx_block_", always_return_tuple=True)
    first: dict[str, str] = {}  # structure -> the first block submodule with it
    for node in fused.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("moa_fx_block_"):
            shared = first.setdefault(_structure(fused.get_submodule(node.target)), node.target)
            if shared != node.target:
                fused.delete_submodule(node.target)
                node.target = shared
    _wrap_block_calls(fused, _region, {})
    _attach_first_block_grad(fused)
    fused.meta.update(gm.meta)
    return fused


def _attach_first_block_grad(fused: fx.GraphModule) -> None:
    """The first block's hidden input made to look like the later blocks' (needing grad, under
    torch.compile): its other inputs match theirs, so every block then calls the one compiled region
    instead of the first tracing a region of its own (the frozen embedding's output needs no grad).

    Matches: the first ``_region`` call sharing its block with the second, at the argument positions
    where the second reads the first's outputs. Emits: ``_attach_grad(x, *block_parameters)`` there."""
    calls = [n for n in fused.graph.nodes if n.op == "call_function" and n.target is _region]
    if len(calls) < 2 or calls[0].args[0].target != calls[1].args[0].target:
        return
    first, second = calls[:2]
    carried = [i for i, a in enumerate(second.args) if isinstance(a, fx.Node) and a.target is operator.getitem
               and a.args[0] is first]
    anchors = [a for a in first.args[1:] if isinstance(a, fx.Node) and a.op == "get_attr"]  # tensors, modules
    for i in carried:
        with fused.graph.inserting_before(first):
            attached = fused.graph.call_function(_attach_grad, (first.args[i], *anchors))
        first.update_arg(i, attached)
    fused.graph.lint()
    fused.recompile()


def _attach_grad(x: Any, *anchors: Any) -> Any:
    """``x`` as it is, except under ``torch.compile`` with grad on, when ``x`` needs no grad and a
    trainable tensor of the block does (:func:`_trainable_anchor`): then a copy that needs grad through
    it. Its backward gives neither a gradient; the cost is the first block's input gradient, which the
    shared compiled region computes anyway. Eager calls are unchanged."""
    if (not torch.compiler.is_compiling() or not isinstance(x, torch.Tensor) or x.requires_grad
            or not torch.is_grad_enabled() or not x.is_floating_point()):
        return x
    anchor = _trainable_anchor(anchors)
    return x if anchor is None else _AttachGrad.apply(x, anchor)


def _trainable_anchor(anchors: tuple[Any, ...]) -> torch.Tensor | None:
    """The first of ``anchors`` (a block's parameters, buffers and the modules it calls: experts,
    thresholds, prompts) that is, or whose module holds, a tensor needing grad; None when none does."""
    for a in anchors:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return a
        if isinstance(a, nn.Module):
            found = next((p for p in a.parameters() if p.requires_grad), None)
            if found is not None:
                return found
    return None


class _AttachGrad(torch.autograd.Function):
    """A copy of ``x`` that needs grad because ``anchor`` does; no gradient flows to either."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


def _structure(gm: fx.GraphModule) -> str:
    """``gm``'s graph with every node named by its position: equal for blocks that compute the same."""
    index: dict[fx.Node, int] = {}
    rows = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        args = fx.node.map_arg((node.args, node.kwargs), lambda a: f"%{index[a]}")
        rows.append(f"{node.op} {node.target if node.op != 'placeholder' else ''} {args!r}")
    return "\n".join(rows)


def _call_module(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return module(*args, **kwargs)


def _region(block: Callable, *args: Any) -> Any:
    """A decoder block's call: ``block(*args)`` eagerly; under ``torch.compile`` a region compiled once
    and reused for every block of the same structure and input metadata. (A graph target of its own:
    FX names the decorated function by the decorator's inner name, which it cannot import.)

    Blocks are inlined instead where a region call would fail: a backend without AOTAutograd
    (``backend="eager"``: torch cannot run a region's backward outside AOTAutograd's fake tensors), and
    ``dynamic=True`` (its floats, a dropout rate, become symbols, which a region call refuses)."""
    if torch.compiler.is_dynamo_compiling() and not _regions_compile():
        return block(*args)
    return _nested_region(block, *args)


@torch.compiler.assume_constant_result
def _regions_compile() -> bool:
    """Whether the compile being traced can call regions: its backend runs AOTAutograd (Inductor, the
    ``aot_*`` and ``cudagraphs`` backends, an ``aot_autograd(...)`` backend; another callable is not
    known to) and it is not ``dynamic=True``. Read once at trace time, a constant of the compiled graph;
    True when there is no Dynamo frame to ask (``torch.export``); False when torch's internals it reads
    are not there (another torch version): inlining is always right."""
    try:
        from torch._dynamo.backends.common import AotAutograd
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError):  # no current frame in this thread, or another torch
        return False
    if tx is None:
        return True
    if not torch._dynamo.config.assume_static_by_default:  # dynamic=True: every float a symbol
        return False
    compiler_fn = getattr(getattr(tx, "output", None), "compiler_fn", None)
    wrapper = getattr(compiler_fn, "_torchdynamo_orig_backend", compiler_fn)
    name = getattr(wrapper, "compiler_name", "")  # torch.compile's wrapper of a backend
    backend = getattr(wrapper, "compiler_fn", wrapper)
    regions = (type(wrapper).__name__ == "_TorchCompileInductorWrapper" or isinstance(backend, AotAutograd)
               or name.startswith("aot_") or name == "cudagraphs")
    if regions:  # each region's schema derived once, not at every call (moa_fx/region_schema.py)
        region_schema.install()
    return regions


def _nested_region(block: Callable, *args: Any) -> Any:
    return block(*args)


if hasattr(torch.compiler, "nested_compile_region"):  # torch >= 2.8; before it, blocks are inlined
    _nested_region = torch.compiler.nested_compile_region(_nested_region)


def _checkpoint(fn: Callable, *args: Any, offload: bool = False, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, ...)`` as a graph target;
    ``offload`` keeps the saved inputs in host memory (pinned when CUDA is there)."""
    import contextlib

    import torch.utils.checkpoint as cp

    if not torch.is_grad_enabled():
        return fn(*args)
    ctx = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload \
        else contextlib.nullcontext()
    with ctx:
        return cp.checkpoint(fn, *args, use_reentrant=False, **kwargs)


def block_paths(gm: fx.GraphModule) -> list[str]:
    """Decoder block paths (``model.layers.0`` …): the numbered children of the graph's repeated module list."""
    counts: dict[str, set[str]] = {}
    for node in gm.graph.nodes:
        for path in module_paths(node):
            parts = path.split(".")
            if len(parts) >= 2 and parts[-1].isdigit():
                counts.setdefault(".".join(parts[:-1]), set()).add(path)
    if not counts:
        return []
    parent = max(counts, key=lambda p: len(counts[p]))
    return sorted(counts[parent], key=lambda p: int(p.rsplit(".", 1)[1]))


def graph_outputs(gm: fx.GraphModule) -> list[Any]:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return list(output.args[0])


def cache_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if CACHE_KEY in n.meta]

