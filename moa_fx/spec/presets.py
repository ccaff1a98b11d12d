"""Named presets: each method of METHODS.md as a spec, by name.

``examples/specs/<name>.toml`` holds the same spec as a file (a test checks they agree).
Projections are named by role (``@q``, ``@down``, …; see :data:`moa_fx.sites.ROLES`) so each preset
applies to LLaMA-style and GPT-2-style module names alike.
"""

from __future__ import annotations

from ..errors import SpecError
from .types import LoraExpert, ParallelAdapterExpert, PromptExpert, RouterSpec, Spec, ThresholdSpec

__all__ = ["PRESETS", "get"]

QKVOD = ("@q", "@k", "@v", "@o", "@down")


def lora() -> Spec:
    """Plain LoRA, r = 8, α = 8 on q, k, v, o, down; no router (MoA's LoRA baseline)."""
    return Spec(name="lora", experts=(LoraExpert(at=QKVOD, r=8, alpha=8),), router=RouterSpec(scope="none"))


def mole_topk() -> Spec:
    """Top-k MoE-LoRA (MoA's baseline): 8 experts r = 8, α = 8, k = 2, softmax router with bias, aux 1e-3."""
    return Spec(name="mole_topk", experts=(LoraExpert(at=QKVOD, r=8, alpha=8, count=8),),
                router=RouterSpec(scope="site", gate="softmax", select="topk", top_k=2, bias=True,
                                  aux_loss_coef=1e-3))


def mole_threshold() -> Spec:
    """Constant-threshold MoLE (AdaMoLE's baseline): 4 experts r = 8, select p ≥ 0.25, renormalised, aux 1e-3."""
    return Spec(name="mole_threshold", experts=(LoraExpert(at=("@q", "@k", "@v", "@o"), r=8, alpha=16, count=4,
                                                           dropout=0.05),),
                router=RouterSpec(scope="site", gate="softmax", select="threshold",
                                  threshold=ThresholdSpec(learned=False, value=0.25), aux_loss_coef=1e-3))


def adamole() -> Spec:
    """AdaMoLE as reported: q, k, v, o; 8 experts r = 4, α = 16, dropout 0.05; learned τ (τ_max = 1/8); aux 1e-3."""
    return Spec(name="adamole", experts=(LoraExpert(at=("@q", "@k", "@v", "@o"), r=4, alpha=16, count=8,
                                                    dropout=0.05),),
                router=RouterSpec(scope="site", gate="softmax", select="threshold",
                                  threshold=ThresholdSpec(learned=True, rule="adamole"), aux_loss_coef=1e-3))


def hydralora() -> Spec:
    """HydraLoRA (official script): one shared A, 4 heads B_e, r = 4, α = 32, dropout 0.05, dense softmax router."""
    return Spec(name="hydralora", experts=(LoraExpert(at=QKVOD, r=4, alpha=32, count=4, dropout=0.05,
                                                      share_a=True),),
                router=RouterSpec(scope="site", gate="softmax", select="dense"))


def moe_lora_soft() -> Spec:
    """MoLoRA (MoA's soft MoE-LoRA baseline): 8 experts r = 8, α = 8, dense softmax, no aux loss."""
    return Spec(name="moe_lora_soft", experts=(LoraExpert(at=QKVOD, r=8, alpha=8, count=8),),
                router=RouterSpec(scope="site", gate="softmax", select="dense"))


def soft_moa() -> Spec:
    """Soft MoA (native code): LoRA r = 8, α = 8 on q, k, v, o, down + parallel adapter (16) on the MLP +
    prompt expert (L = 10) at attention; one SwiGLU router per block (hidden 4E) on the normalised block
    input; sigmoid gates; every expert runs."""
    return Spec(name="soft_moa",
                experts=(LoraExpert(at=QKVOD, r=8, alpha=8), PromptExpert(at=("@attn",), length=10),
                         ParallelAdapterExpert(around=("@mlp",), bottleneck=16)),
                router=RouterSpec(scope="@blocks", form="swiglu", gate="sigmoid", select="dense"))


def sparse_moa() -> Spec:
    """Sparse MoA (native code): soft MoA minus the prompt; a learned per-token threshold
    τ = 0.5·sigmoid(W_t h + b_t) selects experts with g − τ ≥ 0 and the weights are w = g·sel.

    Note: with this official rule τ is never subtracted and sel is a hard indicator, so W_t and b_t
    receive no gradient (their .grad stays None) and τ stays at its initial value, exactly as in the
    official code. For a threshold that learns, set ``router.threshold.rule = "adamole"``
    (w = (g − τ)·sel; with ``renormalize`` left false for sigmoid gates).
    """
    return Spec(name="sparse_moa",
                experts=(LoraExpert(at=QKVOD, r=8, alpha=8), ParallelAdapterExpert(around=("@mlp",), bottleneck=16)),
                router=RouterSpec(scope="@blocks", form="swiglu", gate="sigmoid", select="threshold",
                                  threshold=ThresholdSpec(learned=True, max=0.5, rule="moa")))


def parallel_adapter() -> Spec:
    """Parallel adapter (bottleneck 16) beside every MLP, no router (MoA's baseline)."""
    return Spec(name="parallel_adapter", experts=(ParallelAdapterExpert(around=("@mlp",), bottleneck=16),),
                router=RouterSpec(scope="none"))


def prompt_tuning() -> Spec:
    """Prompt expert (L = 10, zero-initialised per-head gate) at every attention op, no router."""
    return Spec(name="prompt_tuning", experts=(PromptExpert(at=("@attn",), length=10),),
                router=RouterSpec(scope="none"))


def unipeft() -> Spec:
    """The naive composition: LoRA on q, k, v, o, down + parallel adapter + prompt, all with weight 1."""
    return Spec(name="unipeft",
                experts=(LoraExpert(at=QKVOD, r=8, alpha=8), PromptExpert(at=("@attn",), length=10),
                         ParallelAdapterExpert(around=("@mlp",), bottleneck=16)),
                router=RouterSpec(scope="none"))


PRESETS = {f.__name__: f for f in (lora, mole_topk, mole_threshold, adamole, hydralora, moe_lora_soft,
                                   soft_moa, sparse_moa, parallel_adapter, prompt_tuning, unipeft)}


def get(name: str) -> Spec:
    """The preset spec called ``name``."""
    if name not in PRESETS:
        raise SpecError(f"no preset '{name}'; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()
