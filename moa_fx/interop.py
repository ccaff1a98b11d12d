"""PEFT and Trainer files in and out of a transformed model, and merging plain LoRA.

- :func:`spec_from_peft_config`: a moa-fx spec equal to a PEFT ``LoraConfig`` on a given base
  model (PEFT's suffix matching of ``target_modules``, ``rank_pattern`` and ``alpha_pattern``
  resolved against the model's module names: one LoRA rule per distinct (r, α)).
- :func:`read_peft_lora`: a PEFT LoRA directory's config and tensors, refused by name when it is
  another PEFT method or uses a LoRA variant moa-fx does not compute (DoRA, rsLoRA, biases, ...).
- :func:`peft_tensors_to_moa`: PEFT tensor names → this model's adapter names.
- :func:`seed_experts_from_peft`: a PEFT LoRA as the starting point of every LoRA expert of a
  mixture whose shapes match.
- :func:`read_trainer_checkpoint`: the ``model.safetensors`` the HF Trainer writes for a
  non-PreTrainedModel (this model's adapters-only ``state_dict``).
- :func:`merge_lora`: fold router-less LoRA experts into the base weights.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import AdapterLoadError, MoaFxError
from .spec import LoraExpert, RouterSpec, Spec

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import MoAModel

__all__ = ["spec_from_peft_config", "read_peft_lora", "peft_tensors_to_moa", "seed_experts_from_peft",
           "read_trainer_checkpoint", "merge_lora", "PEFT_IMPORTABLE"]

PEFT_IMPORTABLE = ("LORA",)
TRAINER_WEIGHTS = "model.safetensors"
# LoraConfig fields whose non-default value changes what the adapter computes
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
                "layers_to_transform": None, "layers_pattern": None, "lora_bias": False, "trainable_token_indices": None,
                "target_parameters": None, "use_qalora": False, "alora_invocation_tokens": None}


def _peft_regex(where: str, pattern: str) -> str:
    """A regex from an (untrusted) PEFT config, refused like a spec's before it reaches ``re``."""
    from .errors import SpecError
    from .spec import check_pattern

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


def read_json(path: pathlib.Path) -> dict:
    """A JSON object from an adapter directory, or an AdapterLoadError naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterLoadError(f"'{path}' is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterLoadError(f"'{path}' is not valid JSON ({err}); the file is damaged") from None
    if not isinstance(data, dict):
        raise AdapterLoadError(f"'{path}' does not hold a JSON object")
    return data


def read_peft_lora(directory: str | pathlib.Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT LoRA directory (safetensors only; never a pickle)."""
    from .runtime import ADAPTER_CONFIG, ADAPTER_WEIGHTS, _read_safetensors

    directory = pathlib.Path(directory)
    cfg_path, w_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not cfg_path.exists():
        raise AdapterLoadError(f"'{cfg_path}' is missing; point at a PEFT adapter directory")
    cfg = read_json(cfg_path)
    kind = cfg.get("peft_type")
    if kind not in PEFT_IMPORTABLE:
        raise AdapterLoadError(f"'{directory}' holds a PEFT {kind} adapter; moa-fx imports these PEFT methods: "
                               f"{', '.join(PEFT_IMPORTABLE)} (load other methods with PEFT itself)")
    for field_name, default in _UNSUPPORTED.items():
        value = cfg.get(field_name, default)
        if value not in (default, None, [], {}, False):
            raise AdapterLoadError(f"'{cfg_path}' uses {field_name} = {value!r}; moa-fx imports plain LoRA only "
                                   f"({field_name} = {default!r}); load this adapter with PEFT")
    if not w_path.exists():
        other = directory / "adapter_model.bin"
        hint = " (it has adapter_model.bin, a pickle moa-fx never loads: convert it to safetensors)" \
            if other.exists() else ""
        raise AdapterLoadError(f"'{w_path}' is missing{hint}")
    return cfg, _read_safetensors(w_path)


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


def peft_tensors_to_moa(moa: "MoAModel", tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT names (``base_model.model.<site>.lora_A.weight``, ``.default`` optional) → adapter names."""
    names = moa._peft_names()  # ours -> PEFT's, for one LoRA expert per site
    back = {v: k for k, v in names.items()}
    out = {}
    for key, value in tensors.items():
        plain = key.replace(".default.weight", ".weight")
        if plain not in back:
            raise AdapterLoadError(f"PEFT tensor '{key}' has no LoRA expert here; the adapter targets other modules "
                                   "than this model's spec")
        out[back[plain]] = value
    return out


def seed_experts_from_peft(moa: "MoAModel", directory: str | pathlib.Path) -> dict[str, int]:
    """Copy a PEFT LoRA's A and B into every LoRA expert of ``moa`` at the same projection with the same
    rank (a mixture starting from one fine-tuned LoRA). Returns {site: experts seeded}."""
    from .kinds.lora import LoraDelta

    _, tensors = read_peft_lora(directory)
    by_site: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_[AB])(?:\.default)?\.weight", key)
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
    if not seeded:
        raise AdapterLoadError(f"no LoRA expert of this model has the projection and rank of '{directory}'s LoRA; "
                               "seeding needs experts of the same rank at the same modules")
    return seeded


def read_trainer_checkpoint(directory: pathlib.Path) -> dict[str, torch.Tensor]:
    """The adapters in a Trainer checkpoint's ``model.safetensors`` (keys ``moa.<name>``), unprefixed."""
    from .runtime import _read_safetensors

    tensors = _read_safetensors(directory / TRAINER_WEIGHTS)
    if not tensors or not all(k.startswith("moa.") for k in tensors):
        raise AdapterLoadError(f"'{directory / TRAINER_WEIGHTS}' does not hold a transformed model's adapters "
                               "(keys 'moa.<name>'); it is another model's checkpoint")
    return {k[len("moa."):]: v for k, v in tensors.items()}


def merge_lora(moa: "MoAModel") -> nn.Module:
    """Add every LoRA expert's ``s·B·A`` into its projection's weight (router-less specs only)."""
    from .kinds.lora import LoraDelta

    if moa.spec.router.kind != "none":
        raise MoaFxError("a routed mixture of adapters cannot be merged into the base weights: the expert weights "
                         "depend on each token; keep the adapters (save_pretrained) and load them with moa-fx")
    kinds = sorted({e.kind for e in moa.spec.experts if e.kind != "lora"})
    if kinds:
        raise MoaFxError(f"experts of kind {kinds} have no weight to merge into (a parallel adapter or a prompt adds "
                         "computation); only LoRA experts without a router merge")
    sites = {p.site.path: p.site for p in moa._first.placements}
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
