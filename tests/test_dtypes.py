"""Storage formats: element sizes and bitsandbytes' block-quantized layouts."""

from __future__ import annotations

import pytest

from memplan.dtypes import (
    DOUBLE_QUANT_BLOCK_SIZE,
    NF4_BLOCK_SIZE,
    DType,
    Quantization,
    dtype_bytes,
    quantized_weight_bytes,
)


@pytest.mark.parametrize(
    ("dtype", "size"),
    [
        (DType.FP32, 4),
        (DType.FP16, 2),
        (DType.BF16, 2),
        (DType.FP8, 1),
        (DType.INT8, 1),
        (DType.UINT8, 1),
        (DType.BOOL, 1),  # torch.bool is a byte per element (dropout masks)
        (DType.INT64, 8),  # token ids
    ],
)
def test_element_sizes(dtype: DType, size: int) -> None:
    assert dtype_bytes(dtype) == size


def test_every_dtype_has_a_size() -> None:
    assert all(dtype_bytes(d) > 0 for d in DType)


@pytest.mark.parametrize("quant", [Quantization.NF4, Quantization.FP4])
def test_4bit_without_double_quant(quant: Quantization) -> None:
    n = 4096 * 11008  # a Llama-7B MLP matrix
    q = quantized_weight_bytes(n, quant, double_quant=False, out_features=11008)
    assert q.packed_bytes == n // 2  # two 4-bit codes per byte
    blocks = n // 64
    # fp32 absmax per 64-element block, then the 16-entry fp32 code book.
    assert q.state_tensor_bytes == (4 * blocks, 16 * 4)
    assert q.state_bytes == 4 * blocks + 64


def test_4bit_with_double_quant_layout() -> None:
    n = 4096 * 4096
    q = quantized_weight_bytes(n, Quantization.NF4, double_quant=True, out_features=4096)
    blocks = n // 64  # 262,144 first-level blocks
    nested = blocks // 256  # 1,024 second-level blocks
    # uint8 absmax codes, fp32 nested absmax, 8-bit code book, 4-bit code book, fp32 offset
    assert q.state_tensor_bytes == (blocks, 4 * nested, 256 * 4, 16 * 4, 4)
    assert q.packed_bytes == n // 2


def test_qlora_paper_scale_overhead_in_bits_per_parameter() -> None:
    """QLoRA §3: double quantization cuts the scales from 32/64 = 0.5 to 8/64 + 32/(64*256)
    = 0.127 bits per parameter (code books are constant per matrix, so use a large one)."""
    n = 8192 * 28672
    single = quantized_weight_bytes(n, Quantization.NF4, double_quant=False, out_features=8192)
    double = quantized_weight_bytes(n, Quantization.NF4, double_quant=True, out_features=8192)
    per_matrix_single = 16 * 4  # code book
    per_matrix_double = 256 * 4 + 16 * 4 + 4
    assert 8 * (single.state_bytes - per_matrix_single) / n == 32 / NF4_BLOCK_SIZE
    assert 8 * (double.state_bytes - per_matrix_double) / n == pytest.approx(
        8 / NF4_BLOCK_SIZE + 32 / (NF4_BLOCK_SIZE * DOUBLE_QUANT_BLOCK_SIZE), rel=1e-12
    )
    assert 8 * (double.state_bytes - per_matrix_double) / n == pytest.approx(0.127, abs=5e-4)


def test_4bit_rounds_partial_blocks_up() -> None:
    # 65 elements: 33 packed bytes (the last byte holds one code), 2 blocks, 1 nested block.
    q = quantized_weight_bytes(65, Quantization.NF4, double_quant=True, out_features=5)
    assert q.packed_bytes == 33
    assert q.state_tensor_bytes[:2] == (2, 4)


def test_int8_is_one_byte_per_weight_plus_a_row_scale() -> None:
    # LLM.int8: int8 weight (Int8Params) and an fp32 scale per output row (SCB).
    q = quantized_weight_bytes(
        4096 * 11008, Quantization.INT8, double_quant=True, out_features=11008
    )
    assert q.packed_bytes == 4096 * 11008
    assert q.state_tensor_bytes == (4 * 11008,)


def test_no_quantization_is_an_error() -> None:
    with pytest.raises(ValueError, match="needs a quantization"):
        quantized_weight_bytes(10, Quantization.NONE, double_quant=False, out_features=1)
