"""The declarative spec: which experts go where, and how they are routed.

- :mod:`moa_fx.spec.types`: the frozen dataclasses (one per expert kind, router, threshold, the
  whole :class:`Spec`), their help text and the validation helpers.
- :mod:`moa_fx.spec.io`: :func:`load_spec` (preset name, TOML/JSON file, dict), the dict and TOML
  writers, the reference table.
- :mod:`moa_fx.spec.presets`: each method of METHODS.md as a named spec.
"""

from .io import load_spec, spec_from_dict, spec_reference, spec_to_dict, spec_to_toml
from .types import (EXPERT_KINDS, ExpertSpec, LoraExpert, ParallelAdapterExpert, PromptExpert, RouterSpec, Spec,
                    ThresholdSpec, check_pattern, register_expert_spec)

__all__ = [
    "LoraExpert",
    "ParallelAdapterExpert",
    "PromptExpert",
    "ThresholdSpec",
    "RouterSpec",
    "Spec",
    "ExpertSpec",
    "EXPERT_KINDS",
    "register_expert_spec",
    "load_spec",
    "spec_from_dict",
    "spec_to_dict",
    "spec_reference",
    "spec_to_toml",
    "check_pattern",
]
