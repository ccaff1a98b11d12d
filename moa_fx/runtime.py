"""The transformed model: :func:`transform` builds a :class:`MoAModel` from a model and a spec.

One job: the model's state and its calls. A ``MoAModel`` *owns state* and *derives graphs*
(see :mod:`moa_fx.derive`):

- state: the frozen base model (``.model``, shared with the caller, not copied), the spec, and the
  adapter modules (``.moa``: experts, routers, thresholds, the only trainable parameters and the
  only thing saved);
- derived: one rewritten GraphModule per :class:`~moa_fx.derive.GraphKey` (train or eval, with or
  without a KV cache, activation checkpointing, last-position logits), captured or rewritten on
  first use for the current device and dtype and cached. All of them call the same adapter modules.

It is called like the base model (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values``/``cache``, ``use_cache``, ``labels`` for causal LMs; the original positional
inputs for plain modules), returns the base model's output type (with ``loss`` when labels are
given, ``aux_loss``, and the cache when one is used), generates with transformers' own
``generate``, moves with ``.to()``, and checkpoints activations with the HF method names.

Where the rest lives: the graphs themselves in :mod:`moa_fx.derive`; a call's argument checks in
:mod:`moa_fx.inputs`; the KV cache's way in and out of the cached graph in :mod:`moa_fx.kv_cache`;
the files adapters are saved in and loaded from (``save_pretrained``, ``from_pretrained``, thin
methods here) in :mod:`moa_fx.adapter_files`; PEFT's LoRA (names, config, merging) in
:mod:`moa_fx.peft_lora`.

Parameter names: every adapter parameter lives under ``moa.<site path>.<expert>.<i>``, e.g.
``moa.model.layers.0.self_attn.q_proj.lora.0.lora_A`` (site path, expert rule name, expert
index); routers under ``moa.<site or block path>.router``, thresholds under ``….threshold``.
:meth:`MoAModel.adapter_state_dict` returns them without the ``moa.`` prefix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import pathlib
import time
import uuid
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import adapter_files
from .derive import (Derived, DeriveOptions, GraphKey, block_paths, causal_attention, checkpoint_blocks,
                     compile_regions, derive_by_capture, has_dropout, has_mode_ops, keep_hidden, keep_last_logits,
                     strip_dropout)
from .errors import InputError, MoaFxError
from .graph import router_statistics
from .inputs import learned_positions, lm_inputs, plain_inputs
from .kv_cache import cached_mask_positions, past_keys_values, store
from .peft_lora import MoAPeftConfig, is_plain_lora, merge_lora
from .spec import Spec, load_spec

__all__ = ["MoAModel", "MoAOutput", "transform"]

try:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclasses.dataclass
    class MoAOutput(CausalLMOutputWithPast):
        """``CausalLMOutputWithPast`` plus the summed balance loss of every router (or None)."""

        aux_loss: torch.Tensor | None = None

    # transformers 5 calls the cache field ``cache``, earlier releases ``past_key_values``
    _CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
        else "past_key_values"
except ImportError:  # pragma: no cover - transformers is a dependency
    MoAOutput = None  # type: ignore[assignment]
    _CACHE_FIELD = "past_key_values"

# the dtypes a transformed model runs in (float64 too under lower="off")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Backbone:
    """``MoAModel.base_model``: the adapted model without its LM head (see :meth:`MoAModel.base_model`)."""

    def __init__(self, moa: "MoAModel") -> None:
        self._moa = moa

    @property
    def model(self) -> nn.Module:
        return self._moa.model

    def __call__(self, *args: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> Any:
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if value is not None:
                kwargs[name] = value
        if not kwargs.get("output_router_logits"):  # TRL asks for MoE router logits only when the config does
            kwargs.pop("output_router_logits", None)
        return self._moa._forward_impl(args, kwargs, None, backbone=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._moa.model, name)


def transform(model: nn.Module, spec: Spec | str | dict | os.PathLike, *, example_inputs: Any = None,
              dynamic: bool = True, lower: str = "auto", fuse: bool = True,
              until: str | None = None, compile_regions: bool = True) -> "MoAModel":
    """Capture ``model``, insert the experts and routers that ``spec`` describes, return a MoAModel.

    ``spec`` is a :class:`Spec`, a preset name (``"adamole"``), a ``.toml``/``.json`` path or a dict.
    The base weights are shared with ``model`` (not copied) and frozen. ``until`` stops after the
    named pass (for inspection). ``dynamic=False`` captures with the example shapes only (much
    faster for big architectures on the meta device, where only inspection is wanted). ``lower``
    picks how LoRA mixtures run: ``"auto"`` (a cost model picks the fused dense-masked or grouped op
    per site), ``"dense"``, ``"grouped"``, or ``"off"`` (one graph node per expert, weighted sum).
    ``fuse`` gives every tensor read by several small projections (the LoRA A's of q, k and v, the
    router, the threshold) one GEMM followed by splits; ``fuse=False`` keeps one GEMM per reader.
    ``compile_regions`` runs each decoder block as one submodule shared by the blocks of the same
    structure, called as a ``torch.compiler.nested_compile_region``: eager runs the same ops, and
    ``torch.compile`` compiles a block once instead of once per layer (``False``: one flat graph).
    Every graph the model derives later (eval, KV cache, another device or dtype) repeats these
    options.

    >>> model = transform(hf_model, "adamole")            # doctest: +SKIP
    >>> model(input_ids=ids, labels=ids).loss.backward()  # doctest: +SKIP
    """
    if isinstance(model, MoAModel):
        raise MoaFxError("this model is already transformed; transform its base model (model.model) with a spec "
                         "that lists every expert, or keep training the MoAModel you have")
    spec = load_spec(spec)
    options = DeriveOptions(example_inputs=example_inputs, dynamic=dynamic, lower=lower, fuse=fuse, until=until,
                            compile_regions=compile_regions)
    adapters = nn.Module()
    first = derive_by_capture(model, spec, adapters, options, GraphKey("forward", dropout=True),
                              example_inputs=example_inputs)
    if not has_dropout(first.gm):
        first = dataclasses.replace(first, key=GraphKey("forward", dropout=False))
    return MoAModel(model, spec, adapters, options, first)


class MoAModel(nn.Module):
    """A transformed model. Only adapter, router and threshold parameters are trainable."""

    supports_gradient_checkpointing = True

    def __init__(self, model: nn.Module, spec: Spec, adapters: nn.Module, options: DeriveOptions,
                 first: Derived) -> None:
        super().__init__()
        cap = first.captured
        self.model = model  # the frozen base: .to(), .train() and .eval() reach it through here
        self.moa = adapters  # the trainable state, shared by every derived graph
        self.spec = spec
        self.config = cap.config
        self.model_class = cap.model_class
        self.main_input_name = "input_ids"
        self._options = options
        compile_regions = options.compile_regions and not options.until
        self._causal = cap.is_causal_lm
        self._loss_function = cap.loss_function
        # train and eval graphs differ only where the base model has dropout (or batch norm)
        self._has_dropout = has_dropout(first.gm)
        self._mode_ops = has_mode_ops(first.gm)
        self._graphs: dict[GraphKey, Derived] = {first.key: first}
        self._first = first  # what transform() made: records and site plan for reports
        self.derivations: list[tuple[str, str, float]] = [(str(first.key), first.how, first.seconds)]
        self._checkpointing: dict | None = None
        self._disabled = False  # inside disable_adapter()
        self._merged = False  # after merge_and_unload()
        self.warnings_issued: dict = {}  # the Trainer and TRL record one-time warnings here, as on a PreTrainedModel
        self._cache_tag = uuid.uuid4().hex  # marks the caches this model filled
        self._max_positions = learned_positions(model, cap.config)
        self._last: Derived = first
        self._stats: dict[str, torch.Tensor] = {}  # router key -> its statistics vector, last forward
        self.aux_loss: torch.Tensor | None = None
        # state_dict() holds the adapters only: the frozen base belongs to the base model (and its
        # tied weights would make safetensors refuse a full state dict, e.g. in the HF Trainer)
        self.register_state_dict_post_hook(adapter_files.adapters_only_state_dict)
        self.register_load_state_dict_post_hook(adapter_files.ignore_missing_base_keys)
        # blocks as compile regions: a forward call runs that rewrite of the graph it needs
        self._regions = compile_regions and len(block_paths(first.gm)) >= 2
        if self._regions:  # ready before a compiled forward needs it, as every graph _derive makes
            self._get(first.key._replace(regions=True))
        if self._causal:  # the graph of a call without a mask, ready before a compiled forward needs it
            self._get(first.key._replace(causal=True))

    # ------------------------------------------------------------------------------------------
    # state and derived graphs
    # ------------------------------------------------------------------------------------------

    @property
    def adapters(self) -> nn.Module:
        """The module tree holding every expert, router and threshold."""
        return self.moa

    @property
    def graph_module(self):
        """The forward graph for the current mode, device and dtype."""
        return self.derived().gm

    @property
    def records(self):
        return self._first.records

    @property
    def slots(self):
        return self._first.slots

    @property
    def routers(self):
        return self._first.routers

    @property
    def lowering(self):
        return self._first.lowering

    @property
    def placements(self):
        """The site plan's placements (one expert rule at one site, of every kind), in graph order."""
        return self._first.placements

    @property
    def device(self) -> torch.device:
        return self._device_dtype()[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._device_dtype()[1]

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
        for p in self.moa.parameters():
            return p.device, p.dtype
        return torch.device("cpu"), torch.float32

    def _key(self, purpose: str = "forward", last_logits: bool = False, checkpointing: bool | None = None,
             embeds: bool = False, hidden: bool = False, backbone: bool = False, packed: bool = False,
             causal: bool = False, regions: bool = False) -> GraphKey:
        """The key of the graph a call needs now: the base model's mode decides dropout and checkpointing."""
        train = self.model.training
        if checkpointing is None:
            checkpointing = self._checkpointing is not None and train
        regions = regions and self._regions and purpose == "forward" and not checkpointing
        return GraphKey(purpose, self._has_dropout and train, checkpointing, last_logits, embeds, hidden, backbone,
                        packed, causal, regions)

    def derived(self, purpose: str = "forward", *, last_logits: bool = False, embeds: bool = False,
                hidden: bool = False, backbone: bool = False, packed: bool = False, causal: bool = False,
                regions: bool = False) -> Derived:
        """The graph for ``purpose`` ("forward" or "cached") in the current mode, derived on first use
        (``causal``: for a call without an attention mask, SDPA ``is_causal`` instead of the mask;
        ``regions``: the decoder blocks as shared compile regions, what a forward call runs).

        ``model.derived("cached").gm`` is the KV-cache graph: compile it with ``torch.compile`` like
        any GraphModule (inputs: ids, mask, position ids, past keys…, past values…)."""
        if purpose not in ("forward", "cached"):
            raise InputError(f"purpose {purpose!r} is not valid; choose 'forward' or 'cached'")
        return self._get(self._key(purpose, last_logits, embeds=embeds, hidden=hidden, backbone=backbone,
                                   packed=packed, causal=causal and purpose == "forward" and not packed,
                                   regions=regions))

    @torch.compiler.disable
    def _derive(self, key: GraphKey) -> Derived:
        """Make the graph for ``key`` from the graph it is a rewrite of (derived first if needed), or by
        capture. ``seconds`` counts this step only, not the derivation of its source."""
        if key.purpose == "cached" and not self._causal:
            raise InputError(f"{self.model_class} is not a causal LM: it has no KV-cache graph")
        if key.regions:
            source, rewrite, name = (key._replace(regions=False), lambda gm: compile_regions(gm, block_paths(gm)),
                                     "compile_regions")
        elif key.checkpointing:
            source, rewrite, name = key._replace(checkpointing=False), self._checkpoint_rewrite, "checkpoint_blocks"
        elif key.last_logits:
            source, rewrite, name = (key._replace(last_logits=False),
                                     lambda gm: keep_last_logits(gm, self._head_path()), "keep_last_logits")
        elif key.backbone:
            source, rewrite, name = key._replace(backbone=False), lambda gm: keep_hidden(gm, self._head_path()), \
                "keep_hidden"
        elif key.causal:
            source, rewrite, name = key._replace(causal=False), causal_attention, "causal_attention"
        elif not key.dropout and self._has_dropout and not self._mode_ops:
            source, rewrite, name = key._replace(dropout=True), strip_dropout, "strip_dropout"
        else:
            source = None
        if source is not None:
            src = self._get(source)
            if key in self._graphs:  # deriving the source derived this graph too
                return self._graphs[key]
            start = time.perf_counter()
            made = src.replace_graph(rewrite(src.gm), key, f"rewrite of {src.key}: {name}", 0.0)
        else:
            start = time.perf_counter()
            made = derive_by_capture(self.model, self.spec, self.moa, self._capture_options(key), key,
                                     example_inputs=self._example_inputs(), train=key.dropout or not self._mode_ops)
        made.seconds = time.perf_counter() - start
        self._graphs[key] = made
        self.derivations.append((str(key), made.how, made.seconds))
        if key.purpose == "forward" and not (key.regions or key.checkpointing) and self._regions:
            self._get(key._replace(regions=True))  # what a forward call runs: ready before a compiled one needs it
        if key.purpose == "forward" and not (key.causal or key.packed) and self._causal:
            self._get(key._replace(causal=True))  # as in __init__: no graph break in a compiled call without a mask
        return made

    def _checkpoint_rewrite(self, gm):
        ckpt = self._checkpointing or {"kwargs": {}, "every_n_layers": 1, "offload": False}
        blocks = block_paths(gm)[::ckpt["every_n_layers"]]
        return checkpoint_blocks(gm, blocks, offload=ckpt["offload"], **ckpt["kwargs"])

    def _capture_options(self, key: GraphKey) -> DeriveOptions:
        """transform()'s options, except that the cached graph on CPU runs unlowered under
        ``lower="auto"``: there the fused ops' torch path costs ~0.1 ms of dispatch per call, which at
        one token per decode step outweighs the work it saves (BENCHMARKS.md, decode)."""
        if key.purpose == "cached" and self._options.lower == "auto" and self._device_dtype()[0].type == "cpu":
            return dataclasses.replace(self._options, lower="off")
        return self._options

    def _get(self, key: GraphKey) -> Derived:
        found = self._graphs.get(key)
        return found if found is not None else self._derive(key)

    def _head_path(self) -> str:
        head = self.model.get_output_embeddings()
        return next(name for name, m in self.model.named_modules() if m is head)

    def _example_inputs(self) -> Any:
        ex = self._options.example_inputs
        if ex is None:
            return None
        device, dtype = self._device_dtype()

        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            return t.to(dtype) if t.is_floating_point() else t

        return pytree.tree_map_only(torch.Tensor, move, ex)

    def _apply(self, fn, recurse: bool = True):
        """``.to()``, ``.cuda()``, ``.half()``, ``to_empty()``…: move the state, then derive the forward
        graph for the new device and dtype. If that fails, every tensor is put back as it was (the
        originals are held until the new graph exists) and the old graphs stay."""
        before = self._device_dtype()
        params = [(p, p.data) for p in self.parameters()]
        buffers = [(m, name, b) for m in self.modules() for name, b in m._buffers.items() if b is not None]
        out = super()._apply(fn, recurse)
        after = self._device_dtype()
        if after == before:
            return out
        old, old_last = self._graphs, self._last
        self._graphs = {}
        try:
            allowed = _FLOAT_DTYPES + ((torch.float64,) if self._options.lower == "off" else ())
            if after[1] not in allowed:
                raise InputError(f"a transformed model runs in {', '.join(str(d) for d in allowed)}, not "
                                 f"{after[1]} (its fused ops have no {after[1]} kernels; float64 needs "
                                 f"transform(..., lower='off')); the model stays in {before[1]}")
            if after[0].type != "meta":
                self._last = self.derived()
        except BaseException:
            with torch.no_grad():
                for p, data in params:
                    p.data = data
                for m, name, b in buffers:
                    m._buffers[name] = b
            self._graphs, self._last = old, old_last
            raise
        return out

    def train(self, mode: bool = True) -> "MoAModel":
        """Train or eval mode for the base model and the adapters; the forward graph for the new mode
        is derived now (a rewrite or the same graph), so a compiled forward finds it ready."""
        super().train(mode)
        self.derived()
        return self

    # ------------------------------------------------------------------------------------------
    # activation checkpointing (the HF names, so the Trainer's gradient_checkpointing flag works)
    # ------------------------------------------------------------------------------------------

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute decoder blocks in backward instead of keeping their activations (train mode), as
        transformers' method of this name does: ``every_n_layers`` checkpoints blocks 0, n, 2n, …;
        ``offload`` keeps the blocks' saved inputs in (pinned) host memory.

        ``activation_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``; the non-reentrant
        variant is always used (``use_reentrant=True`` is refused: it gives no gradient to adapters in
        blocks whose inputs need none)."""
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.get("use_reentrant", False):
            raise InputError("gradient_checkpointing_kwargs={'use_reentrant': True} is not supported: reentrant "
                             "checkpointing gives no gradient to adapters in blocks whose inputs need none; pass "
                             "{'use_reentrant': False} or nothing")
        kwargs.pop("use_reentrant", None)
        unknown = sorted(set(kwargs) - {"preserve_rng_state", "determinism_check", "debug"})
        if unknown:
            raise InputError(f"gradient_checkpointing_kwargs {unknown} are not checkpoint options; valid: "
                             "'use_reentrant' (False), 'preserve_rng_state', 'determinism_check', 'debug'")
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise InputError(f"every_n_layers = {every_n_layers!r} is not valid; give an int >= 1")
        self._graphs = {k: v for k, v in self._graphs.items() if not k.checkpointing}
        self._checkpointing = {"kwargs": kwargs, "every_n_layers": every_n_layers, "offload": bool(offload)}
        self._derive(self._key(checkpointing=True))  # ready before a compiled forward needs it

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """transformers' older name of :meth:`activation_checkpointing_enable` (the Trainer calls either)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        self._checkpointing = None

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpointing is not None

    # ------------------------------------------------------------------------------------------
    # calling
    # ------------------------------------------------------------------------------------------

    def forward(self, *args: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        # input_ids/attention_mask are named so the HF Trainer keeps those dataset columns
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if value is not None:
                kwargs[name] = value
        return self._forward_impl(args, kwargs, labels)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = super().__call__(*args, **kwargs)
        # TRL's fused LM-head loss (its forward patched onto this model, called with fused_lm_head=True)
        # computes the loss from the backbone's hidden states: add the routers' balance loss as our own
        # forward does, so SFTTrainer trains the same objective
        if kwargs.get("fused_lm_head") and getattr(out, "loss", None) is not None and self.training \
                and self.aux_loss is not None and self.spec.router.aux_loss_coef > 0:
            out.loss = out.loss + self.spec.router.aux_loss_coef * self.aux_loss
        return out

    def _forward_impl(self, args: tuple, kwargs: dict, labels: torch.Tensor | None, backbone: bool = False) -> Any:
        if self._merged:
            raise MoaFxError("the adapters were merged into the base model (merge_and_unload); use the model it "
                             "returned")
        if self._disabled:  # disable_adapter(): the base model itself
            return self.model(*args, labels=labels, **kwargs) if labels is not None else self.model(*args, **kwargs)
        if not self._causal:
            derived = self.derived(regions=True)
            flat = plain_inputs(derived, args, kwargs)
            outputs = derived.gm(*flat)
            user = self._take_extras(derived, outputs)
            return pytree.tree_unflatten(user, derived.captured.out_spec)
        call = lm_inputs(args, kwargs, config=self.config, input_embeddings=self.get_input_embeddings,
                         max_positions=self._max_positions, model_class=self.model_class)
        ids, mask, embeds = call["input_ids"], call["attention_mask"], call["inputs_embeds"]
        if backbone and labels is not None:
            raise InputError("the backbone (model.base_model) returns hidden states; it takes no labels")
        tokens = ids if ids is not None else embeds[..., 0]  # (batch, sequence) of whichever was given
        # transformers' rule: position_ids without a mask and without a cache are packed rows (a block-
        # diagonal mask from where positions restart); use_cache left None means config.use_cache there
        use_cache = call["use_cache"] if call["use_cache"] is not None else getattr(self.config, "use_cache", False)
        packed = call["position_ids"] is not None and mask is None and call["cache"] is None and not use_cache \
            and tokens.shape[1] >= 2 and embeds is None
        cached = not packed and (call["cache"] is not None or call["use_cache"] or call["position_ids"] is not None
                                 or tokens.shape[1] < 2)
        hidden = bool(call["output_hidden_states"])
        if cached and (embeds is not None or hidden):
            what = "inputs_embeds" if embeds is not None else "output_hidden_states=True"
            raise InputError(f"{what} is supported without a KV cache only (no use_cache, cache, position_ids, and "
                             "at least 2 tokens); pass input_ids for cached calls")
        keep = call["logits_to_keep"]
        cache = hidden_states = None
        if cached:
            derived = self.derived("cached", last_logits=isinstance(keep, int) and keep == 1 and not backbone,
                                   backbone=backbone)
            device, dtype = self._device_dtype()
            past, cache = past_keys_values(call["cache"], derived.captured.cache, ids.shape[0], device, dtype,
                                           self._cache_tag)
            mask, pos = cached_mask_positions(ids, mask, call["position_ids"], past)
            outputs = derived.gm(ids, mask, pos, *past[0], *past[1])
            user = self._take_extras(derived, outputs)
            n = len(past[0])
            logits = user[0]
            if call["cache"] is not None or call["use_cache"] is not False and call["use_cache"] is not None:
                cache = store(cache, user[1:1 + n], user[1 + n:1 + 2 * n], self._cache_tag)
            else:
                cache = None
        else:
            derived = self.derived(embeds=embeds is not None, hidden=hidden, backbone=backbone, packed=packed,
                                   causal=mask is None, regions=True)
            if packed:
                second = call["position_ids"].expand(tokens.shape).contiguous()
            else:
                second = torch.ones(tokens.shape, dtype=torch.long, device=tokens.device) if mask is None else mask
                if second.shape != tokens.shape:
                    given = "input_ids" if embeds is None else "inputs_embeds"
                    raise InputError(f"attention_mask has shape {tuple(second.shape)} but {given} have "
                                     f"{tuple(tokens.shape)}")
            outputs = derived.gm(ids if embeds is None else embeds, second)
            user = self._take_extras(derived, outputs)
            base = pytree.tree_unflatten(user, derived.captured.out_spec)
            logits = base.logits if hasattr(base, "logits") else user[0]
            hidden_states = getattr(base, "hidden_states", None) if hidden else None
        if backbone:
            from transformers.modeling_outputs import BaseModelOutputWithPast

            return BaseModelOutputWithPast(last_hidden_state=logits, hidden_states=hidden_states,
                                           **{_CACHE_FIELD: cache})
        if isinstance(keep, int) and keep > 1:
            logits = logits[:, -keep:]
        elif isinstance(keep, torch.Tensor):
            logits = logits[:, keep]
        loss = None
        if labels is not None:
            if labels.shape != tokens.shape:
                raise InputError(f"labels have shape {tuple(labels.shape)} but input_ids have "
                                 f"{tuple(tokens.shape)}; give one label per input token (-100 to ignore)")
            if logits.shape[1] != tokens.shape[1]:
                raise InputError("labels need the logits of every position; do not combine them with logits_to_keep")
            loss_kwargs = {"num_items_in_batch": call["num_items_in_batch"]} \
                if call["num_items_in_batch"] is not None else {}
            loss = self._loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
            coef = self.spec.router.aux_loss_coef
            if self.training and self.aux_loss is not None and coef > 0:
                loss = loss + coef * self.aux_loss
        out = MoAOutput(loss=loss, logits=logits, aux_loss=self.aux_loss, hidden_states=hidden_states,
                        **{_CACHE_FIELD: cache})
        return out.to_tuple() if call["return_dict"] is False else out

    def _take_extras(self, derived: Derived, outputs: Any) -> list:
        n = derived.num_outputs
        user, extras = list(outputs[:n]), outputs[n:]
        kinds = derived.extras
        aux_terms = [t for (kind, _, _), t in zip(kinds, extras) if kind == "aux"]
        self._stats = {key: t for (kind, _, key), t in zip(kinds, extras) if kind == "stats"}
        self.aux_loss = torch.stack(aux_terms).sum() if aux_terms else None
        self._last = derived
        return user

    # ------------------------------------------------------------------------------------------
    # generation: transformers' own generate, with this model's cached graph as the forward
    # ------------------------------------------------------------------------------------------

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` (greedy, sampling, beam search, ``max_new_tokens``, ``eos_token_id``,
        left-padded ``attention_mask``, ``num_return_sequences``, logits processors…) over this model:
        the base model's generation loop, calling the cached graph for prefill and each decode step."""
        if not self._causal or not hasattr(self.model, "generate"):
            raise InputError(f"{self.model_class} is not a causal LM with a generate method; generate needs a "
                             "transformers causal LM (AutoModelForCausalLM)")
        if self._disabled:
            return self.model.generate(*args, **kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise InputError("generate(inputs_embeds=...) is not supported by a transformed model; pass input_ids")
        base = self.model
        signature = inspect.signature(base.forward)
        self.derived("cached", last_logits=True)  # derive before the base's forward is swapped

        def forward(*a: Any, **kw: Any) -> Any:
            kw.pop("cache_position", None)
            for key in ("output_attentions", "output_hidden_states", "inputs_embeds"):
                if not kw.get(key):
                    kw.pop(key, None)
            return self(*a, **kw)

        forward.__signature__ = signature  # type: ignore[attr-defined]
        base.forward = forward
        try:
            return base.generate(*args, **kwargs)
        finally:
            del base.forward

    def can_generate(self) -> bool:
        return self._causal and hasattr(self.model, "generate")

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict:
        """The base model's own (generate calls it on the base, whose forward is this model's)."""
        return self.model.prepare_inputs_for_generation(*args, **kwargs)

    # ------------------------------------------------------------------------------------------
    # the transformers / PEFT surface: attributes with their meaning there
    # ------------------------------------------------------------------------------------------

    @property
    def generation_config(self) -> Any:
        return getattr(self.model, "generation_config", None)

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.model.generation_config = value

    @property
    def loss_type(self) -> Any:
        """The base model's (the Trainer reads it to count the shifted labels in num_items_in_batch)."""
        return getattr(self.model, "loss_type", None)

    @property
    def name_or_path(self) -> str:
        return getattr(self.model, "name_or_path", None) or getattr(self.config, "_name_or_path", "") or ""

    @property
    def base_model(self) -> "Backbone":
        """The adapted backbone, as transformers' ``model.base_model`` is the decoder without the LM
        head: calling it returns ``BaseModelOutputWithPast(last_hidden_state=...)`` of the *adapted*
        model (TRL's fused LM-head loss calls it). ``.model`` is the base model, as in PEFT's
        ``peft_model.base_model.model``; ``get_base_model()`` is the bare base model."""
        return Backbone(self)

    def get_base_model(self) -> nn.Module:
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        get = getattr(self.model, "get_output_embeddings", None)
        return get() if get is not None else None

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                **kwargs: Any) -> nn.Module:
        """The base model's resize, then the graphs are derived again for the new vocabulary (they hold its
        size). An adapter that no longer fits (one on the LM head) makes it fail and the size go back."""
        old_size = self.get_input_embeddings().weight.shape[0]
        emb = self.model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **kwargs)
        if emb.weight.shape[0] == old_size:
            return emb
        old, self._graphs = self._graphs, {}
        try:
            self._first = self.derived()
        except BaseException:
            self.model.resize_token_embeddings(old_size)
            self._graphs = old
            raise
        return emb

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        tie = getattr(self.model, "tie_weights", None)
        if tie is not None:
            tie(*args, **kwargs)

    def add_model_tags(self, tags: Any) -> None:
        add = getattr(self.model, "add_model_tags", None)
        if add is not None:
            add(tags)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """transformers' count: every distinct parameter (or the trainable ones), optionally without embeddings."""
        skip = set()
        if exclude_embeddings:
            skip = {id(p) for m in self.model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or id(p) in skip or (only_trainable and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    @property
    def active_adapters(self) -> list[str]:
        return [] if self._disabled else ["default"]

    @property
    def active_adapter(self) -> str:
        return "default"

    @property
    def peft_config(self) -> dict[str, Any]:
        """``{"default": config}`` as in PEFT; the config carries ``peft_type``, ``task_type``,
        ``base_model_name_or_path``, ``inference_mode`` and the moa-fx spec."""
        return {"default": MoAPeftConfig(peft_type="LORA" if is_plain_lora(self.spec) else "MOA_FX",
                                         task_type="CAUSAL_LM" if self._causal else None,
                                         base_model_name_or_path=self.name_or_path or None,
                                         inference_mode=not any(p.requires_grad for p in self.moa.parameters()),
                                         spec=self.spec)}

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside, the model is the base model: forward and generate run it without any adapter."""
        was, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = was

    def enable_input_require_grads(self) -> None:
        """Accepted for the Trainer and TRL, and not needed: PEFT calls it so that reentrant
        checkpointing sees an input that needs grad; moa-fx checkpointing is non-reentrant, so the
        adapters get their gradients without it (tests/test_derive.py)."""

    def disable_input_require_grads(self) -> None:
        """The counterpart of :meth:`enable_input_require_grads` (nothing to undo)."""

    # ------------------------------------------------------------------------------------------
    # router statistics
    # ------------------------------------------------------------------------------------------

    def router_stats(self) -> dict[str, dict[str, Any]]:
        """Per router (site or block path), from the last forward pass.

        ``{"experts": [ids], "activation_rate": [per expert], "gate_mean": [per expert],
        "mean_active": experts per token, "threshold_mean": float or None, "layer": int or None}``.
        """
        return router_statistics(self._stats, self._last.routers)

    # ------------------------------------------------------------------------------------------
    # parameters
    # ------------------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter/router/threshold tensor, named without the ``moa.`` prefix."""
        return dict(self.adapters.state_dict())

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(trainable, total) distinct parameters."""
        return self.num_parameters(only_trainable=True), self.num_parameters()

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameter_count()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """PEFT's name: fold the adapters into the base weights and return the base model.

        Only router-less LoRA (plain LoRA, fixed-weight mixtures of LoRA experts) merges; a routed
        mixture depends on each token and is refused. ``safe_merge`` checks the merged weights for
        NaN. Afterwards this wrapper refuses to run (its base now holds the adapters)."""
        if adapter_names not in (None, ["default"]):
            raise InputError(f"adapter_names = {adapter_names!r}: a transformed model has one adapter, 'default'")
        base = merge_lora(self)
        if safe_merge and not all(torch.isfinite(p).all() for p in base.parameters() if p.is_floating_point()):
            raise MoaFxError("merging produced NaN or inf weights; the adapters are broken")
        self._merged = True
        self._graphs = {}
        return base

    def merge_adapters(self) -> nn.Module:
        """The older name of :meth:`merge_and_unload`."""
        return self.merge_and_unload()

    # ------------------------------------------------------------------------------------------
    # save / load
    # ------------------------------------------------------------------------------------------

    def adapter_config(self) -> dict[str, Any]:
        """The JSON written beside the weights (:func:`moa_fx.adapter_files.adapter_config`)."""
        return adapter_files.adapter_config(self)

    def save_adapters(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` atomically into ``directory``."""
        return adapter_files.save_adapters(self, directory)

    def load_adapters(self, directory: str | os.PathLike) -> None:
        """Load adapters saved by :meth:`save_adapters` for the same base model and spec (or a PEFT LoRA
        directory into a plain-LoRA model)."""
        adapter_files.load_adapters(self, directory)

    def seed_from_peft(self, directory: str | os.PathLike) -> dict[str, int]:
        """Start every LoRA expert of this mixture from a PEFT LoRA at the same projection and rank."""
        return adapter_files.seed_from_peft(self, directory)

    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, is_main_process: bool = True,
                        **kwargs: Any) -> None:
        """PEFT's name for :meth:`save_adapters` (``adapter_model.safetensors`` + ``adapter_config.json``,
        PEFT's layout for plain LoRA, the base model's name inside)."""
        adapter_files.check_save_arguments(safe_serialization, selected_adapters, kwargs)
        if is_main_process:
            self.save_adapters(save_directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module | str | os.PathLike, directory: str | os.PathLike | None = None,
                        *, spec: Spec | str | dict | None = None, **kwargs: Any) -> "MoAModel":
        """Load adapters onto ``model`` (PEFT's ``PeftModel.from_pretrained(base, dir)``).

        ``directory`` is one written by :meth:`save_pretrained`, a PEFT LoRA directory (its config
        becomes the spec), or a Trainer checkpoint (``model.safetensors``; give the ``spec`` it was
        trained with). With one argument, ``model`` is the directory and the base model is loaded from
        the path its config names (``base_model_name_or_path``, a local directory)."""
        if directory is None:
            directory, model = model, adapter_files.load_named_base(model)  # type: ignore[arg-type]
        moa = transform(model, adapter_files.pretrained_spec(model, directory, spec), **kwargs)
        adapter_files.load_pretrained(moa, directory)
        return moa

    @classmethod
    def from_adapters(cls, model: nn.Module, directory: str | os.PathLike, **kwargs: Any) -> "MoAModel":
        """Transform ``model`` with the spec saved in ``directory`` and load the adapters."""
        moa = transform(model, adapter_files.saved_spec(directory), **kwargs)
        moa.load_adapters(directory)
        return moa

