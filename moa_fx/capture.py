"""Capture a model as an FX GraphModule with ``torch.export`` (non-strict, dynamic batch and sequence).

Entry point: :func:`capture`. The result, :class:`Captured`, holds a plain ``fx.GraphModule``
whose ``forward`` takes the flat inputs in a fixed order (``input_ids, attention_mask`` for causal
LMs) and returns a tuple of the flat outputs, plus what the runtime needs to rebuild the model's
own output type (the pytree spec, the loss function, the config).

Why a plain GraphModule: ``ExportedProgram.module()`` returns a module that refuses ``train()`` and
checks its inputs with a pre-hook; the wrapper (:class:`moa_fx.runtime.MoAModel`) owns training mode
and input checks instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim

from .errors import CaptureError
from .graph import CACHE_KEY, NUM_OUTPUTS_KEY

__all__ = ["Captured", "capture", "default_lm_inputs", "is_causal_lm", "cache_layout"]



@dataclasses.dataclass
class Captured:
    """A captured model: the graph and how to call it like the original."""

    gm: fx.GraphModule
    input_names: tuple[str, ...]
    out_spec: Any  # pytree spec of the user outputs
    num_outputs: int
    model_class: str
    config: Any = None  # the HF config, when there is one
    loss_function: Callable | None = None
    is_causal_lm: bool = False
    device: torch.device = torch.device("cpu")
    train: bool = False  # captured in train mode: the base model's own dropout is in the graph
    cache: tuple[tuple[int, int], ...] | None = None  # cached capture: (kv heads, head dim) per layer


def is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_output_embeddings") and \
        getattr(model, "get_output_embeddings")() is not None


def default_lm_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """Example ``input_ids`` and ``attention_mask`` on the model's device."""
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 32))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(vocab, 2), (batch, seq), generator=g).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long, device=device)}


def capture(model: nn.Module, example_inputs: tuple | dict | None = None, *, dynamic: bool = True,
            train: bool = False, cache: bool = False) -> Captured:
    """Export ``model`` to an FX graph.

    - Hugging Face causal LMs: ``example_inputs`` may be omitted (``input_ids`` and
      ``attention_mask`` of shape 2×8 are made up); ``use_cache`` is turned off for the export.
    - Any other ``nn.Module``: give ``example_inputs`` as a tuple of positional tensors or a dict.
    - On the meta device (``with torch.device("meta"): model = AutoModelForCausalLM.from_config(cfg)``)
      the capture needs no weights and takes seconds even for 8B architectures.

    Batch and sequence dims (dims 0 and 1 of every input tensor) are dynamic unless ``dynamic=False``.

    ``train=True`` traces the model in train mode, so its own dropout ops are in the graph (dropout
    with p = 0 is removed); ``False`` traces eval mode. ``cache=True`` (causal LMs) captures the
    forward with a KV cache: inputs ``input_ids, attention_mask, position_ids, past keys…, past
    values…`` (past length P ≥ 0 and sequence S ≥ 1 dynamic, the mask covering P + S), outputs
    ``logits, keys…, values…`` with the new entries appended (see :func:`cache_layout`).
    """
    causal = is_causal_lm(model)
    if cache:
        if not causal:
            raise CaptureError(f"{type(model).__name__} is not a causal LM: only causal LMs are captured with a KV cache")
        return _capture_cached(model, train=train, dynamic=dynamic)
    if example_inputs is None:
        if not causal:
            raise CaptureError(f"{type(model).__name__} is not a Hugging Face causal LM, so moa-fx cannot "
                               "invent its inputs; pass example_inputs=(tensor, ...) or a dict of tensors")
        example_inputs = default_lm_inputs(model)
    if isinstance(example_inputs, dict):
        kwargs = dict(example_inputs)
        args: tuple = ()
    else:
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        args, kwargs = tuple(example_inputs), {}
    for name, value in list(kwargs.items()) + [(f"args[{i}]", a) for i, a in enumerate(args)]:
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"example input {name} is a {type(value).__name__}; only tensors are supported "
                               "as model inputs (bake constants into the module)")

    dynamic_shapes = None
    if dynamic:
        def dims(t: torch.Tensor) -> dict[int, Any]:
            return {i: Dim.DYNAMIC for i in range(min(t.dim(), 2))}

        if kwargs:
            dynamic_shapes = {k: dims(v) for k, v in kwargs.items()}
        else:
            dynamic_shapes = tuple(dims(a) for a in args)

    config = getattr(model, "config", None)
    use_cache_ctx = _no_cache(config) if config is not None else contextlib.nullcontext()
    with use_cache_ctx:
        ep = _export(model, args, kwargs, dynamic_shapes, train)
    return _to_captured(model, ep, causal, train)


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any, train: bool):
    was_training = model.training
    model.train(train)
    try:
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:  # noqa: BLE001 - re-raised as a CaptureError with the first failing frame
        raise CaptureError(_explain_failure(model, err)) from err
    finally:
        model.train(was_training)


