"""Dropout-LoRA mixture: the ``lora_mixture`` math with an independent input-dropout mask per expert.

``out = y + Σ_e C_e ⊙ (z_e) ·B_eᵀ`` with ``z_e = (x ⊙ m_e)·A_eᵀ / (1 − p_e)`` and
``C[t, j] = weights[t, e(j)]·scales[e(j)]`` (METHODS.md, LoRA expert: ``s·B_e(A_e(dropout(x)))``, the
router reading the undropped x). The keep mask ``m_e`` of expert e is the counter-based function of
(seed, e, token, feature) of :mod:`moa_fx.kernels.dropout_mask`; it is generated inside the op and
generated again in backward, never stored: the op saves x, not E dropped copies of it.

Design. With ``d_e = 1 − m_e`` (the dropped entries, a fraction p of them),
``(x ⊙ m_e)·A_eᵀ = x·A_eᵀ − (x ⊙ d_e)·A_eᵀ``: one dense ``z = x·A_catᵀ`` for every expert (so the site
can also take z from the shared-input GEMM of ``fuse_shared_input``) minus a sparse correction
``c[t, j] = Σ_{k dropped by e(j) at t} x[t, k]·A_cat[j, k]`` evaluated only at the drop positions of
(token, expert) pairs that fire (weight ≠ 0). The backward subtracts the same correction from the
dense ``dx = u·A_cat`` and ``dA = uᵀ·x`` (u = dz/(1 − p)). Why not one hash per element (the first
design): on this CPU an element-wise int64 hash costs ~50 ns per element eager and ~26 under
``torch.compile`` (Inductor compiles it), against ~13 for ``bernoulli_`` and ~27 for ``F.dropout``,
and it is needed per expert, forward and backward; the gap streams cost ~1.6 ns per element of the
mask (``benchmarks/bench_dropout_mask.py``). An exact Philox in torch was ruled out earlier
(~640 ns per element, and Inductor failed to compile it).

Paths: on CPU the correction is one C loop (``dropout_cpu.c``, built on first use by :mod:`native`):
it draws the gap stream of each (token, expert) pair that fires, one row of d_in features, and applies
each drop as it is drawn, with no temporaries; a table of 4096 buckets per rate gives the gap of most draws
without a logarithm (the same gaps as the loop's own logarithm). The C loop and torch's ``log`` may
differ by one ulp, which moves a gap only when the quotient falls within that ulp of an integer:
the paths agree draw for draw except at such rare ties. Elsewhere, or without a C compiler, it is torch index
arithmetic over :func:`site_drops` (its work is p·E·T·d_in, not E·T·d_in). The forward keeps the
(T, R) z_drop for the backward of B and the weights, so the backward draws the masks once (for dx
and dA). The expand half runs ``lora_expand``'s Triton kernel on CUDA (``backend``; see
``resolve_backend``) and its torch reference elsewhere, so both paths draw the same mask. Dropout
probability 0 for every expert is the op without dropout (``lora_mixture`` / ``lora_expand``) exactly.

Map: :class:`_Corrections` (the sparse correction of one call, native or torch);
``moa_fx::dropout_lora`` (custom op, fake, autograd) and ``moa_fx::dropout_lora_backward`` (its
backward, an op of its own: the drop lists have data-dependent sizes); :func:`dropout_lora` (entry
point); :func:`dropout_lora_reference` (explicit masks materialised, then the plain equations).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from moa_fx.errors import KernelError
from moa_fx.kernels import native
from moa_fx.kernels.dropout_mask import explicit_masks, row_drops, stream_keys, token_keys
from moa_fx.kernels.lora_expand import lora_expand, lora_expand_forward
from moa_fx.kernels.lora_mixture import check_inputs, expand_backward, fake_like_y, lora_mixture, resolve_backend
from moa_fx.kernels.reference import column_tables, lora_expand_reference

__all__ = ["dropout_lora", "dropout_lora_reference", "site_drops", "MIN_RATE"]

MIN_RATE = 1e-12  # the smallest dropout rate above 0: its gaps (up to ~23/p) still fit the int64 positions


class Drops(NamedTuple):
    """The drop positions of one expert at pairs that fire: flat positions q = t·d_in + k, and t, k."""

    flat: Tensor
    token: Tensor
    feature: Tensor


def site_drops(seed: Tensor, ps: Sequence[float], weights: Tensor, d_in: int) -> list[Drops]:
    """Every expert's drops, drawn only at the (token, expert) pairs with a non-zero weight (one
    stream per pair: the other tokens' streams are never drawn)."""
    keys = stream_keys(seed.to(weights.device), len(ps))
    rates = torch.tensor([float(p) for p in ps], dtype=torch.float64, device=weights.device)
    pairs = torch.nonzero((weights != 0) & (rates > 0)[None, :].to(weights.device))  # (P, 2): t, e
    token, expert = pairs[:, 0], pairs[:, 1]
    row, feature = row_drops(token_keys(keys.index_select(0, expert), token),
                             torch.log1p(-rates).index_select(0, expert), d_in)
    token, expert = token.index_select(0, row), expert.index_select(0, row)
    order = torch.argsort(expert, stable=True)  # by expert, then token and feature as drawn
    token, expert, feature = token[order], expert[order], feature[order]
    counts = torch.bincount(expert, minlength=len(ps)).tolist()
    return [Drops(t * d_in + k, t, k) for t, k in zip(token.split(counts), feature.split(counts))]


