"""Optimizer state and the optimizer step's temporaries.

States are created lazily on the first ``step()`` (``torch.optim`` and bitsandbytes both
initialise ``self.state[p]`` when it is empty), so step 0 allocates them and later steps reuse
them. The step itself may allocate temporaries: ``foreach`` implementations hold one
state-sized list per (device, dtype) group, single-tensor loops hold a few copies of the
largest parameter, fused kernels none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from memplan.analytic.weights import TensorGroup
from memplan.dtypes import DType, dtype_bytes
from memplan.specs.training import Optimizer, OptimizerImpl
from memplan.trace import allocation_bytes

# bitsandbytes Optimizer8bit: parameters under min_8bit_size elements keep 32-bit states.
BNB_MIN_8BIT_SIZE: Final = 4096
# bitsandbytes blockwise 8-bit states: one fp32 absmax per 256 elements (Optimizer2State).
BNB_STATE_BLOCK_SIZE: Final = 256
# bitsandbytes get_state_buffer pages only tensors of at least 1e5 elements.
BNB_PAGED_MIN_NUMEL: Final = 100_000
# torch.optim with fused=True keeps each parameter's step count as a 0-dim fp32 device tensor.
STEP_TENSOR_BYTES: Final = 4


@dataclass(frozen=True, slots=True)
class OptimizerBytes:
    """Device bytes of one optimizer's state and step workspace."""

    state_bytes: int  # in the caching allocator
    paged_bytes: int  # bnb paged state in CUDA unified memory (outside torch's counters)
    step_temp_bytes: int  # transient during step()
    num_state_tensors: int


def _state_dtype(optimizer: Optimizer, param_dtype: DType, numel: int) -> tuple[DType, int]:
    """(dtype, tensors per parameter) of an optimizer's per-element state."""
    if optimizer in (Optimizer.ADAMW_8BIT, Optimizer.PAGED_ADAMW_8BIT):
        return (DType.UINT8, 2) if numel >= BNB_MIN_8BIT_SIZE else (DType.FP32, 2)
    if optimizer is Optimizer.PAGED_ADAMW:
        return DType.FP32, 2  # PagedAdamW32bit: state1, state2 in fp32
    if optimizer is Optimizer.LION:
        return DType.FP32, 1  # bnb Lion32bit: one momentum
    if optimizer is Optimizer.SGD:
        return param_dtype, 1  # momentum_buffer = clone(grad)
    return param_dtype, 2  # torch AdamW: exp_avg, exp_avg_sq = zeros_like(param)


def _adafactor_numel(group: TensorGroup) -> int:
    # torch.optim.Adafactor (and transformers' Adafactor): row and column second-moment
    # factors over the last two dimensions (per leading index of a 3-D tensor), a full
    # variance for vectors; no first moment (beta1 off).
    shape = group.shape
    if len(shape) < 2 or group.numel != _prod(shape):  # vectors, or a shard of a matrix
        return group.numel
    rows, cols = group.numel // shape[-1], group.numel // shape[-2]
    return rows + cols


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def optimizer_bytes(
    groups: list[TensorGroup],
    optimizer: Optimizer,
    impl: OptimizerImpl,
    *,
    master_dtype: DType | None = None,
    device: str = "cuda",
) -> OptimizerBytes:
    """State and step workspace for the trainable ``groups`` (already sharded, if sharded).

    ``master_dtype`` is the dtype the optimizer steps in (fp32 master weights), if not the
    parameters' own.
    """
    state = paged = temp_largest = temp_total = tensors = 0
    paged_opt = optimizer in (Optimizer.PAGED_ADAMW, Optimizer.PAGED_ADAMW_8BIT)
    for g in groups:
        dtype = master_dtype or g.dtype
        if optimizer is Optimizer.ADAFACTOR:
            numel = _adafactor_numel(g)
            state += allocation_bytes(numel * dtype_bytes(dtype)) * g.count
            tensors += g.count
            # update = (row_var @ col_var).rsqrt_() * grad: one parameter-sized fp32 copy.
            temp_largest = max(temp_largest, g.numel * dtype_bytes(dtype))
            continue
        state_dtype, per_param = _state_dtype(optimizer, dtype, g.numel)
        one = allocation_bytes(g.numel * dtype_bytes(state_dtype))
        if paged_opt and g.numel >= BNB_PAGED_MIN_NUMEL:
            paged += one * per_param * g.count
        else:
            state += one * per_param * g.count
        tensors += per_param * g.count
        if state_dtype is DType.UINT8:  # blockwise absmax per state
            blocks = -(-g.numel // BNB_STATE_BLOCK_SIZE)
            state += allocation_bytes(4 * blocks) * per_param * g.count
        if optimizer is Optimizer.ADAMW and (impl is OptimizerImpl.FUSED or device == "cpu"):
            # The step counter lives on the parameter's device for fused kernels; otherwise
            # it is a CPU tensor, which is device memory only when the device is the CPU.
            state += allocation_bytes(STEP_TENSOR_BYTES) * g.count
        if optimizer is Optimizer.ADAMW and impl is not OptimizerImpl.FUSED:
            # denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + eps (torch _multi_tensor_adam
            # keeps the whole list; _single_tensor_adam one parameter's sqrt and quotient).
            temp_total += one * g.count
            temp_largest = max(temp_largest, 2 * one)
    if optimizer is Optimizer.ADAFACTOR or impl is OptimizerImpl.FOR_LOOP:
        step_temp = temp_largest
    elif impl is OptimizerImpl.FOREACH:
        step_temp = temp_total
    else:
        step_temp = 0
    return OptimizerBytes(state, paged, step_temp, tensors)
