"""PEFT's LoRA in moa-fx terms: its config as a spec and back, its tensor names, seeding and merging.

One job: the correspondence between PEFT's ``LoraConfig``/``LoraModel`` and a transformed model.
Reading and writing the files is :mod:`moa_fx.adapter_files`' job; nothing here touches a file.

- :func:`is_plain_lora`: whether a spec is what PEFT's LoRA can represent.
- :func:`lora_config_fields`: the ``LoraConfig`` fields of a plain-LoRA model (what PEFT reads).
- :func:`check_peft_lora_config`: a PEFT config refused by name when it is another PEFT method or
  uses a LoRA variant moa-fx does not compute (DoRA, rsLoRA, biases, ...).
- :func:`spec_from_peft_config`: a moa-fx spec equal to a PEFT ``LoraConfig`` on a given base
  model (PEFT's suffix matching of ``target_modules``, ``rank_pattern`` and ``alpha_pattern``
  resolved against the model's module names: one LoRA rule per distinct (r, α)); :func:`adapts_like`
  compares one with a model's placements.
- :func:`peft_names`, :func:`peft_tensors_to_moa`: this model's adapter tensor names ↔ PEFT's.
- :func:`seed_experts`: a PEFT LoRA's A and B copied into every LoRA expert of a mixture whose shapes match.
- :func:`merge_lora`: fold router-less LoRA experts into the base weights (PEFT's ``merge_and_unload``).
- :class:`MoAPeftConfig`: what ``model.peft_config["default"]`` holds.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import AdapterLoadError, MoaFxError, SpecError
from .graph import ADAPTER_ROOT
from .kinds.lora import LoraDelta
from .spec import LoraExpert, RouterSpec, Spec, check_pattern, spec_to_dict

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import MoAModel

__all__ = ["MoAPeftConfig", "is_plain_lora", "lora_config_fields", "check_peft_lora_config",
           "spec_from_peft_config", "adapts_like", "peft_names", "peft_tensors_to_moa", "seed_experts", "merge_lora",
           "PEFT_IMPORTABLE"]

PEFT_IMPORTABLE = ("LORA",)
# LoraConfig fields whose non-default value changes what the adapter computes
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
                "layers_to_transform": None, "layers_pattern": None, "lora_bias": False,
                "trainable_token_indices": None, "target_parameters": None, "use_qalora": False,
                "alora_invocation_tokens": None}
_PEFT_TENSOR = re.compile(r"base_model\.model\.(.+)\.(lora_[AB])(?:\.default)?\.weight")


@dataclasses.dataclass
class MoAPeftConfig:
    """What ``model.peft_config["default"]`` holds: PEFT's common config fields and the spec."""

    peft_type: str
    task_type: str | None
    base_model_name_or_path: str | None
    inference_mode: bool
    spec: Spec

    def to_dict(self) -> dict[str, Any]:
        return {"peft_type": self.peft_type, "task_type": self.task_type, "inference_mode": self.inference_mode,
                "base_model_name_or_path": self.base_model_name_or_path, "moa_fx": {"spec": spec_to_dict(self.spec)}}


def is_plain_lora(spec: Spec) -> bool:
    """One LoRA expert per site, no router: what PEFT's LoRA can represent."""
    return spec.router.kind == "none" and all(
        isinstance(e, LoraExpert) and len(e.ranks) == 1 and not e.share_a for e in spec.experts)


def lora_config_fields(moa: "MoAModel") -> dict[str, Any]:
    """The ``LoraConfig`` fields that decide what a plain-LoRA model computes, as PEFT reads them: the
    first rule's rank and alpha, the other rules' as per-module patterns."""
    rules = {e.name: e for e in moa.spec.experts}
    first = moa.spec.experts[0]
    rank_pattern, alpha_pattern = {}, {}
    for slot in moa.slots:
        rule = rules[slot.rule]
        if rule.r != first.r:
            rank_pattern[slot.site] = rule.r
        if rule.alpha != first.alpha:
            alpha_pattern[slot.site] = rule.alpha
    return {
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": max(e.dropout for e in moa.spec.experts),
        "target_modules": sorted({s.site for s in moa.slots}),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": any(p.site.op == "addmm" for p in moa.placements),  # GPT-2's Conv1D
    }


def check_peft_lora_config(cfg: dict, cfg_path: pathlib.Path) -> None:
    """Refuse a PEFT config (read from ``cfg_path``) that is not plain LoRA."""
    kind = cfg.get("peft_type")
    if kind not in PEFT_IMPORTABLE:
        raise AdapterLoadError(f"'{cfg_path.parent}' holds a PEFT {kind} adapter; moa-fx imports these PEFT methods: "
                               f"{', '.join(PEFT_IMPORTABLE)} (load other methods with PEFT itself)")
    for field_name, default in _UNSUPPORTED.items():
        value = cfg.get(field_name, default)
        if value not in (default, None, [], {}, False):
            raise AdapterLoadError(f"'{cfg_path}' uses {field_name} = {value!r}; moa-fx imports plain LoRA only "
                                   f"({field_name} = {default!r}); load this adapter with PEFT")


def _peft_regex(where: str, pattern: str) -> str:
    """A regex from an (untrusted) PEFT config, refused like a spec's before it reaches ``re``."""
    try:
        check_pattern(where, "re:" + pattern)
    except SpecError as err:
        raise AdapterLoadError(f"the PEFT config's {err}") from None
    return pattern


