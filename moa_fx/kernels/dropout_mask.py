"""The counter-based dropout mask of ``moa_fx::dropout_lora``: where expert e drops its input.

Definition (one stream per (seed, expert), over the flattened positions q = t·d_in + k of x):
- ``key_e = mix32(mix32(mix32(seed mod 2^32) ^ (seed >> 32)) ^ golden·(e + 1))``;
- gap j draws ``h_j = mix32(mix32(j ^ key_e) ^ key_e)`` and ``u_j = (h_j + 1/2) / 2^32`` ∈ (0, 1);
- ``G_j = floor(log u_j / log(1 − p))`` (fp64) is geometric: P(G_j = g) = (1 − p)^g·p;
- the drops are at ``q_i = Σ_{j ≤ i} (G_j + 1) − 1``: every position is dropped independently with
  probability p (the gaps of a Bernoulli(p) sequence are i.i.d. geometric), as ``nn.Dropout`` does.
``mix32`` is a 32-bit integer finaliser (xor-shift, multiply, twice) whose multipliers are below 2^31,
so in torch's int64 a product of a 32-bit value never overflows; every step is masked to 32 bits, and
the same arithmetic in uint32 gives the same bits (the streams are device independent).

Why gaps rather than one hash per element: on CPU an element-wise hash costs one int64 pass over
T·d_in per operation (about ten of them), more than ``nn.Dropout``'s own mask, and it is needed per
expert, in forward and again in backward. The gaps cost p·T·d_in draws per expert (5% at p = 0.05), and
they give the drop positions directly, which is what the sparse correction of ``dropout_lora`` needs.

Map: :func:`mix32`, :func:`stream_keys`, :func:`drop_positions` (the sorted drop positions of one
expert below n; :func:`drop_positions_many`: several experts in one batch), :func:`explicit_masks`
(the (E, T, d_in) 0/1 keep masks materialised: tests and references only).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["mix32", "stream_keys", "drop_positions", "drop_positions_many", "explicit_masks", "MASK32"]

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


def _gaps(keys: Tensor, start: int, count: int, log_keep: Tensor) -> Tensor:
    """(S, count) geometric gaps j = start … start + count − 1 of S streams."""
    j = torch.arange(start, start + count, device=keys.device, dtype=torch.int64)
    h = mix32(mix32(j[None, :] ^ keys[:, None]) ^ keys[:, None])
    u = (h.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)
    return torch.floor(torch.log(u) / log_keep[:, None]).to(torch.int64)


def drop_positions(key: Tensor, p: float, n: int, *, chunk: int | None = None) -> Tensor:
    """The sorted int64 positions q < n that the stream of ``key`` drops at rate ``p`` (empty for p = 0).

    Draws gaps in chunks of ``chunk`` (default about p·n + 8σ + 16: one chunk almost always
    suffices); each chunk checks on the host whether the stream has passed n (on CUDA, one sync per
    chunk). The chunk size does not change the stream.
    """
    return drop_positions_many(key.reshape(1), [p], n, chunk=chunk)[0]


def drop_positions_many(keys: Tensor, ps: Sequence[float], n: int, *, chunk: int | None = None) -> list[Tensor]:
    """:func:`drop_positions` of several streams at once (one batch of gaps, one host check per chunk)."""
    live = [i for i, p in enumerate(ps) if float(p) > 0.0]
    out = [torch.empty(0, dtype=torch.int64, device=keys.device) for _ in ps]
    if not live or n <= 0:
        return out
    if chunk is None:
        chunk = max(int(math.ceil(n * p + 8.0 * math.sqrt(n * p * (1.0 - p)) + 16)) for p in map(float, ps) if p > 0)
    sub = keys.index_select(0, torch.tensor(live, device=keys.device))
    log_keep = torch.tensor([math.log1p(-float(ps[i])) for i in live], dtype=torch.float64, device=keys.device)
    pieces, start, last = [], 0, sub.new_full((len(live),), -1)
    while True:
        pos = last[:, None] + torch.cumsum(_gaps(sub, start, chunk, log_keep) + 1, 1)
        pieces.append(pos)
        last = pos[:, -1]
        start += chunk
        if int(last.min()) >= n - 1:
            break
    pos = torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]
    for row, i in enumerate(live):
        out[i] = pos[row][pos[row] < n]
    return out


def explicit_masks(seed: Tensor, ps: Sequence[float], num_tokens: int, d_in: int) -> Tensor:
    """The (E, T, d_in) fp32 keep masks (1 kept, 0 dropped) of every expert: the mask function
    materialised, for references and tests."""
    keys = stream_keys(seed, len(ps))
    masks = torch.ones(len(ps), num_tokens * d_in, dtype=torch.float32, device=seed.device)
    for e, flat in enumerate(drop_positions_many(keys, ps, num_tokens * d_in)):
        masks[e, flat] = 0.0
    return masks.view(len(ps), num_tokens, d_in)
