"""The counter-based dropout mask of ``moa_fx::dropout_lora``: where expert e drops its input at token t.

Definition (one stream per (seed, expert, token), over the features k = 0 … d_in − 1 of x[t]):
- ``key_e = mix32(mix32(mix32(seed mod 2^32) ^ (seed >> 32)) ^ golden·(e + 1))`` (:func:`stream_keys`);
- ``key_{e,t} = mix32(key_e ^ mix32(golden·(t + 1)))`` (:func:`token_keys`; products mod 2^32);
- gap j of a stream of key κ draws ``h_j = mix32(mix32(j ^ κ) ^ κ)`` and ``u_j = (h_j + 1/2) / 2^32`` ∈ (0, 1);
- ``G_j = floor(log u_j / log(1 − p))`` (fp64) is geometric: P(G_j = g) = (1 − p)^g·p;
- the drops are at ``k_i = Σ_{j ≤ i} (G_j + 1) − 1`` below d_in: every feature is dropped independently
  with probability p (the gaps of a Bernoulli(p) sequence are i.i.d. geometric), as ``nn.Dropout`` does.
``mix32`` is a 32-bit integer finaliser (xor-shift, multiply, twice) whose multipliers are below 2^31,
so in torch's int64 a product of a 32-bit value never overflows; every step is masked to 32 bits, and
the same arithmetic in uint32 gives the same bits (the streams are device independent; ``dropout_cpu.c``
draws them in C).

Why gaps rather than one hash per element: on CPU an element-wise hash costs one int64 pass over
T·d_in per operation (about ten of them), more than ``nn.Dropout``'s own mask, and it is needed per
expert, in forward and again in backward. The gaps cost p·d_in draws per row (5% at p = 0.05), and
they give the drop positions directly, which is what the sparse correction of ``dropout_lora`` needs.
Why a stream per token: a token where the expert does not fire needs no mask, and its stream is then
never drawn (AdaMoLE and top-k fire a fraction of their (token, expert) pairs); the rows are also
independent work, which a GPU wants.

Map: :func:`mix32`, :func:`stream_keys`, :func:`token_keys`, :func:`row_drops` (the drops of several
rows' streams in one batch), :func:`drop_positions` (the sorted drops of one stream below n),
:func:`explicit_masks` (the (E, T, d_in) 0/1 keep masks materialised: tests and references only).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from moa_fx.errors import KernelError

__all__ = ["mix32", "stream_keys", "token_keys", "row_drops", "drop_positions", "explicit_masks", "MASK32"]

MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D  # both below 2^31: (2^32 - 1)·MUL < 2^63
_MUL2 = 0x68E31DA5
_GOLDEN = 0x9E3779B9


def mix32(h: Tensor) -> Tensor:
    """A 32-bit bijective finaliser on int64 values in [0, 2^32) (the result stays there)."""
    h = h ^ (h >> 16)
    h = (h * _MUL1) & MASK32
    h = h ^ (h >> 15)
    h = (h * _MUL2) & MASK32
    return h ^ (h >> 16)


def stream_keys(seed: Tensor, num_experts: int) -> Tensor:
    """The (E,) int64 keys of the experts' streams for one int64 ``seed`` (a 0-d or 1-element tensor,
    ≥ 0, on the device of the data: no host sync)."""
    s = seed.reshape(()).to(torch.int64)
    base = mix32(mix32(s & MASK32) ^ ((s >> 32) & MASK32))
    experts = torch.arange(1, num_experts + 1, device=seed.device, dtype=torch.int64)
    return mix32(base ^ ((experts * _GOLDEN) & MASK32))


def token_keys(keys: Tensor, tokens: Tensor) -> Tensor:
    """The keys of the rows' streams: ``keys`` (S,) of their experts, ``tokens`` (S,) int64 (their t)."""
    return mix32(keys ^ mix32(((tokens + 1) * _GOLDEN) & MASK32))


