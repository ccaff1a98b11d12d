"""The transformed model: :func:`transform` builds a :class:`MoAModel` from a model and a spec.

``MoAModel`` wraps the rewritten GraphModule. It is called like the base model (``input_ids``,
``attention_mask``, ``labels`` for causal LMs; the original positional inputs for plain modules),
returns the base model's output type (with ``loss`` when labels are given, plus ``aux_loss``), and
owns what the graph cannot: input checks, the loss, the balance-loss term, router statistics,
adapter save/load and the trainable-parameter report.

Parameter names: every adapter parameter lives under ``graph_module.moa.<site path>.<expert>.<i>``,
e.g. ``moa.model.layers.0.self_attn.q_proj.lora.0.lora_A`` (site path, expert rule name, expert
index); routers under ``moa.<site or block path>.router``, thresholds under ``….threshold``.
:meth:`MoAModel.adapter_state_dict` returns them without the ``moa.`` prefix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import tempfile
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .capture import Captured, capture
from .errors import AdapterLoadError, InputError, MoaFxError
from .graph import ADAPTER_ROOT
from .passes import PassContext, pipeline, run_pipeline
from .sites import find_sites
from .spec import LoraExpert, Spec, load_spec, spec_from_dict, spec_to_dict

__all__ = ["MoAModel", "MoAOutput", "transform", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1

try:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclasses.dataclass
    class MoAOutput(CausalLMOutputWithPast):
        """``CausalLMOutputWithPast`` plus the summed balance loss of every router (or None)."""

        aux_loss: torch.Tensor | None = None
except ImportError:  # pragma: no cover - transformers is a dependency
    MoAOutput = None  # type: ignore[assignment]


def transform(model: nn.Module, spec: Spec | str | dict | os.PathLike, *, example_inputs: Any = None,
              dynamic: bool = True, lower: str = "auto", fuse: bool = True,
              until: str | None = None) -> "MoAModel":
    """Capture ``model``, insert the experts and routers that ``spec`` describes, return a MoAModel.

    ``spec`` is a :class:`Spec`, a preset name (``"adamole"``), a ``.toml``/``.json`` path or a dict.
    The base weights are shared with ``model`` (not copied) and frozen. ``until`` stops after the
    named pass (for inspection). ``dynamic=False`` captures with the example shapes only (much
    faster for big architectures on the meta device, where only inspection is wanted). ``lower``
    picks how LoRA mixtures run: ``"auto"`` (a cost model picks the fused dense-masked or grouped op
    per site), ``"dense"``, ``"grouped"``, or ``"off"`` (one graph node per expert, weighted sum).
    ``fuse`` gives every tensor read by several small projections (the LoRA A's of q, k and v, the
    router, the threshold) one GEMM followed by splits; ``fuse=False`` keeps one GEMM per reader.

    >>> model = transform(hf_model, "adamole")            # doctest: +SKIP
    >>> model(input_ids=ids, labels=ids).loss.backward()  # doctest: +SKIP
    """
    spec = load_spec(spec)
    captured = capture(model, example_inputs, dynamic=dynamic)
    plan = find_sites(captured.gm, spec)
    ctx = run_pipeline(PassContext(captured.gm, spec, plan), pipeline(lower, fuse), until=until)
    return MoAModel(captured, spec, ctx)


class MoAModel(nn.Module):
    """A transformed model. Only adapter, router and threshold parameters are trainable."""

    def __init__(self, captured: Captured, spec: Spec, ctx: PassContext) -> None:
        super().__init__()
        self.graph_module = captured.gm
        self.spec = spec
        self.config = captured.config
        self.records = ctx.records
        self.slots = ctx.slots
        self.routers = ctx.routers
        self.lowering = ctx.lowering
        self._plan_placements = list(ctx.plan.placements)
        self.model_class = captured.model_class
        self._captured = captured
        self._input_names = captured.input_names
        self._num_outputs = captured.num_outputs
        self._extras = list(captured.gm.meta.get("moa_fx.extras", []))
        self._stats: list[torch.Tensor] = []
        self.aux_loss: torch.Tensor | None = None
        if not hasattr(self.graph_module, ADAPTER_ROOT):
            self.graph_module.add_module(ADAPTER_ROOT, nn.Module())
        self.main_input_name = "input_ids"
        # state_dict() holds the adapters only: the frozen base belongs to the base model (and its
        # tied weights would make safetensors refuse a full state dict, e.g. in the HF Trainer)
        self.register_state_dict_post_hook(_adapters_only_state_dict)
        self.register_load_state_dict_post_hook(_ignore_missing_base_keys)

    # ------------------------------------------------------------------------------------------
    # calling
    # ------------------------------------------------------------------------------------------

    @property
    def adapters(self) -> nn.Module:
        """The module tree holding every expert, router and threshold."""
        return getattr(self.graph_module, ADAPTER_ROOT)

    def forward(self, *args: Any, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        # input_ids/attention_mask are named so the HF Trainer keeps those dataset columns
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if value is not None:
                kwargs[name] = value
        cap = self._captured
        if cap.is_causal_lm:
            flat = self._lm_inputs(args, kwargs)
            loss_kwargs = {k: kwargs.pop(k) for k in ("num_items_in_batch",) if k in kwargs}
        else:
            flat = self._plain_inputs(args, kwargs)
            loss_kwargs = {}
        outputs = self.graph_module(*flat)
        user, extras = list(outputs[:self._num_outputs]), outputs[self._num_outputs:]
        aux_terms = [t for (kind, _), t in zip(self._extras, extras) if kind == "aux"]
        self._stats = [t for (kind, _), t in zip(self._extras, extras) if kind == "stats"]
        aux = torch.stack(aux_terms).sum() if aux_terms else None
        self.aux_loss = aux
        if not cap.is_causal_lm:
            return pytree.tree_unflatten(user, cap.out_spec)
        base = pytree.tree_unflatten(user, cap.out_spec)
        logits = base.logits if hasattr(base, "logits") else user[0]
        loss = None
        if labels is not None:
            if labels.shape != flat[0].shape:
                raise InputError(f"labels have shape {tuple(labels.shape)} but input_ids have "
                                 f"{tuple(flat[0].shape)}; give one label per input token (-100 to ignore)")
            loss = cap.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
            coef = self.spec.router.aux_loss_coef
            if self.training and aux is not None and coef > 0:
                loss = loss + coef * aux
        return MoAOutput(loss=loss, logits=logits, aux_loss=aux)

    def _lm_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        names = ("input_ids", "attention_mask")
        if len(args) > 2:
            raise InputError("pass at most input_ids and attention_mask positionally")
        for name, value in zip(names, args):
            if name in kwargs:
                raise InputError(f"{name} was given both positionally and by keyword")
            kwargs[name] = value
        for key in ("use_cache", "return_dict", "output_attentions", "output_hidden_states", "past_key_values"):
            value = kwargs.pop(key, None)
            if key in ("output_attentions", "output_hidden_states") and value:
                raise InputError(f"{key}=True is not supported by a transformed model; "
                                 "run the base model for attentions or hidden states")
            if key == "past_key_values" and value is not None:
                raise InputError("past_key_values is not supported: a transformed model runs without a KV cache")
        unknown = sorted(set(kwargs) - {"input_ids", "attention_mask", "num_items_in_batch"})
        if unknown:
            raise InputError(f"unsupported input(s) {unknown}; a transformed causal LM takes input_ids, "
                             "attention_mask and labels")
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            raise InputError("input_ids is required: a LongTensor of shape (batch, sequence)")
        if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
            raise InputError(f"input_ids must be an integer tensor of shape (batch, sequence); got dtype "
                             f"{ids.dtype} and shape {tuple(ids.shape)}")
        if ids.dtype != torch.int64:
            ids = ids.long()
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask has shape {tuple(mask.shape)} but input_ids have {tuple(ids.shape)}")
        if ids.shape[1] < 2:
            raise InputError("sequences must have at least 2 tokens (the graph was captured for sequence >= 2)")
        if not torch.compiler.is_compiling() and ids.device.type != "meta" and ids.numel():
            vocab = int(self.config.vocab_size)
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= vocab:
                raise InputError(f"input_ids hold ids in [{lo}, {hi}] but the vocabulary has {vocab} entries")
        return [ids, mask.to(ids.dtype) if mask.dtype == torch.bool else mask]

    def _plain_inputs(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        flat = list(args) + [kwargs.pop(n) for n in self._input_names[len(args):] if n in kwargs]
        if kwargs:
            raise InputError(f"unexpected input(s) {sorted(kwargs)}; this model takes {list(self._input_names)}")
        if len(flat) != len(self._input_names):
            raise InputError(f"expected {len(self._input_names)} inputs {list(self._input_names)}, got {len(flat)}")
        placeholders = {n.name: n.meta.get("val") for n in self.graph_module.graph.nodes if n.op == "placeholder"}
        for name, t in zip(self._input_names, flat):
            want = placeholders.get(name)
            if isinstance(want, torch.Tensor) and isinstance(t, torch.Tensor):
                _check_like(name, t, want)
        for name, t in zip(self._input_names, flat):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.compiler.is_compiling() \
                    and t.device.type != "meta" and not torch.isfinite(t).all():
                raise InputError(f"input '{name}' contains NaN or inf; clean the data before the model sees it")
        return flat

    # ------------------------------------------------------------------------------------------
    # router statistics
    # ------------------------------------------------------------------------------------------

    def router_stats(self) -> dict[str, dict[str, Any]]:
        """Per router (site or block path), from the last forward pass.

        ``{"experts": [ids], "activation_rate": [per expert], "gate_mean": [per expert],
        "mean_active": experts per token, "threshold_mean": float or None, "layer": int or None}``.
        """
        from .graph import layer_index

        out: dict[str, dict[str, Any]] = {}
        stats_iter = iter(self._stats)
        for key, info in self.routers.items():
            vec = next(stats_iter, None)
            if vec is None:
                break
            e = len(info.expert_ids)
            values = vec.detach().float().cpu().tolist()
            rate, gate, tau = values[:e], values[e:2 * e], values[2 * e]
            out[key] = {
                "experts": list(info.expert_ids),
                "activation_rate": rate,
                "gate_mean": gate,
                "mean_active": float(sum(rate)),
                "threshold_mean": None if math.isnan(tau) else tau,
                "layer": layer_index(key),
            }
        return out

    # ------------------------------------------------------------------------------------------
    # parameters
    # ------------------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter/router/threshold tensor, named without the ``moa.`` prefix."""
        return {k: v for k, v in self.adapters.state_dict().items()}

    def trainable_parameter_count(self) -> tuple[int, int]:
        seen: set[int] = set()
        trainable = total = 0
        for p in self.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameter_count()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def merge_adapters(self) -> None:
        """Refused: a routed mixture is input-dependent and cannot be folded into base weights."""
        raise MoaFxError("a mixture of adapters cannot be merged into the base weights: the expert weights depend "
                         "on each token; keep the adapters separate (plain LoRA can be merged with PEFT after "
                         "save_adapters)")

    # ------------------------------------------------------------------------------------------
    # save / load
    # ------------------------------------------------------------------------------------------

    def adapter_config(self) -> dict[str, Any]:
        """The JSON written beside the weights. Plain LoRA uses PEFT's ``LoraConfig`` fields (PEFT can
        load it); mixtures use ``peft_type = "MOA_FX"``. Both keep moa-fx's own record under "moa_fx"."""
        own = {
            "format": FORMAT_VERSION,
            "base_model_class": self.model_class,
            "spec": spec_to_dict(self.spec),
            "tensors": {k: list(v.shape) for k, v in self.adapter_state_dict().items()},
        }
        if not self.is_plain_lora():
            return {"peft_type": "MOA_FX", "moa_fx": own}
        rules = {e.name: e for e in self.spec.experts}
        sites = [s for s in self.slots]
        first = self.spec.experts[0]
        rank_pattern, alpha_pattern = {}, {}
        for slot in sites:
            rule = rules[slot.rule]
            if rule.r != first.r:
                rank_pattern[slot.site] = rule.r
            if rule.alpha != first.alpha:
                alpha_pattern[slot.site] = rule.alpha
        conv1d = any(site.op == "addmm" for site in self._lora_sites())
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM" if self._captured.is_causal_lm else None,
            "r": first.r,
            "lora_alpha": first.alpha,
            "lora_dropout": max(e.dropout for e in self.spec.experts),
            "target_modules": sorted({s.site for s in sites}),
            "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern,
            "bias": "none",
            "fan_in_fan_out": conv1d,
            "inference_mode": True,
            "base_model_name_or_path": getattr(self.config, "_name_or_path", None) or None,
            "moa_fx": own,
        }

    def is_plain_lora(self) -> bool:
        """One LoRA expert per site, no router: what PEFT's LoRA can represent."""
        return self.spec.router.kind == "none" and all(
            isinstance(e, LoraExpert) and len(e.ranks) == 1 and not e.share_a for e in self.spec.experts)

    def _lora_sites(self):
        return [p.site for p in getattr(self, "_plan_placements", [])]

    def _peft_names(self) -> dict[str, str]:
        """Our adapter tensor names → PEFT's (``base_model.model.<path>.lora_A.weight``)."""
        names = {}
        for slot in self.slots:
            prefix = slot.module[len(ADAPTER_ROOT) + 1:]
            for part in ("lora_A", "lora_B"):
                names[f"{prefix}.{part}"] = f"base_model.model.{slot.site}.{part}.weight"
        return names

    def save_adapters(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json`` atomically into ``directory``."""
        from safetensors.torch import save_file

        directory = pathlib.Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise MoaFxError(f"cannot create adapter directory '{directory}': {err.strerror}; "
                             "choose a writable path") from None
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        if self.is_plain_lora():
            names = self._peft_names()
            tensors = {names[k]: v for k, v in tensors.items()}
        atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        config_data = self.adapter_config()
        # the checksum ties the config to these exact weight bytes: damage anywhere in the file, or a
        # weights file from another save, is caught at load time
        config_data["moa_fx"]["sha256"] = _sha256(directory / ADAPTER_WEIGHTS)
        config = json.dumps(config_data, indent=2, sort_keys=True)
        atomic_write(directory / ADAPTER_CONFIG, lambda p: p.write_text(config))
        return directory

    def load_adapters(self, directory: str | os.PathLike) -> None:
        """Load adapters saved by :meth:`save_adapters` for the same base model and spec."""
        directory = pathlib.Path(directory)
        cfg_path, w_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
        for p in (cfg_path, w_path):
            if not p.exists():
                raise AdapterLoadError(f"'{p}' is missing; point load_adapters at a directory written by save_adapters")
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AdapterLoadError(f"'{cfg_path}' is not valid JSON ({err}); the file is damaged") from None
        own = config.get("moa_fx") if isinstance(config, dict) else None
        if not isinstance(own, dict) or "spec" not in own:
            raise AdapterLoadError(f"'{cfg_path}' is not a moa-fx adapter config (no 'moa_fx.spec'); adapters made "
                                   "by PEFT itself load with PEFT")
        try:
            saved_spec = spec_from_dict(own["spec"])
        except MoaFxError as err:
            raise AdapterLoadError(f"'{cfg_path}' holds an invalid spec: {err}") from None
        if spec_to_dict(saved_spec) != spec_to_dict(self.spec):
            diff = _first_difference(spec_to_dict(saved_spec), spec_to_dict(self.spec))
            raise AdapterLoadError(f"adapters in '{directory}' were saved for another spec ({diff}); "
                                   "transform the base model with the saved spec: MoAModel.from_adapters(model, dir)")
        if own.get("base_model_class") != self.model_class:
            raise AdapterLoadError(f"adapters in '{directory}' were saved for {own.get('base_model_class')}, "
                                   f"not {self.model_class}")
        tensors = _read_safetensors(w_path)
        if config.get("peft_type") == "LORA":
            back = {v: k for k, v in self._peft_names().items()}
            tensors = {back.get(k, k): v for k, v in tensors.items()}
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise AdapterLoadError(f"adapter tensors do not match this model: missing {missing[:3]}, unexpected "
                                   f"{extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)")
        for k, v in own.items():
            if tuple(tensors[k].shape) != tuple(v.shape):
                raise AdapterLoadError(f"adapter tensor '{k}' has shape {tuple(tensors[k].shape)} but this model "
                                       f"expects {tuple(v.shape)}: the base model differs from the one it was saved for")
            if tensors[k].is_floating_point() and not torch.isfinite(tensors[k]).all():
                raise AdapterLoadError(f"adapter tensor '{k}' holds NaN or inf; the file is damaged")
        # last: the specific checks above name the tensor; the checksum catches what still parses
        digest = config["moa_fx"].get("sha256")
        if digest is not None and _sha256(w_path) != digest:
            raise AdapterLoadError(f"'{w_path}' does not match the checksum in '{cfg_path.name}': the weights file is "
                                   "damaged or comes from another save; save the adapters again")
        self.adapters.load_state_dict({k: tensors[k] for k in own}, strict=True)

    @classmethod
    def from_adapters(cls, model: nn.Module, directory: str | os.PathLike, **kwargs: Any) -> "MoAModel":
        """Transform ``model`` with the spec saved in ``directory`` and load the adapters."""
        cfg_path = pathlib.Path(directory) / ADAPTER_CONFIG
        try:
            spec = spec_from_dict(json.loads(cfg_path.read_text())["moa_fx"]["spec"])
        except FileNotFoundError:
            raise AdapterLoadError(f"'{cfg_path}' is missing; point at a directory written by save_adapters") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise AdapterLoadError(f"'{cfg_path}' is not a moa-fx adapter config: {err}") from None
        moa = transform(model, spec, **kwargs)
        moa.load_adapters(directory)
        return moa


def atomic_write(path: pathlib.Path, write) -> None:
    """Write to a temporary ``.<name>.*.tmp`` file in the same directory, fsync, then rename over
    ``path``: a reader sees the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = pathlib.Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _read_safetensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterLoadError(f"'{path}' is not a readable safetensors file ({err}); it is truncated or "
                               "damaged (moa-fx never loads pickles)") from None


def _sha256(path: pathlib.Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_like(name: str, t: torch.Tensor, want: torch.Tensor) -> None:
    """Refuse an input whose dtype, rank or static size differs from what the graph was captured with."""
    autocast = torch.is_autocast_enabled() and t.is_floating_point() and want.is_floating_point()
    if t.dtype != want.dtype and not autocast:
        raise InputError(f"input '{name}' has dtype {t.dtype}, but the model was captured with {want.dtype}; "
                         f"convert it with .to({want.dtype})")
    if t.dim() != want.dim() or any(isinstance(w, int) and w != s for w, s in zip(want.shape, t.shape)):
        shape = tuple(d if isinstance(d, int) else "dynamic" for d in want.shape)
        raise InputError(f"input '{name}' has shape {tuple(t.shape)}, but the model was captured with {shape}")


def _adapters_only_state_dict(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    keep = prefix + f"graph_module.{ADAPTER_ROOT}."
    for key in [k for k in state if not k.startswith(keep)]:
        del state[key]


def _ignore_missing_base_keys(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if f".{ADAPTER_ROOT}." in k]


def _first_difference(a: Any, b: Any, where: str = "spec") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where}: saved {a!r}, this model {b!r}"