class _Corrections:
    """The sparse corrections of one call, at the drops of (token, expert) pairs that fire: the native
    loop (``dropout_cpu.c``: the streams drawn and applied in one pass, no temporaries) on CPU, torch
    index arithmetic over :func:`site_drops` elsewhere (or when the loop cannot be built). Both give
    the same values up to the order of fp32 sums."""

    def __init__(self, seed: Tensor, ps: Sequence[float], weights: Tensor, x: Tensor, ranks: Sequence[int]):
        self.seed, self.ps, self.weights, self.x, self.ranks = seed, ps, weights, x, ranks
        self.lib = _native_library() if x.device.type == "cpu" else None
        self._drops: Optional[list[Drops]] = None

    @property
    def drops(self) -> list[Drops]:
        if self._drops is None:
            self._drops = site_drops(self.seed, self.ps, self.weights, self.x.shape[1])
        return self._drops

    def forward(self, a32: Tensor) -> Tensor:
        """c (T, R) fp32: ``c[t, j] = Σ_{k dropped by e(j) at t} x[t, k]·A_cat[j, k]``."""
        c = torch.zeros(self.x.shape[0], a32.shape[0], dtype=torch.float32, device=self.x.device)
        if self.lib is not None:
            self._native(a32, c=c)
            return c
        x_flat = self.x.reshape(-1)
        a_t = a32.t()
        for cols, d in _with_drops(self.ranks, self.drops):
            vals = x_flat.index_select(0, d.flat).to(torch.float32)
            rows = a_t[:, cols].contiguous().index_select(0, d.feature)  # (N, r): A_e[:, k] of each drop
            c[:, cols] = torch.zeros(c.shape[0], rows.shape[1], dtype=torch.float32, device=c.device).index_add_(
                0, d.token, rows * vals[:, None])
        return c

    def backward(self, u: Tensor, a32: Tensor, dx32: Optional[Tensor], da32: Optional[Tensor]) -> None:
        """In place: ``dx[t, k] −= Σ_j u[t, j]·A[j, k]`` and ``dA[j, k] −= u[t, j]·x[t, k]`` over the drops
        (either may be None: not wanted)."""
        if dx32 is None and da32 is None:
            return
        if self.lib is not None:
            da_t = None if da32 is None else torch.zeros(da32.shape[1], da32.shape[0], dtype=torch.float32)
            self._native(a32, u=u.contiguous(), dx=dx32, da=da_t)
            if da_t is not None:
                da32.add_(da_t.t())
            return
        if dx32 is not None:
            _correct_dx(dx32, u, a32, self.drops, self.ranks)
        if da32 is not None:
            _correct_da(da32, u, self.x, self.drops, self.ranks)

    def _native(self, a32: Tensor, *, c=None, u=None, dx=None, da=None) -> None:
        keys = stream_keys(self.seed.to(self.x.device), len(self.ps)).contiguous()
        log_keep, tables = _gap_tables(self.lib, tuple(float(p) for p in self.ps))
        cols = _rank_bounds(tuple(int(r) for r in self.ranks))
        fires = (self.weights != 0).to(torch.uint8).contiguous()
        x32 = self.x.to(torch.float32).contiguous()
        a_t = a32.t().contiguous()  # (d_in, R): the r columns of one feature k side by side
        ptr = native.pointer
        self.lib.moa_dropout_correct(x32.shape[0], x32.shape[1], len(self.ps), ptr(cols), ptr(keys), ptr(log_keep),
                                     ptr(tables), ptr(fires), ptr(x32), ptr(a_t), ptr(u), a_t.shape[1], ptr(c),
                                     ptr(dx), ptr(da))


