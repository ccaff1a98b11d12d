"""moa-fx: turn a transformers model into a heterogeneous Mixture-of-Adapters model by rewriting
its torch.fx graph.

>>> from moa_fx import transform, load_spec          # doctest: +SKIP
>>> model = transform(hf_model, load_spec("adamole")) # doctest: +SKIP
"""

from .capture import Captured, capture
from .errors import MoaFxError
from .runtime import MoAModel, MoAOutput, transform
from .spec import LoraExpert, ParallelAdapterExpert, PromptExpert, RouterSpec, Spec, ThresholdSpec, load_spec

__version__ = "0.1.0"

__all__ = [
    "transform",
    "capture",
    "Captured",
    "load_spec",
    "Spec",
    "LoraExpert",
    "ParallelAdapterExpert",
    "PromptExpert",
    "RouterSpec",
    "ThresholdSpec",
    "MoAModel",
    "MoAOutput",
    "MoaFxError",
]
