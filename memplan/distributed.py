"""Per-GPU shares of model state under ZeRO / FSDP sharding, offload and tensor parallelism.

ZeRO (Rajbhandari et al. 2020, arXiv:1910.02054): stage 1 partitions optimizer state (and the
fp32 master weights it steps), stage 2 also gradients, stage 3 also parameters, each across
the data-parallel ranks. PyTorch FSDP's SHARD_GRAD_OP shards like stage 2 and FULL_SHARD like
stage 3, keeping unsharded 16-bit copies of the layers in flight. Offload moves optimizer state
(and with stage 3 the parameters) to CPU memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from memplan.errors import MemplanError
from memplan.specs.model import ModelSpec
from memplan.specs.parallel import Offload, ParallelSetup, Sharding
from memplan.specs.training import Precision, TrainingSetup

# DeepSpeed ZeRO defaults (deepspeed/runtime/zero/config.py): reduce_bucket_size is 5e8
# elements; every stage allocates one flat gradient buffer of that size in the parameter dtype
# (stage_1_and_2.py ipg_buffer, stage3.py __ipg_bucket_flat_buffer).
DEEPSPEED_REDUCE_BUCKET_ELEMENTS: Final = 500_000_000
# stage3_max_live_parameters and stage3_max_reuse_distance default to 1e9: gathered parameters
# that will be used again within 1e9 elements of fetches stay on the GPU, so up to 1e9
# parameters remain gathered around the turn from forward to backward.
DEEPSPEED_MAX_LIVE_PARAMETERS: Final = 1000**3  # 1e9 parameters
# FSDP FULL_SHARD gathers one wrapped layer at a time, plus the one prefetched. FSDP2 holds the
# same two layers' worth: in forward a unit's unsharded parameters and its flat all-gather
# output (kept until the next unit's all-gather, comm_ctx.all_gather_state), in backward the
# unit's parameters and the next unit's prefetched all-gather output
# (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py wait_for_unshard, _backward_prefetch).
FSDP_GATHERED_LAYERS: Final = 2


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """How one GPU's share of model state relates to the whole model."""

    data_parallel_degree: int
    weight_divisor: int  # parameters partitioned (ZeRO-3 / FULL_SHARD)
    grad_divisor: int  # gradients partitioned (ZeRO-2+ / FSDP)
    optimizer_divisor: int  # optimizer state (and master weights) partitioned (ZeRO-1+ / FSDP)
    master_weights: bool  # fp32 master copy of 16-bit trainable weights
    offload_optimizer: bool
    offload_params: bool
    gather_layers: int  # FSDP: unsharded layer copies alive at once
    resident_gathered_params: int  # DeepSpeed ZeRO-3: gathered parameters kept on the GPU
    # FSDP2 SHARD_GRAD_OP: each unit stays gathered from its forward to its backward
    keep_unsharded_until_backward: bool
    reduce_bucket_elements: int  # DeepSpeed flat gradient reduce buffer
    unsharded_accumulation: bool  # FSDP under no_sync(): full gradients of every wrapped unit
    fsdp2: bool = False  # fully_shard's per-unit all-gather and reduce-scatter buffers


def master_weights_on(setup: TrainingSetup, parallel: ParallelSetup) -> bool:
    """fp32 master weights: explicit, or DeepSpeed ZeRO training 16-bit weights."""
    if setup.master_weights is not None:
        return setup.master_weights
    pure_half = setup.precision in (Precision.BF16, Precision.FP16)
    return parallel.uses_deepspeed and pure_half and setup.trains_weights