def _peft_matches(target: Any, name: str) -> bool:
    """PEFT's rule: a string is a full-match regex over the module name; a list matches name suffixes."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _pattern_value(patterns: dict, name: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def spec_from_peft_config(cfg: dict, model: nn.Module) -> Spec:
    """A spec computing what PEFT computes with ``cfg`` on ``model``: LoRA rules at exact module paths."""
    target = cfg.get("target_modules")
    if not target:
        raise AdapterLoadError("the PEFT config names no target_modules; moa-fx needs the projections it adapts")
    if isinstance(target, str):
        _peft_regex("target_modules", target)
    elif not isinstance(target, list) or not all(isinstance(t, str) for t in target):
        raise AdapterLoadError(f"the PEFT config's target_modules = {target!r} is neither a regex nor a list of names")
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(field_name) or {}
        if not isinstance(patterns, dict):
            raise AdapterLoadError(f"the PEFT config's {field_name} is not a mapping of patterns to values")
        for key in patterns:
            _peft_regex(field_name, str(key))
    r0, a0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    groups: dict[tuple[int, float], list[str]] = {}
    for name, module in model.named_modules():
        if not name or not _peft_matches(target, name) or not _is_projection(module):
            continue
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, name, r0))
        a = float(_pattern_value(cfg.get("alpha_pattern") or {}, name, a0))
        groups.setdefault((r, a), []).append(name)
    if not groups:
        raise AdapterLoadError(f"target_modules {target!r} match no projection of {type(model).__name__}; the "
                               "adapter was made for another architecture")
    dropout = float(cfg.get("lora_dropout", 0.0) or 0.0)
    experts = tuple(LoraExpert(name="lora" if i == 0 else f"lora_{i}", at=tuple(paths), r=r, alpha=a,
                               dropout=dropout)
                    for i, ((r, a), paths) in enumerate(sorted(groups.items(), key=lambda kv: -len(kv[1]))))
    return Spec(name="peft_lora", experts=experts, router=RouterSpec(scope="none"))


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def adapts_like(moa: "MoAModel", cfg: dict) -> bool:
    """Whether PEFT's ``cfg`` adapts exactly ``moa``'s modules, with its ranks and alphas."""
    want = spec_from_peft_config(cfg, moa.model)
    peft = {path: (tuple(rule.ranks), float(rule.alpha)) for rule in want.experts for path in rule.patterns}
    return peft == {p.site.path: (tuple(p.rule.ranks), float(p.rule.alpha)) for p in moa.placements}


def peft_names(moa: "MoAModel") -> dict[str, str]:
    """Our adapter tensor names → PEFT's (``base_model.model.<path>.lora_A.weight``), one LoRA expert per site."""
    names = {}
    for slot in moa.slots:
        prefix = slot.module[len(ADAPTER_ROOT) + 1:]
        for part in ("lora_A", "lora_B"):
            names[f"{prefix}.{part}"] = f"base_model.model.{slot.site}.{part}.weight"
    return names


def peft_tensors_to_moa(moa: "MoAModel", tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT names (``base_model.model.<site>.lora_A.weight``, ``.default`` optional) → adapter names."""
    back = {v: k for k, v in peft_names(moa).items()}
    out = {}
    for key, value in tensors.items():
        plain = key.replace(".default.weight", ".weight")
        if plain not in back:
            raise AdapterLoadError(f"PEFT tensor '{key}' has no LoRA expert here; the adapter targets other modules "
                                   "than this model's spec")
        out[back[plain]] = value
    return out


def seed_experts(moa: "MoAModel", tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Copy a PEFT LoRA's A and B (its tensors) into every LoRA expert of ``moa`` at the same projection
    with the same rank (a mixture starting from one fine-tuned LoRA). Returns {site: experts seeded}."""
    by_site: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _PEFT_TENSOR.fullmatch(key)
        if m:
            by_site.setdefault(m.group(1), {})[m.group(2)] = value
    seeded: dict[str, int] = {}
    with torch.no_grad():
        for slot in moa.slots:
            if slot.kind != "lora" or slot.site not in by_site:
                continue
            module = moa.moa.get_submodule(slot.module.split(".", 1)[1])
            pair = by_site[slot.site]
            if not isinstance(module, LoraDelta) or set(pair) != {"lora_A", "lora_B"} or \
                    pair["lora_A"].shape != module.lora_A.shape or pair["lora_B"].shape != module.lora_B.shape:
                continue
            module.lora_A.copy_(pair["lora_A"])
            module.lora_B.copy_(pair["lora_B"])
            seeded[slot.site] = seeded.get(slot.site, 0) + 1
    return seeded


def merge_lora(moa: "MoAModel") -> nn.Module:
    """Add every LoRA expert's ``s·B·A`` into its projection's weight (router-less specs only)."""
    if moa.spec.router.kind != "none":
        raise MoaFxError("a routed mixture of adapters cannot be merged into the base weights: the expert weights "
                         "depend on each token; keep the adapters (save_pretrained) and load them with moa-fx")
    kinds = sorted({e.kind for e in moa.spec.experts if e.kind != "lora"})
    if kinds:
        raise MoaFxError(f"experts of kind {kinds} have no weight to merge into (a parallel adapter or a prompt adds "
                         "computation); only LoRA experts without a router merge")
    sites = {p.site.path: p.site for p in moa.placements}
    with torch.no_grad():
        for slot in moa.slots:
            module = moa.moa.get_submodule(slot.module.split(".", 1)[1])
            if not isinstance(module, LoraDelta):
                raise MoaFxError(f"expert at {slot.site} ({type(module).__name__}) cannot be merged")
            site = sites[slot.site]
            weight = moa.model.get_parameter(site.weight)
            delta = (module.lora_B.float() @ module.lora_A.float()) * module.scale  # (d_out, d_in)
            if tuple(weight.shape) == (site.d_in, site.d_out) and site.op == "addmm":
                delta = delta.t()  # GPT-2's Conv1D keeps (d_in, d_out)
            weight.add_(delta.to(weight.dtype))
    return moa.model
