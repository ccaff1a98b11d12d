"""Pick the dense-masked (``lora_mixture``) or grouped (``grouped_lora``) form for one site.

Entry point: :func:`choose_form`. The estimate is a roofline per token plus a fixed cost per
call; it only has to rank the two forms, so its constants are round numbers, not measurements.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

from moa_fx.errors import KernelError

__all__ = ["choose_form", "estimate_seconds"]

# Round device figures: (peak multiply-add rate in FLOP/s, memory bandwidth in B/s, fixed cost of
# one kernel launch or eager op dispatch in s). A GPU entry for fp32 assumes TF32 is off.
_DEVICE = {
    ("cuda", "low"): (400e12, 2.5e12, 4e-6),
    ("cuda", "fp32"): (50e12, 2.5e12, 4e-6),
    # CPU: about one core running skinny (rank ≤ 64) GEMMs, the PERF.md anchors' setting.
    ("cpu", "low"): (50e9, 10e9, 5e-6),
    ("cpu", "fp32"): (50e9, 10e9, 5e-6),
}


def estimate_seconds(form: str, ranks: Sequence[int], num_tokens: int, activation_rate: float,
                     dtype: torch.dtype, device, *, d_in: int = 2048, d_out: int = 2048) -> float:
    """Estimated time of one forward call of ``form`` ("dense" or "grouped"); see :func:`choose_form`."""
    device_type = torch.device(device).type
    precision = "fp32" if dtype == torch.float32 else "low"
    flops_per_s, bytes_per_s, per_call = _DEVICE[("cuda" if device_type == "cuda" else "cpu", precision)]
    elem = torch.empty((), dtype=dtype).element_size()
    num_experts, total_rank = len(ranks), sum(ranks)
    pairs = activation_rate * num_experts * num_tokens
    if form == "dense":
        flops = 2 * num_tokens * total_rank * (d_in + d_out)
        moved = num_tokens * elem * (d_in + 2 * d_out)  # read x and y, write out
        calls = 1 if device_type == "cuda" else 3  # CPU: GEMM, gate, addmm
    elif form == "grouped":
        # The Triton kernel pads every expert to the largest rank; the torch path does not.
        rank_per_pair = max(ranks) if device_type == "cuda" else total_rank / num_experts
        flops = 2 * pairs * rank_per_pair * (d_in + d_out)
        # gathered x rows per pair, y read + out write per token, fp32 read-modify-write of ΔY per pair
        moved = pairs * elem * d_in + num_tokens * elem * 2 * d_out + pairs * 8 * d_out
        # CUDA: pair sort (about 6 small launches) + the kernel; CPU: ~5 ops per expert + one sync
        calls = 7 if device_type == "cuda" else 5 * num_experts + 4
    else:
        raise KernelError(f"form={form!r} is not supported; choose 'dense' or 'grouped'.")
    return max(flops / flops_per_s, moved / bytes_per_s) + calls * per_call


def choose_form(ranks: Sequence[int], num_tokens: int, activation_rate: float, dtype: torch.dtype,
                device, *, d_in: Optional[int] = None, d_out: Optional[int] = None
                ) -> Literal["dense", "grouped"]:
    """Return the form with the smaller estimated forward time at one site.

    Rule: time = max(FLOPs / peak, bytes / bandwidth) + calls · per-call cost, where with
    P = activation_rate · E · T active (token, expert) pairs and R = Σ ranks
      dense:   FLOPs = 2·T·R·(d_in + d_out),  bytes = T·b·(d_in + 2·d_out), 1 launch;
      grouped: FLOPs = 2·P·r·(d_in + d_out) (r = max rank on CUDA, mean rank on CPU),
               bytes = P·b·d_in + T·b·2·d_out + P·8·d_out (fp32 scatter-add), ~7 launches
               (CUDA) or ~5 ops per expert (CPU),
    b = bytes per element of ``dtype``. ``activation_rate`` is the fraction of (token, expert)
    pairs with a non-zero weight. d_in/d_out default to 2048 (the GPU benchmark's hidden size).
    Examples: ``choose_form([8] * 4, 8192, 0.1, torch.bfloat16, "cuda") == "dense"`` (memory
    bound: the saved FLOPs do not pay for the scatter), while
    ``choose_form([64] * 8, 1024, 0.25, torch.float32, "cpu") == "grouped"`` (compute bound).
    """
    if not ranks or any(int(r) <= 0 for r in ranks):
        raise KernelError(f"choose_form: ranks {list(ranks)} must be a non-empty list of positive ints.")
    if not 0.0 <= activation_rate <= 1.0:
        raise KernelError(f"choose_form: activation_rate={activation_rate} must lie in [0, 1] "
                          "(the fraction of (token, expert) pairs with a non-zero weight).")
    sizes = {"d_in": d_in or 2048, "d_out": d_out or 2048}
    dense = estimate_seconds("dense", ranks, num_tokens, activation_rate, dtype, device, **sizes)
    grouped = estimate_seconds("grouped", ranks, num_tokens, activation_rate, dtype, device, **sizes)
    return "grouped" if grouped < dense else "dense"