def shard_plan(spec: ModelSpec, setup: TrainingSetup, parallel: ParallelSetup) -> ShardPlan:
    """The sharding of ``parallel`` applied to ``spec`` and ``setup`` (validated)."""
    check_layout(spec, parallel)
    dp = parallel.shard_degree  # HYBRID_SHARD: the ranks of one node
    stage = parallel.zero_stage
    fsdp = parallel.sharding is Sharding.FSDP and stage >= 2
    offload_opt = parallel.offload is not Offload.NONE
    offload_params = parallel.offload is Offload.OPTIMIZER_AND_PARAMS
    deepspeed = parallel.uses_deepspeed
    gather = FSDP_GATHERED_LAYERS if fsdp and stage == 3 else 0
    resident = 0
    if deepspeed and stage == 3:
        live = parallel.max_live_parameters or DEEPSPEED_MAX_LIVE_PARAMETERS
        resident = min(live, spec.num_params or live)
    bucket = 0
    if deepspeed and setup.trains_weights:
        bucket = parallel.reduce_bucket_elements or DEEPSPEED_REDUCE_BUCKET_ELEMENTS
    # Gradient accumulation under FSDP runs the non-final micro-batches in no_sync()
    # (accelerate's accumulate(), Fabric's no_backward_sync): each rank keeps the unsharded
    # gradients of every wrapped unit's flat parameter, frozen parts included (pytorch#91165).
    # FSDP2 accumulates into the sharded gradients: every micro-batch reduce-scatters unless
    # set_requires_gradient_sync(False) is called, which accelerate does not
    # (torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py post_backward, reduce_grads).
    fsdp2 = fsdp and parallel.fsdp_version == 2
    no_sync = fsdp and not fsdp2 and setup.grad_accum_steps > 1 and setup.trains_weights
    # FSDP2 has no SHARD_GRAD_OP of its own: accelerate maps it to fully_shard with
    # reshard_after_forward=False (fsdp2_prepare_model). Parameters stay sharded DTensors
    # between steps; a unit all-gathered for its forward is resharded only by its
    # post-backward (_fsdp_param_group.py post_forward/post_backward), so the gathered units
    # pile up through the forward and are freed one by one in backward.
    held = fsdp2 and stage == 2
    return ShardPlan(
        data_parallel_degree=dp,
        weight_divisor=dp if stage == 3 or held else 1,
        grad_divisor=dp if stage >= 2 else 1,
        optimizer_divisor=dp if stage >= 1 else 1,
        master_weights=master_weights_on(setup, parallel),
        offload_optimizer=offload_opt,
        offload_params=offload_params,
        gather_layers=gather,
        resident_gathered_params=resident,
        keep_unsharded_until_backward=held,
        reduce_bucket_elements=bucket,
        unsharded_accumulation=no_sync,
        fsdp2=fsdp2,
    )


def check_layout(spec: ModelSpec, parallel: ParallelSetup) -> None:
    """Reject tensor-parallel degrees the model's heads or MLP cannot be split by."""
    tp = parallel.tensor_parallel_degree
    if tp == 1:
        return
    if spec.num_attention_heads % tp:
        raise MemplanError(
            f"tensor_parallel_degree={tp} does not divide num_attention_heads="
            f"{spec.num_attention_heads} of {spec.name}"
        )
    if spec.num_key_value_heads % tp:
        raise MemplanError(
            f"tensor_parallel_degree={tp} does not divide num_key_value_heads="
            f"{spec.num_key_value_heads} of {spec.name}"
        )
    if spec.intermediate_size % tp:
        raise MemplanError(
            f"tensor_parallel_degree={tp} does not divide intermediate_size="
            f"{spec.intermediate_size} of {spec.name}"
        )


def zero_model_state_bytes(
    num_params: int, stage: int, data_parallel_degree: int, *, optimizer_bytes_per_param: int = 12
) -> int:
    """Model-state bytes per GPU in the ZeRO paper's accounting (Figure 1 / §5).

    16-bit parameters (2) and gradients (2) plus K bytes of optimizer state per parameter
    (K = 12 for mixed-precision Adam: fp32 master, momentum, variance):
    stage 0: (2 + 2 + K)Ψ; stage 1: 2Ψ + 2Ψ + KΨ/N; stage 2: 2Ψ + (2 + K)Ψ/N;
    stage 3: (2 + 2 + K)Ψ/N.

    >>> zero_model_state_bytes(7_500_000_000, 0, 64) / 1e9
    120.0
    """
    psi, n, k = num_params, data_parallel_degree, optimizer_bytes_per_param
    params = 2 * psi // (n if stage >= 3 else 1)
    grads = 2 * psi // (n if stage >= 2 else 1)
    optim = k * psi // (n if stage >= 1 else 1)
    return params + grads + optim