def _to_captured(model: nn.Module, ep: Any, causal: bool, train: bool, cache: Any = None) -> Captured:
    config = getattr(model, "config", None)
    unlifted = ep.module()
    graph = unlifted.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    _inline_no_grad_regions(unlifted)
    _drop_zero_dropout(unlifted.graph)
    out_spec = unlifted._out_spec
    # A plain CodeGen: forward(*flat_inputs) -> tuple(flat_outputs); the runtime rebuilds the pytree.
    graph._codegen = fx.graph.CodeGen()
    gm = fx.GraphModule(unlifted, graph, class_name=f"Captured{type(model).__name__}")
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat_outputs = output.args[0]
    if not isinstance(flat_outputs, (tuple, list)):
        flat_outputs = (flat_outputs,)
    output.args = (tuple(flat_outputs),)
    gm.recompile()
    gm.requires_grad_(False)
    input_names = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    gm.meta[NUM_OUTPUTS_KEY] = len(flat_outputs)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    return Captured(
        gm=gm,
        input_names=input_names,
        out_spec=out_spec,
        num_outputs=len(flat_outputs),
        model_class=type(model).__name__,
        config=config,
        loss_function=getattr(model, "loss_function", None) if causal else None,
        is_causal_lm=causal,
        device=device,
        train=train,
        cache=cache,
    )


# --------------------------------------------------------------------------------------------------
# the KV-cache capture
# --------------------------------------------------------------------------------------------------

def cache_layout(model: nn.Module) -> tuple[tuple[int, int], ...]:
    """(kv heads, head dim) of every layer's cache entry, read from one 2-token forward with a cache."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # the class's forward: an instance may have its forward swapped (generate)
            out = type(model).forward(model, input_ids=ids, use_cache=True)
    finally:
        model.train(was_training)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise CaptureError(f"{type(model).__name__} returned no per-layer key/value cache for use_cache=True; "
                           "generation with a KV cache needs a model whose cache is transformers' DynamicCache")
    return tuple((int(layer.keys.shape[1]), int(layer.keys.shape[-1])) for layer in layers)


def cache_argument(model: nn.Module) -> str:
    """The name the model's forward takes its cache by (``cache`` in transformers 5, else ``past_key_values``)."""
    import inspect

    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _capture_cached(model: nn.Module, *, train: bool, dynamic: bool) -> Captured:
    import types

    from transformers import DynamicCache

    layout = cache_layout(model)
    cache_arg = cache_argument(model)
    forward = type(model).forward
    n = len(layout)

    def cached_forward(self, input_ids, attention_mask, position_ids, past_keys, past_values):
        past = DynamicCache(ddp_cache_data=list(zip(past_keys, past_values)))
        out = forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{cache_arg: past})
        new = getattr(out, "cache", None) or getattr(out, "past_key_values")
        return (out.logits, *[layer.keys for layer in new.layers], *[layer.values for layer in new.layers])

    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    batch, seq, past_len = 2, 8, 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, max(int(model.config.vocab_size), 2), (batch, seq), generator=g).to(device)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=device)
    pos = torch.arange(past_len, past_len + seq, device=device).expand(batch, seq).contiguous()
    keys = [torch.zeros(batch, h, past_len, d, dtype=dtype, device=device) for h, d in layout]
    values = [torch.zeros(batch, h, past_len, d, dtype=dtype, device=device) for h, d in layout]
    dynamic_shapes = None
    if dynamic:
        b, s, kv, p = Dim("batch"), Dim("seq"), Dim("kv"), Dim("past", min=0)
        dynamic_shapes = ({0: b, 1: s}, {0: b, 1: kv}, {0: b, 1: s}, [{0: b, 2: p}] * n, [{0: b, 2: p}] * n)
    prior = model.__dict__.get("forward")
    model.forward = types.MethodType(cached_forward, model)
    try:
        ep = _export(model, (ids, mask, pos, keys, values), {}, dynamic_shapes, train)
    finally:
        if prior is None:
            del model.forward
        else:
            model.forward = prior
    captured = _to_captured(model, ep, True, train, cache=layout)
    placeholders = [nd for nd in captured.gm.graph.nodes if nd.op == "placeholder"]
    output = next(nd for nd in reversed(captured.gm.graph.nodes) if nd.op == "output")
    for i in range(n):
        for j, kind in enumerate(("key", "value")):
            placeholders[3 + j * n + i].meta[CACHE_KEY] = (kind, i)
            entry = output.args[0][1 + j * n + i]
            if isinstance(entry, fx.Node):
                entry.meta[CACHE_KEY] = (kind, i)
    return captured


