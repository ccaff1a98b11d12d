"""Adapter files: the directories and checkpoints a transformed model's adapters are saved in and read from.

One job: file formats. Three are read, one is written:

- moa-fx's adapter directory (:func:`save_adapters`, :func:`load_adapters`), PEFT's layout:
  ``adapter_model.safetensors`` and ``adapter_config.json`` (:func:`adapter_config`). Plain LoRA is
  written in PEFT's LoRA format (PEFT's tensor names and ``LoraConfig`` fields, so PEFT loads it);
  a mixture under ``peft_type = "MOA_FX"``. Either way the config keeps moa-fx's own record under
  ``"moa_fx"``: :data:`FORMAT_VERSION`, the base model class, the spec, the tensor shapes, each
  router's expert order, and the weights file's sha256.
- a PEFT LoRA directory (:func:`read_peft_lora`; :func:`load_adapters` loads one into a plain-LoRA
  model, :func:`seed_from_peft` into a mixture's experts);
- the HF Trainer's checkpoint of a transformed model (``model.safetensors``, its adapters-only state dict).

:func:`pretrained_spec` and :func:`load_pretrained` are ``MoAModel.from_pretrained``'s two steps
(the spec a directory needs, then its tensors), :func:`load_named_base` its one-argument form.
Loading checks the tensors against the model (names, shapes, finite values) and refuses a damaged
or foreign file by name (seeding copies only the pairs whose shapes match); weights are read with
safetensors only, never a pickle.
What PEFT's LoRA means in moa-fx terms lives in :mod:`moa_fx.peft_lora`; atomic writes and hashes
in :mod:`moa_fx.fileio`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import AdapterLoadError, InputError, MoaFxError
from .fileio import atomic_write, atomic_write_text, sha256_file
from .graph import ADAPTER_ROOT
from .peft_lora import (adapts_like, check_peft_lora_config, is_plain_lora, lora_config_fields, peft_names,
                        peft_tensors_to_moa, seed_experts, spec_from_peft_config)
from .spec import Spec, spec_from_dict, spec_to_dict

if TYPE_CHECKING:  # pragma: no cover
    from .runtime import MoAModel

__all__ = ["ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "TRAINER_WEIGHTS", "FORMAT_VERSION", "adapter_config",
           "save_adapters", "load_adapters", "saved_spec", "read_peft_lora", "seed_from_peft", "pretrained_spec",
           "load_pretrained", "load_named_base", "read_json"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_WEIGHTS = "model.safetensors"
# 2: the record holds each router's expert order ("routers"); up's experts now come before gate's
FORMAT_VERSION = 2


# --------------------------------------------------------------------------------------------------
# reading, checked
# --------------------------------------------------------------------------------------------------


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


def _read_safetensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterLoadError(f"'{path}' is not a readable safetensors file ({err}); it is truncated or "
                               "damaged (moa-fx never loads pickles)") from None


def _checked(moa: "MoAModel", tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as ``moa``'s adapter state dict, refused unless they are exactly its adapters: the same
    names and shapes, finite values."""
    own = moa.adapter_state_dict()
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
    return {k: tensors[k] for k in own}


def _is_peft(config: dict) -> bool:
    """A PEFT adapter config written by PEFT (no moa-fx record)."""
    return config.get("moa_fx") is None and config.get("peft_type") not in (None, "MOA_FX")


# --------------------------------------------------------------------------------------------------
# moa-fx's adapter directory
# --------------------------------------------------------------------------------------------------


def adapter_config(moa: "MoAModel") -> dict[str, Any]:
    """The JSON written beside the weights. Plain LoRA uses PEFT's ``LoraConfig`` fields (PEFT can
    load it); mixtures use ``peft_type = "MOA_FX"``. Both keep moa-fx's own record under "moa_fx"."""
    own = {
        "format": FORMAT_VERSION,
        "base_model_class": moa.model_class,
        "spec": spec_to_dict(moa.spec),
        "tensors": {k: list(v.shape) for k, v in moa.adapter_state_dict().items()},
        "routers": {key: list(info.expert_ids) for key, info in moa.routers.items()},
    }
    if not is_plain_lora(moa.spec):
        return {"peft_type": "MOA_FX", "base_model_name_or_path": moa.name_or_path or None, "moa_fx": own}
    return {
        "peft_type": "LORA",
        "task_type": moa.peft_config["default"].task_type,
        **lora_config_fields(moa),
        "inference_mode": True,
        "base_model_name_or_path": getattr(moa.config, "_name_or_path", None) or None,
        "moa_fx": own,
    }


