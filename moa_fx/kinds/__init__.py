"""Expert kinds: one module per kind, each declaring its spec class, site pool, modules, graph
insertion and parameter count (:mod:`moa_fx.kinds.registry` says what a kind declares).

Built in: :mod:`~moa_fx.kinds.lora`, :mod:`~moa_fx.kinds.parallel_adapter`,
:mod:`~moa_fx.kinds.prompt`, registered in that order (the order the insertion pass adds them in).
"""

from . import lora, parallel_adapter, prompt
from .registry import KINDS, ExpertKind, kind_of, register

__all__ = ["ExpertKind", "KINDS", "register", "kind_of", "lora", "parallel_adapter", "prompt"]
