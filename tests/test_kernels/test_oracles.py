"""Every fused op against its oracles (``check_op``: the pure-torch reference and the per-expert loop,
forward and every gradient, on random inputs, fp32 and bf16, several shapes): the torch path, Triton
under the CPU interpreter, and Triton on CUDA (where there is one)."""

from __future__ import annotations

import pytest

from moa_fx.kernels import grouped_lora, lora_mixture

from .test_lora_expand import expand_after_gemm
from .test_lora_mixture import CASE_IDS, CASES, DTYPES, Case, check_op, needs_cuda, needs_triton

LARGE = Case("large", 300, 256, 192, (4, 8, 16, 64), "mixed")

# (op, check_op options, a large CUDA case too): grouped_lora's weight gradient is 0 at inactive
# pairs by contract, so its check masks that gradient there.
OPS = [
    pytest.param((lora_mixture, {}, True), id="lora_mixture"),
    pytest.param((grouped_lora, {"mask_weight_grad": True}, True), id="grouped_lora"),
    pytest.param((expand_after_gemm, {}, False), id="lora_expand"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("op", OPS)
def test_torch_path_matches_oracles(op, case, dtype):
    fn, options, _ = op
    check_op(fn, case, dtype, backend="torch", **options)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("op", OPS)
def test_triton_interpreter_matches_oracles(op, case, dtype):
    fn, options, _ = op
    check_op(fn, case, dtype, backend="triton", **options)


@needs_triton
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES + [LARGE], ids=CASE_IDS + ["large"])
@pytest.mark.parametrize("op", OPS)
def test_cuda_triton_matches_oracles(op, case, dtype):
    fn, options, large = op
    if case is LARGE and not large:
        pytest.skip("the large case is run for the ops that take x (lora_expand takes z)")
    check_op(fn, case, dtype, backend="triton", device="cuda", **options)
