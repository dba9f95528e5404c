"""Storage formats and their sizes in bytes.

Plain dtypes have a fixed element size. Block-quantized formats (bitsandbytes NF4/FP4 and
LLM.int8) store packed codes plus per-block scales; :func:`quantized_weight_bytes` gives both
parts separately because memplan reports the scales as their own category (quantization state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from memplan._compat import StrEnum


class DType(StrEnum):
    """Element types of tensors memplan reasons about."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    UINT8 = "uint8"
    BOOL = "bool"
    INT32 = "int32"
    INT64 = "int64"


# Element sizes of torch dtypes (torch.finfo/iinfo bits // 8).
DTYPE_BYTES: Final[dict[DType, int]] = {
    DType.FP32: 4,
    DType.FP16: 2,
    DType.BF16: 2,
    DType.FP8: 1,
    DType.INT8: 1,
    DType.UINT8: 1,
    DType.BOOL: 1,  # torch.bool is one byte per element (dropout masks)
    DType.INT32: 4,  # grouped-matmul offsets (MoE experts)
    DType.INT64: 8,  # token ids and labels
}


class Quantization(StrEnum):
    """Weight quantization of the frozen linear layers (bitsandbytes)."""

    NONE = "none"
    INT8 = "int8"  # LLM.int8(): bnb.nn.Linear8bitLt, int8 weight + fp32 row scale
    NF4 = "nf4"  # bnb.nn.Linear4bit(quant_type="nf4")
    FP4 = "fp4"  # bnb.nn.Linear4bit(quant_type="fp4")


# bitsandbytes Linear4bit quantizes blocks of 64 weights, each with one absmax scale
# (bnb.functional.quantize_4bit, blocksize=64 by default in transformers' BitsAndBytesConfig).
NF4_BLOCK_SIZE: Final = 64
# Double quantization (QLoRA, arXiv:2305.14314 §3) stores the fp32 absmax values as 8-bit codes
# in blocks of 256, each block with its own fp32 scale (bnb quantize_blockwise, blocksize=256).
DOUBLE_QUANT_BLOCK_SIZE: Final = 256
# The 4-bit code book (16 fp32 values) and the 8-bit code book of double quantization (256 fp32
# values) are stored once per quantized weight in its QuantState.
NF4_CODE_BYTES: Final = 16 * 4
DOUBLE_QUANT_CODE_BYTES: Final = 256 * 4


def dtype_bytes(dtype: DType) -> int:
    """Bytes per element of ``dtype``."""
    return DTYPE_BYTES[dtype]


@dataclass(frozen=True, slots=True)
class QuantizedBytes:
    """Bytes of one quantized weight matrix: packed codes and quantization-state tensors."""

    packed_bytes: int
    state_tensor_bytes: tuple[int, ...]  # one entry per allocation (absmax, code, ...)

    @property
    def state_bytes(self) -> int:
        return sum(self.state_tensor_bytes)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def quantized_weight_bytes(
    numel: int, quant: Quantization, *, double_quant: bool, out_features: int
) -> QuantizedBytes:
    """Storage of a weight matrix with ``numel`` elements under ``quant``.

    NF4/FP4: ceil(n/2) packed bytes (two 4-bit codes per uint8, bnb Params4bit), plus an fp32
    absmax per 64-element block, or with double quantization a uint8 code per block, an fp32
    scale per 256 blocks and the 8-bit code book. int8 (LLM.int8, bnb Int8Params): one byte per
    element plus one fp32 scale per output row (``SCB``).

    >>> quantized_weight_bytes(4096 * 4096, Quantization.NF4, double_quant=False, out_features=4096)
    QuantizedBytes(packed_bytes=8388608, state_tensor_bytes=(1048576, 64))
    """
    if quant is Quantization.NONE:
        raise ValueError("quantized_weight_bytes needs a quantization")
    if quant is Quantization.INT8:
        return QuantizedBytes(packed_bytes=numel, state_tensor_bytes=(4 * out_features,))
    num_blocks = _ceil_div(numel, NF4_BLOCK_SIZE)
    packed = _ceil_div(numel, 2)
    if not double_quant:
        return QuantizedBytes(packed, (4 * num_blocks, NF4_CODE_BYTES))
    nested_blocks = _ceil_div(num_blocks, DOUBLE_QUANT_BLOCK_SIZE)
    # uint8 absmax codes, fp32 nested absmax, 8-bit code book, 4-bit code book, fp32 offset
    return QuantizedBytes(
        packed, (num_blocks, 4 * nested_blocks, DOUBLE_QUANT_CODE_BYTES, NF4_CODE_BYTES, 4)
    )
