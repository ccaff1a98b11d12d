"""Recognising sites in a captured graph: the site kinds and the functions that find them.

Map: :class:`LinearSite` (a projection; :func:`linear_sites`), :class:`SpanSite` (a module
boundary; :func:`span_site`), :class:`AttentionSite` with its :class:`PromptOp` s (an attention op
and the frozen k/v projections feeding it; :func:`attention_site`, :func:`attention_problem` says
why a module has none), :class:`BlockScope` (a repeated block's raw and normalised input;
:func:`block_scope`). Everything is recognised from the ops, not from class names, and nothing
here mutates the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..graph import CACHE_KEY, layer_index, module_path, module_paths

__all__ = [
    "LinearSite",
    "SpanSite",
    "AttentionSite",
    "PromptOp",
    "BlockScope",
    "linear_sites",
    "span_site",
    "attention_site",
    "attention_problem",
    "block_scope",
]

aten = torch.ops.aten


@dataclass(frozen=True)
class LinearSite:
    """One projection: ``output = input @ weightᵀ (+ bias)`` (``aten.linear``, or ``addmm`` for Conv1D)."""

    path: str
    node: str  # the projection node's name
    input: str  # its input node's name
    weight: str  # parameter name of the weight
    d_in: int
    d_out: int
    layer: int | None
    op: str

    kind = "linear"


@dataclass(frozen=True)
class SpanSite:
    """A module boundary: the one tensor that enters it and the one that leaves it."""

    path: str
    input: str
    output: str
    dim: int
    layer: int | None
    note: str = ""  # how the input was chosen when the module takes several tensors of the output's shape

    kind = "span"


@dataclass(frozen=True)
class PromptOp:
    """A module between a key (value) projection and the attention op that reads nothing but the
    key and its own weights (Qwen3's per-head ``k_norm``, OLMo2's full-width one): the model's keys
    pass through it, so a prompt expert replays its nodes on the prompt's keys. RoPE reads the
    positions too and is not one of these (prompts have no position)."""

    path: str
    input: str  # the node it reads, shaped (batch, sequence, *shape) (or heads first, below)
    output: str  # the node it returns, shaped like its input
    nodes: tuple[str, ...]  # its nodes, in graph order
    shape: tuple[int, ...]  # the per-token shape it works on: (kv_heads, head_dim) per head, (kv_heads·head_dim,)
    heads_first: bool = False  # it reads (batch, kv_heads, sequence, head_dim), after the heads moved forward


@dataclass(frozen=True)
class AttentionSite:
    """The attention op of an attention module, with what a prompt expert needs from it."""

    path: str
    node: str  # the SDPA node
    query: str  # query after RoPE, (B, H, S, hd)
    q_heads: int
    kv_heads: int
    head_dim: int
    k_weight: str  # parameter names of the frozen key/value projections
    v_weight: str
    k_bias: str | None
    v_bias: str | None
    k_offset: int  # row offset of the key (value) block inside a fused qkv weight
    v_offset: int
    hidden: int
    layer: int | None
    scale: float | None
    transposed: bool = False  # weights stored (d_in, d_out), as GPT-2's Conv1D
    k_ops: tuple[PromptOp, ...] = ()  # what the keys pass through on the way to the attention op, in order
    v_ops: tuple[PromptOp, ...] = ()
    note: str = ""  # which of those modules the prompt's keys and values pass through

    kind = "attention"


@dataclass(frozen=True)
class BlockScope:
    """A repeated block (``model.layers.3``): its raw input and its normalised input."""

    path: str
    input: str
    normed: str | None
    dim: int
    layer: int | None

    kind = "block"


def _param_name(node: Any) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return str(node.target)
    return None


def _shape(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.numpy_T.default)


def _projection_weight(node: fx.Node) -> tuple[fx.Node, str, str] | None:
    """(input, weight name, op) when ``node`` projects against a module weight, else None."""
    if node.op != "call_function":
        return None
    if node.target == aten.linear.default and _param_name(node.args[1]):
        return node.args[0], _param_name(node.args[1]), "linear"
    if node.target == aten.addmm.default and _param_name(node.args[2]):
        return node.args[1], _param_name(node.args[2]), "addmm"  # GPT-2 Conv1D: weight is (d_in, d_out)
    if node.target in (aten.matmul.default, aten.mm.default) and isinstance(node.args[1], fx.Node) \
            and node.args[1].op == "call_function" and node.args[1].target in _TRANSPOSES \
            and _param_name(node.args[1].args[0]):
        return node.args[0], _param_name(node.args[1].args[0]), "matmul"  # x @ W.T (Falcon's FalconLinear)
    return None


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every projection against a module weight, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        found = _projection_weight(node)
        if found is None:
            continue
        x, w, op = found
        d_in, d_out = _param_shape(gm, w)[::-1] if op != "addmm" else _param_shape(gm, w)
        path = module_path(node) or w.rsplit(".", 1)[0]
        sites.append(LinearSite(path=path, node=node.name, input=x.name, weight=w, d_in=d_in, d_out=d_out,
                                layer=layer_index(path), op=op))
    return sites


def _param_shape(gm: fx.GraphModule, name: str) -> tuple[int, int]:
    obj: Any = gm
    for part in name.split("."):
        obj = getattr(obj, part)
    return tuple(obj.shape)  # type: ignore[return-value]


_CASTS = {aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.to.device, aten.to.dtype_layout}


def _span_nodes(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and path in module_paths(n)]


def span_site(gm: fx.GraphModule, path: str) -> SpanSite | None:
    """The single tensor entering and the single tensor leaving module ``path``, if there are."""
    nodes = _span_nodes(gm, path)
    if not nodes:
        return None
    inside = set(nodes)
    inputs: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and isinstance(a.meta.get("val"), torch.Tensor) \
                    and a.meta["val"].dim() >= 2:
                inputs.setdefault(a, None)
    # a dtype cast of the span's input that the outside also reads (export records the residual
    # as reading RMSNorm's no-op `.to(float32)`) is the input itself, not a span output
    # ... and a KV-cache tensor a cached capture returns (moa_fx.capture.CACHE_KEY) leaves the block
    # as a cache entry, not as the span's output
    outputs = [n for n in nodes if any(u not in inside for u in n.users) and isinstance(n.meta.get("val"), torch.Tensor)
               and not (n.target in _CASTS and isinstance(n.args[0], fx.Node) and n.args[0] not in inside)
               and not n.meta.get(CACHE_KEY)]
    if len(outputs) != 1:
        return None
    out = outputs[0]
    out_shape = _shape(out)
    cands = [i for i in inputs if _shape(i) == out_shape]
    note = ""
    if len(cands) > 1:  # BLOOM's MLP takes the hidden states and the residual: read what its projections read
        first, chosen = _first_projection_input(nodes, cands)
        if chosen is None:
            return None
        cands = [chosen]
        note = (f"the module takes {len(inputs)} tensors; reading the one that feeds its first projection "
                f"({module_path(first).rsplit('.', 1)[-1]})")
    if len(cands) != 1:
        return None
    return SpanSite(path=path, input=cands[0].name, output=out.name, dim=int(out_shape[-1]),
                    layer=layer_index(path), note=note)


def _first_projection_input(nodes: list[fx.Node], cands: list[fx.Node]) -> tuple[Any, fx.Node | None]:
    """(the first projection inside the span, the one candidate input it reads), following ops inside
    the span upwards; (…, None) when there is no projection or it reads several candidates."""
    inside = set(nodes)
    first = next((n for n in nodes if _projection_weight(n)), None)
    if first is None:
        return None, None
    found, frontier, seen = set(), [a for a in first.all_input_nodes if a.op != "get_attr"], set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in cands:
            found.add(n)
        elif n in inside:
            frontier.extend(a for a in n.all_input_nodes if a.op != "get_attr")
    return first, (found.pop() if len(found) == 1 else None)


def block_scope(gm: fx.GraphModule, path: str) -> BlockScope | None:
    """A block's raw input (same shape as its output) and its normalised input (first norm's output)."""
    span = span_site(gm, path)
    if span is None:
        return None
    names = {n.name: n for n in gm.graph.nodes}
    raw = names[span.input]
    normed = None
    # the normalised input: the output of the first child module that reads the raw input and
    # returns the same shape (input_layernorm, ln_1, ...)
    for user in raw.users:
        child = module_path(user)
        if child.startswith(path + ".") and "norm" in child.lower().rsplit(".", 1)[-1] or \
                child.startswith(path + ".ln"):
            sub = span_site(gm, child)
            if sub is not None and sub.input == raw.name:
                normed = sub.output
                break
    return BlockScope(path=path, input=raw.name, normed=normed, dim=span.dim, layer=layer_index(path))


def attention_site(gm: fx.GraphModule, path: str, linears: list[LinearSite]) -> AttentionSite | None:
    """The SDPA node inside module ``path`` and the frozen k/v projections feeding it
    (None when there is none; :func:`attention_problem` says why)."""
    site = _attention(gm, path, linears)
    return site if isinstance(site, AttentionSite) else None


def attention_problem(gm: fx.GraphModule, path: str, linears: list[LinearSite]) -> str | None:
    """Why module ``path`` cannot take a prompt expert, in words (None when it can)."""
    site = _attention(gm, path, linears)
    return None if isinstance(site, AttentionSite) else site


def _attention(gm: fx.GraphModule, path: str, linears: list[LinearSite]) -> AttentionSite | str:
    """The attention op is an SDPA node, or the eager pattern ``softmax(q @ kᵀ · s + mask) @ v``
    (found from the ops, not from class names): then the anchor is the second matmul, q the first
    matmul's left operand, k the operand under the transpose, v the second matmul's right operand."""
    nodes = _span_nodes(gm, path)
    sdpa = [n for n in nodes if n.target == aten.scaled_dot_product_attention.default]
    if len(sdpa) > 1:
        return f"{len(sdpa)} scaled_dot_product_attention ops, not one"
    if sdpa:
        node = sdpa[0]
        q, k, v = node.args[:3]
    else:
        found = _eager_attention(nodes)
        if found is None:
            return ("no attention op: neither scaled_dot_product_attention nor one softmax(q·kᵀ)·v pattern "
                    "(load the model with attn_implementation='sdpa' or 'eager')")
        node, q, k, v = found
    head_dim = int(_shape(q)[-1])
    by_node = {s.node: s for s in linears if s.path.startswith(path + ".") or s.path == path}
    k_lin, k_off, k_why = _trace_to_linear(k, by_node, head_dim)
    v_lin, v_off, v_why = _trace_to_linear(v, by_node, head_dim)
    if k_lin is None or v_lin is None:
        return f"its {'key' if k_lin is None else 'value'} does not come from a projection of its own: " + \
            (k_why if k_lin is None else v_why)
    qs = _shape(q)
    q_heads = int(qs[1])
    if k_lin.node == v_lin.node:  # fused qkv: d_out = (H_q + 2·H_kv)·hd
        kv_heads = (k_lin.d_out // head_dim - q_heads) // 2
    else:
        kv_heads = k_lin.d_out // head_dim
    if kv_heads <= 0 or q_heads % kv_heads or max(k_off, v_off) + kv_heads * head_dim > k_lin.d_out:
        return (f"its key/value projection {k_lin.path} (d_out {k_lin.d_out}) does not split into {q_heads} query "
                f"heads and a whole number of key/value heads of size {head_dim}")
    ops, skipped = {}, []
    for what, lin, end in (("key", k_lin, k), ("value", v_lin, v)):
        found = _prompt_ops(gm, path, nodes, lin, end, q, kv_heads * head_dim)
        if isinstance(found, str):
            return f"its {what} " + found
        ops[what], skip = found
        skipped += [m for m in skip if m not in skipped]
    scale = node.kwargs.get("scale")
    return AttentionSite(path=path, node=node.name, query=q.name, q_heads=q_heads, kv_heads=kv_heads,
                         head_dim=head_dim, k_weight=k_lin.weight, v_weight=v_lin.weight,
                         k_bias=_bias_of(gm, k_lin), v_bias=_bias_of(gm, v_lin),
                         k_offset=k_off, v_offset=v_off, hidden=k_lin.d_in, layer=layer_index(path),
                         transposed=k_lin.op == "addmm",
                         scale=float(scale) if scale is not None else None,
                         k_ops=ops["key"], v_ops=ops["value"], note=_prompt_note(path, ops, skipped))


def _prompt_note(path: str, ops: dict[str, tuple[PromptOp, ...]], skipped: list[str]) -> str:
    """What ``moa-fx sites`` says about a prompt expert's keys and values (module names relative to
    the attention module, so that every layer shares one note)."""
    parts = []
    for what in ("key", "value"):
        if ops[what]:
            names = ", ".join(op.path[len(path) + 1:] for op in ops[what])
            parts.append(f"the prompt's {what}s pass through {names}, as the model's {what}s do")
    if skipped:
        names = ", ".join(m[len(path) + 1:] for m in skipped)
        parts.append(f"not through {names} (it reads more than the key or value: positions, as RoPE does)")
    return "; ".join(parts)


def _prompt_ops(gm: fx.GraphModule, path: str, nodes: list[fx.Node], lin: LinearSite, end: fx.Node, q: fx.Node,
                width: int) -> tuple[tuple[PromptOp, ...], list[str]] | str:
    """The submodules of attention module ``path`` on the way from projection ``lin`` to the attention
    op's input ``end`` that a prompt's keys (values) pass through, in order, and those they skip
    because they read more than the key (RoPE reads the positions); or, as a string, why a module on
    the way cannot be replayed.

    Only submodules count: the ops written in the attention's own forward between the projection
    and the attention op are reshapes, RoPE and the GQA repeat, which the prompt expert does itself
    (reshapes, repeat) or must not do (RoPE)."""
    inside = set(nodes)
    start = next(n for n in nodes if n.name == lin.node)
    up: set[fx.Node] = set()
    frontier = [end]
    while frontier:  # ancestors of the attention input inside the module, up to the projection
        n = frontier.pop()
        if n in up or (n is not end and n not in inside):
            continue
        up.add(n)
        if n is not start:
            frontier.extend(n.all_input_nodes)
    down: set[fx.Node] = set()
    frontier = [start]
    while frontier:  # ... that descend from the projection: the nodes on the way
        for u in frontier.pop().users:
            if u in up and u not in down:
                down.add(u)
                frontier.append(u)
    children: dict[str, None] = {}
    for n in nodes:
        mp = module_path(n)
        if n in down and mp.startswith(path + ".") and not (mp == lin.path or mp.startswith(lin.path + ".")):
            children.setdefault(path + "." + mp[len(path) + 1:].split(".")[0], None)
    batch, seq = str(_shape(q)[0]), str(_shape(q)[2])  # q: (B, H, S, hd)
    ops, skipped = [], []
    for child in children:
        span = span_site(gm, child)
        if span is None:
            return f"passes through {child}, which has no single input and output tensor"
        members = _span_nodes(gm, child)
        names = {n.name for n in members}
        if any(a.name not in names and a.name != span.input and a.op != "get_attr"
               for n in members for a in n.all_input_nodes):
            skipped.append(child)
            continue
        src = next(a for n in members for a in n.all_input_nodes if a.name == span.input)
        in_shape, out_shape = _shape(src), _shape(next(n for n in members if n.name == span.output))
        dims = [str(d) for d in in_shape]
        if len(in_shape) == 4 and dims[0] == batch and dims[2] == seq and dims[1] != seq:
            heads_first, shape = True, (in_shape[1], in_shape[3])  # (B, kv_heads, S, hd), as Gemma3 norms
        else:
            heads_first, shape = False, tuple(in_shape[2:])  # (B, S, kv_heads, hd) or (B, S, kv_heads·hd)
        if len(in_shape) < 3 or dims[0] != batch or (not heads_first and dims[1] != seq) or out_shape != in_shape \
                or not all(isinstance(d, int) for d in shape) or math.prod(shape) != width:
            return (f"passes through {child} on a tensor shaped {tuple(in_shape)}; prompt experts replay such "
                    f"modules on (batch, sequence, …) or (batch, heads, sequence, head_dim) tensors of {width} "
                    "features per token only")
        replayed = tuple(n.name for n in members if n.target is not aten._assert_tensor_metadata.default)
        ops.append(PromptOp(path=child, input=span.input, output=span.output, nodes=replayed, shape=shape,
                            heads_first=heads_first))
    return tuple(ops), skipped


_MATMULS = {aten.matmul.default, aten.bmm.default}
_SCORE_MATMULS = _MATMULS | {aten.baddbmm.default}
_SOFTMAXES = {aten.softmax.int, aten._softmax.default}


def _eager_attention(nodes: list[fx.Node]):
    """(output matmul, q, k, v) of one ``softmax(q @ kᵀ …) @ v`` in ``nodes``, else None."""
    softmaxes = [n for n in nodes if n.target in _SOFTMAXES]
    if len(softmaxes) != 1:
        return None
    probs = softmaxes[0]
    # forward to the matmul with v (through casts and dropout)
    out = probs
    for _ in range(4):
        users = [u for u in out.users if u.op == "call_function"
                 and u.target is not aten._assert_tensor_metadata.default]
        if len(users) != 1:
            return None
        out = users[0]
        if out.target in _MATMULS:
            break
    if out.target not in _MATMULS or out.args[0] is not (out.all_input_nodes[0]):
        return None
    v = out.args[1]
    # back from the softmax to the q @ kᵀ matmul (through the mask add, the scale, casts)
    scores = probs.args[0]
    for _ in range(6):
        if scores.target in _SCORE_MATMULS:
            break
        inputs = [a for a in scores.all_input_nodes if a.op == "call_function"]
        if not inputs:
            return None
        scores = inputs[0]
    if scores.target not in _SCORE_MATMULS:
        return None
    # baddbmm(bias, q, kᵀ): BLOOM adds its ALiBi bias in the scores' matmul
    q, kt = scores.args[1:3] if scores.target == aten.baddbmm.default else scores.args[:2]
    if not (isinstance(kt, fx.Node) and kt.target in (aten.transpose.int, aten.permute.default)):
        return None
    return out, q, kt.args[0], v


def _bias_of(gm: fx.GraphModule, lin: LinearSite) -> str | None:
    name = lin.weight.rsplit(".", 1)[0] + ".bias"
    try:
        _param_shape(gm, name)
    except AttributeError:
        return None
    return name


_PASS_THROUGH = {
    aten.view.default, aten.reshape.default, aten.transpose.int, aten.permute.default, aten.contiguous.default,
    aten.clone.default, aten.expand.default, aten.unsqueeze.default, aten._unsafe_view.default, aten.mul.Tensor,
    aten.add.Tensor, aten.sub.Tensor, aten.cat.default, aten.to.dtype, aten._to_copy.default, aten.alias.default,
    aten.squeeze.dim, aten.flatten.using_ints, aten.type_as.default, aten.neg.default,
}
_SPLITS = (aten.split_with_sizes.default, aten.split.Tensor, aten.chunk.default)


def _feature_slice(src: fx.Node, dim: int, start: int, head_dim: int) -> tuple[str, int]:
    """How a slice of ``src`` at ``start`` along ``dim`` moves the key/value's row offset in its projection:
    ("offset", start) on a flat feature dim (a fused qkv output split into [q | k | v]), ("keep", 0) within
    one head (partial RoPE) or a no-op, ("bad", 0) for a layout one offset cannot describe."""
    shape = _shape(src)
    if not shape:
        return "bad", 0
    d = dim % len(shape)
    if d != len(shape) - 1:
        return ("keep", 0) if start == 0 else ("bad", 0)  # a slice from 0 of batch/sequence/heads
    if shape[-1] <= head_dim:
        return "keep", 0  # within one head: RoPE's rotated and pass-through halves
    if len(shape) <= 3:
        return "offset", start
    return "bad", 0  # heads already split off: per-head interleaved [q_h | k_h | v_h] (GPT-NeoX)


def _trace_to_linear(node: Any, by_node: dict[str, LinearSite], head_dim: int) -> tuple[LinearSite | None, int, str]:
    """Walk up from an SDPA key/value input to the projection producing it (through reshapes, RoPE,
    norms, GQA repeats and the split of a fused qkv projection); return it, the row offset of the
    key/value block inside its weight, and, when none is found, why."""
    import operator

    frontier = [(node, 0)]
    seen = set()
    why = "no projection found upstream (it is computed by an op moa-fx does not follow)"
    while frontier:
        n, offset = frontier.pop(0)
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.name in by_node:
            return by_node[n.name], offset, ""
        if n.op != "call_function":
            continue
        if n.target == aten.slice.Tensor and len(n.args) >= 3:
            how, delta = _feature_slice(n.args[0], int(n.args[1]), int(n.args[2] or 0), head_dim)
        elif n.target is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0].target in _SPLITS:
            split = n.args[0]
            idx = int(n.args[1])
            dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
            sizes = split.args[1]
            if split.target == aten.chunk.default:  # chunk(x, n): pieces of ceil(size / n)
                sizes = -(-int(_shape(split.args[0])[int(dim)]) // int(sizes))
            if isinstance(sizes, int):
                sizes = [sizes] * (idx + 1)
            how, delta = _feature_slice(split.args[0], int(dim), int(sum(sizes[:idx])), head_dim)
            n = split
        elif n.target in _PASS_THROUGH:
            for a in n.all_input_nodes:
                if a.op != "get_attr":
                    frontier.append((a, offset))
            continue
        elif n.target in (aten.index.Tensor, aten.select.int):
            why = (f"it is indexed out of a fused qkv tensor ({n.name}, as Falcon's multi-query attention does); "
                   "prompt experts need the key and value rows of the projection as contiguous blocks")
            continue
        else:
            continue
        if how == "bad":
            why = (f"it is sliced out of a head-split fused qkv tensor ({n.name}); prompt experts need the key and "
                   "value rows of the projection as contiguous blocks ([q | k | v], as Phi-3 and GPT-2 lay them out)")
            continue
        frontier.append((n.args[0], offset + (delta if how == "offset" else 0)))
    return None, 0, why