_DROPOUTS = {torch.ops.aten.dropout.default, torch.ops.aten.feature_dropout.default,
             torch.ops.aten.alpha_dropout.default, torch.ops.aten.feature_alpha_dropout.default}


def _drop_zero_dropout(graph: fx.Graph) -> None:
    """Dropout with p = 0 is the identity: remove it (train-mode captures record it for p = 0 too)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _DROPOUTS and node.args[1] == 0:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def _inline_no_grad_regions(gm: fx.GraphModule) -> None:
    """Inline ``wrap_with_set_grad_enabled(False, submod, *xs)`` regions (export makes one of RoPE's
    ``torch.no_grad()``), detaching their outputs. Dynamo cannot re-trace that higher-order op when
    its region reads a symbolic size, and a no-grad region is exactly "these outputs carry no grad"."""
    graph = gm.graph
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not hop:
            continue
        enabled, sub_attr, *operands = node.args
        sub = getattr(gm, sub_attr.target)
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        for ph, value in zip(placeholders, operands):
            env[ph] = value
        outputs: Any = None
        with graph.inserting_before(node):
            for inner in sub.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    outputs = fx.node.map_arg(inner.args[0], lambda n: env[n])
                    continue
                new = graph.node_copy(inner, lambda n: env[n])
                env[inner] = new
            if not isinstance(outputs, (tuple, list)):
                outputs = (outputs,)
            if not enabled:
                detached = []
                for out in outputs:
                    d = graph.call_function(torch.ops.aten.detach.default, (out,))
                    d.meta = dict(out.meta)
                    detached.append(d)
                outputs = detached
        for user in list(node.users):
            if user.op == "call_function" and user.target is __import__("operator").getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
        graph.erase_node(node)
        if not any(n.op == "get_attr" and n.target == sub_attr.target for n in graph.nodes if n is not sub_attr):
            graph.erase_node(sub_attr)
            delattr(gm, sub_attr.target)
    graph.lint()


@contextlib.contextmanager
def _no_cache(config: Any):
    old = getattr(config, "use_cache", None)
    if old is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if old is not None:
            config.use_cache = old


def _explain_failure(model: nn.Module, err: Exception) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    first = None
    # the innermost frame of the model's own code (not torch, not moa-fx, not generated code)
    for fr in frames:
        if "/torch/" not in fr.filename and "/moa_fx/" not in fr.filename and not fr.filename.startswith("<"):
            first = fr
    where = f"{first.filename}:{first.lineno} in {first.name}" if first else "inside torch.export"
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"torch.export could not capture {type(model).__name__} (first failing frame: {where}): "
            f"{type(err).__name__}: {msg[:300]}. Try: model.config.use_cache = False, "
            "attn_implementation='sdpa' or 'eager' when loading, example inputs with batch and sequence >= 2, "
            "or capture(..., dynamic=False)")