def _gaps(keys: Tensor, start: int, count: int, log_keep: Tensor) -> Tensor:
    """(S, count) geometric gaps j = start … start + count − 1 of S streams."""
    j = torch.arange(start, start + count, device=keys.device, dtype=torch.int64)
    h = mix32(mix32(j[None, :] ^ keys[:, None]) ^ keys[:, None])
    u = (h.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)
    return torch.floor(torch.log(u) / log_keep[:, None]).to(torch.int64)


def row_drops(keys: Tensor, log_keep: Tensor, n: int, *, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """The drops of S streams (keys (S,), ``log_keep`` (S,) fp64 = log(1 − p), every p > 0) over
    positions 0 … n − 1: ``(row, position)`` int64 pairs, sorted by row, then position.

    Draws gaps in chunks of ``chunk`` columns (default about p·n + 8σ + 16 for the largest p: one
    chunk almost always suffices); only rows not yet past n draw another chunk, which is checked on
    the host (on CUDA, one sync per chunk). The chunk size does not change the streams.
    """
    empty = torch.empty(0, dtype=torch.int64, device=keys.device)
    if keys.numel() == 0 or n <= 0:
        return empty, empty
    if not bool((log_keep < 0).all()):  # p = 0 (or NaN) would never pass n: the loop below would not end
        raise KernelError("row_drops: every stream needs a dropout rate p in (0, 1], i.e. log_keep < 0; "
                          "leave the rows of p = 0 out (they drop nothing)")
    if chunk is not None and chunk < 1:
        raise KernelError(f"row_drops: chunk = {chunk} must be >= 1 (or None: sized from p and n)")
    if chunk is None:
        p = 1.0 - math.exp(float(log_keep.min()))  # the largest rate
        chunk = int(math.ceil(n * p + 8.0 * math.sqrt(n * p * (1.0 - p)) + 16))
    rows, positions = [], []
    live = torch.arange(keys.numel(), device=keys.device)
    last = keys.new_full((keys.numel(),), -1)
    start = 0
    while live.numel():
        pos = last.index_select(0, live)[:, None] + torch.cumsum(
            _gaps(keys.index_select(0, live), start, chunk, log_keep.index_select(0, live)) + 1, 1)
        inside = pos < n
        rows.append(live[:, None].expand_as(pos)[inside])
        positions.append(pos[inside])
        last.index_copy_(0, live, pos[:, -1])
        live = live[pos[:, -1] < n - 1]
        start += chunk
    row, position = (torch.cat(rows), torch.cat(positions)) if len(rows) > 1 else (rows[0], positions[0])
    if len(rows) > 1:  # a second chunk's drops of a row come after every row's first: sort them back
        order = torch.argsort(row * n + position)
        row, position = row.index_select(0, order), position.index_select(0, order)
    return row, position


def drop_positions(key: Tensor, p: float, n: int, *, chunk: int | None = None) -> Tensor:
    """The sorted int64 positions q < n that the stream of ``key`` drops at rate ``p`` (empty for p = 0)."""
    if float(p) <= 0.0:
        return torch.empty(0, dtype=torch.int64, device=key.device)
    log_keep = torch.tensor([math.log1p(-float(p))], dtype=torch.float64, device=key.device)
    return row_drops(key.reshape(1), log_keep, n, chunk=chunk)[1]


def explicit_masks(seed: Tensor, ps: Sequence[float], num_tokens: int, d_in: int) -> Tensor:
    """The (E, T, d_in) fp32 keep masks (1 kept, 0 dropped) of every expert at every token: the mask
    function materialised, for references and tests."""
    masks = torch.ones(len(ps), num_tokens, d_in, dtype=torch.float32, device=seed.device)
    keys = stream_keys(seed, len(ps))
    tokens = torch.arange(num_tokens, device=seed.device, dtype=torch.int64)
    for e, p in enumerate(ps):
        if float(p) > 0.0:
            log_keep = torch.full((num_tokens,), math.log1p(-float(p)), dtype=torch.float64, device=seed.device)
            row, feature = row_drops(token_keys(keys[e].expand(num_tokens), tokens), log_keep, d_in)
            masks[e, row, feature] = 0.0
    return masks
