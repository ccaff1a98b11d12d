"""Reading and writing specs: plain data, TOML and JSON files, preset names, the reference table.

:func:`load_spec` is the entry point (a preset name, a file, a dict or a Spec);
:func:`spec_to_dict` / :func:`spec_from_dict` and :func:`spec_to_toml` turn a spec into data or
TOML that reads back into an equal spec; :func:`spec_reference` is the Markdown table of every
field, generated from the field metadata in :mod:`moa_fx.spec.types`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import pathlib
import tomllib
from typing import Any

from ..errors import SpecError
from . import presets
from .types import EXPERT_KINDS, RouterSpec, Spec, ThresholdSpec, build_table

__all__ = ["load_spec", "spec_from_dict", "spec_to_dict", "spec_reference", "spec_to_toml"]


def spec_from_dict(data: dict) -> Spec:
    """Build a spec from plain data: ``{"expert": [...], "router": {...}, "layers": ...}``.

    Both ``expert`` (TOML's ``[[expert]]``) and ``experts`` are accepted as the list key.
    """
    if not isinstance(data, dict):
        raise SpecError(f"a spec must be a table/object, got {type(data).__name__}")
    data = dict(data)
    if "expert" in data and "experts" in data:
        raise SpecError("give the expert list once, as [[expert]] (or 'experts' in JSON), not both")
    if "expert" in data:
        data["experts"] = data.pop("expert")
    if not isinstance(data.get("experts", []), (list, tuple)):
        raise SpecError("spec.experts must be a list of expert tables ([[expert]] in TOML)")
    return build_table(Spec, data, "spec")


def spec_to_dict(spec: Spec) -> dict:
    """Plain JSON-able data that :func:`spec_from_dict` turns back into an equal spec."""

    def clean(obj: Any) -> Any:
        if dataclasses.is_dataclass(obj):
            return {f.name: clean(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [clean(x) for x in obj]
        return obj

    return clean(spec)


def load_spec(source: str | pathlib.Path | dict | Spec) -> Spec:
    """Load a spec from a preset name, a ``.toml`` or ``.json`` file, a dict, or pass a Spec through.

    >>> load_spec("adamole").router.select
    'threshold'
    """
    if isinstance(source, Spec):
        return source
    if isinstance(source, dict):
        return spec_from_dict(source)
    text = str(source)
    if text in presets.PRESETS:
        return presets.get(text)
    path = pathlib.Path(text)
    if not path.exists():
        close = difflib.get_close_matches(text, list(presets.PRESETS), n=3)
        hint = f" did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise SpecError(f"spec '{text}' is neither a preset nor an existing file;{hint} presets: "
                        + ", ".join(sorted(presets.PRESETS)))
    raw = path.read_bytes()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(raw.decode("utf-8"))
        elif path.suffix == ".json":
            data = json.loads(raw.decode("utf-8"))
        else:
            raise SpecError(f"spec file '{path}' must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"spec file '{path}' is not valid {path.suffix[1:].upper()}: {err}") from None
    return spec_from_dict(data)


def spec_reference() -> str:
    """A Markdown reference of every spec field, generated from the field metadata."""
    lines = []
    for title, cls in [("[router]", RouterSpec), ("[router.threshold]", ThresholdSpec),
                       *[(f"[[expert]] kind = '{k}'", c) for k, c in EXPERT_KINDS.items()],
                       ("top level", Spec)]:
        lines.append(f"#### {title}\n")
        lines.append("| field | default | meaning |")
        lines.append("|---|---|---|")
        for f in dataclasses.fields(cls):
            if f.name == "kind" or (cls is Spec and f.name in ("experts", "router")):
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = "(table)"
            else:
                default = ""
            if isinstance(default, tuple):
                default = list(default)
            lines.append(f"| `{f.name}` | `{json.dumps(default) if default != '(table)' else default}` | "
                         f"{f.metadata.get('help', '')} |")
        lines.append("")
    return "\n".join(lines)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def _toml_fields(obj: Any, keep: tuple[str, ...] = ()) -> list[str]:
    """``name = value`` for each field of ``obj`` that differs from its default (and the fields
    ``keep`` names, always); tables (nested dataclasses and the expert list) are written apart."""
    lines = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) or f.name == "experts" or (v == _default(f) and f.name not in keep):
            continue
        lines.append(f"{f.name} = {_toml_value(v)}")
    return lines


def spec_to_toml(spec: Spec, comment: str = "") -> str:
    """The spec as TOML that :func:`load_spec` reads back into an equal spec. Fields at their
    default are left out (``kind`` is always written: it says which table an expert is)."""
    out = [f"# {line}".rstrip() for line in comment.strip().splitlines()] if comment else []
    out += _toml_fields(spec)
    router = _toml_fields(spec.router)
    if router:
        out += ["", "[router]", *router]
    threshold = _toml_fields(spec.router.threshold)
    if threshold:
        out += ["", "[router.threshold]", *threshold]
    for e in spec.experts:
        out += ["", "[[expert]]", *_toml_fields(e, keep=("kind",))]
    return "\n".join(out).lstrip("\n") + "\n"
