"""Optimizer state and step workspaces per implementation, from the libraries' own rules."""

from __future__ import annotations

import pytest

from memplan.analytic.optimizer import optimizer_bytes
from memplan.analytic.weights import TensorGroup
from memplan.dtypes import DType
from memplan.specs import Optimizer, OptimizerImpl

FUSED, FOREACH, LOOP = OptimizerImpl.FUSED, OptimizerImpl.FOREACH, OptimizerImpl.FOR_LOOP

# Two kinds of tensors: 32 matrices of 4096 x 4096 and 64 vectors of 4096, in bf16.
MATRIX, VECTOR = 4096 * 4096, 4096
GROUPS = [
    TensorGroup("w", MATRIX, DType.BF16, 32),
    TensorGroup("norm", VECTOR, DType.BF16, 64),
]
TENSORS = 32 + 64


def blk(nbytes: int) -> int:
    return -(-nbytes // 512) * 512


def test_fused_adamw_keeps_two_moments_and_a_device_step_counter() -> None:
    opt = optimizer_bytes(GROUPS, Optimizer.ADAMW, FUSED)
    moments = 2 * (32 * blk(2 * MATRIX) + 64 * blk(2 * VECTOR))  # exp_avg, exp_avg_sq in bf16
    assert opt.state_bytes == moments + TENSORS * 512  # 0-dim fp32 step per parameter
    assert opt.step_temp_bytes == 0  # one fused kernel, no temporaries
    assert opt.num_state_tensors == 2 * TENSORS
    assert opt.paged_bytes == 0


def test_foreach_adamw_holds_a_state_sized_list_during_step() -> None:
    opt = optimizer_bytes(GROUPS, Optimizer.ADAMW, FOREACH)
    one_state = 32 * blk(2 * MATRIX) + 64 * blk(2 * VECTOR)
    assert opt.state_bytes == 2 * one_state  # step counters are CPU tensors on a CUDA run
    assert opt.step_temp_bytes == one_state  # denom = exp_avg_sq.sqrt() / bc2 + eps, all at once


def test_for_loop_adamw_temporaries_are_the_largest_parameters() -> None:
    opt = optimizer_bytes(GROUPS, Optimizer.ADAMW, LOOP)
    assert opt.step_temp_bytes == 2 * blk(2 * MATRIX)  # sqrt and quotient of one parameter


def test_step_counters_are_device_memory_on_a_cpu_run() -> None:
    cuda = optimizer_bytes(GROUPS, Optimizer.ADAMW, FOREACH, device="cuda")
    cpu = optimizer_bytes(GROUPS, Optimizer.ADAMW, FOREACH, device="cpu")
    assert cpu.state_bytes - cuda.state_bytes == TENSORS * 512


def test_master_dtype_puts_fp32_moments_beside_16_bit_weights() -> None:
    opt = optimizer_bytes(GROUPS, Optimizer.ADAMW, FUSED, master_dtype=DType.FP32)
    assert opt.state_bytes == 2 * (32 * blk(4 * MATRIX) + 64 * blk(4 * VECTOR)) + TENSORS * 512


def test_8bit_adam_is_two_bytes_per_element_plus_block_scales() -> None:
    opt = optimizer_bytes(GROUPS, Optimizer.ADAMW_8BIT, FUSED)
    # >= 4096 elements: two uint8 states and an fp32 absmax per 256 elements each.
    per_matrix = 2 * blk(MATRIX) + 2 * blk(4 * MATRIX // 256)
    per_vector = 2 * blk(VECTOR) + 2 * blk(4 * VECTOR // 256)
    assert opt.state_bytes == 32 * per_matrix + 64 * per_vector
    small = optimizer_bytes([TensorGroup("b", 4095, DType.BF16, 1)], Optimizer.ADAMW_8BIT, FUSED)
    assert small.state_bytes == 2 * blk(4 * 4095)  # under min_8bit_size: 32-bit states


def test_paged_adamw_moves_large_states_to_unified_memory() -> None:
    opt = optimizer_bytes(GROUPS, Optimizer.PAGED_ADAMW, FUSED)
    # Tensors of >= 1e5 elements are paged (fp32 states); the 4096-element vectors are not.
    assert opt.paged_bytes == 32 * 2 * blk(4 * MATRIX)
    assert opt.state_bytes == 64 * 2 * blk(4 * VECTOR)


@pytest.mark.parametrize(
    ("optimizer", "per_matrix"),
    [
        (Optimizer.SGD, blk(2 * MATRIX)),  # momentum_buffer like the parameter
        (Optimizer.LION, blk(4 * MATRIX)),  # bnb Lion32bit: one fp32 momentum
    ],
)
def test_single_buffer_optimizers(optimizer: Optimizer, per_matrix: int) -> None:
    opt = optimizer_bytes(GROUPS[:1], optimizer, FUSED)
    assert opt.state_bytes == 32 * per_matrix
    assert opt.num_state_tensors == 32


def test_adafactor_factors_matrices_into_rows_and_columns() -> None:
    shaped = [
        TensorGroup("w", MATRIX, DType.BF16, 32, shape=(4096, 4096)),
        TensorGroup("norm", VECTOR, DType.BF16, 64, shape=(VECTOR,)),
    ]
    opt = optimizer_bytes(shaped, Optimizer.ADAFACTOR, FUSED)
    # Row and column second moments for the matrices, a full variance for the vectors.
    assert opt.state_bytes == 32 * blk(2 * (4096 + 4096)) + 64 * blk(2 * VECTOR)
    # The update materializes one parameter-sized tensor.
    assert opt.step_temp_bytes == 2 * MATRIX


def test_no_trainable_tensors_no_state() -> None:
    opt = optimizer_bytes([], Optimizer.ADAMW, FOREACH)
    assert (opt.state_bytes, opt.paged_bytes, opt.step_temp_bytes) == (0, 0, 0)