def save_adapters(moa: "MoAModel", directory: str | os.PathLike) -> pathlib.Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` atomically into ``directory``."""
    from safetensors.torch import save_file

    directory = pathlib.Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MoaFxError(f"cannot create adapter directory '{directory}': {err.strerror}; "
                         "choose a writable path") from None
    tensors = {k: v.detach().contiguous().cpu() for k, v in moa.adapter_state_dict().items()}
    if is_plain_lora(moa.spec):
        names = peft_names(moa)
        tensors = {names[k]: v for k, v in tensors.items()}
    atomic_write(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = adapter_config(moa)
    # the checksum ties the config to these exact weight bytes: damage anywhere in the file, or a
    # weights file from another save, is caught at load time
    config["moa_fx"]["sha256"] = sha256_file(directory / ADAPTER_WEIGHTS)
    atomic_write_text(directory / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True))
    return directory


def check_save_arguments(safe_serialization: bool, selected_adapters: list[str] | None, kwargs: dict) -> None:
    """Refuse the ``save_pretrained`` arguments PEFT has and moa-fx cannot honour, by name."""
    if not safe_serialization:
        raise InputError("safe_serialization=False is not supported: moa-fx writes safetensors only (no pickles)")
    if selected_adapters not in (None, ["default"]):
        raise InputError(f"selected_adapters = {selected_adapters!r}: a transformed model has one adapter, "
                         "'default'")
    unknown = sorted(set(kwargs) - {"save_embedding_layers", "path_initial_model_for_weight_conversion"})
    if unknown or kwargs.get("save_embedding_layers") is True:
        raise InputError(f"save_pretrained arguments {unknown or ['save_embedding_layers=True']} are not "
                         "supported: a transformed model saves its adapters only")


def saved_spec(directory: str | os.PathLike) -> Spec:
    """The spec a directory written by :func:`save_adapters` was saved with."""
    cfg_path = pathlib.Path(directory) / ADAPTER_CONFIG
    try:
        return spec_from_dict(json.loads(cfg_path.read_text())["moa_fx"]["spec"])
    except FileNotFoundError:
        raise AdapterLoadError(f"'{cfg_path}' is missing; point at a directory written by save_adapters") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise AdapterLoadError(f"'{cfg_path}' is not a moa-fx adapter config: {err}") from None


def load_adapters(moa: "MoAModel", directory: str | os.PathLike) -> None:
    """Load a directory written by :func:`save_adapters` for the same base model and spec (or a PEFT LoRA
    directory, into a plain-LoRA model of the same modules and ranks) into ``moa``."""
    directory = pathlib.Path(directory)
    cfg_path, w_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.exists():
            raise AdapterLoadError(f"'{p}' is missing; point load_adapters at a directory written by save_adapters")
    config = read_json(cfg_path)
    if _is_peft(config):
        return _load_peft_lora(moa, directory)
    own = config.get("moa_fx")
    if not isinstance(own, dict) or "spec" not in own:
        raise AdapterLoadError(f"'{cfg_path}' is not a moa-fx adapter config (no 'moa_fx.spec') nor a PEFT one")
    try:
        spec = spec_from_dict(own["spec"])
    except MoaFxError as err:
        raise AdapterLoadError(f"'{cfg_path}' holds an invalid spec: {err}") from None
    same_spec = spec_to_dict(spec) == spec_to_dict(moa.spec)
    if config.get("peft_type") == "LORA" and same_spec:
        _check_lora_fields(moa, config, cfg_path)
    if not same_spec:
        diff = _first_difference(spec_to_dict(spec), spec_to_dict(moa.spec))
        raise AdapterLoadError(f"adapters in '{directory}' were saved for another spec ({diff}); "
                               "transform the base model with the saved spec: MoAModel.from_adapters(model, dir)")
    if own.get("base_model_class") != moa.model_class:
        raise AdapterLoadError(f"adapters in '{directory}' were saved for {own.get('base_model_class')}, "
                               f"not {moa.model_class}")
    _check_router_order(moa, own, directory)
    tensors = _read_safetensors(w_path)
    if config.get("peft_type") == "LORA":
        back = {v: k for k, v in peft_names(moa).items()}
        tensors = {back.get(k, k): v for k, v in tensors.items()}
    state = _checked(moa, tensors)
    # last: the specific checks above name the tensor; the checksum catches what still parses
    digest = own.get("sha256")
    if digest is not None and sha256_file(w_path) != digest:
        raise AdapterLoadError(f"'{w_path}' does not match the checksum in '{cfg_path.name}': the weights file is "
                               "damaged or comes from another save; save the adapters again")
    moa.adapters.load_state_dict(state, strict=True)


def _check_lora_fields(moa: "MoAModel", config: dict, cfg_path: pathlib.Path) -> None:
    """PEFT reads a plain-LoRA config's ``LoraConfig`` fields, moa-fx its spec: both must describe one model."""
    for field_name, written in lora_config_fields(moa).items():
        if _canonical(config.get(field_name)) != _canonical(written):
            raise AdapterLoadError(
                f"'{cfg_path}' says {field_name} = {config.get(field_name)!r} but its moa-fx spec gives "
                f"{written!r}: the file was edited, and PEFT would load another model than "
                "moa-fx; restore the field or save the adapters again")


def _canonical(value: Any) -> Any:
    return sorted(value) if isinstance(value, list) else value


def _check_router_order(moa: "MoAModel", own: dict, directory: pathlib.Path) -> None:
    """A router's weight rows follow its experts' order: the saved order must be this model's."""
    mine = {key: list(info.expert_ids) for key, info in moa.routers.items()}
    saved = own.get("routers")
    if saved is None:  # format 1: graph order, where up's experts came after gate's
        swapped = [k for k, ids in mine.items() if any(":" in i and i.split(":")[0].endswith("up_proj") for i in ids)
                   and any(":" in i and i.split(":")[0].endswith("gate_proj") for i in ids)]
        if swapped:
            raise AdapterLoadError(f"adapters in '{directory}' were saved by an older moa-fx whose routers ordered "
                                   f"gate's experts before up's ({swapped[0]}); their router rows would be read "
                                   "swapped. Load them with the moa-fx that saved them and save again")
    elif saved != mine:
        key = next(k for k in sorted(set(saved) | set(mine)) if saved.get(k) != mine.get(k))
        raise AdapterLoadError(f"adapters in '{directory}' route {key} over experts {saved.get(key)}, this model "
                               f"over {mine.get(key)}: the router rows would be read in another order")


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


# --------------------------------------------------------------------------------------------------
# PEFT LoRA directories
# --------------------------------------------------------------------------------------------------


def read_peft_lora(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT LoRA directory (safetensors only; never a pickle)."""
    directory = pathlib.Path(directory)
    cfg_path, w_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not cfg_path.exists():
        raise AdapterLoadError(f"'{cfg_path}' is missing; point at a PEFT adapter directory")
    cfg = read_json(cfg_path)
    check_peft_lora_config(cfg, cfg_path)
    if not w_path.exists():
        other = directory / "adapter_model.bin"
        hint = " (it has adapter_model.bin, a pickle moa-fx never loads: convert it to safetensors)" \
            if other.exists() else ""
        raise AdapterLoadError(f"'{w_path}' is missing{hint}")
    return cfg, _read_safetensors(w_path)


def _load_peft_lora(moa: "MoAModel", directory: pathlib.Path) -> None:
    """A PEFT LoRA directory into ``moa``, whose spec must equal the one its config describes."""
    cfg, tensors = read_peft_lora(directory)
    if not is_plain_lora(moa.spec):
        raise AdapterLoadError(f"'{directory}' is a PEFT LoRA and this model is a mixture; load it into a plain "
                               "LoRA model (MoAModel.from_pretrained(base, dir)) or seed the mixture's experts "
                               "with seed_from_peft(dir)")
    if not adapts_like(moa, cfg):
        raise AdapterLoadError(f"'{directory}' adapts other modules or ranks than this model's spec; load it with "
                               "MoAModel.from_pretrained(base, dir), which builds the spec from its config")
    moa.adapters.load_state_dict(_checked(moa, peft_tensors_to_moa(moa, tensors)), strict=True)


def seed_from_peft(moa: "MoAModel", directory: str | os.PathLike) -> dict[str, int]:
    """Start every LoRA expert of ``moa`` from the PEFT LoRA in ``directory`` at the same projection and
    rank. Returns {site: experts seeded}."""
    _, tensors = read_peft_lora(directory)
    seeded = seed_experts(moa, tensors)
    if not seeded:
        raise AdapterLoadError(f"no LoRA expert of this model has the projection and rank of '{directory}'s LoRA; "
                               "seeding needs experts of the same rank at the same modules")
    return seeded


# --------------------------------------------------------------------------------------------------
# from_pretrained: which directory it is, the spec it needs, the base model it names
# --------------------------------------------------------------------------------------------------


def pretrained_spec(model: nn.Module, directory: str | os.PathLike,
                    spec: Spec | str | dict | None) -> Spec | str | dict:
    """The spec to transform ``model`` with before :func:`load_pretrained` reads ``directory``: the saved
    spec of a moa-fx directory, the one a PEFT LoRA config describes, or ``spec`` for a Trainer
    checkpoint (which holds none)."""
    directory = pathlib.Path(directory)
    cfg_path = directory / ADAPTER_CONFIG
    if not cfg_path.exists():
        if (directory / TRAINER_WEIGHTS).exists():
            if spec is None:
                raise AdapterLoadError(f"'{directory}' is a Trainer checkpoint (model.safetensors, no spec inside); "
                                       "give the spec it was trained with: from_pretrained(base, dir, spec=...)")
            return spec
        raise AdapterLoadError(f"'{cfg_path}' is missing; point at a directory written by save_pretrained, a PEFT "
                               "LoRA directory or a Trainer checkpoint")
    if _is_peft(read_json(cfg_path)):
        peft_cfg, _ = read_peft_lora(directory)
        return spec_from_peft_config(peft_cfg, model)
    return saved_spec(directory)


def load_pretrained(moa: "MoAModel", directory: str | os.PathLike) -> None:
    """Load what :func:`pretrained_spec` found in ``directory`` into ``moa`` (transformed with that spec)."""
    directory = pathlib.Path(directory)
    if (directory / ADAPTER_CONFIG).exists():
        return load_adapters(moa, directory)
    tensors = _read_safetensors(directory / TRAINER_WEIGHTS)
    prefix = f"{ADAPTER_ROOT}."
    if not tensors or not all(k.startswith(prefix) for k in tensors):
        raise AdapterLoadError(f"'{directory / TRAINER_WEIGHTS}' does not hold a transformed model's adapters "
                               f"(keys '{prefix}<name>'); it is another model's checkpoint")
    moa.adapters.load_state_dict(_checked(moa, {k[len(prefix):]: v for k, v in tensors.items()}), strict=True)


def load_named_base(directory: str | os.PathLike) -> nn.Module:
    """The base model an adapter directory names (``base_model_name_or_path``), from a local path."""
    cfg_path = pathlib.Path(directory) / ADAPTER_CONFIG
    name = read_json(cfg_path).get("base_model_name_or_path")
    if not name or not isinstance(name, str):
        raise AdapterLoadError(f"'{cfg_path}' names no base model (base_model_name_or_path); give it: "
                               "from_pretrained(base, dir)")
    if not pathlib.Path(name).is_dir():
        raise AdapterLoadError(f"the base model '{name}' that '{cfg_path}' names is not a local directory (nothing is "
                               "downloaded); load it yourself and call from_pretrained(base, dir)")
    from transformers import AutoModelForCausalLM

    # safetensors only: a directory named by an untrusted config must not make us unpickle weights
    return AutoModelForCausalLM.from_pretrained(name, use_safetensors=True)


def adapters_only_state_dict(module: nn.Module, state: dict, prefix: str, local_metadata: Any) -> None:
    """The state-dict hook of a MoAModel: its state dict holds the adapters only (the base is frozen and
    the caller's)."""
    keep = prefix + f"{ADAPTER_ROOT}."
    for key in [k for k in state if not k.startswith(keep)]:
        del state[key]


def ignore_missing_base_keys(module: nn.Module, incompatible: Any) -> None:
    """The load hook: a state dict of adapters only leaves no base key missing."""
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys
                                    if k.startswith(f"{ADAPTER_ROOT}.") or f".{ADAPTER_ROOT}." in k]
