"""An independent re-implementation of /work/shared/METHODS.md, used by the method tests.

Map of this module
- :class:`SiteMethod` / :class:`BlockMethod`: which METHODS.md equations the reference applies —
  per-projection mixtures (LoRA, MoLE top-k, constant threshold, MoLoRA, HydraLoRA, AdaMoLE) or one
  MoA router per decoder block (Soft / Sparse MoA).
- :class:`Reference`: a LLaMA/Qwen3 decoder written from scratch (embedding, RMSNorm, RoPE, GQA
  attention with an explicit softmax, SwiGLU MLP, lm_head; Qwen3's per-head q_norm/k_norm) that
  applies the adapter math at every projection and block. Base weights come from the HF model's
  ``state_dict``; adapter weights from the transformed model's parameters, looked up by name. It
  records every adapter name it reads (``used``), the per-router selections (``trace``) and the
  balance-loss terms (``aux_terms``).
- :func:`run_reference`, :func:`assert_matches`, :func:`assert_close`, :func:`assert_far`,
  :func:`loss_weight`, :func:`loss_and_grads`: running it in fp32 and float64, and comparing.

The equations never touch moa_fx: their only contract with the implementation is the parameter
names and the router expert ids (``model.routers[key].expert_ids``), both passed in by the tests.
The tiny models, their random weights and the cache of transformed models (:func:`tiny.built`)
are in tests/tiny.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

# fp32 everywhere: the two implementations differ only by summation order (SDPA vs an explicit
# softmax, fused vs unfused matmuls), which is ~1e-7 relative per op and ~1e-6 after two layers.
RTOL = 1e-5

# --------------------------------------------------------------------------------------------------
# What the reference computes
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteMethod:
    """One router per projection (METHODS.md: LoRA, MoLE, MoLoRA, HydraLoRA, AdaMoLE).

    kind: 'lora' (every expert weight 1), 'topk', 'threshold' (constant c), 'dense' (MoLoRA),
    'hydra' (shared A, dense softmax), 'adamole' (learned τ).
    """

    kind: Literal["lora", "topk", "threshold", "dense", "hydra", "adamole"]
    alpha: float
    top_k: int = 2
    threshold: float = 0.25
    tau_max: float | None = None  # AdaMoLE; None means 1/E
    router_bias: bool = False


@dataclass(frozen=True)
class BlockMethod:
    """One MoA router per decoder block (METHODS.md: MoA shared structure, Soft / Sparse MoA)."""

    select: Literal["soft", "sparse"]
    alpha: float = 8.0
    rule: Literal["moa", "adamole"] = "moa"  # sparse: w = g·sel, or w = (g − τ)·sel
    tau_max: float = 0.5
    learned_threshold: bool = True
    router_form: Literal["swiglu", "linear"] = "swiglu"
    router_input: Literal["normed", "raw"] = "normed"
    # (block key, expert id) -> bool (B, S): tokens whose expert is removed (gate forced to 0)
    drop: dict = field(default_factory=dict)


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (the equations' fp32 softmax/norm); float64 stays float64 for error studies."""
    return x if x.dtype == torch.float64 else x.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = _up(x)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _rope(seq: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


class Reference:
    """The decoder of METHODS.md's base models with the adapter equations, written from scratch.

    ``params``: the transformed model's adapter parameters by name (``model.adapters``);
    ``expert_ids``: router key -> the expert id of each router output column.
    """

    def __init__(self, hf_model, params: dict[str, torch.Tensor], *, site: SiteMethod | None = None,
                 block: BlockMethod | None = None, expert_ids: dict[str, list[str]] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        cfg = hf_model.config
        self.cfg = cfg
        self.base = {k: v.detach().to(dtype) for k, v in hf_model.state_dict().items()}
        self.params = params
        self.site, self.block = site, block
        self.expert_ids = expert_ids or {}
        self.qwen3 = cfg.model_type == "qwen3"
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        rope = getattr(cfg, "rope_parameters", None) or {}
        self.theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        self.used: set[str] = set()
        self.used_ids: dict[str, set[str]] = {}
        self.trace: dict[str, dict[str, torch.Tensor]] = {}
        self.aux_terms: list[torch.Tensor] = []

    # -- parameter access ---------------------------------------------------------------------------

    def p(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return self.params[name]

    def has(self, name: str) -> bool:
        return name in self.params

    def w(self, name: str) -> torch.Tensor:
        return self.base[name]

    def _linear(self, path: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w(f"{path}.weight"), self.base.get(f"{path}.bias"))

    def _column(self, key: str, expert: str) -> int:
        ids = self.expert_ids[key]
        self.used_ids.setdefault(key, set()).add(expert)
        return ids.index(expert)

    # -- adapters -----------------------------------------------------------------------------------

    def _lora(self, path: str, e: int, x: torch.Tensor, alpha: float, shared_a: bool = False) -> torch.Tensor:
        """``s·B(A x)``, s = α/r (METHODS.md, LoRA expert; dropout is off in these tests)."""
        a = self.p(f"{path}.lora.0.lora_A" if shared_a else f"{path}.lora.{e}.lora_A")
        b = self.p(f"{path}.lora.{e}.lora_B")
        return (alpha / a.shape[0]) * ((x @ a.T) @ b.T)

    def _num_experts(self, path: str) -> int:
        n = 0
        while self.has(f"{path}.lora.{n}.lora_B"):
            n += 1
        return n

    def _site_mixture(self, path: str, x: torch.Tensor) -> torch.Tensor:
        m = self.site
        num = self._num_experts(path)
        deltas = [self._lora(path, e, x, m.alpha, shared_a=m.kind == "hydra") for e in range(num)]
        if m.kind == "lora":
            return sum(deltas)
        cols = [self._column(path, f"lora.{e}") for e in range(num)]
        bias = self.p(f"{path}.router.proj.bias") if m.router_bias else None
        logits = F.linear(x, self.p(f"{path}.router.proj.weight"), bias)[..., cols]  # column e = expert e
        p = torch.softmax(_up(logits), dim=-1)
        ones = torch.ones_like(p)
        tau = None
        if m.kind in ("dense", "hydra"):
            sel, w = ones, p  # MoLoRA / HydraLoRA: every expert, softmax weights
            aux = None
        elif m.kind == "topk":
            idx = torch.topk(p, m.top_k, dim=-1).indices
            sel = torch.zeros_like(p).scatter(-1, idx, 1.0)
            w = (p * sel) / (p * sel).sum(-1, keepdim=True)  # w = p_topk / Σ p_topk
            aux = num * (sel.reshape(-1, num).mean(0) * p.reshape(-1, num).mean(0)).sum()
        elif m.kind == "threshold":
            sel = (p >= m.threshold).to(p.dtype)
            ws = p * sel
            total = ws.sum(-1, keepdim=True)
            w = ws / torch.where(total == 0, torch.ones_like(total), total)  # zero sum -> 1
            aux = num * (sel.reshape(-1, num).mean(0) * p.reshape(-1, num).mean(0)).sum()
        elif m.kind == "adamole":
            tau_max = m.tau_max if m.tau_max is not None else 1.0 / num
            tau = tau_max * torch.sigmoid(F.linear(x, self.p(f"{path}.threshold.proj.weight"),
                                                   self.p(f"{path}.threshold.proj.bias")))
            a = p - tau
            sel = (a >= 0).to(a.dtype)  # hard indicator: a bool cast carries no gradient
            ws = a * sel
            total = ws.sum(-1, keepdim=True)
            w = ws / torch.where(total == 0, torch.ones_like(total), total)
            aux = num * (sel.reshape(-1, num).mean(0) * a.reshape(-1, num).mean(0)).sum()  # unmasked a
        else:
            raise AssertionError(m.kind)
        if aux is not None:
            self.aux_terms.append(aux)
        self.trace[path] = {"p": p.detach(), "sel": sel.detach(), "w": w.detach(),
                            "tau": None if tau is None else tau.detach()}
        out = 0
        for e in range(num):
            out = out + w[..., e:e + 1] * deltas[e]
        return out

    def _block_gates(self, key: str, x: torch.Tensor, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """MoA: ``g = sigmoid(r(h))`` per token; Sparse: ``sel = g − τ ≥ 0``, ``w = g·sel``."""
        m = self.block
        inp = h if m.router_input == "normed" else x
        if m.router_form == "swiglu":
            hidden = F.silu(F.linear(inp, self.p(f"{key}.router.w1.weight"), self.p(f"{key}.router.w1.bias"))) \
                * F.linear(inp, self.p(f"{key}.router.w3.weight"), self.p(f"{key}.router.w3.bias"))
            logits = F.linear(hidden, self.p(f"{key}.router.w2.weight"), self.p(f"{key}.router.w2.bias"))
        else:
            logits = F.linear(inp, self.p(f"{key}.router.proj.weight"), self.p(f"{key}.router.proj.bias"))
        g = torch.sigmoid(logits)
        tau = None
        if m.select == "soft":
            sel, w = torch.ones_like(g), g
        else:
            if m.learned_threshold:
                tau = m.tau_max * torch.sigmoid(F.linear(inp, self.p(f"{key}.threshold.proj.weight"),
                                                         self.p(f"{key}.threshold.proj.bias")))
            else:
                tau = torch.full_like(g[..., :1], m.tau_max)
            sel = (g - tau >= 0).to(g.dtype)
            w = g * sel if m.rule == "moa" else (g - tau) * sel
        ids = self.expert_ids[key]
        keep = torch.ones_like(w)
        for (k, expert), tokens in m.drop.items():
            if k == key:
                keep[..., ids.index(expert)] = (~tokens).to(w.dtype)
        w = w * keep
        self.trace[key] = {"g": g.detach(), "sel": sel.detach(), "w": w.detach(),
                           "tau": None if tau is None else tau.detach()}
        return {expert: w[..., c:c + 1] for c, expert in enumerate(ids)}

    def _gate(self, key: str, gates: dict | None, expert: str) -> torch.Tensor | float:
        if gates is None:
            return 1.0
        self._column(key, expert)
        return gates[expert]

    def _proj(self, key: str, rel: str, x: torch.Tensor, gates: dict | None) -> torch.Tensor:
        path = f"{key}.{rel}"
        y = self._linear(path, x)
        if not self.has(f"{path}.lora.0.lora_B"):
            return y
        if self.block is not None:
            return y + self._gate(key, gates, f"{rel}:lora") * self._lora(path, 0, x, self.block.alpha)
        return y + self._site_mixture(path, x)

    def _prompt(self, key: str, q: torch.Tensor) -> torch.Tensor:
        """``gate_h · softmax(q·k_Pᵀ/√hd) · v_P``; k_P, v_P from the frozen k/v projections, no RoPE.

        Qwen3: k_P = k_norm(k_proj(P)) per head, as the model's own keys and as the official MoA
        Qwen3 code (``prompt_k = self.k_norm(self.k_proj(prompt).view(...))``)."""
        path = f"{key}.self_attn"
        prompt = self.p(f"{path}.prompt.0.prompt")
        head_gate = self.p(f"{path}.prompt.0.head_gate")
        length, rep = prompt.shape[0], self.heads // self.kv_heads
        k_p = self._linear(f"{path}.k_proj", prompt).view(length, self.kv_heads, self.head_dim)
        if self.qwen3:
            k_p = rms_norm(k_p, self.w(f"{path}.k_norm.weight"), self.eps)
        k_p = k_p.transpose(0, 1)
        v_p = self._linear(f"{path}.v_proj", prompt).view(length, self.kv_heads, self.head_dim).transpose(0, 1)
        k_p = k_p.repeat_interleave(rep, dim=0)  # query head i reads kv head i // rep, as HF's repeat_kv
        v_p = v_p.repeat_interleave(rep, dim=0)
        scores = (_up(q) @ _up(k_p).transpose(-1, -2)) / math.sqrt(self.head_dim)
        out = torch.softmax(scores, dim=-1) @ _up(v_p)  # (B, H, S, hd), prompts only, no mask
        return head_gate.view(1, -1, 1, 1) * out

    # -- the decoder ---------------------------------------------------------------------------------

    def _layer(self, i: int, x: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        key = f"model.layers.{i}"
        bsz, seq, _ = x.shape
        hd, nh, nkv = self.head_dim, self.heads, self.kv_heads
        h = rms_norm(x, self.w(f"{key}.input_layernorm.weight"), self.eps)
        gates = self._block_gates(key, x, h) if self.block is not None else None
        q = self._proj(key, "self_attn.q_proj", h, gates).view(bsz, seq, nh, hd)
        k = self._proj(key, "self_attn.k_proj", h, gates).view(bsz, seq, nkv, hd)
        v = self._proj(key, "self_attn.v_proj", h, gates).view(bsz, seq, nkv, hd)
        if self.qwen3:  # per-head RMSNorm before RoPE
            q = rms_norm(q, self.w(f"{key}.self_attn.q_norm.weight"), self.eps)
            k = rms_norm(k, self.w(f"{key}.self_attn.k_norm.weight"), self.eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, hd)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd) + bias
        attn = torch.softmax(_up(scores), dim=-1).to(v.dtype) @ v
        if self.has(f"{key}.self_attn.prompt.0.prompt"):
            g_prompt = self._gate(key, gates, "self_attn:prompt")
            if isinstance(g_prompt, torch.Tensor):
                g_prompt = g_prompt.reshape(bsz, 1, seq, 1)
            attn = attn + g_prompt * self._prompt(key, q)
        attn = attn.transpose(1, 2).reshape(bsz, seq, nh * hd)
        x2 = x + self._proj(key, "self_attn.o_proj", attn, gates)
        h2 = rms_norm(x2, self.w(f"{key}.post_attention_layernorm.weight"), self.eps)
        act = F.silu(self._proj(key, "mlp.gate_proj", h2, gates)) * self._proj(key, "mlp.up_proj", h2, gates)
        y = self._proj(key, "mlp.down_proj", act, gates)
        pa = f"{key}.mlp.pa.0"
        if self.has(f"{pa}.down.weight"):
            bottleneck = F.silu(F.linear(h2, self.p(f"{pa}.down.weight"), self.p(f"{pa}.down.bias")))
            y = y + self._gate(key, gates, "mlp:pa") * F.linear(bottleneck, self.p(f"{pa}.up.weight"),
                                                                self.p(f"{pa}.up.bias"))
        return x2 + y

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.trace, self.aux_terms = {}, []
        bsz, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        allowed = torch.ones(seq, seq, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
        x = F.embedding(input_ids, self.w("model.embed_tokens.weight"))
        bias = torch.zeros(bsz, 1, seq, seq, dtype=x.dtype).masked_fill(~allowed[:, None], torch.finfo(x.dtype).min)
        cos, sin = (t.to(x.dtype) for t in _rope(seq, self.head_dim, self.theta))
        for i in range(self.cfg.num_hidden_layers):
            x = self._layer(i, x, bias, cos, sin)
        x = rms_norm(x, self.w("model.norm.weight"), self.eps)
        head = self.base.get("lm_head.weight", self.w("model.embed_tokens.weight"))
        return x @ head.T

    @property
    def aux_loss(self) -> torch.Tensor | None:
        return torch.stack(self.aux_terms).sum() if self.aux_terms else None


# --------------------------------------------------------------------------------------------------
# Running the reference and comparing
# --------------------------------------------------------------------------------------------------

# Elementwise bound |actual − truth| ≤ RTOL·|truth| + atol, with truth the reference in float64 and
# atol = max(RTOL·max|truth|, OWN_ERROR_FACTOR·max|ref32 − truth|). Why the second term: the
# gradients of a two-layer decoder with unit-scale random weights carry ~1e-5-relative fp32
# rounding in *any* fp32 implementation (measured: the fp32 reference itself is off the float64
# one by up to 3e-5 of max|g|), so a bare rtol of 1e-5 would fail both. An implementation that is
# more than 16× as far from the truth as a plain fp32 implementation is wrong, not rounded (4×
# held on the CPU this was first written on; on another CPU's kernels the lowered HydraLoRA path
# reached 9.8× on one element of o_proj's lora_B gradient, a sum with ~1000× cancellation, while a
# wrong scale or a dropped expert moves the gradients by tens of percent).
OWN_ERROR_FACTOR = 16.0


@dataclass
class RefRun:
    """One reference run in fp32 and in float64, with gradients of Σ logits·weight (and of aux)."""

    logits: torch.Tensor  # float64
    logits32: torch.Tensor
    grads: dict  # name -> float64 gradient or None
    grads32: dict
    aux: torch.Tensor | None = None
    aux32: torch.Tensor | None = None
    aux_grads: dict = field(default_factory=dict)
    aux_grads32: dict = field(default_factory=dict)
    ref32: "Reference | None" = None  # for .trace, .used, .used_ids

    @property
    def trace(self):
        return self.ref32.trace

    def grad_floor(self, aux: bool = False) -> float:
        """fp32 epsilon × the largest true gradient: the rounding floor for ~0-by-cancellation entries."""
        grads = self.aux_grads if aux else self.grads
        scale = max((float(g.abs().max()) for g in grads.values() if g is not None), default=0.0)
        return float(torch.finfo(torch.float32).eps) * scale


def run_reference(hf_model, params: dict[str, torch.Tensor], input_ids, attention_mask, weight,
                  **method) -> RefRun:
    """Run :class:`Reference` in fp32 and float64 on the same weights; gradients w.r.t. ``params``."""
    names = sorted(params)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        ps = {n: params[n].detach().to(dtype).requires_grad_(True) for n in names}
        ref = Reference(hf_model, ps, dtype=dtype, **method)
        logits = ref(input_ids, attention_mask)
        aux = ref.aux_loss
        grads = loss_and_grads(logits, weight.to(dtype), [ps[n] for n in names], retain=aux is not None)
        aux_grads = loss_and_grads(aux, torch.ones((), dtype=dtype), [ps[n] for n in names]) if aux is not None \
            else [None] * len(names)
        runs[dtype] = (ref, logits.detach(), dict(zip(names, grads)), aux, dict(zip(names, aux_grads)))
    r32, r64 = runs[torch.float32], runs[torch.float64]
    return RefRun(logits=r64[1], logits32=r32[1], grads=r64[2], grads32=r32[2],
                  aux=None if r64[3] is None else r64[3].detach(), aux32=None if r32[3] is None else r32[3].detach(),
                  aux_grads=r64[4], aux_grads32=r32[4], ref32=r32[0])


def assert_matches(actual: torch.Tensor | None, ref32: torch.Tensor | None, ref64: torch.Tensor | None,
                   what: str, rtol: float = RTOL, floor: float = 0.0) -> None:
    """``actual`` (fp32, from moa-fx) against the float64 reference, allowing fp32 rounding only.

    ``floor``: an absolute tolerance for tensors whose true value is ~0 by cancellation (e.g. the
    router gradient when one expert is selected and renormalised to weight 1: d(p/p)/dp = 0);
    callers pass fp32 epsilon times the largest gradient of the model.
    """
    if ref64 is None or float(ref64.abs().max()) == 0:
        assert actual is None or float(actual.detach().abs().max()) <= floor, \
            f"{what}: the equations give no gradient/value here, the model gives one"
        return
    assert actual is not None, f"{what}: the model gives None, the equations give a non-zero tensor"
    truth = ref64
    own = float((ref32.double() - truth).abs().max())
    atol = max(rtol * float(truth.abs().max()), OWN_ERROR_FACTOR * own, floor)
    torch.testing.assert_close(actual.detach().double(), truth, rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m} (fp32 reference's own max error {own:.3g})")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    """Element-wise ``|a − e| ≤ rtol·|e| + rtol·max|e|`` (for two fp32 implementations of one op chain)."""
    assert actual is not None, f"{what}: implementation gave None"
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=rtol, atol=rtol * max(scale, 1e-30),
                               msg=lambda m: f"{what}: {m}")


def assert_far(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """``max|actual − expected| > 100·RTOL·max|expected|``: a change far outside the comparisons'
    tolerance, so a comparison that passes beside it is not vacuous."""
    scale = float(expected.detach().abs().max())
    gap = float((actual.detach().double() - expected.detach().double()).abs().max())
    assert gap > 100 * RTOL * scale, f"{what} (max difference {gap:.3g}, scale {scale:.3g})"


def loss_weight(shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """Random ``weight`` for the loss ``Σ logits·weight`` (:func:`loss_and_grads`, :func:`run_reference`)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(logits: torch.Tensor, weight: torch.Tensor, params: list[torch.Tensor],
                   retain: bool = False) -> tuple[torch.Tensor, ...]:
    """Gradients of ``Σ logits·weight`` w.r.t. ``params`` (None where a param is unused)."""
    loss = (logits * weight).sum()
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain)