_TABLE_BITS = 12  # TABLE_BITS of dropout_cpu.c


def _native_library():
    lib = native.library("dropout_cpu")
    if lib is not None and lib.moa_dropout_correct.restype is not ctypes.c_int64:
        fn = lib.moa_dropout_correct
        fn.argtypes = [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 8 + [ctypes.c_int64] + [ctypes.c_void_p] * 3
        fn.restype = ctypes.c_int64
        lib.moa_gap_table.argtypes = [ctypes.c_double, ctypes.c_void_p]
        lib.moa_gap_table.restype = None
    return lib


@functools.lru_cache(maxsize=64)
def _rank_bounds(ranks: tuple[int, ...]) -> Tensor:
    """(E + 1,) int64: where each expert's rank columns start in A_cat (and the end)."""
    return torch.tensor([0, *itertools.accumulate(ranks)], dtype=torch.int64)


@functools.lru_cache(maxsize=64)
def _gap_tables(lib, ps: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """(log(1 − p) per expert (E,) fp64, the experts' gap tables (E, 2^12) int32) of one tuple of rates."""
    log_keep = torch.tensor([math.log1p(-p) for p in ps], dtype=torch.float64)
    tables = torch.full((len(ps), 1 << _TABLE_BITS), -1, dtype=torch.int32)
    for e, p in enumerate(ps):
        if p > 0.0:
            lib.moa_gap_table(float(log_keep[e]), tables[e].data_ptr())
    return log_keep, tables


def _with_drops(ranks: Sequence[int], drops: list[Drops]):
    """(rank columns, drops) of every expert that drops something."""
    start = 0
    for rank, d in zip(ranks, drops):
        if d.flat.numel():
            yield slice(start, start + rank), d
        start += rank


def _column_keep(ps: Sequence[float], ranks: Sequence[int], device) -> Tensor:
    """(R,) fp32: 1/(1 − p_e(j)), the inverse keep rate of each rank column's expert."""
    return torch.tensor([1.0 / (1.0 - float(p)) for p, r in zip(ps, ranks) for _ in range(r)],
                        dtype=torch.float32, device=device)


def _dropped_z(z: Optional[Tensor], x: Tensor, a_cat: Tensor, corr: _Corrections, ranks, ps) -> Tensor:
    """``z_drop = (x·A_catᵀ − c) / (1 − p)`` in fp32 (z given: the shared GEMM's x·A_catᵀ)."""
    a32 = a_cat.to(torch.float32)
    dense = torch.mm(x.to(torch.float32), a32.t()) if z is None else z.to(torch.float32)
    return (dense - corr.forward(a32)) * _column_keep(ps, ranks, x.device)


# --- custom ops ---------------------------------------------------------------------------------


@torch.library.custom_op("moa_fx::dropout_lora", mutates_args=())
def _dropout_lora_op(y: Tensor, z: Optional[Tensor], x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor,
                     seed: Tensor, ranks: list[int], scales: list[float], ps: list[float],
                     backend: str) -> tuple[Tensor, Tensor]:
    """(out, z_drop): z_drop (T, R) fp32 is kept for the backward of B and the weights (R columns per
    token, not x's d_in: the backward then draws the masks once, for dx and dA)."""
    zd = _dropped_z(z, x, a_cat, _Corrections(seed, ps, weights, x, ranks), ranks, ps)
    if backend == "triton":
        return lora_expand_forward(y, zd, b_cat, weights, ranks, scales), zd
    return lora_expand_reference(y, zd, b_cat, weights, ranks, scales), zd


@_dropout_lora_op.register_fake
def _(y, z, x, a_cat, b_cat, weights, seed, ranks, scales, ps, backend):
    return fake_like_y(y), x.new_empty((x.shape[0], a_cat.shape[0]), dtype=torch.float32)


@torch.library.custom_op("moa_fx::dropout_lora_backward", mutates_args=())
def _dropout_lora_backward_op(grad: Tensor, zd: Tensor, z: Optional[Tensor], x: Tensor, a_cat: Tensor,
                              b_cat: Tensor, weights: Tensor, seed: Tensor, ranks: list[int], scales: list[float],
                              ps: list[float], needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dz, dx, da_cat, db_cat, dweights); an entry whose ``needs`` flag is False comes back empty.

    With u = dZ_drop/(1 − p) (dZ_drop from ``expand_backward``): dz = u (z given), else it goes on to
    dx = u·A_cat and dA = uᵀ·x; the drops then subtract ``dx[t, k] −= Σ_j u[t, j]·A[j, k]`` and
    ``dA[j, k] −= Σ_t u[t, j]·x[t, k]`` over each expert's dropped (t, k).
    """
    need_z, need_x, need_a, need_b, need_w = needs
    corr = _Corrections(seed, ps, weights, x, ranks)
    dzd, db, dw = expand_backward(grad, zd, b_cat, weights, ranks, scales, need_z=need_z or need_x or need_a,
                                  need_b=need_b, need_w=need_w, dz_dtype=torch.float32)
    # outputs may not alias each other, so one fresh empty per slot
    dz, dx, da = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    if need_z or need_x or need_a:
        u = dzd * _column_keep(ps, ranks, x.device)
        a32 = a_cat.to(torch.float32)
        if need_z:
            dz = u.to(z.dtype)
        dx32 = da32 = None
        if need_x:
            dx32 = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if z is not None else torch.mm(u, a32)
        if need_a:
            da32 = torch.zeros_like(a32) if z is not None else torch.mm(u.t(), x.to(torch.float32))
        corr.backward(u, a32, dx32, da32)
        if need_x:
            dx = dx32.to(x.dtype)
        if need_a:
            da = da32.to(a_cat.dtype)
    if need_w:  # the masks exist only where an expert fires: dW is 0 elsewhere (see dropout_lora)
        dw = dw * (weights != 0)
    return dz, dx, da, (db if need_b else x.new_empty(0)), (dw if need_w else x.new_empty(0))


def _correct_dx(dx32: Tensor, u: Tensor, a32: Tensor, drops: list[Drops], ranks) -> Tensor:
    flat, a_t = dx32.view(-1), a32.t()
    for cols, d in _with_drops(ranks, drops):
        u_e = u[:, cols].contiguous().index_select(0, d.token)
        rows = a_t[:, cols].contiguous().index_select(0, d.feature)
        flat.index_add_(0, d.flat, (u_e * rows).sum(1), alpha=-1)
    return dx32


def _correct_da(da32: Tensor, u: Tensor, x: Tensor, drops: list[Drops], ranks) -> Tensor:
    x_flat = x.reshape(-1)
    da_t = torch.zeros(da32.shape[1], da32.shape[0], dtype=torch.float32, device=da32.device)  # (d_in, R)
    for cols, d in _with_drops(ranks, drops):
        vals = x_flat.index_select(0, d.flat).to(torch.float32)
        u_e = u[:, cols].contiguous().index_select(0, d.token)
        da_t[:, cols] = torch.zeros(da_t.shape[0], u_e.shape[1], dtype=torch.float32,
                                    device=da32.device).index_add_(0, d.feature, u_e * vals[:, None])
    return da32.sub_(da_t.t())


@_dropout_lora_backward_op.register_fake
def _(grad, zd, z, x, a_cat, b_cat, weights, seed, ranks, scales, ps, needs):
    like = (z if z is not None else x, x, a_cat, b_cat, weights)
    return tuple(torch.empty_like(t) if need else x.new_empty(0) for t, need in zip(like, needs))


def _setup(ctx, inputs, output):
    y, z, x, a_cat, b_cat, weights, seed, ranks, scales, ps, _backend = inputs
    ctx.save_for_backward(output[1], z, x, a_cat, b_cat, weights, seed)
    ctx.ranks, ctx.scales, ctx.ps = ranks, scales, ps


def _backward(ctx, grad, _grad_zd):  # z_drop is internal: nothing downstream of it but this op's backward
    zd, z, x, a_cat, b_cat, weights, seed = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[1:6]]
    grads = [None] * 5
    if any(needs):
        computed = _dropout_lora_backward_op(grad, zd, z, x, a_cat, b_cat, weights, seed, ctx.ranks, ctx.scales,
                                             ctx.ps, needs)
        grads = [g if need else None for g, need in zip(computed, needs)]
    dy = grad if ctx.needs_input_grad[0] else None
    return (dy, *grads, None, None, None, None, None)


_dropout_lora_op.register_autograd(_backward, setup_context=_setup)


# --- entry point and reference -----------------------------------------------------------------


def _check(y, z, x, a_cat, b_cat, weights, seed, ranks, scales, ps) -> None:
    check_inputs("dropout_lora", y, x, a_cat, b_cat, weights, ranks, scales)
    if len(ps) != len(ranks) or any(not 0.0 <= float(p) < 1.0 for p in ps):
        raise KernelError(f"dropout_lora: ps = {list(ps)} must hold one dropout probability in [0, 1) per expert "
                          f"({len(ranks)} experts).")
    if any(0.0 < float(p) < MIN_RATE for p in ps):  # a gap of ~23/p would overflow the int64 positions
        raise KernelError(f"dropout_lora: ps = {list(ps)} holds a rate in (0, {MIN_RATE:g}); use 0 (no dropout) or "
                          f"a rate >= {MIN_RATE:g}.")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise KernelError(f"dropout_lora: seed must be one int64 value (a 0-d tensor), got dtype {seed.dtype} and "
                          f"{seed.numel()} elements; e.g. torch.randint(0, 2**62, ()).")
    if z is not None and tuple(z.shape) != (x.shape[0], a_cat.shape[0]):
        raise KernelError(f"dropout_lora: z has shape {tuple(z.shape)}, expected {(x.shape[0], a_cat.shape[0])} "
                          "(T from x, R = sum(ranks)): z must be x @ a_cat.T.")


def dropout_lora(y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor, seed: Tensor,
                 ranks: Sequence[int], scales: Sequence[float], ps: Sequence[float], *, z: Optional[Tensor] = None,
                 backend: Optional[str] = None) -> Tensor:
    """``lora_mixture`` with input dropout ``ps[e]`` drawn independently per expert from ``seed``.

    Shapes as in ``lora_mixture``; ``seed`` a 0-d int64 tensor (one per call: a fresh one per training
    step); ``z``, when given, is ``x @ a_cat.T`` computed elsewhere (the shared-input GEMM) and gets
    the dense part of the gradient. Grads flow to y, z, x, a_cat, b_cat and weights; the gradient
    w.r.t. ``weights`` is 0 where a weight is 0 (as in ``grouped_lora``: the same as the dense one for
    weights built as ``g·sel`` with a hard 0/1 selection, since dL/dg = dL/dw·sel). Kept values are
    scaled by 1/(1 − p) as ``nn.Dropout`` does; every p = 0 is ``lora_mixture`` (or ``lora_expand``)
    exactly. Example::

        out = dropout_lora(y, x, a_cat, b_cat, w, torch.randint(0, 2**62, ()), [4, 4], [4.0, 4.0], [0.05, 0.05])
    """
    _check(y, z, x, a_cat, b_cat, weights, seed, ranks, scales, ps)
    ranks_l, scales_l, ps_l = [int(r) for r in ranks], [float(s) for s in scales], [float(p) for p in ps]
    if not any(ps_l):
        if z is None:
            return lora_mixture(y, x, a_cat, b_cat, weights, ranks_l, scales_l, backend=backend)
        return lora_expand(y, z, b_cat, weights, ranks_l, scales_l, backend=backend)
    chosen = resolve_backend(backend, y.device)
    return _dropout_lora_op(y, z, x, a_cat, b_cat, weights, seed.reshape(()), ranks_l, scales_l, ps_l, chosen)[0]


def dropout_lora_reference(y: Tensor, x: Tensor, a_cat: Tensor, b_cat: Tensor, weights: Tensor, seed: Tensor,
                           ranks: Sequence[int], scales: Sequence[float], ps: Sequence[float]) -> Tensor:
    """The plain equations with the masks materialised (``explicit_masks``), by autograd, in fp32 (fp64
    for fp64 inputs):
    ``y + Σ_e w_e·s_e·((x ⊙ m_e / (1 − p_e))·A_eᵀ)·B_eᵀ``."""
    masks = explicit_masks(seed, ps, x.shape[0], x.shape[1])
    compute = torch.promote_types(x.dtype, torch.float32)  # fp64 inputs stay fp64 (an oracle in tests)
    out = y.to(compute)
    start = 0
    for e, (rank, p) in enumerate(zip(ranks, ps)):
        cols = slice(start, start + rank)
        start += rank
        dropped = x.to(compute) * masks[e].to(compute) / (1.0 - float(p))
        z = dropped @ a_cat[cols].to(compute).t()
        gate = weights[:, e:e + 1].to(compute) * float(scales[e])
        out = out + (z * gate) @ b_cat[:, cols].to(compute).t()
    return out.to(y.dtype)
